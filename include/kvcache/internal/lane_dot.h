// kvcache/internal/lane_dot.h — the dot product every vectorised CPU loop shares (internal).
//
// Written so GCC's auto-vectoriser handles it without -ffast-math: kLanes independent partial
// sums (a single running sum is one serial chain of dependent adds, ~4 cycles an element), then a
// fixed pairwise tree over the lanes, then the tail. The summation order depends only on n and
// kLanes, so a result is deterministic and the same in every copy the compiler makes of the
// caller (portable, AVX2, AVX-512 targets). Decode and retrieval use 16 lanes (two AVX2
// registers); the similarity search keeps 8, the order its similarity is defined by.
//
// Example:
//   float s = kvcache::LaneDot<16>(q, k, head_dim);
#ifndef KVCACHE_INTERNAL_LANE_DOT_H_
#define KVCACHE_INTERNAL_LANE_DOT_H_

#include <cstdint>

namespace kvcache {

// sum_i a[i] * b[i] over i < n (a, b [n]).
template <int kLanes>
inline float LaneDot(const float* a, const float* b, int64_t n) {
  static_assert(kLanes > 0 && (kLanes & (kLanes - 1)) == 0, "a power of two");
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[i + j] * b[i + j];
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) lanes[j] += lanes[j + w];
  }
  return lanes[0] + tail;
}

}  // namespace kvcache

#endif  // KVCACHE_INTERNAL_LANE_DOT_H_
