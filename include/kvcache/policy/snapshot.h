// kvcache/policy/snapshot.h — the read-only input of every policy: one sequence, host side.
//
// A policy is a pure function SequenceSnapshot -> EvictionPlan (DESIGN.md §3). The snapshot holds
// everything policies read: per stream (layer, kv head) the token positions, modalities, score
// accumulators (H2O) and optionally the keys (Knorm, ThinK, PruMerge, LOOK-M); per stream the
// attention mass of engine-supplied observation queries over three row sets (the last w rows for
// SnapKV/PyramidKV/AdaKV, the post-vision rows for VL-Cache/PruMerge, the last row for
// TOVA/FastV); per layer the VL-Cache sparsity counts and the raw window queries (ThinK).
// The cache does not store queries, so the ENGINE supplies them as Observations. Tests build
// snapshots by hand; engines call CollectSnapshot with the policy's Needs().
//
// Example:
//   auto policy = *kvcache::policy::CreatePolicy("snapkv:keep=0.1,window=32");
//   kvcache::policy::Observations obs;
//   obs.layers.resize(num_layers);
//   for (int l = 0; l < num_layers; ++l)   // last 32 prompt queries of layer l
//     obs.layers[l] = {.queries = q_window[l], .positions = window_positions};
//   auto snap = kvcache::policy::CollectSnapshot(*cache, seq, obs, policy->Needs());
//   auto plan = policy->Plan(*snap);
//   absl::Status s = cache->Apply(*plan);
#ifndef KVCACHE_POLICY_SNAPSHOT_H_
#define KVCACHE_POLICY_SNAPSHOT_H_

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvcache/backend.h"
#include "kvcache/types.h"

namespace kvcache {
class Cache;
}  // namespace kvcache

namespace kvcache::policy {

// One (layer, kv head) stream as the policy sees it. Optional vectors are empty when the
// snapshot was collected without them.
struct StreamSnapshot {
  std::vector<int32_t> positions;         // [length] ascending original positions
  std::vector<Modality> modalities;       // [length]
  std::vector<float> accumulated;         // [length] score accumulators (H2O)
  std::vector<float> keys;                // [length, head_dim] f32 or empty
  std::vector<float> window_scores;       // [length] attention mass of the last w rows, or empty
  std::vector<float> post_vision_scores;  // [length] mass of the post-vision rows, or empty
  std::vector<float> last_row_scores;     // [length] attention of the last row, or empty

  int32_t length() const { return static_cast<int32_t>(positions.size()); }
};

struct LayerSnapshot {
  // VL-Cache: threshold-filtered zeros and causal entries of the post-vision rows, per q head.
  std::vector<int64_t> below_threshold;  // [num_q_heads] or empty
  std::vector<int64_t> causal_entries;   // [num_q_heads] or empty
  // ThinK: the last window rows of the observation queries.
  std::vector<float> window_queries;     // [window_rows, num_q_heads, head_dim] or empty
  int32_t window_rows = 0;
};

struct SequenceSnapshot {
  SequenceId sequence = 0;
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t num_q_heads = 0;
  int32_t head_dim = 0;
  std::vector<StreamSnapshot> streams;  // [num_layers * num_kv_heads], layer-major
  std::vector<LayerSnapshot> layers;    // [num_layers]
  // Optional engine-provided per-image-token scores (PruMerge's CLS attention), by position.
  std::vector<int32_t> image_score_positions;  // [k] ascending
  std::vector<float> image_scores;             // [k]

  // An empty snapshot of the given shape (streams and layers sized, contents empty).
  static SequenceSnapshot Make(int32_t num_layers, int32_t num_kv_heads, int32_t num_q_heads,
                               int32_t head_dim);
  StreamSnapshot& stream(int32_t layer, int32_t kv_head) {
    return streams[static_cast<size_t>(layer) * num_kv_heads + kv_head];
  }
  const StreamSnapshot& stream(int32_t layer, int32_t kv_head) const {
    return streams[static_cast<size_t>(layer) * num_kv_heads + kv_head];
  }
  int32_t group_size() const { return num_kv_heads > 0 ? num_q_heads / num_kv_heads : 0; }
  // Longest stream of the sequence (the prompt length n of a fresh prefill).
  int32_t MaxLength() const;
  // Shapes agree, positions ascend, every optional vector is empty or has the right size.
  [[nodiscard]] absl::Status Validate() const;
};

// What a policy needs collected. Union of two requests with Merge.
struct SnapshotRequest {
  bool keys = false;              // read keys back (costly: a device->host copy of every key)
  int32_t window_rows = 0;        // score the last w observation rows (SnapKV & co); 0 = none
  bool post_vision = false;       // score the rows after the last image/video token
  bool sparsity = false;          // VL-Cache counts over the post-vision rows
  bool last_row = false;          // score the last observation row
  int32_t query_rows = 0;         // copy the last w raw queries into the snapshot (ThinK)
  float sparsity_threshold = 0.01f;   // VL-Cache p
  GqaAggregation aggregation = GqaAggregation::kMean;
  float scale = 0.0f;             // softmax scale; 0 = 1/sqrt(head_dim)

  void Merge(const SnapshotRequest& other);
};

// Queries the engine observed for one layer (post-RoPE, like the stored keys).
struct LayerObservation {
  std::span<const float> queries = {};      // [rows, num_q_heads, head_dim] f32
  std::span<const int32_t> positions = {};  // [rows] ascending
};

struct Observations {
  std::vector<LayerObservation> layers;  // [num_layers], or empty when nothing is scored
  std::span<const int32_t> image_score_positions;  // [k] optional PruMerge CLS scores
  std::span<const float> image_scores;             // [k]
};

// Reads the sequence (ReadStream) and scores the requested row sets (Cache::ScoreRows, without
// accumulating). Errors: NotFound for an unknown sequence; InvalidArgument when a needed layer
// observation is missing or has fewer rows than requested; FailedPrecondition when post-vision
// rows are requested but no observation row lies after the last image/video token. When the
// sequence has no image/video token, every observation row counts as post-vision.
[[nodiscard]] absl::StatusOr<SequenceSnapshot> CollectSnapshot(Cache& cache, SequenceId seq,
                                                               const Observations& observations,
                                                               const SnapshotRequest& request);

}  // namespace kvcache::policy

#endif  // KVCACHE_POLICY_SNAPSHOT_H_
