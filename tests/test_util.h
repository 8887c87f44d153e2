// tests/test_util.h — helpers shared by the tests: random K/V, whole-cache snapshots for
// "the cache is unchanged" checks, and a dense attention oracle.
#ifndef KVCACHE_TESTS_TEST_UTIL_H_
#define KVCACHE_TESTS_TEST_UTIL_H_

#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "kvcache/cache.h"

namespace kvcache::testing {

// Rounds a float through the dtype the cache stores (what reading it back returns).
inline float RoundTo(DType t, float x) { return RoundToDType(x, t); }

// x rounded to f16 / bf16 bits, and such bits widened back to f32 (exact).
inline std::vector<uint16_t> ToBits(const std::vector<float>& x, DType t) {
  std::vector<uint16_t> bits(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    StoreFromFloat(bits.data(), t, static_cast<long long>(i), x[i]);
  }
  return bits;
}
inline std::vector<float> FromBits(const std::vector<uint16_t>& bits, DType t) {
  std::vector<float> x(bits.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = LoadAsFloat(bits.data(), t, static_cast<long long>(i));
  return x;
}

inline std::vector<float> RandomVector(std::mt19937& rng, size_t n, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Appends `n` random tokens (K then V drawn from rng) at positions [first, first + n) to one
// layer of a sequence.
inline absl::Status AppendRandomTokens(Cache& cache, SequenceId seq, int32_t layer, int n,
                                       int first, std::mt19937& rng) {
  const CacheConfig& c = cache.config();
  const std::vector<float> k = RandomVector(rng, size_t(n) * c.num_kv_heads * c.head_dim);
  const std::vector<float> v = RandomVector(rng, size_t(n) * c.num_kv_heads * c.head_dim);
  std::vector<int32_t> pos(n);
  for (int i = 0; i < n; ++i) pos[i] = first + i;
  return cache.Append(seq, layer, {TensorRef::Of(k), TensorRef::Of(v), pos});
}

// Everything observable about every stream of every sequence.
struct CacheImage {
  std::map<std::tuple<SequenceId, int, int>, StreamContents> streams;
  CacheStats stats;
  int32_t pool_free = 0;
};

inline CacheImage Snapshot(const Cache& cache) {
  CacheImage image;
  const CacheConfig& c = cache.config();
  for (SequenceId s : cache.Sequences()) {
    for (int l = 0; l < c.num_layers; ++l) {
      for (int h = 0; h < c.num_kv_heads; ++h) {
        image.streams[{s, l, h}] = *cache.ReadStream(s, l, h);
      }
    }
  }
  image.stats = cache.Stats();
  image.pool_free = cache.pool().NumFree();
  return image;
}

inline bool SameContents(const StreamContents& a, const StreamContents& b) {
  return a.length == b.length && a.positions == b.positions && a.modalities == b.modalities &&
         a.scores == b.scores && a.keys == b.keys && a.values == b.values &&
         a.key_width == b.key_width && a.num_segments == b.num_segments;
}

inline bool SameImage(const CacheImage& a, const CacheImage& b) {
  if (a.streams.size() != b.streams.size() || a.pool_free != b.pool_free ||
      a.stats.pages_used != b.stats.pages_used || a.stats.num_sequences != b.stats.num_sequences) {
    return false;
  }
  for (const auto& [key, contents] : a.streams) {
    auto it = b.streams.find(key);
    if (it == b.streams.end() || !SameContents(contents, it->second)) return false;
  }
  return true;
}

// Dense attention of one query head over float keys/values: returns out[head_dim], lse.
inline void DenseAttention(const float* q, const std::vector<float>& keys,
                           const std::vector<float>& values, int n, int d, float scale,
                           float* out, float* lse, std::vector<double>* probs = nullptr) {
  std::vector<double> logits(n);
  double m = -INFINITY;
  for (int t = 0; t < n; ++t) {
    double dot = 0;
    for (int c = 0; c < d; ++c) dot += double(q[c]) * keys[size_t(t) * d + c];
    logits[t] = dot * scale;
    m = std::max(m, logits[t]);
  }
  double l = 0;
  for (int t = 0; t < n; ++t) l += std::exp(logits[t] - m);
  for (int c = 0; c < d; ++c) {
    double acc = 0;
    for (int t = 0; t < n; ++t) acc += std::exp(logits[t] - m) / l * values[size_t(t) * d + c];
    out[c] = n == 0 ? 0.0f : static_cast<float>(acc);
  }
  if (lse) *lse = n == 0 ? -INFINITY : static_cast<float>(m + std::log(l));
  if (probs) {
    probs->resize(n);
    for (int t = 0; t < n; ++t) (*probs)[t] = std::exp(logits[t] - m) / l;
  }
}

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTS_TEST_UTIL_H_
