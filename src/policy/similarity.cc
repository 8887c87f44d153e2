#include "src/policy/similarity.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <utility>

#include "kvcache/internal/kernel_isa.h"
#include "kvcache/internal/lane_dot.h"
#include "kvcache/policy/select.h"
#include "oneapi/tbb/parallel_for.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KVC_SIM_MULTIVERSION 1
#else
#define KVC_SIM_MULTIVERSION 0
#endif

namespace kvcache::policy {

void SquaredRowNorms(std::span<const float> rows, size_t d, std::span<double> out) {
  if (d == 0) return;
  const size_t n = rows.size() / d;
  // Eight rows at a time, each row's norm still summed over c in order (the same value as one
  // row at a time): eight independent chains of double adds instead of one (latency-bound).
  constexpr size_t kRows = 8;
  size_t j = 0;
  for (; j + kRows <= n; j += kRows) {
    const float* r = rows.data() + j * d;
    double sums[kRows] = {};
    for (size_t c = 0; c < d; ++c) {
#pragma GCC unroll 8
      for (size_t i = 0; i < kRows; ++i) sums[i] += double{r[i * d + c]} * r[i * d + c];
    }
    for (size_t i = 0; i < kRows; ++i) out[j + i] = sums[i];
  }
  for (; j < n; ++j) {
    const float* r = rows.data() + j * d;
    double sq = 0.0;
    for (size_t c = 0; c < d; ++c) sq += double{r[c]} * r[c];
    out[j] = sq;
  }
}

void UnitRowsInto(std::span<const float> rows, size_t d, std::vector<float>& unit) {
  unit.resize(rows.size());
  if (d == 0) return;
  const size_t n = rows.size() / d;
  std::copy(rows.begin() + n * d, rows.end(), unit.begin() + n * d);  // a partial last row
  thread_local std::vector<double> squared;  // reused across calls (streams of one thread)
  squared.resize(n);
  SquaredRowNorms(rows, d, squared);
  for (size_t j = 0; j < n; ++j) {
    const float* src = rows.data() + j * d;
    float* dst = unit.data() + j * d;
    const float inv = squared[j] > 0.0 ? static_cast<float>(1.0 / std::sqrt(squared[j])) : 0.0f;
    for (size_t c = 0; c < d; ++c) dst[c] = src[c] * inv;
  }
}

std::vector<float> UnitRows(std::span<const float> rows, size_t d) {
  std::vector<float> unit;
  UnitRowsInto(rows, d, unit);
  return unit;
}

float DotProduct(const float* a, const float* b, size_t d) {
  // 8 independent partial sums (one AVX / two SSE registers): the order similarity is defined by.
  return LaneDot<8>(a, b, static_cast<int64_t>(d));
}

namespace {

std::atomic<SimilarityKernel> g_kernel{SimilarityKernel::kBlocked};

// ---- Screening tiles -------------------------------------------------------------------------

constexpr int kPanel = 16;   // candidates per panel: two AVX2 vectors, four SSE vectors
constexpr int kMaxRows = 8;  // query rows per register tile (AVX-512 8, AVX2 4, SSE2 2)

// out [R, kPanel] = R query rows x the kPanel candidates of one panel [d, kPanel] (a candidate
// per column, zero columns past the last candidate). One accumulator per pair, summed over the
// channels in order: R * kPanel independent sums, so no horizontal reduction is needed. Written
// with GCC vector types so the accumulators stay in registers (a float[R][kPanel] array is kept
// in memory by GCC, one store per FMA).
using V4 = float __attribute__((vector_size(16)));
using V8 = float __attribute__((vector_size(32)));
using V16 = float __attribute__((vector_size(64)));

template <typename V, int R>
inline void PanelDots(const float* const* q, const float* panel, size_t d, float* out) {
  constexpr int kVec = static_cast<int>(sizeof(V) / sizeof(float));
  constexpr int kCols = kPanel / kVec;
  V acc[R][kCols];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 16
    for (int v = 0; v < kCols; ++v) acc[i][v] = V{};
  }
  for (size_t c = 0; c < d; ++c) {
    V p[kCols];
#pragma GCC unroll 16
    for (int v = 0; v < kCols; ++v) std::memcpy(&p[v], panel + c * kPanel + v * kVec, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const float x = q[i][c];
      V qv;  // broadcast (brace form: GCC emits one broadcast, not a chain of inserts)
      if constexpr (kVec == 4) {
        qv = V{x, x, x, x};
      } else if constexpr (kVec == 8) {
        qv = V{x, x, x, x, x, x, x, x};
      } else {
        qv = V{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
      }
#pragma GCC unroll 16
      for (int v = 0; v < kCols; ++v) acc[i][v] += qv * p[v];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
#pragma GCC unroll 16
    for (int v = 0; v < kCols; ++v) {
      std::memcpy(out + i * kPanel + v * kVec, &acc[i][v], sizeof(V));
    }
  }
}


using PanelFn = void (*)(const float* const*, const float*, size_t, float*);

// SSE2: 2 rows x 16 columns = 8 xmm accumulators.
void PanelDotsBase(const float* const* q, const float* panel, size_t d, float* out) {
  PanelDots<V4, 2>(q, panel, d, out);
}

#if KVC_SIM_MULTIVERSION
// AVX2 + FMA: 4 rows x 16 columns = 8 ymm accumulators. (FMA rounds differently from the SSE2
// copy; step 2 of the search makes the result independent of it.)
__attribute__((target("avx2,fma"), flatten)) void PanelDotsAvx2(const float* const* q,
                                                                const float* panel, size_t d,
                                                                float* out) {
  PanelDots<V8, 4>(q, panel, d, out);
}
// AVX-512: 8 rows x 16 columns = 8 zmm accumulators, twice the multiply-adds per FMA of AVX2.
__attribute__((target("avx512f,avx2,fma"), flatten)) void PanelDotsAvx512(const float* const* q,
                                                                          const float* panel,
                                                                          size_t d, float* out) {
  PanelDots<V16, 8>(q, panel, d, out);
}
#endif

struct TileKernel {
  PanelFn fn;
  int rows;
};

TileKernel PickKernel() {
#if KVC_SIM_MULTIVERSION
  // The CPU kernels' one detection and cap (cpu::LimitKernelIsa lowers it for tests).
  const cpu::KernelIsa isa = cpu::ActiveKernelIsa();
  const bool has_avx2 = isa >= cpu::KernelIsa::kAvx2;
  const bool has_avx512 = isa >= cpu::KernelIsa::kAvx512;
  if (GetSimilarityKernel() != SimilarityKernel::kPortable) {
    if (has_avx512 && GetSimilarityKernel() != SimilarityKernel::kBlockedAvx2) {
      return {PanelDotsAvx512, 8};
    }
    if (has_avx2) return {PanelDotsAvx2, 4};
  }
#endif
  return {PanelDotsBase, 2};
}

// Rows whose entries are all finite with squared norm <= 4 ("regular"; every row of UnitRows
// without a NaN) go through the tiles: their products are bounded, so no tile sum overflows and
// the error bound holds. Others (NaN rows) are verified directly, never screened.
struct RowClasses {
  std::vector<double> norm;      // [n]
  std::vector<uint8_t> regular;  // [n]
};

void ClassifyRows(std::span<const float> unit, size_t d, size_t n, RowClasses& rc) {
  rc.norm.assign(n, 0.0);
  rc.regular.assign(n, 0);
  constexpr size_t kLanes = 4;  // independent sums: vectorised, no chain of dependent adds
  for (size_t j = 0; j < n; ++j) {
    const float* r = unit.data() + j * d;
    double lanes[kLanes] = {};
    size_t c = 0;
    for (; c + kLanes <= d; c += kLanes) {
      for (size_t l = 0; l < kLanes; ++l) lanes[l] += double{r[c + l]} * r[c + l];
    }
    for (; c < d; ++c) lanes[0] += double{r[c]} * r[c];
    const double sq = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    rc.regular[j] = sq <= 4.0;  // false for NaN and inf
    // An upper bound of the norm: the double sum of d float squares is exact to ~d * 2^-53.
    rc.norm[j] = rc.regular[j] ? std::sqrt(sq) * (1.0 + 1e-9) : 0.0;
  }
}

// Twice the largest possible difference between two summation orders of a . b over d terms with
// |a| <= na, |b| <= nb: 2 * gamma(d + 1) * na * nb (plus an absolute term for underflow), doubled
// again so the float rounding of `best - margin` cannot eat into it.
double Margin(size_t d, double na, double nb) {
  const double u = std::ldexp(1.0, -24);
  const double nu = static_cast<double>(d + 1) * u;
  const double gamma = nu / (1.0 - std::min(nu, 0.5));
  return 4.0 * gamma * na * nb + 1e-30;
}

// panels [tiles, d, kPanel]: the rows `rows[]` transposed, kPanel per panel, zero padded.
void PackPanels(std::span<const float> unit, size_t d, std::span<const int32_t> rows,
                std::vector<float>& panels) {
  const size_t tiles = (rows.size() + kPanel - 1) / kPanel;
  panels.assign(tiles * d * kPanel, 0.0f);
  for (size_t s = 0; s < rows.size(); ++s) {
    const float* src = unit.data() + static_cast<size_t>(rows[s]) * d;
    float* dst = panels.data() + (s / kPanel) * d * kPanel + s % kPanel;
    for (size_t c = 0; c < d; ++c) dst[c * kPanel] = src[c];
  }
}

// Whether a[w] >= b[w] for some w < kPanel (SSE compares; a, b 16-byte aligned).
inline bool AnyAtLeast(const float* a, const float* b) {
  using V4i = int32_t __attribute__((vector_size(16)));
  V4i any = V4i{};
  for (int w = 0; w < kPanel; w += 4) {
    V4 x, y;
    std::memcpy(&x, a + w, sizeof(V4));
    std::memcpy(&y, b + w, sizeof(V4));
    any |= x >= y;
  }
  return (any[0] | any[1] | any[2] | any[3]) != 0;
}

// Per query row of a tile block: what step 1 keeps.
struct Screen {
  float best = -INFINITY;  // running maximum (nearest) / k-th best (top-k) of the screened sims
  float threshold = -INFINITY;  // best - margin: a candidate below it cannot be chosen
  size_t next_prune = 0;        // kept.size() at which the next pruning pass runs
  std::vector<std::pair<float, int32_t>> kept;  // (screened sim, candidate), candidate ascending
  std::vector<float> top;                       // top-k only: see TopKOffer

  void Reset(size_t first_prune) {
    best = threshold = -INFINITY;
    next_prune = first_prune;
    kept.clear();
    top.clear();
  }
};

void Prune(Screen& s) {
  std::erase_if(s.kept, [&](const std::pair<float, int32_t>& e) { return e.first < s.threshold; });
}

// Top-k screening: `top` holds the k best screened sims so far, sorted descending (k is small:
// a sorted insert moves at most k floats, cheaper than a heap's unpredictable sift); every
// candidate at or above top.back() - margin is appended to `kept`, which is pruned to the
// current threshold whenever it has doubled.
void TopKOffer(Screen& s, int32_t k, double margin, float sim, int32_t j) {
  s.kept.push_back({sim, j});
  std::vector<float>& top = s.top;
  if (static_cast<int32_t>(top.size()) == k) {
    if (!(sim > top.back())) return;
    top.pop_back();
  }
  // Insert after every entry >= sim (upper_bound in descending order): a vectorised count, no
  // data-dependent branches.
  size_t pos = 0;
  for (size_t i = 0; i < top.size(); ++i) pos += top[i] >= sim;
  top.insert(top.begin() + static_cast<std::ptrdiff_t>(pos), sim);
  if (static_cast<int32_t>(top.size()) < k) return;
  s.best = top.back();
  s.threshold = static_cast<float>(double{s.best} - margin);
  if (s.kept.size() >= s.next_prune) {
    Prune(s);
    s.next_prune = std::max(s.next_prune, 2 * s.kept.size());
  }
}

// Streams over panels [tile_begin, tile_end) for `block` query rows and calls offer(row, sim,
// candidate index) for every pair at or above the row's threshold.
template <typename Offer>
void ScreenBlock(const TileKernel& kernel, std::span<const float> unit, size_t d,
                 std::span<const int32_t> block, const std::vector<float>& panels,
                 size_t num_candidates, size_t tile_begin, size_t tile_end,
                 std::span<Screen> screens, Offer&& offer) {
  const float* q[kMaxRows];
  const int nq = static_cast<int>(block.size());
  // Rows past the end repeat the last one (computed, not used) so the tile shape is fixed.
  for (int i = 0; i < kernel.rows; ++i) {
    q[i] = unit.data() + static_cast<size_t>(block[std::min(i, nq - 1)]) * d;
  }
  alignas(64) float out[kMaxRows * kPanel];
  for (size_t t = tile_begin; t < tile_end; ++t) {
    kernel.fn(q, panels.data() + t * d * kPanel, d, out);
    const int nb = static_cast<int>(std::min<size_t>(kPanel, num_candidates - t * kPanel));
    for (int i = 0; i < nq; ++i) {
      const float* row = out + i * kPanel;
      alignas(64) float threshold[kPanel];
      std::fill(threshold, threshold + kPanel, screens[i].threshold);
      if (!AnyAtLeast(row, threshold)) continue;  // the common case once the row has warmed up
      for (int w = 0; w < nb; ++w) {
        if (row[w] >= screens[i].threshold) offer(i, row[w], static_cast<int32_t>(t * kPanel + w));
      }
    }
  }
}

// One row of the reference kNN: the k best eligible j != i by DotProduct, ranked as TopK.
std::vector<int32_t> TopKRowReference(std::span<const float> unit, size_t d, int32_t i,
                                      std::span<const uint8_t> eligible, int32_t k,
                                      std::vector<float>& sim, std::vector<int32_t>& index) {
  const int32_t n = static_cast<int32_t>(eligible.size());
  sim.resize(n);
  if (static_cast<int32_t>(index.size()) != n) {
    index.resize(n);
    std::iota(index.begin(), index.end(), 0);
  }
  std::vector<int32_t> others;
  for (int32_t j = 0; j < n; ++j) {
    if (j == i || !eligible[j]) continue;
    sim[j] = DotProduct(unit.data() + static_cast<size_t>(i) * d,
                        unit.data() + static_cast<size_t>(j) * d, d);
    others.push_back(j);
  }
  return TopK(sim, index, others, k);
}

int32_t NearestRowReference(std::span<const float> unit, size_t d, int32_t q,
                            std::span<const int32_t> candidates) {
  int32_t best = 0;
  float best_sim = -INFINITY;
  const float* a = unit.data() + static_cast<size_t>(q) * d;
  for (size_t s = 0; s < candidates.size(); ++s) {
    const float dot = DotProduct(a, unit.data() + static_cast<size_t>(candidates[s]) * d, d);
    if (dot > best_sim) {  // strict: ties keep the earlier slot; NaN never wins
      best_sim = dot;
      best = static_cast<int32_t>(s);
    }
  }
  return best;
}

struct Scratch {
  RowClasses rows;
  std::vector<float> panels;
  std::vector<int32_t> screened, direct, normal_queries;
  std::vector<float> sim;
  std::vector<int32_t> pos, local, index, order;
  std::vector<Screen> screens;
};

}  // namespace

namespace reference {

void NearestRows(std::span<const float> unit, size_t d, std::span<const int32_t> queries,
                 std::span<const int32_t> candidates, std::span<int32_t> best) {
  for (size_t q = 0; q < queries.size(); ++q) {
    best[q] = NearestRowReference(unit, d, queries[q], candidates);
  }
}

std::vector<std::vector<int32_t>> TopKSimilarRows(std::span<const float> unit, size_t d,
                                                  std::span<const int32_t> queries,
                                                  std::span<const uint8_t> eligible, int32_t k) {
  std::vector<std::vector<int32_t>> out(queries.size());
  std::vector<float> sim;
  std::vector<int32_t> index;
  for (size_t q = 0; q < queries.size(); ++q) {
    out[q] = TopKRowReference(unit, d, queries[q], eligible, k, sim, index);
  }
  return out;
}

}  // namespace reference

void NearestRows(std::span<const float> unit, size_t d, std::span<const int32_t> queries,
                 std::span<const int32_t> candidates, std::span<int32_t> best) {
  if (GetSimilarityKernel() == SimilarityKernel::kReference || candidates.empty() || d == 0) {
    reference::NearestRows(unit, d, queries, candidates, best);
    return;
  }
  thread_local Scratch sc;
  const size_t n = d == 0 ? 0 : unit.size() / d;
  ClassifyRows(unit, d, n, sc.rows);
  const RowClasses& rc = sc.rows;
  // Candidates are screened by slot: screened[] and direct[] hold slots into `candidates`.
  sc.screened.clear();
  sc.direct.clear();
  double nc = 0.0, nq = 0.0;
  std::vector<int32_t>& rows = sc.pos;  // the screened candidates' row indices
  rows.clear();
  for (size_t s = 0; s < candidates.size(); ++s) {
    const int32_t j = candidates[s];
    if (rc.regular[j]) {
      sc.screened.push_back(static_cast<int32_t>(s));
      rows.push_back(j);
      nc = std::max(nc, rc.norm[j]);
    } else {
      sc.direct.push_back(static_cast<int32_t>(s));
    }
  }
  sc.normal_queries.clear();
  for (size_t q = 0; q < queries.size(); ++q) {
    if (rc.regular[queries[q]]) {
      sc.normal_queries.push_back(static_cast<int32_t>(q));
      nq = std::max(nq, rc.norm[queries[q]]);
    } else {
      best[q] = NearestRowReference(unit, d, queries[q], candidates);
    }
  }
  const double margin = Margin(d, nq, nc);
  PackPanels(unit, d, rows, sc.panels);
  const TileKernel kernel = PickKernel();
  const size_t num_queries = sc.normal_queries.size();
  std::vector<Screen>& screens = sc.screens;
  screens.resize(num_queries);
  for (Screen& s : screens) s.Reset(32);
  sc.local.resize(num_queries);  // the regular queries' rows
  for (size_t i = 0; i < num_queries; ++i) sc.local[i] = queries[sc.normal_queries[i]];
  // Panels in groups that stay in L1 (kGroup x d x kPanel floats: 32 KiB at d = 128) while every
  // query block runs against them; each query still sees the candidates in slot order.
  constexpr size_t kGroup = 4;
  const size_t tiles = (rows.size() + kPanel - 1) / kPanel;
  for (size_t g = 0; g < tiles; g += kGroup) {
    for (size_t b = 0; b < num_queries; b += kernel.rows) {
      const size_t nb = std::min<size_t>(kernel.rows, num_queries - b);
      Screen* st = screens.data() + b;
      ScreenBlock(kernel, unit, d, std::span<const int32_t>(sc.local).subspan(b, nb), sc.panels,
                  rows.size(), g, std::min(tiles, g + kGroup), std::span<Screen>(st, nb),
                  [&](int i, float sim, int32_t c) {
                    Screen& s = st[i];
                    s.kept.push_back({sim, sc.screened[c]});
                    if (sim > s.best) {
                      s.best = sim;
                      s.threshold = static_cast<float>(double{sim} - margin);
                      if (s.kept.size() >= s.next_prune) {
                        Prune(s);
                        s.next_prune = std::max(s.next_prune, 2 * s.kept.size());
                      }
                    }
                  });
    }
  }
  std::vector<int32_t>& verify = sc.order;
  for (size_t i = 0; i < num_queries; ++i) {
    Screen& s = screens[i];
    Prune(s);
    // Verify: the survivors and the unscreened candidates, in slot order, as the reference.
    verify.clear();
    for (const auto& e : s.kept) verify.push_back(e.second);
    verify.insert(verify.end(), sc.direct.begin(), sc.direct.end());
    std::sort(verify.begin(), verify.end());
    const float* a = unit.data() + static_cast<size_t>(sc.local[i]) * d;
    int32_t best_slot = 0;
    float best_sim = -INFINITY;
    for (int32_t slot : verify) {
      const float dot = DotProduct(a, unit.data() + static_cast<size_t>(candidates[slot]) * d, d);
      if (dot > best_sim) {
        best_sim = dot;
        best_slot = slot;
      }
    }
    best[sc.normal_queries[i]] = best_slot;
  }
}

std::vector<std::vector<int32_t>> TopKSimilarRows(std::span<const float> unit, size_t d,
                                                  std::span<const int32_t> queries,
                                                  std::span<const uint8_t> eligible, int32_t k) {
  if (GetSimilarityKernel() == SimilarityKernel::kReference || k <= 0 || d == 0) {
    return reference::TopKSimilarRows(unit, d, queries, eligible, k);
  }
  std::vector<std::vector<int32_t>> out(queries.size());
  thread_local Scratch sc;
  const size_t n = eligible.size();
  ClassifyRows(unit, d, n, sc.rows);
  const RowClasses& rc = sc.rows;
  sc.screened.clear();
  sc.direct.clear();
  double nc = 0.0, nq = 0.0;
  for (size_t j = 0; j < n; ++j) {
    if (!eligible[j]) continue;
    if (rc.regular[j]) {
      sc.screened.push_back(static_cast<int32_t>(j));
      nc = std::max(nc, rc.norm[j]);
    } else {
      sc.direct.push_back(static_cast<int32_t>(j));
    }
  }
  sc.normal_queries.clear();
  sc.local.clear();  // the regular query rows
  for (size_t q = 0; q < queries.size(); ++q) {
    if (rc.regular[queries[q]]) {
      sc.normal_queries.push_back(static_cast<int32_t>(q));
      sc.local.push_back(queries[q]);
      nq = std::max(nq, rc.norm[queries[q]]);
    } else {
      out[q] = TopKRowReference(unit, d, queries[q], eligible, k, sc.sim, sc.index);
    }
  }
  const double margin = Margin(d, nq, nc);
  // The queries (the kept tokens: few) are the panels, the candidates (every token of the
  // image: many) stream through the tiles row by row — packing the small side.
  PackPanels(unit, d, sc.local, sc.panels);
  const TileKernel kernel = PickKernel();
  const size_t num_queries = sc.local.size();
  const size_t tiles = (num_queries + kPanel - 1) / kPanel;
  const size_t first_prune = 2 * static_cast<size_t>(k) + 32;
  std::vector<Screen>& screens = sc.screens;
  screens.resize(num_queries);
  for (Screen& s : screens) s.Reset(first_prune);
  auto offer = [&](Screen& s, int32_t self, float sim, int32_t j) {
    if (j == self) return;  // a row is not its own neighbour
    TopKOffer(s, k, margin, sim, j);
  };
  const float* rows[kMaxRows];
  alignas(64) float tile[kMaxRows * kPanel];
  const size_t num_candidates = sc.screened.size();
  const int32_t* screened = sc.screened.data();
  const int32_t* query_rows = sc.local.data();
  const float* panels = sc.panels.data();
  for (size_t b = 0; b < num_candidates; b += kernel.rows) {
    const int nb = static_cast<int>(std::min<size_t>(kernel.rows, num_candidates - b));
    // Rows past the end repeat the last one (computed, not used) so the tile shape is fixed.
    for (int i = 0; i < kernel.rows; ++i) {
      rows[i] = unit.data() + static_cast<size_t>(screened[b + std::min(i, nb - 1)]) * d;
    }
    for (size_t t = 0; t < tiles; ++t) {
      kernel.fn(rows, panels + t * d * kPanel, d, tile);
      const int nw = static_cast<int>(std::min<size_t>(kPanel, num_queries - t * kPanel));
      Screen* st = screens.data() + t * kPanel;
      alignas(64) float threshold[kPanel];
      for (int w = 0; w < kPanel; ++w) threshold[w] = w < nw ? st[w].threshold : INFINITY;
      for (int i = 0; i < nb; ++i) {  // candidates in ascending order
        const float* sim = tile + i * kPanel;
        if (!AnyAtLeast(sim, threshold)) continue;  // the common case once warmed up
        for (int w = 0; w < nw; ++w) {
          if (sim[w] < threshold[w]) continue;
          offer(st[w], query_rows[t * kPanel + w], sim[w], screened[b + i]);
          threshold[w] = st[w].threshold;
        }
      }
    }
  }
  for (size_t qi = 0; qi < num_queries; ++qi) {
    Screen& s = screens[qi];
    Prune(s);
    // Verify: exact similarities of the survivors and the unscreened rows, ranked by TopK.
    const int32_t self = sc.local[qi];
    const float* a = unit.data() + static_cast<size_t>(self) * d;
    sc.sim.clear();
    sc.pos.clear();
    for (const auto& e : s.kept) sc.pos.push_back(e.second);
    for (int32_t j : sc.direct) {
      if (j != self) sc.pos.push_back(j);
    }
    for (int32_t j : sc.pos) {
      sc.sim.push_back(DotProduct(a, unit.data() + static_cast<size_t>(j) * d, d));
    }
    sc.order.resize(sc.pos.size());
    std::iota(sc.order.begin(), sc.order.end(), 0);
    std::vector<int32_t>& res = out[sc.normal_queries[qi]];
    res = TopK(sc.sim, sc.pos, sc.order, k);
    for (int32_t& x : res) x = sc.pos[x];
  }
  return out;
}

void SetSimilarityKernel(SimilarityKernel kernel) { g_kernel.store(kernel); }

SimilarityKernel GetSimilarityKernel() { return g_kernel.load(std::memory_order_relaxed); }

void ForEachStream(int32_t count, const std::function<void(int32_t)>& fn) {
  const SimilarityKernel k = GetSimilarityKernel();
  if (k == SimilarityKernel::kReference || k == SimilarityKernel::kBlockedSerial || count <= 1) {
    for (int32_t i = 0; i < count; ++i) fn(i);
    return;
  }
  oneapi::tbb::parallel_for(int32_t{0}, count, [&](int32_t i) { fn(i); });
}

}  // namespace kvcache::policy
