// Query-aware sparse decode on the CPU against full paged decode, through Cache::DecodeAttention
// (the real entry point: locking, view building, selection and kernels all timed):
//   BM_DenseDecode/<context>                       full paged decode (the baseline)
//   BM_QuestDecode/<context>/<budget divisor>/<sharpness>  Quest, token_budget = context / divisor
//   BM_RetrievalDecode/<context>/<top_k>/<ef>/<sharpness>  IceFormer retrieval, hnswlib index
//   BM_RetrievalSinksDecode/<context>/<top_k>/<ef>/<sharpness>  the same plus 4 sink tokens and a
//       64-token recent window always read (documented variant)
//   BM_RetrievalExactDecode/<context>/<top_k>/<sharpness>  retrieval with the exact blocked scan
//   BM_IndexBuild/<context>                        building one stream's index (ns per token)
//   BM_AppendWithIndex/<context>, BM_AppendNoIndex/<context>   one decode token appended to a
//       layer whose streams have (or do not have) an index: the per-token index update cost
//   sharpness (last Arg of Quest / retrieval): 0 = queries as generated, 1 = the same queries x3
// Shape: batch 1, 2 kv heads x G = 4 (8 query heads), head_dim 128, f16, 16-token pages, page
// summaries on. Counters: cosine = mean over 8 queries of the cosine similarity of the output
// (all query heads concatenated) with the dense output; cosine_min = the worst query;
// read_fraction = tokens read / context (Quest).
//
// Workload ("structured", as real attention is rather than uniform noise): the context is a run
// of topic spans (64..512 consecutive tokens on one of 32 topics); a key is its topic's centre
// plus noise (sd 0.5 per channel), a value its topic's value centre plus noise (sd 0.5); the
// first 4 tokens are attention sinks (large keys along a direction every query shares). A query
// is a topic centre present in the context plus the sink direction and noise. See
// docs/SPARSE_DECODE.md for what this assumes.
//
// Run: bench_sparse_decode --benchmark_min_time=0.2
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "cpu/sparse_decode.h"
#include "kvcache/cache.h"

namespace kvcache {
namespace {

constexpr int32_t kKvHeads = 2;
constexpr int32_t kGroup = 4;
constexpr int32_t kHeadDim = 128;
constexpr int32_t kPageTokens = 16;
constexpr int32_t kTopics = 32;
constexpr int32_t kQueries = 8;

struct Workload {
  std::unique_ptr<Cache> cache;
  SequenceId seq = 0;
  int32_t context = 0;
  // [sharpness][kQueries][q_heads * head_dim]: queries at temperature 1 / sharpness
  std::vector<std::vector<std::vector<float>>> queries;
  std::vector<std::vector<std::vector<float>>> dense_out;  // same shape
};

// Query scales: 1 = the workload as described; 3 = the same queries x3 (a sharper, lower
// temperature attention, as many real heads have).
constexpr float kSharpness[] = {1.0f, 3.0f};

std::vector<float> Normal(std::mt19937& rng, size_t n, float sd) {
  std::normal_distribution<float> dist(0.0f, sd);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

std::unique_ptr<Workload> BuildWorkload(int32_t context) {
  auto w = std::make_unique<Workload>();
  w->context = context;
  CacheConfig c;
  c.num_layers = 1;
  c.num_kv_heads = kKvHeads;
  c.num_q_heads = kKvHeads * kGroup;
  c.head_dim = kHeadDim;
  c.dtype = DType::kF16;
  c.page_tokens = kPageTokens;
  c.num_pages = (context + 1024) / kPageTokens * kKvHeads + 64;
  c.page_summaries = true;
  w->cache = *Cache::Create(c, "cpu");
  w->seq = *w->cache->AddSequence();
  std::mt19937 rng(1234);
  // Per head: topic key / value centres and the sink direction.
  std::vector<std::vector<float>> key_centre(kKvHeads * kTopics), value_centre(kKvHeads * kTopics);
  std::vector<std::vector<float>> sink(kKvHeads);
  for (auto& v : key_centre) v = Normal(rng, kHeadDim, 1.0f);
  for (auto& v : value_centre) v = Normal(rng, kHeadDim, 1.0f);
  for (auto& v : sink) v = Normal(rng, kHeadDim, 1.0f);
  // Topic of every token: spans of 64..512 tokens.
  std::vector<int32_t> topic(context);
  std::uniform_int_distribution<int32_t> span_len(64, 512), pick(0, kTopics - 1);
  for (int32_t t = 0; t < context;) {
    const int32_t len = span_len(rng), tp = pick(rng);
    for (int32_t i = 0; i < len && t < context; ++i) topic[t++] = tp;
  }
  constexpr int32_t kChunk = 4096;
  std::normal_distribution<float> noise(0.0f, 0.5f);
  for (int32_t start = 0; start < context; start += kChunk) {
    const int32_t n = std::min(kChunk, context - start);
    std::vector<float> k(static_cast<size_t>(n) * kKvHeads * kHeadDim);
    std::vector<float> v(k.size());
    std::vector<int32_t> pos(n);
    for (int32_t i = 0; i < n; ++i) {
      const int32_t t = start + i;
      pos[i] = t;
      for (int32_t h = 0; h < kKvHeads; ++h) {
        float* kr = k.data() + (static_cast<size_t>(i) * kKvHeads + h) * kHeadDim;
        float* vr = v.data() + (static_cast<size_t>(i) * kKvHeads + h) * kHeadDim;
        const auto& kc = key_centre[h * kTopics + topic[t]];
        const auto& vc = value_centre[h * kTopics + topic[t]];
        for (int32_t d = 0; d < kHeadDim; ++d) {
          kr[d] = t < 4 ? 3.0f * sink[h][d] : kc[d] + noise(rng);
          vr[d] = vc[d] + noise(rng);
        }
      }
    }
    if (!w->cache->Append(w->seq, 0, {.keys = TensorRef::Of(k), .values = TensorRef::Of(v),
                                      .positions = pos})
             .ok()) {
      return nullptr;
    }
  }
  // Queries: a topic present in the context (the topic of a random token), plus the sink
  // direction and noise.
  std::uniform_int_distribution<int32_t> token(4, context - 1);
  w->queries.resize(2);
  w->dense_out.resize(2);
  for (int32_t qi = 0; qi < kQueries; ++qi) {
    std::vector<float> q(static_cast<size_t>(kKvHeads) * kGroup * kHeadDim);
    const int32_t tp = topic[token(rng)];
    for (int32_t h = 0; h < kKvHeads; ++h) {
      for (int32_t g = 0; g < kGroup; ++g) {
        float* qr = q.data() + (static_cast<size_t>(h) * kGroup + g) * kHeadDim;
        for (int32_t d = 0; d < kHeadDim; ++d) {
          qr[d] = key_centre[h * kTopics + tp][d] + 0.3f * sink[h][d] + noise(rng);
        }
      }
    }
    for (int sharp = 0; sharp < 2; ++sharp) {
      std::vector<float> scaled = q;
      for (float& x : scaled) x *= kSharpness[sharp];
      std::vector<float> out(q.size());
      const SequenceId batch[] = {w->seq};
      if (!w->cache->DecodeAttention(batch, 0, scaled, out).ok()) return nullptr;
      w->queries[sharp].push_back(std::move(scaled));
      w->dense_out[sharp].push_back(std::move(out));
    }
  }
  return w;
}

Workload* GetWorkload(int32_t context) {
  static std::map<int32_t, std::unique_ptr<Workload>> cache;
  auto& slot = cache[context];
  if (slot == nullptr) slot = BuildWorkload(context);
  return slot.get();
}

double Cosine(const std::vector<float>& a, const std::vector<float>& b) {
  double ab = 0, aa = 0, bb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    ab += double(a[i]) * b[i];
    aa += double(a[i]) * a[i];
    bb += double(b[i]) * b[i];
  }
  return ab / std::sqrt(aa * bb);
}

// Times DecodeAttention with `options` cycling over the queries; reports the cosine counters.
void RunDecode(benchmark::State& state, const DecodeOptions& options, int sharp) {
  Workload* w = GetWorkload(static_cast<int32_t>(state.range(0)));
  if (w == nullptr) {
    state.SkipWithError("workload setup failed");
    return;
  }
  const SequenceId batch[] = {w->seq};
  const auto& queries = w->queries[sharp];
  std::vector<float> out(queries[0].size());
  double cosine_sum = 0, cosine_min = 1;
  for (int32_t qi = 0; qi < kQueries; ++qi) {  // also builds a retrieval index (untimed)
    if (!w->cache->DecodeAttention(batch, 0, queries[qi], out, {}, options).ok()) {
      state.SkipWithError("decode failed");
      return;
    }
    const double c = Cosine(out, w->dense_out[sharp][qi]);
    cosine_sum += c;
    cosine_min = std::min(cosine_min, c);
  }
  int32_t qi = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(
        w->cache->DecodeAttention(batch, 0, queries[qi], out, {}, options).ok());
    benchmark::ClobberMemory();
    qi = (qi + 1) % kQueries;
  }
  state.counters["cosine"] = cosine_sum / kQueries;
  state.counters["cosine_min"] = cosine_min;
  state.counters["tokens_per_s"] = benchmark::Counter(
      static_cast<double>(w->context) * kKvHeads, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_DenseDecode(benchmark::State& state) { RunDecode(state, DecodeOptions{}, 0); }

void BM_QuestDecode(benchmark::State& state) {
  DecodeOptions o;
  o.read_policy.kind = ReadPolicy::Kind::kQuest;
  o.read_policy.dense_first_layers = 0;
  o.read_policy.token_budget = static_cast<int32_t>(state.range(0) / state.range(1));
  const int32_t pages = static_cast<int32_t>(
      std::max<int64_t>(3, (o.read_policy.token_budget + kPageTokens - 1) / kPageTokens) + 1);
  state.counters["read_fraction"] =
      std::min(1.0, static_cast<double>(pages) * kPageTokens / static_cast<double>(state.range(0)));
  RunDecode(state, o, static_cast<int>(state.range(2)));
}

void BM_RetrievalDecode(benchmark::State& state) {
  DecodeOptions o;
  o.read_policy.kind = ReadPolicy::Kind::kRetrieval;
  o.read_policy.dense_first_layers = 0;
  o.read_policy.top_k = static_cast<int32_t>(state.range(1));
  o.read_policy.ef_search = static_cast<int32_t>(state.range(2));
  RunDecode(state, o, static_cast<int>(state.range(3)));
}

// The documented variant: retrieval plus 4 always-read sink tokens and a 64-token recent window.
void BM_RetrievalSinksDecode(benchmark::State& state) {
  DecodeOptions o;
  o.read_policy.kind = ReadPolicy::Kind::kRetrieval;
  o.read_policy.dense_first_layers = 0;
  o.read_policy.top_k = static_cast<int32_t>(state.range(1));
  o.read_policy.ef_search = static_cast<int32_t>(state.range(2));
  o.read_policy.sink_tokens = 4;
  o.read_policy.recent_tokens = 64;
  RunDecode(state, o, static_cast<int>(state.range(3)));
}

void BM_RetrievalExactDecode(benchmark::State& state) {
  DecodeOptions o;
  o.read_policy.kind = ReadPolicy::Kind::kRetrieval;
  o.read_policy.dense_first_layers = 0;
  o.read_policy.top_k = static_cast<int32_t>(state.range(1));
  o.read_policy.exact_search = true;
  RunDecode(state, o, static_cast<int>(state.range(2)));
}

// One stream's index built from its stored keys (what the first retrieval decode of a stream
// does after reading the keys back).
void BM_IndexBuild(benchmark::State& state) {
  Workload* w = GetWorkload(static_cast<int32_t>(state.range(0)));
  if (w == nullptr) {
    state.SkipWithError("workload setup failed");
    return;
  }
  auto contents = *w->cache->ReadStream(w->seq, 0, 0);
  double max_norm = 0;
  for (int32_t t = 0; t < contents.length; ++t) {
    double sq = 0;
    for (int32_t d = 0; d < kHeadDim; ++d) {
      sq += double(contents.keys[size_t(t) * kHeadDim + d]) * contents.keys[size_t(t) * kHeadDim + d];
    }
    max_norm = std::max(max_norm, std::sqrt(sq));
  }
  int64_t bytes = 0;
  for (auto _ : state) {
    KeyIndexParams p;
    p.head_dim = kHeadDim;
    p.capacity = contents.length;
    p.max_norm = static_cast<float>(max_norm * 1.25);
    auto index = cpu::CreateHnswKeyIndex(p);
    if (!index.ok() || !(*index)->Add(contents.keys.data(), contents.length)) {
      state.SkipWithError("index build failed");
      return;
    }
    bytes = (*index)->MemoryBytes();
  }
  state.counters["ns_per_token"] = benchmark::Counter(
      static_cast<double>(contents.length),
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  state.counters["index_bytes_per_token"] = static_cast<double>(bytes) / contents.length;
}

// Appends one token per iteration to a fresh copy (fork) of the workload sequence, whose
// streams have a retrieval index (or not); the fork shares pages, so setup is cheap.
void RunAppend(benchmark::State& state, bool with_index) {
  Workload* w = GetWorkload(static_cast<int32_t>(state.range(0)));
  if (w == nullptr) {
    state.SkipWithError("workload setup failed");
    return;
  }
  const SequenceId seq = *w->cache->Fork(w->seq);
  if (with_index) {  // builds the fork's indexes
    DecodeOptions o;
    o.read_policy.kind = ReadPolicy::Kind::kRetrieval;
    o.read_policy.dense_first_layers = 0;
    const SequenceId batch[] = {seq};
    std::vector<float> out(w->queries[0][0].size());
    if (!w->cache->DecodeAttention(batch, 0, w->queries[0][0], out, {}, o).ok()) {
      state.SkipWithError("decode failed");
      return;
    }
  }
  std::mt19937 rng(5);
  const std::vector<float> k = Normal(rng, static_cast<size_t>(kKvHeads) * kHeadDim, 1.0f);
  const std::vector<float> v = Normal(rng, k.size(), 1.0f);
  int32_t position = w->context;
  for (auto _ : state) {
    const int32_t pos[] = {position++};
    if (!w->cache->Append(seq, 0, {.keys = TensorRef::Of(k), .values = TensorRef::Of(v),
                                   .positions = pos})
             .ok()) {
      state.SkipWithError("append failed (pool full?)");
      break;
    }
  }
  (void)w->cache->Free(seq);
  state.counters["ns_per_token"] = benchmark::Counter(
      static_cast<double>(kKvHeads),
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

void BM_AppendWithIndex(benchmark::State& state) { RunAppend(state, true); }
void BM_AppendNoIndex(benchmark::State& state) { RunAppend(state, false); }

BENCHMARK(BM_DenseDecode)->Arg(32768)->Arg(131072)->Unit(benchmark::kMicrosecond)->UseRealTime();
// Args: context, budget divisor, sharpness index (0: x1, 1: x3).
BENCHMARK(BM_QuestDecode)
    ->Args({32768, 8, 0})->Args({32768, 16, 0})->Args({32768, 32, 0})->Args({32768, 16, 1})
    ->Args({131072, 16, 0})->Args({131072, 32, 0})->Args({131072, 64, 0})->Args({131072, 32, 1})
    ->Unit(benchmark::kMicrosecond)->UseRealTime();
// Args: context, top_k, ef, sharpness index.
BENCHMARK(BM_RetrievalDecode)
    ->Args({32768, 64, 128, 0})->Args({32768, 256, 256, 0})->Args({32768, 1024, 1024, 0})
    ->Args({32768, 64, 128, 1})->Args({32768, 256, 256, 1})
    ->Args({131072, 64, 128, 0})->Args({131072, 256, 256, 0})->Args({131072, 1024, 1024, 0})
    ->Args({131072, 64, 128, 1})->Args({131072, 256, 256, 1})
    ->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_RetrievalSinksDecode)
    ->Args({32768, 64, 128, 0})->Args({32768, 256, 256, 0})
    ->Args({32768, 64, 128, 1})->Args({32768, 256, 256, 1})
    ->Args({131072, 64, 128, 0})->Args({131072, 256, 256, 0})
    ->Args({131072, 64, 128, 1})->Args({131072, 256, 256, 1})
    ->Unit(benchmark::kMicrosecond)->UseRealTime();
// Args: context, top_k, sharpness index.
BENCHMARK(BM_RetrievalExactDecode)
    ->Args({32768, 64, 0})->Args({32768, 256, 0})->Args({32768, 64, 1})->Args({131072, 64, 0})
    ->Args({131072, 64, 1})
    ->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_IndexBuild)->Arg(32768)->Iterations(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_AppendWithIndex)->Arg(32768)->Iterations(200)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_AppendNoIndex)->Arg(32768)->Iterations(200)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace
}  // namespace kvcache

BENCHMARK_MAIN();
