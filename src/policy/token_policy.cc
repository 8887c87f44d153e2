// The composable token pipeline (budget -> score -> select -> merge -> channels) and FastV.
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvcache/policy/budget.h"
#include "kvcache/policy/merge.h"
#include "kvcache/policy/policy.h"
#include "kvcache/policy/think.h"
#include "src/policy/similarity.h"

namespace kvcache::policy {
namespace {

const char* LayerBudgetName(LayerBudgetKind k) {
  switch (k) {
    case LayerBudgetKind::kFull: return "full";
    case LayerBudgetKind::kUniform: return "uniform";
    case LayerBudgetKind::kPyramid: return "pyramid";
    case LayerBudgetKind::kVlCache: return "vlcache";
    case LayerBudgetKind::kH2O: return "h2o";
  }
  return "?";
}

const char* MergeName(MergeMode m) {
  switch (m) {
    case MergeMode::kNone: return "none";
    case MergeMode::kPivot: return "pivot";
    case MergeMode::kAverage: return "average";
  }
  return "?";
}

absl::Status Bad(const TokenPolicyOptions& o, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(o.name, ": ", what));
}

// Keeps the code of a stage's error and says which policy failed.
absl::Status Wrap(const TokenPolicyOptions& o, const absl::Status& s) {
  return absl::Status(s.code(), absl::StrCat(o.name, ": ", s.message()));
}

absl::Status ValidateOptions(const TokenPolicyOptions& o) {
  if (!(o.keep > 0.0 && o.keep <= 1.0)) {
    return Bad(o, absl::StrCat("keep=", o.keep, " is outside (0, 1]"));
  }
  if (o.tokens < 0) return Bad(o, absl::StrCat("tokens=", o.tokens, " is negative"));
  if (o.tokens > 0 && o.layer_budget != LayerBudgetKind::kUniform) {
    return Bad(o, "tokens= (an absolute budget) applies to the uniform layer budget only");
  }
  if (o.pyramid_beta < 1) return Bad(o, absl::StrCat("beta=", o.pyramid_beta, " must be >= 1"));
  if (!(o.sparsity_threshold >= 0.0f && o.sparsity_threshold <= 1.0f)) {
    return Bad(o, absl::StrCat("p=", o.sparsity_threshold, " is outside [0, 1]"));
  }
  if (!(o.h2o_heavy >= 0.0 && o.h2o_heavy <= 1.0) || !(o.h2o_recent >= 0.0 && o.h2o_recent <= 1.0)) {
    return Bad(o, absl::StrCat("heavy=", o.h2o_heavy, " / recent=", o.h2o_recent,
                               " must lie in [0, 1]"));
  }
  if (o.layer_budget == LayerBudgetKind::kH2O && !(o.h2o_heavy + o.h2o_recent > 0.0)) {
    return Bad(o, "heavy + recent is 0: the policy would keep zero tokens");
  }
  if (!(o.adakv_floor >= 0.0 && o.adakv_floor <= 1.0)) {
    return Bad(o, absl::StrCat("floor=", o.adakv_floor, " is outside [0, 1]"));
  }
  if (o.pool_kernel < 1 || o.pool_kernel % 2 == 0) {
    return Bad(o, absl::StrCat("kernel=", o.pool_kernel, " must be odd and >= 1"));
  }
  if (o.window < 0) return Bad(o, absl::StrCat("window=", o.window, " is negative"));
  if (o.score == TokenScore::kWindow && o.window < 1) {
    return Bad(o, "the window scorer needs window >= 1 observation rows");
  }
  if (!(o.recent_fraction >= 0.0 && o.recent_fraction <= 1.0)) {
    return Bad(o, absl::StrCat("recent=", o.recent_fraction, " is outside [0, 1]"));
  }
  if (o.sinks < 0) return Bad(o, absl::StrCat("sinks=", o.sinks, " is negative"));
  for (int m = 0; m < kNumModalities; ++m) {
    const float r = o.modality_keep[m];
    if (!(r < 0.0f) && !(r >= 0.0f && r <= 1.0f)) {
      return Bad(o, absl::StrCat("keep_", ModalityName(static_cast<Modality>(m)), "=", r,
                                 " is outside [0, 1]"));
    }
  }
  if (o.think) {
    if (!(o.think_options.lambda >= 0.0 && o.think_options.lambda < 1.0)) {
      return Bad(o, absl::StrCat("think lambda=", o.think_options.lambda, " is outside [0, 1)"));
    }
    if (o.think_options.window < 1 || o.think_options.recent < 0) {
      return Bad(o, absl::StrCat("think window=", o.think_options.window, " must be >= 1 and recent=",
                                 o.think_options.recent, " >= 0"));
    }
  }
  return absl::OkStatus();
}

class TokenPolicy final : public Policy {
 public:
  explicit TokenPolicy(TokenPolicyOptions o) : o_(std::move(o)) {}

  std::string_view name() const override { return o_.name; }

  std::string Describe() const override {
    std::string s = absl::StrCat(o_.name, " budget=", LayerBudgetName(o_.layer_budget));
    if (o_.layer_budget == LayerBudgetKind::kH2O) {
      absl::StrAppend(&s, " heavy=", o_.h2o_heavy, " recent=", o_.h2o_recent);
    } else if (o_.layer_budget != LayerBudgetKind::kFull) {
      if (o_.tokens > 0) absl::StrAppend(&s, " tokens=", o_.tokens);
      else absl::StrAppend(&s, " keep=", o_.keep);
      absl::StrAppend(&s, " score=", TokenScoreName(o_.score));
    }
    if (o_.layer_budget == LayerBudgetKind::kPyramid) absl::StrAppend(&s, " beta=", o_.pyramid_beta);
    if (o_.layer_budget == LayerBudgetKind::kVlCache) {
      absl::StrAppend(&s, " p=", o_.sparsity_threshold, " renorm=", o_.renormalize);
    }
    if (o_.head_budget == HeadBudgetKind::kAdaKv) absl::StrAppend(&s, " adakv_floor=", o_.adakv_floor);
    if (o_.pooling != Pooling::kNone) {
      absl::StrAppend(&s, " pool=", o_.pooling == Pooling::kAvg ? "avg" : "max",
                      " kernel=", o_.pool_kernel);
    }
    if (o_.window > 0) absl::StrAppend(&s, " window=", o_.window);
    if (o_.recent_fraction > 0) absl::StrAppend(&s, " recent=", o_.recent_fraction);
    if (o_.sinks > 0) absl::StrAppend(&s, " sinks=", o_.sinks);
    if (o_.shared_ranking) absl::StrAppend(&s, " shared=1");
    if (o_.score == TokenScore::kRandom) absl::StrAppend(&s, " seed=", o_.seed);
    if (o_.protect_text) absl::StrAppend(&s, " protect_text=1");
    if (o_.merge != MergeMode::kNone) absl::StrAppend(&s, " merge=", MergeName(o_.merge));
    if (o_.think) {
      absl::StrAppend(&s, " think=", o_.think_options.lambda, " think_window=",
                      o_.think_options.window, " think_recent=", o_.think_options.recent);
    }
    return s;
  }

  SnapshotRequest Needs() const override {
    SnapshotRequest r;
    const bool scores_tokens = o_.layer_budget != LayerBudgetKind::kFull;
    r.keys = (scores_tokens && o_.score == TokenScore::kKeyNorm) ||
             (scores_tokens && o_.merge != MergeMode::kNone) || o_.think;
    r.window_rows = scores_tokens && o_.score == TokenScore::kWindow ? o_.window : 0;
    r.post_vision = scores_tokens && o_.score == TokenScore::kPostVision;
    r.sparsity = o_.layer_budget == LayerBudgetKind::kVlCache;
    r.last_row = scores_tokens && o_.score == TokenScore::kLastRow;
    r.query_rows = o_.think ? o_.think_options.window : 0;
    r.sparsity_threshold = o_.sparsity_threshold;
    return r;
  }

  absl::StatusOr<EvictionPlan> Plan(const SequenceSnapshot& snap) const override;

 private:
  absl::StatusOr<std::vector<int32_t>> LayerBudgets(const SequenceSnapshot& snap,
                                                    const std::vector<int32_t>& n_layer) const;
  TokenPolicyOptions o_;
};

absl::StatusOr<std::vector<int32_t>> TokenPolicy::LayerBudgets(
    const SequenceSnapshot& snap, const std::vector<int32_t>& n_layer) const {
  const int32_t num_layers = snap.num_layers;
  std::vector<int32_t> budget(num_layers, 0);
  switch (o_.layer_budget) {
    case LayerBudgetKind::kFull:
      for (int32_t l = 0; l < num_layers; ++l) budget[l] = n_layer[l];
      return budget;
    case LayerBudgetKind::kUniform:
      for (int32_t l = 0; l < num_layers; ++l) {
        if (n_layer[l] == 0) continue;
        if (o_.tokens > 0) {
          budget[l] = o_.tokens;
          continue;
        }
        absl::StatusOr<int32_t> b = UniformBudget(o_.keep, n_layer[l]);
        if (!b.ok()) return Bad(o_, absl::StrCat("layer ", l, ": ", b.status().message()));
        budget[l] = *b;
      }
      return budget;
    case LayerBudgetKind::kH2O:
      for (int32_t l = 0; l < num_layers; ++l) {
        const int32_t n = n_layer[l];
        budget[l] = static_cast<int32_t>(std::floor(o_.h2o_heavy * n)) +
                    static_cast<int32_t>(std::floor(o_.h2o_recent * n));
        if (n > 0 && budget[l] == 0) {
          return Bad(o_, absl::StrCat("heavy=", o_.h2o_heavy, " and recent=", o_.h2o_recent,
                                      " of ", n, " tokens (layer ", l, ") keep zero tokens"));
        }
      }
      return budget;
    case LayerBudgetKind::kPyramid: {
      absl::StatusOr<std::vector<int32_t>> b =
          PyramidKVBudgets(snap.MaxLength(), num_layers, o_.keep, o_.window, o_.pyramid_beta);
      if (!b.ok()) return Wrap(o_, b.status());
      return *b;
    }
    case LayerBudgetKind::kVlCache: {
      std::vector<double> density(num_layers);
      for (int32_t l = 0; l < num_layers; ++l) {
        const LayerSnapshot& ls = snap.layers[l];
        if (ls.below_threshold.empty()) {
          return absl::FailedPreconditionError(absl::StrCat(
              o_.name, ": layer ", l, " has no sparsity counts; collect the snapshot with the "
              "policy's Needs() (post-vision rows)"));
        }
        absl::StatusOr<double> d = LayerDensity(ls.below_threshold, ls.causal_entries);
        if (!d.ok()) return Bad(o_, absl::StrCat("layer ", l, ": ", d.status().message()));
        density[l] = *d;
      }
      absl::StatusOr<VlCacheBudget> b = VlCacheLayerBudgets(density, o_.keep, n_layer, o_.renormalize);
      if (!b.ok()) return Wrap(o_, b.status());
      return b->tokens;
    }
  }
  return budget;
}

absl::StatusOr<EvictionPlan> TokenPolicy::Plan(const SequenceSnapshot& snap) const {
  if (absl::Status s = snap.Validate(); !s.ok()) return Wrap(o_, s);
  const int32_t num_layers = snap.num_layers, heads = snap.num_kv_heads;
  if (snap.MaxLength() == 0) return Bad(o_, "empty sequence (every stream has 0 tokens)");
  EvictionPlan plan;
  plan.sequence = snap.sequence;
  plan.policy = Describe();
  std::vector<int32_t> n_layer(num_layers, 0);
  for (int32_t l = 0; l < num_layers; ++l) {
    for (int32_t h = 0; h < heads; ++h) n_layer[l] = std::max(n_layer[l], snap.stream(l, h).length());
  }
  if (o_.layer_budget != LayerBudgetKind::kFull) {
    absl::StatusOr<std::vector<int32_t>> budgets = LayerBudgets(snap, n_layer);
    if (!budgets.ok()) return budgets.status();
    for (int32_t l = 0; l < num_layers; ++l) {
      if (n_layer[l] == 0) continue;
      const int32_t layer_budget = (*budgets)[l];
      if (o_.window_within_budget && layer_budget < o_.window) {
        return Bad(o_, absl::StrCat("layer ", l, " budget ", layer_budget,
                                    " tokens is below the window ", o_.window));
      }
      std::vector<std::vector<float>> scores(heads);
      std::vector<std::span<const int32_t>> positions(heads);
      std::vector<int32_t> window(heads);
      for (int32_t h = 0; h < heads; ++h) {
        absl::StatusOr<std::vector<float>> s = ScoreTokens(o_.score, snap, l, h, o_.seed);
        if (!s.ok()) return Wrap(o_, s.status());
        scores[h] = std::move(*s);
        const StreamSnapshot& st = snap.stream(l, h);
        positions[h] = st.positions;
        window[h] = std::min(o_.window, st.length());
        if (o_.pooling != Pooling::kNone) {
          // Pool the non-window prefix only: its zero padding at the end is real padding, not
          // the window's scores (ALGORITHMS.md SnapKV).
          const int32_t prefix = st.length() - window[h];
          std::vector<float> pooled = Pool1D(std::span<const float>(scores[h]).first(prefix),
                                             o_.pool_kernel, o_.pooling);
          std::copy(pooled.begin(), pooled.end(), scores[h].begin());
        }
      }
      if (o_.shared_ranking) scores = ShareAcrossHeads(scores, positions);
      std::vector<int32_t> head_budget(heads, layer_budget);
      if (o_.head_budget == HeadBudgetKind::kAdaKv) {
        std::vector<std::span<const float>> cand_scores(heads);
        std::vector<std::span<const int32_t>> cand_pos(heads);
        for (int32_t h = 0; h < heads; ++h) {
          const size_t prefix = scores[h].size() - window[h];
          cand_scores[h] = std::span<const float>(scores[h]).first(prefix);
          cand_pos[h] = positions[h].first(prefix);
        }
        absl::StatusOr<std::vector<int32_t>> hb = AdaKvHeadBudgets(
            cand_scores, cand_pos, std::max(0, layer_budget - o_.window), o_.adakv_floor);
        if (!hb.ok()) return Wrap(o_, hb.status());
        for (int32_t h = 0; h < heads; ++h) head_budget[h] = (*hb)[h] + window[h];
      }
      for (int32_t h = 0; h < heads; ++h) {
        const StreamSnapshot& st = snap.stream(l, h);
        const int32_t n = st.length(), budget = head_budget[h];
        if (n <= budget) continue;  // compress only when the stream exceeds its budget
        Protection p;
        p.sinks = o_.sinks;
        p.recent = window[h];
        if (o_.layer_budget == LayerBudgetKind::kH2O) {
          p.recent = std::max(p.recent, static_cast<int32_t>(std::floor(o_.h2o_recent * n_layer[l])));
        }
        p.recent = std::max(p.recent, static_cast<int32_t>(std::floor(o_.recent_fraction * budget)));
        p.protect_text = o_.protect_text;
        p.visual_only = o_.visual_only;
        p.modality_keep = o_.modality_keep;
        absl::StatusOr<std::vector<int32_t>> kept =
            SelectTokens(scores[h], st.positions, st.modalities, budget, p);
        if (!kept.ok()) return Wrap(o_, kept.status());
        if (static_cast<int32_t>(kept->size()) == n) continue;
        StreamPlan sp;
        sp.layer = l;
        sp.kv_head = h;
        sp.kept = std::move(*kept);
        if (o_.merge != MergeMode::kNone) {
          // The merge itself runs below, all streams in parallel; its input check runs here so
          // the first error is the one the serial loop would report.
          if (absl::Status s = CheckLookMInputs(st, snap.head_dim, l, h); !s.ok()) {
            return Wrap(o_, s);
          }
        }
        plan.streams.push_back(std::move(sp));
      }
    }
  }
  if (o_.merge != MergeMode::kNone) {
    const int32_t count = static_cast<int32_t>(plan.streams.size());
    std::vector<absl::Status> merged(count);
    ForEachStream(count, [&](int32_t i) {
      StreamPlan& sp = plan.streams[i];
      merged[i] = AddLookMMerges(snap.stream(sp.layer, sp.kv_head), snap.head_dim, o_.merge, sp);
    });
    for (const absl::Status& s : merged) {
      if (!s.ok()) return Wrap(o_, s);
    }
  }
  if (o_.think) {
    if (absl::Status s = AddThinkChannels(snap, o_.think_options, plan); !s.ok()) {
      return Wrap(o_, s);
    }
  }
  return plan;
}

class FastVPolicy final : public Policy {
 public:
  explicit FastVPolicy(FastVOptions o) : o_(o) {}
  std::string_view name() const override { return "fastv"; }
  std::string Describe() const override {
    if (o_.keep > 0.0) {
      return absl::StrCat("fastv layer=", o_.layer, " keep=", o_.keep, " (share of prompt KV)");
    }
    return absl::StrCat("fastv layer=", o_.layer, " ratio=", o_.ratio);
  }
  SnapshotRequest Needs() const override {
    SnapshotRequest r;
    r.last_row = true;
    return r;
  }
  absl::StatusOr<EvictionPlan> Plan(const SequenceSnapshot& snap) const override {
    if (absl::Status s = snap.Validate(); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("fastv: ", s.message()));
    }
    if (o_.layer >= snap.num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("fastv: layer=", o_.layer,
                                                     " must be below the model's ",
                                                     snap.num_layers, " layers"));
    }
    if (snap.MaxLength() == 0) {
      return absl::InvalidArgumentError("fastv: empty sequence (every stream has 0 tokens)");
    }
    EvictionPlan plan;
    plan.sequence = snap.sequence;
    plan.policy = Describe();
    // Layer K-1's last row, averaged over all its heads, position by position.
    const int32_t src = o_.layer - 1, heads = snap.num_kv_heads;
    std::vector<std::vector<float>> rows(heads);
    std::vector<std::span<const int32_t>> positions(heads);
    for (int32_t h = 0; h < heads; ++h) {
      absl::StatusOr<std::vector<float>> s = ScoreTokens(TokenScore::kLastRow, snap, src, h, 0);
      if (!s.ok()) return absl::FailedPreconditionError(absl::StrCat("fastv: ", s.status().message()));
      rows[h] = std::move(*s);
      positions[h] = snap.stream(src, h).positions;
    }
    const std::vector<std::vector<float>> shared = ShareAcrossHeads(rows, positions);
    std::vector<int32_t> image_pos;
    std::vector<float> image_score;
    for (int32_t h = 0; h < heads; ++h) {
      const StreamSnapshot& st = snap.stream(src, h);
      for (int32_t j = 0; j < st.length(); ++j) {
        if (st.modalities.empty() || !IsVisual(st.modalities[j])) continue;
        image_pos.push_back(st.positions[j]);
        image_score.push_back(shared[h][j]);
      }
    }
    {  // unique by position (every head of a fresh prefill holds the same tokens)
      std::vector<int32_t> order(image_pos.size());
      for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int32_t>(i);
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return image_pos[a] < image_pos[b]; });
      std::vector<int32_t> p;
      std::vector<float> s;
      for (int32_t i : order) {
        if (!p.empty() && p.back() == image_pos[i]) continue;
        p.push_back(image_pos[i]);
        s.push_back(image_score[i]);
      }
      image_pos = std::move(p);
      image_score = std::move(s);
    }
    const int32_t n_img = static_cast<int32_t>(image_pos.size());
    if (n_img == 0) {
      absl::StrAppend(&plan.policy, " (no image tokens: no-op)");
      return plan;
    }
    int32_t keep = static_cast<int32_t>(std::round(n_img * (1.0 - o_.ratio)));
    if (o_.keep > 0.0) {
      const double n = snap.MaxLength(), layers = snap.num_layers, k = o_.layer;
      const double image = (o_.keep * layers * n - k * n) / (layers - k) - (n - n_img);
      keep = static_cast<int32_t>(std::clamp<double>(std::round(image), 1.0, n_img));
    }
    if (keep == 0) {
      return absl::InvalidArgumentError(absl::StrCat("fastv: ratio=", o_.ratio, " drops all ",
                                                     n_img, " image tokens"));
    }
    std::vector<int32_t> all(n_img);
    for (int32_t i = 0; i < n_img; ++i) all[i] = i;
    std::vector<int32_t> best = TopK(image_score, image_pos, all, keep);
    std::vector<uint8_t> kept_img(n_img, 0);
    for (int32_t i : best) kept_img[i] = 1;
    std::vector<int32_t> dropped;  // ascending positions
    for (int32_t i = 0; i < n_img; ++i) {
      if (!kept_img[i]) dropped.push_back(image_pos[i]);
    }
    for (int32_t l = o_.layer; l < snap.num_layers; ++l) {
      for (int32_t h = 0; h < heads; ++h) {
        const StreamSnapshot& st = snap.stream(l, h);
        StreamPlan sp;
        sp.layer = l;
        sp.kv_head = h;
        for (int32_t j = 0; j < st.length(); ++j) {
          if (!std::binary_search(dropped.begin(), dropped.end(), st.positions[j])) {
            sp.kept.push_back(j);
          }
        }
        if (static_cast<int32_t>(sp.kept.size()) < st.length()) plan.streams.push_back(std::move(sp));
      }
    }
    return plan;
  }

 private:
  FastVOptions o_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Policy>> MakeTokenPolicy(const TokenPolicyOptions& options) {
  if (absl::Status s = ValidateOptions(options); !s.ok()) return s;
  return std::unique_ptr<Policy>(new TokenPolicy(options));
}

absl::StatusOr<std::unique_ptr<Policy>> MakeFastVPolicy(const FastVOptions& options) {
  if (options.layer < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "fastv: layer=", options.layer, " must be >= 1 (layer K-1 produces the attention)"));
  }
  if (!(options.ratio >= 0.0 && options.ratio < 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("fastv: ratio=", options.ratio, " is outside [0, 1)"));
  }
  if (!(options.keep >= 0.0 && options.keep <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("fastv: keep=", options.keep, " is outside [0, 1] (0 = use ratio)"));
  }
  return std::unique_ptr<Policy>(new FastVPolicy(options));
}

}  // namespace kvcache::policy
