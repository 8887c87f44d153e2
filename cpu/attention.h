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

// Benchmarking hook: how many pages of a stream ahead the fast decode kernel prefetches whole
// (every line of their key and value rows), 0 = none (then only the head of the next block is
// prefetched, the default). Measured on the 2-vCPU AMD EPYC (Zen 1) VM: the kernel is
// compute-bound there, a cold step already costs about its compute, and 1-8 pages ahead only add
// 5-15% CPU (docs/BENCHMARKS.md, "Prefetch distance"), so the default stays 0; bench_decode_cold
// sweeps it for machines where memory, not compute, is the limit. Returns the previous value.
// Process-wide, like LimitKernelIsa; negative values count as 0.
int SetDecodePrefetchPages(int pages);
int DecodePrefetchPages();

}  // namespace kvcache::cpu

#endif  // KVCACHE_CPU_ATTENTION_H_
