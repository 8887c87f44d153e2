// The CUDA backend's view mirror: see view_mirror.h. Compiled twice, like cuda_backend.cc: by the
// CUDA build (namespace kvcache::cuda) and by the emulated one (cuda/emulation/, namespace
// kvcache::cuda_emulated).
#include "cuda/view_mirror.h"

#include <algorithm>
#include <atomic>

#include "kvcache/macros.h"

namespace kvcache::KVCACHE_CUDA_NAMESPACE {
namespace {

// A reset fewer than this many calls after the previous one means the mirror is smaller than
// the working set (every layer's views of a step): the capacity doubles instead of being sized
// from the recently used entries, so that it converges in O(log) resets.
constexpr uint64_t kShortEpochCalls = 64;

int64_t Align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

std::atomic<int64_t> g_min_bytes{kDefaultViewMirrorBytes};
std::atomic<int64_t> g_resets{0};

}  // namespace

void SetViewMirrorBytesForTesting(int64_t min_bytes) { g_min_bytes.store(min_bytes); }
int64_t ViewMirrorBytesForTesting() { return g_min_bytes.load(); }
int64_t ViewMirrorResetsForTesting() { return g_resets.load(); }
void CountViewMirrorReset() { g_resets.fetch_add(1); }

int64_t ViewMirror::RegionBytes(const SegmentView& s, int32_t* page_capacity) {
  const int64_t pages = CeilDiv(int64_t{s.length}, int64_t{s.tokens_per_page});
  // Spare room for the pages decode steps add: half as many again (at least 16), so a growing
  // segment moves to a new region O(log length) times; each move uploads the whole segment.
  int64_t capacity = pages + std::max<int64_t>(pages / 2, 16);
  capacity = (capacity + 3) / 4 * 4;
  *page_capacity = static_cast<int32_t>(std::min<int64_t>(capacity, INT32_MAX / 4));
  const int64_t channels = s.key_channels != nullptr ? Align16(int64_t{s.key_width} * 4) : 0;
  return channels + int64_t{*page_capacity} * 4;
}

bool ViewMirror::Plan(const PagedKVView& kv, Update& u) {
  KVC_DCHECK(kv.stream_versions != nullptr);
  ++calls_;
  const int32_t num_segments = kv.stream_segment_offsets[kv.num_streams];
  u.segments.assign(static_cast<size_t>(num_segments), Region{});
  u.values.clear();
  u.copies.clear();
  u.page_values = 0;
  for (int32_t i = 0; i < kv.num_streams; ++i) {
    const int32_t first = kv.stream_segment_offsets[i];
    for (int32_t sidx = first; sidx < kv.stream_segment_offsets[i + 1]; ++sidx) {
      const SegmentView& s = kv.segments[sidx];
      const int32_t pages =
          s.length > 0 ? static_cast<int32_t>(CeilDiv(int64_t{s.length}, s.tokens_per_page)) : 0;
      if (pages == 0) continue;  // no token: no kernel reads its arrays
      const bool has_channels = s.key_channels != nullptr;
      auto [it, inserted] = entries_.try_emplace({kv.stream_versions[i], sidx - first});
      Entry& e = it->second;
      // A segment never seen, one that outgrew its region, or (defensively: the version
      // contract excludes it) one whose format or page count does not continue the mirrored one.
      const bool fresh = inserted || pages > e.page_capacity || pages < e.mirrored_pages ||
                         e.key_width != s.key_width || e.tokens_per_page != s.tokens_per_page ||
                         e.has_channels != has_channels;
      int32_t from = 0;  // first page id to upload
      if (fresh) {
        Entry fresh_entry;
        fresh_entry.bytes = RegionBytes(s, &fresh_entry.page_capacity);
        if (used_ + fresh_entry.bytes > capacity_) return false;
        fresh_entry.at = used_;
        used_ += fresh_entry.bytes;
        fresh_entry.key_width = s.key_width;
        fresh_entry.tokens_per_page = s.tokens_per_page;
        fresh_entry.has_channels = has_channels;
        e = fresh_entry;
        if (has_channels) {
          u.copies.push_back({static_cast<int32_t>(u.values.size()), s.key_width, e.at});
          u.values.insert(u.values.end(), s.key_channels, s.key_channels + s.key_width);
        }
      } else {
        from = e.mirrored_pages;
        // Copy-on-write replaced the id of the page that was last when mirrored.
        if (s.pages[from - 1] != e.last_page) --from;
      }
      const int64_t pages_at =
          e.at + (has_channels ? Align16(int64_t{s.key_width} * 4) : int64_t{0});
      if (from < pages) {
        u.copies.push_back(
            {static_cast<int32_t>(u.values.size()), pages - from, pages_at + int64_t{from} * 4});
        u.values.insert(u.values.end(), s.pages + from, s.pages + pages);
        u.page_values += pages - from;
      }
      e.mirrored_pages = pages;
      e.last_page = s.pages[pages - 1];
      e.last_use = calls_;
      Region& r = u.segments[static_cast<size_t>(sidx)];
      r.pages_at = pages_at;
      r.key_channels_at = has_channels ? e.at : -1;
    }
  }
  return true;
}

void ViewMirror::Reset(const PagedKVView& kv) {
  const uint64_t epoch = calls_ - reset_call_;
  int64_t need = 0;
  const int32_t num_segments = kv.stream_segment_offsets[kv.num_streams];
  for (int32_t sidx = 0; sidx < num_segments; ++sidx) {
    int32_t unused = 0;
    if (kv.segments[sidx].length > 0) need += RegionBytes(kv.segments[sidx], &unused);
  }
  int64_t recent = 0;  // entries used in the last half of the calls since the previous reset
  const uint64_t since = reset_call_ + epoch / 2;
  for (const auto& [key, e] : entries_) {
    if (e.last_use > since) recent += e.bytes;
  }
  int64_t capacity = std::max({capacity_, min_bytes_, 2 * (recent + need)});
  if (capacity_ > 0 && epoch < kShortEpochCalls) capacity = std::max(capacity, 2 * capacity_);
  capacity_ = capacity;
  ++resets_;
  CountViewMirrorReset();
  Forget();
}

void ViewMirror::Forget() {
  entries_.clear();
  used_ = 0;
  reset_call_ = calls_;
}

}  // namespace kvcache::KVCACHE_CUDA_NAMESPACE
