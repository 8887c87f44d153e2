// FastV, PruMerge (cache policy and standalone reducer), ThinK, LOOK-M merge, Dynamic-LLaVA.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>

#include "kvcache/policy/admission.h"
#include "kvcache/policy/merge.h"
#include "kvcache/policy/prumerge.h"
#include "kvcache/policy/registry.h"
#include "kvcache/policy/think.h"
#include "policy_test_util.h"

namespace kp = kvcache::policy;
using kp::testing::Uniform;
using kvcache::Modality;
using V = std::vector<int32_t>;

namespace {

using kp::testing::MustPlan;

// Independent numpy-style percentile for the IQR oracle.
double NumpyPercentile(std::vector<float> v, double q) {
  std::sort(v.begin(), v.end());
  const double pos = q * (v.size() - 1);
  const size_t lo = static_cast<size_t>(pos);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] * (1 - (pos - lo)) + v[hi] * (pos - lo);
}

}  // namespace

TEST_CASE("FastV drops the lowest-attention image tokens from layer K on", "[policy][fastv]") {
  // 10 tokens: text 0-1, image 2-7, text 8-9, at positions 100..109.
  auto s = Uniform(4, 2, 4, 4, 10);
  for (auto& st : s.streams) {
    for (int j = 0; j < 10; ++j) st.positions[j] = 100 + j;
    for (int j = 2; j < 8; ++j) st.modalities[j] = Modality::kImage;
  }
  // Layer K-1 = 1: last row per head; mean over heads ranks images 7 > 3 > 5 > 2 = 4 > 6.
  s.stream(1, 0).last_row_scores = {9, 9, 0.1f, 0.5f, 0.1f, 0.3f, 0.0f, 0.9f, 9, 9};
  s.stream(1, 1).last_row_scores = {9, 9, 0.1f, 0.5f, 0.1f, 0.3f, 0.0f, 0.9f, 9, 9};
  auto plan = MustPlan("fastv", s);  // K = 2, R = 0.5: keep round(6 * 0.5) = 3 images
  REQUIRE(plan.streams.size() == 4);  // layers 2, 3 x 2 heads; layers < K untouched
  for (const auto& sp : plan.streams) {
    CHECK(sp.layer >= 2);
    CHECK(sp.kept == V{0, 1, 3, 5, 7, 8, 9});  // text always kept
  }
  // Later layers hold other tokens (different stream indices): the same POSITIONS are dropped.
  auto& late = s.stream(3, 1);
  late.positions = {100, 102, 103, 104, 105, 106, 107, 109};
  late.modalities = {Modality::kText, Modality::kImage, Modality::kImage, Modality::kImage,
                     Modality::kImage, Modality::kImage, Modality::kImage, Modality::kText};
  late.accumulated.assign(8, 0.0f);
  plan = MustPlan("fastv", s);
  CHECK(plan.streams.back().kept == V{0, 2, 4, 6, 7});  // positions 100, 103, 105, 107, 109
  // keep = a share of the prompt KV: (K*n + (L-K)(n_text + kept)) / (L*n) = keep. L 4, K 2,
  // n 10, 4 text: keep 0.85 -> (34 - 20)/2 - 4 = 3 image tokens (as ratio 0.5); keep 0.75 -> 1;
  // keep 0.5 (below reach: layers 0-1 and the text are 0.7 of the KV) -> still 1.
  plan = MustPlan("fastv:keep=0.85", s);
  CHECK(plan.streams.front().kept == V{0, 1, 3, 5, 7, 8, 9});
  CHECK(plan.policy.find("keep=0.85") != std::string::npos);
  CHECK(MustPlan("fastv:keep=0.75", s).streams.front().kept == V{0, 1, 7, 8, 9});
  CHECK(MustPlan("fastv:keep=0.5", s).streams.front().kept == V{0, 1, 7, 8, 9});
  // Ratio 0: nothing dropped; ratio that drops every image: error; no image: documented no-op.
  CHECK(MustPlan("fastv:ratio=0", s).streams.empty());
  auto p = kp::CreatePolicy("fastv:ratio=0.95");
  CHECK_FALSE((*p)->Plan(s).ok());
  auto text = Uniform(4, 2, 4, 4, 10);
  for (int h = 0; h < 2; ++h) text.stream(1, h).last_row_scores.assign(10, 0.1f);
  auto noop = MustPlan("fastv", text);
  CHECK(noop.streams.empty());
  CHECK(noop.policy.find("no-op") != std::string::npos);
  CHECK_FALSE((*kp::CreatePolicy("fastv:layer=4"))->Plan(s).ok());
}

TEST_CASE("PruMerge keeps exactly the IQR outliers", "[policy][prumerge]") {
  std::vector<float> s = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 50};
  // Q1 = 3.5, Q3 = 8.5, upper = 16: only 50 is an outlier.
  CHECK(kp::Percentile(s, 0.25) == Approx(3.5));
  CHECK(kp::Percentile(s, 0.75) == Approx(8.5));
  auto sel = kp::PruMergeSelect(s, {}, 0, {.merge = false});
  REQUIRE(sel.ok());
  CHECK(sel->kept == V{10});
  CHECK(sel->upper == Approx(16.0));
  // PruMerge+: ratio 1/11 -> step int(int(11)/3) = 3: indices 0, 3, 6, 9 added.
  sel = kp::PruMergeSelect(s, {}, 0, {.plus = true, .merge = false});
  CHECK(sel->kept == V{0, 3, 6, 9, 10});
  CHECK(sel->outliers == V{10});
  // Oracle on random heavy-tailed scores.
  std::mt19937 rng(11);
  std::lognormal_distribution<float> dist(0.0f, 1.5f);
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<float> x(20 + rng() % 600);
    for (float& v : x) v = dist(rng);
    const double q1 = NumpyPercentile(x, 0.25), q3 = NumpyPercentile(x, 0.75);
    V want;
    for (size_t i = 0; i < x.size(); ++i) {
      if (x[i] > q3 + 1.5 * (q3 - q1)) want.push_back(static_cast<int32_t>(i));
    }
    if (want.empty()) continue;
    auto got = kp::PruMergeSelect(x, {}, 0, {.merge = false});
    REQUIRE(got.ok());
    CHECK(got->kept == want);
  }
  // No outlier (constant scores): the first token survives.
  std::vector<float> flat(8, 1.0f);
  CHECK(kp::PruMergeSelect(flat, {}, 0, {.merge = false})->kept == V{0});
}

TEST_CASE("PruMerge merge: kNN by key cosine, weighted by score; standalone reducer",
          "[policy][prumerge]") {
  // 6 tokens in 2-D; token 5 is the outlier; its nearest keys are 4 then 3.
  std::vector<float> score = {1, 1, 1, 1, 1.1f, 40};
  std::vector<float> keys = {-1, 0, /**/ 0, -1, /**/ 0.2f, 1, /**/ 0.7f, 0.7f, /**/ 1, 0.1f,
                             /**/ 1, 0};
  auto sel = kp::PruMergeSelect(score, keys, 2, {.knn = 2});
  REQUIRE(sel.ok());
  REQUIRE(sel->kept == V{5});
  REQUIRE(sel->merges[0].size() == 2);
  CHECK(sel->merges[0][0].source == 4);
  CHECK(sel->merges[0][0].weight == Approx(1.1f));
  CHECK(sel->merges[0][1].source == 3);
  // Standalone reducer on features [6, 3]; keys = the 2-D matrix above.
  std::vector<float> feat(18);
  for (int i = 0; i < 18; ++i) feat[i] = static_cast<float>(i);
  auto red = kp::PruMergeReduce(feat, 3, score, keys, 2, {.knn = 2});
  REQUIRE(red.ok());
  CHECK(red->kept == V{5});
  for (int c = 0; c < 3; ++c) {
    CHECK(red->features[c] == Approx(feat[15 + c] + 1.1f * feat[12 + c] + 1.0f * feat[9 + c]));
  }
  CHECK_FALSE(kp::PruMergeReduce(feat, 4, score, {}, 0, {}).ok());
  CHECK_FALSE(kp::PruMergeSelect({}, {}, 0, {}).ok());
}

TEST_CASE("PruMerge cache policy: text kept, image runs reduced, merges into values",
          "[policy][prumerge]") {
  auto s = Uniform(1, 1, 1, 2, 14);
  auto& st = s.stream(0, 0);
  // text 0-1, image 2-12 (11 tokens), text 13.
  for (int j = 2; j < 13; ++j) st.modalities[j] = Modality::kImage;
  st.post_vision_scores = {5, 5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 50, 5};
  st.keys.resize(28);
  for (int j = 0; j < 14; ++j) {
    st.keys[2 * j] = std::cos(0.1f * j);
    st.keys[2 * j + 1] = std::sin(0.1f * j);
  }
  auto plan = MustPlan("prumerge:knn=2", s);
  REQUIRE(plan.streams.size() == 1);
  const auto& sp = plan.streams[0];
  CHECK(sp.kept == V{0, 1, 12, 13});
  REQUIRE(sp.merges.size() == 2);  // neighbours of token 12 by angle: 11, 10
  CHECK(sp.merges[0].kept_slot == 2);
  CHECK(sp.merges[0].source == 11);
  CHECK(sp.merges[0].value_weight == Approx(10.0f));
  CHECK(sp.merges[0].key_weight == 0.0f);
  CHECK(sp.merges[1].source == 10);
  auto with_keys = MustPlan("prumerge:knn=2,merge_keys=1", s);
  CHECK(with_keys.streams[0].merges[0].key_weight == Approx(10.0f));
  // Engine CLS scores by position instead of attention.
  s.image_score_positions = {2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  s.image_scores = {50, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  CHECK(MustPlan("prumerge:knn=2,scores=cls", s).streams[0].kept == V{0, 1, 2, 13});
  auto text = Uniform(1, 1, 1, 2, 5);
  text.stream(0, 0).keys.assign(10, 1.0f);
  text.stream(0, 0).post_vision_scores.assign(5, 1.0f);
  CHECK(MustPlan("prumerge", text).streams.empty());
}

TEST_CASE("ThinK: channel ranking equals ranking by sum_g ||Q_g[:,c] K[:,c]^T||_F^2",
          "[policy][think]") {
  std::mt19937 rng(17);
  std::normal_distribution<float> nd;
  const int rows = 6, hq = 4, h = 2, g = 2, d = 16, n = 40;
  std::vector<float> q(rows * hq * d), k(n * d);
  for (float& x : q) x = nd(rng);
  for (int j = 0; j < n; ++j) {
    for (int c = 0; c < d; ++c) k[j * d + c] = nd(rng) * (1.0f + 0.3f * c);
  }
  for (int head = 0; head < h; ++head) {
    auto scores = kp::ThinkChannelScores(q, rows, hq, d, head, g, k, {});
    REQUIRE(scores.ok());
    // Oracle: the sum over the group's query heads g of ||Q_g[:,c] K[:,c]^T||_F^2, the squared
    // Frobenius norm of each head's rank-1 channel contribution q_g[:,c] k[:,c]^T.
    std::vector<double> frob(d);
    for (int c = 0; c < d; ++c) {
      double sum = 0;
      for (int gg = 0; gg < g; ++gg) {
        for (int r = 0; r < rows; ++r) {
          const double qc = q[(r * hq + head * g + gg) * d + c];
          for (int j = 0; j < n; ++j) sum += (qc * k[j * d + c]) * (qc * k[j * d + c]);
        }
      }
      frob[c] = std::sqrt(sum);
    }
    std::vector<int> by_score(d), by_frob(d);
    std::iota(by_score.begin(), by_score.end(), 0);
    std::iota(by_frob.begin(), by_frob.end(), 0);
    std::sort(by_score.begin(), by_score.end(), [&](int a, int b) { return (*scores)[a] > (*scores)[b]; });
    std::sort(by_frob.begin(), by_frob.end(), [&](int a, int b) { return frob[a] > frob[b]; });
    CHECK(by_score == by_frob);
    // Kept channels: the top d - floor(0.4 d) = 10 by that ranking, ascending.
    V want(by_frob.begin(), by_frob.begin() + 10);
    std::sort(want.begin(), want.end());
    CHECK(kp::ThinkKeptChannels(*scores, 0.4) == want);
  }
  // The policy: every stream gets key_channels and full-width recent slots.
  auto s = Uniform(2, h, hq, d, n);
  for (auto& st : s.streams) st.keys = k;
  for (auto& ls : s.layers) {
    ls.window_rows = rows;
    ls.window_queries = q;
  }
  auto plan = MustPlan("think:lambda=0.4,window=4,recent=8", s);
  REQUIRE(plan.streams.size() == 4);
  for (const auto& sp : plan.streams) {
    CHECK(sp.key_channels.size() == 10);
    CHECK(sp.full_width_recent == 8);
    CHECK(sp.kept.size() == static_cast<size_t>(n));
  }
  // ThinK on top of a token policy prunes the kept tokens' channels.
  auto combo = MustPlan("streamingllm:keep=0.5,think=0.25,think_window=4,think_recent=2", s);
  REQUIRE(combo.streams.size() == 4);
  CHECK(combo.streams[0].kept.size() == 20);
  CHECK(combo.streams[0].key_channels.size() == 12);
  CHECK(combo.streams[0].full_width_recent == 2);
  s.layers[0].window_rows = 2;
  s.layers[0].window_queries.resize(2 * hq * d);
  CHECK_FALSE((*kp::CreatePolicy("think:window=4"))->Plan(s).ok());
}

TEST_CASE("ThinK with G > 1: query heads of opposite sign add up, never cancel",
          "[policy][think]") {
  // One kv head, two query heads, two rows, 2 channels. Channel 0: the heads' queries are +3 and
  // -3 (their mean is 0, so squaring the mean would score it 0 and prune it); channel 1: both 1.
  const int rows = 2, hq = 2, d = 2, n = 3;
  const std::vector<float> q = {3, 1, -3, 1,   // row 0: head 0 (c0, c1), head 1 (c0, c1)
                                3, 1, -3, 1};  // row 1
  const std::vector<float> k = {1, 1, 1, 1, 1, 1};
  auto scores = kp::ThinkChannelScores(q, rows, hq, d, /*kv_head=*/0, /*group=*/2, k, {});
  REQUIRE(scores.ok());
  // mean over heads and rows of q^2 times mean over tokens of k^2: 9 and 1.
  CHECK((*scores)[0] == Approx(9.0));
  CHECK((*scores)[1] == Approx(1.0));
  CHECK(kp::ThinkKeptChannels(*scores, 0.5) == V{0});
  // Through the policy: channel 0 is the one kept.
  auto s = Uniform(1, 1, hq, d, n);
  s.stream(0, 0).keys = k;
  s.layers[0].window_rows = rows;
  s.layers[0].window_queries = q;
  auto plan = MustPlan("think:lambda=0.5,window=2,recent=0", s);
  REQUIRE(plan.streams.size() == 1);
  CHECK(plan.streams[0].key_channels == V{0});
}

TEST_CASE("LOOK-M merge: evicted tokens join their most similar kept key", "[policy][lookm]") {
  kp::StreamSnapshot st;
  st.positions = {0, 1, 2, 3, 4};
  st.keys = {1, 0, /**/ 0.9f, 0.1f, /**/ 0, 1, /**/ 0.1f, 1, /**/ 1, 0.05f};
  kvcache::StreamPlan sp;
  sp.kept = {0, 2};
  REQUIRE(kp::AddLookMMerges(st, 2, kp::MergeMode::kPivot, sp).ok());
  // 1 and 4 -> slot 0 (m = 2), 3 -> slot 1 (m = 1).
  CHECK(sp.kept_key_weight == std::vector<float>{0.5f, 0.5f});
  REQUIRE(sp.merges.size() == 3);
  CHECK(sp.merges[0].source == 1);
  CHECK(sp.merges[0].kept_slot == 0);
  CHECK(sp.merges[0].key_weight == Approx(0.25f));
  CHECK(sp.merges[1].source == 3);
  CHECK(sp.merges[1].kept_slot == 1);
  CHECK(sp.merges[1].value_weight == Approx(0.5f));
  CHECK(sp.merges[2].source == 4);
  kvcache::StreamPlan avg;
  avg.kept = {0, 2};
  REQUIRE(kp::AddLookMMerges(st, 2, kp::MergeMode::kAverage, avg).ok());
  CHECK(avg.kept_key_weight[0] == Approx(1.0f / 3));
  CHECK(avg.merges[0].key_weight == Approx(1.0f / 3));
  CHECK(avg.kept_key_weight[1] == Approx(0.5f));
  // Through the registry: any token policy takes merge=.
  auto s = Uniform(1, 1, 1, 2, 5);
  s.stream(0, 0).keys = st.keys;
  auto plan = (*kp::CreatePolicy("streamingllm:tokens=2,sinks=1,merge=average"))->Plan(s);
  REQUIRE(plan.ok());
  CHECK(plan->streams[0].merges.size() == 3);
  CHECK((*kp::CreatePolicy("h2o:merge=pivot"))->Needs().keys);
  // Its input check, alone and through AddLookMMerges (plan unchanged on error).
  CHECK(kp::CheckLookMInputs(st, 2, 3, 1).ok());
  kp::StreamSnapshot no_keys = st;
  no_keys.keys.pop_back();  // not [length, head_dim]
  const absl::Status bad = kp::CheckLookMInputs(no_keys, 2, 3, 1);
  CHECK(bad.code() == absl::StatusCode::kFailedPrecondition);
  CHECK(std::string(bad.message()).find("layer 3, kv_head 1") != std::string::npos);
  kvcache::StreamPlan untouched{.layer = 3, .kv_head = 1, .kept = {0, 2}};
  CHECK(kp::AddLookMMerges(no_keys, 2, kp::MergeMode::kPivot, untouched).code() ==
        absl::StatusCode::kFailedPrecondition);
  CHECK(untouched.merges.empty());
  CHECK(untouched.kept_key_weight.empty());
}

TEST_CASE("Dynamic-LLaVA admission: layers < s admit all; deciders", "[policy][admission]") {
  std::vector<int32_t> pos(1000);
  std::iota(pos.begin(), pos.end(), 500);
  auto fixed = kp::Admission::FixedRate(0.3, 42, 2);
  REQUIRE(fixed.ok());
  auto d = fixed->Decide({.positions = pos});
  REQUIRE(d.ok());
  const auto kept = std::count(d->begin(), d->end(), 1);
  CHECK(kept > 240);
  CHECK(kept < 360);
  for (int layer = 0; layer < 2; ++layer) {
    auto m = fixed->MaskForLayer(layer, *d);
    CHECK(std::count(m.begin(), m.end(), 1) == 1000);
  }
  CHECK(fixed->MaskForLayer(2, *d) == *d);
  CHECK(fixed->MaskForLayer(31, *d) == *d);
  // Deterministic per position, whatever the batch.
  std::vector<int32_t> one = {pos[17]};
  CHECK((*fixed->Decide({.positions = one}))[0] == (*d)[17]);
  CHECK(*kp::Admission::FixedRate(0.3, 42)->Decide({.positions = pos}) == *d);
  CHECK(*kp::Admission::FixedRate(0.3, 43)->Decide({.positions = pos}) != *d);
  CHECK_FALSE(kp::Admission::FixedRate(1.5, 0).ok());
  CHECK_FALSE(kp::Admission::FixedRate(0.5, 0, -1).ok());

  auto att = kp::Admission::AttentionBased(1.0);
  std::vector<float> w = {0.5f, 0.001f, 0.02f};
  std::vector<int32_t> ctx = {9, 99, 99};  // uniform share 0.1, 0.01, 0.01
  auto ad = att->Decide({.positions = std::span(pos).first(3), .self_weight = w,
                         .context_length = ctx});
  REQUIRE(ad.ok());
  CHECK(*ad == std::vector<uint8_t>{1, 0, 1});
  CHECK_FALSE(att->Decide({.positions = std::span(pos).first(3)}).ok());

  auto engine = kp::Admission::Engine(
      [](const kp::AdmissionInput& in) -> absl::StatusOr<std::vector<uint8_t>> {
        return std::vector<uint8_t>(in.positions.size(), 0);
      },
      3);
  auto none = engine->Decide({.positions = pos});
  CHECK(std::count(none->begin(), none->end(), 0) == 1000);
  const std::vector<uint8_t> below_s = engine->MaskForLayer(2, *none);
  CHECK(std::count(below_s.begin(), below_s.end(), 1) == 1000);
  CHECK(engine->MaskForLayer(3, *none) == *none);
  auto liar = kp::Admission::Engine([](const kp::AdmissionInput&) -> absl::StatusOr<std::vector<uint8_t>> {
    return std::vector<uint8_t>(1, 1);
  });
  CHECK_FALSE(liar->Decide({.positions = pos}).ok());

  // SelfAttentionWeight: 1 q head, 1 kv head, q.k * scale = 0, lse = 0 -> 1 / (1 + 1) = 0.5.
  std::vector<float> q = {1, 0}, k = {0, 1}, lse = {0};
  CHECK(*kp::SelfAttentionWeight(q, k, lse, 1, 1, 2) == Approx(0.5));
  std::vector<float> lse_empty = {-INFINITY};
  CHECK(*kp::SelfAttentionWeight(q, k, lse_empty, 1, 1, 2) == Approx(1.0));
}
