// DotProducts: many DotProduct(a, row) at once, bit-identical to DotProduct.
//
// DotProduct (similarity.cc) sums d channels into 8 independent lanes in channel order, then
// reduces the lanes 0-3 += 4-7, 0-1 += 2-3, 0 += 1 and adds the scalar tail. One call is bound by
// the latency of its d/8 dependent adds; here R rows run side by side (one accumulator per row
// and lane), so the adds of different rows overlap. Every lane still sees the same products
// (rounded multiply, then rounded add: no FMA is enabled in any copy, so none is contracted) in
// the same order, so the results equal DotProduct's exactly — what lets callers mix the two.
#include <cstring>

#include "src/policy/similarity.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KVC_DOTS_MULTIVERSION 1
#else
#define KVC_DOTS_MULTIVERSION 0
#endif

namespace kvcache::policy {
namespace {

using V4 = float __attribute__((vector_size(16)));
using V8 = float __attribute__((vector_size(32)));

// Lanes 0-7 (as DotProduct's lanes[]) reduced as DotProduct reduces them, plus the tail.
inline float Reduce(const float lanes[8], float tail) {
  float l0 = lanes[0] + lanes[4], l1 = lanes[1] + lanes[5];
  const float l2 = lanes[2] + lanes[6], l3 = lanes[3] + lanes[7];
  l0 += l2;
  l1 += l3;
  l0 += l1;
  return l0 + tail;
}

inline float Tail(const float* a, const float* b, size_t c, size_t d) {
  float tail = 0.0f;
  for (; c < d; ++c) tail += a[c] * b[c];
  return tail;
}

// R rows at a time; V holds 4 or 8 lanes (two V4 or one V8 per row for DotProduct's 8 lanes).
template <typename V, int R>
inline void DotsBlock(const float* a, const float* const* rows, size_t d, float* out) {
  constexpr int kVec = static_cast<int>(sizeof(V) / sizeof(float));
  constexpr int kPer = 8 / kVec;  // vectors per row
  V acc[R][kPer];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 2
    for (int v = 0; v < kPer; ++v) acc[i][v] = V{};
  }
  size_t c = 0;
  for (; c + 8 <= d; c += 8) {
    V x[kPer];
#pragma GCC unroll 2
    for (int v = 0; v < kPer; ++v) std::memcpy(&x[v], a + c + v * kVec, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
#pragma GCC unroll 2
      for (int v = 0; v < kPer; ++v) {
        V y;
        std::memcpy(&y, rows[i] + c + v * kVec, sizeof(V));
        acc[i][v] += x[v] * y;
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    float lanes[8];
    for (int v = 0; v < kPer; ++v) std::memcpy(lanes + v * kVec, &acc[i][v], sizeof(V));
    out[i] = Reduce(lanes, Tail(a, rows[i], c, d));
  }
}

using BlockFn = void (*)(const float*, const float* const*, size_t, float*);
struct DotsKernel {
  BlockFn fn;
  int rows;  // 8 independent accumulators either way
};

void DotsBase(const float* a, const float* const* rows, size_t d, float* out) {
  DotsBlock<V4, 4>(a, rows, d, out);
}

#if KVC_DOTS_MULTIVERSION
// AVX2 without FMA: the same roundings as the SSE2 copy.
__attribute__((target("avx2"), flatten)) void DotsAvx2(const float* a, const float* const* rows,
                                                       size_t d, float* out) {
  DotsBlock<V8, 8>(a, rows, d, out);
}
#endif

DotsKernel PickDots() {
#if KVC_DOTS_MULTIVERSION
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (has_avx2 && GetSimilarityKernel() != SimilarityKernel::kPortable) return {DotsAvx2, 8};
#endif
  return {DotsBase, 4};
}

}  // namespace

void DotProducts(const float* a, const float* const* rows, int32_t count, size_t d, float* out) {
  const DotsKernel k = PickDots();
  int32_t i = 0;
  for (; i + k.rows <= count; i += k.rows) k.fn(a, rows + i, d, out + i);
  for (; i < count; ++i) out[i] = DotProduct(a, rows[i], d);
}

}  // namespace kvcache::policy
