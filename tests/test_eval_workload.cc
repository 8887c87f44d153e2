// The synthetic workload of kvcache-eval: deterministic for a seed, valid, and showing by
// construction the attention phenomena docs/EVAL.md promises — measured here with exact
// softmax attention of the decode queries over the prompt keys.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "tools/eval/workload.h"

namespace ke = kvcache::eval;
using kvcache::Modality;

namespace {

ke::SyntheticSpec SmallSpec() {
  ke::SyntheticSpec s;
  s.num_layers = 8;
  s.num_kv_heads = 2;
  s.num_q_heads = 8;
  s.head_dim = 64;
  s.system_tokens = 20;
  s.image_tokens = 400;
  s.image_tiles = 4;
  s.question_tokens = 32;
  s.decode_steps = 8;
  return s;
}

// Attention probabilities of decode query (step t, q head qh) of layer l over the prompt.
std::vector<double> Attention(const ke::Workload& w, int l, int t, int qh) {
  const int D = w.head_dim, H = w.num_kv_heads, G = w.num_q_heads / H, h = qh / G;
  const float* q = &w.decode_queries[l][(static_cast<size_t>(t) * w.num_q_heads + qh) * D];
  std::vector<double> p(w.prompt_len);
  double m = -1e300;
  for (int j = 0; j < w.prompt_len; ++j) {
    const float* k = &w.keys[l][(static_cast<size_t>(j) * H + h) * D];
    double dot = 0;
    for (int c = 0; c < D; ++c) dot += double{q[c]} * k[c];
    p[j] = dot / std::sqrt(static_cast<double>(D));
    m = std::max(m, p[j]);
  }
  double z = 0;
  for (double& x : p) z += (x = std::exp(x - m));
  for (double& x : p) x /= z;
  return p;
}

struct LayerStats {
  double sink = 0, image = 0, k90 = 0;  // means over steps and q heads
};

std::vector<LayerStats> Measure(const ke::Workload& w) {
  std::vector<LayerStats> out(w.num_layers);
  const double count = static_cast<double>(w.decode_steps) * w.num_q_heads;
  for (int l = 0; l < w.num_layers; ++l) {
    for (int t = 0; t < w.decode_steps; ++t) {
      for (int qh = 0; qh < w.num_q_heads; ++qh) {
        std::vector<double> p = Attention(w, l, t, qh);
        out[l].sink += p[0] / count;
        double img = 0;
        for (int j = 0; j < w.prompt_len; ++j) {
          if (w.modalities[j] == Modality::kImage) img += p[j];
        }
        out[l].image += img / count;
        std::sort(p.rbegin(), p.rend());
        double acc = 0;
        int k = 0;
        while (acc < 0.9 && k < w.prompt_len) acc += p[k++];
        out[l].k90 += k / count;
      }
    }
  }
  return out;
}

double Cosine(const float* a, const float* b, int n) {
  double ab = 0, aa = 0, bb = 0;
  for (int i = 0; i < n; ++i) {
    ab += double{a[i]} * b[i];
    aa += double{a[i]} * a[i];
    bb += double{b[i]} * b[i];
  }
  return ab / std::sqrt(aa * bb);
}

// Mean over tokens of `m` of the cosine similarity to their nearest other token of `m`.
double NearestNeighbourCosine(const ke::Workload& w, int l, int h, Modality m) {
  const int D = w.head_dim, H = w.num_kv_heads;
  std::vector<int> idx;
  for (int j = 1; j < w.prompt_len; ++j) {  // skip the sink
    if (w.modalities[j] == m) idx.push_back(j);
  }
  double sum = 0;
  for (int a : idx) {
    double best = -1;
    for (int b : idx) {
      if (a == b) continue;
      best = std::max(best, Cosine(&w.keys[l][(static_cast<size_t>(a) * H + h) * D],
                                   &w.keys[l][(static_cast<size_t>(b) * H + h) * D], D));
    }
    sum += best;
  }
  return sum / idx.size();
}

}  // namespace

TEST_CASE("Synthetic workload: deterministic for a seed, valid, LLaVA-shaped", "[eval][workload]") {
  auto a = ke::GenerateWorkload(SmallSpec());
  auto b = ke::GenerateWorkload(SmallSpec());
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  REQUIRE(a->Validate().ok());
  CHECK(a->keys == b->keys);
  CHECK(a->values == b->values);
  CHECK(a->queries == b->queries);
  CHECK(a->decode_queries == b->decode_queries);
  CHECK(a->decode_keys == b->decode_keys);
  CHECK(a->decode_values == b->decode_values);
  CHECK(a->modalities == b->modalities);
  ke::SyntheticSpec other = SmallSpec();
  other.seed = 2;
  auto c = ke::GenerateWorkload(other);
  REQUIRE(c.ok());
  CHECK(c->keys != a->keys);
  CHECK(c->decode_queries != a->decode_queries);

  CHECK(a->prompt_len == 20 + 400 + 32);
  CHECK(a->CountModality(Modality::kImage) == 400);
  CHECK(a->query_rows == 32);
  CHECK(a->query_positions.front() == a->prompt_len - 32);
  CHECK(a->decode_positions.front() == a->prompt_len);

  // The default spec is the documented default scale.
  ke::SyntheticSpec def;
  CHECK(def.num_layers == 32);
  CHECK(def.num_kv_heads == 8);
  CHECK(def.num_q_heads == 32);
  CHECK(def.head_dim == 128);
  CHECK(def.image_tokens == 2880);
}

TEST_CASE("Synthetic workload: bad knobs are named", "[eval][workload]") {
  ke::SyntheticSpec s = SmallSpec();
  s.num_q_heads = 7;
  auto r = ke::GenerateWorkload(s);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(r.status().message()).find("q-heads=7") != std::string::npos);
  s = SmallSpec();
  s.head_dim = 8;
  CHECK(std::string(ke::GenerateWorkload(s).status().message()).find("head-dim=8") !=
        std::string::npos);
  s = SmallSpec();
  s.image_tokens = 2;  // fewer than the 4 tiles
  CHECK_FALSE(ke::GenerateWorkload(s).ok());
}

TEST_CASE("Synthetic workload shows sinks, fading image attention, varied sparsity, redundancy",
          "[eval][workload][phenomena]") {
  auto w = ke::GenerateWorkload(SmallSpec());
  REQUIRE(w.ok());
  const std::vector<LayerStats> st = Measure(*w);
  const int L = w->num_layers;
  for (int l = 0; l < L; ++l) {
    INFO("layer " << l << " sink " << st[l].sink << " image " << st[l].image << " k90 "
                  << st[l].k90);
    CHECK(true);
  }
  // 1. Attention sinks: from layer 2 on the BOS token (one of 452) takes a large share.
  for (int l = 2; l < L; ++l) {
    INFO("layer " << l << " sink mass " << st[l].sink);
    CHECK(st[l].sink > 0.2);
  }
  CHECK(st[0].sink < 0.05);  // the first layers have no sink

  // 2. Image tokens (88% of the prompt) receive little attention in deep layers.
  const double early = (st[0].image + st[1].image) / 2;
  const double late = (st[L - 2].image + st[L - 1].image) / 2;
  INFO("image share early " << early << " late " << late);
  CHECK(early > 0.5);
  CHECK(late < 0.1);
  CHECK(late < early / 5);

  // 3. Layers differ in sparsity: tokens needed for 90% of the mass vary widely by layer.
  double kmin = 1e9, kmax = 0;
  for (int l = 2; l < L; ++l) {
    kmin = std::min(kmin, st[l].k90);
    kmax = std::max(kmax, st[l].k90);
  }
  INFO("k90 over layers >= 2: min " << kmin << " max " << kmax << ", layer 0: " << st[0].k90);
  CHECK(kmax > 2 * kmin);
  CHECK(st[0].k90 > kmax);  // the diffuse first layer is the densest

  // 4. Redundancy: each image key has a near duplicate (same patch prototype); text keys don't.
  for (int l : {0, L - 1}) {
    const double img = NearestNeighbourCosine(*w, l, 0, Modality::kImage);
    const double txt = NearestNeighbourCosine(*w, l, 0, Modality::kText);
    INFO("layer " << l << " nearest-neighbour cosine image " << img << " text " << txt);
    CHECK(img > 0.9);
    CHECK(txt < img - 0.2);
  }
}
