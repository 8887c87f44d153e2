// SequenceSnapshot helpers (pure; CollectSnapshot lives in collect.cc so pure users never link
// the Cache).
#include "kvcache/policy/snapshot.h"

#include <algorithm>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvcache/policy/select.h"

namespace kvcache::policy {

SequenceSnapshot SequenceSnapshot::Make(int32_t num_layers, int32_t num_kv_heads,
                                        int32_t num_q_heads, int32_t head_dim) {
  SequenceSnapshot s;
  s.num_layers = num_layers;
  s.num_kv_heads = num_kv_heads;
  s.num_q_heads = num_q_heads;
  s.head_dim = head_dim;
  s.streams.resize(static_cast<size_t>(std::max(0, num_layers)) * std::max(0, num_kv_heads));
  s.layers.resize(std::max(0, num_layers));
  return s;
}

int32_t SequenceSnapshot::MaxLength() const {
  int32_t n = 0;
  for (const StreamSnapshot& s : streams) n = std::max(n, s.length());
  return n;
}

absl::Status SequenceSnapshot::Validate() const {
  if (num_layers < 1 || num_kv_heads < 1 || num_q_heads < num_kv_heads ||
      num_q_heads % num_kv_heads != 0 || head_dim < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "snapshot shape: layers ", num_layers, ", kv_heads ", num_kv_heads, ", q_heads ",
        num_q_heads, ", head_dim ", head_dim, " (q_heads must be a multiple of kv_heads)"));
  }
  if (streams.size() != static_cast<size_t>(num_layers) * num_kv_heads ||
      layers.size() != static_cast<size_t>(num_layers)) {
    return absl::InvalidArgumentError(absl::StrCat("snapshot has ", streams.size(), " streams and ",
                                                   layers.size(), " layers for shape ", num_layers,
                                                   " x ", num_kv_heads));
  }
  for (size_t i = 0; i < streams.size(); ++i) {
    const StreamSnapshot& s = streams[i];
    const size_t n = s.positions.size();
    const std::string where = absl::StrCat("snapshot stream (layer ", i / num_kv_heads,
                                           ", kv_head ", i % num_kv_heads, "): ");
    auto optional = [&](size_t size, size_t want, const char* field) -> absl::Status {
      if (size != 0 && size != want) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, field, " has ", size, " entries, expected ", want));
      }
      return absl::OkStatus();
    };
    for (const absl::Status& st :
         {optional(s.modalities.size(), n, "modalities"),
          optional(s.accumulated.size(), n, "accumulated"),
          optional(s.keys.size(), n * head_dim, "keys"),
          optional(s.window_scores.size(), n, "window_scores"),
          optional(s.post_vision_scores.size(), n, "post_vision_scores"),
          optional(s.last_row_scores.size(), n, "last_row_scores")}) {
      if (!st.ok()) return st;
    }
    for (size_t j = 1; j < n; ++j) {
      if (s.positions[j] <= s.positions[j - 1]) {
        return absl::InvalidArgumentError(absl::StrCat(where, "positions must ascend; positions[",
                                                       j, "] = ", s.positions[j]));
      }
    }
  }
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerSnapshot& ls = layers[l];
    if (ls.below_threshold.size() != ls.causal_entries.size() ||
        (!ls.below_threshold.empty() && ls.below_threshold.size() != size_t(num_q_heads))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "snapshot layer ", l, ": sparsity counts need ", num_q_heads, " entries each (have ",
          ls.below_threshold.size(), " and ", ls.causal_entries.size(), ")"));
    }
    if (ls.window_queries.size() !=
        static_cast<size_t>(ls.window_rows) * num_q_heads * head_dim) {
      return absl::InvalidArgumentError(absl::StrCat("snapshot layer ", l, ": window_queries has ",
                                                     ls.window_queries.size(), " values for ",
                                                     ls.window_rows, " rows"));
    }
  }
  if (image_score_positions.size() != image_scores.size()) {
    return absl::InvalidArgumentError(absl::StrCat("snapshot: ", image_scores.size(),
                                                   " image scores for ",
                                                   image_score_positions.size(), " positions"));
  }
  return absl::OkStatus();
}

void SnapshotRequest::Merge(const SnapshotRequest& o) {
  keys |= o.keys;
  window_rows = std::max(window_rows, o.window_rows);
  post_vision |= o.post_vision;
  sparsity |= o.sparsity;
  last_row |= o.last_row;
  query_rows = std::max(query_rows, o.query_rows);
}

}  // namespace kvcache::policy
