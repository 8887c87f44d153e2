// LOOK-M-style merge of evicted tokens into their most similar kept key.
#include "kvcache/policy/merge.h"

#include <cmath>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "src/policy/similarity.h"

namespace kvcache::policy {

absl::Status CheckLookMInputs(const StreamSnapshot& stream, int32_t head_dim, int32_t layer,
                              int32_t kv_head) {
  if (stream.keys.size() != static_cast<size_t>(stream.length()) * static_cast<size_t>(head_dim)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "LOOK-M merge of stream (layer ", layer, ", kv_head ", kv_head,
        ") needs its keys; collect the snapshot with keys"));
  }
  return absl::OkStatus();
}

absl::Status AddLookMMerges(const StreamSnapshot& stream, int32_t head_dim, MergeMode mode,
                            StreamPlan& plan) {
  if (mode == MergeMode::kNone) return absl::OkStatus();
  const int32_t n = stream.length();
  const size_t d = static_cast<size_t>(head_dim);
  if (absl::Status s = CheckLookMInputs(stream, head_dim, plan.layer, plan.kv_head); !s.ok()) {
    return s;
  }
  const int32_t kept = static_cast<int32_t>(plan.kept.size());
  if (kept == 0 || kept == n) return absl::OkStatus();
  // Unit keys, so a dot product is the cosine similarity (a zero key stays zero: similarity 0).
  thread_local std::vector<float> unit;  // reused across calls (streams of one thread)
  UnitRowsInto(stream.keys, d, unit);
  std::vector<uint8_t> is_kept(n, 0);
  for (int32_t j : plan.kept) is_kept[j] = 1;
  std::vector<int32_t> evicted;
  evicted.reserve(n - kept);
  for (int32_t e = 0; e < n; ++e) {
    if (!is_kept[e]) evicted.push_back(e);
  }
  // Most similar kept slot of each evicted token: strict maximum, ties keep the earlier slot, NaN
  // never wins (similarity.h: blocked search, equal to the per-pair loop).
  std::vector<int32_t> nearest(evicted.size());
  NearestRows(unit, d, evicted, plan.kept, nearest);
  std::vector<int32_t> target(n, -1), count(kept, 0);
  for (size_t i = 0; i < evicted.size(); ++i) {
    target[evicted[i]] = nearest[i];
    ++count[nearest[i]];
  }
  plan.kept_key_weight.assign(kept, 1.0f);
  plan.kept_value_weight.assign(kept, 1.0f);
  for (int32_t s = 0; s < kept; ++s) {
    if (count[s] == 0) continue;
    const float w = mode == MergeMode::kPivot ? 0.5f : 1.0f / static_cast<float>(count[s] + 1);
    plan.kept_key_weight[s] = w;
    plan.kept_value_weight[s] = w;
  }
  for (int32_t e = 0; e < n; ++e) {
    if (target[e] < 0) continue;
    const int32_t m = count[target[e]];
    const float w = mode == MergeMode::kPivot ? 0.5f / static_cast<float>(m)
                                              : 1.0f / static_cast<float>(m + 1);
    plan.merges.push_back({.kept_slot = target[e], .source = e, .key_weight = w, .value_weight = w});
  }
  return absl::OkStatus();
}

}  // namespace kvcache::policy
