// The blocked similarity searches (src/policy/similarity.h) against the per-pair reference they
// replaced: equal results, bit for bit, on random data, exact and near ties, zero and NaN rows,
// head dims that are not a multiple of anything, fewer rows than a tile; and whole prumerge /
// LOOK-M plans equal under every kernel setting (serial and parallel streams).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kvcache/policy/merge.h"
#include "kvcache/policy/registry.h"
#include "policy_test_util.h"
#include "src/policy/similarity.h"

namespace kp = kvcache::policy;
using kp::SimilarityKernel;
using kvcache::Modality;

namespace {

// Restores the default kernel when a test ends, also on a failed REQUIRE.
struct KernelGuard {
  ~KernelGuard() { kp::SetSimilarityKernel(SimilarityKernel::kBlocked); }
};

constexpr SimilarityKernel kFast[] = {SimilarityKernel::kBlocked, SimilarityKernel::kPortable,
                                      SimilarityKernel::kBlockedSerial,
                                      SimilarityKernel::kBlockedAvx2};

const char* Name(SimilarityKernel k) {
  switch (k) {
    case SimilarityKernel::kBlocked: return "blocked";
    case SimilarityKernel::kPortable: return "portable";
    case SimilarityKernel::kBlockedSerial: return "blocked_serial";
    case SimilarityKernel::kReference: return "reference";
    case SimilarityKernel::kBlockedAvx2: return "blocked_avx2";
  }
  return "?";
}

float NextUp(float x) { return std::nextafter(x, std::numeric_limits<float>::infinity()); }

// keys [n, d]. kind 0: Gaussian; 1: a few prototypes copied with rare 1-ulp nudges (exact and
// near ties everywhere); 2: Gaussian with zero rows, NaN rows and inf entries mixed in.
std::vector<float> Keys(std::mt19937& rng, int32_t n, int32_t d, int kind) {
  std::normal_distribution<float> nd;
  std::uniform_int_distribution<int> pick(0, 99);
  std::vector<float> k(static_cast<size_t>(n) * d);
  for (float& x : k) x = nd(rng);
  if (kind == 1) {
    const int32_t protos = 3;
    for (int32_t j = protos; j < n; ++j) {
      const int32_t p = j % protos;
      for (int32_t c = 0; c < d; ++c) {
        float v = k[static_cast<size_t>(p) * d + c];
        if (pick(rng) < 3) v = NextUp(v);
        k[static_cast<size_t>(j) * d + c] = v;
      }
    }
  } else if (kind == 2) {
    for (int32_t j = 0; j < n; ++j) {
      const int r = pick(rng);
      float* row = &k[static_cast<size_t>(j) * d];
      if (r < 10) {
        std::fill(row, row + d, 0.0f);
      } else if (r < 15) {
        row[pick(rng) % d] = std::nanf("");
      } else if (r < 18) {
        row[pick(rng) % d] = -std::numeric_limits<float>::infinity();
      }
    }
  }
  return k;
}

void CheckNearest(std::mt19937& rng, int32_t n, int32_t d, int kind, int32_t kept) {
  const std::vector<float> unit = kp::UnitRows(Keys(rng, n, d, kind), d);
  std::vector<int32_t> order(n);
  for (int32_t j = 0; j < n; ++j) order[j] = j;
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<int32_t> candidates(order.begin(), order.begin() + kept);
  std::sort(candidates.begin(), candidates.end());
  std::vector<int32_t> queries(order.begin() + kept, order.end());
  std::vector<int32_t> want(queries.size()), got(queries.size());
  kp::reference::NearestRows(unit, d, queries, candidates, want);
  for (SimilarityKernel k : kFast) {
    kp::SetSimilarityKernel(k);
    std::fill(got.begin(), got.end(), -1);
    kp::NearestRows(unit, d, queries, candidates, got);
    INFO("kernel " << Name(k) << " n=" << n << " d=" << d << " kind=" << kind << " kept=" << kept);
    CHECK(got == want);
  }
}

void CheckTopK(std::mt19937& rng, int32_t n, int32_t d, int kind, int32_t num_queries,
               int32_t k) {
  const std::vector<float> unit = kp::UnitRows(Keys(rng, n, d, kind), d);
  std::vector<int32_t> order(n);
  for (int32_t j = 0; j < n; ++j) order[j] = j;
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<int32_t> queries(order.begin(), order.begin() + num_queries);
  std::sort(queries.begin(), queries.end());
  std::vector<uint8_t> eligible(n);
  std::uniform_int_distribution<int> pick(0, 9);
  for (uint8_t& e : eligible) e = pick(rng) != 0;  // ~10% not eligible (non-finite score)
  const auto want = kp::reference::TopKSimilarRows(unit, d, queries, eligible, k);
  for (SimilarityKernel kern : kFast) {
    kp::SetSimilarityKernel(kern);
    const auto got = kp::TopKSimilarRows(unit, d, queries, eligible, k);
    INFO("kernel " << Name(kern) << " n=" << n << " d=" << d << " kind=" << kind
                   << " queries=" << num_queries << " k=" << k);
    CHECK(got == want);
  }
}

void CheckSamePlans(const kvcache::EvictionPlan& a, const kvcache::EvictionPlan& b) {
  REQUIRE(a.streams.size() == b.streams.size());
  CHECK(a.policy == b.policy);
  for (size_t i = 0; i < a.streams.size(); ++i) {
    const kvcache::StreamPlan &x = a.streams[i], &y = b.streams[i];
    INFO("stream " << i);
    CHECK(x.layer == y.layer);
    CHECK(x.kv_head == y.kv_head);
    CHECK(x.kept == y.kept);
    CHECK(x.kept_key_weight == y.kept_key_weight);
    CHECK(x.kept_value_weight == y.kept_value_weight);
    REQUIRE(x.merges.size() == y.merges.size());
    for (size_t m = 0; m < x.merges.size(); ++m) {
      CHECK(x.merges[m].kept_slot == y.merges[m].kept_slot);
      CHECK(x.merges[m].source == y.merges[m].source);
      CHECK(std::memcmp(&x.merges[m].key_weight, &y.merges[m].key_weight, sizeof(float)) == 0);
      CHECK(std::memcmp(&x.merges[m].value_weight, &y.merges[m].value_weight, sizeof(float)) == 0);
    }
  }
}

}  // namespace

TEST_CASE("NearestRows equals the per-pair argmax", "[policy][similarity]") {
  KernelGuard guard;
  std::mt19937 rng(11);
  // d: below, at and above the 8 lanes of DotProduct; n: below, at and above one panel (16).
  for (int32_t d : {1, 5, 8, 17, 80, 128}) {
    for (int32_t n : {2, 3, 16, 17, 40, 150}) {
      for (int kind : {0, 1, 2}) {
        for (int32_t kept : {1, 2, n / 3 + 1, n - 1}) {
          if (kept < 1 || kept >= n) continue;
          CheckNearest(rng, n, d, kind, kept);
        }
      }
    }
  }
}

TEST_CASE("NearestRows: ties keep the earlier slot, NaN never wins", "[policy][similarity]") {
  KernelGuard guard;
  const int32_t d = 17;
  // Rows 0..2 identical (exact ties), row 3 zero, row 4 NaN, row 5 the query (= row 0).
  std::vector<float> keys(6 * d, 0.0f);
  for (int32_t c = 0; c < d; ++c) keys[c] = keys[d + c] = keys[2 * d + c] = keys[5 * d + c] = 1.0f + c;
  keys[4 * d + 3] = std::nanf("");
  const std::vector<float> unit = kp::UnitRows(keys, d);
  for (SimilarityKernel k : {SimilarityKernel::kReference, SimilarityKernel::kBlocked,
                             SimilarityKernel::kPortable, SimilarityKernel::kBlockedAvx2}) {
    kp::SetSimilarityKernel(k);
    INFO(Name(k));
    int32_t best = -1;
    const int32_t query[] = {5};
    const int32_t c1[] = {4, 3, 2, 1, 0};  // NaN first, then zero, then three equal rows
    kp::NearestRows(unit, d, query, c1, std::span<int32_t>(&best, 1));
    CHECK(best == 2);  // the first of the tied rows
    const int32_t c2[] = {4, 3};  // NaN never wins: the zero row (similarity 0) does
    kp::NearestRows(unit, d, query, c2, std::span<int32_t>(&best, 1));
    CHECK(best == 1);
    const int32_t c3[] = {4};  // every similarity NaN: slot 0
    kp::NearestRows(unit, d, query, c3, std::span<int32_t>(&best, 1));
    CHECK(best == 0);
    const int32_t nan_query[] = {4};  // a NaN query: every similarity NaN
    kp::NearestRows(unit, d, nan_query, c1, std::span<int32_t>(&best, 1));
    CHECK(best == 0);
  }
}

TEST_CASE("TopKSimilarRows equals the per-pair TopK", "[policy][similarity]") {
  KernelGuard guard;
  std::mt19937 rng(12);
  for (int32_t d : {1, 5, 8, 17, 80, 128}) {
    for (int32_t n : {2, 3, 16, 17, 40, 150}) {
      for (int kind : {0, 1, 2}) {
        for (int32_t queries : {1, 3, n / 2 + 1}) {
          if (queries > n) continue;
          for (int32_t k : {1, 4, 32, n + 5}) CheckTopK(rng, n, d, kind, queries, k);
        }
      }
    }
  }
}

TEST_CASE("TopKSimilarRows ranks ties by index and NaN last", "[policy][similarity]") {
  KernelGuard guard;
  const int32_t d = 80;
  // Row 0 the query; rows 1, 3, 6 equal to it; row 2 NaN; row 4 zero; row 5 its opposite.
  std::vector<float> keys(7 * d);
  for (int32_t c = 0; c < d; ++c) {
    const float v = std::sin(0.3f * c) + 0.1f;
    keys[c] = keys[d + c] = keys[3 * d + c] = keys[6 * d + c] = v;
    keys[2 * d + c] = v;
    keys[4 * d + c] = 0.0f;
    keys[5 * d + c] = -v;
  }
  keys[2 * d + 7] = std::nanf("");
  const std::vector<float> unit = kp::UnitRows(keys, d);
  const std::vector<uint8_t> all(7, 1);
  const int32_t query[] = {0};
  using V = std::vector<int32_t>;
  for (SimilarityKernel k : {SimilarityKernel::kReference, SimilarityKernel::kBlocked,
                             SimilarityKernel::kPortable, SimilarityKernel::kBlockedAvx2}) {
    kp::SetSimilarityKernel(k);
    INFO(Name(k));
    CHECK(kp::TopKSimilarRows(unit, d, query, all, 4)[0] == V{1, 3, 6, 4});
    CHECK(kp::TopKSimilarRows(unit, d, query, all, 10)[0] == V{1, 3, 6, 4, 5, 2});
    std::vector<uint8_t> some = all;
    some[3] = 0;
    CHECK(kp::TopKSimilarRows(unit, d, query, some, 3)[0] == V{1, 6, 4});
  }
}

TEST_CASE("prumerge and LOOK-M plans are equal under every similarity kernel",
          "[policy][similarity]") {
  KernelGuard guard;
  // 3 layers x 4 kv heads, D = 80, 300 tokens: text 0-19, image 20-259, text 260-299; keys with
  // duplicated prototypes in the image (near ties), a zero key and a NaN key in some streams.
  const int32_t layers = 3, heads = 4, d = 80, n = 300;
  auto s = kp::testing::Uniform(layers, heads, heads, d, n);
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  int stream = 0;
  for (kp::StreamSnapshot& st : s.streams) {
    std::vector<float> keys = Keys(rng, n, d, stream % 3);
    st.keys = keys;
    st.post_vision_scores.resize(n);
    for (float& x : st.post_vision_scores) x = std::exp(nd(rng));
    for (int32_t j = 20; j < 260; ++j) st.modalities[j] = Modality::kImage;
    for (float& x : st.accumulated) x = std::exp(nd(rng));
    if (stream == 4) st.post_vision_scores[30] = std::nanf("");
    ++stream;
  }
  for (const std::string spec :
       {"prumerge", "prumerge:knn=5,plus=1,merge_keys=1", "h2o:merge=pivot",
        "h2o:merge=average", "streamingllm:keep=0.3,merge=pivot"}) {
    INFO(spec);
    kp::SetSimilarityKernel(SimilarityKernel::kReference);
    const kvcache::EvictionPlan want = kp::testing::MustPlan(spec, s);
    size_t merges = 0;
    for (const auto& sp : want.streams) merges += sp.merges.size();
    CHECK(merges > 0);  // the case exercises the merge
    for (SimilarityKernel k : kFast) {
      INFO(Name(k));
      kp::SetSimilarityKernel(k);
      CheckSamePlans(kp::testing::MustPlan(spec, s), want);
    }
  }
}

TEST_CASE("LOOK-M's missing-keys error is the serial one", "[policy][similarity]") {
  KernelGuard guard;
  auto s = kp::testing::Uniform(2, 2, 2, 4, 40);
  for (kp::StreamSnapshot& st : s.streams) {
    st.keys.assign(40 * 4, 1.0f);
    for (size_t j = 0; j < st.accumulated.size(); ++j) st.accumulated[j] = static_cast<float>(j % 7);
  }
  s.stream(1, 0).keys.clear();
  s.stream(1, 1).keys.clear();
  for (SimilarityKernel k : {SimilarityKernel::kReference, SimilarityKernel::kBlocked}) {
    kp::SetSimilarityKernel(k);
    auto plan = (*kp::CreatePolicy("h2o:merge=pivot"))->Plan(s);
    REQUIRE_FALSE(plan.ok());
    CHECK(plan.status().code() == absl::StatusCode::kFailedPrecondition);
    CHECK(std::string(plan.status().message()).find("layer 1, kv_head 0") != std::string::npos);
  }
}

TEST_CASE("DotProducts equals DotProduct bit for bit (every copy, any width, any count)",
          "[policy][similarity]") {
  KernelGuard guard;
  std::mt19937 rng(41);
  std::normal_distribution<float> nd;
  for (size_t d : {1, 7, 8, 9, 16, 31, 64, 127, 128, 130}) {
    const int rows = 37;
    std::vector<float> a(d), x(rows * d);
    for (float& v : a) v = nd(rng);
    for (float& v : x) v = nd(rng) * (1.0f + static_cast<float>(rng() % 1000));
    x[3 * d] = std::numeric_limits<float>::infinity();  // non-finite rows too
    x[5 * d] = std::nanf("");
    std::vector<const float*> ptr(rows);
    for (int i = 0; i < rows; ++i) ptr[i] = x.data() + i * d;
    for (SimilarityKernel k : {SimilarityKernel::kBlocked, SimilarityKernel::kPortable}) {
      kp::SetSimilarityKernel(k);
      for (int count : {0, 1, 3, 4, 8, 9, 16, 37}) {
        INFO("d " << d << " kernel " << Name(k) << " count " << count);
        std::vector<float> out(count, -1.0f);
        kp::DotProducts(a.data(), ptr.data(), count, d, out.data());
        for (int i = 0; i < count; ++i) {
          const float want = kp::DotProduct(a.data(), ptr[i], d);
          if (std::isnan(want)) {
            CHECK(std::isnan(out[i]));
          } else {
            CHECK(std::memcmp(&out[i], &want, sizeof(float)) == 0);
          }
        }
      }
    }
  }
}
