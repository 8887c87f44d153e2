// cuda/kernels.cuh — CUDA kernels of the CUDA backend and their launchers (internal).
//
// Everything here is plain data plus cudaError_t launchers, so host .cc files compiled by the
// host compiler may include it: no Abseil, no TBB, no __global__ declarations (DESIGN.md §4).
// Every pointer a launcher receives is DEVICE memory, including the pointers inside the
// SegmentView structs (cuda_backend.cc mirrors the host arrays of a view before a launch). The
// launchers validate the shapes they cannot handle and return cudaErrorNotSupported (head_dim
// above kMaxHeadDim) or cudaErrorInvalidValue, then enqueue on `stream` without synchronising.
//
// Plan/run split (FlashInfer style): the host calls PlanDecodeSplit once per batch shape to
// learn how many key splits a decode uses and sizes the workspace from it; LaunchDecodeAttention
// then allocates nothing.
//
// Example (device arrays already filled):
//   kvcache::cuda::AttentionArgs a;  a.pool = pool; a.head_dim = 128; ...
//   kvcache::cuda::DecodeSplit split =
//       kvcache::cuda::PlanDecodeSplit(a.num_queries, a.group_size, a.max_stream_length, sms);
//   float* workspace = ...;  // DecodeWorkspaceFloats(split, ...) floats of device memory
//   cudaError_t e = kvcache::cuda::LaunchDecodeAttention(a, split, workspace, stream);
#ifndef KVCACHE_CUDA_KERNELS_CUH_
#define KVCACHE_CUDA_KERNELS_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kvcache/dtype.h"
#include "kvcache/paged_view.h"

// The emulated build (cuda/emulation/) compiles kernels.cu and cuda_backend.cc a second time with
// the host compiler, with KVCACHE_CUDA_NAMESPACE=cuda_emulated, so that both builds link into one
// program without clashing symbols.
#ifndef KVCACHE_CUDA_NAMESPACE
#define KVCACHE_CUDA_NAMESPACE cuda
#endif

namespace kvcache::KVCACHE_CUDA_NAMESPACE {

// Largest head_dim the attention kernels take (the generic path keeps 8 channels per lane).
inline constexpr int kMaxHeadDim = 256;
// Tokens one ScoreRows aggregation block owns (its per-token sums live in shared memory).
inline constexpr int kScoreChunkTokens = 256;

// Mirrors kvcache::GqaAggregation (backend.h is not includable here); cuda_backend.cc
// static_asserts that the values agree.
enum class Aggregation : int32_t { kMean = 0, kSum = 1, kMax = 2 };

// How a decode splits each stream's keys: split s of a stream covers tokens
// [s * tokens_per_split, (s + 1) * tokens_per_split).
struct DecodeSplit {
  int32_t num_splits = 1;
  int32_t tokens_per_split = 1;
};

// Attention of `num_queries` query sets over the streams of a paged view. Query set n reads
// stream n % num_streams, so decode (num_queries == num_streams) and ScoreRows' first pass
// (num_queries = rows * num_streams, row = n / num_streams) share one kernel.
struct AttentionArgs {
  PoolView pool;  // base: device arena
  int32_t head_dim = 0;
  int32_t num_streams = 0;
  const int32_t* stream_segment_offsets = nullptr;  // [num_streams + 1]
  const SegmentView* segments = nullptr;            // [stream_segment_offsets[num_streams]]
  const int64_t* stream_token_offsets = nullptr;    // [num_streams + 1] prefix sums of lengths
  int32_t max_stream_length = 0;
  int32_t num_queries = 0;
  int32_t group_size = 1;    // G
  float scale = 1.0f;        // already resolved (never 0)
  const float* q = nullptr;  // [num_queries, G, head_dim]
  // Causal mask: query set n sees only keys with position <= query_positions[n / num_streams]
  // (needs SegmentView::positions). nullptr: every key is visible.
  const int32_t* query_positions = nullptr;  // [num_queries / num_streams] or nullptr
  float* out = nullptr;                      // [num_queries, G, head_dim] or nullptr
  float* lse = nullptr;                      // [num_queries, G] or nullptr
  float* state_m = nullptr;                  // [num_queries, G] or nullptr: max logit
  float* state_l = nullptr;                  // [num_queries, G] or nullptr: sum exp(s - m)
  // Score accumulation (decode only, num_queries == num_streams): the scaled logits of every
  // key are kept, then turned into GQA-aggregated probabilities once the softmax is final.
  // All four below set, or all null; state_m and state_l must be set with them.
  float* logits = nullptr;       // [total tokens, G] scratch
  float* token_probs = nullptr;  // [total tokens] output
  Aggregation aggregation = Aggregation::kMean;
};

// Host: the key split for a batch shape; `num_sms` is the device's multiprocessor count.
DecodeSplit PlanDecodeSplit(int32_t num_queries, int32_t group_size, int32_t max_stream_length,
                            int32_t num_sms);
// Host: floats of workspace LaunchDecodeAttention needs for `split` (0 when num_splits == 1).
int64_t DecodeWorkspaceFloats(const DecodeSplit& split, int32_t num_queries, int32_t group_size,
                              int32_t head_dim);

// Decode attention (+ split merge + optional score aggregation). `workspace` holds
// DecodeWorkspaceFloats(split, ...) floats of device memory.
cudaError_t LaunchDecodeAttention(const AttentionArgs& args, const DecodeSplit& split,
                                  float* workspace, cudaStream_t stream);

// Second pass of ScoreRows: with state_m/state_l of every (row, stream, head) from a causal
// LaunchDecodeAttention (num_queries = num_rows * num_streams), computes
//   token_scores [total tokens]         sum over rows of the GQA-aggregated probability
//   below_threshold [num_streams, G]    causal entries with p < threshold * row max (adds to it)
struct ScoreRowsArgs {
  AttentionArgs attention;  // num_queries = num_rows * num_streams, query_positions set
  int32_t num_rows = 0;
  float sparsity_threshold = 0.01f;
  float* token_scores = nullptr;                  // [total tokens]
  unsigned long long* below_threshold = nullptr;  // [num_streams, G], zeroed by the caller
};
cudaError_t LaunchScoreRowsAggregate(const ScoreRowsArgs& args, cudaStream_t stream);

// Row writes: token j of the call is row `rows[j].y` of job `rows[j].x`; its source is
// job.keys / job.values + (rows[j].y - job.first_row) * job.src_stride elements of src_dtype.
// The sources are device memory: the backend's packed copy of host rows (src_stride =
// head_dim), or the caller's own strided device buffer read in place (device K/V Append).
struct WriteJob {
  SegmentView dst;  // device pointers
  const void* keys = nullptr;    // [num_tokens, src_stride] src_dtype, device
  const void* values = nullptr;  // [num_tokens, src_stride] src_dtype, device
  int64_t src_stride = 0;        // elements between consecutive source rows
  int32_t first_row = 0;         // destination row of source row 0
  int64_t src_offset = 0;        // elements from the source base to source row 0
};
struct WriteRowsArgs {
  PoolView pool;
  int32_t head_dim = 0;
  DType src_dtype = DType::kF32;
  const WriteJob* jobs = nullptr;  // [num jobs]
  const int2* rows = nullptr;      // [num_rows] (job, destination row)
  int32_t num_rows = 0;
  // Non-null: every job reads keys / values from these bases (at its src_offset) instead of its
  // own pointers, so that a job array uploaded once serves launches with new source buffers
  // (Backend::StepWriteRows: a capturable decode step's K/V, passed as launch arguments).
  const void* keys = nullptr;
  const void* values = nullptr;
};
cudaError_t LaunchWriteRows(const WriteRowsArgs& args, cudaStream_t stream);

// dst[i] = src[i] converted from src_dtype to dst_dtype (round-to-nearest-even, dtype.h; a bit
// copy when the dtypes agree), i in [0, n): device-tensor q and out of a decode.
cudaError_t LaunchConvert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n,
                          cudaStream_t stream);

// Rows [first_row, first_row + count) of one segment as f32, keys expanded to head_dim
// (channels the segment does not store read 0).
struct ReadRowsArgs {
  PoolView pool;
  SegmentView segment;  // device pointers
  int32_t head_dim = 0;
  int32_t first_row = 0;
  int32_t count = 0;
  float* keys = nullptr;    // [count, head_dim] or nullptr
  float* values = nullptr;  // [count, head_dim] or nullptr
};
cudaError_t LaunchReadRows(const ReadRowsArgs& args, cudaStream_t stream);

// The device half of the view mirror (cuda/view_mirror.h): `count` int32 values copied from
// `src` (the call's staging upload) to `dst` (a region of the mirror buffer). One launch runs
// every copy of a call (grid x = copy), so a decode that adds a page to 500 streams costs one
// small kernel, not 500 tiny cudaMemcpyAsync calls.
struct MirrorCopy {
  const int32_t* src = nullptr;  // [count] device
  int32_t* dst = nullptr;        // [count] device
  int32_t count = 0;
};
cudaError_t LaunchMirrorCopies(const MirrorCopy* copies, int32_t num_copies, cudaStream_t stream);

// Same layout as kvcache::GatherTerm (static_asserted in cuda_backend.cc).
struct GatherTermDevice {
  int32_t src_segment = 0;
  int32_t src_row = 0;
  float key_weight = 1.0f;
  float value_weight = 1.0f;
};
struct GatherJob {
  SegmentView dst;                          // device pointers
  const SegmentView* sources = nullptr;     // [num sources of this job]
  const int32_t* term_offsets = nullptr;    // [dst.length + 1]
  const GatherTermDevice* terms = nullptr;  // [term_offsets[dst.length]]
};
// Destination row j of the call is row rows[j].y of job rows[j].x.
struct GatherRowsArgs {
  PoolView pool;
  int32_t head_dim = 0;
  const GatherJob* jobs = nullptr;  // [num jobs]
  const int2* rows = nullptr;       // [num_rows]
  int32_t num_rows = 0;
};
cudaError_t LaunchGatherRows(const GatherRowsArgs& args, cudaStream_t stream);

}  // namespace kvcache::KVCACHE_CUDA_NAMESPACE

#endif  // KVCACHE_CUDA_KERNELS_CUH_
