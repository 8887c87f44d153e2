// src/page_summaries.h — Quest page-summary upkeep (internal to the Cache).
//
// With CacheConfig::page_summaries, every segment keeps per page and stored key channel the min
// and max of its stored (dtype-rounded) keys: [pages, key_width] each. Append folds the new keys
// in from host data (FoldKeys); Apply rebuilds the summaries of the new segments from a read-back
// of the gathered rows (RebuildSummaries), since merges and channel selection make a host
// re-derivation as complex as the gather itself.
//
// Example:
//   ResizeSummaries(segment);                                 // after pages were added
//   FoldKeys(segment, /*first_row=*/segment_length_before, m, stored_keys);   // [m, key_width]
#ifndef KVCACHE_SRC_PAGE_SUMMARIES_H_
#define KVCACHE_SRC_PAGE_SUMMARIES_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kvcache/backend.h"
#include "kvcache/cache.h"
#include "src/stream_table.h"

namespace kvcache::internal {

// Grows a segment's summaries to its page count (new pages start empty: +inf / -inf).
void ResizeSummaries(Segment& s);
// Folds `count` stored key rows (key_width values each, as stored) that occupy rows
// [first_row, first_row + count) of the segment into their pages' summaries.
void FoldKeys(Segment& s, int32_t first_row, int32_t count, const float* keys);
// Recomputes the summaries of a freshly gathered segment from its rows in the pool.
[[nodiscard]] absl::Status RebuildSummaries(Backend& backend, const PoolView& pool, Segment& s,
                                            int32_t head_dim);
// The summaries of a stream, page by page in token order (Cache::ReadPageSummaries).
std::vector<PageSummary> CollectSummaries(const Stream& stream);

}  // namespace kvcache::internal

#endif  // KVCACHE_SRC_PAGE_SUMMARIES_H_
