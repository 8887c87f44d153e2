// kvcache_demo — the paged store end to end, in one screen of output.
//
// A LLaVA-style prompt (system text, 576 image tokens, a question) is appended to a 4-layer cache,
// a second request forks the prompt (shared pages, copy-on-write), each layer keeps a different
// share of its image tokens (per-layer budgets free real pages), one layer keeps only half of its
// key channels (ThinK-style narrower rows), and decode attention runs over the compacted cache.
// The project's main demonstration is kvcache-eval (tools/eval, docs/EVAL.md); this example
// shows the store's mechanics.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kvcache/kvcache.h"

using namespace kvcache;

namespace {

void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s failed: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

void PrintUsage(const char* stage, const Cache& cache) {
  CacheStats st = cache.Stats();
  std::printf("%-44s pages %5d / %5d   %7.2f MiB   tokens %7lld\n", stage, st.pages_used,
              st.pages_total, st.bytes_used / 1048576.0, static_cast<long long>(st.tokens_stored));
}

}  // namespace

int main() {
  CacheConfig config;
  config.num_layers = 4;
  config.num_kv_heads = 4;
  config.num_q_heads = 16;
  config.head_dim = 128;
  config.dtype = DType::kF16;
  config.page_tokens = 16;
  config.num_pages = 2048;
  auto created = Cache::Create(config, "cpu");
  Check(created.status(), "Cache::Create");
  Cache& cache = **created;
  std::printf("kvcache %s demo — %s\n\n", VersionString(), config.DebugString().c_str());

  // Prompt: 32 system tokens, 576 image tokens, 24 question tokens.
  const int n_sys = 32, n_img = 576, n_txt = 24, n = n_sys + n_img + n_txt;
  std::vector<Modality> modality(n, Modality::kText);
  std::fill(modality.begin() + n_sys, modality.begin() + n_sys + n_img, Modality::kImage);
  std::vector<int32_t> positions(n);
  for (int i = 0; i < n; ++i) positions[i] = i;
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  const size_t elems = size_t(n) * config.num_kv_heads * config.head_dim;
  std::vector<float> k(elems), v(elems);

  SequenceId prompt = *cache.AddSequence();
  for (int layer = 0; layer < config.num_layers; ++layer) {
    for (auto& x : k) x = normal(rng);
    for (auto& x : v) x = normal(rng);
    Check(cache.Append(prompt, layer, {TensorRef::Of(k), TensorRef::Of(v), positions, modality}),
          "Append");
  }
  PrintUsage("prefill (632 tokens x 4 layers x 4 heads)", cache);

  SequenceId request = *cache.Fork(prompt);
  PrintUsage("fork for a second request (shared pages)", cache);

  // Per-layer image budgets: deeper layers keep fewer image tokens (VL-Cache's observation that
  // deep layers attend little to images); text is never evicted. Layer 3 also keeps only 64 of
  // 128 key channels for all but the 32 most recent tokens.
  const double image_keep[] = {1.0, 0.5, 0.2, 0.1};
  EvictionPlan plan{.sequence = request, .policy = "demo: per-layer image budget"};
  for (int layer = 0; layer < config.num_layers; ++layer) {
    for (int h = 0; h < config.num_kv_heads; ++h) {
      StreamPlan sp{.layer = layer, .kv_head = h};
      const int keep_img = static_cast<int>(std::lround(image_keep[layer] * n_img));
      for (int t = 0; t < n; ++t) {
        const bool image = modality[t] == Modality::kImage;
        // Keep an evenly spread subset of image tokens (a stand-in for a real score).
        if (!image || (t - n_sys) * keep_img / n_img != (t - n_sys + 1) * keep_img / n_img) {
          sp.kept.push_back(t);
        }
      }
      if (layer == 3) {
        for (int c = 0; c < config.head_dim; c += 2) sp.key_channels.push_back(c);
        sp.full_width_recent = 32;
      }
      plan.streams.push_back(std::move(sp));
    }
  }
  const int free_before = cache.pool().NumFree();
  Check(cache.Apply(plan), "Apply");
  PrintUsage("compress the fork (image budget 100/50/20/10%)", cache);
  std::printf("  fresh pages written by the compaction: %d (layer 0 kept everything and still\n"
              "  shares the prompt's pages; the other layers' originals stay with the prompt)\n",
              free_before - cache.pool().NumFree());
  for (int layer = 0; layer < config.num_layers; ++layer) {
    StreamContents sc = *cache.ReadStream(request, layer, 0, /*with_kv=*/false);
    int per_modality[kNumModalities] = {};
    for (Modality m : sc.modalities) ++per_modality[static_cast<int>(m)];
    std::printf("  layer %d head 0: %4d tokens (%3d text, %3d image), %d segment(s), key width %d\n",
                layer, sc.length, per_modality[0], per_modality[1], sc.num_segments,
                sc.key_width.empty() ? 0 : sc.key_width.front());
  }

  Check(cache.Free(prompt), "Free");
  PrintUsage("free the original prompt", cache);

  // Decode attention over the compacted fork, with score accumulation.
  std::vector<float> q(size_t(config.num_q_heads) * config.head_dim), out(q.size());
  for (auto& x : q) x = normal(rng);
  std::vector<SequenceId> batch{request};
  DecodeOptions options;
  options.accumulate_scores = true;
  for (int layer = 0; layer < config.num_layers; ++layer) {
    Check(cache.DecodeAttention(batch, layer, q, out, {}, options), "DecodeAttention");
  }
  StreamContents sc = *cache.ReadStream(request, 3, 0, false);
  double total = 0;
  for (float s : sc.scores) total += s;
  std::printf("\ndecode step over 4 layers: out[0..3] = %.4f %.4f %.4f %.4f\n", out[0], out[1],
              out[2], out[3]);
  std::printf("accumulated attention mass of layer 3, head 0: %.4f (one step, mean over the "
              "GQA group: 1)\n", total);
  Check(cache.Validate(), "Validate");
  std::printf("invariants: ok\n");
  return 0;
}
