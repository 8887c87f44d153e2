// The image-token baselines: downsample and DivPrune (cache policies, the keep -> ratio mapping,
// the standalone reducer), against independent oracles.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>
#include <random>
#include <set>

#include "kvcache/policy/image_select.h"
#include "kvcache/policy/registry.h"
#include "policy_test_util.h"
#include "src/policy/similarity.h"

namespace kp = kvcache::policy;
using kp::testing::MustPlan;
using kp::testing::Uniform;
using kvcache::Modality;
using V = std::vector<int32_t>;

namespace {

// Independent DivPrune oracle: the full distance matrix 1 - cos in double, the greedy max-min
// loop written as the paper's pseudo-code (first: the largest distance to the nearest other
// row; then the largest min distance to the chosen set; ties to the earlier row).
V DivPruneOracle(const std::vector<float>& rows, int dim, int k) {
  const int n = static_cast<int>(rows.size()) / dim;
  std::vector<double> dist(static_cast<size_t>(n) * n);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      double ab = 0, aa = 0, bb = 0;
      for (int c = 0; c < dim; ++c) {
        ab += double{rows[i * dim + c]} * rows[j * dim + c];
        aa += double{rows[i * dim + c]} * rows[i * dim + c];
        bb += double{rows[j * dim + c]} * rows[j * dim + c];
      }
      dist[i * n + j] = 1.0 - ab / std::sqrt(aa * bb);
    }
  }
  V order;
  std::vector<double> score(n);
  for (int j = 0; j < n; ++j) {
    score[j] = std::numeric_limits<double>::infinity();
    for (int i = 0; i < n; ++i) {
      if (i != j) score[j] = std::min(score[j], dist[i * n + j]);
    }
  }
  std::vector<bool> chosen(n, false);
  for (int pick = 0; pick < k; ++pick) {
    int best = -1;
    for (int j = 0; j < n; ++j) {
      if (!chosen[j] && (best < 0 || score[j] > score[best])) best = j;
    }
    chosen[best] = true;
    order.push_back(best);
    for (int j = 0; j < n; ++j) {
      score[j] = pick == 0 ? dist[best * n + j] : std::min(score[j], dist[best * n + j]);
    }
  }
  return order;
}

std::vector<float> Gaussian(int rows, int dim, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> out(static_cast<size_t>(rows) * dim);
  for (float& x : out) x = nd(rng);
  return out;
}

// text [0, 10), image [10, 500), text [500, 505), image [505, 995), text [995, 1000): two
// images of 490 tokens and 20 text tokens; random keys per stream.
kp::SequenceSnapshot TwoImages(int layers, int kv_heads, int dim) {
  auto s = Uniform(layers, kv_heads, kv_heads, dim, 1000);
  uint32_t seed = 1;
  for (auto& st : s.streams) {
    for (int j = 10; j < 500; ++j) st.modalities[j] = Modality::kImage;
    for (int j = 505; j < 995; ++j) st.modalities[j] = Modality::kImage;
    st.keys = Gaussian(1000, dim, seed++);
  }
  return s;
}

}  // namespace

TEST_CASE("Image budgets: keep is the share of prompt KV with text kept; ratio per image",
          "[policy][image_select]") {
  const V sizes = {490, 490};
  // keep 0.1 of 1000 = 100 tokens: 20 text + 80 image -> ratio 80/980 -> 40 per image.
  CHECK(*kp::ImageTokenBudgets(1000, sizes, {.keep = 0.1}) == V{40, 40});
  // keep 0.25: (250 - 20) / 980 * 490 = 115.
  CHECK(*kp::ImageTokenBudgets(1000, sizes, {.keep = 0.25}) == V{115, 115});
  // ratio > 0 is the papers' knob: round(0.25 * 490) = round(122.5) = 123 (half away from 0).
  CHECK(*kp::ImageTokenBudgets(1000, sizes, {.keep = 0.1, .ratio = 0.25}) == V{123, 123});
  // keep below the text share: at least one token per image; keep 1: everything.
  CHECK(*kp::ImageTokenBudgets(1000, sizes, {.keep = 0.01}) == V{1, 1});
  CHECK(*kp::ImageTokenBudgets(1000, sizes, {.keep = 1.0}) == V{490, 490});
  CHECK(kp::ImageTokenBudgets(1000, V{}, {.keep = 0.1})->empty());
  CHECK_FALSE(kp::ImageTokenBudgets(100, sizes, {.keep = 0.1}).ok());   // more image than n
  CHECK_FALSE(kp::ImageTokenBudgets(1000, V{0}, {.keep = 0.1}).ok());   // an empty image
  CHECK_FALSE(kp::ImageTokenBudgets(1000, sizes, {.keep = 0.0}).ok());
  CHECK_FALSE(kp::ImageTokenBudgets(1000, sizes, {.keep = 0.1, .ratio = 1.5}).ok());
}

TEST_CASE("Downsample keeps floor(i*N/k) of each image and every text token, in every stream",
          "[policy][downsample]") {
  CHECK(kp::DownsampleIndices(10, 4) == V{0, 2, 5, 7});
  CHECK(kp::DownsampleIndices(5, 5) == V{0, 1, 2, 3, 4});
  CHECK(kp::DownsampleIndices(7, 1) == V{0});

  auto s = TwoImages(3, 2, 4);
  for (const char* spec : {"downsample:keep=0.1", "downsample:ratio=0.25"}) {
    INFO(spec);
    const int k = std::string(spec).find("ratio") != std::string::npos ? 123 : 40;
    auto plan = MustPlan(spec, s);
    REQUIRE(plan.streams.size() == 6);
    // Oracle: text + floor(i * 490 / k) within each image.
    V want;
    for (int j = 0; j < 10; ++j) want.push_back(j);
    for (int i = 0; i < k; ++i) want.push_back(10 + i * 490 / k);
    for (int j = 500; j < 505; ++j) want.push_back(j);
    for (int i = 0; i < k; ++i) want.push_back(505 + i * 490 / k);
    for (int j = 995; j < 1000; ++j) want.push_back(j);
    for (const auto& sp : plan.streams) CHECK(sp.kept == want);  // same for every layer, head
  }
  // keep=0.1 keeps exactly 10% of the prompt KV here (20 text + 2 * 40).
  CHECK(MustPlan("downsample", s).KeptTokens() == 6 * 100);
  // No image: documented no-op.
  auto text = Uniform(2, 1, 1, 4, 50);
  auto noop = MustPlan("downsample", text);
  CHECK(noop.streams.empty());
  CHECK(noop.policy.find("no-op") != std::string::npos);
}

TEST_CASE("DivPrune: hand example, oracle on random rows, NaN and zero rows",
          "[policy][divprune]") {
  // Unit vectors at 0, 10, 90, 180 and 185 degrees. Nearest-other distances: 10, 10, 80, 5, 5
  // degrees -> first pick 90 (row 2); farthest from it: 185 (row 4, 95 degrees); then 0 (row 0:
  // min(90, 175) = 90 beats 10 degrees: min(80, 175) = 80, and 180 degrees: min(90, 5) = 5).
  std::vector<float> rows;
  for (double deg : {0.0, 10.0, 90.0, 180.0, 185.0}) {
    rows.push_back(static_cast<float>(std::cos(deg * std::numbers::pi / 180)));
    rows.push_back(static_cast<float>(std::sin(deg * std::numbers::pi / 180)));
  }
  CHECK(*kp::DivPruneSelect(rows, 2, 3) == V{2, 4, 0});
  CHECK(*kp::DivPruneSelect(rows, 2, 5) == V{2, 4, 0, 1, 3});
  CHECK(kp::DivPruneSelect(rows, 2, 0)->empty());
  // Only the direction counts: scaling a row changes nothing.
  for (int c = 0; c < 2; ++c) rows[4 * 2 + c] *= 7.0f;
  CHECK(*kp::DivPruneSelect(rows, 2, 3) == V{2, 4, 0});

  // Random rows against the double-precision oracle (distinct distances: no near ties).
  for (uint32_t seed : {1u, 2u, 3u}) {
    const int n = 150, dim = 16;
    auto x = Gaussian(n, dim, seed);
    for (int k : {1, 2, 15, 40}) {
      INFO("seed " << seed << " k " << k);
      CHECK(*kp::DivPruneSelect(x, dim, k) == DivPruneOracle(x, dim, k));
    }
  }
  // A row holding NaN is chosen only after every finite row; a zero row has cosine 0 to all.
  std::vector<float> odd = {1, 0, 0.99f, 0.14f, std::nanf(""), 1, 0, 0, -1, 0.01f};
  // Finite rows 0, 1, 3 (zero), 4; nearest-other cos: row 0 -> 0.99, row 1 -> 0.99, row 3 -> 0,
  // row 4 -> 0 (to the zero row): rows 3 and 4 tie at the largest distance, the earlier (3)
  // wins. Every row has cos 0 to it, so the next pick is the earliest, row 0; then row 4
  // (cos -1 to row 0) before row 1 (0.99); the NaN row 2 last.
  auto o = kp::DivPruneSelect(odd, 2, 5);
  REQUIRE(o.ok());
  CHECK(*o == V{3, 0, 4, 1, 2});
  CHECK_FALSE(kp::DivPruneSelect(odd, 3, 1).ok());  // 10 values are not rows of 3
  CHECK_FALSE(kp::DivPruneSelect(odd, 2, 6).ok());  // k > N
}

TEST_CASE("DivPrune: the fast path (early abandon, lazy max-min) picks what the plain loops pick",
          "[policy][divprune]") {
  // Clustered rows with exact duplicates (ties everywhere) and near copies, as image tokens are.
  std::mt19937 rng(21);
  std::normal_distribution<float> nd;
  for (int trial = 0; trial < 20; ++trial) {
    const int n = 50 + static_cast<int>(rng() % 300), dim = 4 + static_cast<int>(rng() % 29);
    const int prototypes = 1 + static_cast<int>(rng() % 20);
    auto protos = Gaussian(prototypes, dim, 100 + trial);
    std::vector<float> x(static_cast<size_t>(n) * dim);
    const float noise = trial % 3 == 0 ? 0.0f : 0.05f * static_cast<float>(trial % 5);
    for (int j = 0; j < n; ++j) {
      const int p = static_cast<int>(rng() % prototypes);
      for (int c = 0; c < dim; ++c) x[j * dim + c] = protos[p * dim + c] + noise * nd(rng);
    }
    const int k = 1 + static_cast<int>(rng() % n);
    INFO("trial " << trial << " n " << n << " dim " << dim << " k " << k);
    kp::SetSimilarityKernel(kp::SimilarityKernel::kReference);
    auto plain = kp::DivPruneSelect(x, dim, k);
    kp::SetSimilarityKernel(kp::SimilarityKernel::kBlocked);
    auto fast = kp::DivPruneSelect(x, dim, k);
    REQUIRE(plain.ok());
    REQUIRE(fast.ok());
    CHECK(*fast == *plain);
    if (noise > 0.0f && k <= 12) CHECK(*fast == DivPruneOracle(x, dim, k));
  }
}

TEST_CASE("DivPrune standalone reducer: round(ratio*N) rows, ascending, features gathered",
          "[policy][divprune]") {
  const int n = 120, c = 8;
  auto f = Gaussian(n, c, 9);
  auto r = kp::DivPruneReduce(f, c, 0.1);
  REQUIRE(r.ok());
  V want = DivPruneOracle(f, c, 12);
  std::sort(want.begin(), want.end());
  CHECK(r->kept == want);
  REQUIRE(r->features.size() == 12u * c);
  for (size_t s = 0; s < r->kept.size(); ++s) {
    for (int ch = 0; ch < c; ++ch) CHECK(r->features[s * c + ch] == f[r->kept[s] * c + ch]);
  }
  CHECK(kp::DivPruneReduce(f, c, 0.001)->kept.size() == 1);  // at least one token
  CHECK_FALSE(kp::DivPruneReduce(f, c, 0.0).ok());
  CHECK_FALSE(kp::DivPruneReduce(f, 7, 0.1).ok());
  CHECK_FALSE(kp::DivPruneReduce({}, c, 0.1).ok());
}

TEST_CASE("DivPrune cache policy: per kv head over each image's keys, text kept, budget held",
          "[policy][divprune]") {
  const int dim = 8;
  auto s = TwoImages(2, 2, dim);
  auto plan = MustPlan("divprune:keep=0.1", s);
  REQUIRE(plan.streams.size() == 4);
  std::set<V> distinct;
  for (const auto& sp : plan.streams) {
    const auto& st = s.stream(sp.layer, sp.kv_head);
    // Oracle: text kept; each image's 40 tokens are DivPrune over that stream's image keys.
    V want;
    for (int j = 0; j < 10; ++j) want.push_back(j);
    for (int a : {10, 505}) {
      std::vector<float> keys(st.keys.begin() + a * dim, st.keys.begin() + (a + 490) * dim);
      V sel = DivPruneOracle(keys, dim, 40);
      std::sort(sel.begin(), sel.end());
      for (int i : sel) want.push_back(a + i);
      if (a == 10) {
        for (int j = 500; j < 505; ++j) want.push_back(j);
      }
    }
    for (int j = 995; j < 1000; ++j) want.push_back(j);
    std::sort(want.begin(), want.end());
    CHECK(sp.kept == want);
    distinct.insert(sp.kept);
  }
  CHECK(distinct.size() == 4);  // each kv head's own keys: different selections
  CHECK(plan.KeptTokens() == 4 * 100);
  CHECK((*kp::CreatePolicy("divprune"))->Needs().keys);
  CHECK_FALSE((*kp::CreatePolicy("downsample"))->Needs().keys);
  // Without keys in the snapshot: FailedPrecondition naming the stream.
  s.stream(1, 1).keys.clear();
  auto p = kp::CreatePolicy("divprune");
  auto bad = (*p)->Plan(s);
  REQUIRE_FALSE(bad.ok());
  CHECK(std::string(bad.status().message()).find("layer 1, kv_head 1") != std::string::npos);
}
