// kvcache/plan.h — EvictionPlan: the plain-data result of a policy, applied by Cache::Apply.
//
// A plan lists, per (layer, kv head) stream it touches, which tokens survive (indices into the
// stream as it is now, ascending), optionally which key channels survive (ThinK), and optional
// merges of evicted tokens into kept ones (PruMerge, LOOK-M). Streams the plan does not name are
// left alone. Plans are data: they can be logged, compared in tests and replayed.
//
// Applied semantics for a StreamPlan (each kept slot i, kept token j = kept[i]):
//   K'(i) = kept_key_weight[i] * K(j) + sum over merges m with m.kept_slot == i of
//           m.key_weight * K(m.source)           (same for V with the value weights)
//   weights default to 1 when the vectors are empty. When key_channels is non-empty, the first
//   kept.size() - full_width_recent slots store only those channels (a narrower segment, fewer
//   pages); the last full_width_recent slots keep every channel. Positions, modalities and score
//   accumulators travel with the kept tokens (a merged token's score is not added).
//
// Example:
//   kvcache::EvictionPlan plan{.sequence = seq};
//   plan.streams.push_back({.layer = 0, .kv_head = 0, .kept = {0, 1, 7, 8}});
//   absl::Status s = cache->Apply(plan);
#ifndef KVCACHE_PLAN_H_
#define KVCACHE_PLAN_H_

#include <cstdint>
#include <string>
#include <vector>

#include "kvcache/types.h"

namespace kvcache {

struct MergeTerm {
  int32_t kept_slot = 0;  // index into StreamPlan::kept
  int32_t source = 0;     // stream token index merged into that slot
  float key_weight = 0.0f;
  float value_weight = 0.0f;
};

struct StreamPlan {
  int32_t layer = 0;
  int32_t kv_head = 0;
  std::vector<int32_t> kept = {};          // ascending stream token indices, may be empty
  std::vector<int32_t> key_channels = {};  // ascending channel ids; empty = keep all channels
  int32_t full_width_recent = 0;           // last kept slots that keep all channels
  std::vector<MergeTerm> merges = {};      // optional
  std::vector<float> kept_key_weight = {}; // [kept.size()] or empty (all 1)
  std::vector<float> kept_value_weight = {};  // [kept.size()] or empty (all 1)
};

struct EvictionPlan {
  SequenceId sequence = 0;
  std::vector<StreamPlan> streams = {};
  std::string policy = {};  // free-form provenance, e.g. "snapkv window=32 budget=300"

  // Total kept tokens over all streams in the plan.
  int64_t KeptTokens() const {
    int64_t n = 0;
    for (const StreamPlan& s : streams) n += static_cast<int64_t>(s.kept.size());
    return n;
  }
};

}  // namespace kvcache

#endif  // KVCACHE_PLAN_H_
