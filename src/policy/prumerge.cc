// LLaVA-PruMerge: IQR outlier selection + kNN merge, standalone and as a cache policy.
#include "kvcache/policy/prumerge.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvcache/policy/select.h"
#include "src/policy/image_stream_plans.h"
#include "src/policy/similarity.h"

namespace kvcache::policy {

double Percentile(std::span<const float> values, double p) {
  std::vector<double> v;
  v.reserve(values.size());
  for (float x : values) {
    if (x == x) v.push_back(x);
  }
  if (v.empty()) return std::nan("");
  const double pos = p * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(v.size() - 1, lo + 1);
  // The lo-th and hi-th smallest values (what a full sort would put there), in O(n).
  std::nth_element(v.begin(), v.begin() + lo, v.end());
  const double v_lo = v[lo];
  const double v_hi = hi == lo ? v_lo : *std::min_element(v.begin() + hi, v.end());
  return v_lo + (v_hi - v_lo) * (pos - static_cast<double>(lo));
}

absl::StatusOr<PruMergeSelection> PruMergeSelect(std::span<const float> scores,
                                                 std::span<const float> keys, int32_t key_dim,
                                                 const PruMergeOptions& o) {
  const int32_t n = static_cast<int32_t>(scores.size());
  if (n == 0) return absl::InvalidArgumentError("PruMerge: no tokens to select from");
  if (o.knn < 0) return absl::InvalidArgumentError(absl::StrCat("PruMerge: knn=", o.knn, " < 0"));
  if (o.merge && (key_dim < 1 || keys.size() != static_cast<size_t>(n) * key_dim)) {
    return absl::InvalidArgumentError(absl::StrCat("PruMerge: ", keys.size(),
                                                   " key values for ", n, " tokens of width ",
                                                   key_dim));
  }
  PruMergeSelection sel;
  sel.q1 = Percentile(scores, 0.25);
  sel.q3 = Percentile(scores, 0.75);
  sel.upper = sel.q3 + 1.5 * (sel.q3 - sel.q1);
  for (int32_t i = 0; i < n; ++i) {
    if (scores[i] > sel.upper) sel.outliers.push_back(i);  // NaN compares false: never kept
  }
  if (sel.outliers.empty()) {
    // At least one token survives: the best one (NaN lowest, earlier wins).
    std::vector<int32_t> index(n);
    std::iota(index.begin(), index.end(), 0);
    sel.outliers = TopK(scores, index, index, 1);
  }
  sel.kept = sel.outliers;
  if (o.plus) {
    const double ratio = static_cast<double>(sel.outliers.size()) / n;
    const int32_t step = std::max(1, static_cast<int32_t>(static_cast<int32_t>(1.0 / ratio) / 3));
    for (int32_t i = 0; i < n; i += step) sel.kept.push_back(i);
    std::sort(sel.kept.begin(), sel.kept.end());
    sel.kept.erase(std::unique(sel.kept.begin(), sel.kept.end()), sel.kept.end());
  }
  sel.merges.resize(sel.kept.size());
  if (!o.merge || o.knn == 0) return sel;
  const size_t d = static_cast<size_t>(key_dim);
  thread_local std::vector<float> unit;  // one image's unit keys, reused across calls
  UnitRowsInto(keys, d, unit);
  // A neighbour with a non-finite score would poison the merged row: it is not merged.
  std::vector<uint8_t> eligible(n);
  for (int32_t j = 0; j < n; ++j) eligible[j] = std::isfinite(scores[j]);
  const std::vector<std::vector<int32_t>> knn = TopKSimilarRows(unit, d, sel.kept, eligible, o.knn);
  for (size_t s = 0; s < sel.kept.size(); ++s) {
    for (int32_t j : knn[s]) sel.merges[s].push_back({.source = j, .weight = scores[j]});
  }
  return sel;
}

absl::StatusOr<ReducedTokens> PruMergeReduce(std::span<const float> features, int32_t channels,
                                             std::span<const float> scores,
                                             std::span<const float> keys, int32_t key_dim,
                                             const PruMergeOptions& o) {
  const size_t n = scores.size();
  if (channels < 1 || features.size() != n * channels) {
    return absl::InvalidArgumentError(absl::StrCat("PruMergeReduce: ", features.size(),
                                                   " feature values for ", n, " tokens of ",
                                                   channels, " channels"));
  }
  if (keys.empty()) {
    keys = features;
    key_dim = channels;
  }
  absl::StatusOr<PruMergeSelection> sel = PruMergeSelect(scores, keys, key_dim, o);
  if (!sel.ok()) return sel.status();
  ReducedTokens out;
  out.kept = sel->kept;
  out.features.resize(sel->kept.size() * channels);
  for (size_t s = 0; s < sel->kept.size(); ++s) {
    float* dst = &out.features[s * channels];
    const float* src = &features[static_cast<size_t>(sel->kept[s]) * channels];
    std::copy(src, src + channels, dst);
    for (const PruMergeTerm& t : sel->merges[s]) {
      const float* x = &features[static_cast<size_t>(t.source) * channels];
      for (int32_t c = 0; c < channels; ++c) dst[c] += t.weight * x[c];
    }
  }
  return out;
}

namespace {

class PruMergePolicy final : public Policy {
 public:
  explicit PruMergePolicy(PruMergeOptions o) : o_(o) {}
  std::string_view name() const override { return "prumerge"; }
  std::string Describe() const override {
    return absl::StrCat("prumerge knn=", o_.knn, " plus=", o_.plus, " merge=", o_.merge,
                        " merge_keys=", o_.merge_keys,
                        " scores=", o_.engine_scores ? "cls" : "attention");
  }
  SnapshotRequest Needs() const override {
    SnapshotRequest r;
    r.keys = o_.merge;
    r.post_vision = !o_.engine_scores;
    return r;
  }
  absl::StatusOr<EvictionPlan> Plan(const SequenceSnapshot& snap) const override {
    auto bad = [](absl::string_view m) {
      return absl::InvalidArgumentError(absl::StrCat("prumerge: ", m));
    };
    if (absl::Status s = snap.Validate(); !s.ok()) return bad(s.message());
    if (snap.MaxLength() == 0) return bad("empty sequence (every stream has 0 tokens)");
    EvictionPlan plan;
    plan.sequence = snap.sequence;
    plan.policy = Describe();
    const size_t d = static_cast<size_t>(snap.head_dim);
    // Streams are planned independently, in parallel (image_stream_plans.h).
    if (absl::Status s = CollectImageStreamPlans(
            snap,
            [&](int32_t l, int32_t h, uint8_t& visual) { return PlanStream(snap, l, h, d, visual); },
            plan);
        !s.ok()) {
      return s;
    }
    return plan;
  }

 private:
  // The plan of stream (l, h), or nullopt when it keeps every token and merges nothing.
  absl::StatusOr<std::optional<StreamPlan>> PlanStream(const SequenceSnapshot& snap, int32_t l,
                                                       int32_t h, size_t d,
                                                       uint8_t& any_visual) const {
    const StreamSnapshot& st = snap.stream(l, h);
    const int32_t n = st.length();
    if (st.modalities.empty()) return std::nullopt;
    if (o_.merge && st.keys.size() != static_cast<size_t>(n) * d) {
      return absl::FailedPreconditionError(absl::StrCat(
          "prumerge: stream (layer ", l, ", kv_head ", h, ") has no keys in the snapshot"));
    }
    if (!o_.engine_scores && st.post_vision_scores.size() != static_cast<size_t>(n)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "prumerge: stream (layer ", l, ", kv_head ", h,
          ") has no post-vision scores; collect the snapshot with the policy's Needs()"));
    }
    std::vector<uint8_t> keep(n, 1);
    std::vector<std::pair<int32_t, PruMergeTerm>> merges;  // (kept token, term)
    for (int32_t a = 0; a < n;) {
      if (!IsVisual(st.modalities[a])) {
        ++a;
        continue;
      }
      int32_t b = a;
      while (b < n && IsVisual(st.modalities[b])) ++b;  // one image: [a, b)
      any_visual = 1;
      std::vector<float> scores(b - a);
      for (int32_t j = a; j < b; ++j) {
        if (o_.engine_scores) {
          const auto& pos = snap.image_score_positions;
          auto it = std::lower_bound(pos.begin(), pos.end(), st.positions[j]);
          if (it == pos.end() || *it != st.positions[j]) {
            return absl::FailedPreconditionError(absl::StrCat(
                "prumerge: no engine image score for the image token at position ",
                st.positions[j]));
          }
          scores[j - a] = snap.image_scores[it - pos.begin()];
        } else {
          scores[j - a] = st.post_vision_scores[j];
        }
      }
      std::span<const float> keys;
      if (o_.merge) keys = std::span<const float>(st.keys).subspan(a * d, (b - a) * d);
      absl::StatusOr<PruMergeSelection> sel =
          PruMergeSelect(scores, keys, snap.head_dim, o_);
      if (!sel.ok()) return sel.status();
      for (int32_t j = a; j < b; ++j) keep[j] = 0;
      for (size_t s = 0; s < sel->kept.size(); ++s) {
        keep[a + sel->kept[s]] = 1;
        for (PruMergeTerm t : sel->merges[s]) {
          t.source += a;
          merges.push_back({a + sel->kept[s], t});
        }
      }
      a = b;
    }
    StreamPlan sp;
    sp.layer = l;
    sp.kv_head = h;
    std::vector<int32_t> slot(n, -1);
    for (int32_t j = 0; j < n; ++j) {
      if (!keep[j]) continue;
      slot[j] = static_cast<int32_t>(sp.kept.size());
      sp.kept.push_back(j);
    }
    for (const auto& [token, t] : merges) {
      sp.merges.push_back({.kept_slot = slot[token], .source = t.source,
                           .key_weight = o_.merge_keys ? t.weight : 0.0f,
                           .value_weight = t.weight});
    }
    if (static_cast<int32_t>(sp.kept.size()) < n || !sp.merges.empty()) return sp;
    return std::nullopt;
  }

  PruMergeOptions o_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Policy>> MakePruMergePolicy(const PruMergeOptions& options) {
  if (options.knn < 0) {
    return absl::InvalidArgumentError(absl::StrCat("prumerge: knn=", options.knn, " < 0"));
  }
  return std::unique_ptr<Policy>(new PruMergePolicy(options));
}

}  // namespace kvcache::policy
