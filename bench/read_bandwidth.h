// bench/read_bandwidth.h — the memory-read roofline the CPU decode benchmarks are judged against.
//
// What the machine can read, measured the way a decode would have to: the same number of threads
// as the decode kernel (oneTBB's concurrency), each thread reading one contiguous slice with wide
// loads, in several variants, of which the best counts (an honest roofline is the most any simple
// read achieves, not one arbitrary loop):
//   kLoad       256-bit loads (AVX2; 64-bit words without it) summed into 4 independent registers
//   kStream     the same with non-temporal loads (vmovntdqa)
//   kPrefetchN  kLoad plus a software prefetch N bytes ahead of every cache line read
// Every variant reads every byte once and its sum is returned, so nothing is optimised away.
//
// Example:
//   const Roofline r = MeasureRoofline(buffer, bytes, /*passes=*/2);   // r.best_bytes_per_second
//   const double s = ReadOnce(ReadVariant::kLoad, buffer, bytes);       // seconds for one read
#ifndef KVCACHE_BENCH_READ_BANDWIDTH_H_
#define KVCACHE_BENCH_READ_BANDWIDTH_H_

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <vector>

#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/parallel_for.h"
#include "oneapi/tbb/partitioner.h"
#include "oneapi/tbb/task_arena.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kvcache::bench {

enum class ReadVariant { kLoad = 0, kStream = 1, kPrefetch512 = 2, kPrefetch2048 = 3 };
inline constexpr std::array<ReadVariant, 4> kReadVariants = {
    ReadVariant::kLoad, ReadVariant::kStream, ReadVariant::kPrefetch512, ReadVariant::kPrefetch2048};

inline const char* ReadVariantName(ReadVariant v) {
  switch (v) {
    case ReadVariant::kLoad: return "load";
    case ReadVariant::kStream: return "stream";
    case ReadVariant::kPrefetch512: return "load+prefetch512";
    case ReadVariant::kPrefetch2048: return "load+prefetch2048";
  }
  return "?";
}

// Sum of the 64-bit words of [p, p + bytes); bytes a multiple of 256, p 32-byte aligned.
inline uint64_t ReadPortable(const uint8_t* p, int64_t bytes) {
  const auto* w = reinterpret_cast<const uint64_t*>(p);
  uint64_t lanes[8] = {};
  for (int64_t i = 0; i < bytes / 8; i += 8) {
    for (int j = 0; j < 8; ++j) lanes[j] += w[i + j];
  }
  uint64_t s = 0;
  for (uint64_t x : lanes) s += x;
  return s;
}

#if defined(__x86_64__) && defined(__GNUC__)
template <ReadVariant kV>
__attribute__((target("avx2"))) inline uint64_t ReadAvx2(const uint8_t* p, int64_t bytes) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  constexpr int64_t kAhead = kV == ReadVariant::kPrefetch512 ? 512 : 2048;
  for (int64_t i = 0; i < bytes; i += 128) {  // two cache lines per step
    const auto* q = reinterpret_cast<const __m256i*>(p + i);
    if constexpr (kV == ReadVariant::kPrefetch512 || kV == ReadVariant::kPrefetch2048) {
      _mm_prefetch(reinterpret_cast<const char*>(p + i + kAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(p + i + kAhead + 64), _MM_HINT_T0);
    }
    if constexpr (kV == ReadVariant::kStream) {
      a0 = _mm256_add_epi64(a0, _mm256_stream_load_si256(q));
      a1 = _mm256_add_epi64(a1, _mm256_stream_load_si256(q + 1));
      a2 = _mm256_add_epi64(a2, _mm256_stream_load_si256(q + 2));
      a3 = _mm256_add_epi64(a3, _mm256_stream_load_si256(q + 3));
    } else {
      a0 = _mm256_add_epi64(a0, _mm256_load_si256(q));
      a1 = _mm256_add_epi64(a1, _mm256_load_si256(q + 1));
      a2 = _mm256_add_epi64(a2, _mm256_load_si256(q + 2));
      a3 = _mm256_add_epi64(a3, _mm256_load_si256(q + 3));
    }
  }
  alignas(32) uint64_t out[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(out),
                     _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
  return out[0] + out[1] + out[2] + out[3];
}
#endif

inline uint64_t ReadSlice(ReadVariant v, const uint8_t* p, int64_t bytes) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx2")) {
    switch (v) {
      case ReadVariant::kLoad: return ReadAvx2<ReadVariant::kLoad>(p, bytes);
      case ReadVariant::kStream: return ReadAvx2<ReadVariant::kStream>(p, bytes);
      case ReadVariant::kPrefetch512: return ReadAvx2<ReadVariant::kPrefetch512>(p, bytes);
      case ReadVariant::kPrefetch2048: return ReadAvx2<ReadVariant::kPrefetch2048>(p, bytes);
    }
  }
#endif
  (void)v;
  return ReadPortable(p, bytes);
}

inline double ThreadCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// One parallel read of [data, data + bytes) (bytes a multiple of 256 * threads, data 4 KiB
// aligned): one contiguous slice per thread. Returns the wall seconds it took; *sum receives the
// sum, *cpu_seconds the largest CPU time one slice's thread spent (the wall time the read would
// take if every thread had a core to itself: on a machine shared with other jobs, wall time
// measures the scheduler as much as the memory).
inline double ReadOnce(ReadVariant v, const uint8_t* data, int64_t bytes, uint64_t* sum = nullptr,
                       double* cpu_seconds = nullptr) {
  const int threads = oneapi::tbb::this_task_arena::max_concurrency();
  const int64_t slice = bytes / threads / 256 * 256;
  std::vector<uint64_t> partial(static_cast<size_t>(threads), 0);
  std::vector<double> cpu(static_cast<size_t>(threads), 0.0);
  const auto start = std::chrono::steady_clock::now();
  oneapi::tbb::parallel_for(
      oneapi::tbb::blocked_range<int>(0, threads, 1),
      [&](const oneapi::tbb::blocked_range<int>& r) {
        for (int t = r.begin(); t < r.end(); ++t) {
          const int64_t begin = int64_t{t} * slice;
          const int64_t end = t == threads - 1 ? bytes / 256 * 256 : begin + slice;
          const double c0 = ThreadCpuSeconds();
          partial[t] = ReadSlice(v, data + begin, end - begin);
          cpu[t] = ThreadCpuSeconds() - c0;
        }
      },
      oneapi::tbb::static_partitioner());
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  uint64_t s = 0;
  for (uint64_t x : partial) s += x;
  if (sum != nullptr) *sum = s;
  if (cpu_seconds != nullptr) *cpu_seconds = *std::max_element(cpu.begin(), cpu.end());
  return seconds;
}

struct Roofline {
  double best_bytes_per_second = 0;
  ReadVariant best = ReadVariant::kLoad;
  std::array<double, kReadVariants.size()> bytes_per_second{};  // best pass of each variant
  // The same on CPU time (bytes / the slowest thread's CPU seconds): what the machine reads when
  // the threads run, not waiting for a core. Best over variants and passes.
  double best_bytes_per_cpu_second = 0;
};

// Best of `passes` reads per variant, variants interleaved (so a burst of load elsewhere on a
// shared machine does not fall on one variant only).
inline Roofline MeasureRoofline(const uint8_t* data, int64_t bytes, int passes) {
  Roofline r;
  uint64_t sink = 0;
  for (int pass = 0; pass < passes; ++pass) {
    for (size_t i = 0; i < kReadVariants.size(); ++i) {
      uint64_t sum = 0;
      double cpu_seconds = 0;
      const double seconds = ReadOnce(kReadVariants[i], data, bytes, &sum, &cpu_seconds);
      sink += sum;
      r.bytes_per_second[i] = std::max(r.bytes_per_second[i], static_cast<double>(bytes) / seconds);
      r.best_bytes_per_cpu_second =
          std::max(r.best_bytes_per_cpu_second, static_cast<double>(bytes) / cpu_seconds);
    }
  }
  for (size_t i = 0; i < kReadVariants.size(); ++i) {
    if (r.bytes_per_second[i] > r.best_bytes_per_second) {
      r.best_bytes_per_second = r.bytes_per_second[i];
      r.best = kReadVariants[i];
    }
  }
  // The sums depend on every byte; an impossible value keeps the reads from being elided.
  if (sink == 0x5eed) r.best_bytes_per_second += 1e-9;
  return r;
}

}  // namespace kvcache::bench

#endif  // KVCACHE_BENCH_READ_BANDWIDTH_H_
