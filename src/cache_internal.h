// src/cache_internal.h — what the files of the Cache implementation share (internal).
//
// The Cache is split by concept: cache.cc (lifecycle, locking, Append / Apply / ScoreRows and
// their backend calls), cache_decode.cc (PrepareDecode and the per-layer decode), cache_step.cc
// (step reservation, AppendStep, capturable plans and their in-place re-prepare), cache_read.cc
// (read-side queries, plan stamps, page-table export), cache_validate.cc (Validate),
// key_index_upkeep.cc (retrieval indexes), plan_compile.cc (plan validation and compilation,
// pure), page_summaries.cc (Quest summaries) and stream_table.cc (the stream / segment model).
// This header holds the per-sequence state and the small helpers those files have in common.
#ifndef KVCACHE_SRC_CACHE_INTERNAL_H_
#define KVCACHE_SRC_CACHE_INTERNAL_H_

#include <cstdint>
#include <memory>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "kvcache/backend_impl.h"
#include "kvcache/cache.h"
#include "src/stream_table.h"

namespace kvcache {

struct Cache::Sequence {
  Sequence(SequenceId id, internal::StreamTable table) : id(id), table(std::move(table)) {}
  const SequenceId id;
  absl::Mutex mu;
  bool freed ABSL_GUARDED_BY(mu) = false;
  internal::StreamTable table ABSL_GUARDED_BY(mu);
  // Retrieval-decode key index per stream, built on the first retrieval decode of the stream and
  // extended by Append; dropped (rebuilt lazily) by Apply, not shared with forks.
  std::vector<std::unique_ptr<KeyIndex>> key_indexes ABSL_GUARDED_BY(mu);  // [streams] or empty
};

// A sequence found in the map, locked, and not freed; unlocks when destroyed.
class Cache::LockedSequence {
 public:
  explicit LockedSequence(std::shared_ptr<Sequence> seq) : seq_(std::move(seq)) {}
  LockedSequence(LockedSequence&& other) noexcept : seq_(std::move(other.seq_)) {}
  LockedSequence& operator=(LockedSequence&&) = delete;
  ~LockedSequence() {
    if (seq_ != nullptr) seq_->mu.Unlock();
  }
  Sequence& operator*() const { return *seq_; }
  Sequence* operator->() const { return seq_.get(); }

 private:
  std::shared_ptr<Sequence> seq_;
};

// Everything a DecodePlan holds (decode_plan.h). Layer slot l is layer first_layer + l.
struct DecodePlan::State {
  const Cache* cache = nullptr;
  std::vector<SequenceId> batch;                       // [batch]
  std::vector<std::shared_ptr<Cache::Sequence>> seqs;  // [batch], batch order
  std::vector<Cache::Sequence*> lock_order;            // [batch], ascending id
  int32_t first_layer = 0;
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  std::vector<uint64_t> versions;            // [num_layers, batch * kv_heads] at PrepareDecode
                                             // ([batch * kv_heads] at call time when one-shot)
  std::vector<int32_t> view_begin;           // [num_layers + 1] first view slot of each layer
  std::vector<SegmentView> views;            // [view_begin[num_layers]] refreshed by each call
  std::vector<int32_t> offsets;              // [batch * kv_heads + 1] CSR of the layer being run
  std::vector<const KeyIndex*> key_indexes;  // [batch * kv_heads] retrieval decode only
  // f32 scratch for f16 / bf16 host q and out, [batch, num_q_heads, head_dim] each, allocated
  // at PrepareDecode without being touched (make_unique_for_overwrite: an f32 caller never
  // faults its pages in), so a per-layer call converts without allocating.
  std::unique_ptr<float[]> q_f32;
  std::unique_ptr<float[]> out_f32;

  // Step reservation (StepOptions::append_tokens = 1, src/cache_step.cc).
  bool reserved = false;
  std::vector<int32_t> step_positions;  // [batch] the reserved token's position
  std::vector<uint8_t> appended;        // [num_layers] AppendStep done for the layer this step
  std::vector<RowWrite> step_writes;    // [batch * kv_heads] AppendStep's writes (host path)
  // Capturable plans (StepOptions::capturable): device buffers at fixed addresses, their
  // capacities, and the stream lengths they were uploaded with.
  bool capturable = false;
  int32_t max_context = 0;
  std::vector<int32_t> segment_capacity;  // [num_layers]
  std::vector<int32_t> index_capacity;    // [num_layers]
  std::vector<int32_t> lengths;           // [num_layers, batch * kv_heads]
  std::unique_ptr<StepBuffers> step;

  int32_t num_streams() const { return static_cast<int32_t>(batch.size()) * num_kv_heads; }
};

namespace internal {

// Holds the lock of every sequence of a decode plan, taken in the plan's lock order (ascending
// id) and released in reverse, at Unlock() or destruction, whichever comes first.
class PlanLock {
 public:
  explicit PlanLock(DecodePlan::State& st) : st_(&st) {
    for (Cache::Sequence* s : st_->lock_order) s->mu.Lock();
  }
  ~PlanLock() { Unlock(); }
  PlanLock(const PlanLock&) = delete;
  PlanLock& operator=(const PlanLock&) = delete;
  void Unlock() {
    if (st_ == nullptr) return;
    for (auto it = st_->lock_order.rbegin(); it != st_->lock_order.rend(); ++it) {
      (*it)->mu.Unlock();
    }
    st_ = nullptr;
  }

 private:
  DecodePlan::State* st_;
};

// Releases pages allocated for an operation that failed before commit.
struct PageGuard {
  PagePool* pool;
  std::vector<int32_t> pages;
  bool committed = false;
  ~PageGuard() {
    if (!committed && !pages.empty()) pool->Release(pages);
  }
};

inline void ReleaseSegments(PagePool& pool, const std::vector<Segment>& segments) {
  for (const Segment& s : segments) pool.Release(s.pages);
}

// Records a non-one-shot plan's stream versions and sizes its view slots (the segments each
// stream has now plus one spare per stream). Every sequence of the plan is locked.
void RecordPlanViews(DecodePlan::State& st);

// OutOfRange naming the layer or kv head outside the config.
absl::Status CheckStreamIndex(const CacheConfig& c, int32_t layer, int32_t kv_head);

}  // namespace internal
}  // namespace kvcache

#endif  // KVCACHE_SRC_CACHE_INTERNAL_H_
