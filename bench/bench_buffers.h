// bench/bench_buffers.h — page-aligned host buffers of random K/V for the CPU decode benchmarks.
//
// Example:
//   Buffer arena = AllocateBytes(bytes);
//   FillRandom(arena.get(), bytes / DTypeSize(DType::kF16), DType::kF16, /*seed=*/1);
#ifndef KVCACHE_BENCH_BENCH_BUFFERS_H_
#define KVCACHE_BENCH_BENCH_BUFFERS_H_

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "kvcache/dtype.h"

namespace kvcache::bench {

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<uint8_t, FreeDeleter>;

// `bytes` rounded up to whole 4 KiB pages, 4 KiB aligned.
inline Buffer AllocateBytes(int64_t bytes) {
  const int64_t rounded = (bytes + 4095) / 4096 * 4096;
  return Buffer(static_cast<uint8_t*>(std::aligned_alloc(4096, static_cast<size_t>(rounded))));
}

// Fills `elements` values of type t with small random numbers: a repeated random block
// (generating 1 GiB of fresh random numbers would dominate the benchmark's setup time, and
// timing does not depend on the values as long as they are ordinary numbers).
inline void FillRandom(uint8_t* data, int64_t elements, DType t, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  constexpr int64_t kBlockElements = 1 << 16;
  std::vector<uint8_t> block(kBlockElements * DTypeSize(t));
  for (int64_t i = 0; i < kBlockElements; ++i) StoreFromFloat(block.data(), t, i, uniform(rng));
  const int64_t bytes = elements * DTypeSize(t);
  for (int64_t off = 0; off < bytes; off += static_cast<int64_t>(block.size())) {
    std::memcpy(
        data + off, block.data(),
        static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(block.size()), bytes - off)));
  }
}

}  // namespace kvcache::bench

#endif  // KVCACHE_BENCH_BENCH_BUFFERS_H_
