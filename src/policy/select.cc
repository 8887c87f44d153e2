// Ranking, budgeted selection with protections, and 1-D pooling.
#include "kvcache/policy/select.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kvcache::policy {
namespace {

// Index order for equal (score, position): never happens inside one stream (positions are
// unique), but keeps the order total for callers that pass duplicate positions.
struct Better {
  std::span<const float> scores;
  std::span<const int32_t> positions;
  bool operator()(int32_t a, int32_t b) const {
    if (RanksBefore(scores[a], positions[a], scores[b], positions[b])) return true;
    if (RanksBefore(scores[b], positions[b], scores[a], positions[a])) return false;
    return a < b;
  }
};

}  // namespace

std::vector<int32_t> RankTokens(std::span<const float> scores,
                                std::span<const int32_t> positions) {
  std::vector<int32_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), Better{scores, positions});
  return order;
}

std::vector<int32_t> TopK(std::span<const float> scores, std::span<const int32_t> positions,
                          std::span<const int32_t> candidates, int32_t k) {
  std::vector<int32_t> order(candidates.begin(), candidates.end());
  k = std::clamp<int32_t>(k, 0, static_cast<int32_t>(order.size()));
  // partial_sort is O(n log k): the common case keeps a small fraction of a long stream.
  std::partial_sort(order.begin(), order.begin() + k, order.end(), Better{scores, positions});
  order.resize(k);
  return order;
}

absl::StatusOr<std::vector<int32_t>> SelectTokens(std::span<const float> scores,
                                                  std::span<const int32_t> positions,
                                                  std::span<const Modality> modalities,
                                                  int32_t budget, const Protection& p) {
  const int32_t n = static_cast<int32_t>(scores.size());
  if (positions.size() != scores.size() || (!modalities.empty() && modalities.size() != scores.size())) {
    return absl::InvalidArgumentError(absl::StrCat("SelectTokens: ", scores.size(), " scores, ",
                                                   positions.size(), " positions, ",
                                                   modalities.size(), " modalities"));
  }
  if (budget < 0) {
    return absl::InvalidArgumentError(absl::StrCat("SelectTokens: budget ", budget, " < 0"));
  }
  if (p.sinks < 0 || p.recent < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("SelectTokens: sinks ", p.sinks, " / recent ", p.recent, " must be >= 0"));
  }
  for (int m = 0; m < kNumModalities; ++m) {
    const float r = p.modality_keep[m];
    if (r >= 0.0f ? r > 1.0f : !(r < 0.0f)) {
      return absl::InvalidArgumentError(absl::StrCat("SelectTokens: modality_keep[",
                                                     ModalityName(static_cast<Modality>(m)),
                                                     "] = ", r, " is outside [0, 1]"));
    }
  }
  auto modality = [&](int32_t i) { return modalities.empty() ? Modality::kText : modalities[i]; };
  std::vector<uint8_t> keep(n, 0);
  int32_t kept = 0;
  std::vector<int32_t> candidates;
  candidates.reserve(n);
  std::array<int32_t, kNumModalities> count{};
  for (int32_t i = 0; i < n; ++i) {
    const Modality m = modality(i);
    const bool is_protected = i < p.sinks || i >= n - p.recent ||
                              (p.protect_text && m == Modality::kText) ||
                              (p.visual_only && !IsVisual(m));
    if (is_protected) {
      keep[i] = 1;
      ++kept;
    } else {
      candidates.push_back(i);
      ++count[static_cast<int>(m)];
    }
  }
  std::array<int32_t, kNumModalities> cap{};
  bool capped = false;
  for (int m = 0; m < kNumModalities; ++m) {
    cap[m] = p.modality_keep[m] < 0.0f
                 ? count[m]
                 : static_cast<int32_t>(std::round(double{p.modality_keep[m]} * count[m]));
    capped |= cap[m] < count[m];
  }
  const int32_t room = std::max(0, budget - kept);
  if (!capped) {
    for (int32_t i : TopK(scores, positions, candidates, room)) keep[i] = 1;
  } else {
    // Caps make the top-k depend on the order: walk the full ranking, skipping capped modalities.
    std::sort(candidates.begin(), candidates.end(), Better{scores, positions});
    int32_t taken = 0;
    for (int32_t i : candidates) {
      if (taken == room) break;
      const int m = static_cast<int>(modality(i));
      if (cap[m] == 0) continue;
      --cap[m];
      keep[i] = 1;
      ++taken;
    }
  }
  std::vector<int32_t> out;
  out.reserve(std::min(n, std::max(budget, kept)));
  for (int32_t i = 0; i < n; ++i) {
    if (keep[i]) out.push_back(i);
  }
  return out;
}

std::vector<float> Pool1D(std::span<const float> scores, int32_t kernel, Pooling pooling) {
  const int32_t n = static_cast<int32_t>(scores.size());
  std::vector<float> out(scores.begin(), scores.end());
  if (pooling == Pooling::kNone || kernel <= 1) return out;
  const int32_t half = kernel / 2;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t lo = std::max(0, i - half), hi = std::min(n - 1, i + half);
    if (pooling == Pooling::kAvg) {
      double sum = 0.0;  // out-of-range taps are the zero padding: they add 0 but count
      for (int32_t j = lo; j <= hi; ++j) sum += scores[j];
      out[i] = static_cast<float>(sum / kernel);
    } else {
      float m = scores[lo];
      for (int32_t j = lo + 1; j <= hi; ++j) {
        // NaN propagates (then ranks lowest), like torch's max_pool1d.
        if (scores[j] != scores[j] || scores[j] > m) m = scores[j];
        if (m != m) break;
      }
      out[i] = m;
    }
  }
  return out;
}

}  // namespace kvcache::policy
