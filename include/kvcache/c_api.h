/* kvcache/c_api.h — the stable C ABI of kvcache (C99, opaque handles, no exceptions).
 *
 * For engines not written in C++ (Rust, Go, Python via ctypes/cffi) and for C++ engines that
 * want a stable binary boundary. Link libkvcache_c.so (CMake: kvcache::c; pkg-config:
 * kvcache-c). Every function returns a kvc_status; on failure kvc_last_error() gives a message
 * naming the offending value, and the cache is left exactly as it was. Full reference:
 * docs/C_API.md; plugging into an engine with its own kernels: docs/INTEGRATION.md.
 *
 * Handles: kvc_cache*, kvc_plan* and kvc_decode_plan* are opaque tokens, NOT addresses. Each
 * one is a 64-bit id, never reused within a process, looked up in a mutex-protected registry on
 * every call, so a destroyed, foreign or made-up handle is reported as KVC_INVALID_ARGUMENT
 * instead of crashing.
 *
 * Example:
 *   kvc_config cfg;
 *   kvc_config_init(&cfg);
 *   cfg.num_layers = 2; cfg.num_kv_heads = 2; cfg.num_q_heads = 8; cfg.head_dim = 64;
 *   kvc_cache* cache = NULL;
 *   if (kvc_cache_create(&cfg, "cpu", &cache) != KVC_OK) {
 *     fprintf(stderr, "%s\n", kvc_last_error());
 *   }
 *   kvc_seq seq;
 *   kvc_sequence_add(cache, &seq);
 *   // k, v: [n, num_kv_heads, head_dim] f32; pos: [n]
 *   kvc_append(cache, seq, 0, n, KVC_DTYPE_F32, k, v, pos, NULL, NULL);
 *   kvc_cache_destroy(cache);
 */
#ifndef KVCACHE_C_API_H_
#define KVCACHE_C_API_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define KVC_API __declspec(dllexport)
#elif defined(__GNUC__) || defined(__clang__)
#define KVC_API __attribute__((visibility("default")))
#else
#define KVC_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped when a struct layout or a function signature of this header changes. */
#define KVC_ABI_VERSION 1

/* ---- Status codes (mapped from absl::StatusCode) ------------------------------------------ */
typedef enum kvc_status {
  KVC_OK = 0,
  KVC_INVALID_ARGUMENT = 1,     /* null pointer, bad size, unknown/destroyed handle, bad dtype */
  KVC_NOT_FOUND = 2,            /* unknown sequence id */
  KVC_OUT_OF_RANGE = 3,         /* layer or kv head outside the cache's shape */
  KVC_OUT_OF_MEMORY = 4,        /* page pool exhausted (absl RESOURCE_EXHAUSTED) or allocation */
  KVC_FAILED_PRECONDITION = 5,  /* valid call in the wrong state (e.g. non-exportable stream) */
  KVC_UNIMPLEMENTED = 6,        /* backend lacks the operation */
  KVC_BUFFER_TOO_SMALL = 7,     /* caller buffer too small; the required size was written */
  KVC_INTERNAL = 8              /* a bug or an unexpected exception; message says which */
} kvc_status;

typedef enum kvc_dtype { KVC_DTYPE_F32 = 0, KVC_DTYPE_F16 = 1, KVC_DTYPE_BF16 = 2 } kvc_dtype;

typedef enum kvc_modality {
  KVC_MODALITY_TEXT = 0,
  KVC_MODALITY_IMAGE = 1,
  KVC_MODALITY_VIDEO = 2,
  KVC_MODALITY_AUDIO = 3
} kvc_modality;

/* How the G query heads of one kv head combine into one score per token. */
typedef enum kvc_gqa_aggregation {
  KVC_GQA_MEAN = 0,
  KVC_GQA_SUM = 1,
  KVC_GQA_MAX = 2
} kvc_gqa_aggregation;

typedef struct kvc_cache kvc_cache; /* opaque */
typedef struct kvc_plan kvc_plan;   /* opaque */
typedef int64_t kvc_seq;            /* sequence id, never reused within one cache */

/* ---- Version and errors --------------------------------------------------------------------- */
KVC_API const char* kvc_version_string(void); /* "0.1.0"; static storage */
KVC_API void kvc_version(int* major, int* minor, int* patch); /* any pointer may be NULL */
KVC_API int kvc_abi_version(void);                            /* KVC_ABI_VERSION of the library */
/* Message of the last failed call on THIS thread ("" after a success). Valid until the next
 * kvc_* call on the same thread. */
KVC_API const char* kvc_last_error(void);
KVC_API const char* kvc_status_name(kvc_status status); /* "KVC_OK", ...; static storage */

/* ---- Cache ---------------------------------------------------------------------------------- */
typedef struct kvc_config {
  int32_t num_layers;
  int32_t num_kv_heads;
  int32_t num_q_heads; /* a multiple of num_kv_heads */
  int32_t head_dim;
  int32_t dtype;       /* kvc_dtype of the stored K/V */
  int32_t page_tokens; /* tokens per page at full row width (or 0 when page_bytes is given) */
  int64_t page_bytes;  /* 0 = page_tokens * 2 * head_dim * sizeof(dtype) */
  int32_t num_pages;   /* pool capacity */
  int32_t flags;       /* KVC_CONFIG_* bits; 0 = none */
} kvc_config;

/* kvc_config.flags: keep per-page min/max key summaries (host memory, 2 * key width floats per
 * page) so that decode can use the Quest read policy (kvc_decode_attention_sparse). */
#define KVC_CONFIG_PAGE_SUMMARIES 1

/* Fills the defaults: 1 layer, 1 kv head, 1 q head, head_dim 128, f16, 16 tokens/page, 1024
 * pages. Does nothing when config is NULL. */
KVC_API void kvc_config_init(kvc_config* config);

/* backend: "cpu", "cpu-reference", or "cuda" when built with CUDA. */
KVC_API kvc_status kvc_cache_create(const kvc_config* config, const char* backend,
                                    kvc_cache** out);
/* Frees the cache and every sequence in it. Plans made from it stay readable plain data (still
 * to be destroyed with kvc_plan_destroy) but can no longer be applied. Calls running
 * concurrently on other threads finish normally (they hold a reference); later calls with this
 * handle fail with KVC_INVALID_ARGUMENT. */
KVC_API kvc_status kvc_cache_destroy(kvc_cache* cache);
KVC_API kvc_status kvc_cache_get_config(const kvc_cache* cache, kvc_config* out);

/* ---- Sequences ------------------------------------------------------------------------------ */
KVC_API kvc_status kvc_sequence_add(kvc_cache* cache, kvc_seq* out);
/* New sequence sharing every page of parent (copy-on-write). */
KVC_API kvc_status kvc_sequence_fork(kvc_cache* cache, kvc_seq parent, kvc_seq* out);
KVC_API kvc_status kvc_sequence_free(kvc_cache* cache, kvc_seq seq);

/* Appends num_tokens tokens to every kv head of one layer.
 *   keys, values: [num_tokens, num_kv_heads, head_dim] elements of `dtype` (f16/bf16 as uint16
 *                 bits), host memory
 *   positions:    [num_tokens] >= 0, strictly increasing, above every position already appended
 *                 to this layer
 *   modalities:   [num_tokens] kvc_modality values, or NULL (all text)
 *   admit:        [num_tokens] 0 = not stored in this layer, or NULL (all stored) */
KVC_API kvc_status kvc_append(kvc_cache* cache, kvc_seq seq, int32_t layer, int32_t num_tokens,
                              int32_t dtype, const void* keys, const void* values,
                              const int32_t* positions, const uint8_t* modalities,
                              const uint8_t* admit);

/* ---- Kernels -------------------------------------------------------------------------------- */
/* Scores every stored token of `layer` against num_rows query rows (causal by position).
 *   queries:   [num_rows, num_q_heads, head_dim] f32;  positions: [num_rows]
 *   scale:     softmax scale, 0 = 1/sqrt(head_dim)
 *   token_scores: NULL, or [sum over kv heads of the stream length] f32, head-major (head h's
 *              scores follow head h-1's); capacity in floats; *required (may be NULL) receives
 *              the needed count. Too small -> KVC_BUFFER_TOO_SMALL, nothing scored/accumulated.
 *   below_threshold, causal_entries: NULL or [num_q_heads] (VL-Cache sparsity counts)
 *   accumulate: non-zero also adds the token scores to the score accumulators. */
KVC_API kvc_status kvc_score_rows(kvc_cache* cache, kvc_seq seq, int32_t layer, int32_t num_rows,
                                  const float* queries, const int32_t* positions, float scale,
                                  int32_t aggregation, float sparsity_threshold,
                                  int32_t accumulate, float* token_scores, int64_t capacity,
                                  int64_t* required, int64_t* below_threshold,
                                  int64_t* causal_entries);

/* One decode query per sequence over `layer`.
 *   batch: [batch_size] distinct sequences; q, out: [batch_size, num_q_heads, head_dim] f32
 *   lse:   NULL or [batch_size, num_q_heads] f32 (natural log of the softmax denominator of the
 *          scaled logits)
 *   accumulate_scores: non-zero adds each token's attention probability (aggregated over the
 *          GQA group by `aggregation`) into its score accumulator (H2O-style). */
KVC_API kvc_status kvc_decode_attention(kvc_cache* cache, const kvc_seq* batch,
                                        int32_t batch_size, int32_t layer, const float* q,
                                        float* out, float* lse, float scale, int32_t aggregation,
                                        int32_t accumulate_scores);

/* Query-aware sparse decode (docs/SPARSE_DECODE.md): every token stays cached, one decode step
 * reads only the keys likely to matter for its query. */
typedef enum kvc_read_kind {
  KVC_READ_DENSE = 0,     /* every token (plain decode) */
  KVC_READ_QUEST = 1,     /* top pages by the min/max upper bound of q.k; needs
                             KVC_CONFIG_PAGE_SUMMARIES */
  KVC_READ_RETRIEVAL = 2  /* IceFormer: top_k keys per query head by nearest-neighbour search */
} kvc_read_kind;

typedef struct kvc_read_policy {
  int32_t kind;                  /* kvc_read_kind */
  int32_t dense_first_layers;    /* layers [0, n) always decode densely (default 2) */
  int32_t token_budget;          /* Quest: tokens read per stream (> 0 for Quest) */
  int32_t top_k;                 /* retrieval: keys per query head (default 32) */
  int32_t exact_search;          /* retrieval: non-zero = exact scan instead of the hnsw index */
  int32_t ef_search;             /* retrieval: hnsw search beam, 0 = max(top_k, 64) */
  int32_t sink_tokens;           /* retrieval: always read the first n tokens (default 0) */
  int32_t recent_tokens;         /* retrieval: always read the last n tokens (default 0) */
  int32_t index_m;               /* retrieval: hnsw graph degree (default 16) */
  int32_t index_ef_construction; /* retrieval: hnsw construction beam (default 100) */
} kvc_read_policy;

/* Fills the defaults (dense; the other fields as documented above). Does nothing on NULL. */
KVC_API void kvc_read_policy_init(kvc_read_policy* policy);

/* kvc_decode_attention under a read policy (NULL = dense). Same buffers and rules. With
 * accumulate_scores only the tokens a step read get probability mass; lse is over those tokens.
 * Backends without sparse decode (cuda) return KVC_UNIMPLEMENTED; Quest on a cache created
 * without KVC_CONFIG_PAGE_SUMMARIES returns KVC_FAILED_PRECONDITION. */
KVC_API kvc_status kvc_decode_attention_sparse(kvc_cache* cache, const kvc_seq* batch,
                                               int32_t batch_size, int32_t layer, const float* q,
                                               float* out, float* lse, float scale,
                                               int32_t aggregation, int32_t accumulate_scores,
                                               const kvc_read_policy* policy);

/* ---- Tensors, decode plans, device memory --------------------------------------------------- */
/* The engine path: q / out in f32, f16 or bf16, host or device memory, and the host work of a
 * decode step done once per step (kvc_prepare_decode) instead of once per layer call. */

/* Where a tensor's memory lives. Device memory is memory of the cache's backend device
 * (cudaMalloc'd on "cuda"); accepted only by backends with device tensors (the CUDA backends),
 * KVC_INVALID_ARGUMENT elsewhere. */
typedef enum kvc_memory { KVC_MEMORY_HOST = 0, KVC_MEMORY_DEVICE = 1 } kvc_memory;

/* A buffer with its element type, element count and memory space. Inputs are only read. */
typedef struct kvc_tensor {
  void* data;           /* [num_elements] of dtype in `memory` (f16 / bf16 as uint16 bits) */
  int64_t num_elements; /* checked against the shape the call expects */
  int32_t dtype;        /* kvc_dtype */
  int32_t memory;       /* kvc_memory */
} kvc_tensor;

typedef struct kvc_decode_options {
  float scale;                        /* softmax scale, 0 = 1/sqrt(head_dim) */
  int32_t aggregation;                /* kvc_gqa_aggregation of accumulate_scores */
  int32_t accumulate_scores;          /* as in kvc_decode_attention */
  int32_t reserved;                   /* must be 0 */
  const kvc_read_policy* read_policy; /* NULL = dense (as kvc_decode_attention_sparse) */
  /* Device tensors only: the stream the decode is enqueued on (a cudaStream_t on "cuda"),
   * NULL = the backend's own stream. The call returns once the work is enqueued (with
   * accumulate_scores it waits: the accumulators are host memory); kvc_synchronize waits for
   * the results. Must be NULL for host tensors. */
  void* stream;
} kvc_decode_options;

/* Fills the defaults (scale 0, mean aggregation, no accumulation, dense, no stream). Does
 * nothing on NULL. */
KVC_API void kvc_decode_options_init(kvc_decode_options* options);

/* kvc_decode_attention with typed tensors (see kvc_tensor):
 *   q, out: [batch_size, num_q_heads, head_dim], each f32, f16 or bf16 (out is rounded from the
 *           f32 result to nearest even); lse: NULL, or [batch_size, num_q_heads] f32 (a
 *           kvc_tensor with 0 elements also means "not requested").
 *   Host tensors work on every backend. Device tensors (q, out and lse all in device memory)
 *   need a backend with device tensors and a dense read; the call is then asynchronous on
 *   options->stream. options: NULL = defaults. Sizes, dtypes and memory spaces are checked
 *   before anything runs; KVC_INVALID_ARGUMENT names the bad tensor. */
KVC_API kvc_status kvc_decode_attention_tensors(kvc_cache* cache, const kvc_seq* batch,
                                                int32_t batch_size, int32_t layer,
                                                const kvc_tensor* q, const kvc_tensor* out,
                                                const kvc_tensor* lse,
                                                const kvc_decode_options* options);

/* Waits for the device-tensor work enqueued on `stream` (NULL: the backend's own stream). OK at
 * once on host backends; KVC_INVALID_ARGUMENT for a non-NULL stream on a backend without device
 * tensors. */
KVC_API kvc_status kvc_synchronize(kvc_cache* cache, void* stream);

/* kvc_append with typed K/V: keys and values [num_tokens, num_kv_heads, head_dim] of one dtype
 * (f32 / f16 / bf16), both host memory, or both device memory on a backend with device tensors
 * (device K/V must be complete: the stream that produced them synchronised). positions,
 * modalities and admit are host memory, as in kvc_append. */
KVC_API kvc_status kvc_append_tensors(kvc_cache* cache, kvc_seq seq, int32_t layer,
                                      int32_t num_tokens, const kvc_tensor* keys,
                                      const kvc_tensor* values, const int32_t* positions,
                                      const uint8_t* modalities, const uint8_t* admit);

/* A decode plan: the batch-wide host work of one decode step (finding the sequences, checking
 * the batch, the lock order, the kernel views of every layer), made once and run per layer.
 * Opaque id like the other handles. Engine loop:
 *   kvc_decode_plan* plan = NULL;
 *   kvc_prepare_decode(cache, batch, batch_size, &plan);
 *   for (layer = 0; layer < num_layers; ++layer) {
 *     ... kvc_append_tensors this step's K/V of `layer`, compute q ...
 *     kvc_decode_attention_planned(cache, plan, layer, &q, &out, NULL, &options);
 *   }
 *   kvc_decode_plan_destroy(plan);
 * What a plan sees: appends (to any layer, before or after its decode) are seen; after an
 * Apply (kvc_plan_apply / kvc_compress) changed a stream of the batch, or a sequence of the
 * batch was freed, the planned call fails with KVC_FAILED_PRECONDITION ("prepare again") and
 * decodes nothing. A plan is for the cache that prepared it (another cache's plan:
 * KVC_INVALID_ARGUMENT) and stays a valid handle until destroyed, also after its cache was
 * destroyed (it can then only be destroyed). Calls on one plan from several threads take turns. */
typedef struct kvc_decode_plan kvc_decode_plan; /* opaque */

/* Plans every layer of `batch` ([batch_size] distinct sequences, the order of the q / out
 * rows). Same checks as kvc_decode_attention (non-empty, known sequences, no duplicate). */
KVC_API kvc_status kvc_prepare_decode(kvc_cache* cache, const kvc_seq* batch,
                                      int32_t batch_size, kvc_decode_plan** out);
/* The plan's batch size and its layers [first_layer, first_layer + num_layers). Any out pointer
 * may be NULL. */
KVC_API kvc_status kvc_decode_plan_info(const kvc_decode_plan* plan, int32_t* batch_size,
                                        int32_t* first_layer, int32_t* num_layers);
/* Decode attention of `layer` over the plan's batch: tensors, options and results exactly as
 * kvc_decode_attention_tensors with the plan's batch (bit for bit the same output). On the cpu
 * backend the C++ call underneath allocates no heap memory for a dense read (f16 / bf16 host
 * q/out included); this C layer adds a handle lookup and argument checks. */
KVC_API kvc_status kvc_decode_attention_planned(kvc_cache* cache, kvc_decode_plan* plan,
                                                int32_t layer, const kvc_tensor* q,
                                                const kvc_tensor* out, const kvc_tensor* lse,
                                                const kvc_decode_options* options);
KVC_API kvc_status kvc_decode_plan_destroy(kvc_decode_plan* plan);

/* ---- Policies ------------------------------------------------------------------------------- */
/* Queries the engine observed for one layer (post-RoPE, like the stored keys): usually the last
 * prompt rows. The cache never stores queries, so policies that score windows get them here. */
typedef struct kvc_layer_observation {
  int32_t num_rows;
  int32_t reserved;         /* must be 0 */
  const float* queries;     /* [num_rows, num_q_heads, head_dim] f32 */
  const int32_t* positions; /* [num_rows] ascending */
} kvc_layer_observation;

typedef struct kvc_observations {
  int32_t num_layers;                  /* 0 (nothing observed) or the cache's num_layers */
  int32_t num_image_scores;            /* 0 or k: PruMerge's per-image-token CLS scores */
  const kvc_layer_observation* layers; /* [num_layers] */
  const int32_t* image_score_positions; /* [num_image_scores] ascending */
  const float* image_scores;            /* [num_image_scores] */
} kvc_observations;

/* Builds policy `name` with `params` ("key=value,..." or NULL; name may also be the full spec
 * "snapkv:keep=0.1,window=32"), collects what it needs from `seq` and `observations` (NULL =
 * none) and plans. The plan is plain data owned by the caller: destroy it with
 * kvc_plan_destroy. Planning does not change the cache. */
KVC_API kvc_status kvc_policy_plan(kvc_cache* cache, kvc_seq seq, const char* name,
                                   const char* params, const kvc_observations* observations,
                                   kvc_plan** out);
/* Number of streams the plan changes (streams it does not name are left alone). */
KVC_API kvc_status kvc_plan_num_streams(const kvc_plan* plan, int32_t* out);
/* Stream `index` of the plan: its layer, kv head, kept token count and kept key channels (0 =
 * all channels kept). Any out pointer may be NULL. */
KVC_API kvc_status kvc_plan_stream(const kvc_plan* plan, int32_t index, int32_t* layer,
                                   int32_t* kv_head, int32_t* kept, int32_t* key_channels);
/* Tokens stream (layer, kv_head) keeps after the plan: its kept count when the plan names it,
 * otherwise its length when the plan was made. */
KVC_API kvc_status kvc_plan_kept_count(const kvc_plan* plan, int32_t layer, int32_t kv_head,
                                       int32_t* out);
/* Kept token indices (ascending indices into the stream as it was planned) of stream `index`. */
KVC_API kvc_status kvc_plan_kept_tokens(const kvc_plan* plan, int32_t index, int32_t* out,
                                        int32_t capacity, int32_t* required);
/* Sequence the plan is for, and the total tokens it keeps over the streams it names. */
KVC_API kvc_status kvc_plan_info(const kvc_plan* plan, kvc_seq* sequence, int64_t* kept_tokens);
/* Applies the plan (pages freed). FAILED_PRECONDITION when the plan was made by another cache;
 * INVALID_ARGUMENT when the sequence changed so that the plan no longer fits. A plan may be
 * applied once; applying it again fails with FAILED_PRECONDITION. */
KVC_API kvc_status kvc_plan_apply(kvc_cache* cache, kvc_plan* plan);
KVC_API kvc_status kvc_plan_destroy(kvc_plan* plan);

typedef struct kvc_compress_result {
  int64_t tokens_before;    /* tokens of the sequence over every stream before */
  int64_t tokens_after;     /* ... and after */
  int32_t streams_changed;  /* streams the plan named */
  int32_t reserved;
} kvc_compress_result;

/* kvc_policy_plan + kvc_plan_apply + kvc_plan_destroy in one call. result may be NULL. */
KVC_API kvc_status kvc_compress(kvc_cache* cache, kvc_seq seq, const char* name,
                                const char* params, const kvc_observations* observations,
                                kvc_compress_result* result);

/* ---- Introspection -------------------------------------------------------------------------- */
KVC_API kvc_status kvc_stream_length(const kvc_cache* cache, kvc_seq seq, int32_t layer,
                                     int32_t kv_head, int32_t* out);
/* Reads a stream back. capacity: tokens the buffers hold; *length receives the stream length
 * (required). Every buffer may be NULL:
 *   positions [capacity] int32; modalities [capacity] kvc_modality bytes; scores [capacity] f32
 *   (accumulators); keys, values [capacity, head_dim] f32 (channels a pruned segment does not
 *   store read as 0). length > capacity -> KVC_BUFFER_TOO_SMALL, nothing written but *length. */
KVC_API kvc_status kvc_stream_read(const kvc_cache* cache, kvc_seq seq, int32_t layer,
                                   int32_t kv_head, int32_t capacity, int32_t* length,
                                   int32_t* positions, uint8_t* modalities, float* scores,
                                   float* keys, float* values);

/* Adds delta[t] to the score accumulator of token t of a stream: for engines that run their
 * own attention kernels and still want accumulated-score (H2O-style) policies.
 *   delta: [num_tokens] f32, num_tokens must equal the stream length. */
KVC_API kvc_status kvc_stream_add_scores(kvc_cache* cache, kvc_seq seq, int32_t layer,
                                         int32_t kv_head, const float* delta,
                                         int32_t num_tokens);

typedef struct kvc_stats {
  int32_t num_sequences;
  int32_t pages_total;
  int32_t pages_used;
  int32_t pages_free;
  int64_t bytes_used;    /* pages_used * page_bytes */
  int64_t page_bytes;
  int64_t tokens_stored; /* sum of stream lengths over every sequence */
} kvc_stats;
KVC_API kvc_status kvc_cache_stats(const kvc_cache* cache, kvc_stats* out);
/* Checks every internal invariant (pages, reference counts, positions). */
KVC_API kvc_status kvc_cache_validate(const kvc_cache* cache);

/* ---- Page-table export (FlashInfer CSR form) ------------------------------------------------ */
/* Addressing of the pool. Page p of a full-width stream:
 *   key of row r:   pool_base + p * page_bytes + key_offset_bytes   + r * row_stride_bytes
 *   value of row r: pool_base + p * page_bytes + value_offset_bytes + r * row_stride_bytes
 * each head_dim elements of dtype. */
typedef struct kvc_page_layout {
  void* pool_base;            /* host memory (cpu) or device memory (cuda, is_device = 1) */
  int64_t page_bytes;         /* stride between pages */
  int64_t key_offset_bytes;   /* 0: keys [tokens_per_page, head_dim] open the page */
  int64_t value_offset_bytes; /* tokens_per_page * head_dim * sizeof(dtype) */
  int64_t row_stride_bytes;   /* head_dim * sizeof(dtype) between consecutive tokens */
  int32_t num_pages;
  int32_t tokens_per_page;    /* FlashInfer page_size */
  int32_t head_dim;
  int32_t dtype;              /* kvc_dtype */
  int32_t is_device;
  int32_t reserved;
} kvc_page_layout;

/* Page table of `layer` for a batch: row r = b * num_kv_heads + h is stream (batch[b], layer, h)
 * ("one kv head per row"). rows = batch_size * num_kv_heads.
 *   indptr:        [rows + 1] int32
 *   indices:       [capacity] int32 page ids, row r owns indices[indptr[r] .. indptr[r + 1])
 *   last_page_len: [rows] int32, tokens in the row's last page (0 for an empty row)
 *   *nnz:          receives indptr[rows] (the number of page ids)
 *   layout:        may be NULL.
 * indices == NULL is a size query: KVC_OK with *nnz and *layout written, indptr and
 * last_page_len untouched (may be NULL). capacity < nnz -> KVC_BUFFER_TOO_SMALL, only *nnz and
 * *layout written.
 * A stream is exportable when every segment stores full-width keys at the cache's page geometry
 * and every segment but the last fills its last page. Otherwise FAILED_PRECONDITION names the
 * stream (channel-pruned by a ThinK policy, or a non-final partial page). Valid until the next
 * Append/Apply/Free on those sequences. */
KVC_API kvc_status kvc_export_page_table(const kvc_cache* cache, int32_t layer,
                                         const kvc_seq* batch, int32_t batch_size,
                                         int32_t* indptr, int32_t* indices, int64_t capacity,
                                         int64_t* nnz, int32_t* last_page_len,
                                         kvc_page_layout* layout);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* KVCACHE_C_API_H_ */
