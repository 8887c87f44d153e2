// DivPrune: greedy max-min diversity selection under cosine distance (ALGORITHMS.md).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvcache/policy/image_select.h"
#include "src/policy/similarity.h"

namespace kvcache::policy {

absl::StatusOr<std::vector<int32_t>> DivPruneSelect(std::span<const float> rows, int32_t dim,
                                                    int32_t k) {
  if (dim < 1 || rows.size() % static_cast<size_t>(dim) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("DivPruneSelect: ", rows.size(),
                                                   " values are not rows of width ", dim));
  }
  const size_t d = static_cast<size_t>(dim);
  const int32_t n = static_cast<int32_t>(rows.size() / d);
  if (k < 0 || k > n) {
    return absl::InvalidArgumentError(
        absl::StrCat("DivPruneSelect: k = ", k, " is outside [0, ", n, "]"));
  }
  std::vector<int32_t> order;
  order.reserve(k);
  if (k == 0) return order;
  thread_local std::vector<float> unit;  // reused across the streams of one thread
  UnitRowsInto(rows, d, unit);
  // A non-finite entry makes the whole unit row NaN (UnitRows); such rows take no part in the
  // distances and are chosen last, by position.
  std::vector<uint8_t> finite(n, 1);
  std::vector<int32_t> finite_rows;
  for (int32_t j = 0; j < n; ++j) {
    finite[j] = std::isfinite(unit[static_cast<size_t>(j) * d]) ? 1 : 0;
    for (size_t c = 1; finite[j] && c < d; ++c) {
      finite[j] = std::isfinite(unit[static_cast<size_t>(j) * d + c]) ? 1 : 0;
    }
    if (finite[j]) finite_rows.push_back(j);
  }
  // closest[j]: the largest cosine between j and the reference set (max cos = min distance).
  // For the first pick the reference set is every other finite row (its nearest neighbour, from
  // the blocked exact search); afterwards it is the chosen set.
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  std::vector<float> closest(n, kNone);
  std::vector<uint8_t> chosen(n, 0);
  if (finite_rows.size() >= 2) {
    const std::vector<std::vector<int32_t>> nn = TopKSimilarRows(unit, d, finite_rows, finite, 1);
    for (size_t q = 0; q < finite_rows.size(); ++q) {
      const int32_t j = finite_rows[q];
      closest[j] = DotProduct(&unit[static_cast<size_t>(j) * d],
                              &unit[static_cast<size_t>(nn[q][0]) * d], d);
    }
  }
  // The finite row with the smallest `closest` (the largest min distance); ties to the earlier.
  auto most_isolated = [&]() {
    int32_t best = -1;
    for (int32_t j : finite_rows) {
      if (!chosen[j] && (best < 0 || closest[j] < closest[best])) best = j;
    }
    return best;
  };
  const int32_t finite_picks = std::min<int32_t>(k, static_cast<int32_t>(finite_rows.size()));
  for (int32_t pick = 0; pick < finite_picks; ++pick) {
    const int32_t s = most_isolated();
    chosen[s] = 1;
    order.push_back(s);
    if (pick == 0) std::fill(closest.begin(), closest.end(), kNone);
    const float* us = &unit[static_cast<size_t>(s) * d];
    for (int32_t j : finite_rows) {
      if (chosen[j]) continue;
      closest[j] = std::max(closest[j], DotProduct(&unit[static_cast<size_t>(j) * d], us, d));
    }
  }
  for (int32_t j = 0; j < n && static_cast<int32_t>(order.size()) < k; ++j) {
    if (!finite[j]) order.push_back(j);
  }
  return order;
}

absl::StatusOr<ReducedTokens> DivPruneReduce(std::span<const float> features, int32_t channels,
                                             double ratio) {
  if (channels < 1 || features.empty() || features.size() % static_cast<size_t>(channels) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("DivPruneReduce: ", features.size(),
                                                   " feature values are not rows of ", channels,
                                                   " channels (need at least one row)"));
  }
  if (!(ratio > 0.0 && ratio <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("DivPruneReduce: ratio ", ratio, " is outside (0, 1]"));
  }
  const size_t c = static_cast<size_t>(channels);
  const int32_t n = static_cast<int32_t>(features.size() / c);
  const int32_t k = std::clamp<int32_t>(static_cast<int32_t>(std::lround(ratio * n)), 1, n);
  absl::StatusOr<std::vector<int32_t>> order = DivPruneSelect(features, channels, k);
  if (!order.ok()) return order.status();
  ReducedTokens out;
  out.kept = std::move(*order);
  std::sort(out.kept.begin(), out.kept.end());
  out.features.resize(out.kept.size() * c);
  for (size_t s = 0; s < out.kept.size(); ++s) {
    std::copy_n(features.begin() + static_cast<size_t>(out.kept[s]) * c, c,
                out.features.begin() + s * c);
  }
  return out;
}

}  // namespace kvcache::policy
