// The host overhead of a decode step through the Cache: one step = one DecodeAttention per layer
// over a batch, the way an engine calls it. Two ways, measured in the same run:
//   BM_DecodeStepPerCall/<context>/<batch>/<layers>   DecodeAttention(batch, layer, ...) per
//       layer: every call finds the sequences, sorts the lock order and builds the views
//   BM_DecodeStepPlanned/<context>/<batch>/<layers>   PrepareDecode(batch) once per step, then
//       DecodeAttention(plan, layer, ...) per layer: lock, refresh the layer's views, run
// Shape: 8 kv heads x G = 4 (32 q heads), head_dim 128, f16, 16 tokens per page.
//   <kernel> = 0: a backend with the "cpu" backend's memory whose DecodeAttention returns at
//       once, so the step time is the Cache's host overhead alone (lookup, locks, views);
//   <kernel> = 1: the "cpu" backend (fast kernels).
// 256 tokens x batch 8 x 32 layers is the small context where host overhead is a visible share
// of a step; 8192 tokens x batch 4 x 2 layers (kernel 1) checks that the planned path is not
// slower where the kernel dominates. items = layer calls (items/s = per-layer calls per second);
// the time is per step. The CPU column is the process's CPU time over all threads (robust on a
// shared machine, where wall time is inflated by other processes).
//
// The file also builds against a tree without decode plans (the commit before them): there only
// BM_DecodeStepPerCall exists, the baseline of the per-call path before this change.
//
// Run: bench_decode_plan --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

#include "kvcache/cache.h"

#if __has_include("kvcache/decode_plan.h")
#define KVC_BENCH_HAVE_DECODE_PLAN 1
#else
#define KVC_BENCH_HAVE_DECODE_PLAN 0
#endif

namespace kvcache {
namespace {

constexpr int32_t kKvHeads = 8;
constexpr int32_t kQHeads = 32;
constexpr int32_t kHeadDim = 128;

// The "cpu" backend's memory and row operations, and a decode kernel that does nothing.
class NullKernelBackend final : public Backend {
 public:
  NullKernelBackend() : inner_(*CreateBackend("cpu")) {}
  std::string_view Name() const override { return "null-kernel"; }
  bool HostAccessible() const override { return true; }
#if KVC_BENCH_HAVE_DECODE_PLAN
  bool Supports(BackendOp op) const override { return op == BackendOp::kDecodeAttention; }
#endif
  absl::StatusOr<void*> AllocateArena(int64_t bytes) override {
    return inner_->AllocateArena(bytes);
  }
  void FreeArena(void* arena) override { inner_->FreeArena(arena); }
  absl::Status CopyPages(const PoolView& pool, std::span<const PageCopy> copies) override {
    return inner_->CopyPages(pool, copies);
  }
  absl::Status WriteRows(const PoolView& pool, std::span<const RowWrite> writes) override {
    return inner_->WriteRows(pool, writes);
  }
  absl::Status GatherRows(const PoolView& pool, std::span<const RowGather> gathers) override {
    return inner_->GatherRows(pool, gathers);
  }
  absl::Status ReadRows(const PoolView& pool, const SegmentView& segment, int32_t head_dim,
                        int32_t first_row, int32_t count, float* keys, float* values) override {
    return inner_->ReadRows(pool, segment, head_dim, first_row, count, keys, values);
  }
  absl::Status DecodeAttention(const PagedKVView& kv, const DecodeParams& params, const float* q,
                               float* out, float* lse) override {
    benchmark::DoNotOptimize(kv.segments);
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<Backend> inner_;
};

struct Fixture {
  std::unique_ptr<Cache> cache;
  std::vector<SequenceId> batch;
  std::vector<float> q, out;
};

// A cache with `batch` sequences of `context` tokens in each of `layers` layers.
Fixture MakeFixture(int32_t context, int32_t batch, int32_t layers, bool kernel) {
  CacheConfig c;
  c.num_layers = layers;
  c.num_kv_heads = kKvHeads;
  c.num_q_heads = kQHeads;
  c.head_dim = kHeadDim;
  c.dtype = DType::kF16;
  c.page_tokens = 16;
  c.num_pages = static_cast<int32_t>(int64_t{batch} * layers * kKvHeads * (context / 16 + 2));
  Fixture f;
  f.cache = kernel ? *Cache::Create(c, "cpu")
                   : *Cache::Create(c, std::make_unique<NullKernelBackend>());
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  constexpr int32_t kChunk = 256;  // tokens per Append, to bound the host buffers
  std::vector<float> k(size_t{kChunk} * kKvHeads * kHeadDim), v(k.size());
  for (float& x : k) x = uniform(rng);
  for (float& x : v) x = uniform(rng);
  for (int32_t b = 0; b < batch; ++b) {
    const SequenceId seq = *f.cache->AddSequence();
    f.batch.push_back(seq);
    for (int32_t l = 0; l < layers; ++l) {
      for (int32_t first = 0; first < context; first += kChunk) {
        std::vector<int32_t> pos(kChunk);
        for (int32_t i = 0; i < kChunk; ++i) pos[i] = first + i;
        if (!f.cache->Append(seq, l, {TensorRef::Of(k), TensorRef::Of(v), pos}).ok()) {
          std::abort();
        }
      }
    }
  }
  f.q.resize(static_cast<size_t>(batch) * kQHeads * kHeadDim);
  for (float& x : f.q) x = uniform(rng);
  f.out.resize(f.q.size());
  return f;
}

void BM_DecodeStepPerCall(benchmark::State& state) {
  const auto context = static_cast<int32_t>(state.range(0));
  const auto batch = static_cast<int32_t>(state.range(1));
  const auto layers = static_cast<int32_t>(state.range(2));
  Fixture f = MakeFixture(context, batch, layers, state.range(3) != 0);
  for (auto _ : state) {
    for (int32_t l = 0; l < layers; ++l) {
      if (!f.cache->DecodeAttention(f.batch, l, f.q, f.out).ok()) state.SkipWithError("decode");
    }
    benchmark::DoNotOptimize(f.out.data());
  }
  state.SetItemsProcessed(state.iterations() * layers);
}

#if KVC_BENCH_HAVE_DECODE_PLAN
void BM_DecodeStepPlanned(benchmark::State& state) {
  const auto context = static_cast<int32_t>(state.range(0));
  const auto batch = static_cast<int32_t>(state.range(1));
  const auto layers = static_cast<int32_t>(state.range(2));
  Fixture f = MakeFixture(context, batch, layers, state.range(3) != 0);
  for (auto _ : state) {
    absl::StatusOr<DecodePlan> plan = f.cache->PrepareDecode(f.batch);
    if (!plan.ok()) state.SkipWithError("prepare");
    for (int32_t l = 0; l < layers; ++l) {
      if (!f.cache->DecodeAttention(*plan, l, f.q, f.out).ok()) state.SkipWithError("decode");
    }
    benchmark::DoNotOptimize(f.out.data());
  }
  state.SetItemsProcessed(state.iterations() * layers);
}
#endif

void Shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"context", "batch", "layers", "kernel"});
  b->Args({256, 8, 32, 0});
  b->Args({256, 8, 32, 1});
  b->Args({8192, 4, 2, 1});
  b->Unit(benchmark::kMicrosecond);
  b->MeasureProcessCPUTime();
  b->UseRealTime();
}

BENCHMARK(BM_DecodeStepPerCall)->Apply(Shapes);
#if KVC_BENCH_HAVE_DECODE_PLAN
BENCHMARK(BM_DecodeStepPlanned)->Apply(Shapes);
#endif

}  // namespace
}  // namespace kvcache

BENCHMARK_MAIN();
