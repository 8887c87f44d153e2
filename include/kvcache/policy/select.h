// kvcache/policy/select.h — deterministic ranking and budgeted selection with protections.
//
// Every token policy ends here: given one score per token (higher = more worth keeping), a
// budget (total tokens kept, protected ones included) and the protections, pick the kept token
// indices. Ranking is total and deterministic: higher score first, NaN below everything
// (including -inf), ties broken by original position (earlier wins), then by index.
//
// Example:
//   kvcache::policy::Protection p{.sinks = 4, .recent = 32};
//   // scores, positions, modalities: [n]
//   auto kept = kvcache::policy::SelectTokens(scores, positions, modalities, /*budget=*/300, p);
//   // *kept: ascending stream indices, 300 of them when n >= 300
#ifndef KVCACHE_POLICY_SELECT_H_
#define KVCACHE_POLICY_SELECT_H_

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "kvcache/types.h"

namespace kvcache::policy {

// True when a ranks strictly before b (score desc, NaN last, then position asc).
inline bool RanksBefore(float score_a, int32_t pos_a, float score_b, int32_t pos_b) {
  const bool nan_a = score_a != score_a, nan_b = score_b != score_b;
  if (nan_a != nan_b) return nan_b;
  if (!nan_a && score_a != score_b) return score_a > score_b;
  return pos_a < pos_b;
}

// Indices 0..n-1 ordered best first. scores, positions: [n].
std::vector<int32_t> RankTokens(std::span<const float> scores, std::span<const int32_t> positions);

// The best k indices (best first) among `candidates` (indices into scores/positions).
std::vector<int32_t> TopK(std::span<const float> scores, std::span<const int32_t> positions,
                          std::span<const int32_t> candidates, int32_t k);

// Tokens a selection never evicts, and per-modality caps on the candidates kept.
struct Protection {
  int32_t sinks = 0;           // the first `sinks` tokens of the stream (attention sinks)
  int32_t recent = 0;          // the last `recent` tokens (observation / recent window)
  bool protect_text = false;   // never evict text tokens
  bool visual_only = false;    // only image/video tokens are candidates; all others protected
  // At most round(modality_keep[m] * count of modality m) candidates of modality m are kept;
  // a negative entry means no cap.
  std::array<float, kNumModalities> modality_keep = {-1.0f, -1.0f, -1.0f, -1.0f};
};

inline bool IsVisual(Modality m) { return m == Modality::kImage || m == Modality::kVideo; }

// Kept = protected tokens + the best candidates until `budget` tokens are kept (fewer when the
// caps or the stream run out). When the protected tokens alone exceed the budget, all of them are
// kept (the protections win; documented in POLICIES.md). Returns ascending indices.
// Errors: InvalidArgument for mismatched sizes, a negative budget or a cap outside [0, 1].
[[nodiscard]] absl::StatusOr<std::vector<int32_t>> SelectTokens(
    std::span<const float> scores, std::span<const int32_t> positions,
    std::span<const Modality> modalities, int32_t budget, const Protection& protection);

// 1-D pooling over scores[0, n) with stride 1 and zero padding kernel/2 on each side; kAvg
// divides by the kernel size (padding counted, like torch avg_pool1d's default), kMax takes the
// max over the in-range values. kernel must be odd and >= 1.
enum class Pooling : uint8_t { kNone = 0, kAvg = 1, kMax = 2 };
std::vector<float> Pool1D(std::span<const float> scores, int32_t kernel, Pooling pooling);

}  // namespace kvcache::policy

#endif  // KVCACHE_POLICY_SELECT_H_
