// Cache: sequences -> streams (layer, kv head) -> segments -> pool pages.
//
// Every mutating operation follows one pattern so that a failure leaves the cache unchanged:
// validate everything, allocate every page the operation needs in one all-or-nothing pool call,
// run the backend writes into the NEW pages only, and commit the metadata last (releasing the
// pages it replaced). Lock order: the sequence map, then sequence locks in ascending id order,
// then the pool's internal lock.
#include "kvcache/cache.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kvcache {

namespace {

// One run of tokens with one row format (DESIGN.md §2).
struct Segment {
  int32_t key_width = 0;
  int32_t value_width = 0;
  int32_t tokens_per_page = 0;
  std::vector<int32_t> pages;
  std::vector<int32_t> key_channels;  // empty = all channels
  std::vector<int32_t> positions;
  std::vector<uint8_t> modalities;
  std::vector<float> scores;
  // Quest page summaries (CacheConfig::page_summaries; empty otherwise): per page and stored
  // key channel, min / max of the stored keys. [pages.size(), key_width] each.
  std::vector<float> key_min;
  std::vector<float> key_max;

  int32_t length() const { return static_cast<int32_t>(positions.size()); }
  bool full_width(int32_t head_dim) const { return key_channels.empty() && key_width == head_dim; }
  int32_t free_slots() const {
    return static_cast<int32_t>(pages.size()) * tokens_per_page - length();
  }

  SegmentView View() {
    SegmentView v;
    v.pages = pages.data();
    v.key_channels = key_channels.empty() ? nullptr : key_channels.data();
    v.positions = positions.data();
    v.modalities = modalities.data();
    v.scores = scores.data();
    v.length = length();
    v.tokens_per_page = tokens_per_page;
    v.key_width = key_width;
    v.value_width = value_width;
    if (!key_min.empty()) {
      v.page_key_min = key_min.data();
      v.page_key_max = key_max.data();
    }
    return v;
  }
};

struct Stream {
  std::vector<Segment> segments;
  int32_t length() const {
    int32_t n = 0;
    for (const Segment& s : segments) n += s.length();
    return n;
  }
  int32_t last_position() const {
    for (auto it = segments.rbegin(); it != segments.rend(); ++it) {
      if (it->length() > 0) return it->positions.back();
    }
    return -1;
  }
};

bool IsFinite(float x) { return std::isfinite(x); }

// The value the pool stores for x (rounding to the pool dtype), as the backends' writes do.
float RoundToDType(float x, DType t) {
  switch (t) {
    case DType::kF16:
      return HalfBitsToFloat(FloatToHalfBits(x));
    case DType::kBF16:
      return BF16BitsToFloat(FloatToBF16Bits(x));
    default:
      return x;
  }
}

// Grows a segment's summaries to its page count (new pages start empty: +inf / -inf).
void ResizeSummaries(Segment& s) {
  const size_t size = s.pages.size() * static_cast<size_t>(s.key_width);
  s.key_min.resize(size, INFINITY);
  s.key_max.resize(size, -INFINITY);
}

// Folds one stored key row (key_width values as stored) into the summary of page `page`.
void FoldSummary(Segment& s, int32_t page, const float* key) {
  float* mn = s.key_min.data() + static_cast<size_t>(page) * s.key_width;
  float* mx = s.key_max.data() + static_cast<size_t>(page) * s.key_width;
  for (int32_t c = 0; c < s.key_width; ++c) {
    mn[c] = key[c] < mn[c] ? key[c] : mn[c];
    mx[c] = key[c] > mx[c] ? key[c] : mx[c];
  }
}

}  // namespace

struct Cache::Sequence {
  explicit Sequence(SequenceId id, int32_t num_streams, int32_t num_layers)
      : id(id), streams(num_streams), last_position(num_layers, -1) {}
  const SequenceId id;
  absl::Mutex mu;
  bool freed ABSL_GUARDED_BY(mu) = false;
  std::vector<Stream> streams ABSL_GUARDED_BY(mu);  // [num_layers * num_kv_heads]
  // Highest position ever appended per layer (admitted or not): appends must exceed it.
  std::vector<int32_t> last_position ABSL_GUARDED_BY(mu);  // [num_layers]
  // Retrieval-decode key index per stream, built on the first retrieval decode of the stream and
  // extended by Append; dropped (rebuilt lazily) by Apply, not shared with forks.
  std::vector<std::unique_ptr<KeyIndex>> key_indexes ABSL_GUARDED_BY(mu);  // [streams] or empty
};

namespace {

using Sequence = Cache::Sequence;

// Releases every page of a list of segments.
void ReleaseSegments(PagePool& pool, const std::vector<Segment>& segments) {
  for (const Segment& s : segments) pool.Release(s.pages);
}

// Releases pages allocated for an operation that failed before commit.
struct PageGuard {
  PagePool* pool;
  std::vector<int32_t> pages;
  bool committed = false;
  ~PageGuard() {
    if (!committed && !pages.empty()) pool->Release(pages);
  }
};

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

absl::Status CheckTensor(const char* name, const TensorRef& t, int64_t expected) {
  if (t.dtype != DType::kF32 && t.dtype != DType::kF16 && t.dtype != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " has unknown dtype ", static_cast<int>(t.dtype)));
  }
  if (t.num_elements != expected) {
    return absl::InvalidArgumentError(absl::StrCat(name, " has ", t.num_elements,
                                                   " elements, expected ", expected,
                                                   " (num_tokens * num_kv_heads * head_dim)"));
  }
  if (expected > 0 && t.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(name, ".data is null"));
  }
  return absl::OkStatus();
}

}  // namespace

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
    for (const Stream& st : seq->streams) ReleaseSegments(*pool_, st.segments);
    seq->streams.clear();
    seq->freed = true;
  }
  sequences_.clear();
  pool_.reset();  // frees the arena through the backend, which must still be alive
}

absl::StatusOr<std::shared_ptr<Sequence>> Cache::Find(SequenceId seq) const {
  absl::ReaderMutexLock lock(&mu_);
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  return it->second;
}

// ---- Sequences --------------------------------------------------------------------------------

absl::StatusOr<SequenceId> Cache::AddSequence() {
  absl::MutexLock lock(&mu_);
  const SequenceId id = next_id_++;
  sequences_[id] = std::make_shared<Sequence>(id, config_.num_layers * config_.num_kv_heads,
                                              config_.num_layers);
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
  auto child = std::make_shared<Sequence>(id, 0, 0);
  {
    absl::MutexLock child_lock(&child->mu);
    child->streams = p.streams;  // metadata copied; pages shared
    child->last_position = p.last_position;
    for (const Stream& st : child->streams) {
      for (const Segment& s : st.segments) pool_->AddRef(s.pages);
    }
  }
  sequences_[id] = std::move(child);
  return id;
}

absl::Status Cache::Free(SequenceId seq) {
  absl::MutexLock lock(&mu_);
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("Free: unknown sequence ", seq));
  {
    Sequence& s = *it->second;
    absl::MutexLock seq_lock(&s.mu);
    for (const Stream& st : s.streams) ReleaseSegments(*pool_, st.segments);
    s.streams.clear();
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

// ---- Append -----------------------------------------------------------------------------------

absl::Status Cache::Append(SequenceId seq_id, int32_t layer, const AppendRequest& req) {
  const CacheConfig& c = config_;
  const int32_t heads = c.num_kv_heads, d = c.head_dim;
  if (layer < 0 || layer >= c.num_layers) {
    return absl::OutOfRangeError(
        absl::StrCat("Append: layer ", layer, " is out of range [0, ", c.num_layers, ")"));
  }
  const int64_t n = static_cast<int64_t>(req.positions.size());
  if (n == 0) return absl::InvalidArgumentError("Append: positions is empty (0 tokens)");
  if (n > (int64_t{1} << 30)) return absl::InvalidArgumentError(absl::StrCat("Append: ", n, " tokens"));
  if (absl::Status s = CheckTensor("Append: keys", req.keys, n * heads * d); !s.ok()) return s;
  if (absl::Status s = CheckTensor("Append: values", req.values, n * heads * d); !s.ok()) return s;
  if (req.keys.dtype != req.values.dtype) {
    return absl::InvalidArgumentError(absl::StrCat("Append: keys are ", DTypeName(req.keys.dtype),
                                                   " but values are ", DTypeName(req.values.dtype)));
  }
  if (!req.modalities.empty() && static_cast<int64_t>(req.modalities.size()) != n) {
    return absl::InvalidArgumentError(absl::StrCat("Append: modalities has ", req.modalities.size(),
                                                   " entries for ", n, " tokens"));
  }
  if (!req.admit.empty() && static_cast<int64_t>(req.admit.size()) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("Append: admit has ", req.admit.size(), " entries for ", n, " tokens"));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (req.positions[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Append: positions[", i, "] = ", req.positions[i], " is negative"));
    }
    if (i > 0 && req.positions[i] <= req.positions[i - 1]) {
      return absl::InvalidArgumentError(absl::StrCat("Append: positions must strictly increase; positions[",
                                                     i, "] = ", req.positions[i], " after ",
                                                     req.positions[i - 1]));
    }
    if (!req.modalities.empty() && static_cast<int>(req.modalities[i]) >= kNumModalities) {
      return absl::InvalidArgumentError(absl::StrCat("Append: modalities[", i, "] has unknown value ",
                                                     static_cast<int>(req.modalities[i])));
    }
  }

  absl::StatusOr<std::shared_ptr<Sequence>> found = Find(seq_id);
  if (!found.ok()) return found.status();
  Sequence& seq = **found;
  absl::MutexLock lock(&seq.mu);
  if (seq.freed) return absl::NotFoundError(absl::StrCat("Append: unknown sequence ", seq_id));
  if (req.positions[0] <= seq.last_position[layer]) {
    return absl::InvalidArgumentError(absl::StrCat("Append: positions[0] = ", req.positions[0],
                                                   " must exceed the last position appended to layer ",
                                                   layer, " (", seq.last_position[layer], ")"));
  }

  // Admitted tokens (the same for every head of the layer), as runs of consecutive indices.
  std::vector<int32_t> admitted;
  admitted.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (req.admit.empty() || req.admit[i] != 0) admitted.push_back(static_cast<int32_t>(i));
  }
  const int32_t m = static_cast<int32_t>(admitted.size());
  if (m == 0) {
    seq.last_position[layer] = req.positions[n - 1];
    return absl::OkStatus();
  }

  // Plan per stream: extend the tail segment (copy-on-write of a shared, partly filled tail
  // page) or open a new full-width segment.
  const int32_t full_tpp = c.ResolvedPageTokens();
  struct StreamWork {
    bool new_segment = false;
    bool cow_tail = false;
    int32_t new_pages = 0;
    int32_t first_new_page = 0;  // index into guard.pages
  };
  std::vector<StreamWork> work(heads);
  int32_t total_pages = 0;
  for (int32_t h = 0; h < heads; ++h) {
    Stream& st = seq.streams[layer * heads + h];
    StreamWork& w = work[h];
    Segment* tail = st.segments.empty() ? nullptr : &st.segments.back();
    if (tail == nullptr || !tail->full_width(d) || tail->tokens_per_page != full_tpp) {
      w.new_segment = true;
      w.new_pages = static_cast<int32_t>(CeilDiv(m, full_tpp));
    } else {
      const int32_t free_slots = tail->free_slots();
      w.cow_tail = free_slots > 0 && pool_->RefCount(tail->pages.back()) > 1;
      w.new_pages = static_cast<int32_t>(CeilDiv(std::max(0, m - free_slots), full_tpp)) +
                    (w.cow_tail ? 1 : 0);
    }
    w.first_new_page = total_pages;
    total_pages += w.new_pages;
  }
  PageGuard guard{pool_.get(), std::vector<int32_t>(total_pages)};
  if (absl::Status s = pool_->Allocate(total_pages, guard.pages.data()); !s.ok()) {
    guard.pages.clear();
    return absl::ResourceExhaustedError(absl::StrCat("Append of ", m, " tokens to sequence ", seq_id,
                                                     " layer ", layer, ": ", s.message()));
  }

  // Build the new page lists without touching the committed segments.
  std::vector<Segment> staged(heads);
  std::vector<PageCopy> copies;
  std::vector<int32_t> replaced_pages;
  for (int32_t h = 0; h < heads; ++h) {
    Stream& st = seq.streams[layer * heads + h];
    const StreamWork& w = work[h];
    Segment& s = staged[h];
    if (w.new_segment) {
      s.key_width = d;
      s.value_width = d;
      s.tokens_per_page = full_tpp;
    } else {
      const Segment& tail = st.segments.back();
      s.key_width = tail.key_width;
      s.value_width = tail.value_width;
      s.tokens_per_page = tail.tokens_per_page;
      s.pages = tail.pages;
    }
    int32_t next = w.first_new_page;
    if (w.cow_tail) {
      const int32_t fresh = guard.pages[next++];
      copies.push_back({s.pages.back(), fresh});
      replaced_pages.push_back(s.pages.back());
      s.pages.back() = fresh;
    }
    for (; next < w.first_new_page + w.new_pages; ++next) s.pages.push_back(guard.pages[next]);
  }
  if (!copies.empty()) {
    if (absl::Status s = backend_->CopyPages(pool_->view(), copies); !s.ok()) return s;
  }
  std::vector<RowWrite> writes;
  const int64_t token_stride = int64_t{heads} * d;
  const int esize = DTypeSize(req.keys.dtype);
  for (int32_t h = 0; h < heads; ++h) {
    Segment& s = staged[h];
    // Rows continue after the committed tail's tokens (the staged copy holds only pages).
    const int32_t base_row =
        work[h].new_segment ? 0 : seq.streams[layer * heads + h].segments.back().length();
    SegmentView view = s.View();
    int32_t i = 0;
    while (i < m) {  // one write per run of consecutive admitted tokens
      int32_t j = i + 1;
      while (j < m && admitted[j] == admitted[j - 1] + 1) ++j;
      RowWrite w;
      w.dst = view;
      w.first_row = base_row + i;
      w.num_tokens = j - i;
      w.head_dim = d;
      const int64_t offset = (int64_t{admitted[i]} * heads + h) * d * esize;
      w.keys = static_cast<const uint8_t*>(req.keys.data) + offset;
      w.values = static_cast<const uint8_t*>(req.values.data) + offset;
      w.src_dtype = req.keys.dtype;
      w.src_stride = token_stride;
      writes.push_back(w);
      i = j;
    }
  }
  if (absl::Status s = backend_->WriteRows(pool_->view(), writes); !s.ok()) return s;

  // Commit.
  for (int32_t h = 0; h < heads; ++h) {
    Stream& st = seq.streams[layer * heads + h];
    Segment* target;
    if (work[h].new_segment) {
      st.segments.emplace_back();
      target = &st.segments.back();
      target->key_width = staged[h].key_width;
      target->value_width = staged[h].value_width;
      target->tokens_per_page = staged[h].tokens_per_page;
    } else {
      target = &st.segments.back();
    }
    const int32_t first_row = target->length();
    target->pages = std::move(staged[h].pages);
    const bool summaries = c.page_summaries;
    const int32_t stream_index = layer * heads + h;
    KeyIndex* index = seq.key_indexes.empty() ? nullptr : seq.key_indexes[stream_index].get();
    if (summaries || index != nullptr) {
      // The keys as the pool stores them (rounded to its dtype), full width: Append always
      // writes full-width rows.
      std::vector<float> stored(static_cast<size_t>(m) * d);  // [m, head_dim]
      for (int32_t i = 0; i < m; ++i) {
        const int64_t src = (int64_t{admitted[i]} * heads + h) * d;
        for (int32_t ch = 0; ch < d; ++ch) {
          stored[static_cast<size_t>(i) * d + ch] =
              RoundToDType(LoadAsFloat(req.keys.data, req.keys.dtype, src + ch), c.dtype);
        }
      }
      if (summaries) {
        ResizeSummaries(*target);
        for (int32_t i = 0; i < m; ++i) {
          FoldSummary(*target, (first_row + i) / target->tokens_per_page,
                      stored.data() + static_cast<size_t>(i) * d);
        }
      }
      // A key beyond the index's norm bound cannot be added exactly: drop the index, the next
      // retrieval decode rebuilds it with a new bound.
      if (index != nullptr && !index->Add(stored.data(), m)) seq.key_indexes[stream_index].reset();
    }
    for (int32_t t : admitted) {
      target->positions.push_back(req.positions[t]);
      target->modalities.push_back(
          req.modalities.empty() ? static_cast<uint8_t>(Modality::kText)
                                 : static_cast<uint8_t>(req.modalities[t]));
      target->scores.push_back(0.0f);
    }
  }
  seq.last_position[layer] = req.positions[n - 1];
  guard.committed = true;
  pool_->Release(replaced_pages);
  return absl::OkStatus();
}

// ---- Apply ------------------------------------------------------------------------------------

absl::Status Cache::Apply(const EvictionPlan& plan) {
  const CacheConfig& c = config_;
  const int32_t d = c.head_dim;
  absl::StatusOr<std::shared_ptr<Sequence>> found = Find(plan.sequence);
  if (!found.ok()) return found.status();
  Sequence& seq = **found;
  absl::MutexLock lock(&seq.mu);
  if (seq.freed) return absl::NotFoundError(absl::StrCat("Apply: unknown sequence ", plan.sequence));

  // Validate the whole plan before anything changes.
  std::vector<uint8_t> seen(static_cast<size_t>(c.num_layers) * c.num_kv_heads, 0);
  for (size_t p = 0; p < plan.streams.size(); ++p) {
    const StreamPlan& sp = plan.streams[p];
    const std::string where = absl::StrCat("Apply: streams[", p, "] (layer ", sp.layer, ", kv_head ",
                                           sp.kv_head, "): ");
    if (absl::Status s = CheckStreamIndex(c, sp.layer, sp.kv_head); !s.ok()) {
      return absl::OutOfRangeError(absl::StrCat(where, s.message()));
    }
    const int32_t index = sp.layer * c.num_kv_heads + sp.kv_head;
    if (seen[index]) return absl::InvalidArgumentError(absl::StrCat(where, "stream named twice"));
    seen[index] = 1;
    const int32_t len = seq.streams[index].length();
    for (size_t i = 0; i < sp.kept.size(); ++i) {
      if (sp.kept[i] < 0 || sp.kept[i] >= len) {
        return absl::OutOfRangeError(absl::StrCat(where, "kept[", i, "] = ", sp.kept[i],
                                                  " is outside the stream's ", len, " tokens"));
      }
      if (i > 0 && sp.kept[i] <= sp.kept[i - 1]) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, "kept must be strictly ascending; kept[", i, "] = ", sp.kept[i]));
      }
    }
    for (size_t i = 0; i < sp.key_channels.size(); ++i) {
      if (sp.key_channels[i] < 0 || sp.key_channels[i] >= d) {
        return absl::OutOfRangeError(absl::StrCat(where, "key_channels[", i, "] = ", sp.key_channels[i],
                                                  " is outside [0, ", d, ")"));
      }
      if (i > 0 && sp.key_channels[i] <= sp.key_channels[i - 1]) {
        return absl::InvalidArgumentError(absl::StrCat(where, "key_channels must be strictly ascending"));
      }
    }
    if (sp.full_width_recent < 0 || sp.full_width_recent > static_cast<int32_t>(sp.kept.size())) {
      return absl::InvalidArgumentError(absl::StrCat(where, "full_width_recent = ", sp.full_width_recent,
                                                     " is outside [0, ", sp.kept.size(), "]"));
    }
    for (const auto* w : {&sp.kept_key_weight, &sp.kept_value_weight}) {
      if (!w->empty() && w->size() != sp.kept.size()) {
        return absl::InvalidArgumentError(absl::StrCat(where, "kept weights have ", w->size(),
                                                       " entries for ", sp.kept.size(), " kept tokens"));
      }
      for (float x : *w) {
        if (!IsFinite(x)) return absl::InvalidArgumentError(absl::StrCat(where, "kept weight ", x, " is not finite"));
      }
    }
    for (size_t i = 0; i < sp.merges.size(); ++i) {
      const MergeTerm& t = sp.merges[i];
      if (t.kept_slot < 0 || t.kept_slot >= static_cast<int32_t>(sp.kept.size())) {
        return absl::OutOfRangeError(absl::StrCat(where, "merges[", i, "].kept_slot = ", t.kept_slot,
                                                  " is outside [0, ", sp.kept.size(), ")"));
      }
      if (t.source < 0 || t.source >= len) {
        return absl::OutOfRangeError(absl::StrCat(where, "merges[", i, "].source = ", t.source,
                                                  " is outside the stream's ", len, " tokens"));
      }
      if (!IsFinite(t.key_weight) || !IsFinite(t.value_weight)) {
        return absl::InvalidArgumentError(absl::StrCat(where, "merges[", i, "] has a non-finite weight"));
      }
    }
  }

  // A stream plan that keeps every token unchanged is a no-op: leave its pages (possibly shared
  // with a fork) alone instead of rewriting them.
  auto is_identity = [&](const StreamPlan& sp) {
    const int32_t len = seq.streams[sp.layer * c.num_kv_heads + sp.kv_head].length();
    const auto all_ones = [](const std::vector<float>& w) {
      return std::all_of(w.begin(), w.end(), [](float x) { return x == 1.0f; });
    };
    return static_cast<int32_t>(sp.kept.size()) == len && sp.merges.empty() &&
           (sp.key_channels.empty() || static_cast<int32_t>(sp.key_channels.size()) == d) &&
           all_ones(sp.kept_key_weight) && all_ones(sp.kept_value_weight);
  };
  std::vector<uint8_t> skip(plan.streams.size(), 0);
  for (size_t p = 0; p < plan.streams.size(); ++p) skip[p] = is_identity(plan.streams[p]);

  // Lay out the new segments of every stream and allocate all their pages at once.
  struct NewSegment {
    int32_t plan_index;
    int32_t first_slot, count;  // slots [first_slot, first_slot + count) of kept
    bool pruned;
    Segment segment;
  };
  std::vector<NewSegment> fresh;
  int32_t total_pages = 0;
  for (size_t p = 0; p < plan.streams.size(); ++p) {
    const StreamPlan& sp = plan.streams[p];
    if (skip[p]) continue;
    const int32_t kept = static_cast<int32_t>(sp.kept.size());
    const bool prune = !sp.key_channels.empty() && static_cast<int32_t>(sp.key_channels.size()) < d;
    const int32_t pruned_count = prune ? kept - sp.full_width_recent : 0;
    for (int part = 0; part < 2; ++part) {
      const bool pruned = part == 0;
      const int32_t first = pruned ? 0 : pruned_count;
      const int32_t count = pruned ? pruned_count : kept - pruned_count;
      if (count == 0) continue;
      NewSegment ns{static_cast<int32_t>(p), first, count, pruned, {}};
      Segment& s = ns.segment;
      s.key_width = pruned ? static_cast<int32_t>(sp.key_channels.size()) : d;
      s.value_width = d;
      if (pruned) s.key_channels = sp.key_channels;
      s.tokens_per_page = TokensPerPage(pool_->page_bytes(), s.key_width, s.value_width, c.dtype);
      s.pages.resize(CeilDiv(count, s.tokens_per_page));
      total_pages += static_cast<int32_t>(s.pages.size());
      fresh.push_back(std::move(ns));
    }
  }
  PageGuard guard{pool_.get(), std::vector<int32_t>(total_pages)};
  if (absl::Status s = pool_->Allocate(total_pages, guard.pages.data()); !s.ok()) {
    guard.pages.clear();
    return absl::ResourceExhaustedError(
        absl::StrCat("Apply on sequence ", plan.sequence, ": ", s.message()));
  }
  {
    int32_t next = 0;
    for (NewSegment& ns : fresh) {
      for (int32_t& page : ns.segment.pages) page = guard.pages[next++];
    }
  }

  // Source views and token -> (segment, row) maps, per planned stream.
  struct Sources {
    std::vector<SegmentView> views;
    std::vector<int32_t> starts;  // first stream token index of each segment
  };
  std::vector<Sources> sources(plan.streams.size());
  for (size_t p = 0; p < plan.streams.size(); ++p) {
    Stream& st = seq.streams[plan.streams[p].layer * c.num_kv_heads + plan.streams[p].kv_head];
    int32_t start = 0;
    for (Segment& s : st.segments) {
      sources[p].views.push_back(s.View());
      sources[p].starts.push_back(start);
      start += s.length();
    }
  }
  auto locate = [&](size_t p, int32_t token) {
    const std::vector<int32_t>& starts = sources[p].starts;
    const int32_t seg =
        static_cast<int32_t>(std::upper_bound(starts.begin(), starts.end(), token) - starts.begin()) - 1;
    return GatherTerm{seg, token - starts[seg], 1.0f, 1.0f};
  };

  // Per new segment: its side data and its gather terms (self term, then merges of that slot).
  std::vector<std::vector<int32_t>> term_offsets(fresh.size());
  std::vector<std::vector<GatherTerm>> terms(fresh.size());
  std::vector<RowGather> gathers;
  for (size_t f = 0; f < fresh.size(); ++f) {
    NewSegment& ns = fresh[f];
    const StreamPlan& sp = plan.streams[ns.plan_index];
    Stream& st = seq.streams[sp.layer * c.num_kv_heads + sp.kv_head];
    // The merges of each slot of this segment, in plan order, as CSR (no allocation per slot):
    // slot i's merges are merge_index[merge_start[i] .. merge_start[i + 1]).
    std::vector<int32_t> merge_start, merge_index;
    if (!sp.merges.empty()) {
      merge_start.assign(ns.count + 1, 0);
      for (const MergeTerm& m : sp.merges) {
        if (m.kept_slot >= ns.first_slot && m.kept_slot < ns.first_slot + ns.count) {
          ++merge_start[m.kept_slot - ns.first_slot + 1];
        }
      }
      for (int32_t i = 0; i < ns.count; ++i) merge_start[i + 1] += merge_start[i];
      merge_index.resize(merge_start[ns.count]);
      std::vector<int32_t> fill(merge_start.begin(), merge_start.end() - 1);
      for (size_t m = 0; m < sp.merges.size(); ++m) {
        const int32_t slot = sp.merges[m].kept_slot;
        if (slot >= ns.first_slot && slot < ns.first_slot + ns.count) {
          merge_index[fill[slot - ns.first_slot]++] = static_cast<int32_t>(m);
        }
      }
    }
    Segment& s = ns.segment;
    s.positions.reserve(ns.count);
    s.modalities.reserve(ns.count);
    s.scores.reserve(ns.count);
    term_offsets[f].reserve(ns.count + 1);
    terms[f].reserve(ns.count + merge_index.size());
    term_offsets[f].push_back(0);
    for (int32_t i = 0; i < ns.count; ++i) {
      const int32_t slot = ns.first_slot + i;
      const int32_t token = sp.kept[slot];
      GatherTerm self = locate(ns.plan_index, token);
      const Segment& src = st.segments[self.src_segment];
      s.positions.push_back(src.positions[self.src_row]);
      s.modalities.push_back(src.modalities[self.src_row]);
      s.scores.push_back(src.scores[self.src_row]);
      if (!sp.kept_key_weight.empty()) self.key_weight = sp.kept_key_weight[slot];
      if (!sp.kept_value_weight.empty()) self.value_weight = sp.kept_value_weight[slot];
      terms[f].push_back(self);
      if (!merge_start.empty()) {
        for (int32_t j = merge_start[i]; j < merge_start[i + 1]; ++j) {
          const MergeTerm& m = sp.merges[merge_index[j]];
          GatherTerm t = locate(ns.plan_index, m.source);
          t.key_weight = m.key_weight;
          t.value_weight = m.value_weight;
          terms[f].push_back(t);
        }
      }
      term_offsets[f].push_back(static_cast<int32_t>(terms[f].size()));
    }
  }
  for (size_t f = 0; f < fresh.size(); ++f) {
    RowGather g;
    g.sources = sources[fresh[f].plan_index].views;
    g.dst = fresh[f].segment.View();
    g.term_offsets = term_offsets[f];
    g.terms = terms[f];
    g.head_dim = d;
    gathers.push_back(g);
  }
  if (!gathers.empty()) {
    if (absl::Status s = backend_->GatherRows(pool_->view(), gathers); !s.ok()) return s;
  }

  // Quest summaries of the new segments, from the rows as the backend stored them (over the
  // channels each segment stores).
  if (c.page_summaries) {
    for (NewSegment& ns : fresh) {
      Segment& s = ns.segment;
      std::vector<float> keys(static_cast<size_t>(s.length()) * d);    // [length, head_dim]
      std::vector<float> values(static_cast<size_t>(s.length()) * d);  // [length, head_dim]
      if (absl::Status st = backend_->ReadRows(pool_->view(), s.View(), d, 0, s.length(),
                                               keys.data(), values.data());
          !st.ok()) {
        return st;
      }
      s.key_min.clear();
      s.key_max.clear();
      ResizeSummaries(s);
      std::vector<float> row(s.key_width);
      for (int32_t t = 0; t < s.length(); ++t) {
        const float* k = keys.data() + static_cast<size_t>(t) * d;
        for (int32_t i = 0; i < s.key_width; ++i) row[i] = k[s.key_channels.empty() ? i : s.key_channels[i]];
        FoldSummary(s, t / s.tokens_per_page, row.data());
      }
    }
  }

  // Commit: replace every planned stream's segments, release the old pages.
  std::vector<std::vector<Segment>> replacement(plan.streams.size());
  for (NewSegment& ns : fresh) replacement[ns.plan_index].push_back(std::move(ns.segment));
  for (size_t p = 0; p < plan.streams.size(); ++p) {
    if (skip[p]) continue;
    Stream& st = seq.streams[plan.streams[p].layer * c.num_kv_heads + plan.streams[p].kv_head];
    std::vector<Segment> old = std::move(st.segments);
    st.segments = std::move(replacement[p]);
    ReleaseSegments(*pool_, old);
    // Token indices changed: a retrieval index over the old tokens is rebuilt lazily.
    if (!seq.key_indexes.empty()) {
      seq.key_indexes[plan.streams[p].layer * c.num_kv_heads + plan.streams[p].kv_head].reset();
    }
  }
  guard.committed = true;
  return absl::OkStatus();
}

// ---- Kernels ----------------------------------------------------------------------------------

namespace {

absl::Status CheckReadPolicy(const ReadPolicy& rp) {
  const int kind = static_cast<int>(rp.kind);
  if (kind < 0 || kind > static_cast<int>(ReadPolicy::Kind::kRetrieval)) {
    return absl::InvalidArgumentError(absl::StrCat("DecodeAttention: read_policy.kind ", kind,
                                                   " is not dense (0), quest (1) or retrieval (2)"));
  }
  if (rp.dense_first_layers < 0) {
    return absl::InvalidArgumentError(absl::StrCat("DecodeAttention: read_policy.dense_first_layers = ",
                                                   rp.dense_first_layers, " is negative"));
  }
  if (rp.kind == ReadPolicy::Kind::kQuest && rp.token_budget <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DecodeAttention: read_policy.token_budget = ", rp.token_budget, " must be > 0 for Quest"));
  }
  if (rp.kind == ReadPolicy::Kind::kRetrieval) {
    if (rp.top_k <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("DecodeAttention: read_policy.top_k = ", rp.top_k,
                                                     " must be > 0 for retrieval"));
    }
    if (rp.sink_tokens < 0 || rp.recent_tokens < 0) {
      return absl::InvalidArgumentError(absl::StrCat("DecodeAttention: read_policy.sink_tokens = ",
                                                     rp.sink_tokens, " and recent_tokens = ",
                                                     rp.recent_tokens, " must be >= 0"));
    }
    if (rp.ef_search < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("DecodeAttention: read_policy.ef_search = ", rp.ef_search, " is negative"));
    }
    if (rp.index_m < 2 || rp.index_m > 256) {
      return absl::InvalidArgumentError(
          absl::StrCat("DecodeAttention: read_policy.index_m = ", rp.index_m, " is outside [2, 256]"));
    }
    if (rp.index_ef_construction < 1) {
      return absl::InvalidArgumentError(absl::StrCat("DecodeAttention: read_policy.index_ef_construction = ",
                                                     rp.index_ef_construction, " must be >= 1"));
    }
  }
  return absl::OkStatus();
}

// Norm bound of a freshly built index over keys whose largest norm is `max_norm`: headroom so
// that later appends rarely exceed it (a key that does forces a rebuild; see SPARSE_DECODE.md).
constexpr float kIndexNormHeadroom = 1.25f;

}  // namespace

absl::StatusOr<const KeyIndex*> Cache::EnsureKeyIndex(Sequence& seq, int32_t layer,
                                                      int32_t kv_head, const ReadPolicy& rp) {
  const CacheConfig& c = config_;
  const int32_t d = c.head_dim;
  if (seq.key_indexes.empty()) seq.key_indexes.resize(seq.streams.size());
  const int32_t index = layer * c.num_kv_heads + kv_head;
  Stream& st = seq.streams[index];
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
  int32_t at = 0;
  for (Segment& s : st.segments) {
    if (absl::Status status = backend_->ReadRows(pool_->view(), s.View(), d, 0, s.length(),
                                                 keys.data() + static_cast<size_t>(at) * d,
                                                 values.data() + static_cast<size_t>(at) * d);
        !status.ok()) {
      return status;
    }
    at += s.length();
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

absl::Status Cache::DecodeAttention(std::span<const SequenceId> batch, int32_t layer,
                                    std::span<const float> q, std::span<float> out,
                                    std::span<float> lse, const DecodeOptions& options) {
  const CacheConfig& c = config_;
  if (batch.empty()) return absl::InvalidArgumentError("DecodeAttention: empty batch");
  if (layer < 0 || layer >= c.num_layers) {
    return absl::OutOfRangeError(
        absl::StrCat("DecodeAttention: layer ", layer, " is out of range [0, ", c.num_layers, ")"));
  }
  const int64_t per_seq = int64_t{c.num_q_heads} * c.head_dim;
  const int64_t b = static_cast<int64_t>(batch.size());
  if (static_cast<int64_t>(q.size()) != b * per_seq) {
    return absl::InvalidArgumentError(absl::StrCat("DecodeAttention: q has ", q.size(),
                                                   " elements, expected ", b * per_seq,
                                                   " (batch * num_q_heads * head_dim)"));
  }
  if (static_cast<int64_t>(out.size()) != b * per_seq) {
    return absl::InvalidArgumentError(absl::StrCat("DecodeAttention: out has ", out.size(),
                                                   " elements, expected ", b * per_seq));
  }
  if (!lse.empty() && static_cast<int64_t>(lse.size()) != b * c.num_q_heads) {
    return absl::InvalidArgumentError(absl::StrCat("DecodeAttention: lse has ", lse.size(),
                                                   " elements, expected ", b * c.num_q_heads,
                                                   " (batch * num_q_heads) or 0"));
  }
  if (!(options.scale >= 0.0f) || !std::isfinite(options.scale)) {
    return absl::InvalidArgumentError(absl::StrCat("DecodeAttention: scale ", options.scale,
                                                   " must be finite and >= 0 (0 = 1/sqrt(head_dim))"));
  }
  const ReadPolicy& rp = options.read_policy;
  if (rp.kind != ReadPolicy::Kind::kDense) {
    if (absl::Status s = CheckReadPolicy(rp); !s.ok()) return s;
  }
  const bool sparse = rp.kind != ReadPolicy::Kind::kDense && layer >= rp.dense_first_layers;
  if (sparse && rp.kind == ReadPolicy::Kind::kQuest && !c.page_summaries) {
    return absl::FailedPreconditionError(
        "DecodeAttention: the Quest read policy needs CacheConfig::page_summaries = true");
  }
  std::vector<std::shared_ptr<Sequence>> seqs;
  seqs.reserve(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    absl::StatusOr<std::shared_ptr<Sequence>> s = Find(batch[i]);
    if (!s.ok()) return absl::NotFoundError(absl::StrCat("DecodeAttention: batch[", i, "]: ", s.status().message()));
    seqs.push_back(*std::move(s));
  }
  // Lock in ascending id order (deadlock-free against other batches); reject duplicates.
  std::vector<Sequence*> order;
  for (auto& s : seqs) order.push_back(s.get());
  std::sort(order.begin(), order.end(), [](Sequence* a, Sequence* b) { return a->id < b->id; });
  for (size_t i = 1; i < order.size(); ++i) {
    if (order[i]->id == order[i - 1]->id) {
      return absl::InvalidArgumentError(
          absl::StrCat("DecodeAttention: sequence ", order[i]->id, " appears twice in the batch"));
    }
  }
  for (Sequence* s : order) s->mu.Lock();
  absl::Status status = absl::OkStatus();
  for (Sequence* s : order) {
    if (s->freed) status = absl::NotFoundError(absl::StrCat("DecodeAttention: unknown sequence ", s->id));
  }
  if (status.ok()) {
    const int32_t heads = c.num_kv_heads;
    std::vector<int32_t> offsets{0};
    std::vector<SegmentView> views;
    for (auto& sp : seqs) {
      for (int32_t h = 0; h < heads; ++h) {
        for (Segment& seg : sp->streams[layer * heads + h].segments) views.push_back(seg.View());
        offsets.push_back(static_cast<int32_t>(views.size()));
      }
    }
    PagedKVView kv;
    kv.pool = pool_->view();
    kv.head_dim = c.head_dim;
    kv.num_streams = static_cast<int32_t>(b * heads);
    kv.stream_segment_offsets = offsets.data();
    kv.segments = views.data();
    DecodeParams params;
    params.group_size = c.group_size();
    params.scale = options.scale;
    params.accumulate_scores = options.accumulate_scores;
    params.aggregation = options.aggregation;
    if (!sparse) {
      status = backend_->DecodeAttention(kv, params, q.data(), out.data(),
                                         lse.empty() ? nullptr : lse.data());
    } else {
      params.read_policy = rp;
      std::vector<const KeyIndex*> indexes;
      if (rp.kind == ReadPolicy::Kind::kRetrieval && !rp.exact_search) {
        for (auto& sp : seqs) {
          for (int32_t h = 0; h < heads && status.ok(); ++h) {
            absl::StatusOr<const KeyIndex*> index = EnsureKeyIndex(*sp, layer, h, rp);
            if (!index.ok()) {
              status = index.status();
              break;
            }
            indexes.push_back(*index);
          }
        }
        params.key_indexes = indexes.data();
      }
      if (status.ok()) {
        status = backend_->SparseDecodeAttention(kv, params, q.data(), out.data(),
                                                 lse.empty() ? nullptr : lse.data());
      }
    }
  }
  for (auto it = order.rbegin(); it != order.rend(); ++it) (*it)->mu.Unlock();
  return status;
}

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
    return absl::InvalidArgumentError(absl::StrCat("ScoreRows: scale ", req.scale, " must be finite and >= 0"));
  }
  if (!(req.sparsity_threshold >= 0.0f && req.sparsity_threshold <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ScoreRows: sparsity_threshold ", req.sparsity_threshold, " is outside [0, 1]"));
  }
  for (size_t i = 0; i < req.positions.size(); ++i) {
    if (req.positions[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("ScoreRows: positions[", i, "] = ", req.positions[i], " is negative"));
    }
  }
  absl::StatusOr<std::shared_ptr<Sequence>> found = Find(seq_id);
  if (!found.ok()) return found.status();
  Sequence& seq = **found;
  absl::MutexLock lock(&seq.mu);
  if (seq.freed) return absl::NotFoundError(absl::StrCat("ScoreRows: unknown sequence ", seq_id));

  const int32_t heads = c.num_kv_heads;
  std::vector<int32_t> offsets{0};
  std::vector<SegmentView> views;
  std::vector<int32_t> lengths;
  int64_t total = 0;
  for (int32_t h = 0; h < heads; ++h) {
    Stream& st = seq.streams[layer * heads + h];
    for (Segment& s : st.segments) views.push_back(s.View());
    offsets.push_back(static_cast<int32_t>(views.size()));
    lengths.push_back(st.length());
    total += st.length();
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
    result.token_scores[h].assign(token_scores.begin() + at, token_scores.begin() + at + lengths[h]);
    at += lengths[h];
  }
  if (req.accumulate) {
    for (int32_t h = 0; h < heads; ++h) {
      int32_t t = 0;
      for (Segment& s : seq.streams[layer * heads + h].segments) {
        for (float& x : s.scores) x += result.token_scores[h][t++];
      }
    }
  }
  return result;
}

// ---- Introspection ----------------------------------------------------------------------------

absl::StatusOr<std::shared_ptr<Cache::Sequence>> Cache::FindForStream(SequenceId seq_id,
                                                                     int32_t layer,
                                                                     int32_t kv_head) const {
  if (absl::Status s = CheckStreamIndex(config_, layer, kv_head); !s.ok()) return s;
  return Find(seq_id);
}

absl::StatusOr<int32_t> Cache::StreamLength(SequenceId seq_id, int32_t layer,
                                            int32_t kv_head) const {
  absl::StatusOr<std::shared_ptr<Sequence>> found = FindForStream(seq_id, layer, kv_head);
  if (!found.ok()) return found.status();
  Sequence& seq = **found;
  absl::MutexLock lock(&seq.mu);
  if (seq.freed) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq_id));
  return seq.streams[layer * config_.num_kv_heads + kv_head].length();
}

absl::StatusOr<StreamContents> Cache::ReadStream(SequenceId seq_id, int32_t layer, int32_t kv_head,
                                                 bool with_kv) const {
  return ReadStream(seq_id, layer, kv_head, StreamReadOptions{.keys = with_kv, .values = with_kv});
}

absl::StatusOr<StreamContents> Cache::ReadStream(SequenceId seq_id, int32_t layer, int32_t kv_head,
                                                 const StreamReadOptions& options) const {
  absl::StatusOr<std::shared_ptr<Sequence>> found = FindForStream(seq_id, layer, kv_head);
  if (!found.ok()) return found.status();
  Sequence& seq = **found;
  absl::MutexLock lock(&seq.mu);
  if (seq.freed) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq_id));
  Stream& st = seq.streams[layer * config_.num_kv_heads + kv_head];
  const int32_t d = config_.head_dim;
  StreamContents out;
  out.length = st.length();
  out.num_segments = static_cast<int32_t>(st.segments.size());
  if (options.keys) out.keys.resize(static_cast<size_t>(out.length) * d);
  if (options.values) out.values.resize(static_cast<size_t>(out.length) * d);
  int32_t at = 0;
  for (Segment& s : st.segments) {
    out.positions.insert(out.positions.end(), s.positions.begin(), s.positions.end());
    for (uint8_t m : s.modalities) out.modalities.push_back(static_cast<Modality>(m));
    out.scores.insert(out.scores.end(), s.scores.begin(), s.scores.end());
    out.key_width.insert(out.key_width.end(), s.length(), s.key_width);
    if ((options.keys || options.values) && s.length() > 0) {
      // Both backends skip a null destination (keys or values not requested).
      float* keys = options.keys ? out.keys.data() + static_cast<size_t>(at) * d : nullptr;
      float* values = options.values ? out.values.data() + static_cast<size_t>(at) * d : nullptr;
      if (absl::Status status =
              backend_->ReadRows(pool_->view(), s.View(), d, 0, s.length(), keys, values);
          !status.ok()) {
        return status;
      }
    }
    at += s.length();
  }
  return out;
}

absl::StatusOr<std::vector<SegmentLayout>> Cache::StreamPages(SequenceId seq_id, int32_t layer,
                                                              int32_t kv_head) const {
  absl::StatusOr<std::shared_ptr<Sequence>> found = FindForStream(seq_id, layer, kv_head);
  if (!found.ok()) return found.status();
  Sequence& seq = **found;
  absl::MutexLock lock(&seq.mu);
  if (seq.freed) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq_id));
  const Stream& st = seq.streams[layer * config_.num_kv_heads + kv_head];
  std::vector<SegmentLayout> out;
  out.reserve(st.segments.size());
  for (const Segment& s : st.segments) {
    out.push_back({.length = s.length(), .tokens_per_page = s.tokens_per_page,
                   .key_width = s.key_width, .value_width = s.value_width, .pages = s.pages});
  }
  return out;
}

absl::StatusOr<std::vector<PageSummary>> Cache::ReadPageSummaries(SequenceId seq_id,
                                                                 int32_t layer,
                                                                 int32_t kv_head) const {
  if (!config_.page_summaries) {
    return absl::FailedPreconditionError("ReadPageSummaries: CacheConfig::page_summaries is off");
  }
  absl::StatusOr<std::shared_ptr<Sequence>> found = FindForStream(seq_id, layer, kv_head);
  if (!found.ok()) return found.status();
  Sequence& seq = **found;
  absl::MutexLock lock(&seq.mu);
  if (seq.freed) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq_id));
  std::vector<PageSummary> out;
  int32_t start = 0;
  for (const Segment& s : seq.streams[layer * config_.num_kv_heads + kv_head].segments) {
    for (size_t p = 0; p < s.pages.size(); ++p) {
      PageSummary ps;
      ps.first_token = start + static_cast<int32_t>(p) * s.tokens_per_page;
      ps.num_tokens = std::min(s.tokens_per_page, s.length() - static_cast<int32_t>(p) * s.tokens_per_page);
      ps.key_channels = s.key_channels;
      ps.key_min.assign(s.key_min.begin() + p * s.key_width, s.key_min.begin() + (p + 1) * s.key_width);
      ps.key_max.assign(s.key_max.begin() + p * s.key_width, s.key_max.begin() + (p + 1) * s.key_width);
      out.push_back(std::move(ps));
    }
    start += s.length();
  }
  return out;
}

absl::Status Cache::AddScores(SequenceId seq_id, int32_t layer, int32_t kv_head,
                              std::span<const float> delta) {
  absl::StatusOr<std::shared_ptr<Sequence>> found = FindForStream(seq_id, layer, kv_head);
  if (!found.ok()) return found.status();
  Sequence& seq = **found;
  absl::MutexLock lock(&seq.mu);
  if (seq.freed) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq_id));
  Stream& st = seq.streams[layer * config_.num_kv_heads + kv_head];
  if (static_cast<int64_t>(delta.size()) != st.length()) {
    return absl::InvalidArgumentError(absl::StrCat("AddScores: delta has ", delta.size(),
                                                   " entries for a stream of ", st.length(), " tokens"));
  }
  size_t t = 0;
  for (Segment& s : st.segments) {
    for (float& x : s.scores) x += delta[t++];
  }
  return absl::OkStatus();
}

CacheStats Cache::Stats() const {
  CacheStats stats;
  absl::ReaderMutexLock lock(&mu_);
  stats.num_sequences = static_cast<int32_t>(sequences_.size());
  for (const auto& [id, seq] : sequences_) {
    absl::MutexLock seq_lock(&seq->mu);
    for (const Stream& st : seq->streams) stats.tokens_stored += st.length();
  }
  stats.pages_total = pool_->num_pages();
  stats.pages_used = pool_->NumUsed();
  stats.bytes_used = int64_t{stats.pages_used} * pool_->page_bytes();
  return stats;
}

absl::Status Cache::Validate() const {
  const CacheConfig& c = config_;
  // The writer lock stops new operations from starting; in-flight ones finish before we get
  // their sequence locks (they never wait for the map lock while holding a sequence lock).
  absl::MutexLock lock(&mu_);
  std::vector<std::shared_ptr<Sequence>> seqs;
  for (const auto& [id, s] : sequences_) seqs.push_back(s);
  std::sort(seqs.begin(), seqs.end(), [](const auto& a, const auto& b) { return a->id < b->id; });
  for (auto& s : seqs) s->mu.Lock();
  std::vector<int32_t> refs(pool_->num_pages(), 0);
  std::vector<SequenceId> page_owner(pool_->num_pages(), 0);
  absl::Status status = absl::OkStatus();
  auto fail = [&](std::string msg) {
    if (status.ok()) status = absl::InternalError(std::move(msg));
  };
  for (auto& seq : seqs) {
    if (seq->freed) fail(absl::StrCat("sequence ", seq->id, " is marked freed but still in the map"));
    if (static_cast<int32_t>(seq->streams.size()) != c.num_layers * c.num_kv_heads) {
      fail(absl::StrCat("sequence ", seq->id, " has ", seq->streams.size(), " streams"));
      continue;
    }
    for (int32_t si = 0; si < static_cast<int32_t>(seq->streams.size()); ++si) {
      const Stream& st = seq->streams[si];
      const std::string where = absl::StrCat("sequence ", seq->id, " layer ", si / c.num_kv_heads,
                                             " kv_head ", si % c.num_kv_heads, ": ");
      int32_t last = -1;
      for (size_t g = 0; g < st.segments.size(); ++g) {
        const Segment& s = st.segments[g];
        const std::string seg = absl::StrCat(where, "segment ", g, ": ");
        if (s.length() == 0) fail(seg + "is empty");
        if (s.modalities.size() != s.positions.size() || s.scores.size() != s.positions.size()) {
          fail(seg + "side data lengths differ");
        }
        if (s.value_width != c.head_dim) fail(absl::StrCat(seg, "value width ", s.value_width));
        if (s.key_channels.empty() ? s.key_width != c.head_dim
                                   : static_cast<int32_t>(s.key_channels.size()) != s.key_width ||
                                         s.key_width >= c.head_dim) {
          fail(absl::StrCat(seg, "key width ", s.key_width, " vs ", s.key_channels.size(), " channels"));
        }
        for (size_t i = 0; i < s.key_channels.size(); ++i) {
          if (s.key_channels[i] < 0 || s.key_channels[i] >= c.head_dim ||
              (i > 0 && s.key_channels[i] <= s.key_channels[i - 1])) {
            fail(seg + "key channels not ascending in range");
          }
        }
        if (s.tokens_per_page != TokensPerPage(pool_->page_bytes(), s.key_width, s.value_width, c.dtype)) {
          fail(absl::StrCat(seg, "tokens_per_page ", s.tokens_per_page, " does not match its row format"));
          continue;
        }
        if (static_cast<int64_t>(s.pages.size()) != CeilDiv(s.length(), s.tokens_per_page)) {
          fail(absl::StrCat(seg, s.pages.size(), " pages for ", s.length(), " tokens at ",
                            s.tokens_per_page, " per page"));
        }
        if (c.page_summaries &&
            (s.key_min.size() != s.pages.size() * static_cast<size_t>(s.key_width) ||
             s.key_max.size() != s.key_min.size())) {
          fail(absl::StrCat(seg, "page summaries hold ", s.key_min.size(), " values for ",
                            s.pages.size(), " pages of ", s.key_width, " key channels"));
        }
        for (size_t i = 0; i < s.positions.size(); ++i) {
          if (s.positions[i] <= last) fail(absl::StrCat(seg, "position ", s.positions[i], " after ", last));
          last = s.positions[i];
          if (s.modalities.size() == s.positions.size() && s.modalities[i] >= kNumModalities) {
            fail(seg + "bad modality");
          }
        }
        for (int32_t page : s.pages) {
          if (page < 0 || page >= pool_->num_pages()) {
            fail(absl::StrCat(seg, "page id ", page, " out of range"));
            continue;
          }
          if (refs[page] > 0 && page_owner[page] == seq->id) {
            fail(absl::StrCat(seg, "page ", page, " is owned twice within sequence ", seq->id));
          }
          page_owner[page] = seq->id;
          ++refs[page];
        }
      }
    }
  }
  if (status.ok()) status = pool_->Validate(refs);
  for (auto it = seqs.rbegin(); it != seqs.rend(); ++it) (*it)->mu.Unlock();
  return status;
}

}  // namespace kvcache
