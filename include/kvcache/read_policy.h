// kvcache/read_policy.h — query-aware sparse decode: which keys a decode step reads.
//
// Eviction forgets tokens forever; a read policy keeps every token but lets one decode step read
// only the ones likely to matter for its query (ALGORITHMS.md "Query-aware sparse decode"):
//   kDense      every token (the default; the decode path is exactly the plain one)
//   kQuest      per kv head, the pages with the largest upper bound of q.k (from per-page
//               min/max key summaries, CacheConfig::page_summaries), then exact softmax over the
//               selected pages' tokens; the stream's last page is always read
//   kRetrieval  IceFormer: per query head, the top_k keys by q.k found by nearest-neighbour
//               search (hnswlib, under the max-inner-product -> nearest-neighbour transform) or
//               by an exact scan (exact_search); softmax over the retrieved keys only
// The first `dense_first_layers` layers always decode densely. With score accumulation, only the
// tokens a step actually read get probability mass (unread tokens get nothing that step), and the
// returned lse is that of the tokens read.
//
// Example:
//   kvcache::DecodeOptions opts;
//   opts.read_policy.kind = kvcache::ReadPolicy::Kind::kQuest;
//   opts.read_policy.token_budget = 2048;       // about 1/16 of a 32k context
//   absl::Status s = cache->DecodeAttention(batch, layer, q, out, {}, opts);
#ifndef KVCACHE_READ_POLICY_H_
#define KVCACHE_READ_POLICY_H_

#include <cstdint>

namespace kvcache {

struct ReadPolicy {
  enum class Kind : uint8_t { kDense = 0, kQuest = 1, kRetrieval = 2 };
  Kind kind = Kind::kDense;
  // Layers [0, dense_first_layers) decode densely whatever the kind (ALGORITHMS.md: 2).
  int32_t dense_first_layers = 2;

  // Quest: tokens read per stream. Pages are taken in decreasing bound order until they hold at
  // least token_budget tokens, and never fewer than 3 pages (or all of them); the last page of
  // the stream is always among them. Must be > 0 for kQuest.
  int32_t token_budget = 0;

  // Retrieval: keys retrieved per query head (> 0). With top_k >= stream length every key is read.
  int32_t top_k = 32;
  // true: exact blocked scan over every key (the baseline and oracle; no index is built).
  // false: the per-stream hnswlib index, built on the first retrieval decode of a stream and
  // kept up to date by Append (see docs/SPARSE_DECODE.md).
  bool exact_search = false;
  // hnswlib search beam (ef); 0 means max(top_k, 64). Larger is slower and closer to exact.
  int32_t ef_search = 0;
  // Also always read the first sink_tokens and the last recent_tokens tokens of the stream
  // (>= 0; default 0 = ALGORITHMS.md's retrieved set only). A documented variant: isolated
  // attention sinks are what graph search misses most (docs/SPARSE_DECODE.md).
  int32_t sink_tokens = 0;
  int32_t recent_tokens = 0;
  // hnswlib graph degree M and construction beam, used when an index is (re)built.
  int32_t index_m = 16;
  int32_t index_ef_construction = 100;
};

}  // namespace kvcache

#endif  // KVCACHE_READ_POLICY_H_
