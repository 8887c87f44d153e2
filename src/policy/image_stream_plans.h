// Per-stream planning of the vision policies (PruMerge, downsample, DivPrune), shared: every
// (layer, kv head) stream is planned on its own, in parallel (ForEachStream), into its slot; the
// slots are then read in (layer, kv head) order, so the plan and the first error are the serial
// ones. Internal to the policy pipeline.
#ifndef KVCACHE_SRC_POLICY_IMAGE_STREAM_PLANS_H_
#define KVCACHE_SRC_POLICY_IMAGE_STREAM_PLANS_H_

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kvcache/plan.h"
#include "kvcache/policy/snapshot.h"
#include "src/policy/similarity.h"

namespace kvcache::policy {

// plan_stream(layer, kv_head, saw_image) -> StatusOr<optional<StreamPlan>>: the stream's plan,
// or nullopt when it keeps every token; sets saw_image (uint8_t&) when the stream has image
// tokens. Appends the stream plans to `plan` in stream order and notes in plan.policy when no
// stream had an image token (the policy was a no-op).
template <typename PlanStreamFn>
absl::Status CollectImageStreamPlans(const SequenceSnapshot& snap, PlanStreamFn&& plan_stream,
                                     EvictionPlan& plan) {
  const int32_t streams = snap.num_layers * snap.num_kv_heads;
  std::vector<absl::StatusOr<std::optional<StreamPlan>>> planned(streams, std::nullopt);
  std::vector<uint8_t> visual(streams, 0);
  ForEachStream(streams, [&](int32_t i) {
    planned[i] = plan_stream(i / snap.num_kv_heads, i % snap.num_kv_heads, visual[i]);
  });
  bool any_visual = false;
  for (int32_t i = 0; i < streams; ++i) {
    if (!planned[i].ok()) return planned[i].status();
    any_visual = any_visual || visual[i];
    if (planned[i]->has_value()) plan.streams.push_back(std::move(**planned[i]));
  }
  if (!any_visual) absl::StrAppend(&plan.policy, " (no image tokens: no-op)");
  return absl::OkStatus();
}

}  // namespace kvcache::policy

#endif  // KVCACHE_SRC_POLICY_IMAGE_STREAM_PLANS_H_
