// tools/eval/trace.h — reads a recorded workload (a "trace") from a directory.
//
// Format (docs/EVAL.md, "Trace format"): DIR/manifest.json names the model, the shape
// (num_layers, num_kv_heads, num_q_heads, head_dim, prompt_len, decode_steps, query_rows) and
// the .npy files: positions [prompt_len] (int32/int64), modalities [prompt_len] (uint8/int32,
// 0 text 1 image 2 video 3 audio), optional decode_positions [decode_steps], and per layer
// keys/values [prompt_len, kv_heads, D], queries [query_rows, q_heads, D] (the last query_rows
// prompt rows), decode_queries [decode_steps, q_heads, D], decode_keys/decode_values
// [decode_steps, kv_heads, D] (float32 or float16). Every problem is an error naming the file.
//
// Example:
//   absl::StatusOr<kvcache::eval::Workload> w = kvcache::eval::LoadTrace("traces/llava");
//   if (!w.ok()) std::cerr << w.status().message();  // "traces/llava/layer_003_keys.npy: ..."
#ifndef KVCACHE_TOOLS_EVAL_TRACE_H_
#define KVCACHE_TOOLS_EVAL_TRACE_H_

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "tools/eval/workload.h"

namespace kvcache::eval {

// Parses manifest.json text and loads the files it names from `dir`.
[[nodiscard]] absl::StatusOr<Workload> LoadTrace(const std::string& dir);

// Writes `w` as a trace (manifest.json + float32 .npy files) into `dir` (created if needed).
[[nodiscard]] absl::Status WriteTrace(const Workload& w, const std::string& dir);

}  // namespace kvcache::eval

#endif  // KVCACHE_TOOLS_EVAL_TRACE_H_
