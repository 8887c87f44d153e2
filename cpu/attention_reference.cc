// Scalar reference attention kernels: plain loops, f32 accumulation, no parallelism. They are the
// oracle the fast kernels and the CUDA kernels are tested against, so clarity wins over speed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/attention.h"
#include "cpu/attention_common.h"
#include "kvcache/internal/attention_math.h"

namespace kvcache::cpu {
namespace {

// q [head_dim] . key row `token` of segment s over the channels the segment stores (the others
// read as 0, which is what channel pruning means).
float KeyDot(const PoolView& pool, const SegmentView& s, int32_t token, const float* q) {
  const uint8_t* k = SegmentKeyRow(pool, s, token);
  float dot = 0.0f;
  for (int32_t i = 0; i < s.key_width; ++i) {
    const int32_t channel = s.key_channels != nullptr ? s.key_channels[i] : i;
    dot += q[channel] * LoadAsFloat(k, pool.dtype, i);
  }
  return dot;
}

}  // namespace

absl::Status DecodeAttentionReference(const PagedKVView& kv, const DecodeParams& params,
                                      const float* q, float* out, float* lse) {
  const int32_t d = kv.head_dim;
  const int32_t group = params.group_size;
  const float scale = ResolveScale(params.scale, d);
  std::vector<float> logits;        // [G, stream length]
  std::vector<float> seg_acc(d);    // [head_dim]
  std::vector<float> acc(d);        // [head_dim]
  std::vector<float> probs(group);  // [G]
  for (int32_t i = 0; i < kv.num_streams; ++i) {
    const int32_t seg_begin = kv.stream_segment_offsets[i];
    const int32_t seg_end = kv.stream_segment_offsets[i + 1];
    const int64_t n = StreamLength(kv, i);
    logits.assign(static_cast<size_t>(group * n), 0.0f);
    std::vector<SoftmaxState> states(group);
    for (int32_t g = 0; g < group; ++g) {
      const float* qg = q + (static_cast<int64_t>(i) * group + g) * d;  // [head_dim]
      float* lg = logits.data() + g * n;                                // [n]
      std::fill(acc.begin(), acc.end(), 0.0f);
      int64_t base = 0;  // stream index of the segment's first token
      for (int32_t sidx = seg_begin; sidx < seg_end; ++sidx) {
        const SegmentView& s = kv.segments[sidx];
        if (s.length == 0) continue;
        // Each segment is a self-contained two-pass softmax piece, merged into the stream's
        // state with the log-sum-exp merge (exactly how segments combine in every kernel).
        SoftmaxState piece;
        for (int32_t t = 0; t < s.length; ++t) {
          lg[base + t] = scale * KeyDot(kv.pool, s, t, qg);
          piece.m = std::fmax(piece.m, lg[base + t]);
        }
        std::fill(seg_acc.begin(), seg_acc.end(), 0.0f);
        for (int32_t t = 0; t < s.length; ++t) {
          const float w = std::exp(lg[base + t] - piece.m);
          piece.l += w;
          const uint8_t* v = SegmentValueRow(kv.pool, s, t);
          for (int32_t c = 0; c < s.value_width; ++c) {
            seg_acc[c] += w * LoadAsFloat(v, kv.pool.dtype, c);
          }
        }
        MergeSoftmaxStates(states[g], acc.data(), piece, seg_acc.data(), d);
        base += s.length;
      }
      float* og = out + (static_cast<int64_t>(i) * group + g) * d;  // [head_dim]
      FinalizeSoftmax(states[g], acc.data(), og, d);
      if (lse != nullptr) lse[static_cast<int64_t>(i) * group + g] = SoftmaxLse(states[g]);
    }
    if (!params.accumulate_scores) continue;
    int64_t base = 0;
    for (int32_t sidx = seg_begin; sidx < seg_end; ++sidx) {
      const SegmentView& s = kv.segments[sidx];
      for (int32_t t = 0; t < s.length; ++t) {
        for (int32_t g = 0; g < group; ++g) {
          probs[g] = SoftmaxProbability(states[g], logits[g * n + base + t]);
        }
        if (s.scores != nullptr)
          s.scores[t] += AggregateGqa(probs.data(), 1, group, params.aggregation);
      }
      base += s.length;
    }
  }
  return absl::OkStatus();
}

absl::Status ScoreRowsReference(const PagedKVView& kv, const ScoreRowsParams& params,
                                const float* queries, const int32_t* query_positions,
                                float* token_scores, int64_t* below_threshold,
                                int64_t* causal_entries) {
  const int32_t d = kv.head_dim;
  const int32_t group = params.group_size;
  const int64_t q_heads = static_cast<int64_t>(kv.num_streams) * group;
  const float scale = ResolveScale(params.scale, d);
  int64_t stream_base = 0;  // index in token_scores of the stream's first token
  for (int32_t i = 0; i < kv.num_streams; ++i) {
    const int32_t seg_begin = kv.stream_segment_offsets[i];
    const int32_t seg_end = kv.stream_segment_offsets[i + 1];
    const int64_t n = StreamLength(kv, i);
    float* scores = token_scores + stream_base;  // [n]
    for (int64_t t = 0; t < n; ++t) scores[t] = 0.0f;
    std::vector<int64_t> below(group, 0), causal(group, 0);
    std::vector<float> logits(static_cast<size_t>(group * n));  // [G, n]
    std::vector<uint8_t> visible(static_cast<size_t>(n));       // [n]
    std::vector<float> probs(static_cast<size_t>(group * n));   // [G, n]
    for (int32_t r = 0; r < params.num_rows; ++r) {
      const int32_t row_position = query_positions[r];
      int64_t num_visible = 0;
      {
        int64_t t = 0;
        for (int32_t sidx = seg_begin; sidx < seg_end; ++sidx) {
          const SegmentView& s = kv.segments[sidx];
          for (int32_t j = 0; j < s.length; ++j, ++t) {
            visible[t] = s.positions[j] <= row_position;
            num_visible += visible[t];
          }
        }
      }
      if (num_visible == 0) continue;  // a row that sees no key contributes nothing
      for (int32_t g = 0; g < group; ++g) {
        const float* qg = queries + (r * q_heads + static_cast<int64_t>(i) * group + g) * d;
        float* lg = logits.data() + g * n;
        float* pg = probs.data() + g * n;
        float m = -INFINITY;
        int64_t t = 0;
        for (int32_t sidx = seg_begin; sidx < seg_end; ++sidx) {
          const SegmentView& s = kv.segments[sidx];
          for (int32_t j = 0; j < s.length; ++j, ++t) {
            if (!visible[t]) continue;
            lg[t] = scale * KeyDot(kv.pool, s, j, qg);
            m = std::fmax(m, lg[t]);
          }
        }
        float l = 0.0f;
        for (t = 0; t < n; ++t) {
          if (visible[t]) l += std::exp(lg[t] - m);
        }
        float row_max = 0.0f;
        for (t = 0; t < n; ++t) {
          pg[t] = visible[t] ? std::exp(lg[t] - m) / l : 0.0f;
          row_max = std::fmax(row_max, pg[t]);
        }
        for (t = 0; t < n; ++t) {
          if (!visible[t]) continue;
          ++causal[g];
          if (pg[t] < params.sparsity_threshold * row_max) ++below[g];
        }
      }
      for (int64_t t = 0; t < n; ++t) {
        if (visible[t]) scores[t] += AggregateGqa(probs.data() + t, n, group, params.aggregation);
      }
    }
    for (int32_t g = 0; g < group; ++g) {
      if (below_threshold != nullptr)
        below_threshold[static_cast<int64_t>(i) * group + g] = below[g];
      if (causal_entries != nullptr)
        causal_entries[static_cast<int64_t>(i) * group + g] = causal[g];
    }
    stream_base += n;
  }
  return absl::OkStatus();
}

}  // namespace kvcache::cpu
