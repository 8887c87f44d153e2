// Benchmarks of the paged store: page pool allocate/free and Append, each with its baseline in
// the same binary (docs/BENCHMARKS.md, "Paged store").
//   BM_PagePoolAllocFree/threads:N  one Allocate(1) + Release pair per iteration; 1 and 2 threads
//       on one pool in the same run, counter per_thread = pairs/s of one thread, thread_cpu_ns =
//       CPU ns of one thread per pair (robust to a shared machine)
//   BM_PagePoolAllocFreeBatch/16    Allocate(16) + Release of 16 pages (pairs counted)
//   BM_Append/<tokens>/<dtype>      Append of <tokens> tokens x 8 kv heads x D=128 into one layer
//   BM_MemcpyBaseline/<tokens>/<dtype>  memcpy of the same K and V bytes (the baseline)
#include <benchmark/benchmark.h>

#include <cstring>
#include <ctime>
#include <random>
#include <vector>

#include "kvcache/kvcache.h"

using namespace kvcache;

namespace {

constexpr int kHeads = 8;
constexpr int kHeadDim = 128;

std::unique_ptr<Backend>& SharedBackend() {
  static auto* backend = new std::unique_ptr<Backend>(*CreateBackend("cpu"));
  return *backend;
}

PagePool& SharedPool() {
  static PagePool* pool = (*PagePool::Create(SharedBackend().get(), 4096, 1 << 16)).release();
  return *pool;
}

double ThreadCpuNs() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return 1e9 * static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec);
}

// CPU ns per iteration of each thread, averaged over threads: on a machine shared with other jobs
// the wall-clock rate of 2 threads says how often both had a core; this says what an operation
// costs while its thread runs (spinning on a contended lock shows up here, waiting for a core
// does not).
void SetCpuCounter(benchmark::State& state, double cpu_ns, int64_t per_iteration) {
  state.counters["thread_cpu_ns"] = benchmark::Counter(
      cpu_ns / static_cast<double>(state.iterations() * per_iteration),
      benchmark::Counter::kAvgThreads);
}

void BM_PagePoolAllocFree(benchmark::State& state) {
  PagePool& pool = SharedPool();
  int32_t page;
  const double cpu0 = ThreadCpuNs();
  for (auto _ : state) {
    if (!pool.Allocate(1, &page).ok()) state.SkipWithError("allocation failed");
    pool.Release({&page, 1});
    benchmark::DoNotOptimize(page);
  }
  SetCpuCounter(state, ThreadCpuNs() - cpu0, 1);
  state.SetItemsProcessed(state.iterations());
  // Pairs per second of one thread (items_per_second is the sum over threads).
  state.counters["per_thread"] =
      benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kAvgThreadsRate);
}
BENCHMARK(BM_PagePoolAllocFree)->Threads(1)->Threads(2)->UseRealTime();

void BM_PagePoolAllocFreeBatch(benchmark::State& state) {
  PagePool& pool = SharedPool();
  const int n = static_cast<int>(state.range(0));
  std::vector<int32_t> pages(n);
  const double cpu0 = ThreadCpuNs();
  for (auto _ : state) {
    if (!pool.Allocate(n, pages.data()).ok()) state.SkipWithError("allocation failed");
    pool.Release(pages);
    benchmark::DoNotOptimize(pages.data());
  }
  SetCpuCounter(state, ThreadCpuNs() - cpu0, n);
  state.SetItemsProcessed(state.iterations() * n);
  state.counters["per_thread"] = benchmark::Counter(static_cast<double>(state.iterations() * n),
                                                    benchmark::Counter::kAvgThreadsRate);
}
BENCHMARK(BM_PagePoolAllocFreeBatch)->Arg(16)->Threads(1)->Threads(2)->UseRealTime();

struct AppendInput {
  std::vector<uint16_t> k16, v16;
  std::vector<float> k32, v32;
  std::vector<int32_t> positions;
};

AppendInput MakeInput(int tokens) {
  AppendInput in;
  std::mt19937 rng(1);
  std::normal_distribution<float> dist;
  const size_t n = size_t(tokens) * kHeads * kHeadDim;
  in.k32.resize(n);
  in.v32.resize(n);
  in.k16.resize(n);
  in.v16.resize(n);
  for (size_t i = 0; i < n; ++i) {
    in.k32[i] = dist(rng);
    in.v32[i] = dist(rng);
    in.k16[i] = FloatToHalfBits(in.k32[i]);
    in.v16[i] = FloatToHalfBits(in.v32[i]);
  }
  in.positions.resize(tokens);
  return in;
}

// Appends `tokens` tokens per iteration; the sequence is freed (outside the timing) when the
// pool is about to fill.
void BM_Append(benchmark::State& state) {
  const int tokens = static_cast<int>(state.range(0));
  const DType dtype = static_cast<DType>(state.range(1));
  CacheConfig c;
  c.num_layers = 1;
  c.num_kv_heads = kHeads;
  c.num_q_heads = kHeads * 4;
  c.head_dim = kHeadDim;
  c.dtype = dtype;
  c.page_tokens = 16;
  c.num_pages = 8192;
  auto cache = *Cache::Create(c, "cpu");
  AppendInput in = MakeInput(tokens);
  TensorRef k = dtype == DType::kF32 ? TensorRef::Of(in.k32) : TensorRef::Of(in.k16, dtype);
  TensorRef v = dtype == DType::kF32 ? TensorRef::Of(in.v32) : TensorRef::Of(in.v16, dtype);
  SequenceId seq = *cache->AddSequence();
  int32_t next = 0;
  const int pages_per_append = kHeads * ((tokens + 15) / 16 + 1);
  for (auto _ : state) {
    if (cache->pool().NumFree() < pages_per_append) {
      state.PauseTiming();
      (void)cache->Free(seq);
      seq = *cache->AddSequence();
      next = 0;
      state.ResumeTiming();
    }
    for (int i = 0; i < tokens; ++i) in.positions[i] = next++;
    if (!cache->Append(seq, 0, {k, v, in.positions}).ok()) state.SkipWithError("append failed");
  }
  state.SetItemsProcessed(state.iterations() * tokens);
  state.SetBytesProcessed(state.iterations() * int64_t{tokens} * kHeads * kHeadDim * 2 *
                          DTypeSize(dtype));
}
BENCHMARK(BM_Append)
    ->ArgsProduct({{16, 256, 2048}, {static_cast<int>(DType::kF32), static_cast<int>(DType::kF16)}})
    ->ArgNames({"tokens", "dtype"});

// The same bytes (K and V of every head) copied with memcpy into a rotating destination as big
// as the cache's pool, so both sides pay the same cache misses.
void BM_MemcpyBaseline(benchmark::State& state) {
  const int tokens = static_cast<int>(state.range(0));
  const DType dtype = static_cast<DType>(state.range(1));
  const size_t bytes = size_t(tokens) * kHeads * kHeadDim * DTypeSize(dtype);
  std::vector<uint8_t> src_k(bytes, 1), src_v(bytes, 2);
  const size_t arena_bytes = size_t(8192) * 16 * 2 * kHeadDim * DTypeSize(dtype);
  std::vector<uint8_t> arena(arena_bytes);
  size_t at = 0;
  for (auto _ : state) {
    if (at + 2 * bytes > arena_bytes) at = 0;
    std::memcpy(arena.data() + at, src_k.data(), bytes);
    std::memcpy(arena.data() + at + bytes, src_v.data(), bytes);
    at += 2 * bytes;
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * tokens);
  state.SetBytesProcessed(state.iterations() * int64_t(2 * bytes));
}
BENCHMARK(BM_MemcpyBaseline)
    ->ArgsProduct({{16, 256, 2048}, {static_cast<int>(DType::kF32), static_cast<int>(DType::kF16)}})
    ->ArgNames({"tokens", "dtype"});

}  // namespace

BENCHMARK_MAIN();
