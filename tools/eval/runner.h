// tools/eval/runner.h — runs a Workload through the cache once with the full cache and once per
// (policy, keep ratio), and measures memory, time and attention fidelity against the full cache.
//
// One run: a fresh cpu Cache; the prompt's K/V appended per layer (with positions, modalities)
// and the H2O score accumulators set from the observation rows; then, for a policy,
// CollectSnapshot(policy->Needs()) -> Plan -> Cache::Apply; then decode_steps steps, each
// appending the step's K/V to every layer and running Cache::DecodeAttention with the step's
// query. Every run sees exactly the same inputs; only the policy differs. The pseudo-policies
// "quest" and "retrieval" are read policies (read_policy.h): nothing is evicted, each decode
// step reads a query-dependent subset of the keys (keep r = round(r * prompt length) tokens per
// stream for Quest, keys per query head for retrieval).
//
// Example:
//   auto runs = kvcache::eval::ExpandRuns({"snapkv", "h2o"}, {0.1, 0.2});
//   auto results = kvcache::eval::RunEval(workload, *runs, {});
//   std::cout << kvcache::eval::FormatTable(*results);   // report.h
#ifndef KVCACHE_TOOLS_EVAL_RUNNER_H_
#define KVCACHE_TOOLS_EVAL_RUNNER_H_

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvcache/dtype.h"
#include "kvcache/types.h"
#include "tools/eval/workload.h"

namespace kvcache::eval {

// One policy configuration to run. keep < 0 means the policy has no keep knob (or the spec set
// its budget itself) and runs once.
struct RunSpec {
  std::string spec;  // registry spec actually created, e.g. "snapkv:window=32,keep=0.1"
  double keep = -1.0;
};

// Resolves `--policy` specs x `--keep` ratios into runs. The keep ratio r maps onto each
// policy's own budget knob: heavy=r/2,recent=r/2 for h2o, keep=r (a share of prompt KV) for
// every other token policy, fastv included (its keep= sets how many image tokens layers >= K
// keep so the prompt KV share is r; ratio= is the paper's dropped image share). A spec that already sets its budget
// (keep, tokens, heavy, recent, ratio), and a policy without one (full, prumerge, think), runs
// once (for h2o, heavy= and recent= are its budget, and ratio= is a budget wherever it appears;
// for vlcache or think, recent= is a window and --keep still applies). Errors (InvalidArgument) name the bad spec or ratio; every spec is
// test-built here.
[[nodiscard]] absl::StatusOr<std::vector<RunSpec>> ExpandRuns(
    const std::vector<std::string>& policies, const std::vector<double>& keeps);

struct RunResult {
  std::string spec;       // as created
  std::string policy;     // policy name
  std::string describe;   // Policy::Describe()
  double keep = -1.0;
  // Memory after the policy was applied to the prompt (before decode) and at the end of decode.
  int64_t pages = 0, kv_bytes = 0, pages_end = 0, kv_bytes_end = 0;
  // Prompt tokens stored, summed over all (layer, kv head) streams, after Apply; kept_share is
  // their ratio: the share of prompt KV the run actually kept (what comparisons use).
  int64_t tokens_kept = 0, tokens_total = 0;
  double kept_share = 0;
  std::array<int64_t, kNumModalities> kept_by_modality{}, total_by_modality{};
  std::vector<std::array<int64_t, kNumModalities>> kept_by_layer;  // [layer][modality]
  // kept_map[l][b]: share of (kv head, prompt token) pairs of position bin b kept in layer l.
  std::vector<std::vector<float>> kept_map;  // [layer][bins]
  double collect_ms = 0, plan_ms = 0, apply_ms = 0;
  double decode_ms_per_step = 0;  // DecodeAttention over all layers, mean over steps
  // Fidelity of each decode step's attention output [q_heads * head_dim] against the full run:
  // relative L2 error ||o - o_full|| / ||o_full|| (the headline), output-norm ratio
  // ||o|| / ||o_full||, cosine similarity. Per layer: mean over steps; overall: mean over layers.
  std::vector<double> layer_cosine, layer_rel_l2, layer_norm_ratio;  // [layer]
  double cosine = 0, rel_l2 = 0, norm_ratio = 0;
  double min_cosine = 0;           // worst (layer, step)
  double rel_l2_worst = 0;         // the worst layer's mean rel L2
  int32_t rel_l2_worst_layer = 0;
  // Attention-mass recall: per decode query, the share of the FULL cache's attention mass
  // (prompt and decode tokens, probabilities averaged over the kv head's query heads) that lies
  // on tokens this run kept. NaN for read policies (they keep every token). Per layer: mean over
  // steps and kv heads; overall: mean over layers; worst: the lowest layer.
  std::vector<double> layer_attn_recall;  // [layer]
  double attn_recall = 0, attn_recall_worst = 0;
  int32_t attn_recall_worst_layer = 0;
  // kept[l * kv_heads + h][i]: prompt token i survived in that stream (cleared after scoring).
  std::vector<std::vector<uint8_t>> kept;
  std::vector<float> outputs;  // [steps, layers, q_heads, head_dim] attention outputs
};

struct EvalOptions {
  DType dtype = DType::kF16;
  int32_t page_tokens = 16;
  int32_t map_bins = 128;  // position bins of kept_map
  // Called after every decode step of every run: (done, total, spec of the current run).
  std::function<void(int64_t, int64_t, const std::string&)> progress;
};

struct EvalResults {
  std::string model;
  int32_t num_layers = 0, num_kv_heads = 0, num_q_heads = 0, head_dim = 0;
  int32_t prompt_len = 0, decode_steps = 0, query_rows = 0;
  std::array<int32_t, kNumModalities> prompt_by_modality{};
  DType dtype = DType::kF16;
  int32_t page_tokens = 0;
  int64_t page_bytes = 0;
  int32_t map_bins = 0;
  RunResult full;              // the reference (policy "full", empty plan)
  std::vector<RunResult> runs; // in ExpandRuns order
};

[[nodiscard]] absl::StatusOr<EvalResults> RunEval(const Workload& workload,
                                                  const std::vector<RunSpec>& runs,
                                                  const EvalOptions& options);

// Cosine similarity, relative L2 error ||b - a|| / ||a|| and norm ratio ||b|| / ||a|| of b
// against reference a; identical vectors give exactly (1, 0, 1).
struct Fidelity {
  double cosine = 1.0;
  double rel_l2 = 0.0;
  double norm_ratio = 1.0;  // ||other|| / ||reference|| (0 when the reference is 0)
};
Fidelity Compare(const float* reference, const float* other, size_t n);

}  // namespace kvcache::eval

#endif  // KVCACHE_TOOLS_EVAL_RUNNER_H_
