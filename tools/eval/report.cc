// kvcache-eval output: table, JSON, report directory.
#include "tools/eval/report.h"

#include <sys/wait.h>

#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace kvcache::eval {
namespace {

constexpr double kMiB = 1024.0 * 1024.0;

std::string KeepText(double keep) { return keep < 0 ? std::string("-") : absl::StrFormat("%.2f", keep); }

// Recall with four decimals, "-" for a read policy (it keeps every token: no recall).
std::string RecallText(double x) {
  return std::isnan(x) ? std::string("-") : absl::StrFormat("%.4f", x);
}

double Share(int64_t kept, int64_t total) {
  return total > 0 ? static_cast<double>(kept) / static_cast<double>(total) : 0.0;
}

nlohmann::json RunJson(const RunResult& r, const RunResult& full) {
  nlohmann::json j;
  j["spec"] = r.spec;
  j["policy"] = r.policy;
  j["describe"] = r.describe;
  j["keep"] = r.keep < 0 ? nlohmann::json(nullptr) : nlohmann::json(r.keep);
  j["pages"] = r.pages;
  j["kv_bytes"] = r.kv_bytes;
  j["pages_end"] = r.pages_end;
  j["kv_bytes_end"] = r.kv_bytes_end;
  j["kv_saving"] = 1.0 - Share(r.kv_bytes, full.kv_bytes);
  j["tokens_kept"] = r.tokens_kept;
  j["tokens_total"] = r.tokens_total;
  j["kept_share"] = r.kept_share;
  nlohmann::json km = nlohmann::json::object(), tm = nlohmann::json::object();
  for (int m = 0; m < kNumModalities; ++m) {
    km[ModalityName(static_cast<Modality>(m))] = r.kept_by_modality[m];
    tm[ModalityName(static_cast<Modality>(m))] = r.total_by_modality[m];
  }
  j["kept_by_modality"] = km;
  j["total_by_modality"] = tm;
  nlohmann::json layers = nlohmann::json::array();
  for (size_t l = 0; l < r.kept_by_layer.size(); ++l) {
    nlohmann::json e = nlohmann::json::object();
    for (int m = 0; m < kNumModalities; ++m) {
      e[ModalityName(static_cast<Modality>(m))] = r.kept_by_layer[l][m];
    }
    layers.push_back(e);
  }
  j["kept_by_layer"] = layers;
  j["kept_map"] = r.kept_map;
  j["collect_ms"] = r.collect_ms;
  j["plan_ms"] = r.plan_ms;
  j["apply_ms"] = r.apply_ms;
  j["plan_apply_ms"] = r.plan_ms + r.apply_ms;
  j["decode_ms_per_step"] = r.decode_ms_per_step;
  j["decode_time_ratio"] = full.decode_ms_per_step > 0 ? r.decode_ms_per_step / full.decode_ms_per_step : 0.0;
  j["cosine"] = r.cosine;
  j["rel_l2"] = r.rel_l2;
  j["min_cosine"] = r.min_cosine;
  j["layer_cosine"] = r.layer_cosine;
  j["layer_rel_l2"] = r.layer_rel_l2;
  j["rel_l2_worst"] = r.rel_l2_worst;
  j["rel_l2_worst_layer"] = r.rel_l2_worst_layer;
  j["norm_ratio"] = r.norm_ratio;
  j["layer_norm_ratio"] = r.layer_norm_ratio;
  // Recall is undefined (null) for read policies, which keep every token.
  auto number = [](double x) { return std::isnan(x) ? nlohmann::json(nullptr) : nlohmann::json(x); };
  j["attn_recall"] = number(r.attn_recall);
  j["attn_recall_worst"] = number(r.attn_recall_worst);
  j["attn_recall_worst_layer"] =
      std::isnan(r.attn_recall) ? nlohmann::json(nullptr) : nlohmann::json(r.attn_recall_worst_layer);
  nlohmann::json recall = nlohmann::json::array();
  for (double x : r.layer_attn_recall) recall.push_back(number(x));
  j["layer_attn_recall"] = recall;
  return j;
}

std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

int RunShell(const std::string& command) {
  const int rc = std::system(command.c_str());
  if (rc == -1) return -1;
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

}  // namespace

std::string FormatTable(const EvalResults& res) {
  std::ostringstream os;
  os << absl::StrFormat(
      "workload: %s  %d layers x %d kv heads (%d q heads) x D=%d, %s; prompt %d tokens "
      "(%d text, %d image), %d decode steps\n",
      res.model, res.num_layers, res.num_kv_heads, res.num_q_heads, res.head_dim,
      DTypeName(res.dtype), res.prompt_len,
      res.prompt_by_modality[static_cast<int>(Modality::kText)],
      res.prompt_by_modality[static_cast<int>(Modality::kImage)], res.decode_steps);
  size_t width = 6;
  for (const RunResult& r : res.runs) width = std::max(width, r.spec.size());
  const std::string header = absl::StrFormat(
      "%-*s %5s %6s %8s %6s %8s %6s %8s %8s %7s %7s %6s %6s %6s %6s %6s %6s",
      static_cast<int>(width), "policy", "keep", "kept%", "KV MiB", "saved", "attn ms",
      "x full", "score ms", "plan ms", "rel L2", "worst", "recall", "worst", "norm", "cos",
      "text%", "image%");
  os << header << "\n" << std::string(header.size(), '-') << "\n";
  auto row = [&](const RunResult& r, const std::string& name) {
    const RunResult& f = res.full;
    os << absl::StrFormat(
        "%-*s %5s %5.1f%% %8.2f %5.1f%% %8.3f %6.2f %8.1f %8.1f %7.4f %7.4f %6s %6s %6.3f %6.4f "
        "%5.1f%% %5.1f%%\n",
        static_cast<int>(width), name, KeepText(r.keep), 100.0 * r.kept_share, r.kv_bytes / kMiB,
        100.0 * (1.0 - Share(r.kv_bytes, f.kv_bytes)), r.decode_ms_per_step,
        f.decode_ms_per_step > 0 ? r.decode_ms_per_step / f.decode_ms_per_step : 0.0,
        r.collect_ms, r.plan_ms + r.apply_ms, r.rel_l2, r.rel_l2_worst,
        RecallText(r.attn_recall), RecallText(r.attn_recall_worst),
        r.norm_ratio, r.cosine,
        100.0 * Share(r.kept_by_modality[static_cast<int>(Modality::kText)],
                      r.total_by_modality[static_cast<int>(Modality::kText)]),
        100.0 * Share(r.kept_by_modality[static_cast<int>(Modality::kImage)],
                      r.total_by_modality[static_cast<int>(Modality::kImage)]));
  };
  row(res.full, "full (reference)");
  for (const RunResult& r : res.runs) row(r, r.spec);
  return os.str();
}

std::string ToJson(const EvalResults& res) {
  nlohmann::json j;
  j["format"] = "kvcache-eval-results";
  j["version"] = 1;
  nlohmann::json w;
  w["model"] = res.model;
  w["num_layers"] = res.num_layers;
  w["num_kv_heads"] = res.num_kv_heads;
  w["num_q_heads"] = res.num_q_heads;
  w["head_dim"] = res.head_dim;
  w["prompt_len"] = res.prompt_len;
  w["decode_steps"] = res.decode_steps;
  w["query_rows"] = res.query_rows;
  nlohmann::json pm = nlohmann::json::object();
  for (int m = 0; m < kNumModalities; ++m) {
    pm[ModalityName(static_cast<Modality>(m))] = res.prompt_by_modality[m];
  }
  w["prompt_by_modality"] = pm;
  j["workload"] = w;
  j["cache"] = {{"dtype", DTypeName(res.dtype)},
                {"page_tokens", res.page_tokens},
                {"page_bytes", res.page_bytes},
                {"map_bins", res.map_bins}};
  j["full"] = RunJson(res.full, res.full);
  nlohmann::json runs = nlohmann::json::array();
  for (const RunResult& r : res.runs) runs.push_back(RunJson(r, res.full));
  j["runs"] = runs;
  return j.dump(1);
}

absl::Status WriteJson(const EvalResults& res, const std::string& path) {
  std::ofstream f(path, std::ios::binary);
  if (!f) return absl::InvalidArgumentError(absl::StrCat("cannot open '", path, "' for writing"));
  f << ToJson(res) << "\n";
  f.close();
  if (!f) return absl::DataLossError(absl::StrCat("writing '", path, "' failed"));
  return absl::OkStatus();
}

absl::StatusOr<std::string> WriteReport(const EvalResults& res, const std::string& dir,
                                        const std::string& report_policy,
                                        const std::string& plot_script) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot create report directory '", dir, "': ", ec.message()));
  }
  const std::string json_path = (std::filesystem::path(dir) / "results.json").string();
  if (absl::Status s = WriteJson(res, json_path); !s.ok()) return s;

  std::string policy = report_policy;
  if (policy.empty() && !res.runs.empty()) policy = res.runs.front().policy;
  bool found = policy.empty();
  for (const RunResult& r : res.runs) found = found || r.policy == policy;
  if (!found) {
    return absl::InvalidArgumentError(absl::StrCat("--report-policy '", policy,
                                                   "' is not among the policies run"));
  }

  // Plots first, so report.md can say which exist.
  std::string note;
  std::string python;
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("KVCACHE_EVAL_PYTHON"); env != nullptr && *env != '\0') {
    candidates.push_back(env);
  }
  candidates.push_back("python3");
  candidates.push_back("/usr/bin/python3");
  for (const std::string& c : candidates) {
    if (RunShell(absl::StrCat(ShellQuote(c), " -c 'import matplotlib, numpy' >/dev/null 2>&1")) == 0) {
      python = c;
      break;
    }
  }
  bool plotted = false;
  if (!std::filesystem::exists(plot_script)) {
    note = absl::StrCat("plots skipped: plot script '", plot_script, "' not found");
  } else if (python.empty()) {
    note = absl::StrCat("plots skipped: no python3 with matplotlib and numpy found (tried ",
                        absl::StrJoin(candidates, ", "),
                        "; install python3-matplotlib or set KVCACHE_EVAL_PYTHON)");
  } else {
    const int rc = RunShell(absl::StrCat(ShellQuote(python), " ", ShellQuote(plot_script), " ",
                                         ShellQuote(json_path), " ", ShellQuote(dir), " ",
                                         ShellQuote(policy)));
    if (rc == 0) {
      plotted = true;
      note = absl::StrCat("plots written by ", plot_script);
    } else {
      note = absl::StrCat("plots skipped: ", plot_script, " exited with status ", rc);
    }
  }

  std::ostringstream md;
  md << "# kvcache-eval report\n\n";
  md << absl::StrFormat(
      "Workload `%s`: %d layers, %d kv heads, %d query heads, head dim %d, cache dtype %s, "
      "%d-token pages. Prompt of %d tokens (%d text, %d image); %d decode steps; %d observation "
      "query rows.\n\n",
      res.model, res.num_layers, res.num_kv_heads, res.num_q_heads, res.head_dim,
      DTypeName(res.dtype), res.page_tokens, res.prompt_len,
      res.prompt_by_modality[static_cast<int>(Modality::kText)],
      res.prompt_by_modality[static_cast<int>(Modality::kImage)], res.decode_steps,
      res.query_rows);
  md << "Fidelity compares each decode step's attention output (all query heads of a layer) "
        "with the full cache's: relative L2 error (the headline; `worst` is the worst layer), "
        "attention-mass recall (the full cache's attention mass on the tokens the run kept; "
        "`worst` is the worst layer), output-norm ratio and cosine, averaged over steps and "
        "layers. `kept` is the share of prompt KV the run actually kept. Times are wall-clock on this "
        "machine: `attn ms` is Cache::DecodeAttention over all layers per decode step, "
        "`score ms` is collecting what the policy reads (scoring the observation rows, reading "
        "keys), `plan ms` is Plan + Apply. See docs/EVAL.md.\n\n";
  md << "| policy | keep | kept | KV MiB | saved | attn ms/step | x full | score ms | "
        "plan+apply ms | rel L2 | worst L2 | recall | worst recall | norm | cos | text kept | "
        "image kept |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  auto row = [&](const RunResult& r, const std::string& name) {
    const RunResult& f = res.full;
    md << absl::StrFormat(
        "| `%s` | %s | %.1f%% | %.2f | %.1f%% | %.3f | %.2f | %.1f | %.1f | %.4f | %.4f | %s | "
        "%s | %.3f | %.4f | %.1f%% | %.1f%% |\n",
        name, KeepText(r.keep), 100.0 * r.kept_share, r.kv_bytes / kMiB,
        100.0 * (1.0 - Share(r.kv_bytes, f.kv_bytes)), r.decode_ms_per_step,
        f.decode_ms_per_step > 0 ? r.decode_ms_per_step / f.decode_ms_per_step : 0.0,
        r.collect_ms, r.plan_ms + r.apply_ms, r.rel_l2, r.rel_l2_worst,
        RecallText(r.attn_recall), RecallText(r.attn_recall_worst),
        r.norm_ratio, r.cosine,
        100.0 * Share(r.kept_by_modality[0], r.total_by_modality[0]),
        100.0 * Share(r.kept_by_modality[1], r.total_by_modality[1]));
  };
  row(res.full, "full");
  for (const RunResult& r : res.runs) row(r, r.spec);
  md << "\n";
  if (plotted) {
    md << "## Fidelity against the kept share of prompt KV\n\n![fidelity](fidelity_vs_keep.png)\n\n";
    md << "## Tokens kept per layer by modality (`" << policy << "`)\n\n"
       << "![kept per layer](kept_by_layer.png)\n\n";
    md << "## Kept tokens, layer x prompt position (`" << policy << "`)\n\n"
       << "![kept map](kept_map.png)\n\n";
  } else {
    md << "_" << note << "._\n\n";
  }
  if (!policy.empty()) {
    md << "## Per-layer fidelity (`" << policy << "`)\n\n| layer |";
    std::vector<const RunResult*> sel;
    for (const RunResult& r : res.runs) {
      if (r.policy == policy) sel.push_back(&r);
    }
    for (const RunResult* r : sel) {
      md << " rel L2 / recall keep " << KeepText(r->keep) << " |";
    }
    md << "\n|---|";
    for (size_t i = 0; i < sel.size(); ++i) md << "---|";
    md << "\n";
    for (int32_t l = 0; l < res.num_layers; ++l) {
      md << "| " << l << " |";
      for (const RunResult* r : sel) {
        md << absl::StrFormat(" %.4f / %s |", r->layer_rel_l2[l],
                              RecallText(r->layer_attn_recall[l]));
      }
      md << "\n";
    }
  }
  const std::string md_path = (std::filesystem::path(dir) / "report.md").string();
  std::ofstream f(md_path, std::ios::binary);
  if (!f) return absl::InvalidArgumentError(absl::StrCat("cannot open '", md_path, "'"));
  f << md.str();
  f.close();
  if (!f) return absl::DataLossError(absl::StrCat("writing '", md_path, "' failed"));
  return note;
}

}  // namespace kvcache::eval
