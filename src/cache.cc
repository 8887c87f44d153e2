// Cache: lifecycle, locking, and the mutating operations with their backend calls.
//
// The stream / segment metadata lives in StreamTable (stream_table.h); plan validation and
// compilation in plan_compile.cc; Quest summaries in page_summaries.cc; retrieval indexes in
// key_index_upkeep.cc; Append in cache_append.cc; decode in cache_decode.cc; step reservations
// in cache_step.cc; read-side queries in cache_read.cc; Validate in cache_validate.cc. Every
// mutating operation follows one pattern so that a failure leaves the cache unchanged: validate
// everything, allocate every page the operation needs in one all-or-nothing pool call, run the
// backend writes into the NEW pages only, and commit the metadata last through a StreamTable
// mutator (releasing the pages it replaced). Lock order: the sequence map, then sequence locks
// in ascending id order, then the pool's internal lock.
#include "kvcache/cache.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "src/cache_internal.h"
#include "src/key_index_upkeep.h"
#include "src/page_summaries.h"
#include "src/plan_compile.h"
#include "src/stream_table.h"

namespace kvcache {

using internal::PageGuard;
using internal::ReleaseSegments;
using internal::Segment;
using internal::SegmentFormat;
using internal::Stream;
using internal::StreamTable;

namespace internal {

absl::Status CheckStreamIndex(const CacheConfig& c, int32_t layer, int32_t kv_head) {
  if (layer < 0 || layer >= c.num_layers) {
    return absl::OutOfRangeError(
        absl::StrCat("layer ", layer, " is out of range [0, ", c.num_layers, ")"));
  }
  if (kv_head < 0 || kv_head >= c.num_kv_heads) {
    return absl::OutOfRangeError(
        absl::StrCat("kv_head ", kv_head, " is out of range [0, ", c.num_kv_heads, ")"));
  }
  return absl::OkStatus();
}

}  // namespace internal

// ---- Construction -----------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Cache>> Cache::Create(const CacheConfig& config,
                                                     std::unique_ptr<Backend> backend) {
  if (absl::Status s = config.Validate(); !s.ok()) return s;
  if (backend == nullptr) return absl::InvalidArgumentError("Cache::Create: backend is null");
  absl::StatusOr<std::unique_ptr<PagePool>> pool =
      PagePool::Create(backend.get(), config.ResolvedPageBytes(), config.num_pages, config.dtype);
  if (!pool.ok()) return pool.status();
  return std::unique_ptr<Cache>(new Cache(config, std::move(backend), *std::move(pool)));
}

absl::StatusOr<std::unique_ptr<Cache>> Cache::Create(const CacheConfig& config,
                                                     std::string_view backend_name) {
  if (absl::Status s = config.Validate(); !s.ok()) return s;
  absl::StatusOr<std::unique_ptr<Backend>> backend = CreateBackend(backend_name);
  if (!backend.ok()) return backend.status();
  return Create(config, *std::move(backend));
}

Cache::Cache(const CacheConfig& config, std::unique_ptr<Backend> backend,
             std::unique_ptr<PagePool> pool)
    : config_(config), backend_(std::move(backend)), pool_(std::move(pool)) {}

Cache::~Cache() {
  absl::MutexLock lock(&mu_);
  for (auto& [id, seq] : sequences_) {
    absl::MutexLock seq_lock(&seq->mu);
    ReleaseSegments(*pool_, seq->table.TakeAll());
    seq->key_indexes.clear();
    seq->freed = true;
  }
  sequences_.clear();
  pool_.reset();  // frees the arena through the backend, which must still be alive
}

// ---- Locking ----------------------------------------------------------------------------------

absl::StatusOr<std::shared_ptr<Cache::Sequence>> Cache::Find(SequenceId seq) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  return it->second;
}

absl::StatusOr<Cache::LockedSequence> Cache::Lock(absl::string_view fn, SequenceId id) const {
  absl::StatusOr<std::shared_ptr<Sequence>> found = Find(id);
  if (!found.ok()) {
    return absl::NotFoundError(absl::StrCat(fn, ": ", found.status().message()));
  }
  std::shared_ptr<Sequence> seq = *std::move(found);
  seq->mu.Lock();
  // Free may have run between the map lookup and the lock.
  if (seq->freed) {
    seq->mu.Unlock();
    return absl::NotFoundError(absl::StrCat(fn, ": unknown sequence ", id));
  }
  return LockedSequence(std::move(seq));
}

absl::StatusOr<Cache::LockedSequence> Cache::LockStream(absl::string_view fn, SequenceId id,
                                                        int32_t layer, int32_t kv_head) const {
  if (absl::Status s = internal::CheckStreamIndex(config_, layer, kv_head); !s.ok()) {
    return absl::OutOfRangeError(absl::StrCat(fn, ": ", s.message()));
  }
  return Lock(fn, id);
}

// ---- Sequences --------------------------------------------------------------------------------

absl::StatusOr<SequenceId> Cache::AddSequence() {
  absl::MutexLock lock(&mu_);
  const SequenceId id = next_id_++;
  sequences_[id] = std::make_shared<Sequence>(
      id, StreamTable(config_.num_layers, config_.num_kv_heads, config_.page_summaries));
  return id;
}

absl::StatusOr<SequenceId> Cache::Fork(SequenceId parent) {
  // The map lock is held throughout so Validate never sees the child's page references without
  // the child itself (lock order: map, then sequence).
  absl::MutexLock lock(&mu_);
  auto it = sequences_.find(parent);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("Fork: unknown sequence ", parent));
  }
  Sequence& p = *it->second;
  absl::MutexLock parent_lock(&p.mu);
  const SequenceId id = next_id_++;
  auto child = std::make_shared<Sequence>(id, p.table.ForkCopy());  // metadata copied
  {
    absl::MutexLock child_lock(&child->mu);
    for (int32_t i = 0; i < child->table.num_streams(); ++i) {
      for (const Segment& s : child->table.stream(i).segments) pool_->AddRef(s.pages);
    }
  }
  sequences_[id] = std::move(child);
  return id;
}

absl::Status Cache::Free(SequenceId seq) {
  absl::MutexLock lock(&mu_);
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("Free: unknown sequence ", seq));
  }
  {
    Sequence& s = *it->second;
    absl::MutexLock seq_lock(&s.mu);
    ReleaseSegments(*pool_, s.table.TakeAll());
    s.key_indexes.clear();
    s.freed = true;
  }
  sequences_.erase(it);
  return absl::OkStatus();
}

std::vector<SequenceId> Cache::Sequences() const {
  absl::ReaderMutexLock lock(&mu_);
  std::vector<SequenceId> ids;
  ids.reserve(sequences_.size());
  for (const auto& [id, s] : sequences_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

bool Cache::Contains(SequenceId seq) const {
  absl::ReaderMutexLock lock(&mu_);
  return sequences_.contains(seq);
}

CacheStats Cache::Stats() const {
  CacheStats stats;
  absl::ReaderMutexLock lock(&mu_);
  stats.num_sequences = static_cast<int32_t>(sequences_.size());
  for (const auto& [id, seq] : sequences_) {
    absl::MutexLock seq_lock(&seq->mu);
    for (int32_t i = 0; i < seq->table.num_streams(); ++i) {
      stats.tokens_stored += seq->table.stream(i).length();
    }
  }
  stats.pages_total = pool_->num_pages();
  stats.pages_used = pool_->NumUsed();
  stats.bytes_used = int64_t{stats.pages_used} * pool_->page_bytes();
  return stats;
}

// ---- Apply ------------------------------------------------------------------------------------

absl::Status Cache::Apply(const EvictionPlan& plan) {
  absl::StatusOr<LockedSequence> locked = Lock("Apply", plan.sequence);
  if (!locked.ok()) return locked.status();
  return ApplyLocked(**locked, plan, nullptr);
}

absl::Status Cache::ApplyIfCurrent(const EvictionPlan& plan, const StreamStamp& stamp) {
  absl::StatusOr<LockedSequence> locked = Lock("ApplyIfCurrent", plan.sequence);
  if (!locked.ok()) return locked.status();
  return ApplyLocked(**locked, plan, &stamp);
}

absl::Status Cache::ApplyLocked(Sequence& seq, const EvictionPlan& plan, const StreamStamp* stamp) {
  const CacheConfig& c = config_;
  StreamTable& table = seq.table;
  // A stale plan is refused as stale even when its indices no longer fit the stream.
  if (stamp != nullptr) {
    if (absl::Status s = internal::CheckStamp(plan, *stamp, table); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("ApplyIfCurrent: ", s.message()));
    }
  }
  if (absl::Status s = internal::ValidatePlan(c, plan, table); !s.ok()) return s;
  internal::CompiledPlan compiled = internal::CompilePlan(c, pool_->page_bytes(), plan, table);

  PageGuard guard{pool_.get(), std::vector<int32_t>(compiled.total_pages)};
  if (absl::Status s = pool_->Allocate(compiled.total_pages, guard.pages.data()); !s.ok()) {
    guard.pages.clear();
    return absl::ResourceExhaustedError(
        absl::StrCat("Apply on sequence ", plan.sequence, ": ", s.message()));
  }
  int32_t next = 0;
  for (internal::NewSegment& ns : compiled.fresh) {
    for (int32_t& page : ns.segment.pages) page = guard.pages[next++];
  }
  const std::vector<RowGather> gathers = internal::Gathers(compiled, c.head_dim);
  if (!gathers.empty()) {
    if (absl::Status s = backend_->GatherRows(pool_->view(), gathers); !s.ok()) return s;
  }
  if (c.page_summaries) {
    for (internal::NewSegment& ns : compiled.fresh) {
      if (absl::Status s =
              internal::RebuildSummaries(*backend_, pool_->view(), ns.segment, c.head_dim);
          !s.ok()) {
        return s;
      }
    }
  }

  // Commit: replace every planned stream's segments, release the old pages.
  std::vector<std::vector<Segment>> replacement(plan.streams.size());
  for (internal::NewSegment& ns : compiled.fresh) {
    replacement[ns.plan_index].push_back(std::move(ns.segment));
  }
  for (size_t p = 0; p < plan.streams.size(); ++p) {
    if (compiled.skip[p]) continue;
    const int32_t index = table.Index(plan.streams[p].layer, plan.streams[p].kv_head);
    ReleaseSegments(*pool_, table.Replace(index, std::move(replacement[p])));
    internal::DropKeyIndex(seq, index);  // token indices changed; rebuilt lazily
  }
  guard.committed = true;
  return absl::OkStatus();
}

// ---- ScoreRows --------------------------------------------------------------------------------

absl::StatusOr<ScoreResult> Cache::ScoreRows(SequenceId seq_id, int32_t layer,
                                             const ScoreRequest& req) {
  const CacheConfig& c = config_;
  if (layer < 0 || layer >= c.num_layers) {
    return absl::OutOfRangeError(
        absl::StrCat("ScoreRows: layer ", layer, " is out of range [0, ", c.num_layers, ")"));
  }
  const int64_t rows = static_cast<int64_t>(req.positions.size());
  if (rows == 0) return absl::InvalidArgumentError("ScoreRows: no query rows (positions is empty)");
  const int64_t expected = rows * c.num_q_heads * c.head_dim;
  if (static_cast<int64_t>(req.queries.size()) != expected) {
    return absl::InvalidArgumentError(absl::StrCat("ScoreRows: queries has ", req.queries.size(),
                                                   " elements, expected ", expected,
                                                   " (rows * num_q_heads * head_dim)"));
  }
  if (!(req.scale >= 0.0f) || !std::isfinite(req.scale)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ScoreRows: scale ", req.scale, " must be finite and >= 0"));
  }
  if (!(req.sparsity_threshold >= 0.0f && req.sparsity_threshold <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("ScoreRows: sparsity_threshold ",
                                                   req.sparsity_threshold, " is outside [0, 1]"));
  }
  for (size_t i = 0; i < req.positions.size(); ++i) {
    if (req.positions[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("ScoreRows: positions[", i, "] = ", req.positions[i], " is negative"));
    }
  }
  if (!backend_->Supports(BackendOp::kScoreRows)) {
    return absl::UnimplementedError(
        absl::StrCat(std::string(backend_->Name()), " backend has no ScoreRows"));
  }
  absl::StatusOr<LockedSequence> locked = Lock("ScoreRows", seq_id);
  if (!locked.ok()) return locked.status();
  StreamTable& table = (*locked)->table;

  const int32_t heads = c.num_kv_heads;
  std::vector<int32_t> offsets{0};
  std::vector<SegmentView> views;
  std::vector<int32_t> lengths;
  int64_t total = 0;
  for (int32_t h = 0; h < heads; ++h) {
    table.AppendViews(table.Index(layer, h), views);
    offsets.push_back(static_cast<int32_t>(views.size()));
    lengths.push_back(table.stream(layer, h).length());
    total += lengths.back();
  }
  PagedKVView kv;
  kv.pool = pool_->view();
  kv.head_dim = c.head_dim;
  kv.num_streams = heads;
  kv.stream_segment_offsets = offsets.data();
  kv.segments = views.data();
  ScoreRowsParams params;
  params.group_size = c.group_size();
  params.scale = req.scale;
  params.num_rows = static_cast<int32_t>(rows);
  params.aggregation = req.aggregation;
  params.sparsity_threshold = req.sparsity_threshold;
  std::vector<float> token_scores(total);
  ScoreResult result;
  result.below_threshold.assign(c.num_q_heads, 0);
  result.causal_entries.assign(c.num_q_heads, 0);
  if (absl::Status s = backend_->ScoreRows(kv, params, req.queries.data(), req.positions.data(),
                                           token_scores.data(), result.below_threshold.data(),
                                           result.causal_entries.data());
      !s.ok()) {
    return s;
  }
  result.token_scores.resize(heads);
  int64_t at = 0;
  for (int32_t h = 0; h < heads; ++h) {
    result.token_scores[h].assign(token_scores.begin() + at,
                                  token_scores.begin() + at + lengths[h]);
    at += lengths[h];
  }
  if (req.accumulate) {
    for (int32_t h = 0; h < heads; ++h) {
      table.AddScores(table.Index(layer, h), result.token_scores[h]);
    }
  }
  return result;
}

}  // namespace kvcache
