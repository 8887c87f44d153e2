// kvcache/backend_impl.h — the implementer face of a compute backend: the Backend interface and
// the plain-data requests its methods take.
//
// Implement this to add a backend (cpu/ and cuda/ do); users of the library need only backend.h
// (create a backend by name, ask what it supports). The Cache and the policy pipeline are
// backend-neutral host code and call only this interface. Optional kernels default to
// absl::UnimplementedError so a partial backend answers instead of crashing (ggml style), and
// Supports(op) says up front which of them exist.
//
// Example (a backend that forwards to another, as testing/fault_injection.h does):
//   class Wrapper final : public kvcache::Backend {
//    public:
//     std::string_view Name() const override { return "wrapper"; }
//     bool Supports(kvcache::BackendOp op) const override { return inner_->Supports(op); }
//     ...  // AllocateArena, FreeArena, CopyPages, WriteRows, GatherRows, ReadRows, kernels
//   };
#ifndef KVCACHE_BACKEND_IMPL_H_
#define KVCACHE_BACKEND_IMPL_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvcache/backend.h"  // BackendOp, GqaAggregation (the user face)
#include "kvcache/paged_view.h"
#include "kvcache/read_policy.h"
#include "kvcache/types.h"

namespace kvcache {

// Write of `num_tokens` consecutive rows of one segment, starting at row `first_row`. Source
// rows are full width (head_dim) with an element stride between tokens, so one call can read
// one head out of an engine's [tokens, kv_heads, head_dim] buffer. The source is host memory,
// or (src_space kDevice, only on a backend with BackendOp::kDeviceTensors) the backend's device
// memory, read in place by its write kernel.
struct RowWrite {
  SegmentView dst;        // pages must cover rows [first_row, first_row + num_tokens)
  int32_t first_row = 0;
  int32_t num_tokens = 0;
  int32_t head_dim = 0;
  const void* keys = nullptr;    // [num_tokens, src_stride] in src_space, dtype src_dtype; row t
  const void* values = nullptr;  // at keys + t * src_stride elements, head_dim elements long
  DType src_dtype = DType::kF32;
  int64_t src_stride = 0;        // elements between consecutive tokens
  MemorySpace src_space = MemorySpace::kHost;
};

// Weighted gather into a fresh dense segment (compaction, channel selection, merge):
//   dst row r = sum over t in [term_offsets[r], term_offsets[r+1]) of
//               (key_weight[t] * K(src t), value_weight[t] * V(src t))
// where K(src) is the source key expanded to head_dim channels (channels a pruned source does
// not store read as 0) and the destination keeps dst.key_channels (or all when nullptr).
struct GatherTerm {
  int32_t src_segment = 0;  // index into RowGather::sources
  int32_t src_row = 0;
  float key_weight = 1.0f;
  float value_weight = 1.0f;
};
struct RowGather {
  std::span<const SegmentView> sources;
  SegmentView dst;                        // dst.length rows, pages already allocated
  std::span<const int32_t> term_offsets;  // [dst.length + 1]
  std::span<const GatherTerm> terms;      // [term_offsets[dst.length]]
  int32_t head_dim = 0;
};

struct PageCopy {
  int32_t src = 0;
  int32_t dst = 0;
};

class KeyIndex;  // below

// Decode attention: one new query token per sequence, for one layer.
// Stream i of the view is (batch b, kv head h) with i = b * num_kv_heads + h; its G query heads
// are h*G .. h*G + G - 1, so q laid out [batch, q_heads, head_dim] is [num_streams, G, head_dim].
struct DecodeParams {
  int32_t group_size = 1;  // G
  float scale = 0.0f;      // softmax scale; 0 means 1/sqrt(head_dim)
  bool accumulate_scores = false;  // add each key's probability (GQA-aggregated) to its score
  GqaAggregation aggregation = GqaAggregation::kMean;
  // Sparse reads (read_policy.h). Never kDense inside SparseDecodeAttention; DecodeAttention
  // ignores it (the Cache routes non-dense policies to SparseDecodeAttention).
  ReadPolicy read_policy;
  // kRetrieval without exact_search: one nearest-neighbour index per stream, over the stream's
  // tokens in order (index id = token index in the stream).
  const KeyIndex* const* key_indexes = nullptr;  // [num_streams]
};

// The tensors of a device-tensor decode (Backend::DeviceDecodeAttention): every pointer is the
// backend's device memory, already checked by the Cache for size; the backend checks that they
// really are device memory. Shapes as DecodeAttention's, dtypes independent of each other.
struct DecodeIO {
  const void* q = nullptr;  // [num_streams, G, head_dim] q_dtype, device
  DType q_dtype = DType::kF32;
  void* out = nullptr;  // [num_streams, G, head_dim] out_dtype, device
  DType out_dtype = DType::kF32;
  float* lse = nullptr;  // [num_streams, G] f32 device, or nullptr
  // The stream to enqueue on (a cudaStream_t on CUDA); nullptr: the backend's own stream.
  void* stream = nullptr;
};

// ---- Capturable decode steps (decode_plan.h, StepOptions::capturable) --------------------------
// A capturable DecodePlan owns device memory at addresses fixed for its life, holding everything
// its per-layer calls read: per layer the kernel views (SegmentView array, CSR and token
// offsets, page ids and key channel maps) and AppendStep's write jobs; and the f32 q / out
// conversion scratch, the lse scratch and the split-K workspace sized for max_context. The Cache
// makes it with CreateStepBuffers (host, before anything is reserved), fills it with UploadStep
// at every (re-)prepare, and the per-layer calls only enqueue kernels that read it
// (StepWriteRows, StepDecode): no upload, no allocation, no synchronisation, so they can be
// captured in a CUDA graph and replayed after the next UploadStep rewrote the same addresses.
class StepBuffers {
 public:
  virtual ~StepBuffers() = default;
};

// The fixed capacities of a step's buffers.
struct StepShape {
  PoolView pool;  // the cache's pool (fixed for its life)
  int32_t num_layers = 0;
  int32_t num_streams = 0;  // batch * num_kv_heads
  int32_t group_size = 1;   // G
  int32_t head_dim = 0;
  int32_t max_context = 0;  // the longest stream a decode of the plan may read (fixes the split)
  std::span<const int32_t> segment_capacity;  // [num_layers] SegmentView slots
  std::span<const int32_t> index_capacity;    // [num_layers] int32 slots: page ids + key channels
};

// One layer of a step upload.
struct StepLayer {
  PagedKVView kv;  // the layer's views, reserved rows included (host arrays, as for a decode)
  // AppendStep's targets, [num_streams] or empty (no reservation): writes[i].dst / first_row is
  // where stream i's new row goes (num_tokens 1; keys / values unused: StepWriteRows passes the
  // source, whose row i starts i * head_dim elements into a [batch, kv_heads, head_dim] tensor).
  std::span<const RowWrite> writes;
};

// Parameters of a per-stream key index for retrieval decode (see KeyIndex).
struct KeyIndexParams {
  int32_t head_dim = 0;
  int32_t m = 16;                 // graph degree (hnswlib M)
  int32_t ef_construction = 100;  // construction beam
  int32_t capacity = 0;           // initial capacity in keys (grows on demand)
  float max_norm = 0.0f;          // c of the MIPS -> NN transform; every key added must have
                                  // norm <= max_norm (Add reports when one does not)
};

// A nearest-neighbour index over one stream's keys for maximum-inner-product search, ids are the
// tokens' indices in the stream (0, 1, ... in the order keys were added). Search may run from
// several threads at once; Add must not run concurrently with anything.
class KeyIndex {
 public:
  virtual ~KeyIndex() = default;
  // keys [count, head_dim] f32, the stored (dtype-rounded) keys expanded to head_dim; they get
  // ids size() .. size() + count - 1. Returns false (and adds nothing) when a key's norm exceeds
  // the index's max_norm: the caller must then rebuild with a larger bound.
  [[nodiscard]] virtual bool Add(const float* keys, int32_t count) = 0;
  virtual int32_t size() const = 0;
  virtual float max_norm() const = 0;
  // Search beam of later Search calls (>= 1; the beam used is max(ef, k)). Not concurrent with
  // Search.
  virtual void SetSearchBeam(int32_t ef) = 0;
  // Up to k ids with the largest q.k (approximately), q [head_dim] f32. Writes the ids to
  // ids[0, returned count), in no particular order. Safe to call from several threads at once.
  virtual int32_t Search(const float* q, int32_t k, int32_t* ids) const = 0;
  // Bytes the index holds (vectors + graph), for memory accounting.
  virtual int64_t MemoryBytes() const = 0;
};

// Row scoring for prefill-time policies over the streams of one layer of one sequence.
// Stream i is kv head i; row r (at position query_positions[r]) attends keys at positions
// <= its own. Outputs, for stream i with tokens laid out consecutively (stream i starts at the
// sum of the lengths of the streams before it):
//   token_scores  [total tokens]  sum over rows of the GQA-aggregated softmax probability
//   below_threshold [num_streams, G]  count of causal entries with A < p * row max (VL-Cache)
//   causal_entries  [num_streams, G]  count of causal entries (row r sees keys with pos <= its own)
struct ScoreRowsParams {
  int32_t group_size = 1;
  float scale = 0.0f;  // 0 means 1/sqrt(head_dim)
  int32_t num_rows = 0;
  GqaAggregation aggregation = GqaAggregation::kMean;
  float sparsity_threshold = 0.01f;  // p; counts are computed only when the outputs are non-null
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string_view Name() const = 0;
  // True when pool memory can be read directly by host code (CPU backend).
  virtual bool HostAccessible() const = 0;
  // Whether the optional operation `op` is implemented, asked by the Cache before it locks or
  // allocates anything. The default describes a backend with dense decode and row scoring only
  // (the CUDA backend today): a backend that overrides SparseDecodeAttention or CreateKeyIndex
  // must override this too, and one that leaves DecodeAttention or ScoreRows unimplemented
  // should answer false for them.
  virtual bool Supports(BackendOp op) const {
    return op == BackendOp::kDecodeAttention || op == BackendOp::kScoreRows;
  }

  // Memory for a pool arena; aligned to at least 256 bytes.
  [[nodiscard]] virtual absl::StatusOr<void*> AllocateArena(int64_t bytes) = 0;
  virtual void FreeArena(void* arena) = 0;

  // Copies whole pages (copy-on-write of shared pages).
  [[nodiscard]] virtual absl::Status CopyPages(const PoolView& pool,
                                               std::span<const PageCopy> copies) = 0;
  // Writes host rows into segments, converting src_dtype to the pool dtype. The writes of one
  // call touch disjoint rows, so a backend may run them in parallel.
  [[nodiscard]] virtual absl::Status WriteRows(const PoolView& pool,
                                               std::span<const RowWrite> writes) = 0;
  // Compaction / channel selection / merge into fresh segments (disjoint destinations).
  [[nodiscard]] virtual absl::Status GatherRows(const PoolView& pool,
                                                std::span<const RowGather> gathers) = 0;
  // Reads rows [first_row, first_row + count) of a segment back to host as f32:
  // keys [count, head_dim] (channels the segment does not store are 0), values [count, head_dim].
  [[nodiscard]] virtual absl::Status ReadRows(const PoolView& pool, const SegmentView& segment,
                                              int32_t head_dim, int32_t first_row, int32_t count,
                                              float* keys, float* values) = 0;

  // q [num_streams, G, head_dim] f32 host; out [num_streams, G, head_dim] f32 host;
  // lse [num_streams, G] f32 host or nullptr (natural log of the softmax denominator, scaled
  // logits). Streams of length 0 produce out = 0 and lse = -inf.
  [[nodiscard]] virtual absl::Status DecodeAttention(const PagedKVView& kv,
                                                     const DecodeParams& params, const float* q,
                                                     float* out, float* lse) {
    (void)kv, (void)params, (void)q, (void)out, (void)lse;
    return absl::UnimplementedError(std::string(Name()) + " backend has no DecodeAttention");
  }
  // Dense decode attention with q / out / lse in the backend's device memory (io), enqueued on
  // io.stream without waiting for it unless params.accumulate_scores (the score accumulators
  // are host memory). Backend::Synchronize(io.stream) waits for the results. Only called when
  // Supports(BackendOp::kDeviceTensors).
  [[nodiscard]] virtual absl::Status DeviceDecodeAttention(const PagedKVView& kv,
                                                           const DecodeParams& params,
                                                           const DecodeIO& io) {
    (void)kv, (void)params, (void)io;
    return absl::UnimplementedError(std::string(Name()) + " backend has no device tensors");
  }
  // Append on a caller's stream (AppendRequest::stream; only called when
  // Supports(BackendOp::kDeviceTensors)): the page copies, then the row writes, both enqueued on
  // `stream` in that order, with the semantics of CopyPages and WriteRows, without waiting.
  // One operation rather than a stream argument on CopyPages and WriteRows: the copy-on-write
  // copies must precede the writes into the same pages on the same stream, and every operation
  // the backend runs afterwards, on any stream, must be ordered after both.
  [[nodiscard]] virtual absl::Status EnqueueAppend(const PoolView& pool,
                                                   std::span<const PageCopy> copies,
                                                   std::span<const RowWrite> writes,
                                                   void* stream) {
    (void)pool, (void)copies, (void)writes, (void)stream;
    return absl::UnimplementedError(std::string(Name()) + " backend has no streams");
  }
  // Waits until the work enqueued on `stream` (nullptr: the backend's own stream) is done. Host
  // backends are synchronous: the default returns OK.
  [[nodiscard]] virtual absl::Status Synchronize(void* stream) {
    (void)stream;
    return absl::OkStatus();
  }
  // Decode attention under a non-dense read policy (params.read_policy, read_policy.h); same
  // shapes as DecodeAttention. kQuest needs SegmentView::page_key_min/max on every segment.
  [[nodiscard]] virtual absl::Status SparseDecodeAttention(const PagedKVView& kv,
                                                           const DecodeParams& params,
                                                           const float* q, float* out,
                                                           float* lse) {
    (void)kv, (void)params, (void)q, (void)out, (void)lse;
    return absl::UnimplementedError(std::string(Name()) +
                                    " backend has no sparse decode (Quest / retrieval read policies)");
  }
  // Capturable decode steps (StepBuffers above). Device-tensor backends only: the defaults
  // answer Unimplemented. UploadStep answers FailedPrecondition (nothing written) when a layer
  // does not fit the buffers' capacities or a stream is longer than max_context. `stream`
  // (nullptr: the backend's own stream, and UploadStep waits for the device first and for the
  // copy after) orders the upload after earlier replays reading the buffers.
  [[nodiscard]] virtual absl::StatusOr<std::unique_ptr<StepBuffers>> CreateStepBuffers(
      const StepShape& shape) {
    (void)shape;
    return absl::UnimplementedError(std::string(Name()) + " backend has no capturable steps");
  }
  [[nodiscard]] virtual absl::Status UploadStep(StepBuffers& buffers,
                                                std::span<const StepLayer> layers, void* stream) {
    (void)buffers, (void)layers, (void)stream;
    return absl::UnimplementedError(std::string(Name()) + " backend has no capturable steps");
  }
  // Writes layer slot `layer`'s reserved rows from keys / values ([batch, kv_heads, head_dim]
  // device memory, dtype), enqueued on `stream` (nullptr: the backend's own stream).
  [[nodiscard]] virtual absl::Status StepWriteRows(StepBuffers& buffers, int32_t layer,
                                                   const void* keys, const void* values,
                                                   DType dtype, void* stream) {
    (void)buffers, (void)layer, (void)keys, (void)values, (void)dtype, (void)stream;
    return absl::UnimplementedError(std::string(Name()) + " backend has no capturable steps");
  }
  // Dense decode of layer slot `layer` with the uploaded views (no score accumulation).
  [[nodiscard]] virtual absl::Status StepDecode(StepBuffers& buffers, int32_t layer,
                                                const DecodeParams& params, const DecodeIO& io) {
    (void)buffers, (void)layer, (void)params, (void)io;
    return absl::UnimplementedError(std::string(Name()) + " backend has no capturable steps");
  }
  // A key index for retrieval decode (host memory).
  [[nodiscard]] virtual absl::StatusOr<std::unique_ptr<KeyIndex>> CreateKeyIndex(
      const KeyIndexParams& params) {
    (void)params;
    return absl::UnimplementedError(std::string(Name()) + " backend has no key index");
  }
  // queries [num_rows, num_streams * G, head_dim] f32 host; query_positions [num_rows];
  // outputs as documented on ScoreRowsParams (below_threshold / causal_entries may be null).
  [[nodiscard]] virtual absl::Status ScoreRows(const PagedKVView& kv,
                                               const ScoreRowsParams& params,
                                               const float* queries,
                                               const int32_t* query_positions,
                                               float* token_scores, int64_t* below_threshold,
                                               int64_t* causal_entries) {
    (void)kv, (void)params, (void)queries, (void)query_positions, (void)token_scores;
    (void)below_threshold, (void)causal_entries;
    return absl::UnimplementedError(std::string(Name()) + " backend has no ScoreRows");
  }
};

}  // namespace kvcache

#endif  // KVCACHE_BACKEND_IMPL_H_
