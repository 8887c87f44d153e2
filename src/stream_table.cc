// The stream table's mutators: see stream_table.h. Every mutator checks the invariants it is
// responsible for with KVC_DCHECK (debug builds); Cache::Validate checks them all in any build.
#include "src/stream_table.h"

#include <algorithm>
#include <atomic>
#include <utility>

#include "kvcache/macros.h"
#include "kvcache/types.h"
#include "src/page_summaries.h"

namespace kvcache::internal {

namespace {

std::atomic<uint64_t> g_next_version{1};

// pages.size() == ceil(length / tokens_per_page) and the side data has one entry per token.
[[maybe_unused]] bool WellFormed(const Segment& s, bool page_summaries) {
  const size_t n = s.positions.size();
  return s.tokens_per_page > 0 && s.modalities.size() == n && s.scores.size() == n &&
         static_cast<int64_t>(s.pages.size()) ==
             CeilDiv(static_cast<int64_t>(n), s.tokens_per_page) &&
         (!page_summaries || s.key_min.size() == s.pages.size() * static_cast<size_t>(s.key_width));
}

}  // namespace

SegmentView Segment::View() {
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

uint64_t NextStreamVersion() { return g_next_version.fetch_add(1, std::memory_order_relaxed); }

StreamTable::StreamTable(int32_t num_layers, int32_t num_kv_heads, bool page_summaries)
    : streams_(static_cast<size_t>(num_layers) * num_kv_heads),
      last_position_(num_layers, -1),
      num_kv_heads_(num_kv_heads),
      page_summaries_(page_summaries) {
  for (Stream& st : streams_) st.version = NextStreamVersion();
}

void StreamTable::AppendViews(int32_t index, std::vector<SegmentView>& out) {
  for (Segment& s : streams_[index].segments) out.push_back(s.View());
}

int32_t StreamTable::WriteViews(int32_t index, SegmentView* out, int32_t capacity) {
  std::vector<Segment>& segments = streams_[index].segments;
  const int32_t count = static_cast<int32_t>(segments.size());
  if (count > capacity) return -1;
  for (int32_t i = 0; i < count; ++i) out[i] = segments[i].View();
  return count;
}

void StreamTable::ExtendTail(int32_t index, const SegmentFormat* open, std::vector<int32_t> pages,
                             std::span<const int32_t> positions,
                             std::span<const uint8_t> modalities, const float* stored_keys) {
  Stream& st = streams_[index];
  const int32_t m = static_cast<int32_t>(positions.size());
  KVC_DCHECK(m > 0);
  KVC_DCHECK(modalities.size() == positions.size());
  KVC_DCHECK((stored_keys != nullptr) == page_summaries_);
  KVC_DCHECK(open != nullptr || !st.segments.empty());
  KVC_DCHECK(positions[0] > st.last_position());
  if (open != nullptr) {
    Segment& fresh = st.segments.emplace_back();
    fresh.key_width = open->key_width;
    fresh.value_width = open->value_width;
    fresh.tokens_per_page = open->tokens_per_page;
  }
  Segment& tail = st.segments.back();
  const int32_t first_row = tail.length();
  // Only the tail's last page may be replaced (copy-on-write); earlier pages stay put.
  KVC_DCHECK(pages.size() >= tail.pages.size());
  KVC_DCHECK(tail.pages.size() < 2 ||
             std::equal(tail.pages.begin(), tail.pages.end() - 1, pages.begin()));
  tail.pages = std::move(pages);
  for (int32_t i = 0; i < m; ++i) {
    KVC_DCHECK(i == 0 || positions[i] > positions[i - 1]);
    KVC_DCHECK(modalities[i] < kNumModalities);
    tail.positions.push_back(positions[i]);
    tail.modalities.push_back(modalities[i]);
    tail.scores.push_back(0.0f);
  }
  if (page_summaries_) {
    ResizeSummaries(tail);
    FoldKeys(tail, first_row, m, stored_keys);
  }
  KVC_DCHECK(WellFormed(tail, page_summaries_));
}

std::vector<Segment> StreamTable::Replace(int32_t index, std::vector<Segment> segments) {
  for (const Segment& s : segments) {
    KVC_DCHECK(s.length() > 0);
    KVC_DCHECK(WellFormed(s, page_summaries_));
    (void)s;
  }
  Stream& st = streams_[index];
  std::vector<Segment> old = std::exchange(st.segments, std::move(segments));
  st.version = NextStreamVersion();
  return old;
}

void StreamTable::AdvancePosition(int32_t layer, int32_t position) {
  KVC_DCHECK(position > last_position_[layer]);
  last_position_[layer] = position;
}

void StreamTable::AddScores(int32_t index, std::span<const float> delta) {
  KVC_DCHECK(static_cast<int64_t>(delta.size()) == streams_[index].length());
  size_t t = 0;
  for (Segment& s : streams_[index].segments) {
    for (float& x : s.scores) x += delta[t++];
  }
}

StreamTable StreamTable::ForkCopy() const {
  StreamTable copy = *this;
  for (Stream& st : copy.streams_) st.version = NextStreamVersion();
  return copy;
}

std::vector<Segment> StreamTable::TakeAll() {
  std::vector<Segment> all;
  for (Stream& st : streams_) {
    for (Segment& s : st.segments) all.push_back(std::move(s));
  }
  streams_.clear();
  return all;
}

}  // namespace kvcache::internal
