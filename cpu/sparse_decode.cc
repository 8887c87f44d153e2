// Query-aware sparse decode on the CPU: Quest page selection and IceFormer retrieval attention.
//
// Quest: per stream (sequence, kv head), every page gets the upper bound of q.k over its tokens
// from the page's min/max key summary, aggregated over the G query heads by MAX (so it is still
// a bound for every head). Pages are taken in decreasing bound order (ties: earlier page; NaN
// last) until they hold token_budget tokens, never fewer than 3 pages, the stream's last page
// always included; then the dense kernel runs over a sub-view of the selected pages. The sub-view
// points into the original arrays (pages, positions, scores), so score accumulation and lse are
// those of the tokens read.
//
// Retrieval: per query head, the top_k keys by q.k — from the stream's hnswlib index or an
// exact scan over every key (the baseline / oracle: ties broken by earlier token, NaN lowest) —
// then an exact softmax over the retrieved keys (logits recomputed from the stored keys).
#include "cpu/sparse_decode.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cpu/attention_common.h"
#include "kvcache/internal/kernel_isa.h"
#include "kvcache/internal/lane_dot.h"
#include "kvcache/internal/attention_math.h"
#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/parallel_for.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KVC_SPARSE_MULTIVERSION 1
#else
#define KVC_SPARSE_MULTIVERSION 0
#endif

namespace kvcache::cpu {
namespace {

constexpr int kLanes = 16;  // independent partial sums (vectorisable without -ffast-math)

// sum_i max(q[i] * mn[i], q[i] * mx[i]) over n channels.
inline float PageBound(const float* q, const float* mn, const float* mx, int n) {
  float lanes[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float a = q[i + j] * mn[i + j], b = q[i + j] * mx[i + j];
      lanes[j] += a > b ? a : b;
    }
  }
  float tail = 0.0f;
  for (; i < n; ++i) {
    const float a = q[i] * mn[i], b = q[i] * mx[i];
    tail += a > b ? a : b;
  }
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int j = 0; j < w; ++j) lanes[j] += lanes[j + w];
  }
  return lanes[0] + tail;
}

// qs [G, kw] the queries gathered to the segment's stored channels.
inline void SegmentBounds(const SegmentView& s, const float* qs, int32_t group, float* bounds) {
  const int kw = s.key_width;
  const int32_t pages = static_cast<int32_t>(CeilDiv(s.length, s.tokens_per_page));
  for (int32_t p = 0; p < pages; ++p) {
    const float* mn = s.page_key_min + static_cast<int64_t>(p) * kw;
    const float* mx = s.page_key_max + static_cast<int64_t>(p) * kw;
    float best = -INFINITY;
    for (int32_t g = 0; g < group; ++g) {
      const float b = PageBound(qs + static_cast<int64_t>(g) * kw, mn, mx, kw);
      best = b > best ? b : best;  // a NaN bound is ignored (-inf if every head's is NaN)
    }
    bounds[p] = best;
  }
}

using BoundsFn = void (*)(const SegmentView&, const float*, int32_t, float*);

__attribute__((flatten)) void SegmentBoundsBase(const SegmentView& s, const float* qs,
                                                int32_t group, float* bounds) {
  SegmentBounds(s, qs, group, bounds);
}
#if KVC_SPARSE_MULTIVERSION
__attribute__((target("avx2,fma"), flatten)) void SegmentBoundsAvx2(const SegmentView& s,
                                                                    const float* qs,
                                                                    int32_t group, float* bounds) {
  SegmentBounds(s, qs, group, bounds);
}
#endif

BoundsFn SelectBounds() {
#if KVC_SPARSE_MULTIVERSION
  if (ActiveKernelIsa() >= KernelIsa::kAvx2) return SegmentBoundsAvx2;
#endif
  return SegmentBoundsBase;
}

void GatherQuery(const SegmentView& s, const float* q, int32_t group, int32_t head_dim,
                 std::vector<float>& qs) {
  const int kw = s.key_width;
  qs.resize(static_cast<size_t>(group) * kw);
  for (int32_t g = 0; g < group; ++g) {
    for (int i = 0; i < kw; ++i) {
      const int channel = s.key_channels != nullptr ? s.key_channels[i] : i;
      qs[static_cast<size_t>(g) * kw + i] = q[static_cast<int64_t>(g) * head_dim + channel];
    }
  }
}

// "a ranks before b": larger value first, NaN last, ties by smaller index.
inline bool RanksBefore(float va, int32_t a, float vb, int32_t b) {
  const bool na = std::isnan(va), nb = std::isnan(vb);
  if (na != nb) return nb;
  if (!na && va != vb) return va > vb;
  return a < b;
}

// ---- Quest --------------------------------------------------------------------------------------

absl::Status QuestDecode(const PagedKVView& kv, const DecodeParams& params, const float* q,
                         float* out, float* lse, DenseDecodeFn dense) {
  const int32_t group = params.group_size, d = kv.head_dim;
  const int32_t num_segments = kv.stream_segment_offsets[kv.num_streams];
  for (int32_t s = 0; s < num_segments; ++s) {
    const SegmentView& seg = kv.segments[s];
    if (seg.length > 0 && (seg.page_key_min == nullptr || seg.page_key_max == nullptr)) {
      return absl::FailedPreconditionError(
          absl::StrCat("Quest decode: segment ", s, " has no page summaries (enable "
                       "CacheConfig::page_summaries)"));
    }
  }
  const BoundsFn bounds_fn = SelectBounds();
  std::vector<std::vector<SegmentView>> selected(kv.num_streams);  // per stream: sub-segments
  auto select_stream = [&](int32_t i) {
    const int32_t begin = kv.stream_segment_offsets[i], end = kv.stream_segment_offsets[i + 1];
    std::vector<float> bounds;
    std::vector<int32_t> page_tokens;
    std::vector<int32_t> segment_first_page;  // stream page index of each segment's first page
    std::vector<float> qs;
    for (int32_t sidx = begin; sidx < end; ++sidx) {
      const SegmentView& s = kv.segments[sidx];
      segment_first_page.push_back(static_cast<int32_t>(bounds.size()));
      const int32_t pages = static_cast<int32_t>(CeilDiv(s.length, s.tokens_per_page));
      if (pages == 0) continue;
      GatherQuery(s, q + static_cast<int64_t>(i) * group * d, group, d, qs);
      const size_t at = bounds.size();
      bounds.resize(at + pages);
      bounds_fn(s, qs.data(), group, bounds.data() + at);
      for (int32_t p = 0; p < pages; ++p) {
        page_tokens.push_back(std::min(s.tokens_per_page, s.length - p * s.tokens_per_page));
      }
    }
    segment_first_page.push_back(static_cast<int32_t>(bounds.size()));
    const std::vector<int32_t> keep =
        QuestSelectPages(bounds, page_tokens, params.read_policy.token_budget);
    // Runs of consecutive selected pages inside one segment become one sub-segment.
    std::vector<SegmentView>& views = selected[i];
    size_t k = 0;
    for (int32_t sidx = begin; sidx < end; ++sidx) {
      const SegmentView& s = kv.segments[sidx];
      const int32_t first = segment_first_page[sidx - begin];
      const int32_t last = segment_first_page[sidx - begin + 1];
      while (k < keep.size() && keep[k] < last) {
        const int32_t run_begin = keep[k];
        int32_t run_end = run_begin + 1;
        ++k;
        while (k < keep.size() && keep[k] == run_end && run_end < last) {
          ++run_end;
          ++k;
        }
        const int32_t p0 = run_begin - first, p1 = run_end - first;  // segment page range
        const int32_t t0 = p0 * s.tokens_per_page;
        const int32_t t1 = std::min(s.length, p1 * s.tokens_per_page);
        SegmentView v = s;
        v.pages = s.pages + p0;
        v.positions = s.positions != nullptr ? s.positions + t0 : nullptr;
        v.modalities = s.modalities != nullptr ? s.modalities + t0 : nullptr;
        v.scores = s.scores != nullptr ? s.scores + t0 : nullptr;
        v.page_key_min = s.page_key_min + static_cast<int64_t>(p0) * s.key_width;
        v.page_key_max = s.page_key_max + static_cast<int64_t>(p0) * s.key_width;
        v.length = t1 - t0;
        views.push_back(v);
      }
    }
  };
  if (kv.num_streams == 1) {
    select_stream(0);
  } else {
    oneapi::tbb::parallel_for(0, kv.num_streams, select_stream);
  }
  std::vector<int32_t> offsets{0};
  std::vector<SegmentView> views;
  for (const auto& v : selected) {
    views.insert(views.end(), v.begin(), v.end());
    offsets.push_back(static_cast<int32_t>(views.size()));
  }
  PagedKVView sub = kv;
  sub.stream_segment_offsets = offsets.data();
  sub.segments = views.data();
  DecodeParams dense_params = params;
  dense_params.read_policy = ReadPolicy{};
  dense_params.key_indexes = nullptr;
  return dense(sub, dense_params, q, out, lse);
}

// ---- Retrieval ----------------------------------------------------------------------------------

// A stream's tokens in order: segment index (into kv.segments) and first token of each.
struct StreamMap {
  std::vector<int32_t> segment;
  std::vector<int32_t> start;
  int32_t length = 0;
  void Build(const PagedKVView& kv, int32_t stream) {
    segment.clear();
    start.clear();
    length = 0;
    for (int32_t s = kv.stream_segment_offsets[stream]; s < kv.stream_segment_offsets[stream + 1];
         ++s) {
      segment.push_back(s);
      start.push_back(length);
      length += kv.segments[s].length;
    }
  }
  // (segment index into kv.segments, row) of token t.
  std::pair<int32_t, int32_t> Locate(int32_t t) const {
    const size_t k =
        static_cast<size_t>(std::upper_bound(start.begin(), start.end(), t) - start.begin()) - 1;
    return {segment[k], t - start[k]};
  }
};

// Row of `width` stored elements as floats.
inline void LoadRow(const uint8_t* row, DType t, int width, float* out) {
  for (int i = 0; i < width; ++i) out[i] = LoadAsFloat(row, t, i);
}

// q [head_dim] . stored key of (segment s, row), over the stored channels.
inline float KeyLogit(const PoolView& pool, const SegmentView& s, int32_t row, const float* q,
                      float* buffer) {
  LoadRow(SegmentKeyRow(pool, s, row), pool.dtype, s.key_width, buffer);
  float dot = 0.0f;
  for (int i = 0; i < s.key_width; ++i) {
    dot += q[s.key_channels != nullptr ? s.key_channels[i] : i] * buffer[i];
  }
  return dot;
}

// Exact scan of rows [row_begin, row_end) of segment s: logits[g * lstride + r - row_begin] =
// qs_g . key(r) for the G heads; qs [G, key_width] gathered to the stored channels.
template <DType kT>
inline void ScanRows(const PoolView& pool, const SegmentView& s, int32_t row_begin,
                     int32_t row_end, const float* qs, int32_t group, float* logits,
                     int64_t lstride, float* row) {
  const int kw = s.key_width;
  for (int32_t r = row_begin; r < row_end; ++r) {
    const uint8_t* k = SegmentKeyRow(pool, s, r);
    const float* kf;
    if constexpr (kT == DType::kF32) {
      kf = reinterpret_cast<const float*>(k);
    } else {
      const auto* bits = reinterpret_cast<const uint16_t*>(k);
      for (int i = 0; i < kw; ++i) {
        if constexpr (kT == DType::kF16) {
          row[i] = HalfBitsToFloat(bits[i]);
        } else {
          row[i] = BF16BitsToFloat(bits[i]);
        }
      }
      kf = row;
    }
    for (int32_t g = 0; g < group; ++g) {
      logits[g * lstride + (r - row_begin)] = LaneDot<kLanes>(qs + int64_t{g} * kw, kf, kw);
    }
  }
}

using ScanFn = void (*)(const PoolView&, const SegmentView&, int32_t, int32_t, const float*,
                        int32_t, float*, int64_t, float*);

#define KVC_SCAN_VARIANT(name, attrs, type)                                                   \
  attrs void name(const PoolView& p, const SegmentView& s, int32_t b, int32_t e,             \
                  const float* qs, int32_t g, float* l, int64_t ls, float* row) {             \
    ScanRows<type>(p, s, b, e, qs, g, l, ls, row);                                            \
  }
KVC_SCAN_VARIANT(ScanBaseF32, __attribute__((flatten)), DType::kF32)
KVC_SCAN_VARIANT(ScanBaseF16, __attribute__((flatten)), DType::kF16)
KVC_SCAN_VARIANT(ScanBaseBF16, __attribute__((flatten)), DType::kBF16)
#if KVC_SPARSE_MULTIVERSION
KVC_SCAN_VARIANT(ScanAvx2F32, __attribute__((target("avx2,fma,f16c"), flatten)), DType::kF32)
KVC_SCAN_VARIANT(ScanAvx2F16, __attribute__((target("avx2,fma,f16c"), flatten)), DType::kF16)
KVC_SCAN_VARIANT(ScanAvx2BF16, __attribute__((target("avx2,fma,f16c"), flatten)), DType::kBF16)
#endif
#undef KVC_SCAN_VARIANT

ScanFn SelectScan(DType t) {
#if KVC_SPARSE_MULTIVERSION
  if (ActiveKernelIsa() >= KernelIsa::kAvx2) return t == DType::kF32 ? ScanAvx2F32 : t == DType::kF16 ? ScanAvx2F16 : ScanAvx2BF16;
#endif
  return t == DType::kF32 ? ScanBaseF32 : t == DType::kF16 ? ScanBaseF16 : ScanBaseBF16;
}

absl::Status RetrievalDecode(const PagedKVView& kv, const DecodeParams& params, const float* q,
                             float* out, float* lse) {
  const ReadPolicy& rp = params.read_policy;
  const int32_t group = params.group_size, d = kv.head_dim;
  const float scale = ResolveScale(params.scale, d);
  if (!rp.exact_search && params.key_indexes == nullptr) {
    return absl::InvalidArgumentError("retrieval decode: no key indexes given (key_indexes null)");
  }
  std::vector<StreamMap> maps(kv.num_streams);
  for (int32_t i = 0; i < kv.num_streams; ++i) {
    maps[i].Build(kv, i);
    if (!rp.exact_search) {
      const KeyIndex* index = params.key_indexes[i];
      if (index == nullptr || index->size() != maps[i].length) {
        return absl::FailedPreconditionError(absl::StrCat(
            "retrieval decode: stream ", i, " has ", maps[i].length, " tokens but its index holds ",
            index == nullptr ? 0 : index->size()));
      }
    }
  }
  // Exact scan: every logit of every head first, [G, n] per stream (parallel over token chunks).
  std::vector<int64_t> stream_offset(kv.num_streams + 1, 0);
  for (int32_t i = 0; i < kv.num_streams; ++i) stream_offset[i + 1] = stream_offset[i] + maps[i].length;
  std::vector<float> all_logits;
  if (rp.exact_search) {
    all_logits.resize(static_cast<size_t>(stream_offset[kv.num_streams]) * group);
    struct Chunk {
      int32_t stream, segment, row_begin, row_end, token_begin;
    };
    std::vector<Chunk> chunks;
    constexpr int32_t kChunk = 1024;
    for (int32_t i = 0; i < kv.num_streams; ++i) {
      for (size_t k = 0; k < maps[i].segment.size(); ++k) {
        const SegmentView& s = kv.segments[maps[i].segment[k]];
        for (int32_t r = 0; r < s.length; r += kChunk) {
          chunks.push_back({i, maps[i].segment[k], r, std::min(s.length, r + kChunk),
                            maps[i].start[k] + r});
        }
      }
    }
    const ScanFn scan = SelectScan(kv.pool.dtype);
    oneapi::tbb::parallel_for(size_t{0}, chunks.size(), [&](size_t c) {
      const Chunk& ch = chunks[c];
      const SegmentView& s = kv.segments[ch.segment];
      std::vector<float> qs, row(s.key_width);
      GatherQuery(s, q + static_cast<int64_t>(ch.stream) * group * d, group, d, qs);
      const int64_t n = maps[ch.stream].length;
      float* logits = all_logits.data() + stream_offset[ch.stream] * group;  // [G, n]
      scan(kv.pool, s, ch.row_begin, ch.row_end, qs.data(), group, logits + ch.token_begin, n,
           row.data());
    });
  }
  // Per (stream, head): retrieve, then exact softmax over the retrieved keys.
  int32_t longest = 0;
  for (const StreamMap& m : maps) longest = std::max(longest, m.length);
  // Slots per head: top_k retrieved plus the always-read sinks and recent window, bounded by
  // what exists.
  const int32_t k_max = std::max(
      1, static_cast<int32_t>(std::min<int64_t>(
             int64_t{rp.top_k} + std::max(0, rp.sink_tokens) + std::max(0, rp.recent_tokens),
             longest)));
  std::vector<int32_t> retrieved(static_cast<size_t>(kv.num_streams) * group * k_max);
  std::vector<float> retrieved_prob(retrieved.size());
  std::vector<int32_t> retrieved_count(static_cast<size_t>(kv.num_streams) * group, 0);
  oneapi::tbb::parallel_for(0, kv.num_streams * group, [&](int32_t task) {
    const int32_t i = task / group, g = task % group;
    const StreamMap& map = maps[i];
    const int32_t n = map.length;
    const float* qg = q + (static_cast<int64_t>(i) * group + g) * d;  // [head_dim]
    float* og = out + (static_cast<int64_t>(i) * group + g) * d;      // [head_dim]
    int32_t* ids = retrieved.data() + static_cast<size_t>(task) * k_max;
    float* probs = retrieved_prob.data() + static_cast<size_t>(task) * k_max;
    const int32_t k = std::min(rp.top_k, n);
    int32_t count = 0;
    const float* lg = rp.exact_search ? all_logits.data() + stream_offset[i] * group +
                                            static_cast<int64_t>(g) * n
                                      : nullptr;  // [n] this head's exact logits (unscaled)
    if (rp.exact_search) {
      std::vector<int32_t> order(n);
      std::iota(order.begin(), order.end(), 0);
      auto before = [&](int32_t a, int32_t b) { return RanksBefore(lg[a], a, lg[b], b); };
      if (k < n) std::nth_element(order.begin(), order.begin() + k, order.end(), before);
      std::copy(order.begin(), order.begin() + k, ids);
      count = k;
    } else {
      count = params.key_indexes[i]->Search(qg, k, ids);
    }
    // Optional always-read sinks and recent window (0 by default: the retrieved set only).
    std::sort(ids, ids + count);
    const int32_t sinks = std::min(std::max(0, rp.sink_tokens), n);
    const int32_t recent_begin = std::max(sinks, n - std::max(0, rp.recent_tokens));
    if (sinks > 0 || recent_begin < n) {
      std::vector<int32_t> merged(ids, ids + count);
      for (int32_t t = 0; t < sinks; ++t) merged.push_back(t);
      for (int32_t t = recent_begin; t < n; ++t) merged.push_back(t);
      std::sort(merged.begin(), merged.end());
      merged.erase(std::unique(merged.begin(), merged.end()), merged.end());
      count = static_cast<int32_t>(merged.size());  // <= k_max by construction
      std::copy(merged.begin(), merged.end(), ids);
    }
    std::vector<float> logit(count);
    if (rp.exact_search) {
      for (int32_t j = 0; j < count; ++j) logit[j] = scale * lg[ids[j]];
    } else {
      std::vector<float> buffer(d);
      for (int32_t j = 0; j < count; ++j) {
        const auto [seg, row] = map.Locate(ids[j]);
        logit[j] = scale * KeyLogit(kv.pool, kv.segments[seg], row, qg, buffer.data());
      }
    }
    retrieved_count[task] = count;
    SoftmaxState state;
    std::vector<float> acc(d, 0.0f), value(d);
    for (int32_t j = 0; j < count; ++j) {
      const auto [seg, row] = map.Locate(ids[j]);
      const SegmentView& s = kv.segments[seg];
      LoadRow(SegmentValueRow(kv.pool, s, row), kv.pool.dtype, s.value_width, value.data());
      OnlineSoftmaxAccumulate(state, acc.data(), logit[j], value.data(), s.value_width);
    }
    FinalizeSoftmax(state, acc.data(), og, d);
    if (lse != nullptr) lse[static_cast<int64_t>(i) * group + g] = SoftmaxLse(state);
    for (int32_t j = 0; j < count; ++j) probs[j] = SoftmaxProbability(state, logit[j]);
  });
  if (!params.accumulate_scores) return absl::OkStatus();
  // Score accumulation over the tokens read: a head that did not retrieve a token gives it 0.
  std::vector<float> head_probs(group);
  for (int32_t i = 0; i < kv.num_streams; ++i) {
    std::vector<int32_t> tokens;
    for (int32_t g = 0; g < group; ++g) {
      const int32_t task = i * group + g;
      tokens.insert(tokens.end(), retrieved.begin() + static_cast<int64_t>(task) * k_max,
                    retrieved.begin() + static_cast<int64_t>(task) * k_max + retrieved_count[task]);
    }
    std::sort(tokens.begin(), tokens.end());
    tokens.erase(std::unique(tokens.begin(), tokens.end()), tokens.end());
    for (int32_t t : tokens) {
      for (int32_t g = 0; g < group; ++g) {
        const int32_t task = i * group + g;
        const int32_t* ids = retrieved.data() + static_cast<int64_t>(task) * k_max;
        const int32_t* hit = std::lower_bound(ids, ids + retrieved_count[task], t);
        head_probs[g] = hit != ids + retrieved_count[task] && *hit == t
                            ? retrieved_prob[static_cast<size_t>(task) * k_max + (hit - ids)]
                            : 0.0f;
      }
      const auto [seg, row] = maps[i].Locate(t);
      const SegmentView& s = kv.segments[seg];
      if (s.scores != nullptr) s.scores[row] += AggregateGqa(head_probs.data(), 1, group, params.aggregation);
    }
  }
  return absl::OkStatus();
}

}  // namespace

void QuestPageBounds(const SegmentView& s, const float* q, int32_t group, int32_t head_dim,
                     float* bounds) {
  std::vector<float> qs;
  GatherQuery(s, q, group, head_dim, qs);
  SelectBounds()(s, qs.data(), group, bounds);
}

std::vector<int32_t> QuestSelectPages(const std::vector<float>& bounds,
                                      const std::vector<int32_t>& page_tokens,
                                      int32_t token_budget) {
  const int32_t pages = static_cast<int32_t>(bounds.size());
  constexpr int32_t kMinPages = 3;
  int64_t total = 0;
  for (int32_t t : page_tokens) total += t;
  std::vector<int32_t> keep;
  if (pages <= kMinPages || total <= token_budget) {
    keep.resize(pages);
    std::iota(keep.begin(), keep.end(), 0);
    return keep;
  }
  // The last page first (always read), then the others by bound.
  keep.push_back(pages - 1);
  int64_t tokens = page_tokens[pages - 1];
  std::vector<int32_t> order(pages - 1);
  std::iota(order.begin(), order.end(), 0);
  auto before = [&](int32_t a, int32_t b) { return RanksBefore(bounds[a], a, bounds[b], b); };
  // Enough candidates for the budget: no page holds fewer than one token.
  int32_t smallest = page_tokens[0];
  for (int32_t t : page_tokens) smallest = std::min(smallest, t);
  const int64_t need = std::min<int64_t>(
      pages - 1, std::max<int64_t>(kMinPages, (token_budget + std::max(smallest, 1) - 1) /
                                                  std::max(smallest, 1) + 1));
  std::partial_sort(order.begin(), order.begin() + need, order.end(), before);
  for (int64_t j = 0; j < static_cast<int64_t>(order.size()); ++j) {
    if (tokens >= token_budget && static_cast<int32_t>(keep.size()) >= kMinPages) break;
    if (j == need) {  // ran out of sorted candidates (small pages): sort the rest too
      std::sort(order.begin() + need, order.end(), before);
    }
    keep.push_back(order[j]);
    tokens += page_tokens[order[j]];
  }
  std::sort(keep.begin(), keep.end());
  return keep;
}

void MipsTransformKey(const float* k, int32_t head_dim, float c, float* out) {
  double sq = 0.0;
  for (int32_t i = 0; i < head_dim; ++i) {
    out[i] = k[i] / c;
    sq += static_cast<double>(k[i]) * k[i];
  }
  const double rest = 1.0 - sq / (static_cast<double>(c) * c);
  out[head_dim] = static_cast<float>(std::sqrt(std::max(0.0, rest)));
}

void MipsTransformQuery(const float* q, int32_t head_dim, float* out) {
  double sq = 0.0;
  for (int32_t i = 0; i < head_dim; ++i) sq += static_cast<double>(q[i]) * q[i];
  const float inv = sq > 0.0 ? static_cast<float>(1.0 / std::sqrt(sq)) : 0.0f;
  for (int32_t i = 0; i < head_dim; ++i) out[i] = q[i] * inv;
  out[head_dim] = 0.0f;
}

absl::Status SparseDecodeAttention(const PagedKVView& kv, const DecodeParams& params,
                                   const float* q, float* out, float* lse, DenseDecodeFn dense) {
  switch (params.read_policy.kind) {
    case ReadPolicy::Kind::kQuest:
      if (params.read_policy.token_budget <= 0) {
        return absl::InvalidArgumentError(absl::StrCat("Quest decode: token_budget ",
                                                       params.read_policy.token_budget, " <= 0"));
      }
      return QuestDecode(kv, params, q, out, lse, dense);
    case ReadPolicy::Kind::kRetrieval:
      if (params.read_policy.top_k <= 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("retrieval decode: top_k ", params.read_policy.top_k, " <= 0"));
      }
      return RetrievalDecode(kv, params, q, out, lse);
    case ReadPolicy::Kind::kDense:
      return dense(kv, params, q, out, lse);
  }
  return absl::InvalidArgumentError(absl::StrCat("sparse decode: unknown read policy kind ",
                                                 static_cast<int>(params.read_policy.kind)));
}

}  // namespace kvcache::cpu
