// cpu/convert.h — row conversions between the pool dtypes and f32 for the CPU backend (internal).
//
// The per-element functions return exactly what kvcache/dtype.h's HalfBitsToFloat /
// FloatToHalfBits / FloatToBF16Bits return, for every input (tests/test_cpu_backend.cc checks all
// 2^16 halves and a sweep of floats), but without branches: every case is computed and the right
// one selected, so GCC vectorises a loop of them (SSE2 at the x86-64 baseline). The row templates
// take the dtype as a compile-time constant; callers switch on the runtime dtype once per call
// (DispatchDType), not once per element.
//
// Subnormal halves are converted through an integer -> float conversion and the subnormal f32 ->
// f16 rounding adds 0.5f, so neither depends on the denormals-are-zero / flush-to-zero mode an
// engine may have set.
//
// Example:
//   float row[128];
//   kvcache::cpu::LoadRow<kvcache::DType::kF16>(page_row, 128, row);   // 128 halves -> f32
//   kvcache::cpu::StoreRow<kvcache::DType::kF16>(row, 128, page_row);  // and back (RNE)
#ifndef KVCACHE_CPU_CONVERT_H_
#define KVCACHE_CPU_CONVERT_H_

#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kvcache/dtype.h"

namespace kvcache::cpu {

// f16 bits -> f32. Normal halves rebias the exponent by an integer add; subnormal halves are
// mantissa * 2^-24 (exact); inf / NaN keep their payload (as HalfBitsToFloat does).
inline float HalfBitsToFloatFast(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const int32_t field = static_cast<int32_t>(h & 0x7FFFu);      // exponent and mantissa
  const int32_t shifted = field << 13;                          // in f32 position
  const int32_t normal = shifted + (112 << 23);                 // exponent bias 15 -> 127
  const int32_t subnormal =
      std::bit_cast<int32_t>(static_cast<float>(field) * 0x1p-24f);  // field < 0x400 here
  const int32_t special = shifted | 0x7F800000;                 // inf / NaN
  // Masks, not ?: — a select guarding the float conversion would stay a branch (GCC does not
  // speculate a float operation that could trap) and the loop would not vectorise.
  const int32_t is_subnormal = -static_cast<int32_t>(field < 0x400);
  const int32_t is_special = -static_cast<int32_t>(field >= 0x7C00);
  int32_t bits = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  bits = (special & is_special) | (bits & ~is_special);
  return std::bit_cast<float>(sign | static_cast<uint32_t>(bits));
}

// f32 -> f16 bits, round to nearest even; overflow saturates to inf, NaN -> quiet NaN 0x7E00
// (with the sign), as FloatToHalfBits.
inline uint16_t FloatToHalfBitsFast(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const int32_t sign = static_cast<int32_t>((u >> 16) & 0x8000u);
  const int32_t magnitude = static_cast<int32_t>(u & 0x7FFFFFFFu);
  // Normal half: drop 13 mantissa bits (ties to even) and rebias. Only selected for magnitudes
  // in [2^-14, 65520); a carry out of the mantissa correctly bumps the exponent.
  const int32_t dropped = magnitude & 0x1FFF;
  int32_t normal = (magnitude >> 13) - (112 << 10);
  normal += (dropped + 0x0FFF + (normal & 1)) >> 13;  // +1 above half, or at half when odd
  // Subnormal half (|f| < 2^-14): |f| + 0.5 rounds |f| to a multiple of 2^-24 (the f32 ulp in
  // [0.5, 1)) in one IEEE round-to-nearest-even step; the units above 0.5 are the half's bits.
  const int32_t subnormal =
      std::bit_cast<int32_t>(std::bit_cast<float>(magnitude) + 0.5f) - 0x3F000000;
  const int32_t is_subnormal = -static_cast<int32_t>(magnitude < 0x38800000);  // masks: see above
  int32_t bits = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  const int32_t is_inf = -static_cast<int32_t>(magnitude >= 0x477FF000);  // rounds to >= 65520
  const int32_t is_nan = -static_cast<int32_t>(magnitude > 0x7F800000);
  bits = (0x7C00 & is_inf) | (bits & ~is_inf);
  bits = (0x7E00 & is_nan) | (bits & ~is_nan);
  return static_cast<uint16_t>(sign | bits);
}

// f32 -> bf16 bits, round to nearest even; NaN keeps its top bits with the quiet bit set.
inline uint16_t FloatToBF16BitsFast(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  const bool nan = static_cast<int32_t>(u & 0x7FFFFFFFu) > 0x7F800000;
  return static_cast<uint16_t>(nan ? quiet_nan : rounded);
}

// n elements of dtype T at src -> n floats at dst.
template <DType T>
inline void LoadRow(const void* src, int64_t n, float* dst) {
  if constexpr (T == DType::kF32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  } else {
    const auto* bits = static_cast<const uint16_t*>(src);  // [n]
    if constexpr (T == DType::kF16) {
      for (int64_t i = 0; i < n; ++i) dst[i] = HalfBitsToFloatFast(bits[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(static_cast<uint32_t>(bits[i]) << 16);
    }
  }
}

// n floats at src -> n elements of dtype T at dst (round to nearest even).
template <DType T>
inline void StoreRow(const float* src, int64_t n, void* dst) {
  if constexpr (T == DType::kF32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  } else {
    auto* bits = static_cast<uint16_t*>(dst);  // [n]
    if constexpr (T == DType::kF16) {
      for (int64_t i = 0; i < n; ++i) bits[i] = FloatToHalfBitsFast(src[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) bits[i] = FloatToBF16BitsFast(src[i]);
    }
  }
}

// Calls f(std::integral_constant<DType, t>{}) — the runtime dtype as a compile-time constant.
template <typename F>
inline decltype(auto) DispatchDType(DType t, F&& f) {
  switch (t) {
    case DType::kF32:
      return f(std::integral_constant<DType, DType::kF32>{});
    case DType::kF16:
      return f(std::integral_constant<DType, DType::kF16>{});
    case DType::kBF16:
    default:
      return f(std::integral_constant<DType, DType::kBF16>{});
  }
}

}  // namespace kvcache::cpu

#endif  // KVCACHE_CPU_CONVERT_H_
