// Bytes a CUDA decode call uploads host -> device, with and without the view mirror
// (cuda/view_mirror.h), in steady-state decode steps. Runs on the "cuda-emulated" backend, whose
// runtime counts every host -> device byte (cuda_emu::HostToDeviceBytes); the byte counts are
// what the real "cuda" backend uploads for the same calls (same backend source). The time
// columns are the CPU emulator's and say nothing about a GPU: read the counters.
//
//   BM_DecodeUpload/<mirror>/<context>/<batch>/<layers>
//     mirror = 0: the backend created with the mirror off (every call stages its whole view);
//     mirror = 1: the default mirror.
//     One iteration = one decode step: per layer, Append one token to every sequence (host K/V),
//     then DecodeAttention(plan, layer) with device q / out on the backend's stream. A warm-up
//     step before the timed loop mirrors the views (mirror = 1).
//   Counters: h2d_bytes_per_call = host -> device bytes of the decode calls only (the Appends'
//   row uploads are excluded) / decode calls; page_ids = page ids of the layer's view at the end
//   (what full staging uploads as page ids, x 4 bytes).
// Shape: 8 kv heads x G = 4 (32 q heads), head_dim 128, f16, 16 tokens per page.
//
// Run: bench_view_mirror --benchmark_counters_tabular=true
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

#include "cuda/emulation/runtime.h"
#include "kvcache/cache.h"

namespace kvcache {
namespace cuda_emulated {  // cuda/view_mirror.h (the emulated build's namespace)
void SetViewMirrorBytesForTesting(int64_t min_bytes);
int64_t ViewMirrorBytesForTesting();
}  // namespace cuda_emulated
namespace {

constexpr int32_t kKvHeads = 8;
constexpr int32_t kQHeads = 32;
constexpr int32_t kHeadDim = 128;
constexpr int32_t kPageTokens = 16;

void BM_DecodeUpload(benchmark::State& state) {
  const bool mirror = state.range(0) != 0;
  const auto context = static_cast<int32_t>(state.range(1));
  const auto batch = static_cast<int32_t>(state.range(2));
  const auto layers = static_cast<int32_t>(state.range(3));
  CacheConfig c;
  c.num_layers = layers;
  c.num_kv_heads = kKvHeads;
  c.num_q_heads = kQHeads;
  c.head_dim = kHeadDim;
  c.dtype = DType::kF16;
  c.page_tokens = kPageTokens;
  c.num_pages = static_cast<int32_t>(int64_t{batch} * layers * kKvHeads *
                                     (context / kPageTokens + 64));
  const int64_t saved = cuda_emulated::ViewMirrorBytesForTesting();
  cuda_emulated::SetViewMirrorBytesForTesting(mirror ? saved : 0);
  absl::StatusOr<std::unique_ptr<Cache>> created = Cache::Create(c, "cuda-emulated");
  cuda_emulated::SetViewMirrorBytesForTesting(saved);
  if (!created.ok()) {
    state.SkipWithError(created.status().ToString().c_str());
    return;
  }
  Cache& cache = **created;
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  constexpr int32_t kChunk = 512;  // tokens per Append while filling
  std::vector<float> k(size_t{kChunk} * kKvHeads * kHeadDim), v(k.size());
  for (float& x : k) x = uniform(rng);
  for (float& x : v) x = uniform(rng);
  std::vector<SequenceId> ids;
  std::vector<int32_t> pos(kChunk);
  for (int32_t b = 0; b < batch; ++b) {
    ids.push_back(*cache.AddSequence());
    for (int32_t l = 0; l < layers; ++l) {
      for (int32_t first = 0; first < context; first += kChunk) {
        for (int32_t i = 0; i < kChunk; ++i) pos[i] = first + i;
        if (!cache.Append(ids.back(), l, {TensorRef::Of(k), TensorRef::Of(v), pos}).ok()) {
          std::abort();
        }
      }
    }
  }
  const int64_t n = int64_t{batch} * kQHeads * kHeadDim;
  void* q = nullptr;
  void* out = nullptr;
  if (cuda_emu::Malloc(&q, n * 4) != cudaSuccess || cuda_emu::Malloc(&out, n * 4) != cudaSuccess) {
    std::abort();
  }
  std::vector<float> host_q(static_cast<size_t>(n));
  for (float& x : host_q) x = uniform(rng);
  cuda_emu::Memcpy(q, host_q.data(), n * 4, cudaMemcpyHostToDevice);
  absl::StatusOr<DecodePlan> plan = cache.PrepareDecode(ids);
  if (!plan.ok()) std::abort();
  int32_t next = context;
  int64_t decode_bytes = 0;
  int64_t calls = 0;
  // One decode step; `count` adds its decode calls' upload to the totals.
  auto step = [&](bool count) {
    for (int32_t l = 0; l < layers; ++l) {
      for (SequenceId id : ids) {
        const int32_t p[1] = {next};
        const std::vector<float> one(k.begin(), k.begin() + kKvHeads * kHeadDim);
        if (!cache.Append(id, l, {TensorRef::Of(one), TensorRef::Of(one), p}).ok()) std::abort();
      }
      const int64_t before = cuda_emu::HostToDeviceBytes();
      if (!cache
               .DecodeAttention(*plan, l, TensorRef::OnDevice(q, DType::kF32, n),
                                MutableTensorRef::OnDevice(out, DType::kF32, n))
               .ok() ||
          !cache.Synchronize().ok()) {
        std::abort();
      }
      if (count) {
        decode_bytes += cuda_emu::HostToDeviceBytes() - before;
        ++calls;
      }
    }
    ++next;
  };
  step(false);  // warm-up: the mirror's first full upload
  for (auto _ : state) step(true);
  state.counters["h2d_bytes_per_call"] =
      benchmark::Counter(static_cast<double>(decode_bytes) / static_cast<double>(calls));
  state.counters["page_ids"] = benchmark::Counter(static_cast<double>(
      int64_t{batch} * kKvHeads * ((next + kPageTokens - 1) / kPageTokens)));
  cuda_emu::Free(q);
  cuda_emu::Free(out);
}

BENCHMARK(BM_DecodeUpload)
    ->ArgNames({"mirror", "context", "batch", "layers"})
    ->Args({0, 8192, 8, 2})
    ->Args({1, 8192, 8, 2})
    ->Iterations(32)
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kvcache

BENCHMARK_MAIN();
