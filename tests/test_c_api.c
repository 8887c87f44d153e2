/* The C API driven from C (C99, -pedantic): a full lifecycle checked against values computed
 * here (keys read back, attention recomputed, page table dereferenced into the pool), and every
 * error path (NULL pointers, destroyed/foreign handles, bad layer, bad dtype, pool exhaustion
 * leaving the cache unchanged). Own main; exit code = number of failed checks (0 = pass). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvcache/c_api.h"

#include "c_test_check.h"

enum { kLayers = 3, kHeads = 2, kQHeads = 4, kDim = 8, kPageTokens = 4, kPrompt = 10 };

static uint32_t g_rng = 12345u;
static float Uniform(void) { /* deterministic LCG in [-1, 1) */
  g_rng = g_rng * 1664525u + 1013904223u;
  return (float)((g_rng >> 8) & 0xFFFFu) / 32768.0f - 1.0f;
}

/* Keys/values of one layer, [n, kHeads, kDim], kept so reads can be compared exactly. */
static float g_keys[kLayers][kPrompt + 1][kHeads][kDim];
static float g_values[kLayers][kPrompt + 1][kHeads][kDim];

static void TestVersionAndErrors(void) {
  int major = -1, minor = -1, patch = -1;
  kvc_version(&major, &minor, &patch);
  CHECK(major >= 0 && minor >= 0 && patch >= 0);
  char expect[32];
  snprintf(expect, sizeof(expect), "%d.%d.%d", major, minor, patch);
  CHECK(strcmp(kvc_version_string(), expect) == 0);
  kvc_version(NULL, NULL, NULL); /* must not crash */
  CHECK(kvc_abi_version() == KVC_ABI_VERSION);
  CHECK(strcmp(kvc_status_name(KVC_OUT_OF_MEMORY), "KVC_OUT_OF_MEMORY") == 0);
  CHECK(strcmp(kvc_status_name((kvc_status)99), "KVC_UNKNOWN_STATUS") == 0);
  /* Outside the C++ enum's value range (undefined behaviour before the fix; fuzz_c_api). */
  CHECK(strcmp(kvc_status_name((kvc_status)-1), "KVC_UNKNOWN_STATUS") == 0);
}

static void TestCreateErrors(void) {
  kvc_config cfg;
  kvc_cache* cache = NULL;
  kvc_config_init(&cfg);
  kvc_config_init(NULL);
  EXPECT_STATUS(kvc_cache_create(NULL, "cpu", &cache), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("config");
  EXPECT_STATUS(kvc_cache_create(&cfg, NULL, &cache), KVC_INVALID_ARGUMENT);
  EXPECT_STATUS(kvc_cache_create(&cfg, "cpu", NULL), KVC_INVALID_ARGUMENT);
  EXPECT_STATUS(kvc_cache_create(&cfg, "no-such-backend", &cache), KVC_NOT_FOUND);
  EXPECT_ERROR_MENTIONS("no-such-backend");
  cfg.dtype = 7;
  EXPECT_STATUS(kvc_cache_create(&cfg, "cpu", &cache), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("7");
  kvc_config_init(&cfg);
  cfg.num_q_heads = 3;
  cfg.num_kv_heads = 2;
  EXPECT_STATUS(kvc_cache_create(&cfg, "cpu", &cache), KVC_INVALID_ARGUMENT);
  CHECK(cache == NULL);
  /* A successful call clears the error. */
  kvc_config_init(&cfg);
  EXPECT_OK(kvc_cache_create(&cfg, "cpu", &cache));
  CHECK(kvc_last_error()[0] == '\0');
  EXPECT_OK(kvc_cache_destroy(cache));
  EXPECT_STATUS(kvc_cache_destroy(cache), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("already destroyed");
  EXPECT_STATUS(kvc_cache_destroy(NULL), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("NULL");
}

static void AppendPrompt(kvc_cache* cache, kvc_seq seq) {
  int32_t positions[kPrompt];
  uint8_t modalities[kPrompt];
  int l, t, h, d;
  for (t = 0; t < kPrompt; ++t) {
    positions[t] = t;
    modalities[t] = (uint8_t)(t >= 2 && t < 7 ? KVC_MODALITY_IMAGE : KVC_MODALITY_TEXT);
  }
  for (l = 0; l < kLayers; ++l) {
    for (t = 0; t <= kPrompt; ++t)
      for (h = 0; h < kHeads; ++h)
        for (d = 0; d < kDim; ++d) {
          g_keys[l][t][h][d] = Uniform();
          g_values[l][t][h][d] = Uniform();
        }
    EXPECT_OK(kvc_append(cache, seq, l, kPrompt, KVC_DTYPE_F32, g_keys[l], g_values[l],
                         positions, modalities, NULL));
  }
}

/* Dense attention of q [kQHeads, kDim] over n tokens k, v [n, kDim] for q head qh. */
static void Attention(const float* q, const float* k, const float* v, int n, float* out,
                      float* lse) {
  const double scale = 1.0 / sqrt((double)kDim);
  double logits[64], m = -INFINITY, z = 0.0, acc[kDim];
  int t, d;
  for (t = 0; t < n; ++t) {
    double dot = 0.0;
    for (d = 0; d < kDim; ++d) dot += (double)q[d] * k[t * kDim + d];
    logits[t] = scale * dot;
    if (logits[t] > m) m = logits[t];
  }
  for (d = 0; d < kDim; ++d) acc[d] = 0.0;
  for (t = 0; t < n; ++t) {
    const double p = exp(logits[t] - m);
    z += p;
    for (d = 0; d < kDim; ++d) acc[d] += p * v[t * kDim + d];
  }
  for (d = 0; d < kDim; ++d) out[d] = (float)(acc[d] / z);
  *lse = (float)(m + log(z));
}

static int Near(float a, float b, float tol) { return fabsf(a - b) <= tol * (1.0f + fabsf(b)); }

static void TestLifecycle(void) {
  kvc_config cfg, got_cfg;
  kvc_cache* cache = NULL;
  kvc_seq a = -1, b = -1, batch[2];
  kvc_stats stats, stats_before;
  int32_t len = -1;
  int l, h, t, d, i;

  kvc_config_init(&cfg);
  cfg.num_layers = kLayers;
  cfg.num_kv_heads = kHeads;
  cfg.num_q_heads = kQHeads;
  cfg.head_dim = kDim;
  cfg.dtype = KVC_DTYPE_F32;
  cfg.page_tokens = kPageTokens;
  cfg.num_pages = 256;
  EXPECT_OK(kvc_cache_create(&cfg, "cpu", &cache));
  EXPECT_OK(kvc_cache_get_config(cache, &got_cfg));
  CHECK(got_cfg.num_layers == kLayers && got_cfg.num_kv_heads == kHeads &&
        got_cfg.head_dim == kDim && got_cfg.page_tokens == kPageTokens &&
        got_cfg.page_bytes == (int64_t)kPageTokens * 2 * kDim * 4);

  EXPECT_OK(kvc_sequence_add(cache, &a));
  AppendPrompt(cache, a);
  for (l = 0; l < kLayers; ++l)
    for (h = 0; h < kHeads; ++h) {
      EXPECT_OK(kvc_stream_length(cache, a, l, h, &len));
      CHECK(len == kPrompt);
    }

  /* Read back one stream exactly. */
  {
    int32_t positions[kPrompt];
    uint8_t modalities[kPrompt];
    float scores[kPrompt], keys[kPrompt * kDim], values[kPrompt * kDim];
    EXPECT_STATUS(kvc_stream_read(cache, a, 1, 1, kPrompt - 1, &len, positions, NULL, NULL,
                                  NULL, NULL),
                  KVC_BUFFER_TOO_SMALL);
    CHECK(len == kPrompt);
    EXPECT_OK(kvc_stream_read(cache, a, 1, 1, kPrompt, &len, positions, modalities, scores,
                              keys, values));
    CHECK(len == kPrompt);
    for (t = 0; t < kPrompt; ++t) {
      CHECK(positions[t] == t);
      CHECK(modalities[t] == (t >= 2 && t < 7 ? KVC_MODALITY_IMAGE : KVC_MODALITY_TEXT));
      CHECK(scores[t] == 0.0f);
      for (d = 0; d < kDim; ++d) {
        CHECK(keys[t * kDim + d] == g_keys[1][t][1][d]);
        CHECK(values[t * kDim + d] == g_values[1][t][1][d]);
      }
    }
  }

  /* Fork, then extend the child by one token on every layer (copy-on-write of the tail page). */
  EXPECT_OK(kvc_cache_stats(cache, &stats_before));
  EXPECT_OK(kvc_sequence_fork(cache, a, &b));
  CHECK(b != a);
  for (l = 0; l < kLayers; ++l) {
    const int32_t pos = kPrompt;
    EXPECT_OK(kvc_append(cache, b, l, 1, KVC_DTYPE_F32, g_keys[l][kPrompt], g_values[l][kPrompt],
                         &pos, NULL, NULL));
  }
  EXPECT_OK(kvc_stream_length(cache, a, 0, 0, &len));
  CHECK(len == kPrompt);
  EXPECT_OK(kvc_stream_length(cache, b, 0, 0, &len));
  CHECK(len == kPrompt + 1);
  EXPECT_OK(kvc_cache_stats(cache, &stats));
  CHECK(stats.num_sequences == 2);
  /* 10 tokens at 4 per page = 3 pages per stream; the child's partly filled tail page was
   * copied (1 new page per stream), the first 2 stay shared. */
  CHECK(stats.pages_used == stats_before.pages_used + kLayers * kHeads);
  CHECK(stats.pages_free == stats.pages_total - stats.pages_used);
  CHECK(stats.bytes_used == (int64_t)stats.pages_used * stats.page_bytes);
  CHECK(stats.tokens_stored == (int64_t)kLayers * kHeads * (2 * kPrompt + 1));

  /* Row scoring with accumulation: each row's mean-over-group probabilities sum to 1 per head. */
  {
    float q[3 * kQHeads * kDim], token_scores[2 * kPrompt], scores[kPrompt];
    int32_t rows[3] = {7, 8, 9};
    int64_t required = 0, below[kQHeads], causal[kQHeads];
    for (i = 0; i < 3 * kQHeads * kDim; ++i) q[i] = Uniform();
    EXPECT_STATUS(kvc_score_rows(cache, a, 0, 3, q, rows, 0.0f, KVC_GQA_MEAN, 0.01f, 1,
                                 token_scores, 5, &required, NULL, NULL),
                  KVC_BUFFER_TOO_SMALL);
    CHECK(required == 2 * kPrompt);
    EXPECT_OK(kvc_stream_read(cache, a, 0, 0, kPrompt, &len, NULL, NULL, scores, NULL, NULL));
    for (t = 0; t < kPrompt; ++t) CHECK(scores[t] == 0.0f); /* nothing accumulated */
    EXPECT_OK(kvc_score_rows(cache, a, 0, 3, q, rows, 0.0f, KVC_GQA_MEAN, 0.01f, 1,
                             token_scores, 2 * kPrompt, &required, below, causal));
    for (h = 0; h < kHeads; ++h) {
      double sum = 0.0;
      for (t = 0; t < kPrompt; ++t) sum += token_scores[h * kPrompt + t];
      CHECK(fabs(sum - 3.0) < 1e-4);
      EXPECT_OK(kvc_stream_read(cache, a, 0, h, kPrompt, &len, NULL, NULL, scores, NULL, NULL));
      for (t = 0; t < kPrompt; ++t) CHECK(Near(scores[t], token_scores[h * kPrompt + t], 1e-6f));
    }
    for (i = 0; i < kQHeads; ++i) CHECK(causal[i] == 8 + 9 + 10); /* causal entries of 3 rows */
    /* Engine-supplied scores add to the same accumulators. */
    {
      float delta[kPrompt], again[kPrompt];
      for (t = 0; t < kPrompt; ++t) delta[t] = (float)t;
      EXPECT_OK(kvc_stream_read(cache, a, 0, 1, kPrompt, &len, NULL, NULL, scores, NULL, NULL));
      EXPECT_OK(kvc_stream_add_scores(cache, a, 0, 1, delta, kPrompt));
      EXPECT_OK(kvc_stream_read(cache, a, 0, 1, kPrompt, &len, NULL, NULL, again, NULL, NULL));
      for (t = 0; t < kPrompt; ++t) CHECK(Near(again[t], scores[t] + (float)t, 1e-6f));
      EXPECT_STATUS(kvc_stream_add_scores(cache, a, 0, 1, delta, kPrompt - 1),
                    KVC_INVALID_ARGUMENT);
      EXPECT_ERROR_MENTIONS("9 entries");
      EXPECT_STATUS(kvc_stream_add_scores(cache, a, 0, 1, NULL, kPrompt), KVC_INVALID_ARGUMENT);
    }
    EXPECT_STATUS(kvc_score_rows(cache, a, 0, 3, q, rows, 0.0f, 9, 0.01f, 0, NULL, 0, NULL, NULL,
                                 NULL),
                  KVC_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("aggregation 9");
  }

  /* Decode over {a, b} on layer 2 with LSE and score accumulation, against dense attention. */
  {
    float q[2 * kQHeads * kDim], out[2 * kQHeads * kDim], lse[2 * kQHeads];
    float k[(kPrompt + 1) * kDim], v[(kPrompt + 1) * kDim], ref[kDim], ref_lse;
    float before[kPrompt + 1], after[kPrompt + 1];
    int s;
    batch[0] = a;
    batch[1] = b;
    for (i = 0; i < 2 * kQHeads * kDim; ++i) q[i] = Uniform();
    EXPECT_OK(kvc_stream_read(cache, b, 2, 1, kPrompt + 1, &len, NULL, NULL, before, NULL, NULL));
    EXPECT_OK(kvc_decode_attention(cache, batch, 2, 2, q, out, lse, 0.0f, KVC_GQA_MEAN, 1));
    for (s = 0; s < 2; ++s) {
      const int n = s == 0 ? kPrompt : kPrompt + 1;
      for (h = 0; h < kHeads; ++h) {
        EXPECT_OK(kvc_stream_read(cache, batch[s], 2, h, kPrompt + 1, &len, NULL, NULL, NULL, k,
                                  v));
        CHECK(len == n);
        for (i = 0; i < kQHeads / kHeads; ++i) {
          const int qh = h * (kQHeads / kHeads) + i;
          Attention(q + (s * kQHeads + qh) * kDim, k, v, n, ref, &ref_lse);
          for (d = 0; d < kDim; ++d) CHECK(Near(out[(s * kQHeads + qh) * kDim + d], ref[d], 1e-4f));
          CHECK(Near(lse[s * kQHeads + qh], ref_lse, 1e-4f));
        }
      }
    }
    EXPECT_OK(kvc_stream_read(cache, b, 2, 1, kPrompt + 1, &len, NULL, NULL, after, NULL, NULL));
    {
      double added = 0.0;
      for (t = 0; t < kPrompt + 1; ++t) added += after[t] - before[t];
      CHECK(fabs(added - 1.0) < 1e-4); /* one query, mean over the group: mass 1 added */
    }
    /* Error paths of decode. */
    batch[1] = a;
    EXPECT_STATUS(kvc_decode_attention(cache, batch, 2, 2, q, out, NULL, 0.0f, 0, 0),
                  KVC_INVALID_ARGUMENT); /* duplicate sequence */
    batch[1] = b;
    EXPECT_STATUS(kvc_decode_attention(cache, batch, 2, kLayers, q, out, NULL, 0.0f, 0, 0),
                  KVC_OUT_OF_RANGE);
    EXPECT_ERROR_MENTIONS("layer 3");
    EXPECT_STATUS(kvc_decode_attention(cache, batch, 2, 0, NULL, out, NULL, 0.0f, 0, 0),
                  KVC_INVALID_ARGUMENT);
    EXPECT_STATUS(kvc_decode_attention(cache, batch, 0, 0, q, out, NULL, 0.0f, 0, 0),
                  KVC_INVALID_ARGUMENT);
  }

  /* Page table of layer 0 for {a, b}: check it against the stream lengths, then dereference
   * every row's pages into the pool and compare with the keys/values read back. */
  {
    int32_t indptr[2 * kHeads + 1], indices[64], last_page_len[2 * kHeads];
    int64_t nnz = -1;
    kvc_page_layout layout;
    float k[(kPrompt + 1) * kDim], v[(kPrompt + 1) * kDim];
    int r;
    batch[0] = a;
    batch[1] = b;
    EXPECT_OK(kvc_export_page_table(cache, 0, batch, 2, NULL, NULL, 0, &nnz, NULL, &layout));
    CHECK(nnz == (int64_t)kHeads * (3 + 3));
    EXPECT_STATUS(kvc_export_page_table(cache, 0, batch, 2, indptr, indices, nnz - 1, &nnz,
                                        last_page_len, NULL),
                  KVC_BUFFER_TOO_SMALL);
    EXPECT_OK(kvc_export_page_table(cache, 0, batch, 2, indptr, indices, 64, &nnz,
                                    last_page_len, &layout));
    CHECK(layout.is_device == 0 && layout.pool_base != NULL);
    CHECK(layout.tokens_per_page == kPageTokens && layout.head_dim == kDim);
    CHECK(layout.dtype == KVC_DTYPE_F32);
    CHECK(layout.row_stride_bytes == kDim * 4);
    CHECK(layout.value_offset_bytes == (int64_t)kPageTokens * kDim * 4);
    CHECK(indptr[0] == 0 && indptr[2 * kHeads] == nnz);
    for (r = 0; r < 2 * kHeads; ++r) {
      const kvc_seq seq = batch[r / kHeads];
      const int32_t head = r % kHeads;
      const int32_t pages = indptr[r + 1] - indptr[r];
      EXPECT_OK(kvc_stream_read(cache, seq, 0, head, kPrompt + 1, &len, NULL, NULL, NULL, k, v));
      CHECK(pages == (len + kPageTokens - 1) / kPageTokens);
      CHECK(last_page_len[r] == len - (pages - 1) * kPageTokens);
      for (t = 0; t < len; ++t) {
        const int32_t page = indices[indptr[r] + t / kPageTokens];
        const uint8_t* base = (const uint8_t*)layout.pool_base + (int64_t)page * layout.page_bytes;
        const float* krow =
            (const float*)(base + layout.key_offset_bytes + (t % kPageTokens) * layout.row_stride_bytes);
        const float* vrow = (const float*)(base + layout.value_offset_bytes +
                                           (t % kPageTokens) * layout.row_stride_bytes);
        CHECK(page >= 0 && page < layout.num_pages);
        for (d = 0; d < kDim; ++d) {
          CHECK(krow[d] == k[t * kDim + d]);
          CHECK(vrow[d] == v[t * kDim + d]);
        }
      }
    }
    /* The fork shares the first two pages of every stream with its parent. */
    for (h = 0; h < kHeads; ++h) {
      CHECK(indices[indptr[h]] == indices[indptr[kHeads + h]]);
      CHECK(indices[indptr[h] + 1] == indices[indptr[kHeads + h] + 1]);
      CHECK(indices[indptr[h] + 2] != indices[indptr[kHeads + h] + 2]);
    }
    EXPECT_STATUS(kvc_export_page_table(cache, -1, batch, 2, indptr, indices, 64, &nnz,
                                        last_page_len, NULL),
                  KVC_OUT_OF_RANGE);
    batch[1] = 424242;
    EXPECT_STATUS(kvc_export_page_table(cache, 0, batch, 2, indptr, indices, 64, &nnz,
                                        last_page_len, NULL),
                  KVC_NOT_FOUND);
    EXPECT_ERROR_MENTIONS("424242");
  }

  /* Plan with SnapKV on `a` (observation window of 2 rows per layer), inspect, apply. */
  {
    float q[kLayers][2 * kQHeads * kDim];
    int32_t rows[2] = {8, 9}, kept_counts[kLayers][kHeads], n_streams = -1, kept_idx[kPrompt];
    int32_t required = 0;
    kvc_layer_observation layers[kLayers];
    kvc_observations obs;
    kvc_plan* plan = NULL;
    kvc_seq plan_seq = -1;
    int64_t kept_total = -1, sum = 0;
    memset(&obs, 0, sizeof(obs));
    for (l = 0; l < kLayers; ++l) {
      for (i = 0; i < 2 * kQHeads * kDim; ++i) q[l][i] = Uniform();
      layers[l].num_rows = 2;
      layers[l].reserved = 0;
      layers[l].queries = q[l];
      layers[l].positions = rows;
    }
    obs.num_layers = kLayers;
    obs.layers = layers;
    EXPECT_STATUS(kvc_policy_plan(cache, a, "snapkv", "keep=0.5,window=2", NULL, &plan),
                  KVC_INVALID_ARGUMENT); /* needs observations */
    EXPECT_STATUS(kvc_policy_plan(cache, a, "nosuchpolicy", NULL, &obs, &plan),
                  KVC_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("nosuchpolicy");
    EXPECT_STATUS(kvc_policy_plan(cache, a, "snapkv", "bogus=1", &obs, &plan),
                  KVC_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("bogus");
    EXPECT_OK(kvc_policy_plan(cache, a, "snapkv", "keep=0.5,window=2", &obs, &plan));
    EXPECT_OK(kvc_plan_num_streams(plan, &n_streams));
    CHECK(n_streams == kLayers * kHeads);
    EXPECT_OK(kvc_plan_info(plan, &plan_seq, &kept_total));
    CHECK(plan_seq == a);
    for (l = 0; l < kLayers; ++l)
      for (h = 0; h < kHeads; ++h) {
        EXPECT_OK(kvc_plan_kept_count(plan, l, h, &kept_counts[l][h]));
        CHECK(kept_counts[l][h] == kPrompt / 2);
        sum += kept_counts[l][h];
      }
    CHECK(sum == kept_total);
    for (i = 0; i < n_streams; ++i) {
      int32_t pl = -1, ph = -1, pk = -1, pc = -1;
      EXPECT_OK(kvc_plan_stream(plan, i, &pl, &ph, &pk, &pc));
      CHECK(pk == kept_counts[pl][ph]);
      CHECK(pc == 0);
      EXPECT_STATUS(kvc_plan_kept_tokens(plan, i, kept_idx, 1, &required), KVC_BUFFER_TOO_SMALL);
      CHECK(required == pk);
      EXPECT_OK(kvc_plan_kept_tokens(plan, i, kept_idx, kPrompt, &required));
      for (t = 1; t < pk; ++t) CHECK(kept_idx[t] > kept_idx[t - 1]);
      CHECK(kept_idx[pk - 1] == kPrompt - 1); /* the window (last 2 tokens) is kept */
      CHECK(kept_idx[pk - 2] == kPrompt - 2);
    }
    EXPECT_STATUS(kvc_plan_stream(plan, n_streams, NULL, NULL, NULL, NULL), KVC_OUT_OF_RANGE);
    EXPECT_STATUS(kvc_plan_kept_count(plan, kLayers, 0, &len), KVC_OUT_OF_RANGE);
    /* A plan handle is not a cache handle, and vice versa. */
    EXPECT_STATUS(kvc_sequence_add((kvc_cache*)plan, &b), KVC_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("plan handle");
    EXPECT_STATUS(kvc_plan_num_streams((const kvc_plan*)cache, &n_streams), KVC_INVALID_ARGUMENT);
    /* Planning changed nothing; applying does. */
    EXPECT_OK(kvc_stream_length(cache, a, 0, 0, &len));
    CHECK(len == kPrompt);
    EXPECT_OK(kvc_cache_stats(cache, &stats_before));
    EXPECT_OK(kvc_plan_apply(cache, plan));
    for (l = 0; l < kLayers; ++l)
      for (h = 0; h < kHeads; ++h) {
        EXPECT_OK(kvc_stream_length(cache, a, l, h, &len));
        CHECK(len == kept_counts[l][h]);
      }
    EXPECT_OK(kvc_cache_stats(cache, &stats));
    /* Tokens drop by exactly what the plan evicts. (Pages need not drop here: the first two
     * pages of every stream stay referenced by the fork b.) */
    CHECK(stats_before.tokens_stored - stats.tokens_stored ==
          (int64_t)kLayers * kHeads * kPrompt - kept_total);
    EXPECT_STATUS(kvc_plan_apply(cache, plan), KVC_FAILED_PRECONDITION);
    EXPECT_ERROR_MENTIONS("already applied");
    EXPECT_OK(kvc_plan_destroy(plan));
    EXPECT_STATUS(kvc_plan_destroy(plan), KVC_INVALID_ARGUMENT);
    EXPECT_STATUS(kvc_plan_num_streams(plan, &n_streams), KVC_INVALID_ARGUMENT);
    EXPECT_OK(kvc_cache_validate(cache));
  }

  /* A plan that no longer fits the sequence (an append since planning) is refused. */
  {
    kvc_plan* plan = NULL;
    const int32_t pos = kPrompt + 1;
    EXPECT_OK(kvc_policy_plan(cache, b, "streamingllm", "keep=0.5,sinks=1", NULL, &plan));
    EXPECT_OK(kvc_append(cache, b, 0, 1, KVC_DTYPE_F32, g_keys[0][0], g_values[0][0], &pos, NULL,
                         NULL));
    EXPECT_STATUS(kvc_plan_apply(cache, plan), KVC_FAILED_PRECONDITION);
    EXPECT_ERROR_MENTIONS("plan again");
    EXPECT_OK(kvc_plan_destroy(plan));
  }

  /* One-call compress on b: the result matches the stream lengths. */
  {
    kvc_compress_result result;
    int64_t total = 0;
    EXPECT_OK(kvc_compress(cache, b, "streamingllm:keep=0.5,sinks=1", NULL, NULL, &result));
    for (l = 0; l < kLayers; ++l)
      for (h = 0; h < kHeads; ++h) {
        EXPECT_OK(kvc_stream_length(cache, b, l, h, &len));
        total += len;
      }
    CHECK(result.tokens_before == (int64_t)kLayers * kHeads * (kPrompt + 1) + kHeads);
    CHECK(result.tokens_after == total);
    CHECK(result.tokens_after < result.tokens_before);
    CHECK(result.streams_changed == kLayers * kHeads);
    EXPECT_OK(kvc_cache_validate(cache));
  }

  /* ThinK prunes key channels: such streams are refused by the page-table export. */
  {
    float q[kLayers][2 * kQHeads * kDim];
    int32_t rows[2] = {8, 9}, indptr[kHeads + 1], indices[64], last_page_len[kHeads];
    int64_t nnz = 0;
    kvc_layer_observation layers[kLayers];
    kvc_observations obs;
    kvc_seq c = -1;
    memset(&obs, 0, sizeof(obs));
    for (l = 0; l < kLayers; ++l) {
      for (i = 0; i < 2 * kQHeads * kDim; ++i) q[l][i] = Uniform();
      layers[l].num_rows = 2;
      layers[l].reserved = 0;
      layers[l].queries = q[l];
      layers[l].positions = rows;
    }
    obs.num_layers = kLayers;
    obs.layers = layers;
    EXPECT_OK(kvc_sequence_add(cache, &c));
    AppendPrompt(cache, c);
    EXPECT_OK(kvc_compress(cache, c, "think", "lambda=0.5,window=2,recent=2", &obs, NULL));
    EXPECT_STATUS(kvc_export_page_table(cache, 0, &c, 1, indptr, indices, 64, &nnz,
                                        last_page_len, NULL),
                  KVC_FAILED_PRECONDITION);
    EXPECT_ERROR_MENTIONS("key_width 4");
    obs.num_layers = 1; /* wrong layer count */
    EXPECT_STATUS(kvc_compress(cache, c, "snapkv", NULL, &obs, NULL), KVC_INVALID_ARGUMENT);
    EXPECT_ERROR_MENTIONS("num_layers is 1");
    EXPECT_OK(kvc_sequence_free(cache, c));
  }

  /* Free: the sequence is gone, its pages return. */
  EXPECT_OK(kvc_sequence_free(cache, a));
  EXPECT_STATUS(kvc_sequence_free(cache, a), KVC_NOT_FOUND);
  EXPECT_STATUS(kvc_stream_length(cache, a, 0, 0, &len), KVC_NOT_FOUND);
  EXPECT_OK(kvc_sequence_free(cache, b));
  EXPECT_OK(kvc_cache_stats(cache, &stats));
  CHECK(stats.num_sequences == 0 && stats.pages_used == 0 && stats.tokens_stored == 0);
  EXPECT_OK(kvc_cache_validate(cache));
  EXPECT_OK(kvc_cache_destroy(cache));
  /* Every call on a destroyed handle fails cleanly. */
  EXPECT_STATUS(kvc_sequence_add(cache, &a), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("destroyed");
  EXPECT_STATUS(kvc_cache_stats(cache, &stats), KVC_INVALID_ARGUMENT);
  EXPECT_STATUS(kvc_decode_attention(cache, &a, 1, 0, NULL, NULL, NULL, 0.0f, 0, 0),
                KVC_INVALID_ARGUMENT);
}

/* Sparse decode through the C API: Quest with a budget covering the stream and exact retrieval
 * with top_k >= the stream read every token, so they must equal dense decode; a reduced Quest
 * budget must still give normalised, finite output; bad policies are rejected by name. */
static void TestSparseDecode(void) {
  kvc_config cfg, got_cfg;
  kvc_cache* cache = NULL;
  kvc_cache* plain = NULL;
  kvc_seq seq = -1, plain_seq = -1;
  kvc_read_policy policy;
  float q[kQHeads * kDim], dense[kQHeads * kDim], sparse[kQHeads * kDim];
  float dense_lse[kQHeads], sparse_lse[kQHeads];
  int i, l;

  kvc_config_init(&cfg);
  cfg.num_layers = kLayers;
  cfg.num_kv_heads = kHeads;
  cfg.num_q_heads = kQHeads;
  cfg.head_dim = kDim;
  cfg.dtype = KVC_DTYPE_F32;
  cfg.page_tokens = kPageTokens;
  cfg.num_pages = 256;
  cfg.flags = 8; /* undefined bit */
  EXPECT_STATUS(kvc_cache_create(&cfg, "cpu", &cache), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("flags");
  cfg.flags = KVC_CONFIG_PAGE_SUMMARIES;
  EXPECT_OK(kvc_cache_create(&cfg, "cpu", &cache));
  EXPECT_OK(kvc_cache_get_config(cache, &got_cfg));
  CHECK(got_cfg.flags == KVC_CONFIG_PAGE_SUMMARIES);
  EXPECT_OK(kvc_sequence_add(cache, &seq));
  AppendPrompt(cache, seq);
  for (i = 0; i < kQHeads * kDim; ++i) q[i] = Uniform();

  kvc_read_policy_init(&policy);
  kvc_read_policy_init(NULL);
  CHECK(policy.kind == KVC_READ_DENSE && policy.dense_first_layers == 2 && policy.top_k == 32);
  for (l = 0; l < kLayers; ++l) {
    EXPECT_OK(kvc_decode_attention(cache, &seq, 1, l, q, dense, dense_lse, 0.0f, 0, 0));
    /* Quest: budget >= the stream: every page read, identical to dense. */
    kvc_read_policy_init(&policy);
    policy.kind = KVC_READ_QUEST;
    policy.dense_first_layers = 0;
    policy.token_budget = kPrompt;
    EXPECT_OK(kvc_decode_attention_sparse(cache, &seq, 1, l, q, sparse, sparse_lse, 0.0f, 0, 0,
                                          &policy));
    for (i = 0; i < kQHeads * kDim; ++i) CHECK(Near(sparse[i], dense[i], 1e-5f));
    for (i = 0; i < kQHeads; ++i) CHECK(Near(sparse_lse[i], dense_lse[i], 1e-5f));
    /* Quest with a small budget: fewer tokens read, the lse can only drop (a subset's sum). */
    policy.token_budget = 1;
    EXPECT_OK(kvc_decode_attention_sparse(cache, &seq, 1, l, q, sparse, sparse_lse, 0.0f, 0, 0,
                                          &policy));
    for (i = 0; i < kQHeads; ++i) CHECK(sparse_lse[i] <= dense_lse[i] + 1e-5f);
    for (i = 0; i < kQHeads * kDim; ++i) CHECK(isfinite(sparse[i]));
    /* Exact retrieval with top_k >= the stream: every key read. */
    kvc_read_policy_init(&policy);
    policy.kind = KVC_READ_RETRIEVAL;
    policy.dense_first_layers = 0;
    policy.exact_search = 1;
    policy.top_k = kPrompt;
    EXPECT_OK(kvc_decode_attention_sparse(cache, &seq, 1, l, q, sparse, NULL, 0.0f, 0, 0,
                                          &policy));
    for (i = 0; i < kQHeads * kDim; ++i) CHECK(Near(sparse[i], dense[i], 1e-5f));
  }
  /* NULL policy = dense. */
  EXPECT_OK(kvc_decode_attention_sparse(cache, &seq, 1, 0, q, sparse, NULL, 0.0f, 0, 0, NULL));
  EXPECT_OK(kvc_decode_attention(cache, &seq, 1, 0, q, dense, NULL, 0.0f, 0, 0));
  for (i = 0; i < kQHeads * kDim; ++i) CHECK(sparse[i] == dense[i]);
  /* Bad policies. */
  kvc_read_policy_init(&policy);
  policy.kind = 9;
  EXPECT_STATUS(kvc_decode_attention_sparse(cache, &seq, 1, 0, q, sparse, NULL, 0.0f, 0, 0,
                                            &policy), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("9");
  kvc_read_policy_init(&policy);
  policy.kind = KVC_READ_QUEST;
  policy.token_budget = 0;
  EXPECT_STATUS(kvc_decode_attention_sparse(cache, &seq, 1, kLayers - 1, q, sparse, NULL, 0.0f,
                                            0, 0, &policy), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("token_budget");
  /* Quest needs page summaries. */
  cfg.flags = 0;
  EXPECT_OK(kvc_cache_create(&cfg, "cpu", &plain));
  EXPECT_OK(kvc_sequence_add(plain, &plain_seq));
  AppendPrompt(plain, plain_seq);
  policy.token_budget = 4;
  EXPECT_STATUS(kvc_decode_attention_sparse(plain, &plain_seq, 1, kLayers - 1, q, sparse, NULL,
                                            0.0f, 0, 0, &policy), KVC_FAILED_PRECONDITION);
  EXPECT_OK(kvc_cache_destroy(plain));
  EXPECT_OK(kvc_cache_destroy(cache));
}

static void TestArgumentErrors(void) {
  kvc_config cfg;
  kvc_cache* cache = NULL;
  kvc_cache* foreign = (kvc_cache*)(uintptr_t)0xdeadbeef00ull;
  kvc_seq seq = -1;
  float k[2 * kDim], v[2 * kDim];
  int32_t pos[2] = {0, 1}, len = -1;
  uint8_t bad_modality[2] = {0, 9};
  kvc_config_init(&cfg);
  cfg.num_layers = 2;
  cfg.num_kv_heads = 1;
  cfg.num_q_heads = 2;
  cfg.head_dim = kDim;
  cfg.dtype = KVC_DTYPE_F16;
  cfg.page_tokens = 2;
  cfg.num_pages = 8;
  memset(k, 0, sizeof(k));
  memset(v, 0, sizeof(v));
  EXPECT_OK(kvc_cache_create(&cfg, "cpu", &cache));
  EXPECT_OK(kvc_sequence_add(cache, &seq));
  EXPECT_STATUS(kvc_sequence_add(foreign, &seq), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("never created");
  EXPECT_STATUS(kvc_sequence_add(NULL, &seq), KVC_INVALID_ARGUMENT);
  EXPECT_STATUS(kvc_sequence_add(cache, NULL), KVC_INVALID_ARGUMENT);
  EXPECT_STATUS(kvc_sequence_fork(cache, 999, &seq), KVC_NOT_FOUND);
  EXPECT_ERROR_MENTIONS("999");
  EXPECT_STATUS(kvc_append(cache, seq, 2, 2, KVC_DTYPE_F32, k, v, pos, NULL, NULL),
                KVC_OUT_OF_RANGE);
  EXPECT_ERROR_MENTIONS("layer 2");
  EXPECT_STATUS(kvc_append(cache, seq, 0, 2, 5, k, v, pos, NULL, NULL), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("dtype 5");
  EXPECT_STATUS(kvc_append(cache, seq, 0, 2, KVC_DTYPE_F32, NULL, v, pos, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("keys");
  EXPECT_STATUS(kvc_append(cache, seq, 0, 2, KVC_DTYPE_F32, k, v, NULL, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_STATUS(kvc_append(cache, seq, 0, 0, KVC_DTYPE_F32, k, v, pos, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_STATUS(kvc_append(cache, seq, 0, 2, KVC_DTYPE_F32, k, v, pos, bad_modality, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("modalities[1] = 9");
  EXPECT_STATUS(kvc_append(cache, 77, 0, 2, KVC_DTYPE_F32, k, v, pos, NULL, NULL), KVC_NOT_FOUND);
  pos[1] = 0;
  EXPECT_STATUS(kvc_append(cache, seq, 0, 2, KVC_DTYPE_F32, k, v, pos, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("strictly increase");
  pos[1] = 1;
  EXPECT_STATUS(kvc_stream_length(cache, seq, 0, 1, &len), KVC_OUT_OF_RANGE);
  EXPECT_ERROR_MENTIONS("kv_head 1");
  EXPECT_STATUS(kvc_stream_read(cache, seq, 0, 0, 0, NULL, NULL, NULL, NULL, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_STATUS(kvc_cache_get_config(cache, NULL), KVC_INVALID_ARGUMENT);
  EXPECT_STATUS(kvc_cache_stats(cache, NULL), KVC_INVALID_ARGUMENT);
  EXPECT_STATUS(kvc_policy_plan(cache, seq, NULL, NULL, NULL, NULL), KVC_INVALID_ARGUMENT);
  EXPECT_STATUS(kvc_compress(cache, seq, NULL, NULL, NULL, NULL), KVC_INVALID_ARGUMENT);
  EXPECT_STATUS(kvc_plan_apply(cache, NULL), KVC_INVALID_ARGUMENT);
  /* f16 input and an admit mask: token 0 is not stored in layer 1. */
  {
    uint16_t kh[2 * kDim], vh[2 * kDim];
    uint8_t admit[2] = {0, 1};
    memset(kh, 0, sizeof(kh));
    memset(vh, 0, sizeof(vh));
    EXPECT_OK(kvc_append(cache, seq, 1, 2, KVC_DTYPE_F16, kh, vh, pos, NULL, admit));
    EXPECT_OK(kvc_stream_length(cache, seq, 1, 0, &len));
    CHECK(len == 1);
  }
  EXPECT_OK(kvc_cache_destroy(cache));
}

/* A tiny pool: the append that does not fit fails with KVC_OUT_OF_MEMORY and changes nothing. */
static void TestPoolExhaustion(void) {
  kvc_config cfg;
  kvc_cache* cache = NULL;
  kvc_seq seq = -1;
  kvc_stats before, after;
  float k[4 * 2 * kDim], v[4 * 2 * kDim];
  int32_t pos[4], len0 = -1, len1 = -1, length = -1;
  float read_k[8 * kDim];
  int i;
  kvc_config_init(&cfg);
  cfg.num_layers = 1;
  cfg.num_kv_heads = 2;
  cfg.num_q_heads = 2;
  cfg.head_dim = kDim;
  cfg.dtype = KVC_DTYPE_F32;
  cfg.page_tokens = 4;
  cfg.num_pages = 3;
  for (i = 0; i < 4 * 2 * kDim; ++i) {
    k[i] = Uniform();
    v[i] = Uniform();
  }
  EXPECT_OK(kvc_cache_create(&cfg, "cpu", &cache));
  EXPECT_OK(kvc_sequence_add(cache, &seq));
  for (i = 0; i < 4; ++i) pos[i] = i;
  EXPECT_OK(kvc_append(cache, seq, 0, 4, KVC_DTYPE_F32, k, v, pos, NULL, NULL)); /* 2 pages */
  EXPECT_OK(kvc_cache_stats(cache, &before));
  CHECK(before.pages_used == 2 && before.pages_free == 1);
  for (i = 0; i < 4; ++i) pos[i] = 4 + i;
  /* Needs one new page per head (2), only 1 is free. */
  EXPECT_STATUS(kvc_append(cache, seq, 0, 4, KVC_DTYPE_F32, k, v, pos, NULL, NULL),
                KVC_OUT_OF_MEMORY);
  CHECK(strlen(kvc_last_error()) > 0);
  EXPECT_OK(kvc_cache_stats(cache, &after));
  CHECK(after.pages_used == before.pages_used && after.tokens_stored == before.tokens_stored);
  EXPECT_OK(kvc_stream_length(cache, seq, 0, 0, &len0));
  EXPECT_OK(kvc_stream_length(cache, seq, 0, 1, &len1));
  CHECK(len0 == 4 && len1 == 4); /* neither head was partly extended */
  EXPECT_OK(kvc_stream_read(cache, seq, 0, 1, 8, &length, NULL, NULL, NULL, read_k, NULL));
  for (i = 0; i < 4 * kDim; ++i) CHECK(read_k[i] == k[(i / kDim) * 2 * kDim + kDim + i % kDim]);
  EXPECT_OK(kvc_cache_validate(cache));
  /* Freeing the sequence returns every page: the failed append leaked none. */
  EXPECT_OK(kvc_sequence_free(cache, seq));
  EXPECT_OK(kvc_cache_stats(cache, &after));
  CHECK(after.pages_used == 0 && after.pages_free == 3);
  EXPECT_OK(kvc_cache_destroy(cache));
}

int main(void) {
  TestVersionAndErrors();
  TestCreateErrors();
  TestLifecycle();
  TestArgumentErrors();
  TestPoolExhaustion();
  TestSparseDecode();
  return CheckReport("test_c_api");
}
