// Ranking, selection, pooling, budgets and the registry (pure functions).
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <string>

#include "kvcache/policy/budget.h"
#include "kvcache/policy/registry.h"
#include "kvcache/policy/select.h"

namespace kp = kvcache::policy;
using kvcache::Modality;

TEST_CASE("RankTokens: score desc, NaN lowest, ties by position", "[policy][select]") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> s = {1.0f, nan, 3.0f, 3.0f, -inf, nan};
  std::vector<int32_t> p = {10, 11, 13, 12, 14, 9};
  // 3.0 at position 12 (index 3) beats 3.0 at position 13; NaNs last, earlier position first.
  CHECK(kp::RankTokens(s, p) == std::vector<int32_t>{3, 2, 0, 4, 5, 1});
  std::vector<int32_t> cand = {0, 1, 2, 4};
  CHECK(kp::TopK(s, p, cand, 2) == std::vector<int32_t>{2, 0});
  CHECK(kp::TopK(s, p, cand, 9) == std::vector<int32_t>{2, 0, 4, 1});
}

TEST_CASE("SelectTokens honours sinks, recent window, budget", "[policy][select]") {
  std::vector<float> s = {0, 5, 1, 4, 0, 0};
  std::vector<int32_t> p = {0, 1, 2, 3, 4, 5};
  kp::Protection prot{.sinks = 1, .recent = 1};
  auto kept = kp::SelectTokens(s, p, {}, 3, prot);
  REQUIRE(kept.ok());
  CHECK(*kept == std::vector<int32_t>{0, 1, 5});
  kept = kp::SelectTokens(s, p, {}, 4, prot);
  CHECK(*kept == std::vector<int32_t>{0, 1, 3, 5});
  // Protections larger than the budget win (documented).
  kept = kp::SelectTokens(s, p, {}, 3, {.sinks = 2, .recent = 2});
  CHECK(*kept == std::vector<int32_t>{0, 1, 4, 5});
  CHECK_FALSE(kp::SelectTokens(s, p, {}, -1, prot).ok());
  CHECK_FALSE(kp::SelectTokens(s, std::vector<int32_t>{0, 1}, {}, 3, prot).ok());
}

TEST_CASE("SelectTokens: text protection, visual-only and modality caps", "[policy][select]") {
  std::vector<float> s = {9, 1, 8, 7, 6, 2};
  std::vector<int32_t> p = {0, 1, 2, 3, 4, 5};
  std::vector<Modality> m = {Modality::kText, Modality::kText, Modality::kImage,
                             Modality::kImage, Modality::kImage, Modality::kText};
  auto kept = kp::SelectTokens(s, p, m, 4, {.protect_text = true});
  REQUIRE(kept.ok());
  CHECK(*kept == std::vector<int32_t>{0, 1, 2, 5});  // 3 text + best image
  kp::Protection cap;
  cap.modality_keep[static_cast<int>(Modality::kImage)] = 1.0f / 3.0f;  // round(1) image
  kept = kp::SelectTokens(s, p, m, 4, cap);
  CHECK(*kept == std::vector<int32_t>{0, 1, 2, 5});  // one image, then the best texts
  cap.modality_keep[0] = 2.0f;
  CHECK_FALSE(kp::SelectTokens(s, p, m, 4, cap).ok());
}

TEST_CASE("Pool1D: zero padding counted in the average; max pooling", "[policy][select]") {
  std::vector<float> s = {5, 0, 0, 0, 0, 0, 10};
  auto avg = kp::Pool1D(s, 5, kp::Pooling::kAvg);
  CHECK(avg[0] == Approx(1.0));   // (0 + 0 + 5 + 0 + 0) / 5
  CHECK(avg[2] == Approx(1.0));
  CHECK(avg[3] == Approx(0.0));
  CHECK(avg[4] == Approx(2.0));
  CHECK(avg[6] == Approx(2.0));
  auto mx = kp::Pool1D(s, 5, kp::Pooling::kMax);
  CHECK(mx[0] == 5.0f);
  CHECK(mx[3] == 0.0f);
  CHECK(mx[4] == 10.0f);
  CHECK(kp::Pool1D(s, 5, kp::Pooling::kNone) == s);
}

TEST_CASE("UniformBudget rounds half away from zero and rejects bad ratios", "[policy][budget]") {
  CHECK(*kp::UniformBudget(0.1, 25) == 3);
  CHECK(*kp::UniformBudget(1.0, 25) == 25);
  CHECK_FALSE(kp::UniformBudget(0.0, 25).ok());
  CHECK_FALSE(kp::UniformBudget(1.5, 25).ok());
  CHECK_FALSE(kp::UniformBudget(std::nan(""), 25).ok());
  CHECK_FALSE(kp::UniformBudget(0.01, 10).ok());  // keeps zero tokens
  CHECK_FALSE(kp::UniformBudget(0.5, 0).ok());    // empty sequence
}

TEST_CASE("PyramidKV budgets: hand example, cap, average, L = 1", "[policy][budget]") {
  // total = 100, min = 5, max = 195, step = 190 // 3 = 63.
  auto b = kp::PyramidKVBudgets(1000, 4, 0.1, 32, 20);
  REQUIRE(b.ok());
  CHECK(*b == std::vector<int32_t>{227, 164, 101, 38});
  // Capped: total 50, max 98 >= n - w = 90 -> max 90, min 10, step 40.
  CHECK(*kp::PyramidKVBudgets(100, 3, 0.5, 10, 20) == std::vector<int32_t>{100, 60, 20});
  CHECK(*kp::PyramidKVBudgets(1000, 1, 0.1, 32, 20) == std::vector<int32_t>{132});
  // Property: the mean of (kept - w) equals keep*n up to the floor of step.
  std::mt19937 rng(3);
  for (int trial = 0; trial < 200; ++trial) {
    const int32_t n = 200 + static_cast<int32_t>(rng() % 5000);
    const int32_t layers = 2 + static_cast<int32_t>(rng() % 40);
    const double keep = 0.02 + (rng() % 300) / 1000.0;
    const int32_t w = static_cast<int32_t>(rng() % 64);
    auto got = kp::PyramidKVBudgets(n, layers, keep, w);
    REQUIRE(got.ok());
    double mean = 0;
    bool capped = false;
    for (int32_t x : *got) {
      mean += x - w;
      capped |= x == n;
    }
    mean /= layers;
    if (!capped) CHECK(std::abs(mean - std::llround(keep * n)) <= (layers - 1) / 2.0 + 1e-9);
    for (size_t l = 1; l < got->size(); ++l) CHECK((*got)[l] <= (*got)[l - 1]);
  }
  CHECK_FALSE(kp::PyramidKVBudgets(1000, 4, 0.0, 32).ok());
  CHECK_FALSE(kp::PyramidKVBudgets(0, 4, 0.1, 32).ok());
}

TEST_CASE("VL-Cache layer budgets: density, sum before clipping, clip, renorm",
          "[policy][budget]") {
  std::vector<int64_t> below = {1, 3}, causal = {4, 4};
  CHECK(*kp::LayerDensity(below, causal) == Approx(0.5));
  CHECK_FALSE(kp::LayerDensity(std::vector<int64_t>{5}, std::vector<int64_t>{4}).ok());

  std::vector<double> d = {0.2, 0.4, 0.6, 0.8};
  std::vector<int32_t> n(4, 1000);
  auto b = kp::VlCacheLayerBudgets(d, 0.25, n);
  REQUIRE(b.ok());
  CHECK(b->tokens == std::vector<int32_t>{100, 200, 300, 400});

  // Oracle: before clipping the ratios sum to alpha * L exactly (random densities).
  std::mt19937 rng(5);
  for (int trial = 0; trial < 100; ++trial) {
    const int layers = 1 + static_cast<int>(rng() % 40);
    std::vector<double> dens(layers);
    for (double& x : dens) x = (rng() % 1000) / 1000.0;
    dens[0] = 0.5;
    const double alpha = 0.01 + (rng() % 990) / 1000.0;
    auto r = kp::VlCacheLayerBudgets(dens, alpha, std::vector<int32_t>(layers, 500));
    REQUIRE(r.ok());
    double sum = 0;
    for (double x : r->unclipped) sum += x;
    CHECK(sum == Approx(alpha * layers).epsilon(1e-12));
    for (double x : r->ratio) CHECK((x >= 0.01 && x <= 1.0));
  }

  // Clipping is not renormalised by default; renorm redistributes.
  std::vector<double> d2 = {0.9, 0.1};
  auto clipped = kp::VlCacheLayerBudgets(d2, 0.8, std::vector<int32_t>{100, 100});
  CHECK(clipped->unclipped[0] == Approx(1.44));
  CHECK(clipped->ratio == std::vector<double>{1.0, clipped->unclipped[1]});
  CHECK(clipped->tokens == std::vector<int32_t>{100, 16});
  auto renorm = kp::VlCacheLayerBudgets(d2, 0.8, std::vector<int32_t>{100, 100}, true);
  CHECK(renorm->ratio[0] == 1.0);
  CHECK(renorm->ratio[1] == Approx(0.6));
  CHECK_FALSE(kp::VlCacheLayerBudgets(d2, 1.2, std::vector<int32_t>{100, 100}).ok());
}

TEST_CASE("AdaKV head budgets follow the global top-k with a floor", "[policy][budget]") {
  std::vector<float> h0 = {9, 8, 7, 6}, h1 = {1, 2, 0, 0};
  std::vector<int32_t> p = {0, 1, 2, 3};
  auto b = kp::AdaKvHeadBudgets({h0, h1}, {p, p}, 2, 0.2);
  REQUIRE(b.ok());
  CHECK(*b == std::vector<int32_t>{4, 0});  // round(4*0.8 + 0.4) = 4, round(0.4) = 0
  std::vector<float> g0 = {9, 1, 1, 1}, g1 = {8, 7, 1, 1};
  // top 4: 9 (h0), 8, 7 (h1), then the 1s tie at position 1: head 0 wins.
  CHECK(*kp::AdaKvHeadBudgets({g0, g1}, {p, p}, 2, 0.2) == std::vector<int32_t>{2, 2});
  CHECK(*kp::AdaKvHeadBudgets({g0, g1}, {p, p}, 2, 1.0) == std::vector<int32_t>{2, 2});
  CHECK_FALSE(kp::AdaKvHeadBudgets({g0, g1}, {p, p}, 2, 1.5).ok());
}

TEST_CASE("Registry: names, defaults and clear errors", "[policy][registry]") {
  for (const kp::PolicyInfo& info : kp::ListPolicies()) {
    INFO(info.name);
    auto p = kp::CreatePolicy(info.name);
    REQUIRE(p.ok());
    CHECK((*p)->name() == info.name);
    if (!info.defaults.empty()) CHECK(kp::CreatePolicy(info.name, info.defaults).ok());
  }
  CHECK(kp::ListPolicies().size() >= 13);
  auto snap = kp::CreatePolicy("snapkv:keep=0.2,window=16,pool=max");
  REQUIRE(snap.ok());
  CHECK((*snap)->Describe().find("keep=0.2") != std::string::npos);
  CHECK((*snap)->Needs().window_rows == 16);

  auto err = [](std::string_view spec) {
    auto p = kp::CreatePolicy(spec);
    REQUIRE_FALSE(p.ok());
    return std::string(p.status().message());
  };
  CHECK(err("nope").find("unknown policy 'nope'") != std::string::npos);
  CHECK(err("snapkv:foo=1").find("unknown key 'foo'") != std::string::npos);
  CHECK(err("snapkv:keep=abc").find("keep='abc' is not a number") != std::string::npos);
  CHECK(err("snapkv:keep=1.5").find("keep='1.5' is outside (0, 1]") != std::string::npos);
  CHECK(err("snapkv:keep=0").find("outside") != std::string::npos);
  CHECK(err("snapkv:keep=nan").find("outside") != std::string::npos);
  CHECK(err("snapkv:window=3.5").find("not an integer") != std::string::npos);
  CHECK(err("snapkv:keep").find("not key=value") != std::string::npos);
  CHECK(err("snapkv:keep=0.1,keep=0.2").find("given twice") != std::string::npos);
  CHECK(err("snapkv:pool=sum").find("not one of") != std::string::npos);
  CHECK(err("fastv:ratio=1").find("ratio='1'") != std::string::npos);
  CHECK(err("h2o:heavy=0,recent=0").find("zero tokens") != std::string::npos);
  CHECK(err("snapkv:kernel=4").find("kernel=4") != std::string::npos);
  CHECK(err("vlcache:renorm=2").find("not a boolean") != std::string::npos);
}
