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
//   // (*per_layer)[0] is the largest, the average of (kept - 32) is 300
#ifndef KVCACHE_POLICY_BUDGET_H_
#define KVCACHE_POLICY_BUDGET_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"

namespace kvcache::policy {

// round(keep * n). keep must lie in (0, 1]; n >= 1; a result of 0 tokens is an error.
[[nodiscard]] absl::StatusOr<int32_t> UniformBudget(double keep, int32_t n);

// PyramidKV: C - w = round(keep * n); min = (C-w)//beta; max = 2(C-w) - min; when
// max >= n - w: max = n - w, min = 2(C-w) - max; step = (max-min)//(L-1); layer l keeps
// (max - l*step) + w, capped at n. L = 1 keeps C (capped at n). Returns [num_layers].
[[nodiscard]] absl::StatusOr<std::vector<int32_t>> PyramidKVBudgets(int32_t n, int32_t num_layers,
                                                                    double keep, int32_t window,
                                                                    int32_t beta = 20);

// VL-Cache density of one layer: 1 - mean over q heads of below_threshold / causal_entries.
// below, causal: [num_q_heads]. A head with no causal entries counts as dense (sparsity 0).
[[nodiscard]] absl::StatusOr<double> LayerDensity(std::span<const int64_t> below_threshold,
                                                  std::span<const int64_t> causal_entries);

struct VlCacheBudget {
  std::vector<double> unclipped;  // [L] d_l / sum d * alpha * L  (sums to alpha * L)
  std::vector<double> ratio;      // [L] after clip(., 0.01, 1) (and optional renormalisation)
  std::vector<int32_t> tokens;    // [L] round(ratio_l * n_l), at least 1
};
// density: [L] d_l; lengths: [L] n_l. With renormalize, the mass the clip removed or added is
// redistributed over the unclipped layers in proportion to their density until the sum is
// alpha * L again (or every layer is clipped). When every density is 0, every layer gets alpha.
[[nodiscard]] absl::StatusOr<VlCacheBudget> VlCacheLayerBudgets(std::span<const double> density,
                                                                double alpha,
                                                                std::span<const int32_t> lengths,
                                                                bool renormalize = false);

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
