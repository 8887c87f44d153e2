// src/stream_table.h — the stream / segment metadata of one sequence (internal to the Cache).
//
// A sequence has one stream per (layer, kv head); a stream is an ordered list of segments (runs
// of tokens with one row format, stored in pool pages) and a version. The table owns that
// metadata and changes it only through a handful of mutators, each of which states and checks
// (KVC_DCHECK) the invariants it keeps, the way llama.cpp keeps its KV cell metadata:
//
//   ExtendTail   Append's commit: new tokens at the end of a stream (the tail segment grows, or
//                a new full-width segment opens). Earlier tokens and the version are unchanged.
//   Replace      Apply's commit: the stream's segments are replaced; the version changes.
//   ForkCopy     Fork: the same segments (pages shared), every stream with a version of its own.
//   TakeAll      Free / destruction: every segment leaves the table (its pages to be released).
//   AdvancePosition, AddScores   side data (last appended position, score accumulators).
//
// Versions come from one process-wide counter, so two streams never share a version: a decode
// plan (DecodePlan) that recorded a version knows the stream still holds the same tokens in the
// same places, plus whatever Append added at the tail.
//
// Thread safety: none; the owning sequence's lock guards the table.
//
// Example:
//   StreamTable t(/*num_layers=*/2, /*num_kv_heads=*/4, /*page_summaries=*/false);
//   const int32_t i = t.Index(/*layer=*/1, /*kv_head=*/3);
//   t.ExtendTail(i, &format, std::move(pages), positions, modalities, /*stored_keys=*/nullptr);
//   std::vector<Segment> old = t.Replace(i, std::move(compacted));   // version changes
#ifndef KVCACHE_SRC_STREAM_TABLE_H_
#define KVCACHE_SRC_STREAM_TABLE_H_

#include <cstdint>
#include <span>
#include <vector>

#include "kvcache/paged_view.h"

namespace kvcache::internal {

// The row format of a segment.
struct SegmentFormat {
  int32_t key_width = 0;
  int32_t value_width = 0;
  int32_t tokens_per_page = 0;
};

// One run of tokens with one row format (DESIGN.md §2).
struct Segment {
  int32_t key_width = 0;
  int32_t value_width = 0;
  int32_t tokens_per_page = 0;
  std::vector<int32_t> pages;         // [ceil(length / tokens_per_page)] pool page ids
  std::vector<int32_t> key_channels;  // [key_width] stored channels, empty = all channels
  std::vector<int32_t> positions;     // [length] original positions, ascending
  std::vector<uint8_t> modalities;    // [length]
  std::vector<float> scores;          // [length] score accumulators
  // Quest page summaries (CacheConfig::page_summaries; empty otherwise): per page and stored
  // key channel, min / max of the stored keys. [pages.size(), key_width] each.
  std::vector<float> key_min;
  std::vector<float> key_max;

  int32_t length() const { return static_cast<int32_t>(positions.size()); }
  bool full_width(int32_t head_dim) const { return key_channels.empty() && key_width == head_dim; }
  int32_t free_slots() const {
    return static_cast<int32_t>(pages.size()) * tokens_per_page - length();
  }
  SegmentFormat format() const { return {key_width, value_width, tokens_per_page}; }
  // The kernels' view. Its pointers stay valid until the segment's vectors change (an Append to
  // this segment may reallocate them); moving the Segment keeps them.
  SegmentView View();
};

struct Stream {
  std::vector<Segment> segments;
  uint64_t version = 0;

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

// A version no stream has had yet (process-wide, never 0).
uint64_t NextStreamVersion();

class StreamTable {
 public:
  StreamTable() = default;
  StreamTable(int32_t num_layers, int32_t num_kv_heads, bool page_summaries);

  int32_t num_streams() const { return static_cast<int32_t>(streams_.size()); }
  int32_t num_kv_heads() const { return num_kv_heads_; }
  int32_t Index(int32_t layer, int32_t kv_head) const { return layer * num_kv_heads_ + kv_head; }
  const Stream& stream(int32_t index) const { return streams_[index]; }
  const Stream& stream(int32_t layer, int32_t kv_head) const {
    return streams_[Index(layer, kv_head)];
  }
  // Highest position ever appended to the layer (admitted or not); -1 before the first Append.
  int32_t last_position(int32_t layer) const { return last_position_[layer]; }
  // Kernel views of a stream's segments, appended to `out` (scores stay writable: kernels
  // accumulate into them).
  void AppendViews(int32_t index, std::vector<SegmentView>& out);
  // The same into a caller-sized buffer: writes the views at out[0, count) and returns count, or
  // -1 (writing nothing) when the stream has more than `capacity` segments. Never allocates.
  int32_t WriteViews(int32_t index, SegmentView* out, int32_t capacity);

  // ---- Mutators -------------------------------------------------------------------------------

  // Append's commit: `positions.size()` = m new tokens at the end of stream `index`.
  //   open     non-null: a new segment of this format starts (the tail stays as it is);
  //            null: the tail segment grows (there must be one).
  //   pages    the grown segment's whole page list: its old pages (the last may be replaced by a
  //            copy-on-write copy) followed by the new ones; exactly ceil(length / tpp) pages.
  //   positions  ascending and greater than every position of the stream.
  //   modalities [m] Modality values.
  //   stored_keys [m, key_width] the keys as stored (dtype-rounded) when page summaries are on,
  //            null otherwise; folded into the summaries of the pages they land in.
  void ExtendTail(int32_t index, const SegmentFormat* open, std::vector<int32_t> pages,
                  std::span<const int32_t> positions, std::span<const uint8_t> modalities,
                  const float* stored_keys);
  // Apply's commit: stream `index` becomes `segments` (each non-empty, pages sized to its
  // length, summaries sized when on); returns the old segments, whose pages the caller releases.
  // The stream gets a new version.
  [[nodiscard]] std::vector<Segment> Replace(int32_t index, std::vector<Segment> segments);
  // Records that the layer's appends reached `position` (> the previous value).
  void AdvancePosition(int32_t layer, int32_t position);
  // Adds delta[t] to token t's score accumulator ([length] values).
  void AddScores(int32_t index, std::span<const float> delta);
  // A copy sharing every page (the caller adds the page references), fresh versions.
  [[nodiscard]] StreamTable ForkCopy() const;
  // Every segment of every stream, leaving the table without streams.
  [[nodiscard]] std::vector<Segment> TakeAll();

 private:
  std::vector<Stream> streams_;         // [num_layers * num_kv_heads]
  std::vector<int32_t> last_position_;  // [num_layers]
  int32_t num_kv_heads_ = 0;
  bool page_summaries_ = false;
};

}  // namespace kvcache::internal

#endif  // KVCACHE_SRC_STREAM_TABLE_H_
