// cpu/sparse_decode.h — query-aware sparse decode on the CPU (internal): Quest page selection
// and IceFormer retrieval attention (ALGORITHMS.md "Query-aware sparse decode", read_policy.h).
//
// Quest selects pages per stream from the page summaries of the view, builds a sub-view of the
// selected pages (runs of consecutive pages become sub-segments that point into the original
// arrays, so positions and score accumulators stay in place) and runs the ordinary dense kernel
// over it. Retrieval finds the top_k keys of each query head (hnswlib index or exact scan) and
// runs an exact softmax over them.
//
// Example:
//   DecodeParams p; p.group_size = 4; p.read_policy.kind = ReadPolicy::Kind::kQuest;
//   p.read_policy.token_budget = 2048;
//   absl::Status s = kvcache::cpu::SparseDecodeAttention(view, p, q, out, lse,
//                                                        kvcache::cpu::DecodeAttentionFast);
#ifndef KVCACHE_CPU_SPARSE_DECODE_H_
#define KVCACHE_CPU_SPARSE_DECODE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvcache/backend.h"
#include "kvcache/paged_view.h"

namespace kvcache::cpu {

using DenseDecodeFn = absl::Status (*)(const PagedKVView& kv, const DecodeParams& params,
                                       const float* q, float* out, float* lse);

// Decode under params.read_policy (kQuest or kRetrieval); `dense` runs the attention over the
// selected pages (Quest). Shapes as Backend::DecodeAttention.
absl::Status SparseDecodeAttention(const PagedKVView& kv, const DecodeParams& params,
                                   const float* q, float* out, float* lse, DenseDecodeFn dense);

// Quest page bounds of one segment: bounds[p] = max over the G heads of
// sum over stored channels i of max(q_g[ch_i] * min[p, i], q_g[ch_i] * max[p, i]).
// q [G, head_dim] (unscaled); bounds [ceil(length / tokens_per_page)]. Needs the summaries.
void QuestPageBounds(const SegmentView& s, const float* q, int32_t group, int32_t head_dim,
                     float* bounds);

// Quest's selection for one stream: indices of the selected pages in the stream's page order
// (segment by segment), ascending. page_tokens[p] = tokens in page p, bounds[p] its bound.
std::vector<int32_t> QuestSelectPages(const std::vector<float>& bounds,
                                      const std::vector<int32_t>& page_tokens,
                                      int32_t token_budget);

// IceFormer's maximum-inner-product -> nearest-neighbour transform (ALGORITHMS.md):
//   T_K(k) = [k / c ; sqrt(1 - |k|^2 / c^2)]   (c >= every |k|)       out [head_dim + 1]
//   T_Q(q) = [q / |q| ; 0]                      (q = 0 stays 0)        out [head_dim + 1]
// so |T_Q(q) - T_K(k)|^2 = 2 - 2 q.k / (|q| c) ranks keys exactly as q.k does.
void MipsTransformKey(const float* k, int32_t head_dim, float c, float* out);
void MipsTransformQuery(const float* q, int32_t head_dim, float* out);

// The hnswlib-backed KeyIndex (cpu/key_index_hnsw.cc, the one file that includes hnswlib).
absl::StatusOr<std::unique_ptr<KeyIndex>> CreateHnswKeyIndex(const KeyIndexParams& params);

}  // namespace kvcache::cpu

#endif  // KVCACHE_CPU_SPARSE_DECODE_H_
