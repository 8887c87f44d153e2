// Cosine similarity between cached keys, shared by the merging policies (PruMerge's kNN merge,
// LOOK-M's nearest-kept-key merge). Internal to the policy pipeline, not a public header.
#ifndef KVCACHE_SRC_POLICY_SIMILARITY_H_
#define KVCACHE_SRC_POLICY_SIMILARITY_H_

#include <cstddef>
#include <span>
#include <vector>

namespace kvcache::policy {

// rows [n, d] -> the same rows scaled to unit L2 norm (a zero row stays zero, so its similarity
// to anything is 0). The norm is accumulated in double.
std::vector<float> UnitRows(std::span<const float> rows, size_t d);

// a . b over d channels with independent partial sums, so the compiler vectorises it without
// -ffast-math (the sum order is fixed, so results are deterministic across runs and threads).
float DotProduct(const float* a, const float* b, size_t d);

}  // namespace kvcache::policy

#endif  // KVCACHE_SRC_POLICY_SIMILARITY_H_
