/* The C API's engine path driven from C (C99, -pedantic): decode plans (kvc_prepare_decode, one
 * plan per step, kvc_decode_attention_planned per layer), typed tensors (f32 / f16 / bf16 q and
 * out, kvc_append_tensors) and their refusals. Checked here:
 *   - planned == one-shot (kvc_decode_attention_tensors) == the f32 kvc_decode_attention, bit for
 *     bit, for every layer and every q / out dtype pair, also after appends made after the plan;
 *   - f16 / bf16 out == the f32 result rounded to nearest even (conversion written here);
 *     f16 / bf16 q == the f32 decode of the widened q;
 *   - refusals: NULL / destroyed / wrong-kind handles, a plan of another cache, a stale plan
 *     (Apply after prepare), a freed sequence, bad tensors and options; a failed call leaves
 *     `out` and the cache untouched.
 * The device-tensor path through the C API is tests/test_c_api_device.cc (it needs device
 * memory of the backend, which only C++ test code can obtain). That a planned call allocates
 * nothing is tests/test_decode_plan.cc's. Own main; exit code 0 = pass. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvcache/c_api.h"

#include "c_test_check.h"

enum {
  kLayers = 4,
  kHeads = 2,
  kQHeads = 4,
  kDim = 16,
  kBatch = 3,
  kMaxTokens = 24,
  kRow = kQHeads * kDim,         /* q / out elements per sequence */
  kQ = kBatch * kRow,            /* q / out elements of the batch */
  kKV = kMaxTokens * kHeads * kDim /* K or V elements of one layer's append, at most */
};

static uint32_t g_rng = 777u;
static float Uniform(void) { /* deterministic LCG in [-1, 1) */
  g_rng = g_rng * 1664525u + 1013904223u;
  return (float)((g_rng >> 8) & 0xFFFFu) / 32768.0f - 1.0f;
}

/* ---- f16 / bf16 conversions (IEEE binary16 / bfloat16, round to nearest even) --------------- */

static uint32_t Bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

static float FromBits(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

/* Finite inputs only (every value here is). */
static uint16_t ToBF16(float f) {
  const uint32_t u = Bits(f);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static float FromBF16(uint16_t h) { return FromBits((uint32_t)h << 16); }

/* Finite inputs of magnitude < 65504 (every value here is). */
static uint16_t ToF16(float f) {
  const uint32_t u = Bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int32_t exp = (int32_t)((u >> 23) & 0xFFu) - 127 + 15;
  uint32_t mant = u & 0x7FFFFFu;
  uint32_t shift, half, rest, out;
  if (exp >= 1) { /* normal: drop 13 mantissa bits */
    out = ((uint32_t)exp << 10) | (mant >> 13);
    rest = mant & 0x1FFFu;
    half = 0x1000u;
  } else { /* subnormal (or zero): the implicit 1 joins the mantissa */
    if (exp < -10) return (uint16_t)sign;
    mant |= 0x800000u;
    shift = (uint32_t)(14 - exp);
    out = mant >> shift;
    rest = mant & ((1u << shift) - 1u);
    half = 1u << (shift - 1u);
  }
  if (rest > half || (rest == half && (out & 1u))) ++out; /* carries into the exponent fine */
  return (uint16_t)(sign | out);
}

static float FromF16(uint16_t h) {
  const uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
  const uint32_t exp = ((uint32_t)h >> 10) & 0x1Fu;
  const uint32_t mant = (uint32_t)h & 0x3FFu;
  if (exp == 0) { /* zero or subnormal: mant * 2^-24 */
    const float v = (float)mant * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return FromBits(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

/* ---- A cache with a batch of three sequences of different lengths -------------------------- */

typedef struct Fixture {
  kvc_cache* cache;
  kvc_seq seqs[kBatch];
  int32_t next_pos[kBatch];
} Fixture;

/* Appends n tokens of fresh random K/V to every layer of seq b. */
static void AppendTokens(Fixture* f, int b, int n) {
  static float k[kKV], v[kKV];
  int32_t pos[kMaxTokens];
  int l, i;
  for (i = 0; i < n; ++i) pos[i] = f->next_pos[b] + i;
  for (l = 0; l < kLayers; ++l) {
    for (i = 0; i < n * kHeads * kDim; ++i) {
      k[i] = Uniform();
      v[i] = Uniform();
    }
    EXPECT_OK(kvc_append(f->cache, f->seqs[b], l, n, KVC_DTYPE_F32, k, v, pos, NULL, NULL));
  }
  f->next_pos[b] += n;
}

static void MakeFixture(Fixture* f) {
  static const int kLengths[kBatch] = {5, 13, 21}; /* partial last pages of 4-token pages */
  kvc_config cfg;
  int b;
  kvc_config_init(&cfg);
  cfg.num_layers = kLayers;
  cfg.num_kv_heads = kHeads;
  cfg.num_q_heads = kQHeads;
  cfg.head_dim = kDim;
  cfg.dtype = KVC_DTYPE_F32;
  cfg.page_tokens = 4;
  cfg.num_pages = 512;
  f->cache = NULL;
  EXPECT_OK(kvc_cache_create(&cfg, "cpu", &f->cache));
  for (b = 0; b < kBatch; ++b) {
    EXPECT_OK(kvc_sequence_add(f->cache, &f->seqs[b]));
    f->next_pos[b] = 0;
    AppendTokens(f, b, kLengths[b]);
  }
}

static kvc_tensor Tensor(void* data, int64_t n, kvc_dtype dtype) {
  kvc_tensor t;
  t.data = data;
  t.num_elements = n;
  t.dtype = dtype;
  t.memory = KVC_MEMORY_HOST;
  return t;
}

static void RandomQ(float* q) {
  int i;
  for (i = 0; i < kQ; ++i) q[i] = Uniform();
}

/* q in `dtype` from f32 values; *widened receives the exact f32 value of each element. */
static void Narrow(const float* q, kvc_dtype dtype, uint16_t* bits, float* widened) {
  int i;
  for (i = 0; i < kQ; ++i) {
    if (dtype == KVC_DTYPE_F16) {
      bits[i] = ToF16(q[i]);
      widened[i] = FromF16(bits[i]);
    } else if (dtype == KVC_DTYPE_BF16) {
      bits[i] = ToBF16(q[i]);
      widened[i] = FromBF16(bits[i]);
    } else {
      widened[i] = q[i];
    }
  }
}

static const kvc_dtype kDTypes[3] = {KVC_DTYPE_F32, KVC_DTYPE_F16, KVC_DTYPE_BF16};

/* ---- Planned == one-shot == legacy, every layer, every dtype pair --------------------------- */

/* One step: every layer decoded three ways for every (q dtype, out dtype) pair. */
static void CheckStep(Fixture* f, kvc_decode_plan* plan) {
  static float q[kQ], q_wide[kQ], ref_out[kQ], ref_lse[kBatch * kQHeads];
  static float out32_a[kQ], out32_b[kQ], lse_a[kBatch * kQHeads], lse_b[kBatch * kQHeads];
  static uint16_t q_bits[kQ], out16_a[kQ], out16_b[kQ];
  int l, qi, oi, i;
  for (l = 0; l < kLayers; ++l) {
    RandomQ(q);
    for (qi = 0; qi < 3; ++qi) {
      const kvc_dtype qt = kDTypes[qi];
      kvc_tensor qten;
      Narrow(q, qt, q_bits, q_wide);
      qten = qt == KVC_DTYPE_F32 ? Tensor(q, kQ, qt) : Tensor(q_bits, kQ, qt);
      /* The reference: the f32 C call on the exact (widened) q. */
      EXPECT_OK(kvc_decode_attention(f->cache, f->seqs, kBatch, l, q_wide, ref_out, ref_lse, 0.0f,
                                     KVC_GQA_MEAN, 0));
      for (oi = 0; oi < 3; ++oi) {
        const kvc_dtype ot = kDTypes[oi];
        kvc_tensor out_a, out_b, lse_ta, lse_tb;
        lse_ta = Tensor(lse_a, kBatch * kQHeads, KVC_DTYPE_F32);
        lse_tb = Tensor(lse_b, kBatch * kQHeads, KVC_DTYPE_F32);
        if (ot == KVC_DTYPE_F32) {
          out_a = Tensor(out32_a, kQ, ot);
          out_b = Tensor(out32_b, kQ, ot);
        } else {
          out_a = Tensor(out16_a, kQ, ot);
          out_b = Tensor(out16_b, kQ, ot);
        }
        memset(out32_a, 0, sizeof(out32_a));
        memset(out32_b, 0xFF, sizeof(out32_b));
        memset(out16_a, 0, sizeof(out16_a));
        memset(out16_b, 0xFF, sizeof(out16_b));
        EXPECT_OK(kvc_decode_attention_tensors(f->cache, f->seqs, kBatch, l, &qten, &out_a,
                                               &lse_ta, NULL));
        EXPECT_OK(kvc_decode_attention_planned(f->cache, plan, l, &qten, &out_b, &lse_tb, NULL));
        CHECK(memcmp(lse_a, ref_lse, sizeof(lse_a)) == 0);
        CHECK(memcmp(lse_b, ref_lse, sizeof(lse_b)) == 0);
        if (ot == KVC_DTYPE_F32) {
          CHECK(memcmp(out32_a, ref_out, sizeof(out32_a)) == 0);
          CHECK(memcmp(out32_b, ref_out, sizeof(out32_b)) == 0);
        } else {
          int mismatches = 0;
          for (i = 0; i < kQ; ++i) {
            const uint16_t want = ot == KVC_DTYPE_F16 ? ToF16(ref_out[i]) : ToBF16(ref_out[i]);
            mismatches += out16_a[i] != want;
            mismatches += out16_b[i] != want;
          }
          if (mismatches != 0) {
            fprintf(stderr, "layer %d q dtype %d out dtype %d: %d elements differ\n", l, (int)qt,
                    (int)ot, mismatches);
          }
          CHECK(mismatches == 0);
        }
      }
    }
  }
}

static void TestPlannedEqualsOneShot(void) {
  Fixture f;
  kvc_decode_plan* plan = NULL;
  int32_t batch_size = -1, first_layer = -1, num_layers = -1;
  int b;
  MakeFixture(&f);
  EXPECT_OK(kvc_prepare_decode(f.cache, f.seqs, kBatch, &plan));
  EXPECT_OK(kvc_decode_plan_info(plan, &batch_size, &first_layer, &num_layers));
  CHECK(batch_size == kBatch && first_layer == 0 && num_layers == kLayers);
  EXPECT_OK(kvc_decode_plan_info(plan, NULL, NULL, NULL));
  CheckStep(&f, plan);
  /* The engine's order within a step: appends after PrepareDecode are seen by the plan (one new
   * token per sequence; 13 -> 14 and 21 -> 22 tokens fill pages, 5 -> 6 does not). */
  for (b = 0; b < kBatch; ++b) AppendTokens(&f, b, 1);
  CheckStep(&f, plan);
  /* A longer append opening new pages (same segment: still within the plan). */
  for (b = 0; b < kBatch; ++b) AppendTokens(&f, b, 9);
  CheckStep(&f, plan);
  EXPECT_OK(kvc_cache_validate(f.cache));
  EXPECT_OK(kvc_decode_plan_destroy(plan));
  EXPECT_OK(kvc_cache_destroy(f.cache));
}

/* kvc_append_tensors (host f16 / bf16) stores what kvc_append stores. */
static void TestAppendTensors(void) {
  Fixture f;
  static float k[kKV], v[kKV], read_a[kMaxTokens * kDim], read_b[kMaxTokens * kDim];
  static uint16_t kb[kKV], vb[kKV];
  int32_t pos[4] = {100, 101, 102, 103}, len_a = 0, len_b = 0;
  kvc_seq other;
  kvc_tensor kt, vt;
  int i, di;
  MakeFixture(&f);
  for (di = 1; di < 3; ++di) {
    const kvc_dtype t = kDTypes[di];
    for (i = 0; i < 4 * kHeads * kDim; ++i) {
      k[i] = Uniform();
      v[i] = Uniform();
      kb[i] = t == KVC_DTYPE_F16 ? ToF16(k[i]) : ToBF16(k[i]);
      vb[i] = t == KVC_DTYPE_F16 ? ToF16(v[i]) : ToBF16(v[i]);
    }
    EXPECT_OK(kvc_sequence_add(f.cache, &other));
    kt = Tensor(kb, 4 * kHeads * kDim, t);
    vt = Tensor(vb, 4 * kHeads * kDim, t);
    EXPECT_OK(kvc_append_tensors(f.cache, f.seqs[0], 0, 4, &kt, &vt, pos, NULL, NULL));
    EXPECT_OK(kvc_append(f.cache, other, 0, 4, t, kb, vb, pos, NULL, NULL));
    EXPECT_OK(kvc_stream_read(f.cache, f.seqs[0], 0, 1, kMaxTokens, &len_a, NULL, NULL, NULL,
                              read_a, NULL));
    EXPECT_OK(kvc_stream_read(f.cache, other, 0, 1, kMaxTokens, &len_b, NULL, NULL, NULL, read_b,
                              NULL));
    /* seqs[0] had 5 (+4 per dtype) tokens; its last 4 are the appended ones. */
    CHECK(len_b == 4 && len_a >= 4);
    CHECK(memcmp(read_a + (len_a - 4) * kDim, read_b, 4 * kDim * sizeof(float)) == 0);
    CHECK(read_b[0] == (t == KVC_DTYPE_F16 ? FromF16(kb[kDim]) : FromBF16(kb[kDim])));
    for (i = 0; i < 4; ++i) pos[i] += 4;
    EXPECT_OK(kvc_sequence_free(f.cache, other));
  }
  /* Refusals: NULL, bad dtype / memory values, wrong size, device memory on the cpu backend. */
  kt = Tensor(k, 4 * kHeads * kDim, KVC_DTYPE_F32);
  vt = Tensor(v, 4 * kHeads * kDim, KVC_DTYPE_F32);
  EXPECT_STATUS(kvc_append_tensors(f.cache, f.seqs[0], 0, 4, NULL, &vt, pos, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("keys is NULL");
  vt.dtype = 7;
  EXPECT_STATUS(kvc_append_tensors(f.cache, f.seqs[0], 0, 4, &kt, &vt, pos, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("values->dtype 7");
  vt.dtype = KVC_DTYPE_F32;
  vt.num_elements -= 1;
  EXPECT_STATUS(kvc_append_tensors(f.cache, f.seqs[0], 0, 4, &kt, &vt, pos, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("values");
  vt.num_elements += 1;
  kt.memory = KVC_MEMORY_DEVICE;
  vt.memory = KVC_MEMORY_DEVICE;
  EXPECT_STATUS(kvc_append_tensors(f.cache, f.seqs[0], 0, 4, &kt, &vt, pos, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("device");
  kt.memory = 5;
  EXPECT_STATUS(kvc_append_tensors(f.cache, f.seqs[0], 0, 4, &kt, &vt, pos, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("keys->memory 5");
  EXPECT_OK(kvc_stream_length(f.cache, f.seqs[0], 0, 0, &len_a));
  CHECK(len_a == 5 + 8); /* nothing stored by the refused calls */
  EXPECT_OK(kvc_cache_validate(f.cache));
  EXPECT_OK(kvc_cache_destroy(f.cache));
}

/* ---- Refusals ------------------------------------------------------------------------------ */

/* out is left as it was (a failed call decodes nothing). */
static int Untouched(const float* out) {
  int i;
  for (i = 0; i < kQ; ++i) {
    if (out[i] != 1234.5f) return 0;
  }
  return 1;
}

static void Fill(float* out) {
  int i;
  for (i = 0; i < kQ; ++i) out[i] = 1234.5f;
}

static void TestRefusals(void) {
  Fixture f, g;
  kvc_decode_plan *plan = NULL, *other_plan = NULL, *dead = NULL;
  static float q[kQ], out[kQ], lse[kBatch * kQHeads];
  kvc_tensor qt, ot, lt, bad;
  kvc_decode_options opt;
  kvc_seq dup[2], unknown[1];
  kvc_stats before, after;
  int32_t batch_size = 0;
  MakeFixture(&f);
  MakeFixture(&g);
  RandomQ(q);
  qt = Tensor(q, kQ, KVC_DTYPE_F32);
  ot = Tensor(out, kQ, KVC_DTYPE_F32);
  lt = Tensor(lse, kBatch * kQHeads, KVC_DTYPE_F32);
  kvc_decode_options_init(&opt);
  kvc_decode_options_init(NULL);
  CHECK(opt.scale == 0.0f && opt.aggregation == KVC_GQA_MEAN && opt.accumulate_scores == 0 &&
        opt.reserved == 0 && opt.read_policy == NULL && opt.stream == NULL);

  /* kvc_prepare_decode. */
  EXPECT_STATUS(kvc_prepare_decode(NULL, f.seqs, kBatch, &plan), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("cache handle is NULL");
  EXPECT_STATUS(kvc_prepare_decode(f.cache, f.seqs, kBatch, NULL), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("out is NULL");
  EXPECT_STATUS(kvc_prepare_decode(f.cache, NULL, kBatch, &plan), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("batch is NULL");
  EXPECT_STATUS(kvc_prepare_decode(f.cache, f.seqs, 0, &plan), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("batch_size is 0");
  dup[0] = f.seqs[1];
  dup[1] = f.seqs[1];
  EXPECT_STATUS(kvc_prepare_decode(f.cache, dup, 2, &plan), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("twice");
  unknown[0] = 9999;
  EXPECT_STATUS(kvc_prepare_decode(f.cache, unknown, 1, &plan), KVC_NOT_FOUND);
  EXPECT_ERROR_MENTIONS("9999");
  CHECK(plan == NULL); /* nothing handed out by the failed calls */

  EXPECT_OK(kvc_prepare_decode(f.cache, f.seqs, kBatch, &plan));
  EXPECT_OK(kvc_prepare_decode(g.cache, g.seqs, kBatch, &other_plan));
  EXPECT_OK(kvc_decode_attention_planned(f.cache, plan, 0, &qt, &ot, &lt, &opt));

  /* Handles: NULL, wrong kind, another cache's plan, destroyed. */
  Fill(out);
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, NULL, 0, &qt, &ot, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("decode plan handle is NULL");
  EXPECT_STATUS(kvc_decode_attention_planned(NULL, plan, 0, &qt, &ot, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("cache handle is NULL");
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, (kvc_decode_plan*)f.cache, 0, &qt, &ot,
                                             NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("is a cache handle, not a decode plan handle");
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, other_plan, 0, &qt, &ot, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("was prepared on cache");
  EXPECT_STATUS(kvc_plan_destroy((kvc_plan*)plan), KVC_INVALID_ARGUMENT); /* not a policy plan */
  EXPECT_ERROR_MENTIONS("is a decode plan handle, not a plan handle");
  EXPECT_OK(kvc_prepare_decode(f.cache, f.seqs, kBatch, &dead));
  EXPECT_OK(kvc_decode_plan_destroy(dead));
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, dead, 0, &qt, &ot, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("already destroyed");
  EXPECT_STATUS(kvc_decode_plan_destroy(dead), KVC_INVALID_ARGUMENT);
  EXPECT_STATUS(kvc_decode_plan_info(dead, &batch_size, NULL, NULL), KVC_INVALID_ARGUMENT);
  EXPECT_STATUS(kvc_decode_plan_destroy(NULL), KVC_INVALID_ARGUMENT);
  CHECK(Untouched(out));

  /* Tensors and options. */
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, plan, 0, NULL, &ot, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("q is NULL");
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, plan, 0, &qt, NULL, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("out is NULL");
  bad = qt;
  bad.num_elements = kQ - 1;
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, plan, 0, &bad, &ot, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("q");
  bad = ot;
  bad.dtype = 3;
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, plan, 0, &qt, &bad, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("out->dtype 3");
  bad = lt;
  bad.dtype = KVC_DTYPE_F16; /* lse is f32 only */
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, plan, 0, &qt, &ot, &bad, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("lse");
  bad = qt;
  bad.memory = KVC_MEMORY_DEVICE; /* q on the device, out on the host */
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, plan, 0, &bad, &ot, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("memory space");
  opt.stream = (void*)&opt; /* a stream with host tensors, on a backend without streams */
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, plan, 0, &qt, &ot, NULL, &opt),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("stream");
  EXPECT_STATUS(kvc_decode_attention_tensors(f.cache, f.seqs, kBatch, 0, &qt, &ot, NULL, &opt),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("stream");
  opt.stream = NULL;
  opt.reserved = 1;
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, plan, 0, &qt, &ot, NULL, &opt),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("options->reserved is 1");
  opt.reserved = 0;
  opt.aggregation = 9;
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, plan, 0, &qt, &ot, NULL, &opt),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("options->aggregation 9");
  opt.aggregation = KVC_GQA_MEAN;
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, plan, kLayers, &qt, &ot, NULL, NULL),
                KVC_OUT_OF_RANGE);
  EXPECT_ERROR_MENTIONS("layer 4");
  EXPECT_STATUS(kvc_decode_attention_tensors(f.cache, f.seqs, 0, 0, &qt, &ot, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("batch_size is 0");
  EXPECT_OK(kvc_synchronize(f.cache, NULL)); /* host backend: nothing to wait for */
  EXPECT_STATUS(kvc_synchronize(f.cache, (void*)&opt), KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("stream");
  CHECK(Untouched(out));

  /* Stale plan: an Apply (kvc_compress) rebuilt streams of seqs[2] after kvc_prepare_decode. */
  EXPECT_OK(kvc_cache_stats(f.cache, &before));
  EXPECT_OK(kvc_compress(f.cache, f.seqs[2], "streamingllm", "keep=0.5,sinks=1", NULL, NULL));
  EXPECT_OK(kvc_cache_stats(f.cache, &after));
  CHECK(after.tokens_stored < before.tokens_stored);
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, plan, 1, &qt, &ot, &lt, NULL),
                KVC_FAILED_PRECONDITION);
  EXPECT_ERROR_MENTIONS("prepare again");
  EXPECT_ERROR_MENTIONS("kvc_decode_attention_planned");
  CHECK(Untouched(out));
  /* Prepared again, it decodes (and the one-shot call agrees). */
  EXPECT_OK(kvc_decode_plan_destroy(plan));
  EXPECT_OK(kvc_prepare_decode(f.cache, f.seqs, kBatch, &plan));
  EXPECT_OK(kvc_decode_attention_planned(f.cache, plan, 1, &qt, &ot, NULL, NULL));
  CHECK(!Untouched(out));

  /* A sequence of the batch freed after prepare: refused, not a use after free. */
  Fill(out);
  EXPECT_OK(kvc_sequence_free(f.cache, f.seqs[0]));
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, plan, 1, &qt, &ot, NULL, NULL),
                KVC_FAILED_PRECONDITION);
  EXPECT_ERROR_MENTIONS("freed");
  CHECK(Untouched(out));
  EXPECT_OK(kvc_cache_validate(f.cache));

  /* The cache destroyed under a live plan: the plan can still be inspected and destroyed. */
  EXPECT_OK(kvc_cache_destroy(f.cache));
  EXPECT_STATUS(kvc_decode_attention_planned(f.cache, plan, 0, &qt, &ot, NULL, NULL),
                KVC_INVALID_ARGUMENT);
  EXPECT_ERROR_MENTIONS("already destroyed");
  EXPECT_OK(kvc_decode_plan_info(plan, &batch_size, NULL, NULL));
  CHECK(batch_size == kBatch);
  EXPECT_OK(kvc_decode_plan_destroy(plan));
  EXPECT_OK(kvc_decode_plan_destroy(other_plan));
  EXPECT_OK(kvc_cache_destroy(g.cache));
}

int main(void) {
  TestPlannedEqualsOneShot();
  TestAppendTensors();
  TestRefusals();
  return CheckReport("test_c_api_decode");
}
