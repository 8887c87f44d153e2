// kvcache/policy/prumerge.h — LLaVA-PruMerge: IQR-adaptive visual token selection + kNN merge.
//
// Over the tokens of one image, given one score per token: keep the IQR outliers (score >
// Q3 + 1.5 (Q3 - Q1), linear-interpolated quartiles; at least one token), optionally add the
// PruMerge+ spatially uniform indices arange(0, N, max(1, int(int(1/ratio)/3))), ratio = kept/N;
// then each kept token i absorbs its k most cosine-similar other tokens (by key):
// x_i <- x_i + sum_j score_j * x_j (unnormalised, as the official code).
// Two entry points share that core: PruMergeReduce on a [N, C] feature matrix before the language
// model (standalone token reducer), and MakePruMergePolicy on the cache (each maximal run of
// image/video tokens of a stream is one image; text is never evicted; values are merged, keys
// optionally). NaN scores never count as outliers and are left out of the quartiles.
//
// Example:
//   // features [576, 1024], cls_attention [576]
//   auto r = kvcache::policy::PruMergeReduce(features, 1024, cls_attention, {}, 0, {});
//   // r->kept: ascending indices; r->features: [r->kept.size(), 1024]
#ifndef KVCACHE_POLICY_PRUMERGE_H_
#define KVCACHE_POLICY_PRUMERGE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "kvcache/policy/policy.h"

namespace kvcache::policy {

struct PruMergeOptions {
  int32_t knn = 32;          // neighbours merged into each kept token
  bool plus = false;         // PruMerge+: add the spatially uniform indices
  bool merge = true;         // false: selection only
  bool merge_keys = false;   // cache policy: also merge keys (values always)
  bool engine_scores = false;  // cache policy: score by snapshot.image_scores (engine CLS
                               // attention) instead of the post-vision attention mass
};

struct PruMergeTerm {
  int32_t source = 0;  // token index merged in
  float weight = 0.0f; // its score
};

struct PruMergeSelection {
  std::vector<int32_t> outliers;                  // ascending IQR outliers
  std::vector<int32_t> kept;                      // ascending (outliers + PruMerge+ extras)
  std::vector<std::vector<PruMergeTerm>> merges;  // [kept.size()]
  double q1 = 0.0, q3 = 0.0, upper = 0.0;
};

// Linear-interpolated percentile (numpy's default) of the non-NaN values; p in [0, 1].
double Percentile(std::span<const float> values, double p);

// scores: [N]; keys: [N, key_dim] (may be empty when !options.merge).
[[nodiscard]] absl::StatusOr<PruMergeSelection> PruMergeSelect(std::span<const float> scores,
                                                               std::span<const float> keys,
                                                               int32_t key_dim,
                                                               const PruMergeOptions& options);

struct ReducedTokens {
  std::vector<int32_t> kept;    // ascending original indices
  std::vector<float> features;  // [kept.size(), channels]
};
// features: [N, channels]; scores: [N]; keys: [N, key_dim] used for similarity, or empty to use
// the features themselves.
[[nodiscard]] absl::StatusOr<ReducedTokens> PruMergeReduce(std::span<const float> features,
                                                           int32_t channels,
                                                           std::span<const float> scores,
                                                           std::span<const float> keys,
                                                           int32_t key_dim,
                                                           const PruMergeOptions& options);

// The cache policy. Scores come from snapshot.image_scores (engine CLS attention, by position)
// with engine_scores, else from the post-vision attention mass of each stream. A sequence without
// image/video tokens gives an empty plan (documented no-op).
[[nodiscard]] absl::StatusOr<std::unique_ptr<Policy>> MakePruMergePolicy(
    const PruMergeOptions& options);

}  // namespace kvcache::policy

#endif  // KVCACHE_POLICY_PRUMERGE_H_
