// kvcache/policy/budget.h — budget allocators: tokens per layer, then per kv head.
//
// Exactly ALGORITHMS.md "Budgets": uniform round(alpha*n); PyramidKV's arithmetic pyramid;
// VL-Cache's sparsity-aware layer ratios (from the kernel's per-q-head below-threshold counts);
// AdaKV's head-wise split of one layer budget by a global top-k over all heads' scores.
// All functions are pure and validate their arguments (InvalidArgument naming the value).
//
// Example:
//   auto per_layer = kvcache::policy::PyramidKVBudgets(/*n=*/3000, /*layers=*/32,
//                                                      /*keep=*/0.1, /*window=*/32);
//   // (*per_layer)[0] is the largest, the average over layers is 300 (C, window included)
#ifndef KVCACHE_POLICY_BUDGET_H_
#define KVCACHE_POLICY_BUDGET_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"

namespace kvcache::policy {

// round(keep * n). keep must lie in (0, 1]; n >= 1; a result of 0 tokens is an error.
[[nodiscard]] absl::StatusOr<int32_t> UniformBudget(double keep, int32_t n);

// PyramidKV: total capacity C = round(keep * n) WITH the window inside it (the official code's
// max_capacity_prompt), so keep spends the same share of the KV as a uniform budget. C < window
// is an error. When n < 2(C - w) every layer keeps C (the official uniform fallback). Otherwise
// min = (C-w)//beta; max = 2(C-w) - min; when max >= n - w: max = n - w, min = 2(C-w) - max;
// step = (max-min)//(L-1); layer l keeps (max - l*step) + w. Every count is capped to [1, n];
// L = 1 keeps C. The mean over layers is C up to the floor of step: in [C, C + (L-2)/2].
// Returns [num_layers].
[[nodiscard]] absl::StatusOr<std::vector<int32_t>> PyramidKVBudgets(int32_t n, int32_t num_layers,
                                                                    double keep, int32_t window,
                                                                    int32_t beta = 20);

// VL-Cache density of one layer: 1 - mean over q heads of below_threshold / causal_entries.
// below, causal: [num_q_heads]. A head with no causal entries counts as dense (sparsity 0).
[[nodiscard]] absl::StatusOr<double> LayerDensity(std::span<const int64_t> below_threshold,
                                                  std::span<const int64_t> causal_entries);

struct VlCacheBudget {
  std::vector<double> unclipped;  // [L] d_l / sum d * alpha * L  (sums to alpha * L)
  std::vector<double> ratio;      // [L] beta_l after the clip (water-filled by default)
  std::vector<int32_t> tokens;    // [L] round(ratio_l * n_l), clamped to [1, n_l]
};
// density: [L] d_l in [0, 1]; lengths: [L] n_l.
// renormalize (default): exact water-filling, ratio_l = clip(t * d_l, 0.01, 1) with the level t
// such that sum_l ratio_l = alpha * L, so keep = alpha really spends alpha of the KV (with equal
// n_l; up to the rounding of each layer's count). A layer is at the floor only when t * d_l <
// 0.01 for that final t. Example: d = [0.004, 0.301, 1.0], alpha 0.6, n 1000 -> t = 0.8/0.305,
// ratio [0.01049, 0.78951, 1] -> tokens [10, 790, 1000]; d = [0.005, 0.3, 1.0] -> [13, 787, 1000].
// Infeasible totals are met as closely as the clip allows: alpha < 0.01 gives every layer 0.01;
// a total above what the dense layers reach at 1 leaves layers of density 0 at 0.01.
// renormalize = false: the literal ratio_l = clip(unclipped_l, 0.01, 1) (Algorithm 1 step 4; it
// under-spends when layers clip at 1).
// Both: when every density is 0 (no signal) every layer gets clip(alpha, 0.01, 1); L = 1 gets
// clip(alpha, 0.01, 1) too.
[[nodiscard]] absl::StatusOr<VlCacheBudget> VlCacheLayerBudgets(std::span<const double> density,
                                                                double alpha,
                                                                std::span<const int32_t> lengths,
                                                                bool renormalize = true);

// AdaKV: scores[h] are head h's candidate scores (window excluded), positions[h] their
// positions; `budget` is the per-head candidate budget B. The global top H*B over all heads
// (ties: position, then head) gives count_h; head h gets round(count_h*(1-a) + a*B), capped at
// its candidate count. Returns [H].
[[nodiscard]] absl::StatusOr<std::vector<int32_t>> AdaKvHeadBudgets(
    const std::vector<std::span<const float>>& scores,
    const std::vector<std::span<const int32_t>>& positions, int32_t budget,
    double floor_fraction = 0.2);

}  // namespace kvcache::policy

#endif  // KVCACHE_POLICY_BUDGET_H_
