// cpu/attention_common.h — small helpers the reference and fast CPU attention kernels share
// (internal to the CPU backend).
//
// Both kernels must agree bit-for-bit on the conventions below (softmax scale, how G query-head
// probabilities combine into one token score), so they are written once.
//
// Example:
//   const float scale = kvcache::cpu::ResolveScale(params.scale, kv.head_dim);  // 1/sqrt(D) if 0
//   float score = kvcache::cpu::AggregateGqa(probs, G, GqaAggregation::kMean);   // probs [G]
#ifndef KVCACHE_CPU_ATTENTION_COMMON_H_
#define KVCACHE_CPU_ATTENTION_COMMON_H_

#include <cmath>
#include <cstdint>

#include "kvcache/backend.h"
#include "kvcache/internal/attention_math.h"

namespace kvcache::cpu {

// One definition for every backend (internal/attention_math.h).
using ::kvcache::ResolveScale;

// probs [group_size] (element g at probs[g * stride]) -> one score per ALGORITHMS.md.
inline float AggregateGqa(const float* probs, int64_t stride, int32_t group_size,
                          GqaAggregation aggregation) {
  if (aggregation == GqaAggregation::kMax) {
    float m = probs[0];
    for (int32_t g = 1; g < group_size; ++g) m = probs[g * stride] > m ? probs[g * stride] : m;
    return m;
  }
  float sum = 0.0f;
  for (int32_t g = 0; g < group_size; ++g) sum += probs[g * stride];
  return aggregation == GqaAggregation::kSum ? sum : sum / static_cast<float>(group_size);
}

// Number of tokens in stream i (sum of its segments' lengths).
inline int64_t StreamLength(const PagedKVView& kv, int32_t stream) {
  int64_t n = 0;
  for (int32_t s = kv.stream_segment_offsets[stream]; s < kv.stream_segment_offsets[stream + 1];
       ++s) {
    n += kv.segments[s].length;
  }
  return n;
}

}  // namespace kvcache::cpu

#endif  // KVCACHE_CPU_ATTENTION_COMMON_H_
