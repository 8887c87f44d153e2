// engine_loop — what an inference engine's scheduler does with kvcache, step by step.
//
// Built against the INSTALLED package (examples/engine_loop/CMakeLists.txt: find_package(kvcache
// CONFIG REQUIRED)); the model is simulated by random K/V and queries, everything else is the
// real call sequence of docs/INTEGRATION.md:
//   prefill:  Append(seq, layer, prompt K/V, positions, modalities) for every layer, and
//             ScoreRows(last prompt rows, accumulate) so heavy-hitter scores start from the prompt
//   decode:   per step PrepareDecode(batch) once (the host work of the step), then per layer
//             Append one token per sequence and one DecodeAttention(plan, layer,
//             accumulate_scores = true) -> the attention output for the model
//   every N steps: per sequence CreatePolicy -> CollectSnapshot -> Plan -> Apply (H2O here,
//             driven by the accumulated scores), freeing pages while the sequence keeps decoding.
// Exit code 0 when every call succeeded, every output was finite, each compression freed pages
// and the cache validates at the end.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "kvcache/kvcache.h"
#include "kvcache/policy/registry.h"
#include "kvcache/policy/snapshot.h"

namespace {

constexpr int32_t kLayers = 4, kKvHeads = 2, kQHeads = 8, kDim = 64;
constexpr int32_t kBatch = 4, kSteps = 48, kCompressEvery = 16, kObservedRows = 8;
constexpr const char* kPolicy = "h2o:heavy=0.25,recent=0.15";

bool Ok(const absl::Status& s, const char* what) {
  if (!s.ok()) std::fprintf(stderr, "%s failed: %s\n", what, std::string(s.message()).c_str());
  return s.ok();
}

void Fill(std::vector<float>& v, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  for (float& x : v) x = nd(rng);
}

}  // namespace

int main() {
  kvcache::CacheConfig cfg;
  cfg.num_layers = kLayers;
  cfg.num_kv_heads = kKvHeads;
  cfg.num_q_heads = kQHeads;
  cfg.head_dim = kDim;
  cfg.dtype = kvcache::DType::kF16;
  cfg.page_tokens = 16;
  cfg.num_pages = 4096;
  auto created = kvcache::Cache::Create(cfg, "cpu");
  if (!Ok(created.status(), "Cache::Create")) return 1;
  kvcache::Cache& cache = **created;
  std::mt19937 rng(2024);

  // Prefill: a LLaVA-style prompt per request (text, image tokens, question), lengths differ.
  std::vector<kvcache::SequenceId> batch;
  std::vector<int32_t> next_position;
  for (int b = 0; b < kBatch; ++b) {
    auto seq = cache.AddSequence();
    if (!Ok(seq.status(), "AddSequence")) return 1;
    batch.push_back(*seq);
    const int32_t text = 12 + 4 * b, image = 96, question = 16;
    const int32_t n = text + image + question;
    std::vector<int32_t> positions(n);
    std::vector<kvcache::Modality> modalities(n, kvcache::Modality::kText);
    for (int32_t t = 0; t < n; ++t) {
      positions[t] = t;
      if (t >= text && t < text + image) modalities[t] = kvcache::Modality::kImage;
    }
    std::vector<int32_t> observed(positions.end() - kObservedRows, positions.end());
    for (int32_t layer = 0; layer < kLayers; ++layer) {
      std::vector<float> k(static_cast<size_t>(n) * kKvHeads * kDim), v(k.size());
      Fill(k, rng);
      Fill(v, rng);
      kvcache::AppendRequest req{.keys = kvcache::TensorRef::Of(k),
                                 .values = kvcache::TensorRef::Of(v),
                                 .positions = positions,
                                 .modalities = modalities};
      if (!Ok(cache.Append(*seq, layer, req), "Append (prefill)")) return 1;
      // The model's queries of the last prompt rows (post-RoPE) seed the score accumulators.
      std::vector<float> q(static_cast<size_t>(kObservedRows) * kQHeads * kDim);
      Fill(q, rng);
      kvcache::ScoreRequest score{.queries = q, .positions = observed, .accumulate = true};
      if (!Ok(cache.ScoreRows(*seq, layer, score).status(), "ScoreRows")) return 1;
    }
    next_position.push_back(n);
  }
  std::printf("prefill: %d sequences, %d pages used, %lld tokens\n", kBatch,
              cache.Stats().pages_used, static_cast<long long>(cache.Stats().tokens_stored));

  auto policy = kvcache::policy::CreatePolicy(kPolicy);
  if (!Ok(policy.status(), "CreatePolicy")) return 1;

  std::vector<float> q(static_cast<size_t>(kBatch) * kQHeads * kDim), out(q.size());
  std::vector<float> lse(static_cast<size_t>(kBatch) * kQHeads);
  std::vector<float> k(static_cast<size_t>(kKvHeads) * kDim), v(k.size());
  kvcache::DecodeOptions decode{.accumulate_scores = true};
  for (int step = 1; step <= kSteps; ++step) {
    // Plan once per step; the per-layer calls see the tokens appended after it.
    absl::StatusOr<kvcache::DecodePlan> step_plan = cache.PrepareDecode(batch);
    if (!Ok(step_plan.status(), "PrepareDecode")) return 1;
    for (int32_t layer = 0; layer < kLayers; ++layer) {
      // The new token's K/V of this layer for every sequence, then one batched attention call.
      for (int b = 0; b < kBatch; ++b) {
        Fill(k, rng);
        Fill(v, rng);
        const int32_t position[1] = {next_position[b]};
        kvcache::AppendRequest req{.keys = kvcache::TensorRef::Of(k),
                                   .values = kvcache::TensorRef::Of(v),
                                   .positions = position};
        if (!Ok(cache.Append(batch[b], layer, req), "Append (decode)")) return 1;
      }
      Fill(q, rng);
      if (!Ok(cache.DecodeAttention(*step_plan, layer, q, out, lse, decode), "DecodeAttention")) {
        return 1;
      }
      for (float x : out) {
        if (!std::isfinite(x)) {
          std::fprintf(stderr, "non-finite attention output at step %d layer %d\n", step, layer);
          return 1;
        }
      }
    }
    for (int32_t& p : next_position) ++p;

    if (step % kCompressEvery == 0) {
      const kvcache::CacheStats before = cache.Stats();
      for (kvcache::SequenceId seq : batch) {
        // No observation queries: H2O ranks by the accumulators the kernels filled. The stamp
        // makes the Apply refuse a plan that an Append in between would have made stale.
        auto stamp = cache.Stamp(seq);
        if (!Ok(stamp.status(), "Stamp")) return 1;
        auto snap = kvcache::policy::CollectSnapshot(cache, seq, {}, (*policy)->Needs());
        if (!Ok(snap.status(), "CollectSnapshot")) return 1;
        auto plan = (*policy)->Plan(*snap);
        if (!Ok(plan.status(), "Plan")) return 1;
        if (!Ok(cache.ApplyIfCurrent(*plan, *stamp), "ApplyIfCurrent")) return 1;
      }
      const kvcache::CacheStats after = cache.Stats();
      std::printf("step %3d: %-28s pages %5d -> %5d   tokens %6lld -> %6lld\n", step, kPolicy,
                  before.pages_used, after.pages_used,
                  static_cast<long long>(before.tokens_stored),
                  static_cast<long long>(after.tokens_stored));
      if (after.pages_used >= before.pages_used) {
        std::fprintf(stderr, "compression freed no pages\n");
        return 1;
      }
    }
  }
  if (!Ok(cache.Validate(), "Validate")) return 1;
  for (kvcache::SequenceId seq : batch) {
    if (!Ok(cache.Free(seq), "Free")) return 1;
  }
  if (cache.Stats().pages_used != 0) {
    std::fprintf(stderr, "pages still used after freeing every sequence\n");
    return 1;
  }
  std::printf("engine_loop ok: %d steps x %d layers x %d sequences\n", kSteps, kLayers, kBatch);
  return 0;
}
