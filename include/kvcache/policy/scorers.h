// kvcache/policy/scorers.h — token scorers: one float per token of a stream, higher = keep.
//
// Each scorer reads one StreamSnapshot (and, for the random baseline, its coordinates) and
// returns [length] scores; selection (select.h) turns them into kept indices. They fail with
// FailedPrecondition naming the missing snapshot field when the snapshot was collected without
// it. Formulas: ALGORITHMS.md "Token scores".
//
// Example:
//   auto s = kvcache::policy::ScoreTokens(kvcache::policy::TokenScore::kKeyNorm, snap, 0, 3,
//                                         /*seed=*/0);
//   // (*s)[j] = -||k_j||
#ifndef KVCACHE_POLICY_SCORERS_H_
#define KVCACHE_POLICY_SCORERS_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "kvcache/policy/snapshot.h"

namespace kvcache::policy {

enum class TokenScore : uint8_t {
  kAccumulated = 0,  // H2O: the stream's score accumulators
  kWindow = 1,       // SnapKV: attention mass of the last w rows (pool separately)
  kPostVision = 2,   // VL-Cache: attention mass of the post-vision rows
  kLastRow = 3,      // TOVA / FastV: the last observation row
  kKeyNorm = 4,      // Knorm: -||k_j||
  kRandom = 5,       // seeded uniform [0, 1)
  kRecency = 6,      // StreamingLLM: the stream index (later = higher)
};

const char* TokenScoreName(TokenScore s);

// Scores of stream (layer, kv_head). seed is used by kRandom only.
[[nodiscard]] absl::StatusOr<std::vector<float>> ScoreTokens(TokenScore kind,
                                                             const SequenceSnapshot& snap,
                                                             int32_t layer, int32_t kv_head,
                                                             uint64_t seed);

// Deterministic uniform [0, 1) from (seed, layer, kv_head, position): SplitMix64, so the value
// is the same on every platform and does not depend on the order of calls.
float SeededUniform(uint64_t seed, int32_t layer, int32_t kv_head, int32_t position);

// One ranking per layer (TOVA, VL-Cache shared option): each position's score becomes the mean of
// its scores over the heads that hold it. per_head[h] and positions[h] are [len_h]; the result
// has the same shape. NaN propagates (and then ranks lowest).
std::vector<std::vector<float>> ShareAcrossHeads(const std::vector<std::vector<float>>& per_head,
                                                 const std::vector<std::span<const int32_t>>&
                                                     positions);

}  // namespace kvcache::policy

#endif  // KVCACHE_POLICY_SCORERS_H_
