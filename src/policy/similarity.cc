#include "src/policy/similarity.h"

#include <cmath>

namespace kvcache::policy {

std::vector<float> UnitRows(std::span<const float> rows, size_t d) {
  std::vector<float> unit(rows.begin(), rows.end());
  if (d == 0) return unit;
  const size_t n = unit.size() / d;
  for (size_t j = 0; j < n; ++j) {
    float* row = &unit[j * d];
    double sq = 0.0;
    for (size_t c = 0; c < d; ++c) sq += double{row[c]} * row[c];
    const float inv = sq > 0.0 ? static_cast<float>(1.0 / std::sqrt(sq)) : 0.0f;
    for (size_t c = 0; c < d; ++c) row[c] *= inv;
  }
  return unit;
}

float DotProduct(const float* a, const float* b, size_t d) {
  constexpr size_t kLanes = 8;  // independent partial sums: one AVX / two SSE registers
  float lanes[kLanes] = {};
  size_t c = 0;
  for (; c + kLanes <= d; c += kLanes) {
    for (size_t j = 0; j < kLanes; ++j) lanes[j] += a[c + j] * b[c + j];
  }
  float tail = 0.0f;
  for (; c < d; ++c) tail += a[c] * b[c];
  for (size_t w = kLanes / 2; w > 0; w /= 2) {
    for (size_t j = 0; j < w; ++j) lanes[j] += lanes[j + w];
  }
  return lanes[0] + tail;
}

}  // namespace kvcache::policy
