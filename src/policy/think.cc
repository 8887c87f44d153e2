// ThinK key-channel pruning.
#include "kvcache/policy/think.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvcache::policy {

absl::StatusOr<std::vector<float>> ThinkChannelScores(std::span<const float> queries,
                                                      int32_t rows, int32_t num_q_heads,
                                                      int32_t head_dim, int32_t kv_head,
                                                      int32_t group_size,
                                                      std::span<const float> keys,
                                                      std::span<const int32_t> tokens) {
  const size_t d = static_cast<size_t>(head_dim);
  if (rows < 1 || head_dim < 1 || group_size < 1 || kv_head < 0 ||
      (kv_head + 1) * group_size > num_q_heads ||
      queries.size() != static_cast<size_t>(rows) * num_q_heads * d || keys.size() % d != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ThinkChannelScores: rows ", rows, ", q_heads ", num_q_heads, ", head_dim ", head_dim,
        ", kv_head ", kv_head, ", group ", group_size, ", ", queries.size(), " query values, ",
        keys.size(), " key values"));
  }
  const int64_t n = static_cast<int64_t>(keys.size() / d);
  for (int32_t t : tokens) {
    if (t < 0 || t >= n) {
      return absl::OutOfRangeError(absl::StrCat("ThinkChannelScores: token ", t,
                                                " is outside the ", n, " keys"));
    }
  }
  std::vector<double> qs(d, 0.0), ks(d, 0.0);
  for (int32_t r = 0; r < rows; ++r) {
    for (size_t c = 0; c < d; ++c) {
      // Squares first, then the mean over the head's G query heads: heads of opposite sign
      // add up instead of cancelling (the sum of each head's Frobenius criterion).
      double q2 = 0.0;
      for (int32_t g = 0; g < group_size; ++g) {
        const double q =
            queries[(static_cast<size_t>(r) * num_q_heads + kv_head * group_size + g) * d + c];
        q2 += q * q;
      }
      qs[c] += q2 / group_size;
    }
  }
  const int64_t count = tokens.empty() ? n : static_cast<int64_t>(tokens.size());
  for (int64_t i = 0; i < count; ++i) {
    const size_t t = tokens.empty() ? static_cast<size_t>(i) : static_cast<size_t>(tokens[i]);
    for (size_t c = 0; c < d; ++c) ks[c] += double{keys[t * d + c]} * keys[t * d + c];
  }
  std::vector<float> out(d);
  for (size_t c = 0; c < d; ++c) {
    out[c] = count == 0 ? 0.0f : static_cast<float>((qs[c] / rows) * (ks[c] / count));
  }
  return out;
}

std::vector<int32_t> ThinkKeptChannels(std::span<const float> scores, double lambda) {
  const int32_t d = static_cast<int32_t>(scores.size());
  const int32_t keep = d - static_cast<int32_t>(std::floor(lambda * d));
  std::vector<int32_t> order(d);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return RanksBefore(scores[a], a, scores[b], b);
  });
  order.resize(std::clamp(keep, 0, d));
  std::sort(order.begin(), order.end());
  return order;
}

absl::Status AddThinkChannels(const SequenceSnapshot& snap, const ThinkOptions& o,
                              EvictionPlan& plan) {
  const int32_t heads = snap.num_kv_heads, d = snap.head_dim;
  std::vector<int32_t> slot(static_cast<size_t>(snap.num_layers) * heads, -1);
  for (size_t i = 0; i < plan.streams.size(); ++i) {
    slot[static_cast<size_t>(plan.streams[i].layer) * heads + plan.streams[i].kv_head] =
        static_cast<int32_t>(i);
  }
  std::vector<StreamPlan> added;
  for (int32_t l = 0; l < snap.num_layers; ++l) {
    const LayerSnapshot& ls = snap.layers[l];
    for (int32_t h = 0; h < heads; ++h) {
      const StreamSnapshot& st = snap.stream(l, h);
      if (st.length() == 0) continue;
      if (ls.window_rows < o.window) {
        return absl::FailedPreconditionError(absl::StrCat(
            "ThinK: layer ", l, " has ", ls.window_rows, " observation query rows, needs ",
            o.window, "; collect the snapshot with the policy's Needs()"));
      }
      if (st.keys.size() != static_cast<size_t>(st.length()) * d) {
        return absl::FailedPreconditionError(absl::StrCat(
            "ThinK: stream (layer ", l, ", kv_head ", h, ") has no keys in the snapshot"));
      }
      StreamPlan fresh;
      const int32_t at = slot[static_cast<size_t>(l) * heads + h];
      StreamPlan& sp = at >= 0 ? plan.streams[at] : fresh;
      if (at < 0) {
        fresh.layer = l;
        fresh.kv_head = h;
        fresh.kept.resize(st.length());
        std::iota(fresh.kept.begin(), fresh.kept.end(), 0);
      }
      if (sp.kept.empty()) continue;
      // A stream short enough to stay wholly full width gains nothing from a recompaction.
      if (at < 0 && static_cast<int32_t>(sp.kept.size()) <= o.recent) continue;
      const size_t row = static_cast<size_t>(snap.num_q_heads) * d;
      std::span<const float> window = std::span<const float>(ls.window_queries)
                                          .subspan((ls.window_rows - o.window) * row);
      absl::StatusOr<std::vector<float>> scores = ThinkChannelScores(
          window, o.window, snap.num_q_heads, d, h, snap.group_size(), st.keys, sp.kept);
      if (!scores.ok()) return scores.status();
      std::vector<int32_t> channels = ThinkKeptChannels(*scores, o.lambda);
      if (static_cast<int32_t>(channels.size()) == d) continue;  // nothing pruned
      sp.key_channels = std::move(channels);
      sp.full_width_recent = std::min<int32_t>(o.recent, static_cast<int32_t>(sp.kept.size()));
      if (at < 0) added.push_back(std::move(fresh));
    }
  }
  for (StreamPlan& sp : added) plan.streams.push_back(std::move(sp));
  // Keep the plan in (layer, head) order so logs and comparisons are stable.
  std::stable_sort(plan.streams.begin(), plan.streams.end(),
                   [](const StreamPlan& a, const StreamPlan& b) {
                     return a.layer != b.layer ? a.layer < b.layer : a.kv_head < b.kv_head;
                   });
  return absl::OkStatus();
}

}  // namespace kvcache::policy
