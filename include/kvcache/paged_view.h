// kvcache/paged_view.h — the plain-data view of paged K/V that every kernel reads.
//
// A stream (sequence, layer, kv head) is an ordered list of segments; each segment is a run of
// tokens with one row format stored in pool pages. Inside a page of `tokens_per_page` rows:
//   keys   [tokens_per_page, key_width]    at byte offset 0
//   values [tokens_per_page, value_width]  at byte offset tokens_per_page * key_width * esize
// Token t of a segment lives in page pages[t / tokens_per_page], row t % tokens_per_page.
// These structs hold raw pointers only, so host code, the CPU backend and CUDA kernels share them
// (the CUDA backend mirrors the arrays to device memory). They never own anything.
//
// Example (host):
//   const SegmentView& s = view.segments[view.stream_segment_offsets[i]];
//   const void* k = SegmentKeyRow(view.pool, s, /*token=*/5);   // key_width elements of dtype
#ifndef KVCACHE_PAGED_VIEW_H_
#define KVCACHE_PAGED_VIEW_H_

#include <cstdint>

#include "kvcache/dtype.h"
#include "kvcache/macros.h"

namespace kvcache {

// The pool's memory as kernels see it.
struct PoolView {
  uint8_t* base = nullptr;  // [num_pages * page_bytes]
  int64_t page_bytes = 0;
  int32_t num_pages = 0;
  DType dtype = DType::kF16;
};

// One run of tokens with one row format.
struct SegmentView {
  const int32_t* pages = nullptr;         // [ceil(length / tokens_per_page)] page ids
  const int32_t* key_channels = nullptr;  // [key_width] stored channels (ascending) or nullptr
                                          // when key_width == head_dim (all channels, in order)
  const int32_t* positions = nullptr;     // [length] original token positions (ascending)
  const uint8_t* modalities = nullptr;    // [length] Modality values
  float* scores = nullptr;                // [length] score accumulators (written by kernels)
  int32_t length = 0;
  int32_t tokens_per_page = 0;
  int32_t key_width = 0;
  int32_t value_width = 0;
  // Quest page summaries (CacheConfig::page_summaries), host memory, nullptr when absent: per
  // page and STORED key channel, the min / max of the stored (dtype-rounded) keys of the page.
  const float* page_key_min = nullptr;  // [ceil(length / tokens_per_page), key_width]
  const float* page_key_max = nullptr;  // [ceil(length / tokens_per_page), key_width]
};

// Streams in CSR form: stream i owns segments [stream_segment_offsets[i], [i + 1]).
struct PagedKVView {
  PoolView pool;
  int32_t head_dim = 0;
  int32_t num_streams = 0;
  const int32_t* stream_segment_offsets = nullptr;  // [num_streams + 1]
  const SegmentView* segments = nullptr;            // [stream_segment_offsets[num_streams]]
  // The version of each stream (src/stream_table.h), or nullptr. Contract: two views that give
  // a stream the same version show the same segments, except that the later one may have grown:
  // the last segment may have more tokens and pages (and its previously last page may have been
  // replaced by a copy-on-write copy), and new segments may follow it. A backend that keeps
  // device copies of the page tables (the CUDA backend's view mirror) may rely on that; others
  // ignore it. nullptr: no such promise (the CUDA backend stages the whole view).
  const uint64_t* stream_versions = nullptr;  // [num_streams] or nullptr
};

KVC_HOST_DEVICE inline int64_t SegmentRowKeyOffset(const PoolView& pool, const SegmentView& s,
                                                   int32_t token) {
  const int32_t page = s.pages[token / s.tokens_per_page];
  const int32_t row = token % s.tokens_per_page;
  return static_cast<int64_t>(page) * pool.page_bytes +
         static_cast<int64_t>(row) * s.key_width * DTypeSize(pool.dtype);
}

KVC_HOST_DEVICE inline int64_t SegmentRowValueOffset(const PoolView& pool, const SegmentView& s,
                                                     int32_t token) {
  const int32_t page = s.pages[token / s.tokens_per_page];
  const int32_t row = token % s.tokens_per_page;
  const int64_t esize = DTypeSize(pool.dtype);
  return static_cast<int64_t>(page) * pool.page_bytes +
         static_cast<int64_t>(s.tokens_per_page) * s.key_width * esize +
         static_cast<int64_t>(row) * s.value_width * esize;
}

// Address of token's key row (key_width elements) and value row (value_width elements).
KVC_HOST_DEVICE inline uint8_t* SegmentKeyRow(const PoolView& pool, const SegmentView& s,
                                              int32_t token) {
  return pool.base + SegmentRowKeyOffset(pool, s, token);
}
KVC_HOST_DEVICE inline uint8_t* SegmentValueRow(const PoolView& pool, const SegmentView& s,
                                                int32_t token) {
  return pool.base + SegmentRowValueOffset(pool, s, token);
}

// Tokens per page for a row format: floor(page_bytes / row_bytes).
KVC_HOST_DEVICE inline int32_t TokensPerPage(int64_t page_bytes, int32_t key_width,
                                             int32_t value_width, DType dtype) {
  return static_cast<int32_t>(page_bytes /
                              (static_cast<int64_t>(key_width + value_width) * DTypeSize(dtype)));
}

}  // namespace kvcache

#endif  // KVCACHE_PAGED_VIEW_H_
