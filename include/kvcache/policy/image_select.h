// kvcache/policy/image_select.h — image-token selection baselines: downsample and DivPrune.
//
// Both keep every non-image token and choose k tokens of each image (a maximal run of
// image/video tokens of a stream), exactly as ALGORITHMS.md:
//   downsample: the uniform stride floor(i * N / k), i = 0..k-1, of the image's N tokens;
//   divprune:   greedy max-min diversity under d = 1 - cos (Ranjbar Alvar et al., CVPR 2025):
//               the first token is argmax_j min_{i != j} d(i, j), each next one maximises its
//               minimum distance to the tokens already chosen; ties to the earlier token.
// Budget. `ratio` > 0 is the papers' knob: k = round(ratio * N) per image (at least 1). With
// ratio = 0 (the default) `keep` sets it so the kept share of the PROMPT KV equals keep, like
// every other token policy: text is kept, so ratio = (keep * n - n_text) / N_img over the
// stream's n tokens (N_img image tokens, n_text = n - N_img), clipped to [0, 1], then
// k = round(ratio * N) per image, at least 1 (when keep * n < n_text + images the share kept is
// above keep: n_text + one token per image is the least these policies keep).
// The cache policies plan each (layer, kv head) stream on its own: downsample keeps the same
// positions in every stream of a fresh prefill (it reads positions and modalities only);
// divprune runs on each kv head's image keys (documented adaptation: the paper applies it to the
// visual features before the language model — DivPruneSelect / DivPruneReduce below do that).
// A sequence without image/video tokens gives an empty plan (documented no-op).
//
// Example:
//   auto p = kvcache::policy::CreatePolicy("divprune:keep=0.1");       // 10% of the prompt KV
//   auto q = kvcache::policy::CreatePolicy("downsample:ratio=0.25");   // 25% of each image
//   // standalone, on [576, 1024] visual features before the language model:
//   auto r = kvcache::policy::DivPruneReduce(features, 1024, /*ratio=*/0.098);
//   // r->kept: ascending indices (56 of them); r->features: [56, 1024]
#ifndef KVCACHE_POLICY_IMAGE_SELECT_H_
#define KVCACHE_POLICY_IMAGE_SELECT_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "kvcache/policy/policy.h"
#include "kvcache/policy/prumerge.h"

namespace kvcache::policy {

struct ImageSelectOptions {
  double keep = 0.1;   // share of the prompt KV kept, in (0, 1]; used when ratio == 0
  double ratio = 0.0;  // share of each image's tokens kept, in (0, 1]; 0 = derive from keep
};

// Tokens kept per image: image_sizes [images] (each >= 1) of a stream of n tokens. Returns
// [images], each in [1, size]. InvalidArgument for a bad option or size.
[[nodiscard]] absl::StatusOr<std::vector<int32_t>> ImageTokenBudgets(
    int32_t n, std::span<const int32_t> image_sizes, const ImageSelectOptions& options);

// floor(i * n / k) for i = 0..k-1: k distinct ascending indices in [0, n). 1 <= k <= n.
std::vector<int32_t> DownsampleIndices(int32_t n, int32_t k);

// DivPrune over rows [N, dim] (features or keys; only their direction matters): k indices in
// SELECTION order (the first is the most isolated row). Similarity is the unit rows'
// DotProduct (src/policy/similarity.h), so the result does not depend on the kernel or CPU;
// d = 1 - cos is compared as cos (no rounding of 1 - cos). A zero row has cosine 0 to every
// row. A row holding a non-finite value is chosen only after every finite row, by position.
// 0 <= k <= N; InvalidArgument for a bad shape or k. Cost: O(N^2 dim + k N dim) at worst; the
// first pick abandons a row at its first neighbour closer than the best so far and the max-min
// loop refreshes lazily, so clustered rows (image patches) cost far less.
[[nodiscard]] absl::StatusOr<std::vector<int32_t>> DivPruneSelect(std::span<const float> rows,
                                                                  int32_t dim, int32_t k);

// The standalone visual-token reducer: features [N, channels] -> the round(ratio * N) (at least
// 1) DivPrune tokens, kept ascending, with their feature rows. ratio in (0, 1].
[[nodiscard]] absl::StatusOr<ReducedTokens> DivPruneReduce(std::span<const float> features,
                                                           int32_t channels, double ratio);

// The cache policies ("downsample", "divprune" in the registry).
[[nodiscard]] absl::StatusOr<std::unique_ptr<Policy>> MakeDownsamplePolicy(
    const ImageSelectOptions& options);
[[nodiscard]] absl::StatusOr<std::unique_ptr<Policy>> MakeDivPrunePolicy(
    const ImageSelectOptions& options);

}  // namespace kvcache::policy

#endif  // KVCACHE_POLICY_IMAGE_SELECT_H_
