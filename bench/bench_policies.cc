// Policy pipeline cost at LLaVA-1.6-7B-like shapes: Plan (pure, from a collected snapshot),
// CollectSnapshot, Apply (on a copy-on-write fork), each also reported as a multiple of one full
// decode-attention step (Cache::DecodeAttention over all 32 layers, batch 1) of the same
// sequence, measured in this binary (counter x_decode_step).
//
// Shapes: 32 layers, 8 kv heads, 32 q heads, D = 128, f16; 35 text + 2880 image + 85 text
// tokens (3000), and 4x that (12000 tokens, one sequence). 64 observation query rows per layer
// (the last 64 prompt positions, all after the image).
//
// Baselines of the data movement (Backend::GatherRows / ReadRows, cpu/cpu_backend.cc): the
// BM_*Reference benchmarks run the same Apply / key read on an identical sequence in a cache on
// the "cpu-reference" backend (scalar per-element conversions), with the plans computed in the
// "cpu" world (run BM_Apply/<spec> first; the reference world holds no snapshot), and report
// x_decode_step against the "cpu" decode step.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kvcache/cache.h"
#include "kvcache/policy/image_select.h"
#include "kvcache/policy/registry.h"
#include "kvcache/policy/snapshot.h"
#include "src/policy/similarity.h"

namespace kp = kvcache::policy;
using kvcache::Modality;

namespace {

constexpr int32_t kLayers = 32, kHeads = 8, kQHeads = 32, kDim = 128, kRows = 64;

struct World {
  int scale = 0;
  std::string backend;
  int32_t n = 0;
  std::unique_ptr<kvcache::Cache> cache;
  kvcache::SequenceId seq = 0;
  std::vector<std::vector<float>> queries;
  std::vector<int32_t> row_positions;
  kp::Observations obs;
  kp::SequenceSnapshot snap;
  double decode_seconds = 0;
};

std::unique_ptr<World> g_world;
// Per (scale, spec): the plan computed in the "cpu" world, for the reference world's Apply.
std::map<std::pair<int, std::string>, kvcache::EvictionPlan> g_plans;
std::map<int, double> g_decode_seconds;  // per scale, the "cpu" world's decode step

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double DecodeStep(World& w) {
  std::vector<float> q(kQHeads * kDim, 0.1f), out(q.size());
  const kvcache::SequenceId batch[] = {w.seq};
  const double t0 = Now();
  for (int l = 0; l < kLayers; ++l) {
    if (!w.cache->DecodeAttention(batch, l, q, out).ok()) std::abort();
  }
  return Now() - t0;
}

World& GetWorld(int scale, const std::string& backend = "cpu") {
  if (g_world && g_world->scale == scale && g_world->backend == backend) return *g_world;
  g_world.reset();  // one sequence in memory at a time
  auto w = std::make_unique<World>();
  w->scale = scale;
  w->backend = backend;
  const int32_t text_before = 35 * scale, image = 2880 * scale, text_after = 85 * scale;
  w->n = text_before + image + text_after;
  kvcache::CacheConfig cfg;
  cfg.num_layers = kLayers;
  cfg.num_kv_heads = kHeads;
  cfg.num_q_heads = kQHeads;
  cfg.head_dim = kDim;
  cfg.dtype = kvcache::DType::kF16;
  cfg.page_tokens = 16;
  // The sequence plus room for one compacted copy (Apply on a fork).
  cfg.num_pages = 2 * kLayers * kHeads * ((w->n + 15) / 16) + 1024;
  w->cache = std::move(*kvcache::Cache::Create(cfg, backend));
  w->seq = *w->cache->AddSequence();
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  std::vector<int32_t> pos(w->n);
  std::vector<Modality> mod(w->n, Modality::kText);
  for (int32_t j = 0; j < w->n; ++j) {
    pos[j] = j;
    if (j >= text_before && j < text_before + image) mod[j] = Modality::kImage;
  }
  std::vector<float> k(static_cast<size_t>(w->n) * kHeads * kDim), v(k.size());
  for (int l = 0; l < kLayers; ++l) {
    for (float& x : k) x = nd(rng);
    for (float& x : v) x = nd(rng);
    kvcache::AppendRequest req;
    req.keys = kvcache::TensorRef::Of(k);
    req.values = kvcache::TensorRef::Of(v);
    req.positions = pos;
    req.modalities = mod;
    if (!w->cache->Append(w->seq, l, req).ok()) std::abort();
  }
  for (int r = 0; r < kRows; ++r) w->row_positions.push_back(w->n - kRows + r);
  w->queries.resize(kLayers);
  for (int l = 0; l < kLayers; ++l) {
    w->queries[l].resize(static_cast<size_t>(kRows) * kQHeads * kDim);
    for (float& x : w->queries[l]) x = nd(rng);
    w->obs.layers.push_back({.queries = w->queries[l], .positions = w->row_positions});
  }
  if (backend != "cpu") {  // a baseline world: same contents, no snapshot, the "cpu" decode step
    w->decode_seconds = g_decode_seconds.count(scale) ? g_decode_seconds[scale] : 0.0;
    g_world = std::move(w);
    return *g_world;
  }
  // One snapshot holding what every benchmarked policy needs.
  kp::SnapshotRequest all;
  for (const kp::PolicyInfo& info : kp::ListPolicies()) all.Merge((*kp::CreatePolicy(info.name))->Needs());
  all.keys = true;
  auto snap = kp::CollectSnapshot(*w->cache, w->seq, w->obs, all);
  if (!snap.ok()) {
    std::fprintf(stderr, "CollectSnapshot: %s\n", std::string(snap.status().message()).c_str());
    std::abort();
  }
  w->snap = std::move(*snap);
  std::vector<double> t;
  for (int i = 0; i < 5; ++i) t.push_back(DecodeStep(*w));
  std::sort(t.begin(), t.end());
  w->decode_seconds = t[2];
  g_decode_seconds[scale] = w->decode_seconds;
  g_world = std::move(w);
  return *g_world;
}

void SetRatio(benchmark::State& state, double seconds, const World& w) {
  state.counters["x_decode_step"] =
      benchmark::Counter(seconds / w.decode_seconds, benchmark::Counter::kAvgIterations);
  state.counters["decode_step_ms"] = w.decode_seconds * 1e3;
  state.counters["tokens"] = w.n;
}

void BM_DecodeStep(benchmark::State& state) {
  World& w = GetWorld(static_cast<int>(state.range(0)));
  double total = 0;
  for (auto _ : state) total += DecodeStep(w);
  SetRatio(state, total, w);
}

void BM_CollectSnapshot(benchmark::State& state, std::string spec) {
  World& w = GetWorld(static_cast<int>(state.range(0)));
  auto policy = kp::CreatePolicy(spec);
  double total = 0;
  for (auto _ : state) {
    const double t0 = Now();
    auto snap = kp::CollectSnapshot(*w.cache, w.seq, w.obs, (*policy)->Needs());
    total += Now() - t0;
    if (!snap.ok()) state.SkipWithError(std::string(snap.status().message()).c_str());
    benchmark::DoNotOptimize(snap);
  }
  SetRatio(state, total, w);
}

void BM_Plan(benchmark::State& state, std::string spec) {
  World& w = GetWorld(static_cast<int>(state.range(0)));
  auto policy = kp::CreatePolicy(spec);
  double total = 0;
  int64_t kept = 0, merges = 0;
  for (auto _ : state) {
    const double t0 = Now();
    auto plan = (*policy)->Plan(w.snap);
    total += Now() - t0;
    if (!plan.ok()) {
      state.SkipWithError(std::string(plan.status().message()).c_str());
      break;
    }
    kept = plan->KeptTokens();
    merges = 0;
    for (const kvcache::StreamPlan& sp : plan->streams) merges += static_cast<int64_t>(sp.merges.size());
  }
  SetRatio(state, total, w);
  state.counters["streams_kept_tokens"] = static_cast<double>(kept);
  if (merges > 0) state.counters["merges"] = static_cast<double>(merges);
}

// The merging policies (prumerge's kNN, LOOK-M's nearest kept key) under each similarity
// implementation (src/policy/similarity.h), in this binary: kReference is the code before the
// blocked search (one DotProduct per pair, streams one after another) — the baseline.
void BM_PlanSimilarity(benchmark::State& state, std::string spec, kp::SimilarityKernel kernel) {
  kp::SetSimilarityKernel(kernel);
  BM_Plan(state, std::move(spec));
  kp::SetSimilarityKernel(kp::SimilarityKernel::kBlocked);
}

// DivPrune on one image as the cache policy sees it per stream (and as the standalone reducer
// on visual features): N = 2880 rows of D = 128, k = 288. The first pick needs every row's
// nearest other row (O(N^2 D): the blocked exact search of similarity.h, or with kReference the
// per-pair loop, the baseline); the max-min loop is O(k N D) either way. Arg: k (k = 1 times
// the first pick alone).
void BM_DivPruneSelect(benchmark::State& state, kp::SimilarityKernel kernel) {
  constexpr int32_t kN = 2880, kD = 128;
  const int32_t k = static_cast<int32_t>(state.range(0));
  std::mt19937 rng(4);
  std::normal_distribution<float> nd;
  std::vector<float> rows(static_cast<size_t>(kN) * kD);
  for (float& x : rows) x = nd(rng);
  kp::SetSimilarityKernel(kernel);
  for (auto _ : state) {
    auto order = kp::DivPruneSelect(rows, kD, k);
    if (!order.ok()) state.SkipWithError(std::string(order.status().message()).c_str());
    benchmark::DoNotOptimize(order);
  }
  kp::SetSimilarityKernel(kp::SimilarityKernel::kBlocked);
}

// Apply of `spec`'s plan on a copy-on-write fork; `backend` "cpu" plans from the snapshot (and
// keeps the plan for the baseline), other backends reuse that plan.
void BM_Apply(benchmark::State& state, std::string spec, std::string backend) {
  const int scale = static_cast<int>(state.range(0));
  kvcache::EvictionPlan planned;
  if (backend == "cpu") {
    World& w = GetWorld(scale);
    auto policy = kp::CreatePolicy(spec);
    auto plan = (*policy)->Plan(w.snap);
    if (!plan.ok()) {
      state.SkipWithError(std::string(plan.status().message()).c_str());
      return;
    }
    planned = *plan;
    g_plans[{scale, spec}] = planned;
  } else {
    auto it = g_plans.find({scale, spec});
    if (it == g_plans.end()) {
      state.SkipWithError("no plan: run BM_Apply/<spec> on \"cpu\" first in the same process");
      return;
    }
    planned = it->second;
  }
  World& w = GetWorld(scale, backend);
  double total = 0;
  int64_t freed = 0;
  for (auto _ : state) {
    state.PauseTiming();
    kvcache::SequenceId fork = *w.cache->Fork(w.seq);
    kvcache::EvictionPlan p = planned;
    p.sequence = fork;
    const int32_t used = w.cache->Stats().pages_used;
    state.ResumeTiming();
    const double t0 = Now();
    if (!w.cache->Apply(p).ok()) std::abort();
    total += Now() - t0;
    state.PauseTiming();
    freed = used - w.cache->Stats().pages_used;  // negative: new pages of the compacted fork
    if (!w.cache->Free(fork).ok()) std::abort();
    state.ResumeTiming();
  }
  SetRatio(state, total, w);
  state.counters["new_pages"] = static_cast<double>(-freed);
}

// A keys-only snapshot (CollectSnapshot -> Cache::ReadStream -> Backend::ReadRows for every
// stream): the read-back cost of the policies that need keys, without any row scoring.
void BM_CollectKeys(benchmark::State& state, std::string backend) {
  World& w = GetWorld(static_cast<int>(state.range(0)), backend);
  double total = 0;
  for (auto _ : state) {
    const double t0 = Now();
    auto snap = kp::CollectSnapshot(*w.cache, w.seq, w.obs, kp::SnapshotRequest{.keys = true});
    total += Now() - t0;
    if (!snap.ok()) state.SkipWithError(std::string(snap.status().message()).c_str());
    benchmark::DoNotOptimize(snap);
  }
  SetRatio(state, total, w);
  state.counters["bytes_per_second"] = benchmark::Counter(
      static_cast<double>(w.n) * kLayers * kHeads * kDim * sizeof(float) * state.iterations() / total);
}

const char* kSpecs[] = {
    "full",
    "streamingllm:keep=0.1",
    "h2o",
    "snapkv:keep=0.1,window=32",
    "pyramidkv:keep=0.1,window=32",
    "adakv:keep=0.1,window=32",
    "tova:keep=0.1",
    "knorm:keep=0.1",
    "random:keep=0.1",
    "vlcache:keep=0.1",
    "fastv:layer=2,ratio=0.5",
    "prumerge",
    "downsample:keep=0.1",
    "divprune:keep=0.1",
    "think:lambda=0.4",
    "snapkv:keep=0.1,window=32,think=0.4",
};

void Register() {
  benchmark::RegisterBenchmark("BM_DivPruneSelect/reference", BM_DivPruneSelect,
                               kp::SimilarityKernel::kReference)
      ->Arg(1)->Arg(288)->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::RegisterBenchmark("BM_DivPruneSelect/blocked", BM_DivPruneSelect,
                               kp::SimilarityKernel::kBlocked)
      ->Arg(1)->Arg(288)->Unit(benchmark::kMillisecond)->UseRealTime();
  for (int scale : {1, 4}) {
    benchmark::RegisterBenchmark("BM_DecodeStep", BM_DecodeStep)
        ->Arg(scale)->Unit(benchmark::kMillisecond)->UseRealTime();
    // vlcache scores the post-vision rows with counts; snapkv a 32-row window; prumerge also
    // reads every key back (keys only, StreamReadOptions).
    for (const char* spec : {"vlcache:keep=0.1", "snapkv:keep=0.1,window=32", "prumerge"}) {
      const std::string name = std::string(spec).substr(0, std::string(spec).find(':'));
      benchmark::RegisterBenchmark(("BM_CollectSnapshot/" + name).c_str(), BM_CollectSnapshot,
                                   std::string(spec))
          ->Arg(scale)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(2);
    }
    for (const char* spec : kSpecs) {
      const std::string name = std::string(spec).substr(0, std::string(spec).find(':'));
      benchmark::RegisterBenchmark(("BM_Plan/" + std::string(spec)).c_str(), BM_Plan,
                                   std::string(spec))
          ->Arg(scale)->Unit(benchmark::kMillisecond)->UseRealTime();
    }
    // LOOK-M is O(evicted * kept * D) per stream, prumerge's kNN O(kept * image * D): the
    // reference (baseline) runs one iteration.
    const std::pair<const char*, kp::SimilarityKernel> kernels[] = {
        {"reference", kp::SimilarityKernel::kReference},
        {"blocked_serial", kp::SimilarityKernel::kBlockedSerial},
        {"portable", kp::SimilarityKernel::kPortable},
        {"blocked_avx2", kp::SimilarityKernel::kBlockedAvx2},
        {"blocked", kp::SimilarityKernel::kBlocked}};
    for (const char* spec : {"prumerge", "snapkv:keep=0.1,window=32,merge=pivot"}) {
      for (const auto& [kname, kernel] : kernels) {
        auto* b = benchmark::RegisterBenchmark(
            ("BM_PlanSimilarity/" + std::string(spec) + "/" + kname).c_str(), BM_PlanSimilarity,
            std::string(spec), kernel);
        b->Arg(scale)->Unit(benchmark::kMillisecond)->UseRealTime();
        if (kernel == kp::SimilarityKernel::kReference) b->Iterations(1);
      }
    }
    const char* apply_specs[] = {"snapkv:keep=0.1,window=32", "fastv:layer=2,ratio=0.5",
                                 "think:lambda=0.4", "prumerge"};
    for (const char* spec : apply_specs) {
      benchmark::RegisterBenchmark(("BM_Apply/" + std::string(spec)).c_str(), BM_Apply,
                                   std::string(spec), std::string("cpu"))
          ->Arg(scale)->Unit(benchmark::kMillisecond)->UseRealTime();
    }
    benchmark::RegisterBenchmark("BM_CollectKeys", BM_CollectKeys, std::string("cpu"))
        ->Arg(scale)->Unit(benchmark::kMillisecond)->UseRealTime();
    // The baselines last: they replace the world by one on "cpu-reference".
    for (const char* spec : apply_specs) {
      benchmark::RegisterBenchmark(("BM_ApplyReference/" + std::string(spec)).c_str(), BM_Apply,
                                   std::string(spec), std::string("cpu-reference"))
          ->Arg(scale)->Unit(benchmark::kMillisecond)->UseRealTime();
    }
    benchmark::RegisterBenchmark("BM_CollectKeysReference", BM_CollectKeys,
                                 std::string("cpu-reference"))
        ->Arg(scale)->Unit(benchmark::kMillisecond)->UseRealTime();
  }
}

}  // namespace

int main(int argc, char** argv) {
  Register();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_world.reset();
  return 0;
}
