// kvcache-eval — what each KV-cache policy buys (memory) and costs (attention fidelity, time)
// on a vision-language decode workload. `kvcache-eval --help` lists the flags; docs/EVAL.md
// explains the measurements, the default workload and the trace format.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kvcache/policy/registry.h"
#include "oneapi/tbb/global_control.h"
#include "tools/eval/report.h"
#include "tools/eval/runner.h"
#include "tools/eval/trace.h"
#include "tools/eval/workload.h"

namespace ke = kvcache::eval;

namespace {

constexpr int kUsageError = 2;

// The default policy set, in table order. A name the registry does not know (a policy added on
// another branch) is skipped with a note, so extending this list never breaks the default run.
constexpr const char* kDefaultPolicyList[] = {
    "streamingllm", "h2o",    "snapkv", "pyramidkv", "adakv",      "tova",      "vlcache",
    "fastv",        "prumerge", "random", "downsample", "divprune", "quest"};
constexpr const char* kDefaultKeeps = "0.1,0.25";

// The default set as one comma-separated spec, without names the registry does not know.
std::string DefaultPolicies(std::vector<std::string>* skipped = nullptr) {
  std::vector<std::string> known;
  for (const auto& info : kvcache::policy::ListPolicies()) known.push_back(info.name);
  std::string out;
  for (const char* name : kDefaultPolicyList) {
    const std::string n = name;
    const bool read_policy = n == "quest" || n == "retrieval";
    if (!read_policy && std::find(known.begin(), known.end(), n) == known.end()) {
      if (skipped != nullptr) skipped->push_back(n);
      continue;
    }
    absl::StrAppend(&out, out.empty() ? "" : ",", n);
  }
  return out;
}

const char* kUsage = R"(usage: kvcache-eval [flags]

Runs a vision-language decode workload through the KV cache once with the full cache and once
per (policy, keep ratio), and reports memory, decode-attention time and attention fidelity.

Policies and budgets
  --policy LIST        policies in registry syntax, comma separated; a comma-separated item
                       with '=' continues the previous policy's parameters, so
                       "snapkv:window=16,kernel=3,h2o" is two policies. May be repeated.
                       Default: %s
  --keep LIST          keep ratios in (0, 1], mapped onto each policy's budget knob
                       (keep=, h2o heavy=recent=r/2). Default: %s
                       Read policies keep every token and read a subset per decode step:
                       quest[:dense_layers=2,tokens=N] and
                       retrieval[:exact=0,ef=0,sinks=0,recent=0,top_k=N,dense_layers=2]
                       (keep r = round(r * prompt) tokens read per stream / keys per head).
  --list-policies      print every policy with its parameters and defaults, then exit
Workload (synthetic, LLaVA-1.6-7B-shaped; docs/EVAL.md)
  --seed N             generator seed (default 1)
  --layers N           layers (default 32, as LLaVA-1.6-7B)
  --kv-heads N         kv heads (default 8)
  --q-heads N          query heads (default 32)
  --head-dim N         head dimension (default 128)
  --system-tokens N    system prompt tokens incl. BOS (default 35)
  --image-tokens N     image tokens (default 2880: LLaVA-1.6 AnyRes, 5 tiles x 576)
  --image-tiles N      image tiles (default 5)
  --question-tokens N  question tokens = observation rows (default 64)
  --steps N            decode steps (default 32)
Calibration (attention statistics of decode queries; docs/EVAL.md cites each default)
  --profile NAME       llava (default: published LLaVA-1.5/1.6 measurements) or diffuse
                       (the pre-calibration workload: weak sinks, diffuse attention, a stress
                       case); the knobs below override the profile's values
  --early-layers K     layers before FastV's K: dense, no sink (llava 2)
  --early-sink X       sink (BOS) share of attention in layers < K (llava 0.03)
  --early-image-share X  image share in layers < K (llava 0.56)
  --early-k90 X        share of the prompt holding 90%% of non-sink mass, layers < K (0.6)
  --sink X             sink share in layers >= K (llava 0.70)
  --anchors N          persistent text anchors (heavy hitters) per kv head (llava 8)
  --anchor-share X     attention share on the anchors in layers >= K (llava 0.20)
  --image-share X      mean image share over layers >= K (llava 0.033)
  --image-floor X      image share after the fade (llava 0.005)
  --image-fade-end X   depth (layer / (L-1)) where the fade ends (llava 0.75)
  --k90 X              90%%-of-non-sink-mass share in layers >= K, per-layer centre (0.09)
  --k90-spread X       per-layer k90 varies by up to this factor either way (llava 2)
  --near-duplicate X   share of image tokens with a near-duplicate key (llava 0.30)
  --persistence X      weight of a query head's persistent interest, 0..1 (llava 0.9)
  --recency X          AR(1) coefficient of query interest across rows, 0..1 (llava 0.9)
  --trace DIR          read a recorded trace instead (docs/EVAL.md, tools/capture_trace.py)
  --write-trace DIR    also save the workload used as a trace in DIR (the trace format)
Cache
  --dtype f16|bf16|f32 cache element type (default f16)
  --page-tokens N      tokens per page (default 16)
  --threads N          worker threads for the attention kernels (default: all cores)
Output
  --json FILE          write every result as JSON
  --report DIR         write DIR/report.md, DIR/results.json and plots (matplotlib)
  --report-policy NAME policy of the per-layer plots (default: the first one run)
  --quiet              no progress bar
  --help               this text
Exit status: 0 success, 1 run failure, 2 usage error.
)";

struct Args {
  std::vector<std::string> policies;
  std::vector<double> keeps;
  bool list = false, quiet = false, help = false;
  ke::SyntheticSpec spec;
  std::string trace, write_trace, json, report, report_policy;
  std::vector<std::string> skipped_defaults;  // default policies the registry does not have
  kvcache::DType dtype = kvcache::DType::kF16;
  int32_t page_tokens = 16;
  int32_t threads = 0;
};

absl::Status SplitPolicies(const std::string& text, std::vector<std::string>& out) {
  std::vector<std::string> mine;
  for (absl::string_view item : absl::StrSplit(text, ',')) {
    if (item.empty()) return absl::InvalidArgumentError(absl::StrCat("--policy '", text, "' has an empty item"));
    const bool param = item.find('=') != absl::string_view::npos &&
                       item.find(':') == absl::string_view::npos;
    if (param) {
      if (mine.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("--policy '", text, "': parameter '",
                                                       std::string(item), "' before any policy name"));
      }
      absl::StrAppend(&mine.back(), mine.back().find(':') == std::string::npos ? ":" : ",", item);
    } else {
      mine.emplace_back(item);
    }
  }
  out.insert(out.end(), mine.begin(), mine.end());
  return absl::OkStatus();
}

absl::Status ParseInt(const std::string& flag, const std::string& v, int32_t lo, int32_t& out) {
  int32_t x = 0;
  if (!absl::SimpleAtoi(v, &x) || x < lo) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " '", v, "' is not an integer >= ", lo));
  }
  out = x;
  return absl::OkStatus();
}

absl::StatusOr<Args> Parse(int argc, char** argv) {
  Args a;
  std::map<std::string, int32_t*> ints = {
      {"--layers", &a.spec.num_layers},         {"--kv-heads", &a.spec.num_kv_heads},
      {"--q-heads", &a.spec.num_q_heads},       {"--head-dim", &a.spec.head_dim},
      {"--system-tokens", &a.spec.system_tokens}, {"--image-tokens", &a.spec.image_tokens},
      {"--image-tiles", &a.spec.image_tiles},   {"--question-tokens", &a.spec.question_tokens},
      {"--steps", &a.spec.decode_steps},        {"--page-tokens", &a.page_tokens},
      {"--threads", &a.threads}};
  // Calibration knobs: applied over the --profile's values after every flag was read.
  const std::map<std::string, double ke::AttentionTargets::*> reals = {
      {"--early-sink", &ke::AttentionTargets::early_sink},
      {"--early-image-share", &ke::AttentionTargets::early_image},
      {"--early-k90", &ke::AttentionTargets::early_k90},
      {"--sink", &ke::AttentionTargets::sink},
      {"--anchor-share", &ke::AttentionTargets::anchor_share},
      {"--image-share", &ke::AttentionTargets::image},
      {"--image-floor", &ke::AttentionTargets::image_floor},
      {"--image-fade-end", &ke::AttentionTargets::image_fade_end},
      {"--k90", &ke::AttentionTargets::k90},
      {"--k90-spread", &ke::AttentionTargets::k90_spread},
      {"--near-duplicate", &ke::AttentionTargets::near_duplicate},
      {"--persistence", &ke::AttentionTargets::persistence},
      {"--recency", &ke::AttentionTargets::recency}};
  const std::map<std::string, int32_t ke::AttentionTargets::*> target_ints = {
      {"--early-layers", &ke::AttentionTargets::early_layers},
      {"--anchors", &ke::AttentionTargets::anchors}};
  std::vector<std::pair<double ke::AttentionTargets::*, double>> real_overrides;
  std::vector<std::pair<int32_t ke::AttentionTargets::*, int32_t>> int_overrides;
  std::string profile = "llava";
  std::vector<std::string> policy_texts, keep_texts;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i], value;
    bool has_value = false;
    if (const size_t eq = flag.find('='); flag.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
      has_value = true;
    }
    if (flag == "--help" || flag == "-h") { a.help = true; continue; }
    if (flag == "--list-policies") { a.list = true; continue; }
    if (flag == "--quiet") { a.quiet = true; continue; }
    const bool known = ints.count(flag) > 0 || reals.count(flag) > 0 ||
                       target_ints.count(flag) > 0 || flag == "--profile" ||
                       flag == "--policy" || flag == "--keep" ||
                       flag == "--seed" || flag == "--trace" || flag == "--write-trace" || flag == "--json" ||
                       flag == "--report" || flag == "--report-policy" || flag == "--dtype";
    if (!known) return absl::InvalidArgumentError(absl::StrCat("unknown flag '", flag, "' (see --help)"));
    if (!has_value) {
      if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat(flag, " needs a value"));
      value = argv[++i];
    }
    if (auto it = ints.find(flag); it != ints.end()) {
      if (absl::Status s = ParseInt(flag, value, flag == "--threads" ? 0 : 1, *it->second); !s.ok()) return s;
    } else if (auto r = reals.find(flag); r != reals.end()) {
      double x = 0;
      if (!absl::SimpleAtod(value, &x) || !std::isfinite(x)) {
        return absl::InvalidArgumentError(absl::StrCat(flag, " '", value, "' is not a number"));
      }
      real_overrides.emplace_back(r->second, x);
    } else if (auto ti = target_ints.find(flag); ti != target_ints.end()) {
      int32_t x = 0;
      if (absl::Status st = ParseInt(flag, value, 0, x); !st.ok()) return st;
      int_overrides.emplace_back(ti->second, x);
    } else if (flag == "--profile") {
      profile = value;
    } else if (flag == "--policy") {
      policy_texts.push_back(value);
    } else if (flag == "--keep") {
      keep_texts.push_back(value);
    } else if (flag == "--seed") {
      if (!absl::SimpleAtoi(value, &a.spec.seed)) {
        return absl::InvalidArgumentError(absl::StrCat("--seed '", value, "' is not a non-negative integer"));
      }
    } else if (flag == "--trace") {
      a.trace = value;
    } else if (flag == "--write-trace") {
      a.write_trace = value;
    } else if (flag == "--json") {
      a.json = value;
    } else if (flag == "--report") {
      a.report = value;
    } else if (flag == "--report-policy") {
      a.report_policy = value;
    } else if (flag == "--dtype") {
      if (value == "f16") a.dtype = kvcache::DType::kF16;
      else if (value == "bf16") a.dtype = kvcache::DType::kBF16;
      else if (value == "f32") a.dtype = kvcache::DType::kF32;
      else return absl::InvalidArgumentError(absl::StrCat("--dtype '", value, "' is not one of f16, bf16, f32"));
    }
  }
  auto targets = ke::ProfileTargets(profile);
  if (!targets.ok()) return targets.status();
  a.spec.profile = profile == "default" ? "llava" : profile;
  a.spec.targets = *targets;
  for (const auto& [member, x] : real_overrides) a.spec.targets.*member = x;
  for (const auto& [member, x] : int_overrides) a.spec.targets.*member = x;
  if (!real_overrides.empty() || !int_overrides.empty()) absl::StrAppend(&a.spec.profile, "+knobs");
  if (policy_texts.empty()) policy_texts.push_back(DefaultPolicies(&a.skipped_defaults));
  if (keep_texts.empty()) keep_texts.push_back(kDefaultKeeps);
  for (const std::string& t : policy_texts) {
    if (absl::Status s = SplitPolicies(t, a.policies); !s.ok()) return s;
  }
  for (const std::string& t : keep_texts) {
    for (absl::string_view item : absl::StrSplit(t, ',')) {
      double k = 0;
      if (!absl::SimpleAtod(item, &k) || !(k > 0.0 && k <= 1.0)) {
        return absl::InvalidArgumentError(absl::StrCat("--keep '", std::string(item),
                                                       "' is not a ratio in (0, 1]"));
      }
      a.keeps.push_back(k);
    }
  }
  if (a.page_tokens < 1) return absl::InvalidArgumentError("--page-tokens must be >= 1");
  return a;
}

std::string ExecutableDir() {
  std::error_code ec;
  const auto p = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string(".") : p.parent_path().string();
}

std::string PlotScript() {
  const std::filesystem::path next = std::filesystem::path(ExecutableDir()) / "plot_report.py";
  if (std::filesystem::exists(next)) return next.string();
#ifdef KVCACHE_EVAL_SOURCE_DIR
  return std::string(KVCACHE_EVAL_SOURCE_DIR) + "/plot_report.py";
#else
  return next.string();
#endif
}

}  // namespace

int main(int argc, char** argv) {
  auto args = Parse(argc, argv);
  if (!args.ok()) {
    std::fprintf(stderr, "kvcache-eval: %s\n", std::string(args.status().message()).c_str());
    return kUsageError;
  }
  if (args->help) {
    std::printf(kUsage, DefaultPolicies().c_str(), kDefaultKeeps);
    return 0;
  }
  if (args->list) {
    for (const auto& info : kvcache::policy::ListPolicies()) {
      std::printf("%-13s %s\n%-13s defaults: %s\n", info.name.c_str(), info.summary.c_str(), "",
                  info.defaults.empty() ? "(none)" : info.defaults.c_str());
    }
    std::printf("%-13s %s\n%-13s defaults: %s\n", "quest",
                "read policy: Quest page selection by min/max key bounds (all tokens kept)", "",
                "keep=0.1,dense_layers=2 (tokens=N overrides keep)");
    std::printf("%-13s %s\n%-13s defaults: %s\n", "retrieval",
                "read policy: IceFormer top-k key retrieval, hnswlib (all tokens kept)", "",
                "keep=0.1,exact=0,ef=0,sinks=0,recent=0,dense_layers=2 (top_k=N overrides keep)");
    return 0;
  }
  for (const std::string& name : args->skipped_defaults) {
    std::fprintf(stderr, "kvcache-eval: default policy '%s' is not in this build's registry; "
                 "skipped\n", name.c_str());
  }
  auto runs = ke::ExpandRuns(args->policies, args->keeps);
  if (!runs.ok()) {
    std::fprintf(stderr, "kvcache-eval: %s\n", std::string(runs.status().message()).c_str());
    return kUsageError;
  }
  if (!args->report_policy.empty()) {
    bool found = false;
    for (const ke::RunSpec& r : *runs) found = found || r.spec.substr(0, r.spec.find(':')) == args->report_policy;
    if (!found) {
      std::fprintf(stderr, "kvcache-eval: --report-policy '%s' is not among the policies run\n",
                   args->report_policy.c_str());
      return kUsageError;
    }
  }
  absl::StatusOr<ke::Workload> workload =
      args->trace.empty() ? ke::GenerateWorkload(args->spec) : ke::LoadTrace(args->trace);
  if (!workload.ok()) {
    std::fprintf(stderr, "kvcache-eval: %s\n", std::string(workload.status().message()).c_str());
    return args->trace.empty() ? kUsageError : 1;
  }
  if (!args->write_trace.empty()) {
    if (absl::Status s = ke::WriteTrace(*workload, args->write_trace); !s.ok()) {
      std::fprintf(stderr, "kvcache-eval: %s\n", std::string(s.message()).c_str());
      return 1;
    }
  }
  std::unique_ptr<oneapi::tbb::global_control> threads;
  if (args->threads > 0) {
    threads = std::make_unique<oneapi::tbb::global_control>(
        oneapi::tbb::global_control::max_allowed_parallelism, args->threads);
  }
  ke::EvalOptions options;
  options.dtype = args->dtype;
  options.page_tokens = args->page_tokens;
  const bool bar = !args->quiet && isatty(STDERR_FILENO);
  if (bar) {
    options.progress = [](int64_t done, int64_t total, const std::string& spec) {
      constexpr int kWidth = 30;
      const int filled = static_cast<int>(kWidth * done / std::max<int64_t>(total, 1));
      std::fprintf(stderr, "\r[%s%s] %3d%% %-40.40s", std::string(filled, '#').c_str(),
                   std::string(kWidth - filled, ' ').c_str(),
                   static_cast<int>(100 * done / std::max<int64_t>(total, 1)), spec.c_str());
      if (done == total) std::fprintf(stderr, "\r%*s\r", kWidth + 50, "");
      std::fflush(stderr);
    };
  }
  auto results = ke::RunEval(*workload, *runs, options);
  if (!results.ok()) {
    if (bar) std::fprintf(stderr, "\n");
    std::fprintf(stderr, "kvcache-eval: %s\n", std::string(results.status().message()).c_str());
    return 1;
  }
  std::cout << ke::FormatTable(*results) << std::flush;
  if (!args->json.empty()) {
    if (absl::Status s = ke::WriteJson(*results, args->json); !s.ok()) {
      std::fprintf(stderr, "kvcache-eval: %s\n", std::string(s.message()).c_str());
      return 1;
    }
  }
  if (!args->report.empty()) {
    auto note = ke::WriteReport(*results, args->report, args->report_policy, PlotScript());
    if (!note.ok()) {
      std::fprintf(stderr, "kvcache-eval: %s\n", std::string(note.status().message()).c_str());
      return 1;
    }
    std::fprintf(stderr, "kvcache-eval: report written to %s (%s)\n", args->report.c_str(),
                 note->c_str());
  }
  return 0;
}
