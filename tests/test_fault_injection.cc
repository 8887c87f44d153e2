// Fault injection: every page allocation and every backend call an operation makes is made to
// fail in turn (N = 1, 2, ... until the operation succeeds). Each failure must come back as an
// error, leave the cache exactly as it was (Validate, Stats, every stream's contents read back
// byte-for-byte, every page's reference count), the same operation must succeed once the fault is
// gone, and freeing everything must return every page to the pool (nothing leaked).
//
// Operations swept: Append (new segment, tail extension + new pages, admit-mask gaps, copy-on-write
// of a fork-shared partial page, on the child and on the parent), Fork, Apply of plans made by
// real policies (compaction, pivot / average merges, PruMerge, ThinK channel pruning, on a plain
// and on a forked sequence), policy planning (CollectSnapshot + Plan: ReadRows and ScoreRows),
// ScoreRows with accumulation and DecodeAttention with score accumulation.
#include <catch2/catch.hpp>

#include <atomic>
#include <functional>
#include <random>
#include <string>
#include <thread>

#include "kvcache/cache.h"
#include "kvcache/policy/registry.h"
#include "kvcache/policy/snapshot.h"
#include "kvcache/testing/fault_injection.h"
#include "test_util.h"

using namespace kvcache;
using kvcache::testing::BackendCall;
using kvcache::testing::FailureMode;
using kvcache::testing::FaultInjectingBackend;
using kvcache::testing::MaskOf;
namespace kp = kvcache::policy;

namespace {

// A cache over the fault-injecting CPU backend, with what the operations under test need.
struct World {
  std::unique_ptr<Cache> cache;
  FaultInjectingBackend* hook = nullptr;
  std::vector<SequenceId> seqs;
  // Observation queries for planning: [layer][rows * q_heads * dim], and their positions.
  std::vector<std::vector<float>> queries;
  std::vector<int32_t> row_positions;
  kp::Observations obs;
  EvictionPlan plan;  // a plan prepared (fault-free) by the builder
};

CacheConfig Config(DType dtype, int32_t layers) {
  CacheConfig c;
  c.num_layers = layers;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 16;
  c.dtype = dtype;
  c.page_tokens = 4;
  c.num_pages = 1024;
  return c;
}

World MakeWorld(const CacheConfig& c) {
  World w;
  auto inner = CreateBackend("cpu");
  REQUIRE(inner.ok());
  auto faulty = std::make_unique<FaultInjectingBackend>(*std::move(inner));
  w.hook = faulty.get();
  auto cache = Cache::Create(c, std::move(faulty));
  REQUIRE(cache.ok());
  w.cache = *std::move(cache);
  return w;
}

// Appends `n` tokens at positions first..first+n-1 to every layer; tokens in [img_lo, img_hi)
// are images. Deterministic in `seed`.
absl::Status AppendTokens(Cache& cache, SequenceId s, int n, int first, uint32_t seed,
                          int img_lo = 0, int img_hi = 0, std::span<const uint8_t> admit = {},
                          int only_layer = -1) {
  const CacheConfig& c = cache.config();
  std::mt19937 rng(seed);
  std::vector<int32_t> pos(n);
  std::vector<Modality> mod(n, Modality::kText);
  for (int i = 0; i < n; ++i) {
    pos[i] = first + i;
    if (pos[i] >= img_lo && pos[i] < img_hi) mod[i] = Modality::kImage;
  }
  for (int l = 0; l < c.num_layers; ++l) {
    if (only_layer >= 0 && l != only_layer) continue;
    auto k = kvcache::testing::RandomVector(rng, size_t(n) * c.num_kv_heads * c.head_dim);
    auto v = kvcache::testing::RandomVector(rng, k.size());
    AppendRequest req{TensorRef::Of(k), TensorRef::Of(v), pos, mod, admit};
    if (absl::Status st = cache.Append(s, l, req); !st.ok()) return st;
  }
  return absl::OkStatus();
}

// Everything observable, plus every page's reference count.
struct Image {
  kvcache::testing::CacheImage contents;
  std::vector<int32_t> refs;
  int64_t tokens_stored = 0;
};

Image Take(const Cache& cache) {
  Image im;
  im.contents = kvcache::testing::Snapshot(cache);
  im.tokens_stored = im.contents.stats.tokens_stored;
  for (int32_t p = 0; p < cache.pool().num_pages(); ++p) im.refs.push_back(cache.pool().RefCount(p));
  return im;
}

bool Same(const Image& a, const Image& b) {
  return kvcache::testing::SameImage(a.contents, b.contents) && a.refs == b.refs &&
         a.tokens_stored == b.tokens_stored;
}

struct Fault {
  bool pool = false;  // PagePool::FailAllocationAfter; otherwise the backend hook
  FailureMode mode = FailureMode::kBeforeCall;
  testing::CallMask kinds = testing::kAllBackendCalls;
  std::string Label() const {
    if (pool) return "pool allocation";
    return std::string("backend call (") +
           (mode == FailureMode::kBeforeCall ? "before" : "after") + " the kernel)";
  }
};

using Builder = std::function<World()>;
using Operation = std::function<absl::Status(World&)>;

void FreeAll(World& w) {
  for (SequenceId s : w.cache->Sequences()) REQUIRE(w.cache->Free(s).ok());
  REQUIRE(w.cache->Validate().ok());
  REQUIRE(w.cache->pool().NumFree() == w.cache->pool().num_pages());
}

// Sweeps N over every failure point of `op` for one kind of fault; returns how many points
// failed (the operation succeeded at N = points + 1).
int Sweep(const std::string& what, const Builder& build, const Operation& op, const Fault& f) {
  INFO(what << " with an injected " << f.Label() << " failure");
  for (int64_t n = 1;; ++n) {
    INFO("N = " << n);
    REQUIRE(n < 1000);
    World w = build();
    REQUIRE(w.cache->Validate().ok());
    const Image before = Take(*w.cache);
    w.hook->ResetCounts();
    if (f.pool) {
      w.cache->pool().FailAllocationAfter(n);
    } else {
      w.hook->FailCallAfter(n, f.kinds, f.mode);
    }
    const absl::Status s = op(w);
    w.cache->pool().FailAllocationAfter(0);
    const int64_t injected = w.hook->Injected();
    w.hook->Disarm();
    if (s.ok()) {
      // Success means the N-th point does not exist: nothing may have been injected and lost.
      REQUIRE(injected == 0);
      REQUIRE(w.cache->Validate().ok());
      FreeAll(w);
      return static_cast<int>(n - 1);
    }
    INFO("status: " << s.ToString());
    if (f.pool) {
      REQUIRE(s.code() == absl::StatusCode::kResourceExhausted);
    } else {
      REQUIRE(injected == 1);
      REQUIRE(s.code() == absl::StatusCode::kUnavailable);
    }
    REQUIRE(s.message().find("injected") != std::string::npos);
    // The cache is exactly as before.
    REQUIRE(w.cache->Validate().ok());
    REQUIRE(Same(before, Take(*w.cache)));
    // With the fault gone the same operation succeeds, and everything can be freed.
    REQUIRE(op(w).ok());
    REQUIRE(w.cache->Validate().ok());
    FreeAll(w);
  }
}

// Sweeps pool faults and backend faults in both modes; returns the failure points per fault kind.
struct Points {
  int pool = 0, before = 0, after = 0;
};
Points SweepAll(const std::string& what, const Builder& build, const Operation& op) {
  Points p;
  p.pool = Sweep(what, build, op, Fault{.pool = true});
  p.before = Sweep(what, build, op, Fault{.mode = FailureMode::kBeforeCall});
  p.after = Sweep(what, build, op, Fault{.mode = FailureMode::kAfterCall});
  return p;
}

// A sequence with 6 tokens per stream (pages of 4: the last page half full) and a fork of it:
// both share every page, including the partial one.
World ForkedWorld(DType dtype) {
  World w = MakeWorld(Config(dtype, 2));
  const SequenceId parent = *w.cache->AddSequence();
  REQUIRE(AppendTokens(*w.cache, parent, 6, 0, 1).ok());
  const SequenceId child = *w.cache->Fork(parent);
  w.seqs = {parent, child};
  return w;
}

// The e2e fixture of test_policy_e2e.cc, smaller: 48 tokens, images at [8, 40), observation rows.
World PolicyWorld() {
  constexpr int kPrompt = 48, kRows = 12;
  World w = MakeWorld(Config(DType::kF32, 2));
  const CacheConfig& c = w.cache->config();
  const SequenceId s = *w.cache->AddSequence();
  REQUIRE(AppendTokens(*w.cache, s, kPrompt, 0, 11, 8, 40).ok());
  w.seqs = {s};
  std::mt19937 rng(5);
  for (int r = 0; r < kRows; ++r) w.row_positions.push_back(kPrompt - kRows + r);
  w.queries.resize(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    w.queries[l] = kvcache::testing::RandomVector(rng, size_t(kRows) * c.num_q_heads * c.head_dim,
                                                  2.0f);
    ScoreRequest sr;
    sr.queries = w.queries[l];
    sr.positions = w.row_positions;
    sr.accumulate = true;  // H2O accumulators
    REQUIRE(w.cache->ScoreRows(s, l, sr).ok());
  }
  for (int l = 0; l < c.num_layers; ++l) {
    w.obs.layers.push_back({.queries = w.queries[l], .positions = w.row_positions});
  }
  return w;
}

absl::StatusOr<EvictionPlan> PlanFor(World& w, SequenceId s, const std::string& spec) {
  auto policy = kp::CreatePolicy(spec);
  if (!policy.ok()) return policy.status();
  auto snap = kp::CollectSnapshot(*w.cache, s, w.obs, (*policy)->Needs());
  if (!snap.ok()) return snap.status();
  return (*policy)->Plan(*snap);
}

const char* const kPolicies[] = {
    "snapkv:keep=0.3,window=6",                      // compaction
    "snapkv:keep=0.3,window=6,merge=pivot",          // LOOK-M pivot merge
    "h2o:merge=average",                             // average merge
    "prumerge:knn=4,plus=1,merge_keys=1",            // PruMerge kNN merge
    "think:lambda=0.5,window=6,recent=4",            // ThinK channel pruning
    "snapkv:keep=0.4,window=6,think=0.25,think_window=6,think_recent=4",  // both
    "fastv:layer=1",                                 // only layers >= 1
};

}  // namespace

TEST_CASE("FaultInjectingBackend fails exactly the armed call and forwards the rest",
          "[fault]") {
  World w = MakeWorld(Config(DType::kF32, 1));
  const SequenceId s = *w.cache->AddSequence();
  w.hook->FailCallAfter(2, MaskOf(BackendCall::kWriteRows));
  CHECK(AppendTokens(*w.cache, s, 3, 0, 1).ok());  // WriteRows call 1
  const absl::Status second = AppendTokens(*w.cache, s, 3, 3, 2);
  CHECK(second.code() == absl::StatusCode::kUnavailable);
  CHECK(AppendTokens(*w.cache, s, 3, 3, 2).ok());  // call 3: disarmed by the failure
  CHECK(w.hook->Calls(BackendCall::kWriteRows) == 3);
  CHECK(w.hook->Injected() == 1);
  CHECK(*w.cache->StreamLength(s, 0, 0) == 6);
  // Kinds outside the mask are never failed.
  w.hook->FailCallAfter(1, MaskOf(BackendCall::kGatherRows));
  CHECK(w.cache->ReadStream(s, 0, 1).ok());
  CHECK(w.hook->Injected() == 1);
  w.hook->Disarm();
  // A failing arena allocation fails Cache::Create cleanly.
  auto faulty = std::make_unique<FaultInjectingBackend>(*CreateBackend("cpu"));
  faulty->FailCallAfter(1, MaskOf(BackendCall::kAllocateArena));
  auto bad = Cache::Create(Config(DType::kF32, 1), std::move(faulty));
  CHECK(bad.status().code() == absl::StatusCode::kUnavailable);
}

TEST_CASE("Append: every failure point leaves the cache unchanged", "[fault][append]") {
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    INFO("dtype " << DTypeName(dtype));
    // New segments: 9 tokens (3 pages per stream) into layer 1 of an empty sequence.
    const Builder fresh = [dtype] {
      World w = MakeWorld(Config(dtype, 2));
      w.seqs = {*w.cache->AddSequence()};
      return w;
    };
    Points p = SweepAll("append to an empty sequence", fresh, [](World& w) {
      return AppendTokens(*w.cache, w.seqs[0], 9, 0, 3, 0, 0, {}, 1);
    });
    CHECK(p.pool == 1);  // one all-or-nothing allocation for every head
    CHECK(p.before == 1);
    CHECK(p.after == 1);

    // Tail extension: 3 tokens there, 7 more (fills the tail page, then 2 new pages).
    const Builder tail = [dtype] {
      World w = MakeWorld(Config(dtype, 2));
      w.seqs = {*w.cache->AddSequence()};
      REQUIRE(AppendTokens(*w.cache, w.seqs[0], 3, 0, 4, 0, 0, {}, 0).ok());
      return w;
    };
    p = SweepAll("append extending a partial tail", tail, [](World& w) {
      return AppendTokens(*w.cache, w.seqs[0], 7, 3, 5, 0, 0, {}, 0);
    });
    CHECK(p.pool == 1);
    CHECK(p.before == 1);
    CHECK(p.after == 1);

    // Admit mask with gaps: several row writes per stream in one backend call.
    static const uint8_t kAdmit[] = {1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1};
    p = SweepAll("append with an admit mask", tail, [](World& w) {
      return AppendTokens(*w.cache, w.seqs[0], 11, 3, 6, 0, 0, kAdmit, 0);
    });
    CHECK(p.pool == 1);
    CHECK(p.before == 1);  // one WriteRows call carries every run of admitted tokens
    CHECK(p.after == 1);
  }
}

TEST_CASE("Append copy-on-write of a fork-shared partial page: every failure point",
          "[fault][append][fork]") {
  for (DType dtype : {DType::kF32, DType::kF16}) {
    INFO("dtype " << DTypeName(dtype));
    const Builder forked = [dtype] { return ForkedWorld(dtype); };
    for (int who : {0, 1}) {  // append to the parent, then to the child
      INFO((who == 0 ? "parent" : "child"));
      const Points p = SweepAll("copy-on-write append", forked, [who](World& w) {
        // 5 tokens to layer 1: copy the shared half-full page, fill it, one more page.
        return AppendTokens(*w.cache, w.seqs[who], 5, 6, 7, 0, 0, {}, 1);
      });
      CHECK(p.pool == 1);
      CHECK(p.before == 2);  // CopyPages, then WriteRows
      CHECK(p.after == 2);
    }
    // After one side wrote, the page is no longer shared: the other side appends in place.
    const Builder diverged = [dtype] {
      World w = ForkedWorld(dtype);
      REQUIRE(AppendTokens(*w.cache, w.seqs[1], 1, 6, 8, 0, 0, {}, 1).ok());
      return w;
    };
    const Points p = SweepAll("append after the sibling copied", diverged, [](World& w) {
      return AppendTokens(*w.cache, w.seqs[0], 1, 6, 9, 0, 0, {}, 1);
    });
    CHECK(p.pool == 0);  // writes into the parent's own free slot: no allocation
    CHECK(p.before == 1);
    CHECK(p.after == 1);
  }
}

TEST_CASE("Fork: no allocation and no backend call can fail it", "[fault][fork]") {
  const Builder forked = [] { return ForkedWorld(DType::kF16); };
  const Points p = SweepAll("fork", forked, [](World& w) { return w.cache->Fork(w.seqs[1]).status(); });
  CHECK(p.pool == 0);
  CHECK(p.before == 0);
  CHECK(p.after == 0);
}

TEST_CASE("Apply of real policy plans: every failure point leaves the cache unchanged",
          "[fault][apply][policy]") {
  for (const char* spec : kPolicies) {
    INFO("policy " << spec);
    for (bool on_fork : {false, true}) {
      INFO((on_fork ? "on a forked sequence (shared pages)" : "on a plain sequence"));
      const Builder build = [spec, on_fork] {
        World w = PolicyWorld();
        SequenceId target = w.seqs[0];
        if (on_fork) target = *w.cache->Fork(target);
        auto plan = PlanFor(w, target, spec);
        INFO(plan.status().ToString());
        REQUIRE(plan.ok());
        REQUIRE_FALSE(plan->streams.empty());
        w.plan = *std::move(plan);
        return w;
      };
      const Points p =
          SweepAll("apply", build, [](World& w) { return w.cache->Apply(w.plan); });
      CHECK(p.pool == 1);    // one all-or-nothing allocation
      CHECK(p.before == 1);  // one gather over every planned stream
      CHECK(p.after == 1);
    }
  }
}

TEST_CASE("Policy planning (CollectSnapshot + Plan): every backend failure is an error",
          "[fault][policy]") {
  for (const char* spec : kPolicies) {
    INFO("policy " << spec);
    const Builder build = [] { return PolicyWorld(); };
    const Points p = SweepAll("plan", build, [spec](World& w) {
      return PlanFor(w, w.seqs[0], spec).status();
    });
    CHECK(p.pool == 0);     // planning reads; it never allocates pages
    CHECK(p.before >= 1);   // ReadRows (keys) and/or ScoreRows (observation rows)
    CHECK(p.after == p.before);
  }
}

TEST_CASE("ScoreRows and DecodeAttention with score accumulation: a failure adds nothing",
          "[fault][kernels]") {
  const Builder build = [] { return PolicyWorld(); };
  Points p = SweepAll("ScoreRows(accumulate)", build, [](World& w) {
    ScoreRequest sr;
    sr.queries = w.queries[1];
    sr.positions = w.row_positions;
    sr.accumulate = true;
    return w.cache->ScoreRows(w.seqs[0], 1, sr).status();
  });
  CHECK(p.before == 1);
  CHECK(p.after == 1);
  const Builder two = [] {
    World w = PolicyWorld();
    w.seqs.push_back(*w.cache->Fork(w.seqs[0]));
    return w;
  };
  const Operation decode = [](World& w) {
    const CacheConfig& c = w.cache->config();
    std::vector<float> q(2 * c.num_q_heads * c.head_dim, 0.5f), out(q.size());
    DecodeOptions o;
    o.accumulate_scores = true;
    return w.cache->DecodeAttention(w.seqs, 1, q, out, {}, o);
  };
  CHECK(Sweep("DecodeAttention(accumulate_scores)", two, decode, Fault{}) == 1);
  CHECK(Sweep("DecodeAttention(accumulate_scores)", two, decode, Fault{.pool = true}) == 0);
}

// The score accumulators live in host memory the kernel adds to directly (SegmentView::scores),
// so whether a failed DecodeAttention left them untouched is the backend's duty: the CPU and CUDA
// backends add to them only after every fallible step succeeded. A backend that reports an error
// AFTER accumulating (simulated here) leaves the added probabilities behind; everything else is
// still unchanged. Documented in docs/RELIABILITY.md (backend contract).
TEST_CASE("DecodeAttention failing after its kernel ran: only score accumulators may differ",
          "[fault][kernels]") {
  World w = PolicyWorld();
  const SequenceId s = w.seqs[0];
  const Image before = Take(*w.cache);
  const CacheConfig& c = w.cache->config();
  std::vector<float> q(c.num_q_heads * c.head_dim, 0.5f), out(q.size());
  DecodeOptions o;
  o.accumulate_scores = true;
  w.hook->FailCallAfter(1, MaskOf(BackendCall::kDecodeAttention), FailureMode::kAfterCall);
  const SequenceId batch[] = {s};
  REQUIRE(w.cache->DecodeAttention(batch, 1, q, out, {}, o).code() ==
          absl::StatusCode::kUnavailable);
  REQUIRE(w.cache->Validate().ok());
  Image after = Take(*w.cache);
  bool scores_changed = false;
  for (auto& [key, contents] : after.contents.streams) {
    const auto& was = before.contents.streams.at(key);
    if (contents.scores != was.scores) scores_changed = true;
    contents.scores = was.scores;
  }
  CHECK(scores_changed);  // the simulated late failure did leave its additions behind
  CHECK(Same(before, after));  // and nothing else changed
}

TEST_CASE("FaultInjectingBackend under concurrent calls fails exactly one call per arming",
          "[fault][concurrency]") {
  World w = MakeWorld(Config(DType::kF32, 1));
  constexpr int kThreads = 4, kAppends = 50;
  std::vector<SequenceId> seqs;
  for (int t = 0; t < kThreads; ++t) seqs.push_back(*w.cache->AddSequence());
  w.hook->FailCallAfter(37, MaskOf(BackendCall::kWriteRows));
  std::atomic<int> failed{0}, other{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      int next = 0;
      for (int i = 0; i < kAppends; ++i) {
        const absl::Status s = AppendTokens(*w.cache, seqs[t], 2, next, 100 + t * kAppends + i);
        if (s.ok()) {
          next += 2;
        } else if (s.code() == absl::StatusCode::kUnavailable) {
          ++failed;
        } else {
          ++other;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(failed.load() == 1);
  CHECK(other.load() == 0);
  CHECK(w.hook->Injected() == 1);
  CHECK(w.hook->Calls(BackendCall::kWriteRows) == kThreads * kAppends);
  REQUIRE(w.cache->Validate().ok());
  int64_t tokens = 0;
  for (SequenceId s : seqs) tokens += *w.cache->StreamLength(s, 0, 0);
  CHECK(tokens == 2 * (kThreads * kAppends - 1));  // the failed append stored nothing
  FreeAll(w);
}

TEST_CASE("Sparse decode (Quest, retrieval) and appends that extend a key index: every failure "
          "point leaves the cache unchanged",
          "[fault][sparse]") {
  const Builder build = [] {
    CacheConfig c = Config(DType::kF16, 3);
    c.page_summaries = true;
    World w = MakeWorld(c);
    const SequenceId s = *w.cache->AddSequence();
    REQUIRE(AppendTokens(*w.cache, s, 30, 0, 7).ok());
    w.seqs = {s};
    return w;
  };
  const auto decode = [](ReadPolicy::Kind kind) -> Operation {
    return [kind](World& w) {
      const CacheConfig& c = w.cache->config();
      std::vector<float> q(size_t(c.num_q_heads) * c.head_dim, 0.25f), out(q.size());
      DecodeOptions o;
      o.read_policy.kind = kind;
      o.read_policy.dense_first_layers = 0;
      o.read_policy.token_budget = 8;
      o.read_policy.top_k = 5;
      return w.cache->DecodeAttention(w.seqs, 2, q, out, {}, o);
    };
  };
  const Points quest = SweepAll("Quest decode", build, decode(ReadPolicy::Kind::kQuest));
  CHECK(quest.pool == 0);
  CHECK(quest.before == 1);  // SparseDecodeAttention
  CHECK(quest.after == 1);
  // First retrieval decode: CreateKeyIndex and ReadRows per stream (index build), then the kernel.
  const Points retrieval =
      SweepAll("retrieval decode (index build)", build, decode(ReadPolicy::Kind::kRetrieval));
  CHECK(retrieval.pool == 0);
  CHECK(retrieval.before == retrieval.after);
  CHECK(retrieval.before >= 3);
  // Appends into a stream whose index and page summaries exist must roll back both.
  const Builder indexed = [&] {
    World w = build();
    REQUIRE(decode(ReadPolicy::Kind::kRetrieval)(w).ok());
    return w;
  };
  const Operation append = [](World& w) {
    return AppendTokens(*w.cache, w.seqs[0], 5, 30, 9, 0, 0, {}, 2);
  };
  const Points appended = SweepAll("Append into an indexed stream", indexed, append);
  CHECK(appended.pool >= 1);
  CHECK(appended.before >= 1);
  // After a failed append the index must still describe exactly the stored keys: retrieval of
  // every key through it equals the exact scan.
  World w = indexed();
  w.hook->FailCallAfter(1, MaskOf(BackendCall::kWriteRows));
  REQUIRE_FALSE(append(w).ok());
  w.hook->Disarm();
  const CacheConfig& c = w.cache->config();
  std::vector<float> q(size_t(c.num_q_heads) * c.head_dim, 0.25f), via_index(q.size()),
      exact(q.size());
  DecodeOptions o;
  o.read_policy.kind = ReadPolicy::Kind::kRetrieval;
  o.read_policy.dense_first_layers = 0;
  o.read_policy.top_k = 1000;
  REQUIRE(w.cache->DecodeAttention(w.seqs, 2, q, via_index, {}, o).ok());
  o.read_policy.exact_search = true;
  REQUIRE(w.cache->DecodeAttention(w.seqs, 2, q, exact, {}, o).ok());
  for (size_t i = 0; i < q.size(); ++i) CHECK(via_index[i] == Approx(exact[i]).margin(1e-5));
  FreeAll(w);
}
