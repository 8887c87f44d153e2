// Ranking, selection, pooling, budgets and the registry (pure functions).
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <map>
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

TEST_CASE("PyramidKV budgets: capacity with the window inside, fallback, average, L = 1",
          "[policy][budget]") {
  // C = 100 (window inside), C - w = 68; min = 68 // 20 = 3, max = 136 - 3 = 133,
  // step = 130 // 3 = 43: layers keep 133 + 32, 90 + 32, 47 + 32, 4 + 32.
  auto b = kp::PyramidKVBudgets(1000, 4, 0.1, 32, 20);
  REQUIRE(b.ok());
  CHECK(*b == std::vector<int32_t>{165, 122, 79, 36});
  // Capped: C = 60, C - w = 50 <= n/2; max 98 >= n - w = 90 -> max 90, min 10, step 40.
  CHECK(*kp::PyramidKVBudgets(100, 3, 0.6, 10, 20) == std::vector<int32_t>{100, 60, 20});
  // The official uniform fallback: n = 100 < 2(C - w) = 2 * 61: every layer keeps C = 71.
  CHECK(*kp::PyramidKVBudgets(100, 3, 0.71, 10, 20) == std::vector<int32_t>{71, 71, 71});
  CHECK(*kp::PyramidKVBudgets(1000, 1, 0.1, 32, 20) == std::vector<int32_t>{100});
  // C < w is an error naming both.
  auto small = kp::PyramidKVBudgets(200, 4, 0.1, 32);
  REQUIRE_FALSE(small.ok());
  CHECK(std::string(small.status().message()).find("= 20 is below the window 32") !=
        std::string::npos);
  // Property: the mean over layers of the kept counts (window included) equals C = round(keep*n)
  // up to the floor of step: C <= mean <= C + (L-2)/2. So keep spends keep of the KV.
  std::mt19937 rng(3);
  for (int trial = 0; trial < 300; ++trial) {
    const int32_t n = 200 + static_cast<int32_t>(rng() % 5000);
    const int32_t layers = 2 + static_cast<int32_t>(rng() % 40);
    const double keep = 0.02 + (rng() % 700) / 1000.0;
    const int32_t capacity = static_cast<int32_t>(std::llround(keep * n));
    const int32_t w = static_cast<int32_t>(rng() % std::min<int32_t>(64, capacity + 1));
    auto got = kp::PyramidKVBudgets(n, layers, keep, w);
    REQUIRE(got.ok());
    double mean = 0;
    for (int32_t x : *got) mean += x;
    mean /= layers;
    INFO("n " << n << " L " << layers << " keep " << keep << " w " << w);
    CHECK(mean >= capacity - 1e-9);
    CHECK(mean <= capacity + (layers - 2) / 2.0 + 1e-9);
    for (size_t l = 1; l < got->size(); ++l) CHECK((*got)[l] <= (*got)[l - 1]);
    for (int32_t x : *got) CHECK((x >= w && x <= n));
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
  for (bool renorm : {false, true}) {  // nothing clips: both variants agree
    auto b = kp::VlCacheLayerBudgets(d, 0.25, n, renorm);
    REQUIRE(b.ok());
    CHECK(b->tokens == std::vector<int32_t>{100, 200, 300, 400});
  }

  // Oracle: before clipping the ratios sum to alpha * L exactly (random densities).
  std::mt19937 rng(5);
  for (int trial = 0; trial < 100; ++trial) {
    const int layers = 1 + static_cast<int>(rng() % 40);
    std::vector<double> dens(layers);
    for (double& x : dens) x = (rng() % 1000) / 1000.0;
    dens[0] = 0.5;
    const double alpha = 0.01 + (rng() % 990) / 1000.0;
    for (bool renorm : {false, true}) {
      auto r = kp::VlCacheLayerBudgets(dens, alpha, std::vector<int32_t>(layers, 500), renorm);
      REQUIRE(r.ok());
      double sum = 0;
      for (double x : r->unclipped) sum += x;
      CHECK(sum == Approx(alpha * layers).epsilon(1e-12));
      for (double x : r->ratio) CHECK((x >= 0.01 && x <= 1.0));
    }
  }

  // renorm = false is the literal clip; the default water-fills back to alpha * L.
  std::vector<double> d2 = {0.9, 0.1};
  auto clipped = kp::VlCacheLayerBudgets(d2, 0.8, std::vector<int32_t>{100, 100}, false);
  CHECK(clipped->unclipped[0] == Approx(1.44));
  CHECK(clipped->ratio == std::vector<double>{1.0, clipped->unclipped[1]});
  CHECK(clipped->tokens == std::vector<int32_t>{100, 16});
  auto renorm = kp::VlCacheLayerBudgets(d2, 0.8, std::vector<int32_t>{100, 100});
  CHECK(renorm->ratio[0] == 1.0);
  CHECK(renorm->ratio[1] == Approx(0.6));
  CHECK(renorm->tokens == std::vector<int32_t>{100, 60});
  CHECK_FALSE(kp::VlCacheLayerBudgets(d2, 1.2, std::vector<int32_t>{100, 100}).ok());
}

TEST_CASE("VL-Cache water-filling is exact and releases a layer from the floor",
          "[policy][budget]") {
  const std::vector<int32_t> n(3, 1000);
  // The example of ALGORITHMS.md: layer 2 clips at 1, the level is t = 0.8 / 0.305 and layer 0
  // (t * 0.004 = 0.01049) is above the floor. An early pass pins layer 0 at 0.01 (its
  // proportional share 0.0055 is below it); the exact level releases it.
  auto ex = kp::VlCacheLayerBudgets(std::vector<double>{0.004, 0.301, 1.0}, 0.6, n);
  REQUIRE(ex.ok());
  const double t = 0.8 / 0.305;
  CHECK(ex->ratio[0] == Approx(0.004 * t).epsilon(1e-12));  // 0.010492, not the floor 0.01
  CHECK(ex->ratio[1] == Approx(0.301 * t).epsilon(1e-12));  // 0.789508
  CHECK(ex->ratio[2] == 1.0);
  // 10.49 and 789.51 round to 10 and 790 (the "[11, 789, 1000]" would need layer 0's
  // share to be >= 0.0105, i.e. a density >= 0.004004).
  CHECK(ex->tokens == std::vector<int32_t>{10, 790, 1000});
  // Densities whose rounding shows the release: [11, 789, 1000] (pinned at the floor: 10, 790).
  CHECK(kp::VlCacheLayerBudgets(std::vector<double>{0.00401, 0.301, 1.0}, 0.6, n)->tokens ==
        std::vector<int32_t>{11, 789, 1000});
  CHECK(kp::VlCacheLayerBudgets(std::vector<double>{0.005, 0.3, 1.0}, 0.6, n)->tokens ==
        std::vector<int32_t>{13, 787, 1000});

  // Oracle: the ratios are clip(t * d_l, 0.01, 1) for one level t, and sum to alpha * L
  // whenever that is reachable ([0.01 L, (#dense) + 0.01 (#zero-density)]).
  std::mt19937 rng(11);
  for (int trial = 0; trial < 500; ++trial) {
    const int layers = 1 + static_cast<int>(rng() % 48);
    std::vector<double> dens(layers);
    for (double& x : dens) {
      const int kind = static_cast<int>(rng() % 10);
      x = kind == 0 ? 0.0 : kind == 1 ? 1.0 : kind < 4 ? (rng() % 100) / 10000.0
                                                      : (rng() % 1000) / 1000.0;
    }
    dens[0] = std::max(dens[0], 0.05);  // at least one dense layer
    const double alpha = 0.01 + (rng() % 990) / 1000.0;
    auto r = kp::VlCacheLayerBudgets(dens, alpha, std::vector<int32_t>(layers, 3000));
    REQUIRE(r.ok());
    INFO("trial " << trial << " L " << layers << " alpha " << alpha);
    double sum = 0, reachable = 0;
    for (int l = 0; l < layers; ++l) {
      sum += r->ratio[l];
      reachable += dens[l] > 0 ? 1.0 : 0.01;
    }
    if (alpha * layers <= reachable) CHECK(sum == Approx(alpha * layers).epsilon(1e-9));
    // One level: every layer strictly inside (0.01, 1) has ratio / density equal to the same t,
    // a floor layer has t * d <= 0.01 and a ceiling layer t * d >= 1.
    double level = -1;
    for (int l = 0; l < layers; ++l) {
      if (r->ratio[l] > 0.01 && r->ratio[l] < 1.0) level = r->ratio[l] / dens[l];
    }
    if (level < 0) continue;
    for (int l = 0; l < layers; ++l) {
      const double x = r->ratio[l];
      if (x > 0.01 && x < 1.0) CHECK(x / dens[l] == Approx(level).epsilon(1e-9));
      if (x == 0.01) CHECK(level * dens[l] <= 0.01 * (1 + 1e-9));
      if (x == 1.0) CHECK(level * dens[l] >= 1.0 - 1e-9);
    }
  }

  // Edge cases. All-zero densities: no signal, every layer gets alpha (both variants).
  for (bool renorm : {false, true}) {
    auto zero = kp::VlCacheLayerBudgets(std::vector<double>{0, 0, 0}, 0.3, n, renorm);
    CHECK(zero->ratio == std::vector<double>{0.3, 0.3, 0.3});
  }
  // L = 1: the layer keeps alpha.
  CHECK(kp::VlCacheLayerBudgets(std::vector<double>{0.2}, 0.37, std::vector<int32_t>{100})
            ->tokens == std::vector<int32_t>{37});
  // Infeasible totals: below the floor every layer is at 0.01; above what the dense layers can
  // take, they are at 1 and a zero-density layer stays at the floor.
  auto low = kp::VlCacheLayerBudgets(std::vector<double>{0.5, 1.0}, 0.005,
                                     std::vector<int32_t>{1000, 1000});
  CHECK(low->ratio == std::vector<double>{0.01, 0.01});
  auto high = kp::VlCacheLayerBudgets(std::vector<double>{0.0, 0.5, 1.0}, 0.9, n);
  CHECK(high->ratio == std::vector<double>{0.01, 1.0, 1.0});
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
  CHECK(err("downsample:ratio=1.5").find("ratio='1.5' is outside [0, 1]") != std::string::npos);
  CHECK(err("divprune:keep=0").find("keep='0' is outside (0, 1]") != std::string::npos);
  CHECK(err("fastv:keep=2").find("keep='2'") != std::string::npos);
  // The new defaults: vlcache water-fills (renorm=1); the new baselines are listed.
  std::map<std::string, std::string> defaults;
  for (const kp::PolicyInfo& info : kp::ListPolicies()) defaults[info.name] = info.defaults;
  CHECK(defaults["vlcache"].find("renorm=1") != std::string::npos);
  CHECK(defaults["downsample"] == "keep=0.1,ratio=0");
  CHECK(defaults["divprune"] == "keep=0.1,ratio=0");
}
