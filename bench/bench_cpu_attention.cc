// CPU decode attention over paged K/V, with the baselines it is judged against in the same run:
//   BM_DecodeAttention/<context>/<batch>/<dtype>/<page tokens>   the fast kernel ("cpu")
//   BM_DecodeAttentionWithScores/...                             the same plus score accumulation
//   BM_DecodeAttentionPortable/...                               the fast kernel without AVX2
//   BM_DecodeAttentionAvx2/...                                   the fast kernel capped at AVX2
//       (on a CPU with AVX-512, BM_DecodeAttention runs the AVX-512 code; the label says which)
//   BM_DenseDecodeBaseline/<context>/<batch>/<dtype>             the same attention over one
//       contiguous K/V array per stream, written straightforwardly (same compiler flags)
//   BM_DecodeAttentionPagePrefetch/...                           the fast kernel with its optional
//       whole-page prefetch 2 pages ahead (cpu::SetDecodePrefetchPages(2))
//   BM_MemoryBandwidth/<context>/<batch>/<dtype>                 the best parallel read
//       (bench/read_bandwidth.h) of the same number of bytes as the K/V the decode reads
//   BM_ScoreRows/<context>/<rows>                                prefill-time row scoring
//       (cpu::ScoreRowsFast, register-blocked) of the last <rows> positions over 8 f16 streams
//   BM_ScoreRowsPairwise/<context>/<rows>                        its baseline: the same kernel
//       before blocking (cpu::ScoreRowsFastPairwise: one reduced dot per (row, head) x key)
//   BM_ScoreRowsPortable/<context>/<rows>                        ScoreRowsFast without AVX2
//   BM_ScoreRowsAvx2/<context>/<rows>                            ScoreRowsFast capped at AVX2
//       (BM_ScoreRows runs the AVX-512 logit tiles on a CPU that has them)
//   BM_ScoreRowsPairwisePortable/<context>/<rows>                the baseline without AVX2
// Shape: LLaVA-7B-like, 8 kv heads x G = 4 (32 q heads), head_dim 128, one layer per iteration.
// Contexts 1k, 8k, 32k, plus 256 for decode and bandwidth: its 1 MiB of f16 K/V stays in L2, so
// it shows the kernel's compute cost per row without the memory system.
// dtype 0 = f32, 1 = f16. bytes_per_second counts K/V bytes read; items are K/V rows (token x kv
// head) read. f32 at batch 8 x 32k (4 GiB of K/V with its dense copy) is left out to keep the
// benchmark within the memory of a small shared machine.
//
// The CPU column is the process's CPU time over all threads (MeasureProcessCPUTime), so on a
// shared machine "CPU time per K/V row" stays meaningful when wall time is inflated by others.
//
// Run: bench_cpu_attention --benchmark_min_time=0.1
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "bench/bench_buffers.h"
#include "bench/read_bandwidth.h"
#include "cpu/attention.h"
#include "kvcache/backend.h"
#include "kvcache/dtype.h"
#include "kvcache/paged_view.h"
#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/global_control.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvcache {
namespace {

constexpr int32_t kKvHeads = 8;
constexpr int32_t kGroup = 4;
constexpr int32_t kHeadDim = 128;

using bench::AllocateBytes;
using bench::Buffer;
using bench::FillRandom;

// num_streams = batch * kKvHeads streams of `context` full-width tokens in one segment each,
// pages in scrambled order.
struct PagedFixture {
  int64_t context = 0, batch = 0, page_tokens = 0;
  DType dtype = DType::kF16;
  Buffer arena;
  std::vector<int32_t> pages;      // [num_streams, pages_per_stream]
  std::vector<int32_t> positions;  // [context] shared by all streams
  std::vector<float> scores;       // [num_streams, context]
  std::vector<SegmentView> segments;
  std::vector<int32_t> offsets;
  std::vector<float> q, out, lse;
  PagedKVView view;

  int32_t num_streams() const { return static_cast<int32_t>(batch * kKvHeads); }
  int64_t KvBytes() const {
    return int64_t{num_streams()} * context * 2 * kHeadDim * DTypeSize(dtype);
  }
};

std::unique_ptr<PagedFixture>& CurrentPaged() {
  static std::unique_ptr<PagedFixture> fixture;
  return fixture;
}

// Built once per argument set and reused across the repeated calls Google Benchmark makes.
PagedFixture& GetPaged(int64_t context, int64_t batch, DType dtype, int64_t page_tokens) {
  std::unique_ptr<PagedFixture>& f = CurrentPaged();
  if (f && f->context == context && f->batch == batch && f->dtype == dtype &&
      f->page_tokens == page_tokens) {
    return *f;
  }
  f.reset();  // free the previous arena before allocating the next
  f = std::make_unique<PagedFixture>();
  f->context = context;
  f->batch = batch;
  f->dtype = dtype;
  f->page_tokens = page_tokens;
  const int32_t streams = f->num_streams();
  const int64_t page_bytes = page_tokens * 2 * kHeadDim * DTypeSize(dtype);
  const int64_t pages_per_stream = (context + page_tokens - 1) / page_tokens;
  const int64_t num_pages = pages_per_stream * streams;
  f->arena = AllocateBytes(num_pages * page_bytes);
  FillRandom(f->arena.get(), num_pages * page_bytes / DTypeSize(dtype), dtype, 1);
  f->pages.resize(num_pages);
  std::iota(f->pages.begin(), f->pages.end(), 0);
  std::mt19937 rng(2);
  std::shuffle(f->pages.begin(), f->pages.end(), rng);
  f->positions.resize(context);
  std::iota(f->positions.begin(), f->positions.end(), 0);
  f->scores.assign(static_cast<size_t>(streams) * context, 0.0f);
  for (int32_t i = 0; i < streams; ++i) {
    SegmentView s;
    s.pages = f->pages.data() + i * pages_per_stream;
    s.positions = f->positions.data();
    s.scores = f->scores.data() + int64_t{i} * context;
    s.length = static_cast<int32_t>(context);
    s.tokens_per_page = static_cast<int32_t>(page_tokens);
    s.key_width = kHeadDim;
    s.value_width = kHeadDim;
    f->segments.push_back(s);
    f->offsets.push_back(i);
  }
  f->offsets.push_back(streams);
  f->view.pool = {f->arena.get(), page_bytes, static_cast<int32_t>(num_pages), dtype};
  f->view.head_dim = kHeadDim;
  f->view.num_streams = streams;
  f->view.stream_segment_offsets = f->offsets.data();
  f->view.segments = f->segments.data();
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  f->q.resize(static_cast<size_t>(streams) * kGroup * kHeadDim);
  for (float& x : f->q) x = uniform(rng);
  f->out.resize(f->q.size());
  f->lse.resize(static_cast<size_t>(streams) * kGroup);
  return *f;
}

void SetCounters(benchmark::State& state, int64_t bytes, int64_t rows) {
  state.SetBytesProcessed(state.iterations() * bytes);
  state.SetItemsProcessed(state.iterations() * rows);
}

// The timed loop of the decode benchmarks: one fast-kernel call per iteration.
void TimeDecode(benchmark::State& state, PagedFixture& f, const DecodeParams& params) {
  for (auto _ : state) {
    const absl::Status s =
        cpu::DecodeAttentionFast(f.view, params, f.q.data(), f.out.data(), f.lse.data());
    if (!s.ok()) state.SkipWithError(std::string(s.message()).c_str());
    benchmark::DoNotOptimize(f.out.data());
    benchmark::ClobberMemory();
  }
}

void RunDecode(benchmark::State& state, bool scores) {
  const DType dtype = state.range(2) == 0 ? DType::kF32 : DType::kF16;
  PagedFixture& f = GetPaged(state.range(0), state.range(1), dtype, state.range(3));
  DecodeParams params;
  params.group_size = kGroup;
  params.accumulate_scores = scores;
  TimeDecode(state, f, params);
  SetCounters(state, f.KvBytes(), int64_t{f.num_streams()} * f.context);
  state.SetLabel(cpu::KernelIsaName(cpu::ActiveKernelIsa()));
}

void BM_DecodeAttention(benchmark::State& state) { RunDecode(state, false); }

// The kernel's compute per K/V row, nothing else: one thread (oneTBB capped at 1), 256 tokens x
// 8 kv heads in 16-token pages (1 MiB of f16, 2 MiB of f32 — L2/L3-resident after the first
// call), dtype 0 = f32, 1 = f16, 2 = bf16 (the hot decode benchmarks above cover f32/f16 only).
// Counter `ns_per_row` = CPU time per K/V row (token x kv head). Two threads on this 2-vCPU
// machine share it with other jobs; one thread timed on CPU time is the steadier kernel figure.
void BM_DecodeKernelRow(benchmark::State& state) {
  const DType dtype = state.range(0) == 0   ? DType::kF32
                      : state.range(0) == 1 ? DType::kF16
                                            : DType::kBF16;
  PagedFixture& f = GetPaged(256, 1, dtype, 16);
  oneapi::tbb::global_control one_thread(oneapi::tbb::global_control::max_allowed_parallelism, 1);
  DecodeParams params;
  params.group_size = kGroup;
  TimeDecode(state, f, params);
  const int64_t rows = int64_t{f.num_streams()} * f.context;
  SetCounters(state, f.KvBytes(), rows);
  state.counters["ns_per_row"] = benchmark::Counter(
      static_cast<double>(rows) * static_cast<double>(state.iterations()) * 1e-9,
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  state.SetLabel(cpu::KernelIsaName(cpu::ActiveKernelIsa()));
}
// The fast kernel capped at an instruction set: what the run-time dispatch to each buys. The
// label names the code path that actually ran (a cap above the CPU's has no effect).
void RunDecodeCapped(benchmark::State& state, cpu::KernelIsa cap) {
  cpu::LimitKernelIsa(cap);
  RunDecode(state, false);
  cpu::LimitKernelIsa(cpu::KernelIsa::kAvx512);
}
void BM_DecodeAttentionPortable(benchmark::State& state) {
  RunDecodeCapped(state, cpu::KernelIsa::kPortable);
}
void BM_DecodeAttentionAvx2(benchmark::State& state) {
  RunDecodeCapped(state, cpu::KernelIsa::kAvx2);
}
void BM_DecodeAttentionWithScores(benchmark::State& state) { RunDecode(state, true); }
// The kernel with its optional whole-page prefetch 2 pages ahead (cpu::SetDecodePrefetchPages):
// what it costs when K/V are cached.
void BM_DecodeAttentionPagePrefetch(benchmark::State& state) {
  const int previous = cpu::SetDecodePrefetchPages(2);
  RunDecode(state, false);
  cpu::SetDecodePrefetchPages(previous);
}

// ---- Dense baseline: K [n, D] and V [n, D] contiguous per stream ------------------------------

struct DenseFixture {
  int64_t context = 0, batch = 0;
  DType dtype = DType::kF16;
  Buffer keys, values;  // [num_streams, context, D] each
  std::vector<float> q, out;
  int32_t num_streams() const { return static_cast<int32_t>(batch * kKvHeads); }
  int64_t KvBytes() const {
    return int64_t{num_streams()} * context * 2 * kHeadDim * DTypeSize(dtype);
  }
};

DenseFixture& GetDense(int64_t context, int64_t batch, DType dtype) {
  static std::unique_ptr<DenseFixture> f;
  if (f && f->context == context && f->batch == batch && f->dtype == dtype) return *f;
  f.reset();
  CurrentPaged().reset();  // keep at most one large fixture alive
  f = std::make_unique<DenseFixture>();
  f->context = context;
  f->batch = batch;
  f->dtype = dtype;
  const int64_t elements = int64_t{f->num_streams()} * context * kHeadDim;
  f->keys = AllocateBytes(elements * DTypeSize(dtype));
  f->values = AllocateBytes(elements * DTypeSize(dtype));
  FillRandom(f->keys.get(), elements, dtype, 3);
  FillRandom(f->values.get(), elements, dtype, 4);
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  f->q.resize(static_cast<size_t>(f->num_streams()) * kGroup * kHeadDim);
  for (float& x : f->q) x = uniform(rng);
  f->out.resize(f->q.size());
  return *f;
}

// The textbook loop: per (stream, q head) logits over every key, softmax, weighted sum of values,
// parallel over streams like the paged kernel (each q head reads its stream's K/V again).
void DenseDecode(DenseFixture& f) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  const int64_t n = f.context;
  oneapi::tbb::parallel_for(0, f.num_streams(), [&](int32_t i) {
    thread_local std::vector<float> logits;
    logits.resize(static_cast<size_t>(n));
    const int64_t base = int64_t{i} * n * kHeadDim;
    for (int32_t g = 0; g < kGroup; ++g) {
      const float* q = f.q.data() + (int64_t{i} * kGroup + g) * kHeadDim;  // [D]
      float m = -INFINITY;
      for (int64_t t = 0; t < n; ++t) {
        float dot = 0.0f;
        for (int32_t c = 0; c < kHeadDim; ++c) {
          dot += q[c] * LoadAsFloat(f.keys.get(), f.dtype, base + t * kHeadDim + c);
        }
        logits[t] = dot * scale;
        m = std::max(m, logits[t]);
      }
      float l = 0.0f;
      for (int64_t t = 0; t < n; ++t) {
        logits[t] = std::exp(logits[t] - m);
        l += logits[t];
      }
      float* out = f.out.data() + (int64_t{i} * kGroup + g) * kHeadDim;  // [D]
      std::fill(out, out + kHeadDim, 0.0f);
      for (int64_t t = 0; t < n; ++t) {
        const float p = logits[t] / l;
        for (int32_t c = 0; c < kHeadDim; ++c) {
          out[c] += p * LoadAsFloat(f.values.get(), f.dtype, base + t * kHeadDim + c);
        }
      }
    }
  });
}

void BM_DenseDecodeBaseline(benchmark::State& state) {
  const DType dtype = state.range(2) == 0 ? DType::kF32 : DType::kF16;
  DenseFixture& f = GetDense(state.range(0), state.range(1), dtype);
  for (auto _ : state) {
    DenseDecode(f);
    benchmark::DoNotOptimize(f.out.data());
    benchmark::ClobberMemory();
  }
  SetCounters(state, f.KvBytes(), int64_t{f.num_streams()} * f.context);
}

// ---- Memory bandwidth: the best parallel read of the same byte count -----------------------------
//
// The roofline of bench/read_bandwidth.h (threads = the kernel's, one contiguous slice each, wide
// loads; the best of its variants, picked before timing and named in the label) over a buffer of
// the same size as the K/V the decode reads. Like the decode, it is read again every iteration,
// so it is the roofline of the cached case; bench_decode_cold has the DRAM one.

void BM_MemoryBandwidth(benchmark::State& state) {
  const DType dtype = state.range(2) == 0 ? DType::kF32 : DType::kF16;
  const int64_t bytes =
      state.range(1) * kKvHeads * state.range(0) * 2 * kHeadDim * DTypeSize(dtype);
  static Buffer buffer;
  static int64_t buffer_bytes = 0;
  if (buffer_bytes != bytes) {
    buffer.reset();
    CurrentPaged().reset();
    buffer = AllocateBytes(bytes);
    std::memset(buffer.get(), 1, static_cast<size_t>(bytes));  // touch every page
    buffer_bytes = bytes;
  }
  const bench::Roofline roof = bench::MeasureRoofline(buffer.get(), bytes, 3);
  uint64_t sum = 0;
  for (auto _ : state) {
    uint64_t s = 0;
    bench::ReadOnce(roof.best, buffer.get(), bytes, &s);
    sum += s;
  }
  benchmark::DoNotOptimize(sum);
  SetCounters(state, bytes, state.range(1) * kKvHeads * state.range(0));
  state.SetLabel(bench::ReadVariantName(roof.best));
}

bool TooBig(int64_t context, int64_t batch, int64_t dtype) {
  return dtype == 0 && batch == 8 && context == 32768;
}

// Row scoring as a policy's CollectSnapshot runs it: batch 1 (8 kv heads x G = 4), f16, pages of
// 16 tokens, the last `rows` positions as the observation rows. items = (row, q head, key)
// logits computed.
enum class ScoreKernel { kBlocked, kPairwise, kPortable, kPairwisePortable, kBlockedAvx2 };

void RunScoreRows(benchmark::State& state, ScoreKernel kernel) {
  PagedFixture& f = GetPaged(state.range(0), 1, DType::kF16, 16);
  const int32_t rows = static_cast<int32_t>(state.range(1));
  ScoreRowsParams params;
  params.group_size = kGroup;
  params.num_rows = rows;
  params.sparsity_threshold = 0.01f;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> queries(static_cast<size_t>(rows) * f.num_streams() * kGroup * kHeadDim);
  for (float& x : queries) x = uniform(rng);  // [rows, num_streams * G, head_dim]
  std::vector<int32_t> positions(rows);        // [rows]
  std::iota(positions.begin(), positions.end(), static_cast<int32_t>(f.context - rows));
  std::vector<float> token_scores(static_cast<size_t>(f.num_streams()) * f.context);
  std::vector<int64_t> below(static_cast<size_t>(f.num_streams()) * kGroup);
  std::vector<int64_t> causal(below.size());
  const bool pairwise =
      kernel == ScoreKernel::kPairwise || kernel == ScoreKernel::kPairwisePortable;
  cpu::LimitKernelIsa(kernel == ScoreKernel::kPortable || kernel == ScoreKernel::kPairwisePortable
                         ? cpu::KernelIsa::kPortable
                     : kernel == ScoreKernel::kBlockedAvx2 ? cpu::KernelIsa::kAvx2
                                                            : cpu::KernelIsa::kAvx512);
  for (auto _ : state) {
    const absl::Status s =
        pairwise
            ? cpu::ScoreRowsFastPairwise(f.view, params, queries.data(), positions.data(),
                                         token_scores.data(), below.data(), causal.data())
            : cpu::ScoreRowsFast(f.view, params, queries.data(), positions.data(),
                                 token_scores.data(), below.data(), causal.data());
    if (!s.ok()) state.SkipWithError(std::string(s.message()).c_str());
    benchmark::DoNotOptimize(token_scores.data());
    benchmark::ClobberMemory();
  }
  cpu::LimitKernelIsa(cpu::KernelIsa::kAvx512);
  state.SetItemsProcessed(state.iterations() * rows * f.num_streams() * kGroup * f.context);
}

void BM_ScoreRows(benchmark::State& state) { RunScoreRows(state, ScoreKernel::kBlocked); }
void BM_ScoreRowsPairwise(benchmark::State& state) { RunScoreRows(state, ScoreKernel::kPairwise); }
void BM_ScoreRowsPortable(benchmark::State& state) { RunScoreRows(state, ScoreKernel::kPortable); }
void BM_ScoreRowsAvx2(benchmark::State& state) { RunScoreRows(state, ScoreKernel::kBlockedAvx2); }
void BM_ScoreRowsPairwisePortable(benchmark::State& state) {
  RunScoreRows(state, ScoreKernel::kPairwisePortable);
}

void ScoreRowsArgs(benchmark::internal::Benchmark* b) {
  for (int64_t context : {1536, 8192}) {
    for (int64_t rows : {32, 64}) b->Args({context, rows});
  }
  b->ArgNames({"ctx", "rows"})->UseRealTime()->Unit(benchmark::kMillisecond);
}

void DecodeArgs(benchmark::internal::Benchmark* b) {
  for (int64_t context : {256, 1024, 8192, 32768}) {
    for (int64_t batch : {1, 8}) {
      for (int64_t dtype : {0, 1}) {
        for (int64_t page : {16, 64}) {
          if (!TooBig(context, batch, dtype)) b->Args({context, batch, dtype, page});
        }
      }
    }
  }
  b->ArgNames({"ctx", "batch", "f16", "page"})->MeasureProcessCPUTime()->UseRealTime()->Unit(benchmark::kMicrosecond);
}

void ScoreArgs(benchmark::internal::Benchmark* b) {
  for (int64_t context : {1024, 8192, 32768}) {
    for (int64_t batch : {1, 8}) {
      for (int64_t dtype : {0, 1}) {
        if (!TooBig(context, batch, dtype)) b->Args({context, batch, dtype, 16});
      }
    }
  }
  b->ArgNames({"ctx", "batch", "f16", "page"})->MeasureProcessCPUTime()->UseRealTime()->Unit(benchmark::kMicrosecond);
}

void BaselineArgs(benchmark::internal::Benchmark* b) {
  for (int64_t context : {256, 1024, 8192, 32768}) {
    for (int64_t batch : {1, 8}) {
      for (int64_t dtype : {0, 1}) {
        if (!TooBig(context, batch, dtype)) b->Args({context, batch, dtype});
      }
    }
  }
  b->ArgNames({"ctx", "batch", "f16"})->MeasureProcessCPUTime()->UseRealTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_DecodeAttention)->Apply(DecodeArgs);
// With repetitions, the "min" aggregate is the least-disturbed repetition (others' jobs only add).
BENCHMARK(BM_DecodeKernelRow)
    ->ArgName("dtype")
    ->DenseRange(0, 2)
    ->MeasureProcessCPUTime()
    ->ComputeStatistics("min", [](const std::vector<double>& v) {
      return *std::min_element(v.begin(), v.end());
    });
BENCHMARK(BM_DecodeAttentionWithScores)->Apply(ScoreArgs);
BENCHMARK(BM_DecodeAttentionPagePrefetch)->Apply(DecodeArgs);
BENCHMARK(BM_DecodeAttentionPortable)
    ->Args({8192, 1, 0, 16})
    ->Args({8192, 1, 1, 16})
    ->ArgNames({"ctx", "batch", "f16", "page"})
    ->MeasureProcessCPUTime()
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_DecodeAttentionAvx2)
    ->Args({8192, 1, 0, 16})
    ->Args({8192, 1, 1, 16})
    ->Args({32768, 1, 0, 16})
    ->Args({32768, 1, 1, 16})
    ->ArgNames({"ctx", "batch", "f16", "page"})
    ->MeasureProcessCPUTime()
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_DenseDecodeBaseline)->Apply(BaselineArgs);
BENCHMARK(BM_MemoryBandwidth)->Apply(BaselineArgs);
BENCHMARK(BM_ScoreRows)->Apply(ScoreRowsArgs);
BENCHMARK(BM_ScoreRowsPairwise)->Apply(ScoreRowsArgs);
BENCHMARK(BM_ScoreRowsPortable)->Apply(ScoreRowsArgs);
BENCHMARK(BM_ScoreRowsAvx2)->Apply(ScoreRowsArgs);
BENCHMARK(BM_ScoreRowsPairwisePortable)->Apply(ScoreRowsArgs);

}  // namespace
}  // namespace kvcache

BENCHMARK_MAIN();
