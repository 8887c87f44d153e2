/* c_consumer — the installed C library (libkvcache_c, kvcache/c_api.h) used from plain C99:
 * append a prompt, decode with score accumulation (and through a decode plan), export the page
 * table and read one key through it, compress with a policy, and check the lengths the library
 * reports. */
#include <stdio.h>
#include <string.h>

#include "kvcache/c_api.h"

#define TRY(expr)                                                                       \
  do {                                                                                  \
    kvc_status s_ = (expr);                                                             \
    if (s_ != KVC_OK) {                                                                 \
      fprintf(stderr, "%s: %s: %s\n", #expr, kvc_status_name(s_), kvc_last_error());    \
      return 1;                                                                         \
    }                                                                                   \
  } while (0)

enum { kHeads = 2, kQHeads = 4, kDim = 16, kTokens = 40 };

int main(void) {
  static float k[kTokens][kHeads][kDim], v[kTokens][kHeads][kDim];
  float q[kQHeads * kDim], out[kQHeads * kDim], lse[kQHeads];
  int32_t positions[kTokens], indptr[kHeads + 1], indices[16], last_page_len[kHeads], len = 0;
  int64_t nnz = 0;
  kvc_config cfg;
  kvc_cache* cache = NULL;
  kvc_seq seq = 0;
  kvc_page_layout layout;
  kvc_compress_result result;
  int t, h, d;

  for (t = 0; t < kTokens; ++t) {
    positions[t] = t;
    for (h = 0; h < kHeads; ++h)
      for (d = 0; d < kDim; ++d) {
        k[t][h][d] = (float)((t * 7 + h * 3 + d) % 11) / 11.0f - 0.5f;
        v[t][h][d] = (float)((t * 5 + h + d * 2) % 13) / 13.0f - 0.5f;
      }
  }
  for (d = 0; d < kQHeads * kDim; ++d) q[d] = (float)(d % 5) / 5.0f;

  kvc_config_init(&cfg);
  cfg.num_layers = 1;
  cfg.num_kv_heads = kHeads;
  cfg.num_q_heads = kQHeads;
  cfg.head_dim = kDim;
  cfg.dtype = KVC_DTYPE_F32;
  cfg.page_tokens = 8;
  cfg.num_pages = 64;
  TRY(kvc_cache_create(&cfg, "cpu", &cache));
  TRY(kvc_sequence_add(cache, &seq));
  TRY(kvc_append(cache, seq, 0, kTokens, KVC_DTYPE_F32, k, v, positions, NULL, NULL));
  TRY(kvc_decode_attention(cache, &seq, 1, 0, q, out, lse, 0.0f, KVC_GQA_MEAN, 1));
  { /* an engine's decode step: plan once per step, then one typed-tensor call per layer */
    float planned[kQHeads * kDim];
    kvc_decode_plan* plan = NULL;
    kvc_tensor qt = {q, kQHeads * kDim, KVC_DTYPE_F32, KVC_MEMORY_HOST};
    kvc_tensor ot = {planned, kQHeads * kDim, KVC_DTYPE_F32, KVC_MEMORY_HOST};
    TRY(kvc_prepare_decode(cache, &seq, 1, &plan));
    TRY(kvc_decode_attention_planned(cache, plan, 0, &qt, &ot, NULL, NULL));
    TRY(kvc_decode_plan_destroy(plan));
    if (memcmp(planned, out, sizeof(out)) != 0) {
      fprintf(stderr, "planned decode differs from kvc_decode_attention\n");
      return 1;
    }
  }

  TRY(kvc_export_page_table(cache, 0, &seq, 1, indptr, indices, 16, &nnz, last_page_len,
                            &layout));
  if (nnz != kHeads * (kTokens / 8) || last_page_len[0] != 8) {
    fprintf(stderr, "unexpected page table: nnz %lld, last_page_len %d\n", (long long)nnz,
            last_page_len[0]);
    return 1;
  }
  { /* token 13 of head 1, read through the page table */
    const unsigned char* page =
        (const unsigned char*)layout.pool_base + (long long)indices[indptr[1] + 13 / 8] * layout.page_bytes;
    const float* key = (const float*)(page + layout.key_offset_bytes + (13 % 8) * layout.row_stride_bytes);
    if (memcmp(key, k[13][1], sizeof(k[13][1])) != 0) {
      fprintf(stderr, "key read through the page table differs\n");
      return 1;
    }
  }

  TRY(kvc_compress(cache, seq, "h2o", "heavy=0.25,recent=0.25", NULL, &result));
  TRY(kvc_stream_length(cache, seq, 0, 0, &len));
  if (result.tokens_after != 2 * len || len >= kTokens) {
    fprintf(stderr, "compress: %lld tokens after, stream length %d\n",
            (long long)result.tokens_after, len);
    return 1;
  }
  TRY(kvc_cache_validate(cache));
  TRY(kvc_cache_destroy(cache));
  printf("c_consumer ok: kvcache %s, %d of %d tokens kept per stream\n", kvc_version_string(), len,
         kTokens);
  return 0;
}
