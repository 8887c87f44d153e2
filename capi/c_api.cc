// The C ABI (include/kvcache/c_api.h) over kvcache::Cache and the policy registry.
//
// Every entry point runs inside Guard(): it clears the thread-local error, catches every C++
// exception (std::bad_alloc -> KVC_OUT_OF_MEMORY, anything else -> KVC_INTERNAL) so nothing
// unwinds into C, and turns absl::Status into kvc_status plus a message prefixed with the
// function name. Arguments are checked here before anything reaches the Cache, whose own
// checks (sequence ids, positions, pool capacity) then apply unchanged.
//
// Handles are ids, not addresses (see c_api.h): a registry maps id -> shared_ptr. Lookups copy
// the shared_ptr under the registry mutex, so kvc_cache_destroy on one thread while another
// thread is inside a call on the same cache is safe: the object dies when the last call ends.
// Ids are never reused, so a destroyed handle can never alias a newer object. The helpers and the
// registry live in c_api_internal.h, shared with c_api_decode.cc (decode plans, tensor calls).
#include "kvcache/c_api.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "capi/c_api_internal.h"
#include "kvcache/cache.h"
#include "kvcache/plan.h"
#include "kvcache/policy/registry.h"
#include "kvcache/policy/snapshot.h"
#include "kvcache/version.h"

namespace {

// The shared helpers (c_api_internal.h).
using kvcache::capi::CacheFromId;
using kvcache::capi::CacheHandle;
using kvcache::capi::CheckLayerHead;
using kvcache::capi::Fail;
using kvcache::capi::FromStatus;
using kvcache::capi::g_last_error;
using kvcache::capi::Guard;
using kvcache::capi::IdOf;
using kvcache::capi::LookupPlan;
using kvcache::capi::NullArg;
using kvcache::capi::PlanFromId;
using kvcache::capi::PlanHandle;
using kvcache::capi::Registry;
using kvcache::capi::ToReadPolicy;
using kvcache::capi::ToTensorRef;
using kvcache::capi::ValidAggregation;
using kvcache::capi::ValidDType;
using kvcache::capi::WithCache;
using kvcache::capi::WithPlan;
using kvcache::Cache;
using kvcache::EvictionPlan;
using kvcache::SequenceId;

// Converts kvc_observations into the policy layer's Observations (spans into caller memory).
kvc_status ConvertObservations(const char* fn, const kvcache::CacheConfig& c,
                               const kvc_observations* in, kvcache::policy::Observations* out) {
  if (in == nullptr) return KVC_OK;
  if (in->num_layers != 0 && in->num_layers != c.num_layers) {
    return Fail(KVC_INVALID_ARGUMENT, fn,
                absl::StrCat("observations->num_layers is ", in->num_layers, ", expected 0 or ",
                             c.num_layers));
  }
  if (in->num_layers > 0 && in->layers == nullptr) return NullArg(fn, "observations->layers");
  const int64_t row_elems = int64_t{c.num_q_heads} * c.head_dim;
  for (int32_t l = 0; l < in->num_layers; ++l) {
    const kvc_layer_observation& o = in->layers[l];
    if (o.reserved != 0) {
      return Fail(KVC_INVALID_ARGUMENT, fn,
                  absl::StrCat("observations->layers[", l, "].reserved is ", o.reserved,
                               ", must be 0"));
    }
    if (o.num_rows < 0) {
      return Fail(KVC_INVALID_ARGUMENT, fn,
                  absl::StrCat("observations->layers[", l, "].num_rows is ", o.num_rows));
    }
    if (o.num_rows > 0 && (o.queries == nullptr || o.positions == nullptr)) {
      return Fail(KVC_INVALID_ARGUMENT, fn,
                  absl::StrCat("observations->layers[", l, "] has ", o.num_rows,
                               " rows but queries or positions is NULL"));
    }
    kvcache::policy::LayerObservation lo;
    if (o.num_rows > 0) {
      lo.queries = std::span<const float>(o.queries, static_cast<size_t>(o.num_rows * row_elems));
      lo.positions = std::span<const int32_t>(o.positions, static_cast<size_t>(o.num_rows));
    }
    out->layers.push_back(lo);
  }
  if (in->num_image_scores < 0) {
    return Fail(KVC_INVALID_ARGUMENT, fn,
                absl::StrCat("observations->num_image_scores is ", in->num_image_scores));
  }
  if (in->num_image_scores > 0) {
    if (in->image_score_positions == nullptr || in->image_scores == nullptr) {
      return Fail(KVC_INVALID_ARGUMENT, fn,
                  absl::StrCat("observations->num_image_scores is ", in->num_image_scores,
                               " but image_score_positions or image_scores is NULL"));
    }
    out->image_score_positions =
        std::span<const int32_t>(in->image_score_positions, in->num_image_scores);
    out->image_scores = std::span<const float>(in->image_scores, in->num_image_scores);
  }
  return KVC_OK;
}

// Builds the policy, collects its snapshot and plans. *lengths receives every stream length of
// the snapshot; *stamp what the plan must still match when applied (taken before the snapshot,
// so an Append racing with planning makes the plan stale rather than silently dropped).
kvc_status MakePlan(const char* fn, Cache& cache, kvc_seq seq, const char* name,
                    const char* params, const kvc_observations* observations, EvictionPlan* plan,
                    std::vector<int32_t>* lengths, kvcache::StreamStamp* stamp) {
  if (name == nullptr) return NullArg(fn, "policy name");
  absl::StatusOr<std::unique_ptr<kvcache::policy::Policy>> policy =
      params == nullptr ? kvcache::policy::CreatePolicy(name)
                        : kvcache::policy::CreatePolicy(name, params);
  if (!policy.ok()) return FromStatus(fn, policy.status());
  kvcache::policy::Observations obs;
  if (kvc_status s = ConvertObservations(fn, cache.config(), observations, &obs); s != KVC_OK) {
    return s;
  }
  absl::StatusOr<kvcache::StreamStamp> stamped = cache.Stamp(seq);
  if (!stamped.ok()) return FromStatus(fn, stamped.status());
  absl::StatusOr<kvcache::policy::SequenceSnapshot> snap =
      kvcache::policy::CollectSnapshot(cache, seq, obs, (*policy)->Needs());
  if (!snap.ok()) return FromStatus(fn, snap.status());
  absl::StatusOr<EvictionPlan> planned = (*policy)->Plan(*snap);
  if (!planned.ok()) return FromStatus(fn, planned.status());
  *plan = *std::move(planned);
  plan->sequence = seq;
  *stamp = *std::move(stamped);
  lengths->clear();
  for (const kvcache::policy::StreamSnapshot& st : snap->streams) lengths->push_back(st.length());
  return KVC_OK;
}

}  // namespace

extern "C" {

// ---- Version and errors -----------------------------------------------------------------------

const char* kvc_version_string(void) { return kvcache::VersionString(); }

void kvc_version(int* major, int* minor, int* patch) {
  if (major != nullptr) *major = KVCACHE_VERSION_MAJOR;
  if (minor != nullptr) *minor = KVCACHE_VERSION_MINOR;
  if (patch != nullptr) *patch = KVCACHE_VERSION_PATCH;
}

int kvc_abi_version(void) { return KVC_ABI_VERSION; }

const char* kvc_last_error(void) { return g_last_error.c_str(); }

const char* kvc_status_name(kvc_status status) {
  // A C caller may pass any integer as a kvc_status (C enums are plain integers); in C++ reading
  // an enum object outside its range is undefined (clang -fsanitize=enum reports it, found by
  // fuzz/fuzz_c_api.cc), so read the bits as the underlying integer instead.
  std::underlying_type_t<kvc_status> value;
  std::memcpy(&value, &status, sizeof(value));
  switch (value) {
    case KVC_OK: return "KVC_OK";
    case KVC_INVALID_ARGUMENT: return "KVC_INVALID_ARGUMENT";
    case KVC_NOT_FOUND: return "KVC_NOT_FOUND";
    case KVC_OUT_OF_RANGE: return "KVC_OUT_OF_RANGE";
    case KVC_OUT_OF_MEMORY: return "KVC_OUT_OF_MEMORY";
    case KVC_FAILED_PRECONDITION: return "KVC_FAILED_PRECONDITION";
    case KVC_UNIMPLEMENTED: return "KVC_UNIMPLEMENTED";
    case KVC_BUFFER_TOO_SMALL: return "KVC_BUFFER_TOO_SMALL";
    case KVC_INTERNAL: return "KVC_INTERNAL";
  }
  return "KVC_UNKNOWN_STATUS";
}

// ---- Cache ------------------------------------------------------------------------------------

void kvc_config_init(kvc_config* config) {
  if (config == nullptr) return;
  const kvcache::CacheConfig d;
  std::memset(config, 0, sizeof(*config));
  config->num_layers = d.num_layers;
  config->num_kv_heads = d.num_kv_heads;
  config->num_q_heads = d.num_q_heads;
  config->head_dim = d.head_dim;
  config->dtype = static_cast<int32_t>(d.dtype);
  config->page_tokens = d.page_tokens;
  config->page_bytes = d.page_bytes;
  config->num_pages = d.num_pages;
}

kvc_status kvc_cache_create(const kvc_config* config, const char* backend, kvc_cache** out) {
  static constexpr const char* fn = "kvc_cache_create";
  return Guard(fn, [&]() -> kvc_status {
    if (config == nullptr) return NullArg(fn, "config");
    if (backend == nullptr) return NullArg(fn, "backend");
    if (out == nullptr) return NullArg(fn, "out");
    if (!ValidDType(config->dtype)) {
      return Fail(KVC_INVALID_ARGUMENT, fn, absl::StrCat("config->dtype ", config->dtype,
                                                        " is not a kvc_dtype (0 f32, 1 f16, 2 bf16)"));
    }
    if ((config->flags & ~KVC_CONFIG_PAGE_SUMMARIES) != 0) {
      return Fail(KVC_INVALID_ARGUMENT, fn,
                  absl::StrCat("config->flags is ", config->flags,
                               ", only KVC_CONFIG_PAGE_SUMMARIES (1) is defined"));
    }
    kvcache::CacheConfig c;
    c.num_layers = config->num_layers;
    c.num_kv_heads = config->num_kv_heads;
    c.num_q_heads = config->num_q_heads;
    c.head_dim = config->head_dim;
    c.dtype = static_cast<kvcache::DType>(config->dtype);
    c.page_tokens = config->page_tokens;
    c.page_bytes = config->page_bytes;
    c.num_pages = config->num_pages;
    c.page_summaries = (config->flags & KVC_CONFIG_PAGE_SUMMARIES) != 0;
    absl::StatusOr<std::unique_ptr<Cache>> cache = Cache::Create(c, backend);
    if (!cache.ok()) return FromStatus(fn, cache.status());
    auto handle = std::make_shared<CacheHandle>();
    handle->cache = *std::move(cache);
    *out = CacheFromId(Registry::Get().AddCache(std::move(handle)));
    return KVC_OK;
  });
}

kvc_status kvc_cache_destroy(kvc_cache* cache) {
  static constexpr const char* fn = "kvc_cache_destroy";
  return Guard(fn, [&]() -> kvc_status {
    std::string what;
    std::shared_ptr<CacheHandle> h = Registry::Get().RemoveCache(IdOf(cache), &what);
    if (h == nullptr) return Fail(KVC_INVALID_ARGUMENT, fn, what);
    return KVC_OK;  // the Cache dies with the last reference (this one, or a call in flight)
  });
}

kvc_status kvc_cache_get_config(const kvc_cache* cache, kvc_config* out) {
  static constexpr const char* fn = "kvc_cache_get_config";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    if (out == nullptr) return NullArg(fn, "out");
    const kvcache::CacheConfig& c = h->cache->config();
    std::memset(out, 0, sizeof(*out));
    out->num_layers = c.num_layers;
    out->num_kv_heads = c.num_kv_heads;
    out->num_q_heads = c.num_q_heads;
    out->head_dim = c.head_dim;
    out->dtype = static_cast<int32_t>(c.dtype);
    out->page_tokens = c.ResolvedPageTokens();
    out->page_bytes = c.ResolvedPageBytes();
    out->num_pages = c.num_pages;
    out->flags = c.page_summaries ? KVC_CONFIG_PAGE_SUMMARIES : 0;
    return KVC_OK;
  });
}

// ---- Sequences --------------------------------------------------------------------------------

kvc_status kvc_sequence_add(kvc_cache* cache, kvc_seq* out) {
  static constexpr const char* fn = "kvc_sequence_add";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    if (out == nullptr) return NullArg(fn, "out");
    absl::StatusOr<SequenceId> id = h->cache->AddSequence();
    if (!id.ok()) return FromStatus(fn, id.status());
    *out = *id;
    return KVC_OK;
  });
}

kvc_status kvc_sequence_fork(kvc_cache* cache, kvc_seq parent, kvc_seq* out) {
  static constexpr const char* fn = "kvc_sequence_fork";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    if (out == nullptr) return NullArg(fn, "out");
    absl::StatusOr<SequenceId> id = h->cache->Fork(parent);
    if (!id.ok()) return FromStatus(fn, id.status());
    *out = *id;
    return KVC_OK;
  });
}

kvc_status kvc_sequence_free(kvc_cache* cache, kvc_seq seq) {
  static constexpr const char* fn = "kvc_sequence_free";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    return FromStatus(fn, h->cache->Free(seq));
  });
}

}  // extern "C"

namespace {

// kvc_append and kvc_append_tensors: one implementation over the C++ AppendRequest.
// kv(config, &keys, &values) describes the K/V once layer and num_tokens are checked (their
// size, dtype and memory space are then checked by Cache::Append).
template <class KV>
kvc_status AppendImpl(const char* fn, kvc_cache* cache, kvc_seq seq, int32_t layer,
                      int32_t num_tokens, KV&& kv, const int32_t* positions,
                      const uint8_t* modalities, const uint8_t* admit) {
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    const kvcache::CacheConfig& c = h->cache->config();
    if (layer < 0 || layer >= c.num_layers) {
      return Fail(KVC_OUT_OF_RANGE, fn,
                  absl::StrCat("layer ", layer, " is out of range [0, ", c.num_layers, ")"));
    }
    if (num_tokens <= 0) {
      return Fail(KVC_INVALID_ARGUMENT, fn, absl::StrCat("num_tokens is ", num_tokens, ", must be > 0"));
    }
    kvcache::AppendRequest req;
    if (kvc_status s = kv(c, &req.keys, &req.values); s != KVC_OK) return s;
    if (req.keys.data == nullptr) return NullArg(fn, "keys");
    if (req.values.data == nullptr) return NullArg(fn, "values");
    if (positions == nullptr) return NullArg(fn, "positions");
    req.positions = std::span<const int32_t>(positions, static_cast<size_t>(num_tokens));
    std::vector<kvcache::Modality> mods;
    if (modalities != nullptr) {
      mods.reserve(num_tokens);
      for (int32_t i = 0; i < num_tokens; ++i) {
        if (modalities[i] > KVC_MODALITY_AUDIO) {
          return Fail(KVC_INVALID_ARGUMENT, fn,
                      absl::StrCat("modalities[", i, "] = ", int{modalities[i]},
                                   " is not a kvc_modality (0..3)"));
        }
        mods.push_back(static_cast<kvcache::Modality>(modalities[i]));
      }
      req.modalities = mods;
    }
    if (admit != nullptr) req.admit = std::span<const uint8_t>(admit, num_tokens);
    return FromStatus(fn, h->cache->Append(seq, layer, req));
  });
}

}  // namespace

extern "C" {

kvc_status kvc_append(kvc_cache* cache, kvc_seq seq, int32_t layer, int32_t num_tokens,
                      int32_t dtype, const void* keys, const void* values,
                      const int32_t* positions, const uint8_t* modalities, const uint8_t* admit) {
  static constexpr const char* fn = "kvc_append";
  auto kv = [&](const kvcache::CacheConfig& c, kvcache::TensorRef* k,
                kvcache::TensorRef* v) -> kvc_status {
    if (!ValidDType(dtype)) {
      return Fail(KVC_INVALID_ARGUMENT, fn,
                  absl::StrCat("dtype ", dtype, " is not a kvc_dtype (0 f32, 1 f16, 2 bf16)"));
    }
    const int64_t elements = int64_t{num_tokens} * c.num_kv_heads * c.head_dim;
    const auto t = static_cast<kvcache::DType>(dtype);
    *k = {keys, t, elements};
    *v = {values, t, elements};
    return KVC_OK;
  };
  return AppendImpl(fn, cache, seq, layer, num_tokens, kv, positions, modalities, admit);
}

kvc_status kvc_append_tensors(kvc_cache* cache, kvc_seq seq, int32_t layer, int32_t num_tokens,
                              const kvc_tensor* keys, const kvc_tensor* values,
                              const int32_t* positions, const uint8_t* modalities,
                              const uint8_t* admit) {
  static constexpr const char* fn = "kvc_append_tensors";
  auto kv = [&](const kvcache::CacheConfig&, kvcache::TensorRef* k,
                kvcache::TensorRef* v) -> kvc_status {
    if (kvc_status s = ToTensorRef(fn, "keys", keys, k); s != KVC_OK) return s;
    return ToTensorRef(fn, "values", values, v);
  };
  return AppendImpl(fn, cache, seq, layer, num_tokens, kv, positions, modalities, admit);
}

// ---- Kernels ----------------------------------------------------------------------------------

kvc_status kvc_score_rows(kvc_cache* cache, kvc_seq seq, int32_t layer, int32_t num_rows,
                          const float* queries, const int32_t* positions, float scale,
                          int32_t aggregation, float sparsity_threshold, int32_t accumulate,
                          float* token_scores, int64_t capacity, int64_t* required,
                          int64_t* below_threshold, int64_t* causal_entries) {
  static constexpr const char* fn = "kvc_score_rows";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    const kvcache::CacheConfig& c = h->cache->config();
    if (kvc_status s = CheckLayerHead(fn, c, layer, 0); s != KVC_OK) return s;
    if (num_rows <= 0) {
      return Fail(KVC_INVALID_ARGUMENT, fn, absl::StrCat("num_rows is ", num_rows, ", must be > 0"));
    }
    if (queries == nullptr) return NullArg(fn, "queries");
    if (positions == nullptr) return NullArg(fn, "positions");
    if (!ValidAggregation(aggregation)) {
      return Fail(KVC_INVALID_ARGUMENT, fn,
                  absl::StrCat("aggregation ", aggregation, " is not a kvc_gqa_aggregation (0..2)"));
    }
    if (token_scores != nullptr && capacity < 0) {
      return Fail(KVC_INVALID_ARGUMENT, fn, absl::StrCat("capacity is ", capacity));
    }
    // The total stream length decides the output size; check it before anything accumulates.
    int64_t total = 0;
    for (int32_t hd = 0; hd < c.num_kv_heads; ++hd) {
      absl::StatusOr<int32_t> len = h->cache->StreamLength(seq, layer, hd);
      if (!len.ok()) return FromStatus(fn, len.status());
      total += *len;
    }
    if (required != nullptr) *required = total;
    if (token_scores != nullptr && capacity < total) {
      return Fail(KVC_BUFFER_TOO_SMALL, fn,
                  absl::StrCat("token_scores holds ", capacity, " floats, ", total, " needed"));
    }
    kvcache::ScoreRequest req;
    req.queries = std::span<const float>(
        queries, static_cast<size_t>(int64_t{num_rows} * c.num_q_heads * c.head_dim));
    req.positions = std::span<const int32_t>(positions, static_cast<size_t>(num_rows));
    req.scale = scale;
    req.aggregation = static_cast<kvcache::GqaAggregation>(aggregation);
    req.sparsity_threshold = sparsity_threshold;
    req.accumulate = accumulate != 0;
    absl::StatusOr<kvcache::ScoreResult> result = h->cache->ScoreRows(seq, layer, req);
    if (!result.ok()) return FromStatus(fn, result.status());
    int64_t got = 0;
    for (const auto& v : result->token_scores) got += static_cast<int64_t>(v.size());
    if (required != nullptr) *required = got;
    if (token_scores != nullptr) {
      if (got > capacity) {  // only when another thread appended to this sequence meanwhile
        return Fail(KVC_BUFFER_TOO_SMALL, fn,
                    absl::StrCat("the sequence grew concurrently to ", got,
                                 " tokens; token_scores holds ", capacity,
                                 " (accumulators were updated)"));
      }
      int64_t at = 0;
      for (const auto& v : result->token_scores) {
        std::copy(v.begin(), v.end(), token_scores + at);
        at += static_cast<int64_t>(v.size());
      }
    }
    if (below_threshold != nullptr) {
      std::copy(result->below_threshold.begin(), result->below_threshold.end(), below_threshold);
    }
    if (causal_entries != nullptr) {
      std::copy(result->causal_entries.begin(), result->causal_entries.end(), causal_entries);
    }
    return KVC_OK;
  });
}

namespace {

// kvc_decode_attention and kvc_decode_attention_sparse: one implementation, `policy` NULL = dense.
kvc_status DecodeImpl(const char* fn, kvc_cache* cache, const kvc_seq* batch, int32_t batch_size,
                      int32_t layer, const float* q, float* out, float* lse, float scale,
                      int32_t aggregation, int32_t accumulate_scores,
                      const kvc_read_policy* policy) {
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    const kvcache::CacheConfig& c = h->cache->config();
    if (kvc_status s = CheckLayerHead(fn, c, layer, 0); s != KVC_OK) return s;
    if (batch_size <= 0) {
      return Fail(KVC_INVALID_ARGUMENT, fn, absl::StrCat("batch_size is ", batch_size, ", must be > 0"));
    }
    if (batch == nullptr) return NullArg(fn, "batch");
    if (q == nullptr) return NullArg(fn, "q");
    if (out == nullptr) return NullArg(fn, "out");
    if (!ValidAggregation(aggregation)) {
      return Fail(KVC_INVALID_ARGUMENT, fn,
                  absl::StrCat("aggregation ", aggregation, " is not a kvc_gqa_aggregation (0..2)"));
    }
    const size_t n = static_cast<size_t>(int64_t{batch_size} * c.num_q_heads * c.head_dim);
    kvcache::DecodeOptions options;
    options.scale = scale;
    options.accumulate_scores = accumulate_scores != 0;
    options.aggregation = static_cast<kvcache::GqaAggregation>(aggregation);
    if (policy != nullptr) {
      if (kvc_status s = ToReadPolicy(fn, policy, &options.read_policy); s != KVC_OK) return s;
    }
    std::span<float> lse_span;
    if (lse != nullptr) {
      lse_span = std::span<float>(lse, static_cast<size_t>(int64_t{batch_size} * c.num_q_heads));
    }
    return FromStatus(
        fn, h->cache->DecodeAttention(
                std::span<const SequenceId>(batch, static_cast<size_t>(batch_size)), layer,
                std::span<const float>(q, n), std::span<float>(out, n), lse_span, options));
  });
}

}  // namespace

kvc_status kvc_decode_attention(kvc_cache* cache, const kvc_seq* batch, int32_t batch_size,
                                int32_t layer, const float* q, float* out, float* lse,
                                float scale, int32_t aggregation, int32_t accumulate_scores) {
  return DecodeImpl("kvc_decode_attention", cache, batch, batch_size, layer, q, out, lse, scale,
                    aggregation, accumulate_scores, nullptr);
}

void kvc_read_policy_init(kvc_read_policy* policy) {
  if (policy == nullptr) return;
  const kvcache::ReadPolicy d;
  policy->kind = static_cast<int32_t>(d.kind);
  policy->dense_first_layers = d.dense_first_layers;
  policy->token_budget = d.token_budget;
  policy->top_k = d.top_k;
  policy->exact_search = d.exact_search ? 1 : 0;
  policy->ef_search = d.ef_search;
  policy->sink_tokens = d.sink_tokens;
  policy->recent_tokens = d.recent_tokens;
  policy->index_m = d.index_m;
  policy->index_ef_construction = d.index_ef_construction;
}

kvc_status kvc_decode_attention_sparse(kvc_cache* cache, const kvc_seq* batch,
                                       int32_t batch_size, int32_t layer, const float* q,
                                       float* out, float* lse, float scale, int32_t aggregation,
                                       int32_t accumulate_scores, const kvc_read_policy* policy) {
  return DecodeImpl("kvc_decode_attention_sparse", cache, batch, batch_size, layer, q, out, lse,
                    scale, aggregation, accumulate_scores, policy);
}

// ---- Policies ---------------------------------------------------------------------------------

kvc_status kvc_policy_plan(kvc_cache* cache, kvc_seq seq, const char* name, const char* params,
                           const kvc_observations* observations, kvc_plan** out) {
  static constexpr const char* fn = "kvc_policy_plan";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    if (out == nullptr) return NullArg(fn, "out");
    auto plan = std::make_shared<PlanHandle>();
    if (kvc_status s = MakePlan(fn, *h->cache, seq, name, params, observations, &plan->plan,
                                &plan->lengths, &plan->stamp);
        s != KVC_OK) {
      return s;
    }
    plan->cache_id = h->id;
    plan->num_layers = h->cache->config().num_layers;
    plan->num_kv_heads = h->cache->config().num_kv_heads;
    *out = PlanFromId(Registry::Get().AddPlan(std::move(plan)));
    return KVC_OK;
  });
}

kvc_status kvc_plan_num_streams(const kvc_plan* plan, int32_t* out) {
  static constexpr const char* fn = "kvc_plan_num_streams";
  return WithPlan(fn, plan, [&](const std::shared_ptr<PlanHandle>& p) -> kvc_status {
    if (out == nullptr) return NullArg(fn, "out");
    *out = static_cast<int32_t>(p->plan.streams.size());
    return KVC_OK;
  });
}

kvc_status kvc_plan_stream(const kvc_plan* plan, int32_t index, int32_t* layer, int32_t* kv_head,
                           int32_t* kept, int32_t* key_channels) {
  static constexpr const char* fn = "kvc_plan_stream";
  return WithPlan(fn, plan, [&](const std::shared_ptr<PlanHandle>& p) -> kvc_status {
    const int32_t n = static_cast<int32_t>(p->plan.streams.size());
    if (index < 0 || index >= n) {
      return Fail(KVC_OUT_OF_RANGE, fn,
                  absl::StrCat("index ", index, " is out of range [0, ", n, ")"));
    }
    const kvcache::StreamPlan& sp = p->plan.streams[index];
    if (layer != nullptr) *layer = sp.layer;
    if (kv_head != nullptr) *kv_head = sp.kv_head;
    if (kept != nullptr) *kept = static_cast<int32_t>(sp.kept.size());
    if (key_channels != nullptr) *key_channels = static_cast<int32_t>(sp.key_channels.size());
    return KVC_OK;
  });
}

kvc_status kvc_plan_kept_count(const kvc_plan* plan, int32_t layer, int32_t kv_head,
                               int32_t* out) {
  static constexpr const char* fn = "kvc_plan_kept_count";
  return WithPlan(fn, plan, [&](const std::shared_ptr<PlanHandle>& p) -> kvc_status {
    if (out == nullptr) return NullArg(fn, "out");
    kvcache::CacheConfig shape;
    shape.num_layers = p->num_layers;
    shape.num_kv_heads = p->num_kv_heads;
    if (kvc_status s = CheckLayerHead(fn, shape, layer, kv_head); s != KVC_OK) return s;
    *out = p->lengths[static_cast<size_t>(layer) * p->num_kv_heads + kv_head];
    for (const kvcache::StreamPlan& sp : p->plan.streams) {
      if (sp.layer == layer && sp.kv_head == kv_head) *out = static_cast<int32_t>(sp.kept.size());
    }
    return KVC_OK;
  });
}

kvc_status kvc_plan_kept_tokens(const kvc_plan* plan, int32_t index, int32_t* out,
                                int32_t capacity, int32_t* required) {
  static constexpr const char* fn = "kvc_plan_kept_tokens";
  return WithPlan(fn, plan, [&](const std::shared_ptr<PlanHandle>& p) -> kvc_status {
    const int32_t n = static_cast<int32_t>(p->plan.streams.size());
    if (index < 0 || index >= n) {
      return Fail(KVC_OUT_OF_RANGE, fn,
                  absl::StrCat("index ", index, " is out of range [0, ", n, ")"));
    }
    const std::vector<int32_t>& kept = p->plan.streams[index].kept;
    const int32_t size = static_cast<int32_t>(kept.size());
    if (required != nullptr) *required = size;
    if (out == nullptr) return NullArg(fn, "out");
    if (capacity < size) {
      return Fail(KVC_BUFFER_TOO_SMALL, fn,
                  absl::StrCat("out holds ", capacity, " entries, ", size, " needed"));
    }
    std::copy(kept.begin(), kept.end(), out);
    return KVC_OK;
  });
}

kvc_status kvc_plan_info(const kvc_plan* plan, kvc_seq* sequence, int64_t* kept_tokens) {
  static constexpr const char* fn = "kvc_plan_info";
  return WithPlan(fn, plan, [&](const std::shared_ptr<PlanHandle>& p) -> kvc_status {
    if (sequence != nullptr) *sequence = p->plan.sequence;
    if (kept_tokens != nullptr) *kept_tokens = p->plan.KeptTokens();
    return KVC_OK;
  });
}

kvc_status kvc_plan_apply(kvc_cache* cache, kvc_plan* plan) {
  static constexpr const char* fn = "kvc_plan_apply";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    kvc_status status = KVC_OK;
    auto p = LookupPlan(fn, plan, &status);
    if (p == nullptr) return status;
    if (p->cache_id != h->id) {
      return Fail(KVC_FAILED_PRECONDITION, fn,
                  absl::StrCat("the plan was made for cache handle ", p->cache_id,
                               ", not for cache handle ", h->id));
    }
    if (p->applied.exchange(true)) {
      return Fail(KVC_FAILED_PRECONDITION, fn, "the plan was already applied");
    }
    const kvc_status s = FromStatus(fn, h->cache->ApplyIfCurrent(p->plan, p->stamp));
    if (s != KVC_OK) p->applied.store(false);
    return s;
  });
}

kvc_status kvc_plan_destroy(kvc_plan* plan) {
  static constexpr const char* fn = "kvc_plan_destroy";
  return Guard(fn, [&]() -> kvc_status {
    std::string what;
    if (Registry::Get().RemovePlan(IdOf(plan), &what) == nullptr) {
      return Fail(KVC_INVALID_ARGUMENT, fn, what);
    }
    return KVC_OK;
  });
}

kvc_status kvc_compress(kvc_cache* cache, kvc_seq seq, const char* name, const char* params,
                        const kvc_observations* observations, kvc_compress_result* result) {
  static constexpr const char* fn = "kvc_compress";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    EvictionPlan plan;
    std::vector<int32_t> lengths;
    kvcache::StreamStamp stamp;
    if (kvc_status s =
            MakePlan(fn, *h->cache, seq, name, params, observations, &plan, &lengths, &stamp);
        s != KVC_OK) {
      return s;
    }
    if (kvc_status s = FromStatus(fn, h->cache->ApplyIfCurrent(plan, stamp)); s != KVC_OK) {
      return s;
    }
    if (result != nullptr) {
      std::memset(result, 0, sizeof(*result));
      const int32_t heads = h->cache->config().num_kv_heads;
      for (int32_t len : lengths) result->tokens_before += len;
      result->tokens_after = result->tokens_before;
      for (const kvcache::StreamPlan& sp : plan.streams) {
        result->tokens_after -= lengths[static_cast<size_t>(sp.layer) * heads + sp.kv_head];
        result->tokens_after += static_cast<int64_t>(sp.kept.size());
      }
      result->streams_changed = static_cast<int32_t>(plan.streams.size());
    }
    return KVC_OK;
  });
}

// ---- Introspection ----------------------------------------------------------------------------

kvc_status kvc_stream_length(const kvc_cache* cache, kvc_seq seq, int32_t layer, int32_t kv_head,
                             int32_t* out) {
  static constexpr const char* fn = "kvc_stream_length";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    if (out == nullptr) return NullArg(fn, "out");
    absl::StatusOr<int32_t> len = h->cache->StreamLength(seq, layer, kv_head);
    if (!len.ok()) return FromStatus(fn, len.status());
    *out = *len;
    return KVC_OK;
  });
}

kvc_status kvc_stream_read(const kvc_cache* cache, kvc_seq seq, int32_t layer, int32_t kv_head,
                           int32_t capacity, int32_t* length, int32_t* positions,
                           uint8_t* modalities, float* scores, float* keys, float* values) {
  static constexpr const char* fn = "kvc_stream_read";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    if (length == nullptr) return NullArg(fn, "length");
    if (capacity < 0) return Fail(KVC_INVALID_ARGUMENT, fn, absl::StrCat("capacity is ", capacity));
    const bool with_kv = keys != nullptr || values != nullptr;
    absl::StatusOr<kvcache::StreamContents> c =
        h->cache->ReadStream(seq, layer, kv_head, with_kv);
    if (!c.ok()) return FromStatus(fn, c.status());
    *length = c->length;
    if (c->length > capacity) {
      return Fail(KVC_BUFFER_TOO_SMALL, fn,
                  absl::StrCat("buffers hold ", capacity, " tokens, the stream has ", c->length));
    }
    if (positions != nullptr) std::copy(c->positions.begin(), c->positions.end(), positions);
    if (modalities != nullptr) {
      for (size_t i = 0; i < c->modalities.size(); ++i) {
        modalities[i] = static_cast<uint8_t>(c->modalities[i]);
      }
    }
    if (scores != nullptr) std::copy(c->scores.begin(), c->scores.end(), scores);
    if (keys != nullptr) std::copy(c->keys.begin(), c->keys.end(), keys);
    if (values != nullptr) std::copy(c->values.begin(), c->values.end(), values);
    return KVC_OK;
  });
}

kvc_status kvc_stream_add_scores(kvc_cache* cache, kvc_seq seq, int32_t layer, int32_t kv_head,
                                 const float* delta, int32_t num_tokens) {
  static constexpr const char* fn = "kvc_stream_add_scores";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    if (num_tokens < 0) {
      return Fail(KVC_INVALID_ARGUMENT, fn, absl::StrCat("num_tokens is ", num_tokens));
    }
    if (num_tokens > 0 && delta == nullptr) return NullArg(fn, "delta");
    return FromStatus(fn, h->cache->AddScores(seq, layer, kv_head,
                                              std::span<const float>(delta, num_tokens)));
  });
}

kvc_status kvc_cache_stats(const kvc_cache* cache, kvc_stats* out) {
  static constexpr const char* fn = "kvc_cache_stats";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    if (out == nullptr) return NullArg(fn, "out");
    const kvcache::CacheStats s = h->cache->Stats();
    std::memset(out, 0, sizeof(*out));
    out->num_sequences = s.num_sequences;
    out->pages_total = s.pages_total;
    out->pages_used = s.pages_used;
    out->pages_free = s.pages_total - s.pages_used;
    out->bytes_used = s.bytes_used;
    out->page_bytes = h->cache->pool().page_bytes();
    out->tokens_stored = s.tokens_stored;
    return KVC_OK;
  });
}

kvc_status kvc_cache_validate(const kvc_cache* cache) {
  static constexpr const char* fn = "kvc_cache_validate";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    return FromStatus(fn, h->cache->Validate());
  });
}

// ---- Page-table export ------------------------------------------------------------------------

kvc_status kvc_export_page_table(const kvc_cache* cache, int32_t layer, const kvc_seq* batch,
                                 int32_t batch_size, int32_t* indptr, int32_t* indices,
                                 int64_t capacity, int64_t* nnz, int32_t* last_page_len,
                                 kvc_page_layout* layout) {
  static constexpr const char* fn = "kvc_export_page_table";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    const kvcache::CacheConfig& c = h->cache->config();
    if (kvc_status s = CheckLayerHead(fn, c, layer, 0); s != KVC_OK) return s;
    if (batch_size <= 0) {
      return Fail(KVC_INVALID_ARGUMENT, fn, absl::StrCat("batch_size is ", batch_size, ", must be > 0"));
    }
    if (batch == nullptr) return NullArg(fn, "batch");
    if (nnz == nullptr) return NullArg(fn, "nnz");
    if (indices != nullptr && (indptr == nullptr || last_page_len == nullptr)) {
      return NullArg(fn, indptr == nullptr ? "indptr" : "last_page_len");
    }
    absl::StatusOr<kvcache::PageTable> table = h->cache->ExportPageTable(
        layer, std::span<const SequenceId>(batch, static_cast<size_t>(batch_size)));
    if (!table.ok()) return FromStatus(fn, table.status());
    *nnz = static_cast<int64_t>(table->indices.size());
    if (layout != nullptr) {
      const kvcache::PageTableLayout& l = table->layout;
      std::memset(layout, 0, sizeof(*layout));
      layout->pool_base = l.pool_base;
      layout->page_bytes = l.page_bytes;
      layout->key_offset_bytes = l.key_offset_bytes;
      layout->value_offset_bytes = l.value_offset_bytes;
      layout->row_stride_bytes = l.row_stride_bytes;
      layout->num_pages = l.num_pages;
      layout->tokens_per_page = l.tokens_per_page;
      layout->head_dim = l.head_dim;
      layout->dtype = static_cast<int32_t>(l.dtype);
      layout->is_device = l.is_device ? 1 : 0;
    }
    if (indices == nullptr) return KVC_OK;  // size query
    if (capacity < *nnz) {
      return Fail(KVC_BUFFER_TOO_SMALL, fn,
                  absl::StrCat("indices holds ", capacity, " entries, the page table has ", *nnz,
                               " (call again with a large enough buffer)"));
    }
    std::copy(table->indptr.begin(), table->indptr.end(), indptr);
    std::copy(table->indices.begin(), table->indices.end(), indices);
    std::copy(table->last_page_len.begin(), table->last_page_len.end(), last_page_len);
    return KVC_OK;
  });
}

}  // extern "C"
