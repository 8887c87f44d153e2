// kvcache-eval runner: the full-cache reference has fidelity exactly 1, a policy keeping
// everything equals the full cache, tighter keep ratios never keep more bytes, and the run
// expansion maps --keep onto each policy's budget knob.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

#include "tools/eval/report.h"
#include "tools/eval/runner.h"
#include "tools/eval/workload.h"

namespace ke = kvcache::eval;

namespace {

ke::Workload Small(uint64_t seed = 3) {
  ke::SyntheticSpec s;
  s.seed = seed;
  s.num_layers = 4;
  s.num_kv_heads = 2;
  s.num_q_heads = 4;
  s.head_dim = 32;
  s.system_tokens = 16;
  s.image_tokens = 240;
  s.image_tiles = 3;
  s.question_tokens = 40;
  s.decode_steps = 6;
  auto w = ke::GenerateWorkload(s);
  REQUIRE(w.ok());
  return *w;
}

}  // namespace

TEST_CASE("ExpandRuns maps keep ratios onto each policy's knob", "[eval][runner]") {
  auto runs = ke::ExpandRuns({"snapkv:window=8", "h2o", "fastv", "prumerge", "tova:keep=0.3"},
                             {0.1, 0.5});
  REQUIRE(runs.ok());
  std::vector<std::string> specs;
  for (const auto& r : *runs) specs.push_back(r.spec);
  CHECK(specs == std::vector<std::string>{"snapkv:window=8,keep=0.1", "snapkv:window=8,keep=0.5",
                                          "h2o:heavy=0.05,recent=0.05",
                                          "h2o:heavy=0.25,recent=0.25", "fastv:keep=0.1",
                                          "fastv:keep=0.5", "prumerge", "tova:keep=0.3"});
  CHECK((*runs)[0].keep == 0.1);
  CHECK((*runs)[6].keep < 0);  // prumerge has no keep knob
  CHECK((*runs)[7].keep < 0);  // the spec set its own budget

  auto bad = ke::ExpandRuns({"nosuch"}, {0.1});
  REQUIRE_FALSE(bad.ok());
  CHECK(std::string(bad.status().message()).find("nosuch") != std::string::npos);
  auto bad_keep = ke::ExpandRuns({"snapkv"}, {1.5});
  REQUIRE_FALSE(bad_keep.ok());
  CHECK(std::string(bad_keep.status().message()).find("1.5") != std::string::npos);
  auto bad_param = ke::ExpandRuns({"snapkv:window=abc"}, {0.1});
  REQUIRE_FALSE(bad_param.ok());
  CHECK(std::string(bad_param.status().message()).find("abc") != std::string::npos);
}

TEST_CASE("Full cache has fidelity exactly 1; keep-all equals full; tighter keep keeps less",
          "[eval][runner]") {
  const ke::Workload w = Small();
  auto runs = ke::ExpandRuns({"full", "snapkv:window=8", "streamingllm", "h2o"},
                             {1.0, 0.6, 0.3, 0.15});
  REQUIRE(runs.ok());
  int64_t progress_calls = 0;
  ke::EvalOptions o;
  o.progress = [&](int64_t done, int64_t total, const std::string&) {
    ++progress_calls;
    CHECK(done <= total);
  };
  auto res = ke::RunEval(w, *runs, o);
  INFO(res.status().message());
  REQUIRE(res.ok());
  CHECK(progress_calls == int64_t{w.decode_steps} * (static_cast<int64_t>(runs->size()) + 1));

  // The reference against itself.
  CHECK(res->full.cosine == 1.0);
  CHECK(res->full.rel_l2 == 0.0);
  CHECK(res->full.min_cosine == 1.0);
  CHECK(res->full.tokens_kept == res->full.tokens_total);
  REQUIRE(res->full.layer_cosine.size() == static_cast<size_t>(w.num_layers));

  const auto find = [&](const std::string& spec) -> const ke::RunResult& {
    for (const auto& r : res->runs) {
      if (r.spec == spec) return r;
    }
    FAIL("no run " << spec);
    return res->runs.front();
  };
  // "full" as a policy and "keep everything" policies reproduce the reference exactly.
  for (const char* spec : {"full", "snapkv:window=8,keep=1", "streamingllm:keep=1"}) {
    INFO(spec);
    const ke::RunResult& r = find(spec);
    CHECK(r.cosine == 1.0);
    CHECK(r.rel_l2 == 0.0);
    CHECK(r.kv_bytes == res->full.kv_bytes);
    CHECK(r.tokens_kept == r.tokens_total);
  }
  // Tightening keep never increases kept bytes or tokens; evicting loses fidelity.
  for (const char* base : {"snapkv:window=8,keep=", "streamingllm:keep="}) {
    int64_t prev_bytes = res->full.kv_bytes, prev_tokens = res->full.tokens_kept;
    for (const char* k : {"1", "0.6", "0.3", "0.15"}) {
      const ke::RunResult& r = find(std::string(base) + k);
      INFO(r.spec << " bytes " << r.kv_bytes << " tokens " << r.tokens_kept);
      CHECK(r.kv_bytes <= prev_bytes);
      CHECK(r.tokens_kept <= prev_tokens);
      prev_bytes = r.kv_bytes;
      prev_tokens = r.tokens_kept;
    }
    const ke::RunResult& tight = find(std::string(base) + "0.15");
    CHECK(tight.kv_bytes < res->full.kv_bytes);
    CHECK(tight.cosine < 1.0);
    CHECK(tight.rel_l2 > 0.0);
    CHECK(tight.kv_bytes_end > tight.kv_bytes - 1);  // decode only adds tokens
  }
  const ke::RunResult& h_tight = find("h2o:heavy=0.075,recent=0.075");
  const ke::RunResult& h_loose = find("h2o:heavy=0.3,recent=0.3");
  CHECK(h_tight.kv_bytes <= h_loose.kv_bytes);
  // Kept-per-modality counts add up, and the kept map is a share.
  for (const auto& r : res->runs) {
    int64_t sum = 0;
    for (int64_t x : r.kept_by_modality) sum += x;
    CHECK(sum == r.tokens_kept);
    for (const auto& row : r.kept_map) {
      for (float x : row) {
        CHECK(x >= 0.0f);
        CHECK(x <= 1.0f);
      }
    }
  }
  // Output text mentions every run.
  const std::string table = ke::FormatTable(*res);
  for (const auto& r : res->runs) CHECK(table.find(r.spec) != std::string::npos);
  const std::string json = ke::ToJson(*res);
  CHECK(json.find("\"kvcache-eval-results\"") != std::string::npos);
}

TEST_CASE("Runs are reproducible: same workload, same fidelity", "[eval][runner]") {
  const ke::Workload w = Small(5);
  auto runs = ke::ExpandRuns({"snapkv:window=8"}, {0.3});
  REQUIRE(runs.ok());
  auto a = ke::RunEval(w, *runs, {});
  auto b = ke::RunEval(w, *runs, {});
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(a->runs[0].cosine == b->runs[0].cosine);
  CHECK(a->runs[0].kv_bytes == b->runs[0].kv_bytes);
  CHECK(a->runs[0].kept_by_layer == b->runs[0].kept_by_layer);
}

TEST_CASE("Compare: identical vectors are exactly (1, 0); scaled vectors keep cosine 1",
          "[eval][runner]") {
  const float a[] = {1.0f, -2.0f, 3.0f};
  const float b[] = {2.0f, -4.0f, 6.0f};
  const float z[] = {0.0f, 0.0f, 0.0f};
  ke::Fidelity same = ke::Compare(a, a, 3);
  CHECK(same.cosine == 1.0);
  CHECK(same.rel_l2 == 0.0);
  ke::Fidelity scaled = ke::Compare(a, b, 3);
  CHECK(scaled.cosine == Approx(1.0));
  CHECK(scaled.rel_l2 == Approx(1.0));
  ke::Fidelity zero = ke::Compare(a, z, 3);
  CHECK(zero.cosine == 0.0);
  CHECK(zero.rel_l2 == Approx(1.0));
}

TEST_CASE("Read policies: reading every key equals the full cache; a small budget reads less",
          "[eval][runner]") {
  const ke::Workload w = Small();
  auto runs = ke::ExpandRuns({"quest:tokens=100000", "retrieval:exact=1,top_k=100000", "quest",
                              "retrieval"},
                             {0.2});
  REQUIRE(runs.ok());
  REQUIRE(runs->size() == 4);
  CHECK((*runs)[2].spec == "quest:keep=0.2");
  CHECK((*runs)[3].spec == "retrieval:keep=0.2");
  auto res = ke::RunEval(w, *runs, {});
  REQUIRE(res.ok());
  const auto& quest_all = res->runs[0];
  const auto& exact_all = res->runs[1];
  // Quest over every page is the dense kernel over the same pages: bit-identical.
  CHECK(quest_all.cosine == 1.0);
  CHECK(quest_all.rel_l2 == 0.0);
  // Exact retrieval of every key: the same softmax in another order.
  CHECK(exact_all.cosine > 0.99999);
  CHECK(exact_all.rel_l2 < 1e-4);
  for (const auto& r : res->runs) {
    CHECK(r.kv_bytes == res->full.kv_bytes);  // read policies evict nothing
    CHECK(r.tokens_kept == r.tokens_total);
  }
  // Reading 20% of the keys changes the output (the layers after the dense first two).
  CHECK(res->runs[2].cosine < 1.0);
  CHECK(res->runs[2].cosine > 0.0);
  CHECK(res->runs[3].cosine < 1.0);
  CHECK(res->runs[3].plan_ms > 0.0);  // the hnsw index build is reported as preparation

  auto bad = ke::ExpandRuns({"quest:budget=3"}, {0.1});
  REQUIRE_FALSE(bad.ok());
  CHECK(std::string(bad.status().message()).find("budget") != std::string::npos);
  auto bad_keep = ke::ExpandRuns({"retrieval:keep=2"}, {0.1});
  REQUIRE_FALSE(bad_keep.ok());
  CHECK(std::string(bad_keep.status().message()).find("keep=2") != std::string::npos);
}

TEST_CASE("ExpandRuns: only h2o's heavy/recent and fastv's ratio set the budget",
          "[eval][runner]") {
  // vlcache's and think's recent= are windows inside the budget: --keep still applies.
  auto runs = ke::ExpandRuns({"vlcache:recent=0.2", "h2o:recent=0.1", "snapkv:window=8"},
                             {0.1, 0.25});
  REQUIRE(runs.ok());
  std::vector<std::string> specs;
  for (const auto& r : *runs) specs.push_back(r.spec);
  CHECK(specs == std::vector<std::string>{"vlcache:recent=0.2,keep=0.1",
                                          "vlcache:recent=0.2,keep=0.25", "h2o:recent=0.1",
                                          "snapkv:window=8,keep=0.1", "snapkv:window=8,keep=0.25"});
}

// Attention-mass recall against an independent computation: the full cache's softmax of every
// decode query over the prompt and the decode tokens so far (f32 cache, so the kernel and this
// double-precision reference agree closely), summed over the tokens streamingllm keeps (the 4
// sinks and the last tokens-4 prompt tokens), averaged over query heads, steps and layers.
TEST_CASE("Attention-mass recall, norm ratio and kept share are what they claim",
          "[eval][runner][metrics]") {
  const ke::Workload w = Small(9);
  const int kTokens = 60, kSinks = 4;
  auto runs = ke::ExpandRuns({"full", absl::StrCat("streamingllm:tokens=", kTokens),
                              "snapkv:window=8", "random"},
                             {0.25});
  REQUIRE(runs.ok());
  ke::EvalOptions o;
  o.dtype = kvcache::DType::kF32;
  auto res = ke::RunEval(w, *runs, o);
  REQUIRE(res.ok());
  // The reference and "full" as a policy: recall and norm ratio exactly 1, no error anywhere.
  for (const ke::RunResult* r : {&res->full, &res->runs[0]}) {
    CHECK(r->attn_recall == 1.0);
    CHECK(r->attn_recall_worst == 1.0);
    CHECK(r->norm_ratio == 1.0);
    CHECK(r->rel_l2_worst == 0.0);
    CHECK(r->kept_share == 1.0);
  }
  const ke::RunResult& stream = res->runs[1];
  const int n = w.prompt_len, L = w.num_layers, H = w.num_kv_heads, QH = w.num_q_heads;
  const int D = w.head_dim, G = QH / H;
  double expected = 0;
  std::vector<double> layer_expected(L, 0.0);
  for (int l = 0; l < L; ++l) {
    for (int t = 0; t < w.decode_steps; ++t) {
      for (int qh = 0; qh < QH; ++qh) {
        const int h = qh / G;
        const float* q = &w.decode_queries[l][(static_cast<size_t>(t) * QH + qh) * D];
        std::vector<double> logit;
        for (int j = 0; j < n + t + 1; ++j) {
          const float* k = j < n ? &w.keys[l][(static_cast<size_t>(j) * H + h) * D]
                                 : &w.decode_keys[l][(static_cast<size_t>(j - n) * H + h) * D];
          double dot = 0;
          for (int c = 0; c < D; ++c) dot += double{q[c]} * k[c];
          logit.push_back(dot / std::sqrt(static_cast<double>(D)));
        }
        const double m = *std::max_element(logit.begin(), logit.end());
        double z = 0, kept = 0;
        for (int j = 0; j < n + t + 1; ++j) {
          const double p = std::exp(logit[j] - m);
          z += p;
          if (j < kSinks || j >= n - (kTokens - kSinks)) kept += p;
        }
        layer_expected[l] += kept / z / (static_cast<double>(QH) * w.decode_steps);
      }
    }
    expected += layer_expected[l] / L;
  }
  INFO("recall " << stream.attn_recall << " expected " << expected);
  CHECK(stream.attn_recall == Approx(expected).epsilon(1e-4));
  REQUIRE(stream.layer_attn_recall.size() == static_cast<size_t>(L));
  const double worst = *std::min_element(layer_expected.begin(), layer_expected.end());
  CHECK(stream.attn_recall_worst == Approx(worst).epsilon(1e-4));
  CHECK(stream.kept_share == Approx(static_cast<double>(kTokens) / n));
  // Every eviction run: recall in (0, 1), the worst layer no better than the mean, rel L2's worst
  // layer no better than its mean, and kept share within 0.02 of keep for the token policies.
  for (size_t i = 1; i < res->runs.size(); ++i) {
    const ke::RunResult& r = res->runs[i];
    INFO(r.spec << " recall " << r.attn_recall << " kept " << r.kept_share << " norm "
                << r.norm_ratio);
    CHECK(r.attn_recall > 0.0);
    CHECK(r.attn_recall < 1.0);
    CHECK(r.attn_recall_worst <= r.attn_recall);
    CHECK(r.rel_l2_worst >= r.rel_l2);
    CHECK(r.norm_ratio > 0.0);
    CHECK(r.layer_norm_ratio.size() == static_cast<size_t>(L));
    if (r.keep > 0) CHECK(std::abs(r.kept_share - r.keep) <= 0.02);
  }
  const std::string json = ke::ToJson(*res);
  for (const char* field : {"\"attn_recall\"", "\"attn_recall_worst\"", "\"layer_attn_recall\"",
                            "\"norm_ratio\"", "\"layer_norm_ratio\"", "\"rel_l2_worst\"",
                            "\"rel_l2_worst_layer\"", "\"kept_share\""}) {
    CHECK(json.find(field) != std::string::npos);
  }
}

TEST_CASE("Read policies report no recall (they keep every token)", "[eval][runner][metrics]") {
  const ke::Workload w = Small();
  auto runs = ke::ExpandRuns({"quest"}, {0.2});
  REQUIRE(runs.ok());
  auto res = ke::RunEval(w, *runs, {});
  REQUIRE(res.ok());
  CHECK(std::isnan(res->runs[0].attn_recall));
  CHECK(res->runs[0].kept_share == 1.0);
  CHECK(ke::ToJson(*res).find("\"attn_recall\": null") != std::string::npos);
  CHECK(ke::FormatTable(*res).find("quest:keep=0.2") != std::string::npos);
}
