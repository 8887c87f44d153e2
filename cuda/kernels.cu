// CUDA kernels of the CUDA backend: decode attention over paged, segmented streams (GQA, split-K
// with a log-sum-exp merge, optional score accumulation), ScoreRows' aggregation pass, row
// writes, row reads and gather/compaction. Contracts are in cuda/kernels.cuh.
//
// Thread layout of the attention kernels (one block = kThreads threads): a key row is read by a
// "row group" of kLanesPerRow consecutive lanes, each owning kChans channels of head_dim
// (vectorised kernels: kChans contiguous channels, one 16-byte load per lane; generic kernel:
// channels lane, lane + 32, ...), so a block has kRows row groups in flight, each keeping its own
// online-softmax state. The kGroupTile query heads of one block share every K/V row it reads
// (GQA). Row groups are merged through shared memory at the end with the state merge of
// attention_math.h, and key splits of one stream by a second small kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "cuda/kernels.cuh"
#include "cuda/launch.cuh"
#include "kvcache/internal/attention_math.h"

namespace kvcache::KVCACHE_CUDA_NAMESPACE {
namespace {

constexpr int kThreads = 128;
constexpr unsigned kFullMask = 0xffffffffu;
// Each split should still stream at least this many keys, or the merge costs more than it saves.
constexpr int64_t kMinTokensPerSplit = 256;
constexpr int64_t kMaxSplits = 4096;
constexpr int kMaxGridYZ = 65535;

__host__ __device__ __forceinline__ int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t Max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ---- Element access ---------------------------------------------------------------------------

template <DType kT>
struct Elem;
template <>
struct Elem<DType::kF32> {
  using Storage = float;
  static __device__ __forceinline__ float ToFloat(float x) { return x; }
};
template <>
struct Elem<DType::kF16> {
  using Storage = __half;
  static __device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
};
template <>
struct Elem<DType::kBF16> {
  using Storage = __nv_bfloat16;
  static __device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
};

template <DType kT>
__device__ __forceinline__ float LoadElem(const uint8_t* row, int i) {
  return Elem<kT>::ToFloat(reinterpret_cast<const typename Elem<kT>::Storage*>(row)[i]);
}

// The 16 bytes at p (16-byte aligned) as 16 / sizeof(element) floats.
template <DType kT>
__device__ __forceinline__ void Load16(const uint8_t* p, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if constexpr (kT == DType::kF32) {
      out[w] = __uint_as_float(words[w]);
    } else if constexpr (kT == DType::kF16) {
      out[2 * w] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[w] & 0xFFFFu)));
      out[2 * w + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[w] >> 16)));
    } else {  // bf16 is the top half of an f32: widening is a shift
      out[2 * w] = __uint_as_float(words[w] << 16);
      out[2 * w + 1] = __uint_as_float(words[w] & 0xFFFF0000u);
    }
  }
}

// Key channel c (of head_dim) of row `row` as float; 0 when the segment does not store it.
__device__ __forceinline__ float KeyChannelAsFloat(const PoolView& pool, const SegmentView& s,
                                                   int32_t row, int32_t c) {
  const uint8_t* k = SegmentKeyRow(pool, s, row);
  if (s.key_channels == nullptr) return c < s.key_width ? LoadAsFloat(k, pool.dtype, c) : 0.0f;
  // Stored channels are ascending: binary search instead of a per-call inverse map.
  int32_t lo = 0, hi = s.key_width;
  while (lo < hi) {
    const int32_t mid = (lo + hi) / 2;
    if (s.key_channels[mid] < c) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < s.key_width && s.key_channels[lo] == c ? LoadAsFloat(k, pool.dtype, lo) : 0.0f;
}

// ---- Attention thread layout ------------------------------------------------------------------

// kHeadDim 64 or 128: vectorised; 0: generic (runtime head_dim <= kMaxHeadDim).
template <DType kT, int kHeadDim>
struct Layout {
  static constexpr int kEsize = DTypeSize(kT);
  static constexpr bool kVectorized = kHeadDim > 0;
  static constexpr int kVec = kVectorized ? 16 / kEsize : 1;
  static constexpr int kLanesPerRow = kVectorized ? kHeadDim / kVec : 32;
  static constexpr int kChans = kVectorized ? kVec : kMaxHeadDim / 32;
  static constexpr int kRows = kThreads / kLanesPerRow;
  static constexpr int kSmemDim = kVectorized ? kHeadDim : kMaxHeadDim;
  static_assert(kLanesPerRow <= 32 && 32 % kLanesPerRow == 0, "a row group must fit a warp");

  static __device__ __forceinline__ int Channel(int lane, int j) {
    return kVectorized ? lane * kVec + j : lane + 32 * j;
  }
};

// The lane's channels of a full-width row (0 for channels >= d in the generic layout).
template <DType kT, int kHeadDim>
__device__ __forceinline__ void LoadLaneRow(const uint8_t* row, int lane, int d, bool aligned,
                                            float* out) {
  using L = Layout<kT, kHeadDim>;
  if constexpr (L::kVectorized) {
    if (aligned) {
      Load16<kT>(row + lane * L::kVec * L::kEsize, out);
      return;
    }
#pragma unroll
    for (int j = 0; j < L::kChans; ++j) out[j] = LoadElem<kT>(row, lane * L::kVec + j);
  } else {
#pragma unroll
    for (int j = 0; j < L::kChans; ++j) {
      const int c = lane + 32 * j;
      out[j] = c < d ? LoadElem<kT>(row, c) : 0.0f;
    }
  }
}

// Partial dot products (this lane's share) of the block's query heads with key row t of s.
// Full-width rows use the query in registers; channel-pruned rows (ThinK) walk the stored
// channels and read the query channel each one came from out of shared memory, which is what
// "q . k over the stored channels" means.
template <DType kT, int kHeadDim, int kGroupTile>
__device__ __forceinline__ void PartialKeyDots(
    const PoolView& pool, const SegmentView& s, int32_t t, int lane, int d,
    const float (&q_reg)[kGroupTile][Layout<kT, kHeadDim>::kChans],
    const float* s_q,  // [kGroupTile, kSmemDim]
    float (&dot)[kGroupTile]) {
  using L = Layout<kT, kHeadDim>;
  const uint8_t* krow = SegmentKeyRow(pool, s, t);
  if (s.key_channels == nullptr) {
    float k[L::kChans];
    // Full-width key rows are 16-byte aligned whenever a vectorised kernel is chosen (the
    // launcher checks the pool base and page size; row strides are head_dim * esize).
    LoadLaneRow<kT, kHeadDim>(krow, lane, d, /*aligned=*/true, k);
#pragma unroll
    for (int g = 0; g < kGroupTile; ++g) {
#pragma unroll
      for (int j = 0; j < L::kChans; ++j) dot[g] += q_reg[g][j] * k[j];
    }
  } else {
    for (int i = lane; i < s.key_width; i += L::kLanesPerRow) {
      const float k = LoadElem<kT>(krow, i);
      const int channel = s.key_channels[i];
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) dot[g] += s_q[g * L::kSmemDim + channel] * k;
    }
  }
}

// Sum over the lanes of a row group. Every lane of the warp must call it (full-mask shuffles).
template <int kLanesPerRow, int kGroupTile>
__device__ __forceinline__ void ReduceRowGroup(float (&dot)[kGroupTile]) {
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
#pragma unroll
    for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) {
      dot[g] += __shfl_xor_sync(kFullMask, dot[g], offset);
    }
  }
}

// Loads the block's query heads g0 .. g0 + kGroupTile - 1 of query set n, pre-scaled, into
// shared memory and the lane's channels into registers. Callers synchronise around it.
template <DType kT, int kHeadDim, int kGroupTile>
__device__ __forceinline__ void LoadQuery(
    const float* q,  // [G, d] of this query set
    int group, int g0, int d, float scale, int lane,
    float* s_q,  // [kGroupTile, kSmemDim]
    float (&q_reg)[kGroupTile][Layout<kT, kHeadDim>::kChans]) {
  using L = Layout<kT, kHeadDim>;
  for (int i = threadIdx.x; i < kGroupTile * d; i += kThreads) {
    const int g = i / d;
    const int c = i - g * d;
    s_q[g * L::kSmemDim + c] =
        g0 + g < group ? q[static_cast<int64_t>(g0 + g) * d + c] * scale : 0.0f;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
#pragma unroll
    for (int j = 0; j < L::kChans; ++j) {
      const int c = L::Channel(lane, j);
      q_reg[g][j] = c < d ? s_q[g * L::kSmemDim + c] : 0.0f;
    }
  }
}

// ---- Decode attention -------------------------------------------------------------------------

// Workspace of a split decode: acc [Q, S, G, D] then m [Q, S, G] then l [Q, S, G].
struct SplitWorkspace {
  float* acc;
  float* m;
  float* l;
};
__host__ __device__ inline SplitWorkspace CarveWorkspace(float* w, const DecodeSplit& split,
                                                         int32_t num_queries, int32_t group,
                                                         int32_t head_dim) {
  const int64_t slots = static_cast<int64_t>(num_queries) * split.num_splits * group;
  return {w, w + slots * head_dim, w + slots * head_dim + slots};
}

// Grid: x = query set, y = key split, z = tile of kGroupTile query heads.
template <DType kT, int kHeadDim, int kGroupTile>
__global__ void __launch_bounds__(kThreads)
    DecodeKernel(const AttentionArgs args, const DecodeSplit split, float* workspace) {
  using L = Layout<kT, kHeadDim>;
  const int n = blockIdx.x;
  const int split_index = blockIdx.y;
  const int g0 = blockIdx.z * kGroupTile;
  const int group = args.group_size;
  const int d = kHeadDim > 0 ? kHeadDim : args.head_dim;
  const int stream = n % args.num_streams;
  const int lane = threadIdx.x % L::kLanesPerRow;
  const int row_slot = threadIdx.x / L::kLanesPerRow;

  __shared__ float s_q[kGroupTile * L::kSmemDim];               // [tile heads, D] scaled query
  __shared__ float s_m[L::kRows * kGroupTile];                  // [rows, tile heads]
  __shared__ float s_l[L::kRows * kGroupTile];                  // [rows, tile heads]
  __shared__ float s_acc[L::kRows * kGroupTile * L::kSmemDim];  // [rows, tile heads, D]

  float q_reg[kGroupTile][L::kChans];
  LoadQuery<kT, kHeadDim, kGroupTile>(args.q + static_cast<int64_t>(n) * group * d, group, g0, d,
                                      args.scale, lane, s_q, q_reg);

  float acc[kGroupTile][L::kChans];  // unnormalised sum of exp(s - m) * v, lane's channels
  SoftmaxState state[kGroupTile];
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
#pragma unroll
    for (int j = 0; j < L::kChans; ++j) acc[g][j] = 0.0f;
  }

  const int64_t token_base = args.stream_token_offsets[stream];
  const int64_t stream_length = args.stream_token_offsets[stream + 1] - token_base;
  const int64_t chunk_begin = static_cast<int64_t>(split_index) * split.tokens_per_split;
  const int64_t chunk_end = Min64(chunk_begin + split.tokens_per_split, stream_length);
  const bool causal = args.query_positions != nullptr;
  const int32_t query_position = causal ? args.query_positions[n / args.num_streams] : 0;

  // Segments in stream order; the block's key range may span several of them.
  int64_t seg_start = 0;
  for (int sidx = args.stream_segment_offsets[stream];
       sidx < args.stream_segment_offsets[stream + 1] && seg_start < chunk_end; ++sidx) {
    const SegmentView seg = args.segments[sidx];
    const int32_t lo = static_cast<int32_t>(Max64(chunk_begin, seg_start) - seg_start);
    const int32_t hi = static_cast<int32_t>(Min64(chunk_end, seg_start + seg.length) - seg_start);
    // The value block of a page starts after tokens_per_page narrower key rows, so a pruned
    // segment's values may be misaligned for 16-byte loads.
    const bool values_aligned =
        (static_cast<int64_t>(seg.tokens_per_page) * seg.key_width * L::kEsize) % 16 == 0;
    // base is uniform over the block, so every lane runs the same iterations and the
    // full-mask shuffles below never diverge.
    for (int32_t base = lo; base < hi; base += L::kRows) {
      const int32_t t = base + row_slot;
      const bool valid = t < hi;
      const bool visible = valid && (!causal || seg.positions[t] <= query_position);
      float dot[kGroupTile];
      float v[L::kChans];
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) dot[g] = 0.0f;
#pragma unroll
      for (int j = 0; j < L::kChans; ++j) v[j] = 0.0f;
      if (visible) {
        PartialKeyDots<kT, kHeadDim, kGroupTile>(args.pool, seg, t, lane, d, q_reg, s_q, dot);
        LoadLaneRow<kT, kHeadDim>(SegmentValueRow(args.pool, seg, t), lane, d, values_aligned, v);
      }
      ReduceRowGroup<L::kLanesPerRow, kGroupTile>(dot);
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) {
        const float logit = visible ? dot[g] : -INFINITY;
        float old_scale, weight;
        OnlineSoftmaxStep(state[g], logit, &old_scale, &weight);
#pragma unroll
        for (int j = 0; j < L::kChans; ++j) acc[g][j] = acc[g][j] * old_scale + weight * v[j];
        if (args.logits != nullptr && valid && lane == 0 && g0 + g < group) {
          args.logits[(token_base + seg_start + t) * group + g0 + g] = logit;
        }
      }
    }
    seg_start += seg.length;
  }

  // Merge the row groups' pieces.
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kGroupTile; ++g) {
      s_m[row_slot * kGroupTile + g] = state[g].m;
      s_l[row_slot * kGroupTile + g] = state[g].l;
    }
  }
#pragma unroll
  for (int g = 0; g < kGroupTile; ++g) {
#pragma unroll
    for (int j = 0; j < L::kChans; ++j) {
      const int c = L::Channel(lane, j);
      if (c < d) s_acc[(row_slot * kGroupTile + g) * L::kSmemDim + c] = acc[g][j];
    }
  }
  __syncthreads();
  const int num_splits = split.num_splits;
  const SplitWorkspace ws = CarveWorkspace(workspace, split, args.num_queries, group, d);
  for (int i = threadIdx.x; i < kGroupTile * d; i += kThreads) {
    const int g = i / d;
    const int c = i - g * d;
    if (g0 + g >= group) continue;
    SoftmaxState merged;
    float a = 0.0f;
    for (int r = 0; r < L::kRows; ++r) {
      const SoftmaxState piece{s_m[r * kGroupTile + g], s_l[r * kGroupTile + g]};
      float scale_a, scale_b;
      MergeSoftmaxStep(merged, piece, &scale_a, &scale_b);
      a = a * scale_a + s_acc[(r * kGroupTile + g) * L::kSmemDim + c] * scale_b;
    }
    const int64_t head = static_cast<int64_t>(n) * group + g0 + g;  // [Q, G] index
    if (num_splits == 1) {
      if (args.out != nullptr) args.out[head * d + c] = a * SoftmaxInverseDenominator(merged);
      if (c == 0) {
        if (args.lse != nullptr) args.lse[head] = SoftmaxLse(merged);
        if (args.state_m != nullptr) args.state_m[head] = merged.m;
        if (args.state_l != nullptr) args.state_l[head] = merged.l;
      }
    } else {
      const int64_t slot = (static_cast<int64_t>(n) * num_splits + split_index) * group + g0 + g;
      ws.acc[slot * d + c] = a;
      if (c == 0) {
        ws.m[slot] = merged.m;
        ws.l[slot] = merged.l;
      }
    }
  }
}

// Grid: x = query set * G + head. Merges the key splits of one query head.
__global__ void __launch_bounds__(kThreads)
    MergeSplitsKernel(const AttentionArgs args, const DecodeSplit split, float* workspace) {
  const int group = args.group_size;
  const int d = args.head_dim;
  const int64_t head = blockIdx.x;
  const int64_t n = head / group;
  const int64_t g = head - n * group;
  const SplitWorkspace ws = CarveWorkspace(workspace, split, args.num_queries, group, d);
  for (int c = threadIdx.x; c < d; c += kThreads) {
    SoftmaxState merged;
    float a = 0.0f;
    for (int s = 0; s < split.num_splits; ++s) {
      const int64_t slot = (n * split.num_splits + s) * group + g;
      const SoftmaxState piece{ws.m[slot], ws.l[slot]};
      float scale_a, scale_b;
      MergeSoftmaxStep(merged, piece, &scale_a, &scale_b);
      a = a * scale_a + ws.acc[slot * d + c] * scale_b;
    }
    if (args.out != nullptr) args.out[head * d + c] = a * SoftmaxInverseDenominator(merged);
    if (c == 0) {
      if (args.lse != nullptr) args.lse[head] = SoftmaxLse(merged);
      if (args.state_m != nullptr) args.state_m[head] = merged.m;
      if (args.state_l != nullptr) args.state_l[head] = merged.l;
    }
  }
}

__device__ __forceinline__ float Aggregate(float acc, float p, int g, Aggregation aggregation) {
  if (aggregation == Aggregation::kMax) return g == 0 ? p : (p > acc ? p : acc);
  return acc + p;
}

// Grid: x = stream, y = key split. token_probs[t] = GQA aggregate over g of
// exp(logit[t, g] - m_g) / l_g with the final softmax state of each head.
__global__ void __launch_bounds__(kThreads)
    TokenProbsKernel(const AttentionArgs args, const DecodeSplit split) {
  const int stream = blockIdx.x;
  const int group = args.group_size;
  const int64_t token_base = args.stream_token_offsets[stream];
  const int64_t stream_length = args.stream_token_offsets[stream + 1] - token_base;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * split.tokens_per_split;
  const int64_t end = Min64(begin + split.tokens_per_split, stream_length);
  for (int64_t t = begin + threadIdx.x; t < end; t += kThreads) {
    float agg = 0.0f;
    for (int g = 0; g < group; ++g) {
      const int64_t head = static_cast<int64_t>(stream) * group + g;
      const SoftmaxState state{args.state_m[head], args.state_l[head]};
      agg = Aggregate(agg, SoftmaxProbability(state, args.logits[(token_base + t) * group + g]), g,
                      args.aggregation);
    }
    if (args.aggregation == Aggregation::kMean) agg /= static_cast<float>(group);
    args.token_probs[token_base + t] = agg;
  }
}

// ---- ScoreRows aggregation ----------------------------------------------------------------------

// Grid: x = stream, y = chunk of kScoreChunkTokens tokens. Recomputes each row's logits with the
// same code as DecodeKernel (so the key holding the row maximum gives exactly exp(0) = 1) and
// turns them into probabilities with the row's final (m, l) from the first pass.
template <DType kT, int kHeadDim, int kGroupTile>
__global__ void __launch_bounds__(kThreads) ScoreRowsAggregateKernel(const ScoreRowsArgs sargs) {
  using L = Layout<kT, kHeadDim>;
  const AttentionArgs& args = sargs.attention;
  const int stream = blockIdx.x;
  const int group = args.group_size;
  const int d = kHeadDim > 0 ? kHeadDim : args.head_dim;
  const int lane = threadIdx.x % L::kLanesPerRow;
  const int row_slot = threadIdx.x / L::kLanesPerRow;
  const int64_t token_base = args.stream_token_offsets[stream];
  const int64_t stream_length = args.stream_token_offsets[stream + 1] - token_base;
  const int64_t chunk_begin = static_cast<int64_t>(blockIdx.y) * kScoreChunkTokens;
  if (chunk_begin >= stream_length) return;  // uniform over the block
  const int64_t chunk_end = Min64(chunk_begin + kScoreChunkTokens, stream_length);

  __shared__ float s_q[kGroupTile * L::kSmemDim];  // [tile heads, D]
  __shared__ float s_scores[kScoreChunkTokens];    // [chunk] sum over rows so far
  __shared__ float s_row[kScoreChunkTokens];       // [chunk] this row, aggregated over heads
  for (int i = threadIdx.x; i < kScoreChunkTokens; i += kThreads) {
    s_scores[i] = 0.0f;
    s_row[i] = 0.0f;
  }

  for (int r = 0; r < sargs.num_rows; ++r) {
    const int32_t query_position = args.query_positions[r];
    const int64_t nq = static_cast<int64_t>(r) * args.num_streams + stream;  // query set
    for (int g0 = 0; g0 < group; g0 += kGroupTile) {
      __syncthreads();  // s_q is rewritten; s_row / s_scores initialisation is visible
      float q_reg[kGroupTile][L::kChans];
      LoadQuery<kT, kHeadDim, kGroupTile>(args.q + nq * group * d, group, g0, d, args.scale, lane,
                                          s_q, q_reg);
      float row_m[kGroupTile], row_l[kGroupTile];
      uint32_t below[kGroupTile];
#pragma unroll
      for (int g = 0; g < kGroupTile; ++g) {
        const bool in_group = g0 + g < group;
        row_m[g] = in_group ? args.state_m[nq * group + g0 + g] : -INFINITY;
        row_l[g] = in_group ? args.state_l[nq * group + g0 + g] : 0.0f;
        below[g] = 0;
      }
      int64_t seg_start = 0;
      for (int sidx = args.stream_segment_offsets[stream];
           sidx < args.stream_segment_offsets[stream + 1] && seg_start < chunk_end; ++sidx) {
        const SegmentView seg = args.segments[sidx];
        const int32_t lo = static_cast<int32_t>(Max64(chunk_begin, seg_start) - seg_start);
        const int32_t hi =
            static_cast<int32_t>(Min64(chunk_end, seg_start + seg.length) - seg_start);
        for (int32_t base = lo; base < hi; base += L::kRows) {
          const int32_t t = base + row_slot;
          const bool visible = t < hi && seg.positions[t] <= query_position;
          float dot[kGroupTile];
#pragma unroll
          for (int g = 0; g < kGroupTile; ++g) dot[g] = 0.0f;
          if (visible) {
            PartialKeyDots<kT, kHeadDim, kGroupTile>(args.pool, seg, t, lane, d, q_reg, s_q, dot);
          }
          ReduceRowGroup<L::kLanesPerRow, kGroupTile>(dot);
          if (visible && lane == 0) {
            // This row group owns token t for every row and head tile, so s_row needs no atomics.
            const int64_t idx = seg_start + t - chunk_begin;
            float agg = s_row[idx];
#pragma unroll
            for (int g = 0; g < kGroupTile; ++g) {
              if (g0 + g >= group) break;
              const float p = expf(dot[g] - row_m[g]) / row_l[g];
              // The row maximum of p is exp(0) / l = 1 / l (VL-Cache: A < p_threshold * max).
              below[g] += p < sargs.sparsity_threshold * (1.0f / row_l[g]) ? 1u : 0u;
              agg = Aggregate(agg, p, g0 + g, args.aggregation);
            }
            s_row[idx] = agg;
          }
        }
        seg_start += seg.length;
      }
      if (lane == 0) {
#pragma unroll
        for (int g = 0; g < kGroupTile; ++g) {
          if (g0 + g < group && below[g] != 0) {
            atomicAdd(&sargs.below_threshold[static_cast<int64_t>(stream) * group + g0 + g],
                      static_cast<unsigned long long>(below[g]));
          }
        }
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < chunk_end - chunk_begin; i += kThreads) {
      const float row =
          args.aggregation == Aggregation::kMean ? s_row[i] / static_cast<float>(group) : s_row[i];
      s_scores[i] += row;
      s_row[i] = 0.0f;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < chunk_end - chunk_begin; i += kThreads) {
    sargs.token_scores[token_base + chunk_begin + i] = s_scores[i];
  }
}

// ---- Dispatch ---------------------------------------------------------------------------------

int GroupTile(int group) { return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8; }

// The vectorised kernels need 16-byte aligned full-width rows.
bool UseVectorized(const PoolView& pool, int head_dim) {
  return (head_dim == 64 || head_dim == 128) && pool.page_bytes % 16 == 0 &&
         reinterpret_cast<uintptr_t>(pool.base) % 16 == 0;
}

// Calls f.template operator()<kT, kHeadDim, kGroupTile>() for the runtime values.
template <typename F>
cudaError_t DispatchAttention(DType dtype, int head_dim, int group_tile, F&& f) {
  auto by_tile = [&]<DType kT, int kHeadDim>() -> cudaError_t {
    switch (group_tile) {
      case 1:
        return f.template operator()<kT, kHeadDim, 1>();
      case 2:
        return f.template operator()<kT, kHeadDim, 2>();
      case 4:
        return f.template operator()<kT, kHeadDim, 4>();
      default:
        return f.template operator()<kT, kHeadDim, 8>();
    }
  };
  auto by_dim = [&]<DType kT>() -> cudaError_t {
    switch (head_dim) {
      case 64:
        return by_tile.template operator()<kT, 64>();
      case 128:
        return by_tile.template operator()<kT, 128>();
      default:
        return by_tile.template operator()<kT, 0>();
    }
  };
  switch (dtype) {
    case DType::kF32:
      return by_dim.template operator()<DType::kF32>();
    case DType::kF16:
      return by_dim.template operator()<DType::kF16>();
    case DType::kBF16:
      return by_dim.template operator()<DType::kBF16>();
  }
  return cudaErrorInvalidValue;
}

cudaError_t CheckAttentionArgs(const AttentionArgs& a) {
  if (a.head_dim <= 0 || a.group_size <= 0 || a.num_streams <= 0 || a.num_queries < 0) {
    return cudaErrorInvalidValue;
  }
  if (a.head_dim > kMaxHeadDim) return cudaErrorNotSupported;
  if (CeilDiv(a.group_size, GroupTile(a.group_size)) > kMaxGridYZ) return cudaErrorNotSupported;
  return cudaSuccess;
}

// ---- Data movement kernels ----------------------------------------------------------------------

// Element si of src (src_dtype) into element di of dst (dst_dtype): bit copy for equal types
// (so f16/bf16 inputs are stored exactly as given), else the shared round-to-nearest-even
// conversions of dtype.h (bit-identical to the CPU backend).
__device__ __forceinline__ void CopyElement(const void* src, DType src_dtype, int64_t si, void* dst,
                                            DType dst_dtype, int64_t di) {
  if (src_dtype == dst_dtype) {
    if (DTypeSize(dst_dtype) == 4) {
      static_cast<uint32_t*>(dst)[di] = static_cast<const uint32_t*>(src)[si];
    } else {
      static_cast<uint16_t*>(dst)[di] = static_cast<const uint16_t*>(src)[si];
    }
    return;
  }
  StoreFromFloat(dst, dst_dtype, di, LoadAsFloat(src, src_dtype, si));
}

// Grid: x = row of the call.
__global__ void __launch_bounds__(kThreads) WriteRowsKernel(const WriteRowsArgs a) {
  const int2 job_row = a.rows[blockIdx.x];
  const WriteJob& job = a.jobs[job_row.x];
  const SegmentView dst = job.dst;
  const int64_t src =
      job.src_offset + static_cast<int64_t>(job_row.y - job.first_row) * job.src_stride;
  const void* keys = a.keys != nullptr ? a.keys : job.keys;
  const void* values = a.values != nullptr ? a.values : job.values;
  uint8_t* krow = SegmentKeyRow(a.pool, dst, job_row.y);
  uint8_t* vrow = SegmentValueRow(a.pool, dst, job_row.y);
  for (int i = threadIdx.x; i < dst.key_width; i += kThreads) {
    const int channel = dst.key_channels != nullptr ? dst.key_channels[i] : i;
    CopyElement(keys, a.src_dtype, src + channel, krow, a.pool.dtype, i);
  }
  for (int c = threadIdx.x; c < dst.value_width; c += kThreads) {
    CopyElement(values, a.src_dtype, src + c, vrow, a.pool.dtype, c);
  }
}

// Grid: x = copy of the call.
__global__ void __launch_bounds__(kThreads) MirrorCopiesKernel(const MirrorCopy* copies) {
  const MirrorCopy c = copies[blockIdx.x];
  for (int i = threadIdx.x; i < c.count; i += kThreads) c.dst[i] = c.src[i];
}

// Grid-stride loop over [0, n).
__global__ void __launch_bounds__(kThreads)
    ConvertKernel(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    CopyElement(src, src_dtype, i, dst, dst_dtype, i);
  }
}

// Grid: x = row of the range.
__global__ void __launch_bounds__(kThreads) ReadRowsKernel(const ReadRowsArgs a) {
  const int32_t row = a.first_row + static_cast<int32_t>(blockIdx.x);
  const int64_t out = static_cast<int64_t>(blockIdx.x) * a.head_dim;
  const uint8_t* vrow = SegmentValueRow(a.pool, a.segment, row);
  for (int c = threadIdx.x; c < a.head_dim; c += kThreads) {
    if (a.keys != nullptr) a.keys[out + c] = KeyChannelAsFloat(a.pool, a.segment, row, c);
    if (a.values != nullptr) {
      a.values[out + c] = c < a.segment.value_width ? LoadAsFloat(vrow, a.pool.dtype, c) : 0.0f;
    }
  }
}

// Grid: x = destination row of the call. Accumulates in the CPU backend's order with
// non-contracted multiply/add (__fmul_rn / __fadd_rn), so results match it bit for bit.
__global__ void __launch_bounds__(kThreads) GatherRowsKernel(const GatherRowsArgs a) {
  const int2 job_row = a.rows[blockIdx.x];
  const GatherJob& job = a.jobs[job_row.x];
  const SegmentView dst = job.dst;
  const int32_t r = job_row.y;
  const int32_t begin = job.term_offsets[r];
  const int32_t end = job.term_offsets[r + 1];
  uint8_t* krow = SegmentKeyRow(a.pool, dst, r);
  uint8_t* vrow = SegmentValueRow(a.pool, dst, r);
  const int esize = DTypeSize(a.pool.dtype);
  if (end - begin == 1) {  // plain copy of a full-width row: a byte copy, as on the CPU
    const GatherTermDevice t = job.terms[begin];
    const SegmentView src = job.sources[t.src_segment];
    if (t.key_weight == 1.0f && t.value_weight == 1.0f && src.key_channels == nullptr &&
        dst.key_channels == nullptr && src.key_width == dst.key_width) {
      const uint8_t* sk = SegmentKeyRow(a.pool, src, t.src_row);
      const uint8_t* sv = SegmentValueRow(a.pool, src, t.src_row);
      for (int i = threadIdx.x; i < dst.key_width * esize; i += kThreads) krow[i] = sk[i];
      for (int i = threadIdx.x; i < dst.value_width * esize; i += kThreads) vrow[i] = sv[i];
      return;
    }
  }
  for (int i = threadIdx.x; i < dst.key_width; i += kThreads) {
    const int channel = dst.key_channels != nullptr ? dst.key_channels[i] : i;
    float acc = 0.0f;
    for (int32_t k = begin; k < end; ++k) {
      const GatherTermDevice t = job.terms[k];
      const float key = KeyChannelAsFloat(a.pool, job.sources[t.src_segment], t.src_row, channel);
      acc = __fadd_rn(acc, __fmul_rn(t.key_weight, key));
    }
    StoreFromFloat(krow, a.pool.dtype, i, acc);
  }
  for (int c = threadIdx.x; c < dst.value_width; c += kThreads) {
    float acc = 0.0f;
    for (int32_t k = begin; k < end; ++k) {
      const GatherTermDevice t = job.terms[k];
      const SegmentView& src = job.sources[t.src_segment];
      const float value = c < src.value_width ? LoadAsFloat(SegmentValueRow(a.pool, src, t.src_row),
                                                            a.pool.dtype, c)
                                              : 0.0f;
      acc = __fadd_rn(acc, __fmul_rn(t.value_weight, value));
    }
    StoreFromFloat(vrow, a.pool.dtype, c, acc);
  }
}

}  // namespace

// ---- Host entry points ------------------------------------------------------------------------

DecodeSplit PlanDecodeSplit(int32_t num_queries, int32_t group_size, int32_t max_stream_length,
                            int32_t num_sms) {
  DecodeSplit split;
  if (max_stream_length <= 0 || num_queries <= 0 || group_size <= 0) return split;
  const int64_t blocks =
      static_cast<int64_t>(num_queries) * CeilDiv(group_size, GroupTile(group_size));
  // About four resident blocks per SM keep enough loads in flight to stream K/V at bandwidth;
  // batches that already fill the device get no split (and no merge pass).
  const int64_t target = int64_t{4} * Max64(num_sms, 1);
  int64_t splits = CeilDiv(target, blocks);
  splits = Min64(splits, CeilDiv(max_stream_length, kMinTokensPerSplit));
  splits = Max64(1, Min64(splits, kMaxSplits));
  split.tokens_per_split = static_cast<int32_t>(CeilDiv(max_stream_length, splits));
  split.num_splits = static_cast<int32_t>(CeilDiv(max_stream_length, split.tokens_per_split));
  return split;
}

int64_t DecodeWorkspaceFloats(const DecodeSplit& split, int32_t num_queries, int32_t group_size,
                              int32_t head_dim) {
  if (split.num_splits <= 1) return 0;
  const int64_t slots = static_cast<int64_t>(num_queries) * split.num_splits * group_size;
  return slots * head_dim + 2 * slots;
}

cudaError_t LaunchDecodeAttention(const AttentionArgs& args, const DecodeSplit& split,
                                  float* workspace, cudaStream_t stream) {
  if (cudaError_t e = CheckAttentionArgs(args); e != cudaSuccess) return e;
  if (args.num_queries == 0) return cudaSuccess;
  if (split.num_splits < 1 || split.tokens_per_split < 1 || split.num_splits > kMaxGridYZ ||
      (split.num_splits > 1 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const bool scores = args.token_probs != nullptr;
  if (scores && (args.logits == nullptr || args.state_m == nullptr || args.state_l == nullptr ||
                 args.num_queries != args.num_streams)) {
    return cudaErrorInvalidValue;
  }
  const int tile = GroupTile(args.group_size);
  const int dim = UseVectorized(args.pool, args.head_dim) ? args.head_dim : 0;
  const dim3 grid(static_cast<unsigned>(args.num_queries), static_cast<unsigned>(split.num_splits),
                  static_cast<unsigned>(CeilDiv(args.group_size, tile)));
  cudaError_t e =
      DispatchAttention(args.pool.dtype, dim, tile, [&]<DType kT, int kHeadDim, int kGroupTile>() {
        KVCACHE_LAUNCH(grid, kThreads, 0, stream, DecodeKernel<kT, kHeadDim, kGroupTile>)
        (args, split, workspace);
        return cudaGetLastError();
      });
  if (e != cudaSuccess) return e;
  if (split.num_splits > 1) {
    KVCACHE_LAUNCH(static_cast<unsigned>(int64_t{args.num_queries} * args.group_size), kThreads,
                   0, stream, MergeSplitsKernel)
    (args, split, workspace);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  if (scores) {
    KVCACHE_LAUNCH(dim3(static_cast<unsigned>(args.num_streams),
                        static_cast<unsigned>(split.num_splits)),
                   kThreads, 0, stream, TokenProbsKernel)
    (args, split);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t LaunchScoreRowsAggregate(const ScoreRowsArgs& args, cudaStream_t stream) {
  const AttentionArgs& a = args.attention;
  if (cudaError_t e = CheckAttentionArgs(a); e != cudaSuccess) return e;
  if (args.num_rows <= 0 || a.query_positions == nullptr || a.state_m == nullptr ||
      a.state_l == nullptr || args.token_scores == nullptr || args.below_threshold == nullptr ||
      static_cast<int64_t>(a.num_queries) != static_cast<int64_t>(args.num_rows) * a.num_streams) {
    return cudaErrorInvalidValue;
  }
  if (a.max_stream_length == 0) return cudaSuccess;
  const int64_t chunks = CeilDiv(a.max_stream_length, kScoreChunkTokens);
  if (chunks > kMaxGridYZ) return cudaErrorNotSupported;
  const int tile = GroupTile(a.group_size);
  const int dim = UseVectorized(a.pool, a.head_dim) ? a.head_dim : 0;
  const dim3 grid(static_cast<unsigned>(a.num_streams), static_cast<unsigned>(chunks));
  return DispatchAttention(a.pool.dtype, dim, tile, [&]<DType kT, int kHeadDim, int kGroupTile>() {
    KVCACHE_LAUNCH(grid, kThreads, 0, stream, ScoreRowsAggregateKernel<kT, kHeadDim, kGroupTile>)
    (args);
    return cudaGetLastError();
  });
}

cudaError_t LaunchWriteRows(const WriteRowsArgs& args, cudaStream_t stream) {
  if (args.num_rows < 0 || args.head_dim <= 0) return cudaErrorInvalidValue;
  if (args.num_rows == 0) return cudaSuccess;
  KVCACHE_LAUNCH(static_cast<unsigned>(args.num_rows), kThreads, 0, stream, WriteRowsKernel)(args);
  return cudaGetLastError();
}

cudaError_t LaunchMirrorCopies(const MirrorCopy* copies, int32_t num_copies, cudaStream_t stream) {
  if (num_copies < 0 || (num_copies > 0 && copies == nullptr)) return cudaErrorInvalidValue;
  if (num_copies == 0) return cudaSuccess;
  KVCACHE_LAUNCH(static_cast<unsigned>(num_copies), kThreads, 0, stream, MirrorCopiesKernel)
  (copies);
  return cudaGetLastError();
}

cudaError_t LaunchConvert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n,
                          cudaStream_t stream) {
  if (n < 0 || (n > 0 && (src == nullptr || dst == nullptr))) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  // At most 1024 blocks: q / out of a decode step are at most a few million elements, and a
  // grid-stride loop keeps every block busy.
  const int64_t blocks = std::min<int64_t>(CeilDiv(n, int64_t{kThreads}), 1024);
  KVCACHE_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, ConvertKernel)
  (src, src_dtype, dst, dst_dtype, n);
  return cudaGetLastError();
}

cudaError_t LaunchReadRows(const ReadRowsArgs& args, cudaStream_t stream) {
  if (args.count < 0 || args.head_dim <= 0) return cudaErrorInvalidValue;
  if (args.count == 0) return cudaSuccess;
  KVCACHE_LAUNCH(static_cast<unsigned>(args.count), kThreads, 0, stream, ReadRowsKernel)(args);
  return cudaGetLastError();
}

cudaError_t LaunchGatherRows(const GatherRowsArgs& args, cudaStream_t stream) {
  if (args.num_rows < 0 || args.head_dim <= 0) return cudaErrorInvalidValue;
  if (args.num_rows == 0) return cudaSuccess;
  KVCACHE_LAUNCH(static_cast<unsigned>(args.num_rows), kThreads, 0, stream, GatherRowsKernel)(args);
  return cudaGetLastError();
}

}  // namespace kvcache::KVCACHE_CUDA_NAMESPACE
