// End to end, decode time: Dynamic-LLaVA admission driven through Cache::Append (admit masks
// from the deciders of kvcache/policy/admission.h), and H2O fed by the decode kernel's score
// accumulation, planned from a snapshot and applied. Every expectation is computed in the test
// from the raw K/V with dense attention (tests/test_util.h), never read from the code under test.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kvcache/cache.h"
#include "kvcache/policy/admission.h"
#include "kvcache/policy/registry.h"
#include "kvcache/policy/snapshot.h"
#include "test_util.h"

namespace kp = kvcache::policy;
using kvcache::Modality;
using kvcache::testing::DenseAttention;

namespace {

constexpr int32_t kHeads = 2, kQHeads = 4, kGroup = kQHeads / kHeads, kDim = 16;

std::unique_ptr<kvcache::Cache> MakeCache(int32_t layers, int32_t page_tokens) {
  kvcache::CacheConfig cfg;
  cfg.num_layers = layers;
  cfg.num_kv_heads = kHeads;
  cfg.num_q_heads = kQHeads;
  cfg.head_dim = kDim;
  cfg.dtype = kvcache::DType::kF32;  // stored values are exact: the dense oracle sees the same
  cfg.page_tokens = page_tokens;
  cfg.num_pages = 1024;
  auto cache = kvcache::Cache::Create(cfg, "cpu");
  REQUIRE(cache.ok());
  return std::move(*cache);
}

// The tokens a stream should hold, as the test tracks them: [n, kDim] keys / values.
struct Expected {
  std::vector<int32_t> positions;
  std::vector<Modality> modalities;
  std::vector<float> keys, values;
  int32_t length() const { return static_cast<int32_t>(positions.size()); }
  void Add(int32_t pos, Modality m, const float* k, const float* v) {
    positions.push_back(pos);
    modalities.push_back(m);
    keys.insert(keys.end(), k, k + kDim);
    values.insert(values.end(), v, v + kDim);
  }
};

// One token's K/V for all kv heads: [kHeads, kDim] each.
struct TokenKV {
  std::vector<float> k, v;
};

TokenKV RandomToken(std::mt19937& rng) {
  return {kvcache::testing::RandomVector(rng, kHeads * kDim),
          kvcache::testing::RandomVector(rng, kHeads * kDim)};
}

// Decode over `layer` of `cache` equals dense attention over exactly `expect` (per kv head).
void CheckDecodeMatchesDense(kvcache::Cache& cache, kvcache::SequenceId seq, int32_t layer,
                             const std::vector<Expected>& expect, const std::vector<float>& q) {
  std::vector<float> out(kQHeads * kDim), lse(kQHeads);
  const kvcache::SequenceId batch[] = {seq};
  REQUIRE(cache.DecodeAttention(batch, layer, q, out, lse).ok());
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  for (int32_t qh = 0; qh < kQHeads; ++qh) {
    const Expected& e = expect[qh / kGroup];
    std::vector<float> want(kDim);
    float want_lse = 0;
    DenseAttention(q.data() + qh * kDim, e.keys, e.values, e.length(), kDim, scale, want.data(),
                   &want_lse);
    for (int32_t c = 0; c < kDim; ++c) REQUIRE(out[qh * kDim + c] == Approx(want[c]).margin(1e-5));
    REQUIRE(lse[qh] == Approx(want_lse).margin(1e-5));
  }
}

// Stream (layer, h) read back equals `e`: positions, modalities, keys, values (f32: exact).
void CheckStream(kvcache::Cache& cache, kvcache::SequenceId seq, int32_t layer, int32_t h,
                 const Expected& e) {
  INFO("layer " << layer << " kv head " << h);
  auto got = cache.ReadStream(seq, layer, h, true);
  REQUIRE(got.ok());
  REQUIRE(got->length == e.length());
  CHECK(got->positions == e.positions);
  CHECK(got->modalities == e.modalities);
  CHECK(got->keys == e.keys);
  CHECK(got->values == e.values);
}

// Appends one step's tokens (each [kHeads, kDim]) to `layer` with `admit`.
absl::Status AppendTokens(kvcache::Cache& cache, kvcache::SequenceId seq, int32_t layer,
                          const std::vector<TokenKV>& tokens, const std::vector<int32_t>& pos,
                          const std::vector<Modality>& mod, const std::vector<uint8_t>& admit) {
  std::vector<float> k, v;
  for (const TokenKV& t : tokens) {
    k.insert(k.end(), t.k.begin(), t.k.end());
    v.insert(v.end(), t.v.begin(), t.v.end());
  }
  kvcache::AppendRequest req;
  req.keys = kvcache::TensorRef::Of(k);
  req.values = kvcache::TensorRef::Of(v);
  req.positions = pos;
  req.modalities = mod;
  req.admit = admit;
  return cache.Append(seq, layer, req);
}

enum class DeciderKind { kAttention, kEngine };

void RunDynamicLlava(DeciderKind kind) {
  constexpr int32_t kLayers = 4, kStart = 2, kPageTokens = 4, kPrompt = 10, kSteps = 12;
  auto cache = MakeCache(kLayers, kPageTokens);
  const kvcache::SequenceId seq = *cache->AddSequence();
  std::mt19937 rng(kind == DeciderKind::kAttention ? 21 : 22);
  // expect[layer][h]
  std::vector<std::vector<Expected>> expect(kLayers, std::vector<Expected>(kHeads));

  // Prefill: every layer stores every prompt token (text, image, text).
  std::vector<TokenKV> prompt;
  std::vector<int32_t> prompt_pos(kPrompt);
  std::vector<Modality> prompt_mod(kPrompt, Modality::kText);
  for (int32_t j = 0; j < kPrompt; ++j) {
    prompt_pos[j] = j;
    if (j >= 2 && j < 8) prompt_mod[j] = Modality::kImage;
  }
  for (int32_t l = 0; l < kLayers; ++l) {
    prompt.clear();
    for (int32_t j = 0; j < kPrompt; ++j) prompt.push_back(RandomToken(rng));
    REQUIRE(AppendTokens(*cache, seq, l, prompt, prompt_pos, prompt_mod, {}).ok());
    for (int32_t j = 0; j < kPrompt; ++j) {
      for (int32_t h = 0; h < kHeads; ++h) {
        expect[l][h].Add(j, prompt_mod[j], prompt[j].k.data() + h * kDim,
                         prompt[j].v.data() + h * kDim);
      }
    }
  }

  // Deciders. Attention-based: admit when the token's own query gives it >= threshold x the
  // uniform share. Engine: a stand-in predictor (keep every position not divisible by 3), which
  // also records what it was asked.
  const double threshold = 1.0;
  std::vector<int32_t> engine_seen;
  absl::StatusOr<kp::Admission> admission =
      kind == DeciderKind::kAttention
          ? kp::Admission::AttentionBased(threshold, kStart)
          : kp::Admission::Engine(
                [&](const kp::AdmissionInput& in) -> absl::StatusOr<std::vector<uint8_t>> {
                  std::vector<uint8_t> d;
                  for (int32_t p : in.positions) {
                    engine_seen.push_back(p);
                    d.push_back(p % 3 != 0);
                  }
                  return d;
                },
                kStart);
  REQUIRE(admission.ok());
  REQUIRE(admission->start_layer() == kStart);

  int32_t position = kPrompt;
  int32_t admitted_total = 0, rejected_total = 0;
  for (int32_t step = 0; step < kSteps; ++step) {
    // The attention decider sees one token per step; the engine decides 1-3 tokens at once.
    const int32_t n = kind == DeciderKind::kAttention ? 1 : 1 + step % 3;
    std::vector<int32_t> pos(n);
    std::vector<Modality> mod(n);
    for (int32_t i = 0; i < n; ++i) {
      pos[i] = position++;
      mod[i] = (pos[i] % 4 == 1) ? Modality::kImage : Modality::kText;
    }
    // Per layer: this step's query (first token's), and the new tokens' K/V.
    std::vector<std::vector<float>> q(kLayers);
    std::vector<std::vector<TokenKV>> kv(kLayers);
    for (int32_t l = 0; l < kLayers; ++l) {
      q[l] = kvcache::testing::RandomVector(rng, kQHeads * kDim, 2.0f);
      for (int32_t i = 0; i < n; ++i) kv[l].push_back(RandomToken(rng));
    }

    // Decisions. The attention decider is fed the token's self weight in layer kStart: its
    // query against [the cached tokens + itself], from the cache's lse.
    std::vector<uint8_t> decisions;
    if (kind == DeciderKind::kAttention) {
      std::vector<float> out(kQHeads * kDim), lse(kQHeads);
      const kvcache::SequenceId batch[] = {seq};
      REQUIRE(cache->DecodeAttention(batch, kStart, q[kStart], out, lse).ok());
      auto w = kp::SelfAttentionWeight(q[kStart], kv[kStart][0].k, lse, kQHeads, kHeads, kDim);
      REQUIRE(w.ok());
      const int32_t context = expect[kStart][0].length();
      const float self_weight = *w;
      const int32_t ctx[] = {context};
      auto d = admission->Decide(
          {.positions = pos, .modalities = mod, .self_weight = std::span(&self_weight, 1),
           .context_length = ctx});
      REQUIRE(d.ok());
      decisions = *d;
      // Independently: the mean over the q heads of the dense softmax weight on itself.
      double dense_weight = 0;
      const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
      for (int32_t qh = 0; qh < kQHeads; ++qh) {
        Expected with_self = expect[kStart][qh / kGroup];
        with_self.Add(pos[0], mod[0], kv[kStart][0].k.data() + (qh / kGroup) * kDim,
                      kv[kStart][0].v.data() + (qh / kGroup) * kDim);
        std::vector<float> o(kDim);
        std::vector<double> probs;
        DenseAttention(q[kStart].data() + qh * kDim, with_self.keys, with_self.values,
                       with_self.length(), kDim, scale, o.data(), nullptr, &probs);
        dense_weight += probs.back() / kQHeads;
      }
      CHECK(self_weight == Approx(dense_weight).margin(1e-5));
      const double share = dense_weight * (context + 1);
      if (std::abs(share - threshold) > 1e-4) CHECK(decisions[0] == (share >= threshold));
    } else {
      auto d = admission->Decide({.positions = pos, .modalities = mod});
      REQUIRE(d.ok());
      decisions = *d;
      for (int32_t i = 0; i < n; ++i) CHECK(decisions[i] == (pos[i] % 3 != 0));
    }
    REQUIRE(decisions.size() == static_cast<size_t>(n));

    for (int32_t l = 0; l < kLayers; ++l) {
      // Decode over the cache before this step's tokens: dense over exactly what was stored.
      CheckDecodeMatchesDense(*cache, seq, l, expect[l], q[l]);
      const std::vector<uint8_t> mask = admission->MaskForLayer(l, decisions);
      REQUIRE(mask.size() == static_cast<size_t>(n));
      if (l < kStart) CHECK(std::count(mask.begin(), mask.end(), 1) == n);
      else CHECK(mask == decisions);
      REQUIRE(AppendTokens(*cache, seq, l, kv[l], pos, mod, mask).ok());
      for (int32_t i = 0; i < n; ++i) {
        if (!mask[i]) continue;
        for (int32_t h = 0; h < kHeads; ++h) {
          expect[l][h].Add(pos[i], mod[i], kv[l][i].k.data() + h * kDim,
                           kv[l][i].v.data() + h * kDim);
        }
      }
    }
    for (uint8_t d : decisions) (d ? admitted_total : rejected_total) += 1;

    // A rejected token still advanced the layer's position: re-appending its position (or an
    // earlier one) is refused in every layer, admitted or not.
    if (!decisions.back()) {
      for (int32_t l = 0; l < kLayers; ++l) {
        const std::vector<int32_t> again = {pos.back()};
        const std::vector<Modality> m = {Modality::kText};
        absl::Status s = AppendTokens(*cache, seq, l, {RandomToken(rng)}, again, m, {0});
        CHECK(s.code() == absl::StatusCode::kInvalidArgument);
      }
    }
  }
  INFO("admitted " << admitted_total << ", rejected " << rejected_total);
  REQUIRE(admitted_total > 0);  // the run exercises both outcomes
  REQUIRE(rejected_total > 0);
  if (kind == DeciderKind::kEngine) {
    std::vector<int32_t> all(position - kPrompt);
    std::iota(all.begin(), all.end(), kPrompt);
    CHECK(engine_seen == all);  // asked once per generated token, in order
  }

  // Layers < s hold every token; layers >= s exactly the admitted ones, with their true
  // positions (gaps where tokens were rejected) and modalities; pages match the counts.
  int32_t pages = 0;
  const int32_t generated = position - kPrompt;
  for (int32_t l = 0; l < kLayers; ++l) {
    for (int32_t h = 0; h < kHeads; ++h) {
      const Expected& e = expect[l][h];
      CHECK(e.length() == kPrompt + (l < kStart ? generated : admitted_total));
      CheckStream(*cache, seq, l, h, e);
      pages += (e.length() + kPageTokens - 1) / kPageTokens;
    }
  }
  CHECK(cache->Stats().pages_used == pages);
  REQUIRE(cache->Validate().ok());
  // A final decode in every layer: dense over exactly the stored tokens.
  for (int32_t l = 0; l < kLayers; ++l) {
    CheckDecodeMatchesDense(*cache, seq, l, expect[l],
                            kvcache::testing::RandomVector(rng, kQHeads * kDim, 2.0f));
  }
}

}  // namespace

TEST_CASE("Dynamic-LLaVA e2e: attention-based admission through Cache::Append",
          "[policy][admission][e2e]") {
  RunDynamicLlava(DeciderKind::kAttention);
}

TEST_CASE("Dynamic-LLaVA e2e: engine-supplied admission through Cache::Append",
          "[policy][admission][e2e]") {
  RunDynamicLlava(DeciderKind::kEngine);
}

TEST_CASE("H2O e2e: decode-time accumulation, plan from the snapshot, Apply, decode",
          "[policy][h2o][e2e]") {
  constexpr int32_t kLayers = 2, kPageTokens = 8, kPrompt = 40, kSteps = 6;
  auto cache = MakeCache(kLayers, kPageTokens);
  const kvcache::SequenceId seq = *cache->AddSequence();
  std::mt19937 rng(31);
  std::vector<std::vector<Expected>> expect(kLayers, std::vector<Expected>(kHeads));
  // Accumulated scores by hand: [layer][h][token].
  std::vector<std::vector<std::vector<double>>> acc(kLayers, std::vector<std::vector<double>>(kHeads));

  auto append = [&](int32_t l, const std::vector<TokenKV>& toks, const std::vector<int32_t>& pos) {
    const std::vector<Modality> mod(toks.size(), Modality::kText);
    REQUIRE(AppendTokens(*cache, seq, l, toks, pos, mod, {}).ok());
    for (size_t i = 0; i < toks.size(); ++i) {
      for (int32_t h = 0; h < kHeads; ++h) {
        expect[l][h].Add(pos[i], Modality::kText, toks[i].k.data() + h * kDim,
                         toks[i].v.data() + h * kDim);
        acc[l][h].push_back(0.0);
      }
    }
  };
  std::vector<int32_t> prompt_pos(kPrompt);
  std::iota(prompt_pos.begin(), prompt_pos.end(), 0);
  for (int32_t l = 0; l < kLayers; ++l) {
    std::vector<TokenKV> toks;
    for (int32_t j = 0; j < kPrompt; ++j) toks.push_back(RandomToken(rng));
    append(l, toks, prompt_pos);
  }

  // Decode steps: append the step's token, then attend with accumulation on.
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  kvcache::DecodeOptions opts;
  opts.accumulate_scores = true;
  opts.aggregation = kvcache::GqaAggregation::kMean;
  for (int32_t step = 0; step < kSteps; ++step) {
    for (int32_t l = 0; l < kLayers; ++l) {
      append(l, {RandomToken(rng)}, {kPrompt + step});
      // Queries scaled up so the attention is peaked and the heavy hitters clear.
      const std::vector<float> q = kvcache::testing::RandomVector(rng, kQHeads * kDim, 3.0f);
      std::vector<float> out(kQHeads * kDim);
      const kvcache::SequenceId batch[] = {seq};
      REQUIRE(cache->DecodeAttention(batch, l, q, out, {}, opts).ok());
      for (int32_t qh = 0; qh < kQHeads; ++qh) {
        const int32_t h = qh / kGroup;
        const Expected& e = expect[l][h];
        std::vector<float> o(kDim);
        std::vector<double> probs;
        DenseAttention(q.data() + qh * kDim, e.keys, e.values, e.length(), kDim, scale, o.data(),
                       nullptr, &probs);
        for (int32_t t = 0; t < e.length(); ++t) acc[l][h][t] += probs[t] / kGroup;  // GQA mean
        for (int32_t c = 0; c < kDim; ++c) REQUIRE(out[qh * kDim + c] == Approx(o[c]).margin(1e-5));
      }
    }
  }
  const int32_t n = kPrompt + kSteps;
  for (int32_t l = 0; l < kLayers; ++l) {
    for (int32_t h = 0; h < kHeads; ++h) {
      auto s = cache->ReadStream(seq, l, h);
      REQUIRE(s.ok());
      REQUIRE(s->length == n);
      for (int32_t t = 0; t < n; ++t) REQUIRE(s->scores[t] == Approx(acc[l][h][t]).margin(1e-5));
    }
  }

  // Plan H2O from a snapshot: heavy = 0.2, recent = 0.1 of n = 46 -> 9 heavy + 4 recent.
  auto policy = kp::CreatePolicy("h2o:heavy=0.2,recent=0.1");
  REQUIRE(policy.ok());
  auto snap = kp::CollectSnapshot(*cache, seq, {}, (*policy)->Needs());
  REQUIRE(snap.ok());
  auto plan = (*policy)->Plan(*snap);
  REQUIRE(plan.ok());
  const int32_t heavy = static_cast<int32_t>(std::floor(0.2 * n));
  const int32_t recent = static_cast<int32_t>(std::floor(0.1 * n));
  REQUIRE(plan->streams.size() == static_cast<size_t>(kLayers * kHeads));
  std::vector<std::vector<std::vector<int32_t>>> want_kept(kLayers, std::vector<std::vector<int32_t>>(kHeads));
  for (int32_t l = 0; l < kLayers; ++l) {
    for (int32_t h = 0; h < kHeads; ++h) {
      // Independently: the last `recent` tokens, plus the `heavy` highest accumulated scores of
      // the others (ties: earlier position first — none expected with these random scores).
      std::vector<int32_t> order(n - recent);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return acc[l][h][a] > acc[l][h][b]; });
      std::vector<int32_t> kept(order.begin(), order.begin() + heavy);
      for (int32_t t = n - recent; t < n; ++t) kept.push_back(t);
      std::sort(kept.begin(), kept.end());
      want_kept[l][h] = kept;
    }
  }
  for (const kvcache::StreamPlan& sp : plan->streams) {
    INFO("layer " << sp.layer << " kv head " << sp.kv_head);
    CHECK(sp.kept == want_kept[sp.layer][sp.kv_head]);
    CHECK(sp.merges.empty());
    CHECK(sp.key_channels.empty());
  }

  const int32_t used_before = cache->Stats().pages_used;
  REQUIRE(cache->Apply(*plan).ok());
  REQUIRE(cache->Validate().ok());
  const int32_t pages_per_stream_before = (n + kPageTokens - 1) / kPageTokens;
  const int32_t pages_per_stream_after = (heavy + recent + kPageTokens - 1) / kPageTokens;
  CHECK(used_before - cache->Stats().pages_used ==
        kLayers * kHeads * (pages_per_stream_before - pages_per_stream_after));

  // The kept tokens, with their positions, K/V and accumulated scores.
  std::vector<std::vector<Expected>> kept_expect(kLayers, std::vector<Expected>(kHeads));
  for (int32_t l = 0; l < kLayers; ++l) {
    for (int32_t h = 0; h < kHeads; ++h) {
      const Expected& e = expect[l][h];
      Expected& k = kept_expect[l][h];
      for (int32_t t : want_kept[l][h]) {
        k.Add(e.positions[t], e.modalities[t], e.keys.data() + t * kDim, e.values.data() + t * kDim);
      }
      CheckStream(*cache, seq, l, h, k);
      auto s = cache->ReadStream(seq, l, h);
      REQUIRE(s.ok());
      for (size_t i = 0; i < want_kept[l][h].size(); ++i) {
        REQUIRE(s->scores[i] == Approx(acc[l][h][want_kept[l][h][i]]).margin(1e-5));
      }
    }
  }
  // Decode over the compacted cache == dense attention over exactly the kept tokens.
  for (int32_t l = 0; l < kLayers; ++l) {
    CheckDecodeMatchesDense(*cache, seq, l, kept_expect[l],
                            kvcache::testing::RandomVector(rng, kQHeads * kDim, 2.0f));
  }
}
