// End to end: CollectSnapshot -> Plan -> Cache::Apply, then the compacted cache is checked
// against the plan applied by hand: tokens, positions, merged K/V, channel pruning, freed pages,
// and DecodeAttention equals dense attention over exactly the kept (and merged) tokens.
#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <string>

#include "kvcache/cache.h"
#include "kvcache/policy/registry.h"
#include "kvcache/policy/snapshot.h"

namespace kp = kvcache::policy;
using kvcache::Modality;

namespace {

constexpr int32_t kLayers = 3, kHeads = 2, kQHeads = 4, kDim = 16, kPageTokens = 8;
constexpr int32_t kPrompt = 60, kRows = 16;

struct Fixture {
  std::unique_ptr<kvcache::Cache> cache;
  kvcache::SequenceId seq = 0;
  std::vector<std::vector<float>> queries;  // [layer][rows * q_heads * dim]
  std::vector<int32_t> row_positions;
  kp::Observations obs;
};

Fixture Make(uint32_t seed) {
  Fixture f;
  kvcache::CacheConfig cfg;
  cfg.num_layers = kLayers;
  cfg.num_kv_heads = kHeads;
  cfg.num_q_heads = kQHeads;
  cfg.head_dim = kDim;
  cfg.dtype = kvcache::DType::kF32;
  cfg.page_tokens = kPageTokens;
  cfg.num_pages = 4096;
  auto cache = kvcache::Cache::Create(cfg, "cpu");
  REQUIRE(cache.ok());
  f.cache = std::move(*cache);
  f.seq = *f.cache->AddSequence();
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<int32_t> pos(kPrompt);
  std::vector<Modality> mod(kPrompt, Modality::kText);
  for (int j = 0; j < kPrompt; ++j) {
    pos[j] = j;
    if (j >= 10 && j < 50) mod[j] = Modality::kImage;
  }
  for (int l = 0; l < kLayers; ++l) {
    std::vector<float> k(kPrompt * kHeads * kDim), v(k.size());
    for (float& x : k) x = nd(rng);
    for (float& x : v) x = nd(rng);
    kvcache::AppendRequest req;
    req.keys = kvcache::TensorRef::Of(k);
    req.values = kvcache::TensorRef::Of(v);
    req.positions = pos;
    req.modalities = mod;
    REQUIRE(f.cache->Append(f.seq, l, req).ok());
  }
  for (int r = 0; r < kRows; ++r) f.row_positions.push_back(kPrompt - kRows + r);
  f.queries.resize(kLayers);
  for (int l = 0; l < kLayers; ++l) {
    f.queries[l].resize(kRows * kQHeads * kDim);
    for (float& x : f.queries[l]) x = 2.0f * nd(rng);
    f.obs.layers.push_back({.queries = f.queries[l], .positions = f.row_positions});
    // Accumulators for H2O: the observation rows, added once.
    kvcache::ScoreRequest sr;
    sr.queries = f.queries[l];
    sr.positions = f.row_positions;
    sr.accumulate = true;
    REQUIRE(f.cache->ScoreRows(f.seq, l, sr).ok());
  }
  return f;
}

int32_t Pages(int32_t tokens, int32_t key_width) {
  const int32_t page_bytes = kPageTokens * 2 * kDim * 4;
  const int32_t tpp = page_bytes / ((key_width + kDim) * 4);
  return (tokens + tpp - 1) / tpp;
}

void CheckPolicy(const std::string& spec) {
  INFO("policy " << spec);
  Fixture f = Make(99);
  auto policy = kp::CreatePolicy(spec);
  REQUIRE(policy.ok());
  auto snap = kp::CollectSnapshot(*f.cache, f.seq, f.obs, (*policy)->Needs());
  INFO(snap.status().message());
  REQUIRE(snap.ok());
  auto plan = (*policy)->Plan(*snap);
  INFO(plan.status().message());
  REQUIRE(plan.ok());
  if (spec.rfind("full", 0) != 0) REQUIRE_FALSE(plan->streams.empty());

  // Before: every stream, with K/V, and the expected result of the plan computed by hand.
  std::vector<kvcache::StreamContents> before(kLayers * kHeads), expect(kLayers * kHeads);
  for (int l = 0; l < kLayers; ++l) {
    for (int h = 0; h < kHeads; ++h) {
      auto c = f.cache->ReadStream(f.seq, l, h, true);
      REQUIRE(c.ok());
      REQUIRE(c->num_segments == 1);
      before[l * kHeads + h] = *c;
      expect[l * kHeads + h] = *c;
    }
  }
  const int32_t used_before = f.cache->Stats().pages_used;
  int32_t freed = 0;
  for (const kvcache::StreamPlan& sp : plan->streams) {
    const auto& b = before[sp.layer * kHeads + sp.kv_head];
    auto& e = expect[sp.layer * kHeads + sp.kv_head];
    const int32_t kept = static_cast<int32_t>(sp.kept.size());
    e = {};
    e.length = kept;
    e.keys.assign(kept * kDim, 0.0f);
    e.values.assign(kept * kDim, 0.0f);
    for (int32_t i = 0; i < kept; ++i) {
      const int32_t j = sp.kept[i];
      e.positions.push_back(b.positions[j]);
      e.modalities.push_back(b.modalities[j]);
      const float wk = sp.kept_key_weight.empty() ? 1.0f : sp.kept_key_weight[i];
      const float wv = sp.kept_value_weight.empty() ? 1.0f : sp.kept_value_weight[i];
      for (int c = 0; c < kDim; ++c) {
        e.keys[i * kDim + c] = wk * b.keys[j * kDim + c];
        e.values[i * kDim + c] = wv * b.values[j * kDim + c];
      }
    }
    for (const kvcache::MergeTerm& t : sp.merges) {
      for (int c = 0; c < kDim; ++c) {
        e.keys[t.kept_slot * kDim + c] += t.key_weight * b.keys[t.source * kDim + c];
        e.values[t.kept_slot * kDim + c] += t.value_weight * b.values[t.source * kDim + c];
      }
    }
    const bool prune = !sp.key_channels.empty() && static_cast<int32_t>(sp.key_channels.size()) < kDim;
    const int32_t pruned = prune ? kept - sp.full_width_recent : 0;
    for (int32_t i = 0; i < pruned; ++i) {
      for (int c = 0; c < kDim; ++c) {
        if (!std::binary_search(sp.key_channels.begin(), sp.key_channels.end(), c)) {
          e.keys[i * kDim + c] = 0.0f;
        }
      }
    }
    freed += Pages(b.length, kDim) -
             (Pages(pruned, static_cast<int32_t>(sp.key_channels.size())) +
              Pages(kept - pruned, kDim));
  }

  REQUIRE(f.cache->Apply(*plan).ok());
  REQUIRE(f.cache->Validate().ok());
  // The pool's free-page count rose by exactly what the plan freed.
  CHECK(used_before - f.cache->Stats().pages_used == freed);
  if (spec.rfind("full", 0) != 0) CHECK(freed > 0);

  for (int l = 0; l < kLayers; ++l) {
    for (int h = 0; h < kHeads; ++h) {
      auto got = f.cache->ReadStream(f.seq, l, h, true);
      REQUIRE(got.ok());
      const auto& e = expect[l * kHeads + h];
      REQUIRE(got->length == e.length);
      CHECK(got->positions == e.positions);  // original positions travel with the tokens
      CHECK(got->modalities == e.modalities);
      for (size_t i = 0; i < e.keys.size(); ++i) {
        REQUIRE(got->keys[i] == Approx(e.keys[i]).margin(1e-5));
        REQUIRE(got->values[i] == Approx(e.values[i]).margin(1e-5));
      }
    }
  }

  // Decode attention over the compacted cache == dense attention over the expected tokens.
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(kDim));
  for (int l = 0; l < kLayers; ++l) {
    std::vector<float> q(kQHeads * kDim), out(kQHeads * kDim);
    for (float& x : q) x = nd(rng);
    const kvcache::SequenceId batch[] = {f.seq};
    REQUIRE(f.cache->DecodeAttention(batch, l, q, out).ok());
    for (int qh = 0; qh < kQHeads; ++qh) {
      const auto& e = expect[l * kHeads + qh / (kQHeads / kHeads)];
      std::vector<double> logit(e.length);
      double m = -INFINITY;
      for (int t = 0; t < e.length; ++t) {
        double dot = 0;
        for (int c = 0; c < kDim; ++c) dot += double{q[qh * kDim + c]} * e.keys[t * kDim + c];
        logit[t] = scale * dot;
        m = std::max(m, logit[t]);
      }
      double z = 0;
      std::vector<double> acc(kDim, 0.0);
      for (int t = 0; t < e.length; ++t) {
        const double p = std::exp(logit[t] - m);
        z += p;
        for (int c = 0; c < kDim; ++c) acc[c] += p * e.values[t * kDim + c];
      }
      for (int c = 0; c < kDim; ++c) {
        REQUIRE(out[qh * kDim + c] == Approx(acc[c] / z).margin(1e-4));
      }
    }
  }
}

}  // namespace

TEST_CASE("Every policy: Apply gives the planned cache, frees pages, attention matches",
          "[policy][e2e]") {
  for (const char* spec :
       {"snapkv:keep=0.3,window=8", "pyramidkv:keep=0.2,window=8", "adakv:keep=0.3,window=8",
        "h2o", "tova:keep=0.3", "knorm:keep=0.3", "random:keep=0.3,seed=3",
        "streamingllm:keep=0.3", "vlcache:keep=0.3", "vlcache:keep=0.3,shared=1,renorm=0",
        "fastv:layer=1", "fastv:layer=1,keep=0.6", "downsample:keep=0.3",
        "divprune:keep=0.3", "divprune:ratio=0.5", "prumerge:knn=4",
        "prumerge:knn=4,plus=1,merge_keys=1",
        "think:lambda=0.5,window=8,recent=8", "snapkv:keep=0.3,window=8,merge=pivot",
        "h2o:merge=average", "snapkv:keep=0.3,window=8,think=0.25,think_window=8,think_recent=4",
        "streamingllm:keep=0.5,protect_text=1,keep_image=0.1"}) {
    CheckPolicy(spec);
  }
}

TEST_CASE("CollectSnapshot: window scores equal causal softmax mass; errors",
          "[policy][e2e][snapshot]") {
  Fixture f = Make(7);
  kp::SnapshotRequest req;
  req.window_rows = 4;
  req.keys = true;
  req.last_row = true;
  req.post_vision = true;
  req.sparsity = true;
  req.query_rows = 4;
  auto snap = kp::CollectSnapshot(*f.cache, f.seq, f.obs, req);
  REQUIRE(snap.ok());
  CHECK(snap->layers[1].window_rows == 4);
  CHECK(snap->layers[1].below_threshold.size() == kQHeads);
  // Post-vision rows are positions 50..59 (after the last image token at 49): causal entries
  // per q head = sum over those rows of (q + 1).
  int64_t causal = 0;
  for (int p = 50; p < 60; ++p) causal += p + 1;
  CHECK(snap->layers[0].causal_entries[0] == causal);
  // Window scores of (layer 2, head 1) by hand: mean over the head's 2 q heads.
  const int l = 2, h = 1, g = kQHeads / kHeads;
  const auto& st = snap->stream(l, h);
  std::vector<double> want(kPrompt, 0.0);
  for (int r = kRows - 4; r < kRows; ++r) {
    for (int gg = 0; gg < g; ++gg) {
      const float* q = &f.queries[l][(r * kQHeads + h * g + gg) * kDim];
      const int visible = f.row_positions[r] + 1;
      std::vector<double> logit(visible);
      double m = -INFINITY, z = 0;
      for (int t = 0; t < visible; ++t) {
        double dot = 0;
        for (int c = 0; c < kDim; ++c) dot += double{q[c]} * st.keys[t * kDim + c];
        logit[t] = dot / std::sqrt(double{kDim});
        m = std::max(m, logit[t]);
      }
      for (int t = 0; t < visible; ++t) z += std::exp(logit[t] - m);
      for (int t = 0; t < visible; ++t) want[t] += std::exp(logit[t] - m) / z / g;
    }
  }
  for (int t = 0; t < kPrompt; ++t) CHECK(st.window_scores[t] == Approx(want[t]).margin(1e-5));

  kp::Observations none;
  CHECK(kp::CollectSnapshot(*f.cache, f.seq, none, req).status().code() ==
        absl::StatusCode::kInvalidArgument);
  req.window_rows = kRows + 1;
  CHECK(kp::CollectSnapshot(*f.cache, f.seq, f.obs, req).status().code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(kp::CollectSnapshot(*f.cache, f.seq + 100, f.obs, {}).status().code() ==
        absl::StatusCode::kNotFound);
  // Rows that all precede the last image token: no post-vision rows.
  kp::SnapshotRequest pv;
  pv.post_vision = true;
  std::vector<int32_t> early(kRows);
  for (int r = 0; r < kRows; ++r) early[r] = 20 + r;
  kp::Observations obs_early;
  for (int l2 = 0; l2 < kLayers; ++l2) obs_early.layers.push_back({.queries = f.queries[l2], .positions = early});
  CHECK(kp::CollectSnapshot(*f.cache, f.seq, obs_early, pv).status().code() ==
        absl::StatusCode::kFailedPrecondition);
}
