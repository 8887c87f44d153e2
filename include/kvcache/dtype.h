// kvcache/dtype.h — element types the cache stores, and exact conversions to and from float.
//
// The cache stores K/V in f32, f16 (IEEE binary16) or bf16; every kernel accumulates in f32.
// The conversions are plain bit manipulation so that host code, the CPU backend and CUDA kernels
// share one definition (round-to-nearest-even, NaN stays NaN, overflow saturates to infinity).
//
// Example:
//   uint16_t h = kvcache::FloatToHalfBits(1.5f);      // 0x3E00
//   float f = kvcache::HalfBitsToFloat(h);            // 1.5f
//   size_t bytes = kvcache::DTypeSize(kvcache::DType::kBF16);  // 2
#ifndef KVCACHE_DTYPE_H_
#define KVCACHE_DTYPE_H_

#include <cstdint>
#include <cstring>

#include "kvcache/macros.h"

namespace kvcache {

enum class DType : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

KVC_HOST_DEVICE inline constexpr int DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }

// "f32", "f16", "bf16" (host only; for messages and tools).
const char* DTypeName(DType t);

KVC_HOST_DEVICE inline uint32_t FloatBits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

KVC_HOST_DEVICE inline float BitsToFloat(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

KVC_HOST_DEVICE inline float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1F) {  // inf or NaN
    return BitsToFloat(sign | 0x7F800000u | (mantissa << 13));
  }
  if (exponent == 0) {
    if (mantissa == 0) return BitsToFloat(sign);
    // Subnormal half: value = mantissa * 2^-24, exactly representable as a float.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return BitsToFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

KVC_HOST_DEVICE inline uint16_t FloatToHalfBits(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs >= 0x7F800000u) {  // inf or NaN (keep NaN quiet)
    return static_cast<uint16_t>(sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520
  if (abs < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    if (abs < 0x33000000u) return sign;  // < 2^-25 rounds to zero
    const uint32_t exponent = abs >> 23;
    const uint32_t mantissa = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // 14 + 113 - 1 - exponent ... in [14, 24]
    uint32_t result = mantissa >> shift;
    const uint32_t remainder = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (remainder > halfway || (remainder == halfway && (result & 1u))) ++result;
    return static_cast<uint16_t>(sign | result);
  }
  uint32_t result = ((abs >> 13) - (112u << 10));
  const uint32_t remainder = abs & 0x1FFFu;
  if (remainder > 0x1000u || (remainder == 0x1000u && (result & 1u))) ++result;
  return static_cast<uint16_t>(sign | result);
}

KVC_HOST_DEVICE inline float BF16BitsToFloat(uint16_t b) {
  return BitsToFloat(static_cast<uint32_t>(b) << 16);
}

KVC_HOST_DEVICE inline uint16_t FloatToBF16Bits(float f) {
  const uint32_t u = FloatBits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
  const uint32_t rounding = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

// Loads element i of a buffer of type t as float.
KVC_HOST_DEVICE inline float LoadAsFloat(const void* data, DType t, long long i) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(data)[i];
    case DType::kF16:
      return HalfBitsToFloat(static_cast<const uint16_t*>(data)[i]);
    case DType::kBF16:
    default:
      return BF16BitsToFloat(static_cast<const uint16_t*>(data)[i]);
  }
}

// Stores a float as element i of a buffer of type t (round-to-nearest-even).
KVC_HOST_DEVICE inline void StoreFromFloat(void* data, DType t, long long i, float v) {
  switch (t) {
    case DType::kF32:
      static_cast<float*>(data)[i] = v;
      return;
    case DType::kF16:
      static_cast<uint16_t*>(data)[i] = FloatToHalfBits(v);
      return;
    case DType::kBF16:
    default:
      static_cast<uint16_t*>(data)[i] = FloatToBF16Bits(v);
      return;
  }
}

// The value a buffer of type t holds after storing x (round-to-nearest-even), as f32: what the
// pool returns for a key written as x. Host code that mirrors stored values (page summaries,
// key indexes, tests) uses this instead of its own round trip.
KVC_HOST_DEVICE inline float RoundToDType(float x, DType t) {
  switch (t) {
    case DType::kF16:
      return HalfBitsToFloat(FloatToHalfBits(x));
    case DType::kBF16:
      return BF16BitsToFloat(FloatToBF16Bits(x));
    case DType::kF32:
    default:
      return x;
  }
}

}  // namespace kvcache

#endif  // KVCACHE_DTYPE_H_
