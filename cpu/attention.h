// cpu/attention.h — CPU attention kernels over the paged layout (internal).
//
// Contracts are those of Backend::DecodeAttention and Backend::ScoreRows (kvcache/backend.h);
// inputs are already validated by the caller (shapes, stream counts). The reference versions
// are plain scalar loops kept as the test oracle; the fast versions parallelise with oneTBB and
// vectorise their inner loops.
#ifndef KVCACHE_CPU_ATTENTION_H_
#define KVCACHE_CPU_ATTENTION_H_

#include <cstdint>

#include "absl/status/status.h"
#include "kvcache/backend.h"
#include "kvcache/internal/kernel_isa.h"
#include "kvcache/paged_view.h"

namespace kvcache::cpu {

absl::Status DecodeAttentionReference(const PagedKVView& kv, const DecodeParams& params,
                                      const float* q, float* out, float* lse);
absl::Status DecodeAttentionFast(const PagedKVView& kv, const DecodeParams& params,
                                 const float* q, float* out, float* lse);

absl::Status ScoreRowsReference(const PagedKVView& kv, const ScoreRowsParams& params,
                                const float* queries, const int32_t* query_positions,
                                float* token_scores, int64_t* below_threshold,
                                int64_t* causal_entries);
absl::Status ScoreRowsFast(const PagedKVView& kv, const ScoreRowsParams& params,
                           const float* queries, const int32_t* query_positions,
                           float* token_scores, int64_t* below_threshold,
                           int64_t* causal_entries);
// Benchmark baseline only: ScoreRowsFast as it was before register blocking (one horizontally
// reduced dot product per (row, head) x key, scalar softmax pass). Same contract and results.
absl::Status ScoreRowsFastPairwise(const PagedKVView& kv, const ScoreRowsParams& params,
                                   const float* queries, const int32_t* query_positions,
                                   float* token_scores, int64_t* below_threshold,
                                   int64_t* causal_entries);

// KernelIsa, LimitKernelIsa, ActiveKernelIsa, KernelIsaName: kvcache/internal/kernel_isa.h (one
// detection and one cap for every CPU kernel).

// Testing and benchmarking hook: how many pages of a stream ahead the fast decode kernel
// prefetches whole (key and value rows). -1 (the default): the tuned distance for the page size
// (DecodePrefetchPagesFor); 0: no page prefetch, only the head of the next block (the kernel
// before issue 18, kept as the benchmark baseline); k > 0: k pages. Returns the previous setting.
// Process-wide, like LimitKernelIsa.
int SetDecodePrefetchPages(int pages);
// The distance the kernel uses for pages of `page_bytes` bytes of K/V rows under the setting.
int DecodePrefetchPagesFor(int64_t page_bytes);

}  // namespace kvcache::cpu

#endif  // KVCACHE_CPU_ATTENTION_H_
