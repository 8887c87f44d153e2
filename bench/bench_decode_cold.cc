// Cold CPU decode: what one decode step really costs when the K/V comes from DRAM, against the
// memory-read roofline measured in the same run (docs/BENCHMARKS.md, "CPU decode attention").
//
//   BM_DecodeCold/<context>/<batch>/<dtype>/<keep %>/<prefetch>
//       Each iteration decodes the NEXT of L layers (as a model's decode step does), L chosen so
//       the K/V of all layers is ~1 GiB (>> the last-level cache), pages of 16 tokens scattered
//       over one arena (the pages of all layers interleaved, as a pool hands them out). Counters:
//       bytes_per_second (K/V bytes read), roofline_GBps (the best read variant of
//       bench/read_bandwidth.h over this arena, measured at the start of this run of the
//       benchmark), pct_roofline = 100 * bytes_per_second / roofline. keep = 10 decodes streams of
//       10% of the context with the same L (what Apply leaves with a 10% budget);
//       speedup_vs_full in that row is the full-context row's time over this one (same binary,
//       run just before). prefetch: cpu::SetDecodePrefetchPages — 0 = the default (only the head
//       of the next block is prefetched), k > 0 = every line of the pages k ahead.
//   BM_DecodeColdSweep/...        the same at 8k x 1 and 1k x 8 over prefetch distances 0..8
//   BM_ReadBandwidth/<variant>   each read variant over a 1 GiB buffer (the roofline's parts).
//
// Shape: 8 kv heads x G = 4 (32 q heads), head_dim 128, one segment per stream. dtype 0 = f32,
// 1 = f16, 2 = bf16. f32 at 32k x batch 8 is one 2 GiB layer (L = 1).
//
// Run: bench_decode_cold --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "bench/bench_buffers.h"
#include "bench/read_bandwidth.h"
#include "cpu/attention.h"
#include "kvcache/backend.h"
#include "kvcache/dtype.h"
#include "kvcache/paged_view.h"
#include "oneapi/tbb/task_arena.h"

namespace kvcache {
namespace {

constexpr int32_t kKvHeads = 8;
constexpr int32_t kGroup = 4;
constexpr int32_t kHeadDim = 128;
constexpr int64_t kPageTokens = 16;
constexpr int64_t kTargetBytes = int64_t{1} << 30;  // K/V of all layers together

using bench::AllocateBytes;
using bench::Buffer;
using bench::FillRandom;

DType DTypeArg(int64_t a) { return a == 0 ? DType::kF32 : a == 1 ? DType::kF16 : DType::kBF16; }

// L layers of batch * kKvHeads streams of `tokens` tokens in one arena of 16-token pages.
struct ColdFixture {
  int64_t context = 0, batch = 0, keep = 100;
  DType dtype = DType::kF16;
  int64_t layers = 0, tokens = 0, page_bytes = 0, arena_bytes = 0;
  Buffer arena;
  std::vector<int32_t> pages;  // [layers, streams, pages_per_stream], a permutation of the arena
  std::vector<int32_t> positions;
  std::vector<SegmentView> segments;  // [layers, streams]
  std::vector<int32_t> offsets;       // [streams + 1]
  std::vector<PagedKVView> views;     // [layers]
  std::vector<float> q, out, lse;

  int32_t streams() const { return static_cast<int32_t>(batch * kKvHeads); }
  int64_t LayerBytes() const { return int64_t{streams()} * tokens * 2 * kHeadDim * DTypeSize(dtype); }
};

std::unique_ptr<ColdFixture>& Current() {
  static std::unique_ptr<ColdFixture> f;
  return f;
}

Buffer& ReadBuffer() {  // BM_ReadBandwidth's buffer (at most one large allocation alive)
  static Buffer buffer;
  return buffer;
}

ColdFixture& GetCold(int64_t context, int64_t batch, DType dtype, int64_t keep) {
  std::unique_ptr<ColdFixture>& f = Current();
  if (f && std::tie(f->context, f->batch, f->dtype, f->keep) ==
               std::tie(context, batch, dtype, keep)) {
    return *f;
  }
  f.reset();
  ReadBuffer().reset();
  f = std::make_unique<ColdFixture>();
  f->context = context;
  f->batch = batch;
  f->dtype = dtype;
  f->keep = keep;
  const int32_t streams = f->streams();
  // L from the full context, so the 10% row has the same model (layers) as its full row.
  const int64_t full_layer = int64_t{streams} * context * 2 * kHeadDim * DTypeSize(dtype);
  f->layers = std::max<int64_t>(1, kTargetBytes / full_layer);
  f->tokens = std::max<int64_t>(1, context * keep / 100);
  f->page_bytes = kPageTokens * 2 * kHeadDim * DTypeSize(dtype);
  const int64_t pages_per_stream = (f->tokens + kPageTokens - 1) / kPageTokens;
  const int64_t num_pages = f->layers * streams * pages_per_stream;
  f->arena_bytes = num_pages * f->page_bytes;
  f->arena = AllocateBytes(f->arena_bytes);
  FillRandom(f->arena.get(), f->arena_bytes / DTypeSize(dtype), dtype, /*seed=*/1);
  f->pages.resize(num_pages);
  std::iota(f->pages.begin(), f->pages.end(), 0);
  std::mt19937 rng(2);
  std::shuffle(f->pages.begin(), f->pages.end(), rng);
  f->positions.resize(f->tokens);
  std::iota(f->positions.begin(), f->positions.end(), 0);
  f->segments.resize(static_cast<size_t>(f->layers) * streams);
  for (int64_t l = 0; l < f->layers; ++l) {
    for (int32_t i = 0; i < streams; ++i) {
      SegmentView& s = f->segments[l * streams + i];
      s.pages = f->pages.data() + (l * streams + i) * pages_per_stream;
      s.positions = f->positions.data();
      s.length = static_cast<int32_t>(f->tokens);
      s.tokens_per_page = static_cast<int32_t>(kPageTokens);
      s.key_width = kHeadDim;
      s.value_width = kHeadDim;
    }
  }
  f->offsets.resize(streams + 1);
  std::iota(f->offsets.begin(), f->offsets.end(), 0);
  f->views.resize(f->layers);
  for (int64_t l = 0; l < f->layers; ++l) {
    PagedKVView& v = f->views[l];
    v.pool = {f->arena.get(), f->page_bytes, static_cast<int32_t>(num_pages), dtype};
    v.head_dim = kHeadDim;
    v.num_streams = streams;
    v.stream_segment_offsets = f->offsets.data();
    v.segments = f->segments.data() + l * streams;
  }
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  f->q.resize(static_cast<size_t>(streams) * kGroup * kHeadDim);
  for (float& x : f->q) x = uniform(rng);
  f->out.resize(f->q.size());
  f->lse.resize(static_cast<size_t>(streams) * kGroup);
  return *f;
}

// Seconds per layer of the last full-context run of each (context, batch, dtype, prefetch).
std::map<std::tuple<int64_t, int64_t, int64_t, int64_t>, double>& FullSeconds() {
  static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t>, double> m;
  return m;
}

void BM_DecodeCold(benchmark::State& state) {
  const int64_t context = state.range(0), batch = state.range(1), keep = state.range(3);
  const int prefetch = static_cast<int>(state.range(4));
  ColdFixture& f = GetCold(context, batch, DTypeArg(state.range(2)), keep);
  const bench::Roofline roof = bench::MeasureRoofline(f.arena.get(), f.arena_bytes, 2);
  const int previous = cpu::SetDecodePrefetchPages(prefetch);
  DecodeParams params;
  params.group_size = kGroup;
  int64_t layer = 0;
  timespec cpu0, cpu1;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu0);
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    const absl::Status s = cpu::DecodeAttentionFast(f.views[layer], params, f.q.data(),
                                                    f.out.data(), f.lse.data());
    if (!s.ok()) state.SkipWithError(std::string(s.message()).c_str());
    benchmark::DoNotOptimize(f.out.data());
    benchmark::ClobberMemory();
    layer = layer + 1 == f.layers ? 0 : layer + 1;
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() /
      static_cast<double>(state.iterations());
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &cpu1);
  const double cpu_seconds = static_cast<double>(cpu1.tv_sec - cpu0.tv_sec) +
                             1e-9 * static_cast<double>(cpu1.tv_nsec - cpu0.tv_nsec);
  cpu::SetDecodePrefetchPages(previous);
  const int64_t bytes = f.LayerBytes();
  state.SetBytesProcessed(state.iterations() * bytes);
  state.SetItemsProcessed(state.iterations() * int64_t{f.streams()} * f.tokens);
  state.counters["layers"] = static_cast<double>(f.layers);
  state.counters["roofline_GBps"] = roof.best_bytes_per_second * 1e-9;
  state.counters["pct_roofline"] = benchmark::Counter(
      100.0 * static_cast<double>(state.iterations() * bytes) / roof.best_bytes_per_second,
      benchmark::Counter::kIsRate);
  // The same on CPU time: the decode's process CPU seconds over its threads (its wall time if
  // every thread had a core) against the roofline's CPU-time rate. On a shared machine this is
  // the stabler of the two; on an idle one they agree.
  const double threads = oneapi::tbb::this_task_arena::max_concurrency();
  state.counters["roofline_cpu_GBps"] = roof.best_bytes_per_cpu_second * 1e-9;
  state.counters["pct_roofline_cpu"] =
      100.0 * static_cast<double>(state.iterations() * bytes) / (cpu_seconds / threads) /
      roof.best_bytes_per_cpu_second;
  state.counters["cpu_ns_per_row"] =
      1e9 * cpu_seconds / static_cast<double>(state.iterations() * int64_t{f.streams()} * f.tokens);
  const auto key = std::make_tuple(context, batch, state.range(2), int64_t{prefetch});
  if (keep == 100) {
    FullSeconds()[key] = seconds;
  } else if (FullSeconds().count(key) != 0) {
    state.counters["speedup_vs_full"] = FullSeconds()[key] / seconds;
  }
  state.SetLabel(std::string(cpu::KernelIsaName(cpu::ActiveKernelIsa())) + " roofline=" +
                 bench::ReadVariantName(roof.best));
}

// Fixed iterations: every layer decoded at least twice per run (and one run = one roofline).
int64_t ColdIterations(int64_t context, int64_t batch, int64_t dtype) {
  const int64_t layer = batch * kKvHeads * context * 2 * kHeadDim * (dtype == 0 ? 4 : 2);
  const int64_t layers = std::max<int64_t>(1, kTargetBytes / layer);
  return std::max<int64_t>(8, 2 * layers);
}

// One BM_DecodeCold configuration under `name`: fixed iterations, wall time with the process's
// CPU time beside it.
void RegisterColdCase(const char* name, int64_t context, int64_t batch, int64_t dtype,
                      int64_t keep, int64_t prefetch, int64_t iterations) {
  benchmark::RegisterBenchmark(name, BM_DecodeCold)
      ->Args({context, batch, dtype, keep, prefetch})
      ->ArgNames({"ctx", "batch", "dtype", "keep", "prefetch"})
      ->Iterations(iterations)
      ->MeasureProcessCPUTime()
      ->UseRealTime()
      ->Unit(benchmark::kMicrosecond);
}

void RegisterCold() {
  // Full context with the default (no page prefetch) and 2 pages ahead, then 10% keep.
  for (int64_t dtype : {1, 0, 2}) {
    for (int64_t context : {1024, 8192, 32768}) {
      for (int64_t batch : {1, 8}) {
        for (int64_t prefetch : {0, 2}) {
          RegisterColdCase("BM_DecodeCold", context, batch, dtype, 100, prefetch,
                           ColdIterations(context, batch, dtype));
        }
        if (dtype == 1 && context >= 8192) {
          RegisterColdCase("BM_DecodeCold", context, batch, dtype, 10, 0,
                           ColdIterations(context, batch, dtype) * 4);
        }
      }
    }
  }
}

// The prefetch distance sweep (docs: "prefetch distance"): f16 and f32 at 8k x 1 and 1k x 8.
void RegisterSweep() {
  for (int64_t dtype : {1, 0}) {
    for (auto [context, batch] : {std::pair<int64_t, int64_t>{8192, 1}, {1024, 8}}) {
      for (int64_t prefetch : {0, 1, 2, 3, 4, 6, 8}) {
        RegisterColdCase("BM_DecodeColdSweep", context, batch, dtype, 100, prefetch,
                         ColdIterations(context, batch, dtype));
      }
    }
  }
}

void BM_ReadBandwidth(benchmark::State& state) {
  const auto variant = static_cast<bench::ReadVariant>(state.range(0));
  Buffer& buffer = ReadBuffer();
  constexpr int64_t kBytes = kTargetBytes;
  if (!buffer) {
    Current().reset();
    buffer = AllocateBytes(kBytes);
    std::memset(buffer.get(), 1, static_cast<size_t>(kBytes));
  }
  uint64_t sum = 0;
  for (auto _ : state) {
    uint64_t s = 0;
    bench::ReadOnce(variant, buffer.get(), kBytes, &s);
    sum += s;
  }
  benchmark::DoNotOptimize(sum);
  state.SetBytesProcessed(state.iterations() * kBytes);
  state.SetLabel(bench::ReadVariantName(variant));
}
BENCHMARK(BM_ReadBandwidth)
    ->DenseRange(0, static_cast<int>(bench::kReadVariants.size()) - 1)
    ->ArgName("variant")
    ->Iterations(6)
    ->UseRealTime();

}  // namespace
}  // namespace kvcache

int main(int argc, char** argv) {
  kvcache::RegisterCold();
  kvcache::RegisterSweep();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
