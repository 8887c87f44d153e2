// Budget allocators (ALGORITHMS.md "Budgets").
#include "kvcache/policy/budget.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvcache/policy/select.h"

namespace kvcache::policy {
namespace {

// Python's //: floor, also for negative operands (PyramidKV's operands are non-negative once the
// uniform fallback has taken n < 2(C - w), but the pyramid is written as the official code's).
int64_t FloorDiv(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

absl::Status CheckKeep(const char* who, double keep) {
  if (!(keep > 0.0 && keep <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": keep ratio ", keep, " is outside (0, 1]"));
  }
  return absl::OkStatus();
}

// Exact water-filling: the level t with sum_l clip(t * d_l, lo, hi) = target. The sum is a
// continuous, non-decreasing, piecewise-linear function of t whose kinks are the points where a
// layer leaves the floor (t = lo/d_l) or reaches the ceiling (t = hi/d_l); the level lies on the
// segment between the last kink below the target and the first one at or above it, where the
// sum is linear. Every layer's share is recomputed from the final t, so a layer that sat at the
// floor for a smaller level is released when the level rises (the old pin-and-repeat loop never
// released it). An infeasible target is met as closely as the clip allows: below L * lo every
// layer is at the floor (t = 0); above the largest reachable sum every dense layer is at the
// ceiling and a layer of density 0 stays at the floor (t = the last kink).
double WaterLevel(std::span<const double> density, double target, double lo, double hi) {
  auto total = [&](double t) {
    double s = 0.0;
    for (double d : density) s += std::clamp(t * d, lo, hi);
    return s;
  };
  std::vector<double> kinks;
  for (double d : density) {
    if (d > 0.0) {
      kinks.push_back(lo / d);
      kinks.push_back(hi / d);
    }
  }
  std::sort(kinks.begin(), kinks.end());
  double prev_t = 0.0, prev_sum = total(0.0);
  if (target <= prev_sum) return 0.0;
  for (double t : kinks) {
    const double s = total(t);
    if (s >= target) {
      // Linear on [prev_t, t]; s > prev_sum here because target lies strictly between them.
      return prev_t + (target - prev_sum) * (t - prev_t) / (s - prev_sum);
    }
    prev_t = t;
    prev_sum = s;
  }
  return prev_t;
}

}  // namespace

absl::StatusOr<int32_t> UniformBudget(double keep, int32_t n) {
  if (absl::Status s = CheckKeep("UniformBudget", keep); !s.ok()) return s;
  if (n < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("UniformBudget: sequence length ", n, " (empty sequence)"));
  }
  const int32_t b = static_cast<int32_t>(std::round(keep * n));
  if (b == 0) {
    return absl::InvalidArgumentError(absl::StrCat("UniformBudget: keep ratio ", keep, " of ", n,
                                                   " tokens keeps zero tokens"));
  }
  return b;
}

absl::StatusOr<std::vector<int32_t>> PyramidKVBudgets(int32_t n, int32_t num_layers, double keep,
                                                      int32_t window, int32_t beta) {
  if (absl::Status s = CheckKeep("PyramidKVBudgets", keep); !s.ok()) return s;
  if (n < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("PyramidKVBudgets: sequence length ", n, " (empty sequence)"));
  }
  if (num_layers < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("PyramidKVBudgets: num_layers ", num_layers, " < 1"));
  }
  if (window < 0) {
    return absl::InvalidArgumentError(absl::StrCat("PyramidKVBudgets: window ", window, " < 0"));
  }
  if (beta < 1) {
    return absl::InvalidArgumentError(absl::StrCat("PyramidKVBudgets: beta ", beta, " < 1"));
  }
  const int64_t capacity = std::llround(keep * n);  // C, the window inside it
  if (capacity < window) {
    return absl::InvalidArgumentError(absl::StrCat("PyramidKVBudgets: capacity round(keep ",
                                                   keep, " * n ", n, ") = ", capacity,
                                                   " is below the window ", window));
  }
  std::vector<int32_t> out(num_layers);
  auto cap = [&](int64_t x) { return static_cast<int32_t>(std::clamp<int64_t>(x, 1, n)); };
  const int64_t shaped = capacity - window;  // C - w: what the pyramid distributes
  if (num_layers == 1 || int64_t{n} < 2 * shaped) {
    // One layer, or too few tokens to shape a pyramid: the official uniform fallback.
    std::fill(out.begin(), out.end(), cap(capacity));
    return out;
  }
  int64_t min_tokens = FloorDiv(shaped, beta);
  int64_t max_tokens = 2 * shaped - min_tokens;
  if (max_tokens >= int64_t{n} - window) {
    max_tokens = int64_t{n} - window;
    min_tokens = 2 * shaped - max_tokens;
  }
  const int64_t step = FloorDiv(max_tokens - min_tokens, num_layers - 1);
  for (int32_t l = 0; l < num_layers; ++l) out[l] = cap(max_tokens - l * step + window);
  return out;
}

absl::StatusOr<double> LayerDensity(std::span<const int64_t> below,
                                    std::span<const int64_t> causal) {
  if (below.size() != causal.size() || below.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("LayerDensity: ", below.size(),
                                                   " below-threshold counts for ", causal.size(),
                                                   " causal counts (need the same, >= 1)"));
  }
  double sparsity = 0.0;
  for (size_t h = 0; h < below.size(); ++h) {
    if (below[h] < 0 || causal[h] < 0 || below[h] > causal[h]) {
      return absl::InvalidArgumentError(absl::StrCat("LayerDensity: head ", h, " has ", below[h],
                                                     " zeros among ", causal[h],
                                                     " causal entries"));
    }
    if (causal[h] > 0) sparsity += static_cast<double>(below[h]) / static_cast<double>(causal[h]);
  }
  return 1.0 - sparsity / static_cast<double>(below.size());
}

absl::StatusOr<VlCacheBudget> VlCacheLayerBudgets(std::span<const double> density, double alpha,
                                                  std::span<const int32_t> lengths,
                                                  bool renormalize) {
  if (absl::Status s = CheckKeep("VlCacheLayerBudgets", alpha); !s.ok()) return s;
  const size_t num_layers = density.size();
  if (num_layers == 0 || lengths.size() != num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("VlCacheLayerBudgets: ", density.size(),
                                                   " densities for ", lengths.size(), " layers"));
  }
  constexpr double kLo = 0.01, kHi = 1.0;
  double sum = 0.0;
  for (size_t l = 0; l < num_layers; ++l) {
    if (!(density[l] >= 0.0 && density[l] <= 1.0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("VlCacheLayerBudgets: density[", l, "] = ", density[l], " is outside [0, 1]"));
    }
    sum += density[l];
  }
  const double mass = alpha * static_cast<double>(num_layers);
  VlCacheBudget out;
  out.unclipped.resize(num_layers);
  for (size_t l = 0; l < num_layers; ++l) {
    // All-zero density (every row saw one key) carries no signal: fall back to uniform alpha.
    out.unclipped[l] = sum > 0.0 ? density[l] / sum * mass : alpha;
  }
  out.ratio.resize(num_layers);
  if (renormalize && sum > 0.0) {
    const double t = WaterLevel(density, mass, kLo, kHi);
    for (size_t l = 0; l < num_layers; ++l) out.ratio[l] = std::clamp(t * density[l], kLo, kHi);
  } else {
    for (size_t l = 0; l < num_layers; ++l) out.ratio[l] = std::clamp(out.unclipped[l], kLo, kHi);
  }
  out.tokens.resize(num_layers);
  for (size_t l = 0; l < num_layers; ++l) {
    const int64_t t = std::llround(out.ratio[l] * lengths[l]);
    out.tokens[l] = static_cast<int32_t>(std::clamp<int64_t>(t, lengths[l] > 0 ? 1 : 0, lengths[l]));
  }
  return out;
}

absl::StatusOr<std::vector<int32_t>> AdaKvHeadBudgets(
    const std::vector<std::span<const float>>& scores,
    const std::vector<std::span<const int32_t>>& positions, int32_t budget,
    double floor_fraction) {
  const size_t heads = scores.size();
  if (heads == 0 || positions.size() != heads) {
    return absl::InvalidArgumentError(absl::StrCat("AdaKvHeadBudgets: ", scores.size(),
                                                   " score lists for ", positions.size(),
                                                   " position lists"));
  }
  if (budget < 0) {
    return absl::InvalidArgumentError(absl::StrCat("AdaKvHeadBudgets: budget ", budget, " < 0"));
  }
  if (!(floor_fraction >= 0.0 && floor_fraction <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("AdaKvHeadBudgets: floor ", floor_fraction, " is outside [0, 1]"));
  }
  struct Entry {
    float score;
    int32_t position;
    int32_t head;
  };
  std::vector<Entry> all;
  for (size_t h = 0; h < heads; ++h) {
    if (scores[h].size() != positions[h].size()) {
      return absl::InvalidArgumentError(absl::StrCat("AdaKvHeadBudgets: head ", h, " has ",
                                                     scores[h].size(), " scores for ",
                                                     positions[h].size(), " positions"));
    }
    for (size_t i = 0; i < scores[h].size(); ++i) {
      all.push_back({scores[h][i], positions[h][i], static_cast<int32_t>(h)});
    }
  }
  const int64_t k = std::min<int64_t>(static_cast<int64_t>(heads) * budget, all.size());
  std::partial_sort(all.begin(), all.begin() + k, all.end(), [](const Entry& a, const Entry& b) {
    if (RanksBefore(a.score, a.position, b.score, b.position)) return true;
    if (RanksBefore(b.score, b.position, a.score, a.position)) return false;
    return a.head < b.head;
  });
  std::vector<int64_t> count(heads, 0);
  for (int64_t i = 0; i < k; ++i) ++count[all[i].head];
  std::vector<int32_t> out(heads);
  for (size_t h = 0; h < heads; ++h) {
    const double b = static_cast<double>(count[h]) * (1.0 - floor_fraction) +
                     floor_fraction * static_cast<double>(budget);
    out[h] = static_cast<int32_t>(
        std::min<int64_t>(std::llround(b), static_cast<int64_t>(scores[h].size())));
  }
  return out;
}

}  // namespace kvcache::policy
