// Retrieval key-index upkeep: see key_index_upkeep.h.
#include "src/key_index_upkeep.h"

#include <algorithm>
#include <cmath>

#include "src/stream_table.h"

namespace kvcache {

namespace internal {

bool HasKeyIndex(const Cache::Sequence& seq, int32_t index) {
  return !seq.key_indexes.empty() && seq.key_indexes[index] != nullptr;
}

void ExtendKeyIndex(Cache::Sequence& seq, int32_t index, const float* stored_keys, int32_t m) {
  if (!HasKeyIndex(seq, index)) return;
  if (!seq.key_indexes[index]->Add(stored_keys, m)) seq.key_indexes[index].reset();
}

void DropKeyIndex(Cache::Sequence& seq, int32_t index) {
  if (!seq.key_indexes.empty()) seq.key_indexes[index].reset();
}

}  // namespace internal

namespace {

// Norm bound of a freshly built index over keys whose largest norm is `max_norm`: headroom so
// that later appends rarely exceed it (a key that does forces a rebuild; see SPARSE_DECODE.md).
constexpr float kIndexNormHeadroom = 1.25f;

}  // namespace

absl::StatusOr<const KeyIndex*> Cache::EnsureKeyIndex(Sequence& seq, int32_t layer, int32_t kv_head,
                                                      const ReadPolicy& rp) {
  const int32_t d = config_.head_dim;
  if (seq.key_indexes.empty()) seq.key_indexes.resize(seq.table.num_streams());
  const int32_t index = seq.table.Index(layer, kv_head);
  const internal::Stream& st = seq.table.stream(index);
  std::unique_ptr<KeyIndex>& slot = seq.key_indexes[index];
  const int32_t beam = rp.ef_search > 0 ? rp.ef_search : std::max(rp.top_k, 64);
  if (slot != nullptr && slot->size() == st.length()) {
    slot->SetSearchBeam(beam);
    return slot.get();
  }
  // (Re)build from the stored keys.
  const int32_t n = st.length();
  std::vector<float> keys(static_cast<size_t>(n) * d);    // [n, head_dim]
  std::vector<float> values(static_cast<size_t>(n) * d);  // [n, head_dim] (read, unused)
  std::vector<SegmentView> views;
  seq.table.AppendViews(index, views);
  int32_t at = 0;
  for (const SegmentView& v : views) {
    if (absl::Status status = backend_->ReadRows(pool_->view(), v, d, 0, v.length,
                                                 keys.data() + static_cast<size_t>(at) * d,
                                                 values.data() + static_cast<size_t>(at) * d);
        !status.ok()) {
      return status;
    }
    at += v.length;
  }
  float max_norm = 0.0f;
  for (int32_t t = 0; t < n; ++t) {
    double sq = 0.0;
    for (int32_t ch = 0; ch < d; ++ch) {
      const double x = keys[static_cast<size_t>(t) * d + ch];
      sq += x * x;
    }
    max_norm = std::max(max_norm, static_cast<float>(std::sqrt(sq)));
  }
  KeyIndexParams params;
  params.head_dim = d;
  params.m = rp.index_m;
  params.ef_construction = rp.index_ef_construction;
  params.capacity = std::max(n, 1024);
  params.max_norm = max_norm > 0.0f ? max_norm * kIndexNormHeadroom : 1.0f;
  absl::StatusOr<std::unique_ptr<KeyIndex>> built = backend_->CreateKeyIndex(params);
  if (!built.ok()) return built.status();
  if (n > 0 && !(*built)->Add(keys.data(), n)) {
    return absl::InternalError("EnsureKeyIndex: a key exceeds the norm bound computed from it");
  }
  (*built)->SetSearchBeam(beam);
  slot = *std::move(built);
  return slot.get();
}

}  // namespace kvcache
