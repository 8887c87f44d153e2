// Tests for kvcache/dtype.h: exact conversions between float and f16 / bf16.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <random>

#include "kvcache/dtype.h"

using namespace kvcache;

// An independent f16 encoder: round-to-nearest-even computed in double arithmetic.
static uint16_t ReferenceHalf(float f) {
  if (std::isnan(f)) return 0x7E00;
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  double a = std::fabs(static_cast<double>(f));
  if (a >= 65520.0) return sign | 0x7C00;
  // Scale so the 10-bit mantissa (or subnormal unit 2^-24) becomes an integer, then round half
  // to even with nearbyint (the default rounding mode is to-nearest-even).
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  int exponent = e - 1;  // a = 1.x * 2^exponent
  if (exponent < -14) exponent = -14;  // subnormal range shares the 2^-24 unit
  const double unit = std::ldexp(1.0, exponent - 10);
  double q = std::nearbyint(a / unit);  // integer in [0, 2048]
  double value = q * unit;
  if (value == 0) return sign;
  // Re-encode the rounded value exactly.
  int e2;
  std::frexp(value, &e2);
  int exp2 = e2 - 1;
  if (exp2 < -14) {  // subnormal
    return sign | static_cast<uint16_t>(value / std::ldexp(1.0, -24));
  }
  const uint16_t biased = static_cast<uint16_t>(exp2 + 15);
  const uint16_t mantissa =
      static_cast<uint16_t>((value / std::ldexp(1.0, exp2) - 1.0) * 1024.0);
  return sign | static_cast<uint16_t>(biased << 10) | mantissa;
}

TEST_CASE("f16 bits round-trip through float exactly for every value", "[dtype]") {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const uint16_t h = static_cast<uint16_t>(bits);
    const float f = HalfBitsToFloat(h);
    if (std::isnan(f)) {
      REQUIRE(std::isnan(HalfBitsToFloat(FloatToHalfBits(f))));
      continue;
    }
    REQUIRE(FloatToHalfBits(f) == h);
  }
}

TEST_CASE("f16 encoding rounds to nearest even like a double-precision reference", "[dtype]") {
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits;
  int checked = 0;
  for (int i = 0; i < 200000; ++i) {
    uint32_t u = bits(rng);
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f) || std::isinf(f)) continue;
    // Focus on the representable range and just around it.
    if (std::fabs(f) > 70000.0f || (std::fabs(f) < 1e-9f && f != 0)) {
      f = std::ldexp(std::fabs(std::fmod(f, 1.0f)) + 0.5f, static_cast<int>(u % 44) - 28);
    }
    REQUIRE(FloatToHalfBits(f) == ReferenceHalf(f));
    ++checked;
  }
  REQUIRE(checked > 100000);
  // Ties: 1 + 2^-11 is halfway between 1 and 1 + 2^-10 and rounds to even (1).
  REQUIRE(FloatToHalfBits(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);
  REQUIRE(FloatToHalfBits(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3C02);
  REQUIRE(FloatToHalfBits(65504.0f) == 0x7BFF);
  REQUIRE(FloatToHalfBits(65520.0f) == 0x7C00);
  REQUIRE(FloatToHalfBits(-INFINITY) == 0xFC00);
  REQUIRE(FloatToHalfBits(std::ldexp(1.0f, -24)) == 0x0001);
  REQUIRE(FloatToHalfBits(std::ldexp(1.0f, -25)) == 0x0000);  // tie to even
  REQUIRE(std::isnan(HalfBitsToFloat(FloatToHalfBits(NAN))));
}

TEST_CASE("bf16 conversion rounds to nearest even and keeps NaN", "[dtype]") {
  for (uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float f = BF16BitsToFloat(static_cast<uint16_t>(bits));
    if (std::isnan(f)) {
      REQUIRE(std::isnan(BF16BitsToFloat(FloatToBF16Bits(f))));
    } else {
      REQUIRE(FloatToBF16Bits(f) == bits);
    }
  }
  REQUIRE(FloatToBF16Bits(BitsToFloat(0x3F808000u)) == 0x3F80);  // tie, even stays
  REQUIRE(FloatToBF16Bits(BitsToFloat(0x3F818000u)) == 0x3F82);  // tie, odd rounds up
  REQUIRE(FloatToBF16Bits(BitsToFloat(0x3F808001u)) == 0x3F81);  // above tie
  std::mt19937 rng(3);
  std::uniform_int_distribution<uint32_t> dist;
  for (int i = 0; i < 100000; ++i) {
    const float f = BitsToFloat(dist(rng));
    if (std::isnan(f)) continue;
    const float r = BF16BitsToFloat(FloatToBF16Bits(f));
    // The result is the nearer of the two bf16 neighbours of f (truncation and one ulp up).
    const uint16_t lo_bits = static_cast<uint16_t>(FloatBits(f) >> 16);
    const double lo = BF16BitsToFloat(lo_bits);
    const double hi = BF16BitsToFloat(static_cast<uint16_t>(lo_bits + 1));
    REQUIRE((double(r) == lo || double(r) == hi));
    if (std::isinf(hi)) continue;
    REQUIRE(std::fabs(double(r) - f) <= std::min(std::fabs(lo - f), std::fabs(hi - f)));
  }
}

TEST_CASE("LoadAsFloat and StoreFromFloat agree for every dtype", "[dtype]") {
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    uint8_t buffer[16] = {};
    StoreFromFloat(buffer, t, 1, 0.3333f);
    const float back = LoadAsFloat(buffer, t, 1);
    const float tol = t == DType::kF32 ? 0.0f : (t == DType::kF16 ? 1e-3f : 2e-3f);
    REQUIRE(std::fabs(back - 0.3333f) <= tol);
    REQUIRE(DTypeSize(t) == (t == DType::kF32 ? 4 : 2));
  }
  REQUIRE(std::string(DTypeName(DType::kBF16)) == "bf16");
}
