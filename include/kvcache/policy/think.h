// kvcache/policy/think.h — ThinK query-driven key-channel pruning with real storage savings.
//
// Per kv head h and channel c: score_c = mean over the head's G query heads and the observation
// rows of q[:, c]^2, times mean_tokens(k[:, c]^2), the tokens being the ones the plan keeps
// (squares first: query heads of opposite sign never cancel; kvpress's ThinKPress). Because
// ||Q_g[:,c] K[:,c]^T||_F^2 = sum_i q_gic^2 * sum_j k_jc^2, this ranks channels exactly as the
// sum over the group of each query head's squared Frobenius norm of the channel's contribution
// to Q_g K^T. The top D - floor(lambda * D) channels (ties: lower channel id) go into
// StreamPlan::key_channels, so Cache::Apply stores those keys narrower; the last `recent` kept
// tokens keep full width (StreamPlan::full_width_recent), and decode tokens appended later are
// full width anyway.
//
// Example:
//   auto scores = kvcache::policy::ThinkChannelScores(window_q, rows, num_q_heads, head_dim,
//                                                     /*kv_head=*/0, /*group=*/4, keys, kept);
//   std::vector<int32_t> channels = kvcache::policy::ThinkKeptChannels(*scores, 0.4);
#ifndef KVCACHE_POLICY_THINK_H_
#define KVCACHE_POLICY_THINK_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvcache/plan.h"
#include "kvcache/policy/policy.h"
#include "kvcache/policy/snapshot.h"

namespace kvcache::policy {

// queries: [rows, num_q_heads, head_dim]; keys: [n, head_dim]; tokens: indices into keys (empty
// = all n). Returns [head_dim].
[[nodiscard]] absl::StatusOr<std::vector<float>> ThinkChannelScores(
    std::span<const float> queries, int32_t rows, int32_t num_q_heads, int32_t head_dim,
    int32_t kv_head, int32_t group_size, std::span<const float> keys,
    std::span<const int32_t> tokens);

// The kept channel ids, ascending: the best head_dim - floor(lambda * head_dim) by score (NaN
// lowest, ties to the lower channel). lambda in [0, 1).
std::vector<int32_t> ThinkKeptChannels(std::span<const float> scores, double lambda);

// Adds channel pruning to every stream of the plan; streams the plan does not name are added
// keeping all their tokens. Needs keys and window_queries (window rows) in the snapshot.
[[nodiscard]] absl::Status AddThinkChannels(const SequenceSnapshot& snap,
                                            const ThinkOptions& options, EvictionPlan& plan);

}  // namespace kvcache::policy

#endif  // KVCACHE_POLICY_THINK_H_
