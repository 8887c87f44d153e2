// The LLM token policies on hand-built snapshots: small hand-computed examples per scorer.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>

#include "kvcache/policy/budget.h"
#include "kvcache/policy/policy.h"
#include "kvcache/policy/registry.h"
#include "kvcache/policy/scorers.h"
#include "policy_test_util.h"

namespace kp = kvcache::policy;
using kp::testing::Uniform;

namespace {

using kp::testing::MustPlan;

std::string PlanError(std::string_view spec, const kp::SequenceSnapshot& s) {
  auto p = kp::CreatePolicy(spec);
  REQUIRE(p.ok());
  auto plan = (*p)->Plan(s);
  REQUIRE_FALSE(plan.ok());
  return std::string(plan.status().message());
}

using V = std::vector<int32_t>;

}  // namespace

TEST_CASE("SnapKV: pooled window scores, window kept, budget < window is an error",
          "[policy][snapkv]") {
  auto s = Uniform(1, 1, 1, 4, 10);
  s.stream(0, 0).window_scores = {0, 0, 10, 0, 0, 0, 0, 1, 0.5f, 0.5f};
  // Avg pooling (kernel 5, padding counted) over the 8 non-window tokens: indices 0..4 all
  // score 2, 5..7 score 0.2: keep the three earliest of the tie plus the window.
  auto plan = MustPlan("snapkv:tokens=5,window=2", s);
  REQUIRE(plan.streams.size() == 1);
  CHECK(plan.streams[0].kept == V{0, 1, 2, 8, 9});
  // No pooling: 10 (idx 2), 1 (idx 7), then the 0-ties by position (idx 0).
  plan = MustPlan("snapkv:tokens=5,window=2,pool=none", s);
  CHECK(plan.streams[0].kept == V{0, 2, 7, 8, 9});
  CHECK(PlanError("snapkv:tokens=1,window=2", s).find("below the window") != std::string::npos);
  // n <= budget: nothing to compress, empty plan.
  CHECK(MustPlan("snapkv:tokens=10,window=2", s).streams.empty());
  // Ratio budget: round(0.5 * 10) = 5.
  CHECK(MustPlan("snapkv:keep=0.5,window=2,pool=none", s).streams[0].kept == V{0, 2, 7, 8, 9});
  // Needs window scores.
  auto missing = Uniform(1, 1, 1, 4, 10);
  auto p = kp::CreatePolicy("snapkv:tokens=5,window=2");
  auto r = (*p)->Plan(missing);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == absl::StatusCode::kFailedPrecondition);
}

TEST_CASE("H2O: heavy hitters by accumulated score plus the recent window", "[policy][h2o]") {
  auto s = Uniform(1, 1, 1, 4, 20);
  auto& acc = s.stream(0, 0).accumulated;
  acc[5] = 10;
  acc[3] = 9;
  acc[7] = 8;
  acc[18] = 100;
  acc[1] = std::numeric_limits<float>::quiet_NaN();  // NaN ranks lowest
  // heavy = recent = floor(0.1 * 20) = 2: recent {18, 19} + top 2 of the rest {5, 3}.
  CHECK(MustPlan("h2o", s).streams[0].kept == V{3, 5, 18, 19});
  // heavy 0.2 -> 4 heavy: 5, 3, 7, then zeros by position: 0 (the NaN at 1 loses).
  CHECK(MustPlan("h2o:heavy=0.2", s).streams[0].kept == V{0, 3, 5, 7, 18, 19});
  for (float& x : acc) x = std::numeric_limits<float>::quiet_NaN();
  CHECK(MustPlan("h2o", s).streams[0].kept == V{0, 1, 18, 19});  // all NaN: by position
}

TEST_CASE("StreamingLLM keeps sinks and the most recent tokens", "[policy][streamingllm]") {
  auto s = Uniform(2, 2, 2, 4, 20);
  auto plan = MustPlan("streamingllm:keep=0.3", s);  // budget 6 = 4 sinks + 2 recent
  REQUIRE(plan.streams.size() == 4);
  for (const auto& sp : plan.streams) CHECK(sp.kept == V{0, 1, 2, 3, 18, 19});
  CHECK(MustPlan("streamingllm:keep=0.3,sinks=1", s).streams[0].kept == V{0, 15, 16, 17, 18, 19});
}

TEST_CASE("TOVA: last-row attention averaged over heads, one ranking per layer",
          "[policy][tova]") {
  auto s = Uniform(1, 2, 2, 4, 4);
  s.stream(0, 0).last_row_scores = {0.1f, 0.5f, 0.2f, 0.2f};
  s.stream(0, 1).last_row_scores = {0.3f, 0.1f, 0.2f, 0.4f};
  // Mean: {0.2, 0.3, 0.2, 0.3}: both heads keep positions 1 and 3.
  auto plan = MustPlan("tova:keep=0.5", s);
  REQUIRE(plan.streams.size() == 2);
  CHECK(plan.streams[0].kept == V{1, 3});
  CHECK(plan.streams[1].kept == V{1, 3});
}

TEST_CASE("Knorm keeps the smallest-norm keys", "[policy][knorm]") {
  auto s = Uniform(1, 1, 1, 2, 5);
  s.stream(0, 0).keys = {3, 4, /**/ 1, 0, /**/ 0, 0.5f, /**/ 6, 8, /**/ 0, 2};  // norms 5 1 .5 10 2
  CHECK(MustPlan("knorm:tokens=2", s).streams[0].kept == V{1, 2});
  CHECK(MustPlan("knorm:tokens=3,window=1", s).streams[0].kept == V{1, 2, 4});
  auto score = kp::ScoreTokens(kp::TokenScore::kKeyNorm, s, 0, 0, 0);
  CHECK((*score)[0] == Approx(-5.0));
  s.stream(0, 0).keys.clear();
  CHECK(PlanError("knorm:tokens=2", s).find("no keys") != std::string::npos);
}

TEST_CASE("Random: seeded, deterministic, independent of call order", "[policy][random]") {
  auto s = Uniform(2, 2, 2, 4, 100);
  auto a = MustPlan("random:keep=0.2,seed=1", s);
  auto b = MustPlan("random:keep=0.2,seed=1", s);
  auto c = MustPlan("random:keep=0.2,seed=2", s);
  REQUIRE(a.streams.size() == 4);
  for (size_t i = 0; i < a.streams.size(); ++i) {
    CHECK(a.streams[i].kept.size() == 20);
    CHECK(a.streams[i].kept == b.streams[i].kept);
  }
  CHECK(a.streams[0].kept != c.streams[0].kept);
  CHECK(a.streams[0].kept != a.streams[1].kept);  // heads draw independently
  // The kept set is the top 20 of SeededUniform.
  std::vector<std::pair<float, int32_t>> u;
  for (int32_t j = 0; j < 100; ++j) u.push_back({kp::SeededUniform(1, 0, 0, j), j});
  std::sort(u.begin(), u.end(), [](auto x, auto y) { return x.first > y.first; });
  V want;
  for (int i = 0; i < 20; ++i) want.push_back(u[i].second);
  std::sort(want.begin(), want.end());
  CHECK(a.streams[0].kept == want);
}

TEST_CASE("AdaKV: head-wise budgets from the global top-k, window on top", "[policy][adakv]") {
  auto s = Uniform(1, 2, 2, 4, 8);
  s.stream(0, 0).window_scores = {9, 8, 7, 6, 0, 0, 1, 1};
  s.stream(0, 1).window_scores = {1, 2, 0, 0, 0, 0, 1, 1};
  // B = 4 - 2 = 2 per head; top 4 all in head 0: budgets 4 and 0, plus the window of 2.
  auto plan = MustPlan("adakv:tokens=4,window=2,pool=none", s);
  REQUIRE(plan.streams.size() == 2);
  CHECK(plan.streams[0].kept == V{0, 1, 2, 3, 6, 7});
  CHECK(plan.streams[1].kept == V{6, 7});
  // floor = 1: uniform split, identical to SnapKV.
  auto uni = MustPlan("adakv:tokens=4,window=2,pool=none,floor=1", s);
  auto snap = MustPlan("snapkv:tokens=4,window=2,pool=none", s);
  CHECK(uni.streams[0].kept == snap.streams[0].kept);
  CHECK(uni.streams[1].kept == snap.streams[1].kept);
}

TEST_CASE("PyramidKV: per-layer kept counts follow the pyramid", "[policy][pyramidkv]") {
  const int32_t layers = 4, n = 1000;
  auto s = Uniform(layers, 1, 1, 4, n);
  std::mt19937 rng(1);
  for (auto& st : s.streams) {
    st.window_scores.resize(n);
    for (float& x : st.window_scores) x = static_cast<float>(rng() % 1000);
  }
  auto plan = MustPlan("pyramidkv:keep=0.1,window=32", s);
  auto budgets = kp::PyramidKVBudgets(n, layers, 0.1, 32);
  REQUIRE(plan.streams.size() == layers);
  for (int32_t l = 0; l < layers; ++l) {
    CHECK(static_cast<int32_t>(plan.streams[l].kept.size()) == (*budgets)[l]);
    // The window (last 32 tokens) is always kept.
    const V& k = plan.streams[l].kept;
    CHECK(V(k.end() - 32, k.end()) == [] { V w(32); std::iota(w.begin(), w.end(), 968); return w; }());
  }
}

TEST_CASE("VL-Cache: sparsity-aware layer budgets, recent window, post-vision ranking",
          "[policy][vlcache]") {
  auto s = Uniform(2, 1, 1, 4, 100);
  s.layers[0].below_threshold = {25};
  s.layers[0].causal_entries = {100};  // density 0.75
  s.layers[1].below_threshold = {75};
  s.layers[1].causal_entries = {100};  // density 0.25
  for (int l = 0; l < 2; ++l) {
    auto& st = s.stream(l, 0);
    st.post_vision_scores.resize(100);
    for (int j = 0; j < 100; ++j) st.post_vision_scores[j] = static_cast<float>((j * 37) % 100);
  }
  // alpha 0.2, L 2: ratios 0.3 and 0.1 -> 30 and 10 tokens; recent floor(0.1 * budget).
  auto plan = MustPlan("vlcache:keep=0.2", s);
  REQUIRE(plan.streams.size() == 2);
  CHECK(plan.streams[0].kept.size() == 30);
  CHECK(plan.streams[1].kept.size() == 10);
  for (int l = 0; l < 2; ++l) {
    const V& k = plan.streams[l].kept;
    const int recent = l == 0 ? 3 : 1;
    for (int r = 0; r < recent; ++r) CHECK(std::count(k.begin(), k.end(), 99 - r) == 1);
    // Every kept non-recent token scores at least as high as every evicted non-recent one.
    float min_kept = 1e9f, max_evicted = -1.0f;
    for (int j = 0; j < 100 - recent; ++j) {
      const float x = s.stream(l, 0).post_vision_scores[j];
      if (std::count(k.begin(), k.end(), j)) min_kept = std::min(min_kept, x);
      else max_evicted = std::max(max_evicted, x);
    }
    CHECK(min_kept > max_evicted);
  }
  s.layers[1].below_threshold.clear();
  s.layers[1].causal_entries.clear();
  CHECK(PlanError("vlcache:keep=0.2", s).find("no sparsity counts") != std::string::npos);
}

TEST_CASE("Bad input: empty sequences, zero-token ratios, malformed snapshots",
          "[policy][errors]") {
  auto empty = Uniform(1, 1, 1, 4, 0);
  for (const char* spec : {"h2o", "snapkv", "streamingllm", "tova", "random", "fastv", "think"}) {
    INFO(spec);
    auto p = kp::CreatePolicy(spec);
    REQUIRE(p.ok());
    auto plan = (*p)->Plan(empty);
    CHECK_FALSE(plan.ok());
  }
  auto s = Uniform(1, 1, 1, 4, 10);
  CHECK(PlanError("random:keep=0.01", s).find("zero tokens") != std::string::npos);
  CHECK(PlanError("h2o:heavy=0.01,recent=0.01", s).find("zero tokens") != std::string::npos);
  auto bad = s;
  bad.stream(0, 0).positions[3] = 1;  // not ascending
  CHECK(PlanError("random:keep=0.5", bad).find("ascend") != std::string::npos);
  bad = s;
  bad.stream(0, 0).accumulated.resize(3);
  CHECK(PlanError("h2o", bad).find("accumulated") != std::string::npos);
  CHECK(MustPlan("full", s).streams.empty());
}
