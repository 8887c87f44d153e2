// Fast CPU attention kernels over the paged layout.
//
// Decode: the work is cut into tasks (stream, key split) — one stream is (sequence, kv head) —
// so batch 1 at 32k tokens still feeds every core; oneTBB runs the tasks and their partial
// softmax states are merged with the log-sum-exp merge of attention_math.h. Inside a task the G
// query heads of the kv head share every K/V row. Tokens are processed in blocks of up to kBlock
// rows that are contiguous in one page: logits of the block first, one rescale of the
// accumulators per block, a vectorised exp over the block, then the value pass. On AVX2 and
// AVX-512 the logit and value passes are register-tiled (cpu/simd_decode.inc): stored f16/bf16
// rows are converted in registers as they are loaded, each converted key chunk feeds the FMAs of
// several rows x heads, and the [heads x channels] value accumulators stay in registers across
// the block. The head of the next block's rows is software-prefetched: pages sit anywhere in the
// pool, so the hardware prefetcher cannot cross from one page to the next on its own.
//
// Score accumulation costs a second pass over the logits only (never over K/V): with
// accumulate_scores the kernel writes the logits into a per-call scratch [G, tokens] instead of a
// block buffer, and once every stream's global max and denominator are known, a parallel pass
// turns them into probabilities and adds the GQA aggregate to the segment score accumulators.
//
// Row scoring (ScoreRows, prefill-time policies): tasks are (stream, block of rows); all the
// (row, head) query vectors of a task go against each tile of 16 keys in register tiles (a small
// GEMM, see RunRowTask), then a vectorised masked softmax and GQA aggregation per row.
//
// Vectorisation without -march=native (KVCACHE_NATIVE=OFF, the default): every inner loop is
// written so GCC's auto-vectoriser handles it without -ffast-math (dot products, maxima and sums
// keep kLanes independent partials; f16 -> f32 and exp are branchless bit manipulation). On
// x86-64 the task functions are compiled three times — baseline SSE2, target("avx2,fma,f16c") and
// target("avx512f,avx512bw,avx512vl,avx512dq,...") with `flatten`, so the whole task body is
// re-generated for each — and the best copy the CPU supports is picked at run time
// (LimitKernelIsa caps it for tests and benchmarks; see docs/BENCHMARKS.md for what each buys).
// Row scoring uses its AVX2 intrinsics (Avx2Ops: F16C conversion, register-tiled logits, masked
// softmax), with 512-bit logit tiles on AVX-512 (Avx512RowOps); PortableOps is the same
// arithmetic in plain loops. (The pairwise benchmark baseline stays AVX2 / portable.)

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/attention.h"
#include "cpu/attention_common.h"
#include "cpu/convert.h"
#include "kvcache/internal/attention_math.h"
#include "kvcache/internal/lane_dot.h"
#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/parallel_for.h"
#include "oneapi/tbb/task_arena.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KVC_CPU_MULTIVERSION 1
#define KVC_TARGET_AVX2 __attribute__((target("avx2,fma,f16c"), flatten))
#define KVC_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"), flatten))
#define KVC_TARGET_BASE __attribute__((flatten))
#else
#define KVC_CPU_MULTIVERSION 0
#define KVC_TARGET_BASE
#endif

namespace kvcache::cpu {
namespace {

constexpr int kLanes = 16;          // independent partial sums in a dot product (2 AVX2 vectors)
constexpr int kBlock = 32;          // tokens per inner block (logits, exp, then values)
constexpr int64_t kMinSplit = 512;  // smallest key split worth a task of its own
constexpr int kKeyTile = 16;        // keys per register tile of row scoring (2 AVX2 vectors)

// ---- Vectorisable scalar building blocks ------------------------------------------------------

// e^x for x <= 0 (the only inputs softmax produces after subtracting the running max): Cephes
// range reduction x = k ln2 + r, degree-6 polynomial, 2^k by exponent bits; < 2 ulp against
// std::exp. Inputs below -87 (and -inf) give ~1e-38 — a probability of 0 for every practical
// purpose. The clamp compares the float's bits as an unsigned integer (for negative floats a
// larger magnitude is a larger pattern): a float compare could trap under GCC's default
// -ftrapping-math, which stops the vectoriser from turning it into a select.
inline float ExpNonPositive(float x) {
  constexpr uint32_t kMinus87 = 0xC2AE0000u;  // bits of -87.0f
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  x = std::bit_cast<float>(bits > kMinus87 ? kMinus87 : bits);
  const float shifted = x * 1.44269504088896341f + 12582912.0f;  // round-to-nearest trick
  const float k = shifted - 12582912.0f;
  const int32_t ki = static_cast<int32_t>(std::bit_cast<uint32_t>(shifted)) - 0x4B400000;
  const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>(static_cast<uint32_t>(ki + 127) << 23);
}

inline void ExpShifted(const float* x, float shift, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = ExpNonPositive(x[i] - shift);
}

inline float Dot(const float* a, const float* b, int n) { return LaneDot<kLanes>(a, b, n); }

// Max / sum of x[0, n) with kLanes independent partial results, so GCC vectorises them without
// -ffast-math (a plain running max or sum is a serial dependency chain: ~4 cycles an element).
// NaN entries are skipped by the max. The sum order is fixed, so results are deterministic.
inline float MaxOf(const float* x, int n) {
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, -INFINITY);
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] = x[i + j] > lanes[j] ? x[i + j] : lanes[j];
  }
  for (; i < n; ++i) lanes[0] = x[i] > lanes[0] ? x[i] : lanes[0];
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) lanes[j] = lanes[j + w] > lanes[j] ? lanes[j + w] : lanes[j];
  }
  return lanes[0];
}

inline float SumOf(const float* x, int n) {
  float lanes[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += x[i + j];
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += x[i];
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) lanes[j] += lanes[j + w];
  }
  return lanes[0] + tail;
}

inline void Axpy(float alpha, const float* x, int n, float* y) {
  for (int i = 0; i < n; ++i) y[i] += alpha * x[i];
}

inline void Scale(float alpha, int n, float* y) {
  for (int i = 0; i < n; ++i) y[i] *= alpha;
}

// ---- Block kernels: portable loops, and AVX2/F16C intrinsics selected at run time ------------
//
// A block is nb <= kBlock consecutive rows of one page: keys [nb, kw] and values [nb, vw] are
// each contiguous, so a whole block converts to f32 in one loop.

struct PortableOps {
  static void HalfToFloatBlock(const uint16_t* src, int64_t n, float* dst) {
    LoadRow<DType::kF16>(src, n, dst);
  }
  // logits[g * lstride + j] = q[g] . k[j] for the G heads and nb rows of the block.
  static void BlockLogits(const float* q, int group, const float* k, int nb, int kw, float* logits,
                          int64_t lstride) {
    for (int j = 0; j < nb; ++j) {
      for (int g = 0; g < group; ++g) {
        logits[g * lstride + j] = Dot(q + static_cast<int64_t>(g) * kw, k + int64_t{j} * kw, kw);
      }
    }
  }
  // acc[g] += sum_j probs[g * kBlock + j] * v[j] for the G heads.
  static void BlockAccumulate(const float* probs, int group, const float* v, int nb, int vw,
                              float* acc, int d) {
    for (int j = 0; j < nb; ++j) {
      for (int g = 0; g < group; ++g) {
        Axpy(probs[g * kBlock + j], v + int64_t{j} * vw, vw, acc + int64_t{g} * d);
      }
    }
  }

  // ---- Row scoring (see RunRowTask) ----
  // logits[h * stride + j] = q[h] . k[j] for every query vector h < heads and the nb <= kKeyTile
  // keys of a tile; kt [kw, kKeyTile] is the tile transposed (columns >= nb are zero), so the
  // innermost loop runs over keys with independent sums and needs no horizontal reduction.
  static void TileLogits(const float* q, int64_t heads, const float* kt, int kw, int nb,
                         float* logits, int64_t stride) {
    constexpr int kRows = 4;
    for (int64_t h = 0; h < heads; h += kRows) {
      const int nq = static_cast<int>(std::min<int64_t>(kRows, heads - h));
      float acc[kRows][kKeyTile] = {};
      const float* qr[kRows];
      // Rows past the end repeat the last one (computed, not stored) so the loop shape is fixed.
      for (int i = 0; i < kRows; ++i) qr[i] = q + (h + std::min(i, nq - 1)) * kw;
      for (int c = 0; c < kw; ++c) {
        const float* kc = kt + c * kKeyTile;
        for (int i = 0; i < kRows; ++i) {
          const float qv = qr[i][c];
          for (int j = 0; j < kKeyTile; ++j) acc[i][j] += qv * kc[j];
        }
      }
      for (int i = 0; i < nq; ++i) {
        std::copy(acc[i], acc[i] + nb, logits + (h + i) * stride);
      }
    }
  }
  // In place: lg [n] logits -> softmax probabilities over the entries whose mask is all-ones
  // (0 elsewhere). Returns the number of visible entries below sparsity * the row's max
  // probability. At least one entry must be visible.
  static int64_t SoftmaxRow(float* lg, const uint32_t* mask, int64_t n, float sparsity) {
    float m = -INFINITY;
    for (int64_t t = 0; t < n; ++t) {
      if (mask[t] != 0) m = std::fmax(m, lg[t]);
    }
    float l = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
      const float e = mask[t] != 0 ? ExpNonPositive(lg[t] - m) : 0.0f;
      l += e;
      lg[t] = e;
    }
    const float inv = 1.0f / l;
    float row_max = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
      lg[t] *= inv;
      row_max = std::fmax(row_max, lg[t]);
    }
    const float threshold = sparsity * row_max;
    int64_t below = 0;
    for (int64_t t = 0; t < n; ++t) below += mask[t] != 0 && lg[t] < threshold;
    return below;
  }
  // scores[t] += aggregate over g of probs[g * n + t] (probs [G, n]; invisible entries are 0
  // in every head, so they add exactly 0).
  static void AggregateRow(const float* probs, int64_t n, int group, GqaAggregation aggregation,
                           float* scores) {
    for (int64_t t = 0; t < n; ++t) scores[t] += AggregateGqa(probs + t, n, group, aggregation);
  }
};

#if KVC_CPU_MULTIVERSION
#define KVC_AVX2_INLINE __attribute__((target("avx2,fma,f16c"))) static inline

struct Avx2Ops {
  KVC_AVX2_INLINE void HalfToFloatBlock(const uint16_t* src, int64_t n, float* dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; ++i) dst[i] = HalfBitsToFloatFast(src[i]);
  }
  KVC_AVX2_INLINE float HorizontalSum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
  // ---- Row scoring ----
  // A 6 x 16 register tile: per key channel, two loads of the transposed tile and six
  // broadcasts feed twelve FMAs into twelve accumulators (6 query vectors x 16 keys).
  template <int kRows>
  KVC_AVX2_INLINE void TileRowsLogits(const float* q, int kw, const float* kt, int nb,
                                      float* logits, int64_t stride) {
    __m256 lo[kRows], hi[kRows];
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) lo[i] = hi[i] = _mm256_setzero_ps();
    for (int c = 0; c < kw; ++c) {
      const __m256 k0 = _mm256_loadu_ps(kt + c * kKeyTile);
      const __m256 k1 = _mm256_loadu_ps(kt + c * kKeyTile + 8);
#pragma GCC unroll 8
      for (int i = 0; i < kRows; ++i) {
        const __m256 b = _mm256_broadcast_ss(q + int64_t{i} * kw + c);
        lo[i] = _mm256_fmadd_ps(b, k0, lo[i]);
        hi[i] = _mm256_fmadd_ps(b, k1, hi[i]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
      float* out = logits + i * stride;
      if (nb == kKeyTile) {
        _mm256_storeu_ps(out, lo[i]);
        _mm256_storeu_ps(out + 8, hi[i]);
      } else {
        alignas(32) float tmp[kKeyTile];
        _mm256_store_ps(tmp, lo[i]);
        _mm256_store_ps(tmp + 8, hi[i]);
        std::copy(tmp, tmp + nb, out);
      }
    }
  }
  KVC_AVX2_INLINE void TileLogits(const float* q, int64_t heads, const float* kt, int kw, int nb,
                                  float* logits, int64_t stride) {
    int64_t h = 0;
    for (; h + 6 <= heads; h += 6) TileRowsLogits<6>(q + h * kw, kw, kt, nb, logits + h * stride, stride);
    const float* qh = q + h * kw;
    float* lh = logits + h * stride;
    switch (heads - h) {
      case 5: TileRowsLogits<5>(qh, kw, kt, nb, lh, stride); break;
      case 4: TileRowsLogits<4>(qh, kw, kt, nb, lh, stride); break;
      case 3: TileRowsLogits<3>(qh, kw, kt, nb, lh, stride); break;
      case 2: TileRowsLogits<2>(qh, kw, kt, nb, lh, stride); break;
      case 1: TileRowsLogits<1>(qh, kw, kt, nb, lh, stride); break;
      default: break;
    }
  }
  // ExpNonPositive on 8 lanes (same reduction and polynomial; FMA changes the last bit at most).
  KVC_AVX2_INLINE __m256 ExpNonPositive8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 shifted = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                         _mm256_set1_ps(12582912.0f));
    const __m256 k = _mm256_sub_ps(shifted, _mm256_set1_ps(12582912.0f));
    const __m256i ki = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(0x4B400000));
    const __m256 r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(k, _mm256_set1_ps(0.693359375f))),
                                   _mm256_mul_ps(k, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    const __m256 two_k = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(ki, _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(p, two_k);
  }
  KVC_AVX2_INLINE float HorizontalMax(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
  KVC_AVX2_INLINE int64_t SoftmaxRow(float* lg, const uint32_t* mask, int64_t n, float sparsity) {
    const int64_t n8 = n & ~int64_t{7};
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n8; t += 8) {
      const __m256 visible = _mm256_castsi256_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask + t)));
      mx = _mm256_max_ps(mx, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(lg + t),
                                              visible));
    }
    float m = HorizontalMax(mx);
    for (int64_t t = n8; t < n; ++t) {
      if (mask[t] != 0) m = std::fmax(m, lg[t]);
    }
    const __m256 shift = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps(), emax = _mm256_setzero_ps();
    for (int64_t t = 0; t < n8; t += 8) {
      const __m256 visible = _mm256_castsi256_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask + t)));
      const __m256 e = _mm256_and_ps(
          ExpNonPositive8(_mm256_sub_ps(_mm256_loadu_ps(lg + t), shift)), visible);
      sum = _mm256_add_ps(sum, e);
      emax = _mm256_max_ps(emax, e);
      _mm256_storeu_ps(lg + t, e);
    }
    float l = HorizontalSum(sum), e_max = HorizontalMax(emax);
    for (int64_t t = n8; t < n; ++t) {
      const float e = mask[t] != 0 ? ExpNonPositive(lg[t] - m) : 0.0f;
      l += e;
      e_max = std::fmax(e_max, e);
      lg[t] = e;
    }
    const float inv = 1.0f / l;
    // Rounding is monotonic, so the largest probability is the largest weight times inv.
    const float threshold = sparsity * (e_max * inv);
    const __m256 vinv = _mm256_set1_ps(inv), vthreshold = _mm256_set1_ps(threshold);
    int64_t below = 0;
    for (int64_t t = 0; t < n8; t += 8) {
      const __m256 visible = _mm256_castsi256_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask + t)));
      const __m256 p = _mm256_mul_ps(_mm256_loadu_ps(lg + t), vinv);
      _mm256_storeu_ps(lg + t, p);
      const __m256 low = _mm256_and_ps(_mm256_cmp_ps(p, vthreshold, _CMP_LT_OQ), visible);
      below += std::popcount(static_cast<uint32_t>(_mm256_movemask_ps(low)));
    }
    for (int64_t t = n8; t < n; ++t) {
      lg[t] *= inv;
      below += mask[t] != 0 && lg[t] < threshold;
    }
    return below;
  }
  KVC_AVX2_INLINE void AggregateRow(const float* probs, int64_t n, int group,
                                    GqaAggregation aggregation, float* scores) {
    const int64_t n8 = n & ~int64_t{7};
    const bool take_max = aggregation == GqaAggregation::kMax;
    const __m256 vgroup = _mm256_set1_ps(static_cast<float>(group));
    for (int64_t t = 0; t < n8; t += 8) {
      __m256 a = _mm256_loadu_ps(probs + t);
      for (int g = 1; g < group; ++g) {
        const __m256 x = _mm256_loadu_ps(probs + int64_t{g} * n + t);
        a = take_max ? _mm256_max_ps(x, a) : _mm256_add_ps(a, x);
      }
      if (aggregation == GqaAggregation::kMean) a = _mm256_div_ps(a, vgroup);
      _mm256_storeu_ps(scores + t, _mm256_add_ps(_mm256_loadu_ps(scores + t), a));
    }
    for (int64_t t = n8; t < n; ++t) scores[t] += AggregateGqa(probs + t, n, group, aggregation);
  }
};

// Row scoring on AVX-512: the logit tiles of Avx2Ops twice as wide per FMA — 12 query vectors x
// the 16 keys of a tile, one zmm accumulator each (per channel: one load of the transposed tile,
// 12 broadcasts, 12 FMAs). The softmax and aggregation passes are Avx2Ops's.
#define KVC_AVX512_INLINE \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))) static inline

struct Avx512RowOps : Avx2Ops {
  template <int kRows>
  KVC_AVX512_INLINE void TileRowsLogits512(const float* q, int kw, const float* kt, int nb,
                                           float* logits, int64_t stride) {
    static_assert(kKeyTile == 16, "one zmm register per tile row");
    __m512 acc[kRows];
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) acc[i] = _mm512_setzero_ps();
    for (int c = 0; c < kw; ++c) {
      const __m512 k = _mm512_loadu_ps(kt + c * kKeyTile);
#pragma GCC unroll 16
      for (int i = 0; i < kRows; ++i) {
        acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[int64_t{i} * kw + c]), k, acc[i]);
      }
    }
    const __mmask16 valid = static_cast<__mmask16>((1u << nb) - 1u);
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) _mm512_mask_storeu_ps(logits + i * stride, valid, acc[i]);
  }
  KVC_AVX512_INLINE void TileLogits(const float* q, int64_t heads, const float* kt, int kw, int nb,
                                    float* logits, int64_t stride) {
    int64_t h = 0;
    for (; h + 12 <= heads; h += 12) {
      TileRowsLogits512<12>(q + h * kw, kw, kt, nb, logits + h * stride, stride);
    }
    const float* qh = q + h * kw;
    float* lh = logits + h * stride;
    const int64_t rest = heads - h;
    if (rest >= 8) {
      TileRowsLogits512<8>(qh, kw, kt, nb, lh, stride);
      qh += 8 * kw;
      lh += 8 * stride;
    }
    switch (rest & 7) {
      case 7: TileRowsLogits512<7>(qh, kw, kt, nb, lh, stride); break;
      case 6: TileRowsLogits512<6>(qh, kw, kt, nb, lh, stride); break;
      case 5: TileRowsLogits512<5>(qh, kw, kt, nb, lh, stride); break;
      case 4: TileRowsLogits512<4>(qh, kw, kt, nb, lh, stride); break;
      case 3: TileRowsLogits512<3>(qh, kw, kt, nb, lh, stride); break;
      case 2: TileRowsLogits512<2>(qh, kw, kt, nb, lh, stride); break;
      case 1: TileRowsLogits512<1>(qh, kw, kt, nb, lh, stride); break;
      default: break;
    }
  }
};
#endif

// nb contiguous rows of `width` elements as f32: f32 rows are used in place, f16/bf16 rows are
// converted into `buffer` [nb * width].
template <DType kT, typename Ops>
inline const float* BlockAsFloat(const uint8_t* rows, int64_t elements, float* buffer) {
  if constexpr (kT == DType::kF32) {
    return reinterpret_cast<const float*>(rows);
  } else if constexpr (kT == DType::kF16) {
    Ops::HalfToFloatBlock(reinterpret_cast<const uint16_t*>(rows), elements, buffer);
    return buffer;
  } else {
    LoadRow<DType::kBF16>(rows, elements, buffer);
    return buffer;
  }
}

// ---- Decode block kernels ----------------------------------------------------------------------
//
// The block interface of RunDecodeTask: BlockLogits / BlockAccumulate take the block's rows in
// their stored dtype. The portable flavour converts a block into a buffer and runs plain loops;
// the AVX2 and AVX-512 flavours are cpu/simd_decode.inc compiled for each instruction set.

struct PortableDecodeOps {
  static float MaxOf(const float* x, int n) { return cpu::MaxOf(x, n); }
  static float SumOf(const float* x, int n) { return cpu::SumOf(x, n); }
  template <DType kT>
  static void BlockLogits(const float* q, int group, const uint8_t* keys, int nb, int kw,
                          float* logits, int64_t lstride, float* buffer) {
    const float* k = BlockAsFloat<kT, PortableOps>(keys, int64_t{nb} * kw, buffer);
    PortableOps::BlockLogits(q, group, k, nb, kw, logits, lstride);
  }
  template <DType kT>
  static void BlockAccumulate(const float* probs, int group, const uint8_t* values, int nb, int vw,
                              float* acc, int d, float* buffer) {
    const float* v = BlockAsFloat<kT, PortableOps>(values, int64_t{nb} * vw, buffer);
    PortableOps::BlockAccumulate(probs, group, v, nb, vw, acc, d);
  }
};

#if KVC_CPU_MULTIVERSION
namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
struct V {
  using Reg = __m256;
  static constexpr int kWidth = 8;
  static constexpr int kLogitTile = 8;       // 16 ymm registers: 8 accumulators + keys + query
  static constexpr int kAccumulateTile = 8;  // 8 accumulators + values + a broadcast
  static constexpr int kMaxHeads = 4;
  static Reg Zero() { return _mm256_setzero_ps(); }
  static Reg Set1(float x) { return _mm256_set1_ps(x); }
  static Reg LoadF32(const float* p) { return _mm256_loadu_ps(p); }
  static void StoreF32(float* p, Reg r) { _mm256_storeu_ps(p, r); }
  static Reg Fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg Add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static Reg Max(Reg x, Reg m) { return _mm256_max_ps(x, m); }  // x > m ? x : m (NaN x: m)
  static float ReduceMax(Reg v) { return Avx2Ops::HorizontalMax(v); }
  template <DType kT>
  static Reg Load(const uint8_t* p) {
    if constexpr (kT == DType::kF32) {
      return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
    } else if constexpr (kT == DType::kF16) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    } else {  // bf16: the top half of an f32
      const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
  }
  template <DType kT>
  static Reg LoadPartial(const uint8_t* p, int n) {
    alignas(32) uint8_t lanes[kWidth * sizeof(float)] = {};
    std::memcpy(lanes, p, static_cast<size_t>(n) * DTypeSize(kT));
    return Load<kT>(lanes);
  }
  static void StorePartial(float* p, Reg r, int n) {
    alignas(32) float lanes[kWidth];
    _mm256_store_ps(lanes, r);
    std::memcpy(p, lanes, static_cast<size_t>(n) * sizeof(float));
  }
  static float ReduceAdd(Reg v) { return Avx2Ops::HorizontalSum(v); }
  // Transposed reduction of kWidth registers: out[ReducedLane(n)] = sum of x[n]'s lanes, in 14
  // shuffles + 7 adds (kWidth separate ReduceAdds: 24 + 24).
  static constexpr int ReducedLane(int n) { return 4 * (n % 2) + n / 2; }
  static void ReduceWidth(const Reg* x, float* out) {
    Reg y[4], z[2];
    for (int i = 0; i < 4; ++i) {  // halves: [x_2i partial, x_2i+1 partial]
      y[i] = _mm256_add_ps(_mm256_permute2f128_ps(x[2 * i], x[2 * i + 1], 0x20),
                           _mm256_permute2f128_ps(x[2 * i], x[2 * i + 1], 0x31));
    }
    for (int i = 0; i < 2; ++i) {
      z[i] = _mm256_add_ps(_mm256_shuffle_ps(y[2 * i], y[2 * i + 1], 0x88),
                           _mm256_shuffle_ps(y[2 * i], y[2 * i + 1], 0xDD));
    }
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_shuffle_ps(z[0], z[1], 0x88),
                                        _mm256_shuffle_ps(z[0], z[1], 0xDD)));
  }
};
#include "cpu/simd_decode.inc"
#pragma GCC pop_options
}  // namespace avx2

namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
struct V {
  using Reg = __m512;
  static constexpr int kWidth = 16;
  static constexpr int kLogitTile = 16;       // 32 zmm registers: 16 accumulators + keys + query
  static constexpr int kAccumulateTile = 16;  // 16 accumulators + values + a broadcast
  static constexpr int kMaxHeads = 8;
  static Reg Zero() { return _mm512_setzero_ps(); }
  static Reg Set1(float x) { return _mm512_set1_ps(x); }
  static Reg LoadF32(const float* p) { return _mm512_loadu_ps(p); }
  static void StoreF32(float* p, Reg r) { _mm512_storeu_ps(p, r); }
  static Reg Fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg Add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static Reg Max(Reg x, Reg m) { return _mm512_maskz_max_ps(0xFFFF, x, m); }  // x > m ? x : m
  static float ReduceMax(Reg v) {  // fold to 256 bits, then the AVX2 reduction
    return Avx2Ops::HorizontalMax(_mm256_max_ps(_mm512_maskz_extractf32x8_ps(0xFF, v, 0),
                                                _mm512_maskz_extractf32x8_ps(0xFF, v, 1)));
  }
  static __mmask16 FirstLanes(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  // The maskz forms with a full mask: the plain intrinsics start from _mm512_undefined_*, which
  // GCC 12 reports as maybe-uninitialized once inlined (a false positive that -Werror rejects).
  static Reg Bf16ToFloat(__m256i bits) {
    const __m512i wide = _mm512_maskz_cvtepu16_epi32(0xFFFF, bits);
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, wide, 16));
  }
  template <DType kT>
  static Reg Load(const uint8_t* p) {
    if constexpr (kT == DType::kF32) {
      return _mm512_loadu_ps(p);
    } else if constexpr (kT == DType::kF16) {
      return _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    } else {
      return Bf16ToFloat(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
  }
  template <DType kT>
  static Reg LoadPartial(const uint8_t* p, int n) {  // masked: never touches memory past n
    const __mmask16 m = FirstLanes(n);
    if constexpr (kT == DType::kF32) {
      return _mm512_maskz_loadu_ps(m, p);
    } else if constexpr (kT == DType::kF16) {
      return _mm512_maskz_cvtph_ps(0xFFFF, _mm256_maskz_loadu_epi16(m, p));
    } else {
      return Bf16ToFloat(_mm256_maskz_loadu_epi16(m, p));
    }
  }
  static void StorePartial(float* p, Reg r, int n) { _mm512_mask_storeu_ps(p, FirstLanes(n), r); }
  static float ReduceAdd(Reg v) {  // fold to 256 bits, then the AVX2 reduction
    return Avx2Ops::HorizontalSum(_mm256_add_ps(_mm512_maskz_extractf32x8_ps(0xFF, v, 0),
                                                _mm512_maskz_extractf32x8_ps(0xFF, v, 1)));
  }
  // Transposed reduction of kWidth registers: out[ReducedLane(n)] = sum of x[n]'s lanes, in 30
  // shuffles + 15 adds (kWidth separate ReduceAdds: ~80 + 64).
  static constexpr int ReducedLane(int n) { return 4 * (n % 4) + n / 4; }
  static void ReduceWidth(const Reg* x, float* out) {
    Reg y[8], z[4], w[2];
    for (int i = 0; i < 8; ++i) {  // quarters: [x_2i, x_2i, x_2i+1, x_2i+1] partials
      y[i] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(0xFFFF, x[2 * i], x[2 * i + 1], 0x44),
                           _mm512_maskz_shuffle_f32x4(0xFFFF, x[2 * i], x[2 * i + 1], 0xEE));
    }
    for (int i = 0; i < 4; ++i) {  // quarter k: x_4i+k partial
      z[i] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(0xFFFF, y[2 * i], y[2 * i + 1], 0x88),
                           _mm512_maskz_shuffle_f32x4(0xFFFF, y[2 * i], y[2 * i + 1], 0xDD));
    }
    for (int i = 0; i < 2; ++i) {
      w[i] = _mm512_add_ps(_mm512_maskz_shuffle_ps(0xFFFF, z[2 * i], z[2 * i + 1], 0x88),
                           _mm512_maskz_shuffle_ps(0xFFFF, z[2 * i], z[2 * i + 1], 0xDD));
    }
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_maskz_shuffle_ps(0xFFFF, w[0], w[1], 0x88),
                                        _mm512_maskz_shuffle_ps(0xFFFF, w[0], w[1], 0xDD)));
  }
};
#include "cpu/simd_decode.inc"
#pragma GCC pop_options
}  // namespace avx512
#endif

// ---- Decode ------------------------------------------------------------------------------------

struct DecodeTask {
  int32_t stream = 0;
  int64_t begin = 0;  // token range [begin, end) in the stream's concatenated token order
  int64_t end = 0;
};

struct DecodeContext {
  const PagedKVView* kv = nullptr;
  const float* q = nullptr;  // [num_streams, G, head_dim]
  int32_t group = 1;
  int32_t head_dim = 0;
  float scale = 1.0f;
  // Per task: [G] SoftmaxState then [G, head_dim] accumulators, at task * PartialFloats().
  float* partial = nullptr;
  // With score accumulation: logits [G, n_i] of stream i start at logits + G * stream_offset[i].
  float* logits = nullptr;
  const int64_t* stream_offset = nullptr;  // [num_streams + 1] prefix sum of stream lengths
  int prefetch_pages = 0;                  // whole-page prefetch distance (0: next block's head)
  int64_t PartialFloats() const { return 2 * group + int64_t{group} * head_dim; }
};

// Prefetches the first (up to) four cache lines of [p, p + bytes).
inline void PrefetchHead(const uint8_t* p, int64_t bytes) {
  for (int64_t offset = 0; offset < std::min<int64_t>(bytes, 256); offset += 64) {
    __builtin_prefetch(p + offset, 0, 3);
  }
}

// Prefetches every cache line of [p, p + bytes).
inline void PrefetchRange(const uint8_t* p, int64_t bytes) {
  const uint8_t* line = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63});
  for (; line < p + bytes; line += 64) __builtin_prefetch(line, 0, 3);
}

std::atomic<int> prefetch_pages_setting{0};  // SetDecodePrefetchPages

// Rows [r0, r1) of page `page` of segment s: its key rows and its value rows.
inline void PrefetchPageRows(const PoolView& pool, const SegmentView& s, int64_t esize,
                             int32_t page, int64_t r0, int64_t r1) {
  const uint8_t* base = pool.base + int64_t{page} * pool.page_bytes;
  const int64_t key_row = int64_t{s.key_width} * esize, value_row = int64_t{s.value_width} * esize;
  PrefetchRange(base + r0 * key_row, (r1 - r0) * key_row);
  PrefetchRange(base + int64_t{s.tokens_per_page} * key_row + r0 * value_row, (r1 - r0) * value_row);
}

// Scratch a worker thread reuses across tasks and calls (grows, never shrinks).
struct TaskScratch {
  std::vector<float> q;       // [G, key_width] scaled queries gathered to the stored channels
  std::vector<float> row;     // [max(key_width, value_width)] one converted row
  std::vector<float> logits;  // [G, kBlock] logits of a block (when scores are not kept)
  std::vector<float> probs;   // [G, kBlock]
  std::vector<float> keys;    // [kBlock, key_width] a converted key block
  std::vector<float> values;  // [kBlock, value_width] a converted value block
};

TaskScratch& ThreadScratch() {
  thread_local TaskScratch scratch;
  return scratch;
}

template <DType kT, typename Ops>
inline void RunDecodeTask(const DecodeContext& ctx, const DecodeTask& task, int64_t task_index) {
  const PagedKVView& kv = *ctx.kv;
  const int32_t group = ctx.group;
  const int32_t d = ctx.head_dim;
  const int64_t esize = DTypeSize(kT);
  float* partial = ctx.partial + task_index * ctx.PartialFloats();
  auto* states = reinterpret_cast<SoftmaxState*>(partial);  // [G]
  float* acc = partial + 2 * group;                         // [G, head_dim]
  for (int32_t g = 0; g < group; ++g) states[g] = SoftmaxState{};
  std::fill(acc, acc + int64_t{group} * d, 0.0f);

  TaskScratch& scratch = ThreadScratch();
  scratch.logits.resize(static_cast<size_t>(group) * kBlock);
  scratch.probs.resize(static_cast<size_t>(group) * kBlock);
  const int64_t n = ctx.stream_offset[task.stream + 1] - ctx.stream_offset[task.stream];
  float* const stream_logits =
      ctx.logits != nullptr ? ctx.logits + group * ctx.stream_offset[task.stream] : nullptr;
  const float* q_stream = ctx.q + int64_t{task.stream} * group * d;  // [G, head_dim]

  int64_t segment_start = 0;  // stream index of the current segment's first token
  for (int32_t sidx = kv.stream_segment_offsets[task.stream];
       sidx < kv.stream_segment_offsets[task.stream + 1] && segment_start < task.end;
       segment_start += kv.segments[sidx].length, ++sidx) {
    const SegmentView& s = kv.segments[sidx];
    const int64_t lo = std::max(task.begin, segment_start) - segment_start;
    const int64_t hi = std::min(task.end, segment_start + s.length) - segment_start;
    if (lo >= hi) continue;
    const int kw = s.key_width, vw = s.value_width;
    scratch.keys.resize(static_cast<size_t>(kBlock) * kw);
    scratch.values.resize(static_cast<size_t>(kBlock) * vw);
    // Queries gathered to the stored channels and pre-scaled, so a logit is one dense dot.
    scratch.q.resize(static_cast<size_t>(group) * kw);
    for (int32_t g = 0; g < group; ++g) {
      for (int i = 0; i < kw; ++i) {
        const int channel = s.key_channels != nullptr ? s.key_channels[i] : i;
        scratch.q[static_cast<size_t>(g) * kw + i] = ctx.scale * q_stream[int64_t{g} * d + channel];
      }
    }
    const float* qs = scratch.q.data();
    const int64_t values_offset = int64_t{s.tokens_per_page} * kw * esize;
    // Optional whole-page prefetch `ahead` pages in front of the page being computed, so a cold
    // step on a memory-bound machine overlaps DRAM reads with compute (pages are scattered: the
    // hardware prefetcher never crosses from one to the next). The first `ahead` pages are
    // requested up front. Off by default (SetDecodePrefetchPages explains why).
    const int64_t tpp = s.tokens_per_page;
    const int ahead = ctx.prefetch_pages;
    const int64_t last_page = (hi - 1) / tpp;
    auto prefetch_page = [&](int64_t p) {
      if (p > last_page) return;
      const int64_t r0 = p == lo / tpp ? lo % tpp : 0;
      const int64_t r1 = p == last_page ? (hi - 1) % tpp + 1 : tpp;
      PrefetchPageRows(kv.pool, s, esize, s.pages[p], r0, r1);
    };
    for (int64_t p = lo / tpp; ahead > 0 && p < lo / tpp + ahead; ++p) prefetch_page(p);

    for (int64_t t = lo; t < hi;) {
      const int32_t page = s.pages[t / s.tokens_per_page];
      const int32_t row = static_cast<int32_t>(t % s.tokens_per_page);
      const int nb = static_cast<int>(std::min<int64_t>({kBlock, s.tokens_per_page - row, hi - t}));
      const uint8_t* page_base = kv.pool.base + int64_t{page} * kv.pool.page_bytes;
      const uint8_t* keys = page_base + int64_t{row} * kw * esize;                    // [nb, kw]
      const uint8_t* values = page_base + values_offset + int64_t{row} * vw * esize;  // [nb, vw]
      if (ahead > 0) {
        if (row == 0 || t == lo) prefetch_page(t / tpp + ahead);  // once per page entered
      } else if (t + nb < hi) {
        // Pages sit anywhere in the pool, so the hardware prefetcher cannot run ahead across a
        // page boundary: touch the head of the next block's key and value rows so the L2
        // streamer starts on them while this block computes. (Measured on the 2-core Xeon:
        // prefetching whole blocks cost 20% when K/V sit in cache and gained ~20% only at 32k;
        // four lines per region came within noise of the better one in every case.)
        const int64_t t2 = t + nb;
        const int32_t row2 = static_cast<int32_t>(t2 % s.tokens_per_page);
        const uint8_t* base2 =
            kv.pool.base + int64_t{s.pages[t2 / s.tokens_per_page]} * kv.pool.page_bytes;
        const int64_t rest = std::min<int64_t>(s.tokens_per_page - row2, hi - t2);
        PrefetchHead(base2 + int64_t{row2} * kw * esize, rest * kw * esize);
        PrefetchHead(base2 + values_offset + int64_t{row2} * vw * esize, rest * vw * esize);
      }
      // Logits of the block: [G, nb] with head stride `lstride`.
      float* logits;
      int64_t lstride;
      if (stream_logits != nullptr) {
        logits = stream_logits + segment_start + t;
        lstride = n;
      } else {
        logits = scratch.logits.data();
        lstride = kBlock;
      }
      Ops::template BlockLogits<kT>(qs, group, keys, nb, kw, logits, lstride, scratch.keys.data());
      // One rescale per head per block, then the block's weights.
      for (int32_t g = 0; g < group; ++g) {
        const float* lg = logits + g * lstride;
        const float block_max = Ops::MaxOf(lg, nb);
        SoftmaxState& st = states[g];
        float* pg = scratch.probs.data() + g * kBlock;
        if (block_max > st.m) {
          const float factor = RescaleFactor(st.m, block_max);
          st.l *= factor;
          Scale(factor, d, acc + int64_t{g} * d);
          st.m = block_max;
        }
        if (st.m == -INFINITY) {  // only -inf logits so far: no mass
          std::fill(pg, pg + nb, 0.0f);
          continue;
        }
        ExpShifted(lg, st.m, nb, pg);
        st.l += Ops::SumOf(pg, nb);
      }
      Ops::template BlockAccumulate<kT>(scratch.probs.data(), group, values, nb, vw, acc, d,
                                        scratch.values.data());
      t += nb;
    }
  }
}

// Second pass of score accumulation over one task's tokens: probability of each key under the
// stream's final softmax state, aggregated over the G heads, added to the segment's scores.
inline void RunScoreTask(const DecodeContext& ctx, const DecodeTask& task,
                         const SoftmaxState* final_states, GqaAggregation aggregation) {
  const PagedKVView& kv = *ctx.kv;
  const int32_t group = ctx.group;
  const int64_t n = ctx.stream_offset[task.stream + 1] - ctx.stream_offset[task.stream];
  const float* logits = ctx.logits + group * ctx.stream_offset[task.stream];  // [G, n]
  const SoftmaxState* st = final_states + int64_t{task.stream} * group;       // [G]
  TaskScratch& scratch = ThreadScratch();
  scratch.probs.resize(static_cast<size_t>(group) * kBlock);
  float* probs = scratch.probs.data();  // [G, kBlock]
  int64_t segment_start = 0;
  for (int32_t sidx = kv.stream_segment_offsets[task.stream];
       sidx < kv.stream_segment_offsets[task.stream + 1] && segment_start < task.end;
       segment_start += kv.segments[sidx].length, ++sidx) {
    const SegmentView& s = kv.segments[sidx];
    const int64_t lo = std::max(task.begin, segment_start);
    const int64_t hi = std::min(task.end, segment_start + s.length);
    if (lo >= hi || s.scores == nullptr) continue;
    for (int64_t t = lo; t < hi; t += kBlock) {
      const int nb = static_cast<int>(std::min<int64_t>(kBlock, hi - t));
      for (int32_t g = 0; g < group; ++g) {
        float* pg = probs + g * kBlock;
        const float inv = SoftmaxInverseDenominator(st[g]);
        if (inv == 0.0f) {
          std::fill(pg, pg + nb, 0.0f);
          continue;
        }
        ExpShifted(logits + g * n + t, st[g].m, nb, pg);
        for (int j = 0; j < nb; ++j) pg[j] *= inv;
      }
      float* scores = s.scores + (t - segment_start);  // [nb]
      if (aggregation == GqaAggregation::kMax) {
        for (int j = 0; j < nb; ++j)
          scores[j] += AggregateGqa(probs + j, kBlock, group, aggregation);
      } else {
        const float mean = aggregation == GqaAggregation::kMean ? 1.0f / group : 1.0f;
        float sum[kBlock];
        std::copy(probs, probs + nb, sum);
        for (int32_t g = 1; g < group; ++g) {
          for (int j = 0; j < nb; ++j) sum[j] += probs[g * kBlock + j];
        }
        // Mean is sum / G exactly as the reference computes it (not sum * (1/G)).
        if (aggregation == GqaAggregation::kMean) {
          for (int j = 0; j < nb; ++j) scores[j] += sum[j] / static_cast<float>(group);
        } else {
          for (int j = 0; j < nb; ++j) scores[j] += sum[j] * mean;
        }
      }
    }
  }
}

using DecodeTaskFn = void (*)(const DecodeContext&, const DecodeTask&, int64_t);
using ScoreTaskFn = void (*)(const DecodeContext&, const DecodeTask&, const SoftmaxState*,
                             GqaAggregation);

KVC_TARGET_BASE void DecodeTaskBaseF32(const DecodeContext& c, const DecodeTask& t, int64_t i) {
  RunDecodeTask<DType::kF32, PortableDecodeOps>(c, t, i);
}
KVC_TARGET_BASE void DecodeTaskBaseF16(const DecodeContext& c, const DecodeTask& t, int64_t i) {
  RunDecodeTask<DType::kF16, PortableDecodeOps>(c, t, i);
}
KVC_TARGET_BASE void DecodeTaskBaseBF16(const DecodeContext& c, const DecodeTask& t, int64_t i) {
  RunDecodeTask<DType::kBF16, PortableDecodeOps>(c, t, i);
}
KVC_TARGET_BASE void ScoreTaskBase(const DecodeContext& c, const DecodeTask& t,
                                   const SoftmaxState* s, GqaAggregation a) {
  RunScoreTask(c, t, s, a);
}
#if KVC_CPU_MULTIVERSION
KVC_TARGET_AVX2 void DecodeTaskAvx2F32(const DecodeContext& c, const DecodeTask& t, int64_t i) {
  RunDecodeTask<DType::kF32, avx2::DecodeOps>(c, t, i);
}
KVC_TARGET_AVX2 void DecodeTaskAvx2F16(const DecodeContext& c, const DecodeTask& t, int64_t i) {
  RunDecodeTask<DType::kF16, avx2::DecodeOps>(c, t, i);
}
KVC_TARGET_AVX2 void DecodeTaskAvx2BF16(const DecodeContext& c, const DecodeTask& t, int64_t i) {
  RunDecodeTask<DType::kBF16, avx2::DecodeOps>(c, t, i);
}
KVC_TARGET_AVX2 void ScoreTaskAvx2(const DecodeContext& c, const DecodeTask& t,
                                   const SoftmaxState* s, GqaAggregation a) {
  RunScoreTask(c, t, s, a);
}
KVC_TARGET_AVX512 void DecodeTaskAvx512F32(const DecodeContext& c, const DecodeTask& t, int64_t i) {
  RunDecodeTask<DType::kF32, avx512::DecodeOps>(c, t, i);
}
KVC_TARGET_AVX512 void DecodeTaskAvx512F16(const DecodeContext& c, const DecodeTask& t, int64_t i) {
  RunDecodeTask<DType::kF16, avx512::DecodeOps>(c, t, i);
}
KVC_TARGET_AVX512 void DecodeTaskAvx512BF16(const DecodeContext& c, const DecodeTask& t,
                                            int64_t i) {
  RunDecodeTask<DType::kBF16, avx512::DecodeOps>(c, t, i);
}
KVC_TARGET_AVX512 void ScoreTaskAvx512(const DecodeContext& c, const DecodeTask& t,
                                       const SoftmaxState* s, GqaAggregation a) {
  RunScoreTask(c, t, s, a);
}
#endif

KernelIsa CurrentIsa() { return ActiveKernelIsa(); }

#if KVC_CPU_MULTIVERSION
bool UseAvx2() { return CurrentIsa() >= KernelIsa::kAvx2; }
#endif

DecodeTaskFn SelectDecodeTask(DType t, KernelIsa isa) {
#if KVC_CPU_MULTIVERSION
  if (isa == KernelIsa::kAvx512) {
    return t == DType::kF32   ? DecodeTaskAvx512F32
           : t == DType::kF16 ? DecodeTaskAvx512F16
                              : DecodeTaskAvx512BF16;
  }
  if (isa == KernelIsa::kAvx2) {
    return t == DType::kF32   ? DecodeTaskAvx2F32
           : t == DType::kF16 ? DecodeTaskAvx2F16
                              : DecodeTaskAvx2BF16;
  }
#endif
  (void)isa;
  return t == DType::kF32   ? DecodeTaskBaseF32
         : t == DType::kF16 ? DecodeTaskBaseF16
                            : DecodeTaskBaseBF16;
}

ScoreTaskFn SelectScoreTask(KernelIsa isa) {
#if KVC_CPU_MULTIVERSION
  if (isa == KernelIsa::kAvx512) return ScoreTaskAvx512;
  if (isa == KernelIsa::kAvx2) return ScoreTaskAvx2;
#endif
  (void)isa;
  return ScoreTaskBase;
}

// Buffers of one call, reused by later calls from the same thread (no allocation in steady state).
struct CallScratch {
  std::vector<int64_t> stream_offset;
  std::vector<DecodeTask> tasks;
  std::vector<int64_t> stream_first_task;
  std::vector<float> partial;
  std::vector<float> logits;
  std::vector<SoftmaxState> final_states;
};

// Splits every stream into key ranges so there are about 4 tasks per thread (none shorter than
// kMinSplit tokens unless the stream itself is).
void PlanTasks(const PagedKVView& kv, CallScratch& c) {
  c.stream_offset.assign(static_cast<size_t>(kv.num_streams) + 1, 0);
  for (int32_t i = 0; i < kv.num_streams; ++i) {
    c.stream_offset[i + 1] = c.stream_offset[i] + StreamLength(kv, i);
  }
  const int64_t total = c.stream_offset[kv.num_streams];
  const int64_t target_tasks = 4 * int64_t{oneapi::tbb::this_task_arena::max_concurrency()};
  const int64_t split = std::max(kMinSplit, (total + target_tasks - 1) / target_tasks);
  c.tasks.clear();
  c.stream_first_task.assign(static_cast<size_t>(kv.num_streams) + 1, 0);
  for (int32_t i = 0; i < kv.num_streams; ++i) {
    c.stream_first_task[i] = static_cast<int64_t>(c.tasks.size());
    const int64_t n = c.stream_offset[i + 1] - c.stream_offset[i];
    const int64_t pieces = (n + split - 1) / split;
    for (int64_t p = 0; p < pieces; ++p) {
      // Even pieces, so the last one is not a sliver.
      c.tasks.push_back({i, n * p / pieces, n * (p + 1) / pieces});
    }
  }
  c.stream_first_task[kv.num_streams] = static_cast<int64_t>(c.tasks.size());
}

template <typename Fn>
void ParallelOver(int64_t count, const Fn& fn) {
  if (count == 1) {
    fn(0);
    return;
  }
  oneapi::tbb::parallel_for(oneapi::tbb::blocked_range<int64_t>(0, count, 1),
                            [&](const oneapi::tbb::blocked_range<int64_t>& r) {
                              for (int64_t i = r.begin(); i < r.end(); ++i) fn(i);
                            });
}

}  // namespace

int SetDecodePrefetchPages(int pages) {
  return prefetch_pages_setting.exchange(std::max(pages, 0), std::memory_order_relaxed);
}

int DecodePrefetchPages() { return prefetch_pages_setting.load(std::memory_order_relaxed); }

absl::Status DecodeAttentionFast(const PagedKVView& kv, const DecodeParams& params, const float* q,
                                 float* out, float* lse) {
  // A reference, not the thread_local itself: the lambdas below run on TBB workers, where the
  // name of a thread_local would denote the worker's own (empty) instance.
  thread_local CallScratch call_scratch;
  CallScratch& c = call_scratch;
  PlanTasks(kv, c);
  DecodeContext ctx;
  ctx.kv = &kv;
  ctx.q = q;
  ctx.group = params.group_size;
  ctx.head_dim = kv.head_dim;
  ctx.scale = ResolveScale(params.scale, kv.head_dim);
  ctx.stream_offset = c.stream_offset.data();
  const int64_t num_tasks = static_cast<int64_t>(c.tasks.size());
  c.partial.resize(static_cast<size_t>(num_tasks * ctx.PartialFloats()));
  ctx.partial = c.partial.data();
  if (params.accumulate_scores) {
    c.logits.resize(static_cast<size_t>(c.stream_offset[kv.num_streams] * ctx.group));
    ctx.logits = c.logits.data();
  }
  ctx.prefetch_pages = DecodePrefetchPages();
  const KernelIsa isa = CurrentIsa();
  const DecodeTaskFn task_fn = SelectDecodeTask(kv.pool.dtype, isa);
  ParallelOver(num_tasks, [&](int64_t i) { task_fn(ctx, c.tasks[i], i); });

  // Merge the splits of each stream (few per stream; serial and cheap next to the tasks).
  const int32_t group = ctx.group, d = ctx.head_dim;
  c.final_states.resize(static_cast<size_t>(kv.num_streams) * group);
  for (int32_t i = 0; i < kv.num_streams; ++i) {
    for (int32_t g = 0; g < group; ++g) {
      SoftmaxState state;
      float* og = out + (int64_t{i} * group + g) * d;  // [head_dim], accumulates unnormalised
      std::fill(og, og + d, 0.0f);
      for (int64_t task = c.stream_first_task[i]; task < c.stream_first_task[i + 1]; ++task) {
        const float* partial = c.partial.data() + task * ctx.PartialFloats();
        const auto* states = reinterpret_cast<const SoftmaxState*>(partial);
        MergeSoftmaxStates(state, og, states[g], partial + 2 * group + int64_t{g} * d, d);
      }
      FinalizeSoftmax(state, og, og, d);
      if (lse != nullptr) lse[int64_t{i} * group + g] = SoftmaxLse(state);
      c.final_states[int64_t{i} * group + g] = state;
    }
  }
  if (params.accumulate_scores) {
    const ScoreTaskFn score_fn = SelectScoreTask(isa);
    ParallelOver(num_tasks, [&](int64_t i) {
      score_fn(ctx, c.tasks[i], c.final_states.data(), params.aggregation);
    });
  }
  return absl::OkStatus();
}

// ---- Row scoring -------------------------------------------------------------------------------

namespace {

struct ScoreContext {
  const PagedKVView* kv = nullptr;
  const ScoreRowsParams* params = nullptr;
  const float* queries = nullptr;            // [num_rows, num_streams * G, head_dim]
  const int32_t* query_positions = nullptr;  // [num_rows]
  float scale = 1.0f;
  const int64_t* stream_offset = nullptr;  // [num_streams + 1]
};

struct RowTask {
  int32_t stream = 0;
  int32_t row_begin = 0;
  int32_t row_end = 0;
  float* scores = nullptr;    // [stream length] this task's share of the token scores
  int64_t* below = nullptr;   // [G]
  int64_t* causal = nullptr;  // [G]
};

struct RowScratch {
  std::vector<float> q;            // [rows, G, key_width]
  std::vector<float> row;          // [key_width]
  std::vector<float> keys;         // [kKeyTile, key_width] a converted key tile
  std::vector<float> key_tile;     // [key_width, kKeyTile] the same, transposed, zero padded
  std::vector<float> logits;       // [rows, G, n]
  std::vector<uint8_t> visible;    // [n]
  std::vector<uint32_t> mask;      // [n] all-ones where the key is visible to the row
  std::vector<int32_t> positions;  // [n]
};

// The kernel before register blocking (one horizontally reduced Dot per (row, head) x key, a
// scalar softmax pass): kept only as the benchmark baseline of ScoreRowsFastPairwise.
template <DType kT>
inline void RunRowTaskPairwise(const ScoreContext& ctx, const RowTask& task) {
  const PagedKVView& kv = *ctx.kv;
  const ScoreRowsParams& params = *ctx.params;
  const int32_t group = params.group_size;
  const int32_t d = kv.head_dim;
  const int64_t q_heads = int64_t{kv.num_streams} * group;
  const int64_t n = ctx.stream_offset[task.stream + 1] - ctx.stream_offset[task.stream];
  const int32_t rows = task.row_end - task.row_begin;
  const int64_t heads = int64_t{rows} * group;  // (row, g) pairs of this task
  thread_local RowScratch scratch;
  scratch.row.resize(static_cast<size_t>(d));
  scratch.logits.resize(static_cast<size_t>(heads * n));
  scratch.visible.resize(static_cast<size_t>(n));
  scratch.positions.resize(static_cast<size_t>(n));
  float* logits = scratch.logits.data();  // [rows * G, n]

  // Pass 1: every (row, head) logit; K rows are read once per task, shared by rows * G heads.
  int64_t segment_start = 0;
  for (int32_t sidx = kv.stream_segment_offsets[task.stream];
       sidx < kv.stream_segment_offsets[task.stream + 1];
       segment_start += kv.segments[sidx].length, ++sidx) {
    const SegmentView& s = kv.segments[sidx];
    const int kw = s.key_width;
    scratch.row.resize(std::max(scratch.row.size(), static_cast<size_t>(kw)));
    std::copy(s.positions, s.positions + s.length, scratch.positions.data() + segment_start);
    scratch.q.resize(static_cast<size_t>(heads) * kw);
    for (int64_t h = 0; h < heads; ++h) {
      const int32_t r = task.row_begin + static_cast<int32_t>(h / group);
      const int32_t g = static_cast<int32_t>(h % group);
      const float* qh = ctx.queries + (r * q_heads + int64_t{task.stream} * group + g) * d;
      for (int i = 0; i < kw; ++i) {
        scratch.q[h * kw + i] = ctx.scale * qh[s.key_channels != nullptr ? s.key_channels[i] : i];
      }
    }
    for (int32_t t = 0; t < s.length; ++t) {
      const float* k =
          BlockAsFloat<kT, PortableOps>(SegmentKeyRow(kv.pool, s, t), kw, scratch.row.data());
      for (int64_t h = 0; h < heads; ++h) {
        logits[h * n + segment_start + t] = Dot(scratch.q.data() + h * kw, k, kw);
      }
    }
  }

  // Pass 2: per row, softmax over the visible keys, counts, and the aggregated token scores.
  float* probs = logits;  // overwritten in place, row by row
  for (int32_t r = 0; r < rows; ++r) {
    const int32_t position = ctx.query_positions[task.row_begin + r];
    int64_t num_visible = 0;
    for (int64_t t = 0; t < n; ++t) {
      scratch.visible[t] = scratch.positions[t] <= position;
      num_visible += scratch.visible[t];
    }
    if (num_visible == 0) continue;
    for (int32_t g = 0; g < group; ++g) {
      float* lg = logits + (int64_t{r} * group + g) * n;
      float m = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        if (scratch.visible[t]) m = std::fmax(m, lg[t]);
      }
      float l = 0.0f;
      for (int64_t t = 0; t < n; ++t) {
        const float e = scratch.visible[t] ? ExpNonPositive(lg[t] - m) : 0.0f;
        l += e;
        lg[t] = e;
      }
      const float inv = 1.0f / l;
      float row_max = 0.0f;
      for (int64_t t = 0; t < n; ++t) {
        lg[t] *= inv;
        row_max = std::fmax(row_max, lg[t]);
      }
      const float threshold = params.sparsity_threshold * row_max;
      int64_t below = 0;
      for (int64_t t = 0; t < n; ++t) below += scratch.visible[t] && lg[t] < threshold;
      task.below[g] += below;
      task.causal[g] += num_visible;
    }
    const float* pr = probs + int64_t{r} * group * n;  // [G, n]
    for (int64_t t = 0; t < n; ++t) {
      if (scratch.visible[t]) task.scores[t] += AggregateGqa(pr + t, n, group, params.aggregation);
    }
  }
}

// Pass 1 is a small GEMM per segment: logits [rows * G, n] = Q [rows * G, kw] x K^T. Keys are
// taken kKeyTile rows of one page at a time, converted to f32 once and transposed into
// [kw, kKeyTile], and every query vector of the task is run against the tile in register tiles
// (Ops::TileLogits) — no horizontal sum per logit. Pass 2 runs per (row, head) over the stream:
// a visibility mask (all-ones where the key's position <= the row's), a masked softmax that
// also counts the below-threshold entries (Ops::SoftmaxRow), then the GQA aggregation of the
// row's G heads into the token scores (Ops::AggregateRow; masked entries are exactly 0).
template <DType kT, typename Ops>
inline void RunRowTask(const ScoreContext& ctx, const RowTask& task) {
  const PagedKVView& kv = *ctx.kv;
  const ScoreRowsParams& params = *ctx.params;
  const int32_t group = params.group_size;
  const int32_t d = kv.head_dim;
  const int64_t esize = DTypeSize(kT);
  const int64_t q_heads = int64_t{kv.num_streams} * group;
  const int64_t n = ctx.stream_offset[task.stream + 1] - ctx.stream_offset[task.stream];
  const int32_t rows = task.row_end - task.row_begin;
  const int64_t heads = int64_t{rows} * group;  // (row, g) query vectors of this task
  thread_local RowScratch scratch;
  scratch.logits.resize(static_cast<size_t>(heads * n));
  scratch.mask.resize(static_cast<size_t>(n));
  scratch.positions.resize(static_cast<size_t>(n));
  float* logits = scratch.logits.data();  // [rows * G, n]

  int64_t segment_start = 0;
  for (int32_t sidx = kv.stream_segment_offsets[task.stream];
       sidx < kv.stream_segment_offsets[task.stream + 1];
       segment_start += kv.segments[sidx].length, ++sidx) {
    const SegmentView& s = kv.segments[sidx];
    const int kw = s.key_width;
    std::copy(s.positions, s.positions + s.length, scratch.positions.data() + segment_start);
    // Queries gathered to the segment's stored channels and pre-scaled: [rows * G, kw].
    scratch.q.resize(static_cast<size_t>(heads) * kw);
    for (int64_t h = 0; h < heads; ++h) {
      const int32_t r = task.row_begin + static_cast<int32_t>(h / group);
      const int32_t g = static_cast<int32_t>(h % group);
      const float* qh = ctx.queries + (r * q_heads + int64_t{task.stream} * group + g) * d;
      for (int i = 0; i < kw; ++i) {
        scratch.q[h * kw + i] = ctx.scale * qh[s.key_channels != nullptr ? s.key_channels[i] : i];
      }
    }
    scratch.keys.resize(static_cast<size_t>(kKeyTile) * kw);
    scratch.key_tile.resize(static_cast<size_t>(kKeyTile) * kw);
    for (int64_t t = 0; t < s.length;) {
      const int32_t page = s.pages[t / s.tokens_per_page];
      const int32_t row = static_cast<int32_t>(t % s.tokens_per_page);
      const int nb = static_cast<int>(
          std::min<int64_t>({kKeyTile, s.tokens_per_page - row, s.length - t}));
      const uint8_t* keys = kv.pool.base + int64_t{page} * kv.pool.page_bytes +
                            int64_t{row} * kw * esize;  // [nb, kw] contiguous in the page
      const float* k = BlockAsFloat<kT, Ops>(keys, int64_t{nb} * kw, scratch.keys.data());
      float* kt = scratch.key_tile.data();  // [kw, kKeyTile]
      std::fill(kt, kt + int64_t{kKeyTile} * kw, 0.0f);
      for (int j = 0; j < nb; ++j) {
        for (int c = 0; c < kw; ++c) kt[c * kKeyTile + j] = k[int64_t{j} * kw + c];
      }
      Ops::TileLogits(scratch.q.data(), heads, kt, kw, nb, logits + segment_start + t, n);
      t += nb;
    }
  }

  for (int32_t r = 0; r < rows; ++r) {
    const int32_t position = ctx.query_positions[task.row_begin + r];
    int64_t num_visible = 0;
    for (int64_t t = 0; t < n; ++t) {
      const uint32_t visible = scratch.positions[t] <= position ? 1u : 0u;
      scratch.mask[t] = 0u - visible;
      num_visible += visible;
    }
    if (num_visible == 0) continue;  // a row that sees no key contributes nothing
    float* probs = logits + int64_t{r} * group * n;  // [G, n], probabilities in place
    for (int32_t g = 0; g < group; ++g) {
      task.below[g] +=
          Ops::SoftmaxRow(probs + int64_t{g} * n, scratch.mask.data(), n, params.sparsity_threshold);
      task.causal[g] += num_visible;
    }
    Ops::AggregateRow(probs, n, group, params.aggregation, task.scores);
  }
}

using RowTaskFn = void (*)(const ScoreContext&, const RowTask&);

KVC_TARGET_BASE void RowTaskBaseF32(const ScoreContext& c, const RowTask& t) {
  RunRowTask<DType::kF32, PortableOps>(c, t);
}
KVC_TARGET_BASE void RowTaskBaseF16(const ScoreContext& c, const RowTask& t) {
  RunRowTask<DType::kF16, PortableOps>(c, t);
}
KVC_TARGET_BASE void RowTaskBaseBF16(const ScoreContext& c, const RowTask& t) {
  RunRowTask<DType::kBF16, PortableOps>(c, t);
}
KVC_TARGET_BASE void RowTaskPairwiseBaseF32(const ScoreContext& c, const RowTask& t) {
  RunRowTaskPairwise<DType::kF32>(c, t);
}
KVC_TARGET_BASE void RowTaskPairwiseBaseF16(const ScoreContext& c, const RowTask& t) {
  RunRowTaskPairwise<DType::kF16>(c, t);
}
KVC_TARGET_BASE void RowTaskPairwiseBaseBF16(const ScoreContext& c, const RowTask& t) {
  RunRowTaskPairwise<DType::kBF16>(c, t);
}
#if KVC_CPU_MULTIVERSION
KVC_TARGET_AVX2 void RowTaskAvx2F32(const ScoreContext& c, const RowTask& t) {
  RunRowTask<DType::kF32, Avx2Ops>(c, t);
}
KVC_TARGET_AVX2 void RowTaskAvx2F16(const ScoreContext& c, const RowTask& t) {
  RunRowTask<DType::kF16, Avx2Ops>(c, t);
}
KVC_TARGET_AVX2 void RowTaskAvx2BF16(const ScoreContext& c, const RowTask& t) {
  RunRowTask<DType::kBF16, Avx2Ops>(c, t);
}
KVC_TARGET_AVX512 void RowTaskAvx512F32(const ScoreContext& c, const RowTask& t) {
  RunRowTask<DType::kF32, Avx512RowOps>(c, t);
}
KVC_TARGET_AVX512 void RowTaskAvx512F16(const ScoreContext& c, const RowTask& t) {
  RunRowTask<DType::kF16, Avx512RowOps>(c, t);
}
KVC_TARGET_AVX512 void RowTaskAvx512BF16(const ScoreContext& c, const RowTask& t) {
  RunRowTask<DType::kBF16, Avx512RowOps>(c, t);
}
KVC_TARGET_AVX2 void RowTaskPairwiseAvx2F32(const ScoreContext& c, const RowTask& t) {
  RunRowTaskPairwise<DType::kF32>(c, t);
}
KVC_TARGET_AVX2 void RowTaskPairwiseAvx2F16(const ScoreContext& c, const RowTask& t) {
  RunRowTaskPairwise<DType::kF16>(c, t);
}
KVC_TARGET_AVX2 void RowTaskPairwiseAvx2BF16(const ScoreContext& c, const RowTask& t) {
  RunRowTaskPairwise<DType::kBF16>(c, t);
}
#endif

RowTaskFn SelectRowTask(DType t, bool pairwise) {
#if KVC_CPU_MULTIVERSION
  if (UseAvx2()) {
    if (pairwise) {
      return t == DType::kF32   ? RowTaskPairwiseAvx2F32
             : t == DType::kF16 ? RowTaskPairwiseAvx2F16
                                : RowTaskPairwiseAvx2BF16;
    }
    if (CurrentIsa() == KernelIsa::kAvx512) {
      return t == DType::kF32   ? RowTaskAvx512F32
             : t == DType::kF16 ? RowTaskAvx512F16
                                : RowTaskAvx512BF16;
    }
    return t == DType::kF32 ? RowTaskAvx2F32 : t == DType::kF16 ? RowTaskAvx2F16 : RowTaskAvx2BF16;
  }
#endif
  if (pairwise) {
    return t == DType::kF32   ? RowTaskPairwiseBaseF32
           : t == DType::kF16 ? RowTaskPairwiseBaseF16
                              : RowTaskPairwiseBaseBF16;
  }
  return t == DType::kF32 ? RowTaskBaseF32 : t == DType::kF16 ? RowTaskBaseF16 : RowTaskBaseBF16;
}

constexpr int64_t kRowTaskLogitBudget = int64_t{1} << 20;  // floats of logits per task (4 MiB)

}  // namespace

namespace {

absl::Status ScoreRowsTasks(const PagedKVView& kv, const ScoreRowsParams& params,
                            const float* queries, const int32_t* query_positions,
                            float* token_scores, int64_t* below_threshold,
                            int64_t* causal_entries, bool pairwise) {
  const int32_t group = params.group_size;
  std::vector<int64_t> stream_offset(static_cast<size_t>(kv.num_streams) + 1, 0);
  for (int32_t i = 0; i < kv.num_streams; ++i) {
    stream_offset[i + 1] = stream_offset[i] + StreamLength(kv, i);
  }
  // Row blocks: enough tasks for the threads, and logits [rows, G, n] within the budget.
  const int64_t threads = oneapi::tbb::this_task_arena::max_concurrency();
  const int64_t blocks_wanted =
      std::max<int64_t>(1, (4 * threads + kv.num_streams - 1) / std::max(kv.num_streams, 1));
  std::vector<RowTask> tasks;
  int64_t score_floats = 0;
  for (int32_t i = 0; i < kv.num_streams; ++i) {
    const int64_t n = stream_offset[i + 1] - stream_offset[i];
    if (n == 0 || params.num_rows == 0) continue;
    int64_t rows_per_task = (params.num_rows + blocks_wanted - 1) / blocks_wanted;
    rows_per_task = std::max<int64_t>(
        1, std::min(rows_per_task, kRowTaskLogitBudget / std::max<int64_t>(1, group * n)));
    for (int64_t r = 0; r < params.num_rows; r += rows_per_task) {
      RowTask t;
      t.stream = i;
      t.row_begin = static_cast<int32_t>(r);
      t.row_end = static_cast<int32_t>(std::min<int64_t>(params.num_rows, r + rows_per_task));
      tasks.push_back(t);
      score_floats += n;
    }
  }
  // Each task owns its score and count slots; they are summed in task order afterwards so the
  // result does not depend on scheduling.
  std::vector<float> task_scores(static_cast<size_t>(score_floats), 0.0f);
  std::vector<int64_t> task_counts(tasks.size() * 2 * group, 0);
  int64_t cursor = 0;
  for (size_t k = 0; k < tasks.size(); ++k) {
    tasks[k].scores = task_scores.data() + cursor;
    tasks[k].below = task_counts.data() + k * 2 * group;
    tasks[k].causal = tasks[k].below + group;
    cursor += stream_offset[tasks[k].stream + 1] - stream_offset[tasks[k].stream];
  }
  ScoreContext ctx;
  ctx.kv = &kv;
  ctx.params = &params;
  ctx.queries = queries;
  ctx.query_positions = query_positions;
  ctx.scale = ResolveScale(params.scale, kv.head_dim);
  ctx.stream_offset = stream_offset.data();
  const RowTaskFn fn = SelectRowTask(kv.pool.dtype, pairwise);
  ParallelOver(static_cast<int64_t>(tasks.size()), [&](int64_t k) { fn(ctx, tasks[k]); });

  std::fill(token_scores, token_scores + stream_offset[kv.num_streams], 0.0f);
  std::vector<int64_t> below(static_cast<size_t>(kv.num_streams) * group, 0);
  std::vector<int64_t> causal(static_cast<size_t>(kv.num_streams) * group, 0);
  for (const RowTask& t : tasks) {
    float* dst = token_scores + stream_offset[t.stream];
    const int64_t n = stream_offset[t.stream + 1] - stream_offset[t.stream];
    for (int64_t j = 0; j < n; ++j) dst[j] += t.scores[j];
    for (int32_t g = 0; g < group; ++g) {
      below[int64_t{t.stream} * group + g] += t.below[g];
      causal[int64_t{t.stream} * group + g] += t.causal[g];
    }
  }
  if (below_threshold != nullptr) std::copy(below.begin(), below.end(), below_threshold);
  if (causal_entries != nullptr) std::copy(causal.begin(), causal.end(), causal_entries);
  return absl::OkStatus();
}

}  // namespace

absl::Status ScoreRowsFast(const PagedKVView& kv, const ScoreRowsParams& params,
                           const float* queries, const int32_t* query_positions,
                           float* token_scores, int64_t* below_threshold, int64_t* causal_entries) {
  return ScoreRowsTasks(kv, params, queries, query_positions, token_scores, below_threshold,
                        causal_entries, /*pairwise=*/false);
}

absl::Status ScoreRowsFastPairwise(const PagedKVView& kv, const ScoreRowsParams& params,
                                   const float* queries, const int32_t* query_positions,
                                   float* token_scores, int64_t* below_threshold,
                                   int64_t* causal_entries) {
  return ScoreRowsTasks(kv, params, queries, query_positions, token_scores, below_threshold,
                        causal_entries, /*pairwise=*/true);
}

}  // namespace kvcache::cpu
