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

namespace {

// Exactness: every similarity below is DotProduct of two unit rows, and every choice compares
// those exact values (ties to the smaller row), so the fast paths pick exactly what the plain
// loops (kReference: the baseline and oracle) pick.

float Sim(const std::vector<float>& unit, size_t d, int32_t a, int32_t b) {
  return DotProduct(&unit[static_cast<size_t>(a) * d], &unit[static_cast<size_t>(b) * d], d);
}

// The first pick: argmin over rows j of max_{i != j} cos(i, j) (the largest distance to the
// nearest other row), ties to the smaller j. rows: the finite rows, ascending, at least 2.
// Rows are visited in order with the best value so far M; row j's scan stops as soon as one
// cos(i, j) > M (then max_i cos(i, j) > M: j cannot win), so only the rows that could still win
// are scanned in full. Neighbours in index order come first (adjacent image patches tend to be
// alike, so a near copy turns up early); the products are batched (DotProducts). O(N^2 D) at
// worst (every row as isolated as the best), typically far less.
int32_t MostIsolated(const std::vector<float>& unit, size_t d, const std::vector<int32_t>& rows) {
  constexpr int kChunk = 16;
  const float* batch[kChunk];
  float sims[kChunk];
  const int32_t m = static_cast<int32_t>(rows.size());
  int32_t best = -1;
  float best_max = std::numeric_limits<float>::infinity();
  for (int32_t a = 0; a < m; ++a) {
    const float* ua = &unit[static_cast<size_t>(rows[a]) * d];
    float mx = -std::numeric_limits<float>::infinity();
    bool beaten = false;
    int count = 0;
    auto flush = [&] {
      DotProducts(ua, batch, count, d, sims);
      for (int i = 0; i < count && !beaten; ++i) {
        mx = std::max(mx, sims[i]);
        beaten = best >= 0 && mx > best_max;
      }
      count = 0;
    };
    for (int32_t r = 1; r < m && !beaten; ++r) {
      for (int32_t b : {a + r, a - r}) {
        if (b < 0 || b >= m) continue;
        batch[count++] = &unit[static_cast<size_t>(rows[b]) * d];
        if (count == kChunk) flush();
        if (beaten) break;
      }
    }
    if (!beaten && count > 0) flush();
    if (!beaten && mx < best_max) {  // strict: a tie keeps the earlier row
      best_max = mx;
      best = a;
    }
  }
  return rows[best];
}

// The same pick, every pair (the baseline).
int32_t MostIsolatedReference(const std::vector<float>& unit, size_t d,
                              const std::vector<int32_t>& rows) {
  int32_t best = -1;
  float best_max = std::numeric_limits<float>::infinity();
  for (size_t a = 0; a < rows.size(); ++a) {
    float mx = -std::numeric_limits<float>::infinity();
    for (size_t b = 0; b < rows.size(); ++b) {
      if (b != a) mx = std::max(mx, Sim(unit, d, rows[a], rows[b]));
    }
    if (mx < best_max) {
      best_max = mx;
      best = static_cast<int32_t>(a);
    }
  }
  return rows[best];
}

// The greedy max-min picks after the first: each next row minimises closest[j] = max over the
// chosen rows of cos(j, s), ties to the smaller j. Lazy: a heap holds each candidate's closest[]
// over the rows chosen when it was last refreshed — a lower bound of its current value, which
// only grows. The top is refreshed with the rows chosen since; if it still ranks before the next
// entry it is the exact minimum (every other true value is at least its bound), else it goes
// back. Only the candidates near the top are refreshed, instead of every row against every pick.
void MaxMinPicks(const std::vector<float>& unit, size_t d, const std::vector<int32_t>& rows,
                 int32_t picks, std::vector<int32_t>& order) {
  struct Entry {
    float closest;
    int32_t row;
    int32_t seen;  // closest covers order[0, seen)
  };
  constexpr int kChunk = 16;
  const float* batch[kChunk];
  float sims[kChunk];
  auto after = [](const Entry& x, const Entry& y) {  // min-heap on (closest, row)
    return x.closest != y.closest ? x.closest > y.closest : x.row > y.row;
  };
  std::vector<Entry> heap;
  heap.reserve(rows.size());
  for (int32_t j : rows) {
    if (j != order[0]) heap.push_back({-std::numeric_limits<float>::infinity(), j, 0});
  }
  std::make_heap(heap.begin(), heap.end(), after);
  while (static_cast<int32_t>(order.size()) < picks) {
    for (;;) {
      std::pop_heap(heap.begin(), heap.end(), after);
      Entry& e = heap.back();
      const float* ue = &unit[static_cast<size_t>(e.row) * d];
      for (size_t q = e.seen; q < order.size();) {
        const int count = static_cast<int>(std::min<size_t>(kChunk, order.size() - q));
        for (int i = 0; i < count; ++i) batch[i] = &unit[static_cast<size_t>(order[q + i]) * d];
        DotProducts(ue, batch, count, d, sims);
        for (int i = 0; i < count; ++i) e.closest = std::max(e.closest, sims[i]);
        q += count;
      }
      e.seen = static_cast<int32_t>(order.size());
      if (heap.size() == 1 || after(heap.front(), e)) {
        order.push_back(e.row);
        heap.pop_back();
        break;
      }
      std::push_heap(heap.begin(), heap.end(), after);
    }
  }
}

// The same picks, every candidate updated against every pick (the baseline).
void MaxMinPicksReference(const std::vector<float>& unit, size_t d,
                          const std::vector<int32_t>& rows, int32_t picks,
                          std::vector<int32_t>& order) {
  std::vector<float> closest(rows.size(), -std::numeric_limits<float>::infinity());
  std::vector<uint8_t> chosen(rows.size(), 0);
  for (size_t a = 0; a < rows.size(); ++a) chosen[a] = rows[a] == order[0];
  while (static_cast<int32_t>(order.size()) < picks) {
    const int32_t s = order.back();
    int32_t best = -1;
    for (size_t a = 0; a < rows.size(); ++a) {
      if (chosen[a]) continue;
      closest[a] = std::max(closest[a], Sim(unit, d, rows[a], s));
      if (best < 0 || closest[a] < closest[best]) best = static_cast<int32_t>(a);
    }
    chosen[best] = 1;
    order.push_back(rows[best]);
  }
}

}  // namespace

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
    for (size_t c = 0; c < d && finite[j]; ++c) {
      finite[j] = std::isfinite(unit[static_cast<size_t>(j) * d + c]) ? 1 : 0;
    }
    if (finite[j]) finite_rows.push_back(j);
  }
  const int32_t finite_picks = std::min<int32_t>(k, static_cast<int32_t>(finite_rows.size()));
  if (finite_picks > 0) {
    const bool fast = GetSimilarityKernel() != SimilarityKernel::kReference;
    order.push_back(finite_rows.size() == 1 ? finite_rows[0]
                    : fast                  ? MostIsolated(unit, d, finite_rows)
                                            : MostIsolatedReference(unit, d, finite_rows));
    if (fast) {
      MaxMinPicks(unit, d, finite_rows, finite_picks, order);
    } else {
      MaxMinPicksReference(unit, d, finite_rows, finite_picks, order);
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
