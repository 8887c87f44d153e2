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
#include "absl/synchronization/mutex.h"
#include "kvcache/backend.h"
#include "kvcache/config.h"
#include "kvcache/page_pool.h"
#include "kvcache/plan.h"
#include "kvcache/types.h"

namespace kvcache {

// K/V of num_tokens = positions.size() new tokens for ONE layer, all kv heads.
struct AppendRequest {
  TensorRef keys;                       // [num_tokens, num_kv_heads, head_dim]
  TensorRef values;                     // [num_tokens, num_kv_heads, head_dim]
  std::span<const int32_t> positions;   // [num_tokens] >= 0, strictly increasing, and greater
                                        // than every position already in the layer's streams
  std::span<const Modality> modalities = {};  // [num_tokens] or empty (all text)
  std::span<const uint8_t> admit = {};        // [num_tokens] or empty (all admitted); 0 = not
                                        // in this layer (Dynamic-LLaVA admission)
};

struct DecodeOptions {
  float scale = 0.0f;  // 0 means 1/sqrt(head_dim)
  bool accumulate_scores = false;
  GqaAggregation aggregation = GqaAggregation::kMean;
  // Which keys to read (read_policy.h); dense by default. Non-dense policies need a backend with
  // SparseDecodeAttention (cpu, cpu-reference) and, for Quest, CacheConfig::page_summaries.
  ReadPolicy read_policy;
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
  // q [batch, num_q_heads, head_dim] f32; out [batch, num_q_heads, head_dim] f32;
  // lse [batch, num_q_heads] f32 or empty. A sequence may appear at most once in the batch.
  [[nodiscard]] absl::Status DecodeAttention(std::span<const SequenceId> batch, int32_t layer,
                                             std::span<const float> q, std::span<float> out,
                                             std::span<float> lse = {},
                                             const DecodeOptions& options = {});
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
  std::vector<SequenceId> Sequences() const;
  bool Contains(SequenceId seq) const;
  CacheStats Stats() const;

  // Checks every invariant: segment lengths vs pages, row formats, ascending positions, no page
  // owned twice within a stream, pool reference counts == number of owning segments, free list.
  [[nodiscard]] absl::Status Validate() const;

  struct Sequence;  // internal

 private:
  Cache(const CacheConfig& config, std::unique_ptr<Backend> backend,
        std::unique_ptr<PagePool> pool);
  absl::StatusOr<std::shared_ptr<Sequence>> Find(SequenceId seq) const;
  // Find, after checking that (layer, kv_head) names a stream of this config. The caller locks
  // the sequence and checks it was not freed meanwhile.
  absl::StatusOr<std::shared_ptr<Sequence>> FindForStream(SequenceId seq, int32_t layer,
                                                          int32_t kv_head) const;
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
