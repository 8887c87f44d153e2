// Decode attention on the GPU: the paged kernel of cuda/kernels.cuh against the device's copy
// bandwidth, and a compacted (10% kept) cache against the full one.
//
//   BM_CudaDecodeAttention/context/batch/page/bf16   one decode step over batch * 8 kv heads
//       streams of `context` tokens (D = 128, G = 4, Llama-3-8B-like), pages of `page` tokens
//       placed in random order in one arena. bytes_per_second counts the K/V bytes the step
//       must read, so it is directly comparable with the copy baseline.
//   BM_CudaDecodeAttentionKeep10/...                  the same step after a 10% budget: streams
//       of context / 10 tokens. speedup_vs_full is the full step's time over this one's, both
//       measured in this run.
//   BM_DeviceCopy/context/batch                       cudaMemcpy device-to-device of the same K/V
//       byte count (bytes_per_second counts bytes copied; DRAM traffic is twice that).
//
// All timings are CUDA events around the launches (UseManualTime). Without a usable device every
// benchmark reports an error and the program still exits normally.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda/kernels.cuh"

namespace kvcache::cuda {
namespace {

constexpr int32_t kKvHeads = 8;
constexpr int32_t kGroup = 4;
constexpr int32_t kHeadDim = 128;
constexpr int kWarmup = 3;

bool Ok(cudaError_t e, benchmark::State& state) {
  if (e == cudaSuccess) return true;
  state.SkipWithError(cudaGetErrorString(e));
  return false;
}

// Deterministic pseudo-random values in [-1, 1) (a hash of the index; no curand dependency).
__device__ __forceinline__ float HashUniform(uint64_t i, uint32_t seed) {
  uint32_t x = static_cast<uint32_t>(i) * 0x9E3779B9u ^ static_cast<uint32_t>(i >> 32) ^ seed;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return static_cast<float>(x >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

__global__ void FillHalfKernel(uint16_t* data, int64_t n, DType dtype, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float v = HashUniform(static_cast<uint64_t>(i), seed);
    data[i] = dtype == DType::kF16 ? FloatToHalfBits(v) : FloatToBF16Bits(v);
  }
}

__global__ void FillFloatKernel(float* data, int64_t n, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    data[i] = HashUniform(static_cast<uint64_t>(i), seed);
  }
}

int NumSms() {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms;
}

// A device arena with `streams` single-segment streams of `length` tokens, pages shuffled, plus
// query, output and split workspace: everything one LaunchDecodeAttention needs.
class DecodeSetup {
 public:
  DecodeSetup() = default;
  DecodeSetup(const DecodeSetup&) = delete;
  DecodeSetup& operator=(const DecodeSetup&) = delete;
  ~DecodeSetup() {
    for (void* p : allocations_) cudaFree(p);
  }

  cudaError_t Init(DType dtype, int32_t streams, int32_t length, int32_t page_tokens) {
    const int64_t page_bytes = int64_t{page_tokens} * 2 * kHeadDim * DTypeSize(dtype);
    const int64_t pages_per_stream = CeilDiv(length, page_tokens);
    const int64_t num_pages = pages_per_stream * streams;
    kv_bytes_ = int64_t{streams} * length * 2 * kHeadDim * DTypeSize(dtype);
    uint8_t* arena = nullptr;
    if (cudaError_t e = Alloc(&arena, num_pages * page_bytes); e != cudaSuccess) return e;
    FillHalfKernel<<<1024, 256>>>(reinterpret_cast<uint16_t*>(arena), num_pages * page_bytes / 2,
                                  dtype, 17u);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;

    // Pages in random order: what a pool looks like after many appends, forks and evictions.
    std::vector<int32_t> pages(static_cast<size_t>(num_pages));  // [streams, pages_per_stream]
    std::iota(pages.begin(), pages.end(), 0);
    std::mt19937 rng(42u);
    std::shuffle(pages.begin(), pages.end(), rng);
    int32_t* d_pages = nullptr;
    if (cudaError_t e = Upload(&d_pages, pages); e != cudaSuccess) return e;

    std::vector<SegmentView> segments(static_cast<size_t>(streams));         // [streams]
    std::vector<int32_t> segment_offsets(static_cast<size_t>(streams) + 1);  // [streams + 1]
    std::vector<int64_t> token_offsets(static_cast<size_t>(streams) + 1);    // [streams + 1]
    for (int32_t i = 0; i < streams; ++i) {
      SegmentView& s = segments[i];
      s.pages = d_pages + int64_t{i} * pages_per_stream;
      s.length = length;
      s.tokens_per_page = page_tokens;
      s.key_width = kHeadDim;
      s.value_width = kHeadDim;
      segment_offsets[i + 1] = i + 1;
      token_offsets[i + 1] = token_offsets[i] + length;
    }
    SegmentView* d_segments = nullptr;
    int32_t* d_segment_offsets = nullptr;
    int64_t* d_token_offsets = nullptr;
    if (cudaError_t e = Upload(&d_segments, segments); e != cudaSuccess) return e;
    if (cudaError_t e = Upload(&d_segment_offsets, segment_offsets); e != cudaSuccess) return e;
    if (cudaError_t e = Upload(&d_token_offsets, token_offsets); e != cudaSuccess) return e;

    const int64_t heads = int64_t{streams} * kGroup;
    float* q = nullptr;    // [streams, G, D]
    float* out = nullptr;  // [streams, G, D]
    float* lse = nullptr;  // [streams, G]
    if (cudaError_t e = Alloc(&q, heads * kHeadDim * 4); e != cudaSuccess) return e;
    if (cudaError_t e = Alloc(&out, heads * kHeadDim * 4); e != cudaSuccess) return e;
    if (cudaError_t e = Alloc(&lse, heads * 4); e != cudaSuccess) return e;
    FillFloatKernel<<<256, 256>>>(q, heads * kHeadDim, 5u);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;

    args_.pool.base = arena;
    args_.pool.page_bytes = page_bytes;
    args_.pool.num_pages = static_cast<int32_t>(num_pages);
    args_.pool.dtype = dtype;
    args_.head_dim = kHeadDim;
    args_.num_streams = streams;
    args_.stream_segment_offsets = d_segment_offsets;
    args_.segments = d_segments;
    args_.stream_token_offsets = d_token_offsets;
    args_.max_stream_length = length;
    args_.num_queries = streams;
    args_.group_size = kGroup;
    args_.scale = 0.08838834764f;  // 1 / sqrt(128)
    args_.q = q;
    args_.out = out;
    args_.lse = lse;
    split_ = PlanDecodeSplit(streams, kGroup, length, NumSms());
    const int64_t workspace = DecodeWorkspaceFloats(split_, streams, kGroup, kHeadDim);
    if (workspace > 0) {
      if (cudaError_t e = Alloc(&workspace_, workspace * 4); e != cudaSuccess) return e;
    }
    return cudaDeviceSynchronize();
  }

  cudaError_t Launch(cudaStream_t stream) const {
    return LaunchDecodeAttention(args_, split_, workspace_, stream);
  }

  // Mean milliseconds of one decode step over `iterations` back-to-back launches.
  cudaError_t MeanMs(int iterations, cudaEvent_t start, cudaEvent_t stop, float* ms) const {
    for (int i = 0; i < kWarmup; ++i) {
      if (cudaError_t e = Launch(nullptr); e != cudaSuccess) return e;
    }
    cudaEventRecord(start);
    for (int i = 0; i < iterations; ++i) {
      if (cudaError_t e = Launch(nullptr); e != cudaSuccess) return e;
    }
    cudaEventRecord(stop);
    if (cudaError_t e = cudaEventSynchronize(stop); e != cudaSuccess) return e;
    cudaEventElapsedTime(ms, start, stop);
    *ms /= static_cast<float>(iterations);
    return cudaSuccess;
  }

  int64_t kv_bytes() const { return kv_bytes_; }
  const DecodeSplit& split() const { return split_; }

 private:
  template <typename T>
  cudaError_t Alloc(T** p, int64_t bytes) {
    void* raw = nullptr;
    const cudaError_t e = cudaMalloc(&raw, static_cast<size_t>(std::max<int64_t>(bytes, 256)));
    if (e != cudaSuccess) return e;
    allocations_.push_back(raw);
    *p = static_cast<T*>(raw);
    return cudaSuccess;
  }
  template <typename T>
  cudaError_t Upload(T** p, const std::vector<T>& host) {
    const int64_t bytes = static_cast<int64_t>(host.size() * sizeof(T));
    if (cudaError_t e = Alloc(p, bytes); e != cudaSuccess) return e;
    return cudaMemcpy(*p, host.data(), static_cast<size_t>(bytes), cudaMemcpyHostToDevice);
  }

  std::vector<void*> allocations_;
  AttentionArgs args_;
  DecodeSplit split_;
  float* workspace_ = nullptr;
  int64_t kv_bytes_ = 0;
};

class Events {
 public:
  Events() {
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
  }
  ~Events() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  cudaEvent_t start = nullptr;
  cudaEvent_t stop = nullptr;
};

DType DTypeArg(int64_t bf16) { return bf16 != 0 ? DType::kBF16 : DType::kF16; }

// Times each step with events and reports K/V bytes read per second.
void TimeSteps(benchmark::State& state, const DecodeSetup& setup) {
  Events events;
  for (int i = 0; i < kWarmup; ++i) {
    if (!Ok(setup.Launch(nullptr), state)) return;
  }
  for (auto _ : state) {
    cudaEventRecord(events.start);
    if (!Ok(setup.Launch(nullptr), state)) return;
    cudaEventRecord(events.stop);
    if (!Ok(cudaEventSynchronize(events.stop), state)) return;
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, events.start, events.stop);
    state.SetIterationTime(ms / 1e3);
  }
  state.SetBytesProcessed(state.iterations() * setup.kv_bytes());
  state.counters["splits"] = setup.split().num_splits;
}

void BM_CudaDecodeAttention(benchmark::State& state) {
  const int32_t context = static_cast<int32_t>(state.range(0));
  const int32_t batch = static_cast<int32_t>(state.range(1));
  DecodeSetup setup;
  if (!Ok(setup.Init(DTypeArg(state.range(3)), batch * kKvHeads, context,
                     static_cast<int32_t>(state.range(2))),
          state)) {
    return;
  }
  TimeSteps(state, setup);
}

void BM_CudaDecodeAttentionKeep10(benchmark::State& state) {
  const int32_t context = static_cast<int32_t>(state.range(0));
  const int32_t batch = static_cast<int32_t>(state.range(1));
  const int32_t page = static_cast<int32_t>(state.range(2));
  const DType dtype = DTypeArg(state.range(3));
  float full_ms = 0.0f;
  {
    DecodeSetup full;
    Events events;
    if (!Ok(full.Init(dtype, batch * kKvHeads, context, page), state)) return;
    if (!Ok(full.MeanMs(20, events.start, events.stop, &full_ms), state)) return;
  }
  DecodeSetup kept;  // after compaction the stream simply is context / 10 dense tokens
  if (!Ok(kept.Init(dtype, batch * kKvHeads, std::max(1, context / 10), page), state)) return;
  TimeSteps(state, kept);
  Events events;
  float kept_ms = 0.0f;
  if (!Ok(kept.MeanMs(20, events.start, events.stop, &kept_ms), state)) return;
  state.counters["full_ms"] = full_ms;
  state.counters["speedup_vs_full"] = kept_ms > 0.0f ? full_ms / kept_ms : 0.0f;
}

void BM_DeviceCopy(benchmark::State& state) {
  const int64_t bytes = int64_t{static_cast<int32_t>(state.range(1))} * kKvHeads * state.range(0) *
                        2 * kHeadDim * 2;  // f16/bf16 K/V of the decode step
  void* src = nullptr;
  void* dst = nullptr;
  if (!Ok(cudaMalloc(&src, static_cast<size_t>(bytes)), state)) return;
  if (!Ok(cudaMalloc(&dst, static_cast<size_t>(bytes)), state)) {
    cudaFree(src);
    return;
  }
  Events events;
  cudaMemcpy(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice);  // warm-up
  for (auto _ : state) {
    cudaEventRecord(events.start);
    cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToDevice);
    cudaEventRecord(events.stop);
    if (!Ok(cudaEventSynchronize(events.stop), state)) break;
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, events.start, events.stop);
    state.SetIterationTime(ms / 1e3);
  }
  state.SetBytesProcessed(state.iterations() * bytes);
  cudaFree(src);
  cudaFree(dst);
}

BENCHMARK(BM_DeviceCopy)
    ->ArgsProduct({{4096, 16384, 65536}, {1, 16, 64}})
    ->ArgNames({"context", "batch"})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaDecodeAttention)
    ->ArgsProduct({{4096, 16384, 65536}, {1, 16, 64}, {16, 64}, {0, 1}})
    ->ArgNames({"context", "batch", "page", "bf16"})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_CudaDecodeAttentionKeep10)
    ->ArgsProduct({{4096, 16384, 65536}, {1, 16, 64}, {16, 64}, {0, 1}})
    ->ArgNames({"context", "batch", "page", "bf16"})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace kvcache::cuda

BENCHMARK_MAIN();
