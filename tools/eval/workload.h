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

// Knobs of the synthetic generator. The defaults are the documented default scale (a LLaVA-1.6-7B
// shape reduced in layers and image tokens so the default tool run takes about a minute on two
// cores); `--layers 32 --image-tokens 2880` gives the full LLaVA-1.6-7B prompt shape.
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
};

[[nodiscard]] absl::Status ValidateSpec(const SyntheticSpec& spec);
[[nodiscard]] absl::StatusOr<Workload> GenerateWorkload(const SyntheticSpec& spec);

}  // namespace kvcache::eval

#endif  // KVCACHE_TOOLS_EVAL_WORKLOAD_H_
