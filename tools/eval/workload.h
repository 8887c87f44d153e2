// tools/eval/workload.h — the inputs of one kvcache-eval run: a prompt's K/V per layer, the
// engine's observation queries, and the decode steps' queries/keys/values.
//
// A Workload comes either from the seeded synthetic generator below (shaped like LLaVA-1.6-7B,
// see docs/EVAL.md for how each attention phenomenon is produced) or from a recorded trace
// (trace.h). Every tensor is host f32; keys and queries are taken as post-RoPE.
//
// Example:
//   kvcache::eval::SyntheticSpec spec;          // defaults: the documented default scale
//   spec.num_layers = 4; spec.image_tokens = 96;
//   absl::StatusOr<kvcache::eval::Workload> w = kvcache::eval::GenerateWorkload(spec);
//   if (!w.ok()) { /* w.status().message() names the bad knob */ }
#ifndef KVCACHE_TOOLS_EVAL_WORKLOAD_H_
#define KVCACHE_TOOLS_EVAL_WORKLOAD_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvcache/types.h"

namespace kvcache::eval {

struct Workload {
  std::string model;  // provenance, e.g. "synthetic-llava-1.6-7b" or the trace's model name
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t num_q_heads = 0;
  int32_t head_dim = 0;
  int32_t prompt_len = 0;
  int32_t decode_steps = 0;
  int32_t query_rows = 0;  // observation rows: the last query_rows prompt positions

  std::vector<int32_t> positions;     // [prompt_len] strictly increasing
  std::vector<Modality> modalities;   // [prompt_len]
  std::vector<int32_t> query_positions;   // [query_rows] = the last query_rows of positions
  std::vector<int32_t> decode_positions;  // [decode_steps] > every prompt position, increasing

  // Per layer (outer index = layer).
  std::vector<std::vector<float>> keys;            // [layer][prompt_len, kv_heads, head_dim]
  std::vector<std::vector<float>> values;          // [layer][prompt_len, kv_heads, head_dim]
  std::vector<std::vector<float>> queries;         // [layer][query_rows, q_heads, head_dim]
  std::vector<std::vector<float>> decode_queries;  // [layer][decode_steps, q_heads, head_dim]
  std::vector<std::vector<float>> decode_keys;     // [layer][decode_steps, kv_heads, head_dim]
  std::vector<std::vector<float>> decode_values;   // [layer][decode_steps, kv_heads, head_dim]

  // Every size and ordering invariant above; the error names the field.
  [[nodiscard]] absl::Status Validate() const;
  int32_t CountModality(Modality m) const;
};

// Attention statistics the synthetic generator is calibrated to, per layer, for decode queries
// over the prompt (docs/EVAL.md cites the source of every default). Shares are of the prompt's
// attention mass; "non-sink" excludes the BOS token. Layers below `early_layers` (FastV's K) use
// the early_* values; from layer K on the image share fades linearly with depth to
// `image_floor` at depth `image_fade_end` (depth = layer / (L - 1)) with mean `image` over
// layers >= K. The generator DERIVES its logit biases from these targets and the token counts,
// so the statistics hold at any prompt length (a share s over N tokens gets bias ln(s / N)).
struct AttentionTargets {
  int32_t early_layers = 2;       // FastV's K: dense, sink-free layers
  double early_sink = 0.03;       // sink mass, layers < K
  double early_image = 0.56;      // image share, layers < K
  double early_k90 = 0.60;        // share of the prompt holding 90% of non-sink mass, layers < K
  double sink = 0.70;             // sink mass, layers >= K
  double anchor_share = 0.20;     // mass on the persistent text anchors, layers >= K
  int32_t anchors = 8;            // persistent heavy hitters per kv head (text anchors)
  double image = 0.033;           // mean image share over layers >= K
  double image_floor = 0.005;     // image share once the fade has ended
  double image_fade_end = 0.75;   // depth at which the image share reaches image_floor
  double k90 = 0.09;              // 90%-of-non-sink-mass share, layers >= K (per-layer centre)
  double k90_spread = 2.0;        // per layer, k90 x spread^u with u ~ U(-1, 1) (seeded)
  double near_duplicate = 0.30;   // share of image tokens with a near-duplicate key (cos >= 0.9)
  double persistence = 0.90;      // weight of a query head's persistent interest (0..1)
  double recency = 0.90;          // AR(1) coefficient of the fresh interest across rows (0..1)
};

// Named profiles: "llava" (the default, calibrated to published LLaVA-1.5/1.6 measurements) and
// "diffuse" (the pre-calibration workload's statistics at the default scale: weak sinks, image
// attention fading linearly, diffuse non-sink attention, heavy redundancy, no recency — a
// stress case). Error names the unknown profile.
[[nodiscard]] absl::StatusOr<AttentionTargets> ProfileTargets(const std::string& name);
std::vector<std::string> ProfileNames();

// Knobs of the synthetic generator. The defaults are the documented default scale: the full
// LLaVA-1.6-7B prompt shape (32 layers, 5 AnyRes tiles of 576 image tokens).
struct SyntheticSpec {
  uint64_t seed = 1;
  int32_t num_layers = 32;
  int32_t num_kv_heads = 8;
  int32_t num_q_heads = 32;
  int32_t head_dim = 128;
  int32_t system_tokens = 35;   // including the BOS token at position 0 (the attention sink)
  int32_t image_tokens = 2880;  // split evenly over image_tiles (remainder to the last tile)
  int32_t image_tiles = 5;      // LLaVA-1.6 AnyRes: one base image + 4 crops
  int32_t question_tokens = 64; // text after the image; also the observation query rows
  int32_t decode_steps = 32;
  std::string profile = "llava";  // provenance only; `targets` holds the values
  AttentionTargets targets;
};

// The targets of one layer as the generator realises them, and the derived tail scale.
struct LayerTargets {
  double sink = 0, anchor = 0, image = 0, text = 0;  // prompt-attention shares (sum 1)
  double k90 = 0;     // share of the prompt holding 90% of the non-sink mass (expected)
  double k90_requested = 0;  // the profile's value; k90 differs where it is unattainable
  double sigma = 0;   // derived: std of the content logits (log-normal tail)
  int32_t anchors = 0;  // anchor tokens actually placed
};
// Per layer, for the spec's token counts. Requires ValidateSpec(spec).ok().
LayerTargets TargetsForLayer(const SyntheticSpec& spec, int32_t layer);
// Expected share of the prompt holding 90% of the non-sink mass for the given shares, counts and
// tail scale (the formula the generator inverts); exposed for tests.
double ExpectedK90(const LayerTargets& t, int32_t anchors, int32_t image_count,
                   int32_t text_tail_count, int32_t prompt_len);

[[nodiscard]] absl::Status ValidateSpec(const SyntheticSpec& spec);
[[nodiscard]] absl::StatusOr<Workload> GenerateWorkload(const SyntheticSpec& spec);

}  // namespace kvcache::eval

#endif  // KVCACHE_TOOLS_EVAL_WORKLOAD_H_
