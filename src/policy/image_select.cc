// Image-token selection baselines as cache policies: downsample and divprune.
#include "kvcache/policy/image_select.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvcache/policy/select.h"
#include "src/policy/image_stream_plans.h"
#include "src/policy/similarity.h"

namespace kvcache::policy {
namespace {

absl::Status CheckOptions(const char* who, const ImageSelectOptions& o) {
  if (!(o.keep > 0.0 && o.keep <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat(who, ": keep=", o.keep, " is outside (0, 1]"));
  }
  if (!(o.ratio >= 0.0 && o.ratio <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": ratio=", o.ratio, " is outside [0, 1] (0 = derive from keep)"));
  }
  return absl::OkStatus();
}

struct ImageRun {
  int32_t begin = 0, end = 0;  // stream indices [begin, end)
};

std::vector<ImageRun> ImageRuns(std::span<const Modality> modalities) {
  std::vector<ImageRun> runs;
  const int32_t n = static_cast<int32_t>(modalities.size());
  for (int32_t a = 0; a < n;) {
    if (!IsVisual(modalities[a])) {
      ++a;
      continue;
    }
    int32_t b = a;
    while (b < n && IsVisual(modalities[b])) ++b;
    runs.push_back({a, b});
    a = b;
  }
  return runs;
}

// Chooses `k` tokens of one image: indices into [0, run.end - run.begin), any order.
using RunSelector = std::function<absl::StatusOr<std::vector<int32_t>>(
    const SequenceSnapshot& snap, const StreamSnapshot& st, ImageRun run, int32_t k)>;

class ImageSelectPolicy final : public Policy {
 public:
  ImageSelectPolicy(std::string name, ImageSelectOptions o, bool needs_keys, RunSelector select)
      : name_(std::move(name)), o_(o), needs_keys_(needs_keys), select_(std::move(select)) {}

  std::string_view name() const override { return name_; }
  std::string Describe() const override {
    return o_.ratio > 0.0 ? absl::StrCat(name_, " ratio=", o_.ratio)
                          : absl::StrCat(name_, " keep=", o_.keep, " (share of prompt KV)");
  }
  SnapshotRequest Needs() const override {
    SnapshotRequest r;
    r.keys = needs_keys_;
    return r;
  }

  absl::StatusOr<EvictionPlan> Plan(const SequenceSnapshot& snap) const override {
    if (absl::Status s = snap.Validate(); !s.ok()) return Bad(s.message());
    if (snap.MaxLength() == 0) return Bad("empty sequence (every stream has 0 tokens)");
    EvictionPlan plan;
    plan.sequence = snap.sequence;
    plan.policy = Describe();
    // Streams are planned independently, in parallel (image_stream_plans.h).
    if (absl::Status s = CollectImageStreamPlans(
            snap,
            [&](int32_t l, int32_t h, uint8_t& visual) { return PlanStream(snap, l, h, visual); },
            plan);
        !s.ok()) {
      return s;
    }
    return plan;
  }

 private:
  absl::Status Bad(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": ", what));
  }

  absl::StatusOr<std::optional<StreamPlan>> PlanStream(const SequenceSnapshot& snap, int32_t l,
                                                       int32_t h, uint8_t& any_visual) const {
    const StreamSnapshot& st = snap.stream(l, h);
    const std::vector<ImageRun> runs = ImageRuns(st.modalities);
    if (runs.empty()) return std::nullopt;
    any_visual = 1;
    if (needs_keys_ && st.keys.size() != static_cast<size_t>(st.length()) * snap.head_dim) {
      return absl::FailedPreconditionError(absl::StrCat(
          name_, ": stream (layer ", l, ", kv_head ", h, ") has no keys in the snapshot"));
    }
    std::vector<int32_t> sizes;
    for (const ImageRun& r : runs) sizes.push_back(r.end - r.begin);
    absl::StatusOr<std::vector<int32_t>> budgets = ImageTokenBudgets(st.length(), sizes, o_);
    if (!budgets.ok()) return Bad(budgets.status().message());
    std::vector<uint8_t> keep(st.length(), 1);
    for (size_t r = 0; r < runs.size(); ++r) {
      absl::StatusOr<std::vector<int32_t>> picked = select_(snap, st, runs[r], (*budgets)[r]);
      if (!picked.ok()) return Bad(picked.status().message());
      for (int32_t j = runs[r].begin; j < runs[r].end; ++j) keep[j] = 0;
      for (int32_t i : *picked) keep[runs[r].begin + i] = 1;
    }
    StreamPlan sp;
    sp.layer = l;
    sp.kv_head = h;
    for (int32_t j = 0; j < st.length(); ++j) {
      if (keep[j]) sp.kept.push_back(j);
    }
    if (static_cast<int32_t>(sp.kept.size()) == st.length()) return std::nullopt;
    return sp;
  }

  std::string name_;
  ImageSelectOptions o_;
  bool needs_keys_;
  RunSelector select_;
};

}  // namespace

absl::StatusOr<std::vector<int32_t>> ImageTokenBudgets(int32_t n,
                                                       std::span<const int32_t> image_sizes,
                                                       const ImageSelectOptions& o) {
  if (absl::Status s = CheckOptions("ImageTokenBudgets", o); !s.ok()) return s;
  int64_t total = 0;
  for (int32_t s : image_sizes) {
    if (s < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("ImageTokenBudgets: an image of ", s, " tokens"));
    }
    total += s;
  }
  if (total > n) {
    return absl::InvalidArgumentError(absl::StrCat("ImageTokenBudgets: ", total,
                                                   " image tokens in a stream of ", n));
  }
  double ratio = o.ratio;
  if (ratio == 0.0 && total > 0) {
    // Text is kept: the image tokens get what keep * n leaves after it.
    const double text = static_cast<double>(n - total);
    ratio = std::clamp((o.keep * n - text) / static_cast<double>(total), 0.0, 1.0);
  }
  std::vector<int32_t> out;
  out.reserve(image_sizes.size());
  for (int32_t s : image_sizes) {
    out.push_back(std::clamp<int32_t>(static_cast<int32_t>(std::lround(ratio * s)), 1, s));
  }
  return out;
}

std::vector<int32_t> DownsampleIndices(int32_t n, int32_t k) {
  std::vector<int32_t> out(k);
  for (int32_t i = 0; i < k; ++i) {
    out[i] = static_cast<int32_t>(static_cast<int64_t>(i) * n / k);
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Policy>> MakeDownsamplePolicy(const ImageSelectOptions& options) {
  if (absl::Status s = CheckOptions("downsample", options); !s.ok()) return s;
  return std::unique_ptr<Policy>(new ImageSelectPolicy(
      "downsample", options, /*needs_keys=*/false,
      [](const SequenceSnapshot&, const StreamSnapshot&, ImageRun run,
         int32_t k) -> absl::StatusOr<std::vector<int32_t>> {
        return DownsampleIndices(run.end - run.begin, k);
      }));
}

absl::StatusOr<std::unique_ptr<Policy>> MakeDivPrunePolicy(const ImageSelectOptions& options) {
  if (absl::Status s = CheckOptions("divprune", options); !s.ok()) return s;
  return std::unique_ptr<Policy>(new ImageSelectPolicy(
      "divprune", options, /*needs_keys=*/true,
      [](const SequenceSnapshot& snap, const StreamSnapshot& st, ImageRun run, int32_t k) {
        const size_t d = static_cast<size_t>(snap.head_dim);
        return DivPruneSelect(
            std::span<const float>(st.keys).subspan(run.begin * d, (run.end - run.begin) * d),
            snap.head_dim, k);
      }));
}

}  // namespace kvcache::policy
