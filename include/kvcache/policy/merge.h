// kvcache/policy/merge.h — LOOK-M-style merging of evicted tokens into kept ones.
//
// After a token policy chose the kept tokens of a stream, each evicted token is merged into its
// most cosine-similar kept key (ties: the earlier kept slot). Merges become MergeTerms and kept
// weights of the StreamPlan, so Cache::Apply performs them while compacting. With m tokens
// merged into one kept token:
//   kPivot:   x' = x_kept / 2 + (1 / (2m)) * sum x_ev    (m = 1: (x_kept + x_ev) / 2)
//   kAverage: x' = (x_kept + sum x_ev) / (m + 1)
// applied to keys and values alike; kept tokens that receive nothing are unchanged.
//
// Example:
//   kvcache::StreamPlan sp{.layer = 0, .kv_head = 0, .kept = {0, 5, 9}};
//   absl::Status s = kvcache::policy::AddLookMMerges(stream, head_dim,
//                                                    kvcache::policy::MergeMode::kPivot, sp);
#ifndef KVCACHE_POLICY_MERGE_H_
#define KVCACHE_POLICY_MERGE_H_

#include <cstdint>

#include "absl/status/status.h"
#include "kvcache/plan.h"
#include "kvcache/policy/policy.h"
#include "kvcache/policy/snapshot.h"

namespace kvcache::policy {

// OK when `stream` carries what AddLookMMerges needs (its keys, [length, head_dim]); otherwise
// FailedPrecondition naming the stream (layer, kv_head).
[[nodiscard]] absl::Status CheckLookMInputs(const StreamSnapshot& stream, int32_t head_dim,
                                            int32_t layer, int32_t kv_head);

// Adds merges of every token of `stream` not in plan.kept. Needs stream.keys. A plan that keeps
// nothing, or keeps everything, is left unchanged.
[[nodiscard]] absl::Status AddLookMMerges(const StreamSnapshot& stream, int32_t head_dim,
                                          MergeMode mode, StreamPlan& plan);

}  // namespace kvcache::policy

#endif  // KVCACHE_POLICY_MERGE_H_
