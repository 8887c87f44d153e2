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

// The instruction sets the fast kernels have code for, in increasing order. The best one the CPU
// supports is picked at run time (AVX-512 > AVX2/FMA/F16C > portable), for decode and row scoring.
enum class KernelIsa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// Testing and benchmarking hook: the fast kernels use at most `cap` (a cap above what the CPU
// supports has no effect), so tests cover every code path on one machine. Returns the instruction
// set now in use. Process-wide; not meant to be changed while kernels run on other threads.
KernelIsa LimitKernelIsa(KernelIsa cap);
// Testing and benchmarking hook: how many pages of a stream ahead the fast decode kernel
// prefetches whole (key and value rows). -1 (the default): the tuned distance for the page size
// (DecodePrefetchPagesFor); 0: no page prefetch, only the head of the next block (the kernel
// before issue 18, kept as the benchmark baseline); k > 0: k pages. Returns the previous setting.
// Process-wide, like LimitKernelIsa.
int SetDecodePrefetchPages(int pages);
// The distance the kernel uses for pages of `page_bytes` bytes of K/V rows under the setting.
int DecodePrefetchPagesFor(int64_t page_bytes);

// The instruction set the fast kernels use now, and its name ("portable", "avx2", "avx512").
KernelIsa ActiveKernelIsa();
const char* KernelIsaName(KernelIsa isa);

}  // namespace kvcache::cpu

#endif  // KVCACHE_CPU_ATTENTION_H_
