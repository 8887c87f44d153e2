// kvcache-eval — what each KV-cache policy buys (memory) and costs (attention fidelity, time)
// on a vision-language decode workload. `kvcache-eval --help` lists the flags; docs/EVAL.md
// explains the measurements, the default workload and the trace format.
#include <unistd.h>

#include <cstdio>
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

constexpr const char* kDefaultPolicies =
    "streamingllm,h2o,snapkv,pyramidkv,adakv,tova,vlcache,fastv,prumerge,random,quest";
constexpr const char* kDefaultKeeps = "0.1,0.25";

const char* kUsage = R"(usage: kvcache-eval [flags]

Runs a vision-language decode workload through the KV cache once with the full cache and once
per (policy, keep ratio), and reports memory, decode-attention time and attention fidelity.

Policies and budgets
  --policy LIST        policies in registry syntax, comma separated; a comma-separated item
                       with '=' continues the previous policy's parameters, so
                       "snapkv:window=16,kernel=3,h2o" is two policies. May be repeated.
                       Default: %s
  --keep LIST          keep ratios in (0, 1], mapped onto each policy's budget knob
                       (keep=, h2o heavy=recent=r/2, fastv ratio=1-r). Default: %s
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
    const bool known = ints.count(flag) > 0 || flag == "--policy" || flag == "--keep" ||
                       flag == "--seed" || flag == "--trace" || flag == "--write-trace" || flag == "--json" ||
                       flag == "--report" || flag == "--report-policy" || flag == "--dtype";
    if (!known) return absl::InvalidArgumentError(absl::StrCat("unknown flag '", flag, "' (see --help)"));
    if (!has_value) {
      if (i + 1 >= argc) return absl::InvalidArgumentError(absl::StrCat(flag, " needs a value"));
      value = argv[++i];
    }
    if (auto it = ints.find(flag); it != ints.end()) {
      if (absl::Status s = ParseInt(flag, value, flag == "--threads" ? 0 : 1, *it->second); !s.ok()) return s;
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
  if (policy_texts.empty()) policy_texts.push_back(kDefaultPolicies);
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
    std::printf(kUsage, kDefaultPolicies, kDefaultKeeps);
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
