// tools/eval/report.h — kvcache-eval output: the aligned stdout table, the JSON document, and
// the --report directory (results.json, report.md, plots drawn by plot_report.py).
//
// Example:
//   std::cout << kvcache::eval::FormatTable(results);
//   absl::Status s = kvcache::eval::WriteJson(results, "results.json");
//   auto notes = kvcache::eval::WriteReport(results, "report_dir", "snapkv", script_path);
#ifndef KVCACHE_TOOLS_EVAL_REPORT_H_
#define KVCACHE_TOOLS_EVAL_REPORT_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tools/eval/runner.h"

namespace kvcache::eval {

// One row per run, the full cache first; columns are explained in docs/EVAL.md.
std::string FormatTable(const EvalResults& results);

// Every measured value as a JSON document (format "kvcache-eval-results", version 1).
std::string ToJson(const EvalResults& results);
[[nodiscard]] absl::Status WriteJson(const EvalResults& results, const std::string& path);

// Writes DIR/results.json and DIR/report.md, then runs `python plot_script results.json DIR
// report_policy` to draw the PNG plots. Returns a human-readable note: which plots were drawn,
// or why they were skipped (no python with matplotlib); report.md is written either way.
// `report_policy` names the policy (registry name) of the per-layer plots; empty = the first.
[[nodiscard]] absl::StatusOr<std::string> WriteReport(const EvalResults& results,
                                                      const std::string& dir,
                                                      const std::string& report_policy,
                                                      const std::string& plot_script);

}  // namespace kvcache::eval

#endif  // KVCACHE_TOOLS_EVAL_REPORT_H_
