// kvcache/cache.h — the paged, modality-aware KV cache: sequences, streams, segments.
//
// Data model (DESIGN.md §2): a Cache holds sequences; each sequence has one stream per
// (layer, kv head) with its own length; a stream is an ordered list of segments, each a run of
// tokens with one row format stored in pool pages, with per-token side data (original position,
// modality, score accumulator). Fork shares pages copy-on-write; Apply compacts streams into
// fresh dense segments and returns the old pages to the pool.
//
// Errors: every method validates its input first and returns InvalidArgument / OutOfRange /
// NotFound / ResourceExhausted / FailedPrecondition naming the offending value; a failed call
// leaves the cache exactly as it was (pages are allocated before anything is committed).
//
// Thread safety: calls on DIFFERENT sequences may run concurrently (Append, ReadStream,
// ScoreRows, Apply, DecodeAttention over disjoint batches, Fork of different parents, Free).
// AddSequence may run concurrently with everything. Calls on the SAME sequence are serialised by
// a per-sequence lock. Validate() and Stats() take every lock and may run at any time.
//
// Example:
//   kvcache::CacheConfig cfg{.num_layers = 2, .num_kv_heads = 2, .num_q_heads = 8,
//                            .head_dim = 64, .dtype = kvcache::DType::kF16};
//   auto cache = kvcache::Cache::Create(cfg, "cpu");
//   kvcache::SequenceId seq = *(*cache)->AddSequence();
//   // k, v: [tokens, kv_heads, head_dim] floats; positions: [tokens]
//   absl::Status s = (*cache)->Append(seq, /*layer=*/0,
//       {.keys = TensorRef::Of(k), .values = TensorRef::Of(v), .positions = pos});
#ifndef KVCACHE_CACHE_H_
#define KVCACHE_CACHE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "kvcache/backend.h"
#include "kvcache/config.h"
#include "kvcache/decode_plan.h"
#include "kvcache/page_pool.h"
#include "kvcache/plan.h"
#include "kvcache/types.h"

namespace kvcache {

// K/V of num_tokens = positions.size() new tokens for ONE layer, all kv heads.
// keys and values are host memory, or both device memory on a backend with
// BackendOp::kDeviceTensors (the CUDA backend's write kernel reads the strided rows in place, no
// host staging; InvalidArgument elsewhere). Append is synchronous on the backend's own stream
// and does not order itself after the caller's streams: device K/V must be complete (the
// stream that produced them synchronised) when Append is called. positions, modalities and
// admit are host memory always.
struct AppendRequest {
  TensorRef keys;                       // [num_tokens, num_kv_heads, head_dim]
  TensorRef values;                     // [num_tokens, num_kv_heads, head_dim]
  std::span<const int32_t> positions;   // [num_tokens] >= 0, strictly increasing, and greater
                                        // than every position already in the layer's streams
  std::span<const Modality> modalities = {};  // [num_tokens] or empty (all text)
  std::span<const uint8_t> admit = {};        // [num_tokens] or empty (all admitted); 0 = not
                                        // in this layer (Dynamic-LLaVA admission)
  // Device K/V only (a backend with device tensors): the caller's stream (cudaStream_t on CUDA).
  // The write (and the copy-on-write page copies it needs) is enqueued on it, after it, so the
  // K/V need only be complete in that stream's order, and the call returns without waiting
  // unless it must read the written keys back (page summaries, key indexes: it then
  // synchronises that stream). nullptr: the backend's own stream, K/V complete at the call,
  // synchronised before returning. Host K/V with a stream is InvalidArgument.
  void* stream = nullptr;
};

struct DecodeOptions {
  float scale = 0.0f;  // 0 means 1/sqrt(head_dim)
  bool accumulate_scores = false;
  GqaAggregation aggregation = GqaAggregation::kMean;
  // Which keys to read (read_policy.h); dense by default. Non-dense policies need a backend with
  // SparseDecodeAttention (cpu, cpu-reference) and, for Quest, CacheConfig::page_summaries.
  ReadPolicy read_policy;
  // Device tensors only (BackendOp::kDeviceTensors): the stream the decode is enqueued on, a
  // cudaStream_t on the CUDA backend; nullptr = the backend's own stream. The call returns once
  // the work is enqueued (with accumulate_scores it waits: the accumulators are host memory);
  // Cache::Synchronize(stream) waits for the results. InvalidArgument on a backend without
  // device tensors or with host tensors (host-tensor calls are synchronous).
  void* stream = nullptr;
};

// Query rows for prefill-time scoring of one layer of one sequence.
struct ScoreRequest {
  std::span<const float> queries = {};   // [num_rows, num_q_heads, head_dim] f32
  std::span<const int32_t> positions = {};  // [num_rows] position of each query row
  float scale = 0.0f;                    // 0 means 1/sqrt(head_dim)
  GqaAggregation aggregation = GqaAggregation::kMean;
  float sparsity_threshold = 0.01f;      // VL-Cache p
  bool accumulate = false;               // also add token scores into the accumulators
};

struct ScoreResult {
  // token_scores[h][t]: sum over rows of the aggregated probability of token t of kv head h.
  std::vector<std::vector<float>> token_scores;  // [num_kv_heads][stream length]
  std::vector<int64_t> below_threshold;          // [num_q_heads]
  std::vector<int64_t> causal_entries;           // [num_q_heads]
};

// A stream read back to host (tests, tools, policies that need keys).
struct StreamContents {
  int32_t length = 0;
  std::vector<int32_t> positions;     // [length]
  std::vector<Modality> modalities;   // [length]
  std::vector<float> scores;          // [length]
  std::vector<float> keys;            // [length, head_dim] (empty unless requested); channels a
                                      // segment does not store read as 0
  std::vector<float> values;          // [length, head_dim] (empty unless requested)
  std::vector<int32_t> key_width;     // [length] stored key channels of each token's segment
  int32_t num_segments = 0;
};

// What ReadStream copies back as f32 besides the side data (positions, modalities, scores, key
// widths): keys only is what a key-reading policy needs (CollectSnapshot), half the copy.
struct StreamReadOptions {
  bool keys = true;
  bool values = true;
};

// The page layout of one stream, for engines that address the pool with their own kernels
// (C API page-table export). Valid until the next mutating call on the sequence (Append, Apply,
// Free): those may move the stream to new pages.
struct SegmentLayout {
  int32_t length = 0;           // tokens stored
  int32_t tokens_per_page = 0;  // rows per page for this segment's row format
  int32_t key_width = 0;        // stored key channels (< head_dim after ThinK pruning)
  int32_t value_width = 0;
  std::vector<int32_t> pages;   // [ceil(length / tokens_per_page)] pool page ids, in token order
};

// Quest page summary of one page of a stream (Cache::ReadPageSummaries).
struct PageSummary {
  int32_t first_token = 0;            // stream index of the page's first token
  int32_t num_tokens = 0;             // tokens in the page
  std::vector<int32_t> key_channels;  // [key width] channels stored (ascending), empty = all
  std::vector<float> key_min;         // [key width] min of the stored keys per stored channel
  std::vector<float> key_max;         // [key width] max of the stored keys per stored channel
};

// What an eviction plan was made from (Cache::Stamp): the length and version of every stream of
// one sequence. A plan made from a snapshot taken after the stamp is current while no stream it
// names has changed length (an Append would be silently dropped by Apply: the new tokens are not
// in the kept list) or version (an Apply in between: the token indices mean other tokens).
struct StreamStamp {
  SequenceId sequence = 0;
  std::vector<int32_t> lengths;    // [num_layers * num_kv_heads], stream (l, h) at l * H + h
  std::vector<uint64_t> versions;  // [num_layers * num_kv_heads]
};

// How an engine addresses the pool with its own kernels (Cache::ExportPageTable). Row r of
// page p: key at pool_base + p * page_bytes + key_offset_bytes + r * row_stride_bytes, value at
// the same with value_offset_bytes; head_dim elements of dtype each.
struct PageTableLayout {
  void* pool_base = nullptr;  // host or device memory (is_device)
  int64_t page_bytes = 0;
  int64_t key_offset_bytes = 0;
  int64_t value_offset_bytes = 0;
  int64_t row_stride_bytes = 0;
  int32_t num_pages = 0;
  int32_t tokens_per_page = 0;
  int32_t head_dim = 0;
  DType dtype = DType::kF16;
  bool is_device = false;
};

// A FlashInfer-style paged KV table of one layer for a batch: row i = (batch b, kv head h) with
// i = b * num_kv_heads + h owns pages indices[indptr[i] .. indptr[i + 1]), the last of which
// holds last_page_len[i] tokens (0 for an empty stream). Valid until the next mutating call on
// one of the sequences (Append may add pages, Apply and Free move or release them).
struct PageTable {
  std::vector<int32_t> indptr;         // [rows + 1]
  std::vector<int32_t> indices;        // [indptr[rows]] pool page ids
  std::vector<int32_t> last_page_len;  // [rows]
  PageTableLayout layout;
};

struct CacheStats {
  int32_t num_sequences = 0;
  int32_t pages_total = 0;
  int32_t pages_used = 0;
  int64_t bytes_used = 0;        // pages_used * page_bytes
  int64_t tokens_stored = 0;     // sum of stream lengths over all sequences (shared counted once
                                 // per sequence)
};

class Cache {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Cache>> Create(
      const CacheConfig& config, std::unique_ptr<Backend> backend);
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Cache>> Create(
      const CacheConfig& config, std::string_view backend_name = "cpu");
  ~Cache();
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;

  const CacheConfig& config() const { return config_; }
  Backend& backend() const { return *backend_; }
  PagePool& pool() const { return *pool_; }

  [[nodiscard]] absl::StatusOr<SequenceId> AddSequence();
  [[nodiscard]] absl::Status Append(SequenceId seq, int32_t layer, const AppendRequest& request);
  // New sequence sharing every page of `parent` (reference counts, copy-on-write on append).
  [[nodiscard]] absl::StatusOr<SequenceId> Fork(SequenceId parent);
  [[nodiscard]] absl::Status Free(SequenceId seq);
  // Validates the whole plan, allocates every page it needs, gathers, then commits.
  [[nodiscard]] absl::Status Apply(const EvictionPlan& plan);

  // Decode attention of one new query token per sequence over `layer`.
  // q [batch, num_q_heads, head_dim] f32 / f16 / bf16; out [batch, num_q_heads, head_dim]
  // f32 / f16 / bf16 (its own dtype, rounded from the f32 result); lse [batch, num_q_heads] f32,
  // or not requested (default / 0 elements). A sequence may appear at most once in the batch.
  // Host tensors work on every backend. Device tensors (all three in device memory, never
  // mixed) need BackendOp::kDeviceTensors and a dense read; the call is then asynchronous on
  // options.stream (see DecodeOptions::stream). Sizes, dtypes and memory spaces are checked
  // before anything is locked; InvalidArgument names the bad tensor.
  [[nodiscard]] absl::Status DecodeAttention(std::span<const SequenceId> batch, int32_t layer,
                                             TensorRef q, MutableTensorRef out,
                                             MutableTensorRef lse = {},
                                             const DecodeOptions& options = {});
  // The same with f32 host tensors.
  [[nodiscard]] absl::Status DecodeAttention(std::span<const SequenceId> batch, int32_t layer,
                                             std::span<const float> q, std::span<float> out,
                                             std::span<float> lse = {},
                                             const DecodeOptions& options = {});
  // Plan once per step, run per layer (decode_plan.h): the host work of a decode step for every
  // layer of `batch` (same checks as DecodeAttention: non-empty, known sequences, no duplicate).
  [[nodiscard]] absl::StatusOr<DecodePlan> PrepareDecode(std::span<const SequenceId> batch);
  // The same with a step reservation and / or a capturable plan (decode_plan.h, StepOptions).
  // Checks everything first; with append_tokens = 1, reserves the step's row in every stream of
  // every layer of the batch at once (all or nothing: ResourceExhausted reserves nothing).
  // FailedPrecondition for a reservation with CacheConfig::page_summaries or a stream with a
  // retrieval key index (both need the keys on the host); InvalidArgument for a capturable plan
  // on a backend without capturable steps, or a stream longer than max_context.
  [[nodiscard]] absl::StatusOr<DecodePlan> PrepareDecode(std::span<const SequenceId> batch,
                                                         const StepOptions& options);
  // Re-prepares `plan` in place for the next step of the same batch: reserves the new step's
  // rows and, for a capturable plan, rewrites its device buffers at the same addresses, so a
  // graph captured from the previous step's per-layer calls replays this step. `batch` must be
  // the plan's batch and `options` its capturable / max_context (InvalidArgument otherwise);
  // FailedPrecondition ("recapture") when the step no longer fits the plan's buffers. On any
  // error the cache is unchanged (the plan is left as it was).
  [[nodiscard]] absl::Status PrepareDecode(DecodePlan& plan, std::span<const SequenceId> batch,
                                           const StepOptions& options);
  // Writes the K/V of the step's token for `layer` into the rows the plan reserved:
  // keys / values [batch, num_kv_heads, head_dim] f32 / f16 / bf16, host or device memory (device
  // on a backend with BackendOp::kDeviceTensors; a capturable plan takes device memory only and
  // enqueues one write kernel on `stream`, nullptr: the backend's own stream). Non-capturable
  // plans write synchronously, as Append does (device K/V must be complete). Once per layer per
  // step: FailedPrecondition for a second call, a plan without a reservation, or a stream
  // changed since PrepareDecode.
  [[nodiscard]] absl::Status AppendStep(DecodePlan& plan, int32_t layer, TensorRef keys,
                                        TensorRef values, void* stream = nullptr);
  // Decode attention of `layer` over the plan's batch; shapes and options as above. No heap
  // allocation on the CPU backend for dense reads. FailedPrecondition when a stream of the batch
  // was changed by Apply or its sequence freed since PrepareDecode (decode_plan.h); appends are
  // seen. InvalidArgument for a plan of another Cache or an invalid (moved-from) plan. f16 / bf16
  // host q and out are converted through f32 scratch the plan sized at PrepareDecode, so they
  // do not allocate either.
  [[nodiscard]] absl::Status DecodeAttention(DecodePlan& plan, int32_t layer, TensorRef q,
                                             MutableTensorRef out, MutableTensorRef lse = {},
                                             const DecodeOptions& options = {});
  // The same with f32 host tensors.
  [[nodiscard]] absl::Status DecodeAttention(DecodePlan& plan, int32_t layer,
                                             std::span<const float> q, std::span<float> out,
                                             std::span<float> lse = {},
                                             const DecodeOptions& options = {});
  // Waits for the device-tensor work enqueued on `stream` (a cudaStream_t on CUDA; nullptr: the
  // backend's own stream). OK at once on host backends (their calls are synchronous);
  // InvalidArgument for a non-null stream on a backend without BackendOp::kDeviceTensors.
  [[nodiscard]] absl::Status Synchronize(void* stream = nullptr);

  // Scores every key of the layer's streams against a block of query rows (causal by position).
  [[nodiscard]] absl::StatusOr<ScoreResult> ScoreRows(SequenceId seq, int32_t layer,
                                                      const ScoreRequest& request);

  [[nodiscard]] absl::StatusOr<int32_t> StreamLength(SequenceId seq, int32_t layer,
                                                     int32_t kv_head) const;
  [[nodiscard]] absl::StatusOr<StreamContents> ReadStream(SequenceId seq, int32_t layer,
                                                          int32_t kv_head,
                                                          bool with_kv = true) const;
  // The same with keys and values requested separately (an unrequested one stays empty).
  [[nodiscard]] absl::StatusOr<StreamContents> ReadStream(SequenceId seq, int32_t layer,
                                                          int32_t kv_head,
                                                          const StreamReadOptions& options) const;
  // Segments of a stream in order, with their page ids (see SegmentLayout).
  [[nodiscard]] absl::StatusOr<std::vector<SegmentLayout>> StreamPages(SequenceId seq,
                                                                       int32_t layer,
                                                                       int32_t kv_head) const;
  // The page summaries of a stream, page by page in token order (FailedPrecondition unless
  // CacheConfig::page_summaries).
  [[nodiscard]] absl::StatusOr<std::vector<PageSummary>> ReadPageSummaries(SequenceId seq,
                                                                          int32_t layer,
                                                                          int32_t kv_head) const;
  // Adds `delta[t]` to the score accumulator of token t of a stream ([length] values).
  [[nodiscard]] absl::Status AddScores(SequenceId seq, int32_t layer, int32_t kv_head,
                                       std::span<const float> delta);
  // The version of a stream: changed by Apply (the stream was rebuilt), not by Append (which only
  // extends its tail); a forked sequence's streams have versions of their own.
  [[nodiscard]] absl::StatusOr<uint64_t> StreamVersion(SequenceId seq, int32_t layer,
                                                      int32_t kv_head) const;
  // The lengths and versions of every stream of `seq`, for checking later that a plan is current.
  [[nodiscard]] absl::StatusOr<StreamStamp> Stamp(SequenceId seq) const;
  // OK when every stream `plan` names still has the length and version recorded in `stamp`;
  // FailedPrecondition naming the first stream that changed ("plan again") otherwise.
  // InvalidArgument when the stamp is of another sequence or shape.
  [[nodiscard]] absl::Status CheckPlanCurrent(const EvictionPlan& plan,
                                              const StreamStamp& stamp) const;
  // CheckPlanCurrent and Apply under one lock of the sequence (no Append can slip in between).
  [[nodiscard]] absl::Status ApplyIfCurrent(const EvictionPlan& plan, const StreamStamp& stamp);
  // The FlashInfer-style page table of `layer` for `batch` (see PageTable). FailedPrecondition
  // when a stream is not one list of full-width pages (channel-pruned segments, or a partly
  // filled page followed by another segment); nothing is returned unless every stream exports.
  [[nodiscard]] absl::StatusOr<PageTable> ExportPageTable(int32_t layer,
                                                          std::span<const SequenceId> batch) const;

  std::vector<SequenceId> Sequences() const;
  bool Contains(SequenceId seq) const;
  CacheStats Stats() const;

  // Checks every invariant: segment lengths vs pages, row formats, ascending positions, no page
  // owned twice within a stream, pool reference counts == number of owning segments, free list.
  [[nodiscard]] absl::Status Validate() const;

  struct Sequence;  // internal (src/cache_internal.h)
  class LockedSequence;  // internal: a found, locked, not freed sequence

 private:
  Cache(const CacheConfig& config, std::unique_ptr<Backend> backend,
        std::unique_ptr<PagePool> pool);
  absl::StatusOr<std::shared_ptr<Sequence>> Find(SequenceId seq) const;
  // The one sequence lookup + lock + freed check: NotFound "<fn>: unknown sequence <id>".
  absl::StatusOr<LockedSequence> Lock(absl::string_view fn, SequenceId seq) const;
  // Lock, after checking that (layer, kv_head) names a stream of this config (OutOfRange).
  absl::StatusOr<LockedSequence> LockStream(absl::string_view fn, SequenceId seq, int32_t layer,
                                            int32_t kv_head) const;
  // PrepareDecode of layers [first_layer, first_layer + num_layers). `one_shot`: for one call of
  // the batch overload; versions and views are not recorded (RunDecode sizes the views).
  absl::StatusOr<DecodePlan> PrepareLayers(absl::string_view fn, std::span<const SequenceId> batch,
                                           int32_t first_layer, int32_t num_layers, bool one_shot);
  // The reservation and device upload of a step (src/cache_step.cc); `in_place`: re-prepare.
  absl::Status PrepareStep(absl::string_view fn, DecodePlan::State& st, const StepOptions& options,
                           bool in_place);
  // The run half of both DecodeAttention overloads. `one_shot`: the plan was made inside this
  // call (a sequence freed meanwhile is NotFound, as before plans existed).
  absl::Status RunDecode(DecodePlan::State& plan, int32_t layer, const TensorRef& q,
                         const MutableTensorRef& out, const MutableTensorRef& lse,
                         const DecodeOptions& options, bool one_shot);
  // Apply with the sequence already locked; `stamp` (may be null) is checked first.
  absl::Status ApplyLocked(Sequence& seq, const EvictionPlan& plan, const StreamStamp* stamp);
  // Retrieval decode: the stream's key index, (re)built when missing or stale. Caller holds
  // the sequence lock.
  absl::StatusOr<const KeyIndex*> EnsureKeyIndex(Sequence& seq, int32_t layer, int32_t kv_head,
                                                 const ReadPolicy& policy);

  const CacheConfig config_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<PagePool> pool_;

  mutable absl::Mutex mu_;  // guards the map; sequences have their own locks
  absl::flat_hash_map<SequenceId, std::shared_ptr<Sequence>> sequences_ ABSL_GUARDED_BY(mu_);
  SequenceId next_id_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace kvcache

#endif  // KVCACHE_CACHE_H_
