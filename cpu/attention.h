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

// Testing and benchmarking hook: when true, the fast kernels use their portable (baseline x86-64 /
// any ISA) code path even on a CPU with AVX2/FMA/F16C, so tests cover both paths on one machine.
void ForcePortableKernels(bool force);

}  // namespace kvcache::cpu

#endif  // KVCACHE_CPU_ATTENTION_H_
