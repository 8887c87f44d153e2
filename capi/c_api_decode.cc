// The C API's engine path (include/kvcache/c_api.h, "Tensors, decode plans, device memory"):
// typed tensors (f32 / f16 / bf16, host or device) and decode plans over Cache::PrepareDecode
// and the DecodeAttention overloads. The argument checks that need the cache's shape (sizes,
// dtypes, memory spaces, layer range) are the C++ Cache's own, so the C and C++ messages match;
// this file checks only what C adds: NULL pointers, enum values, handle kinds, and which cache a
// plan belongs to (by handle id, which is never reused, rather than by address).
#include <memory>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "capi/c_api_internal.h"
#include "kvcache/c_api.h"
#include "kvcache/cache.h"
#include "kvcache/decode_plan.h"

namespace kvcache::capi {
namespace {

kvc_status ToMutableTensor(const char* fn, const char* name, const kvc_tensor* t,
                           MutableTensorRef* out) {
  TensorRef r;
  if (kvc_status s = ToTensorRef(fn, name, t, &r); s != KVC_OK) return s;
  *out = MutableTensorRef{t->data, r.dtype, r.num_elements, r.space};
  return KVC_OK;
}

// q, out and the optional lse (NULL or 0 elements = not requested) of a decode call.
struct DecodeTensors {
  TensorRef q;
  MutableTensorRef out;
  MutableTensorRef lse;
};

kvc_status ToDecodeTensors(const char* fn, const kvc_tensor* q, const kvc_tensor* out,
                           const kvc_tensor* lse, DecodeTensors* t) {
  if (kvc_status s = ToTensorRef(fn, "q", q, &t->q); s != KVC_OK) return s;
  if (kvc_status s = ToMutableTensor(fn, "out", out, &t->out); s != KVC_OK) return s;
  if (lse != nullptr && lse->num_elements != 0) {
    if (kvc_status s = ToMutableTensor(fn, "lse", lse, &t->lse); s != KVC_OK) return s;
  }
  return KVC_OK;
}

kvc_status ToDecodeOptions(const char* fn, const kvc_decode_options* in, DecodeOptions* out) {
  if (in == nullptr) return KVC_OK;
  if (!ValidAggregation(in->aggregation)) {
    return Fail(KVC_INVALID_ARGUMENT, fn,
                absl::StrCat("options->aggregation ", in->aggregation,
                             " is not a kvc_gqa_aggregation (0..2)"));
  }
  if (in->reserved != 0) {
    return Fail(KVC_INVALID_ARGUMENT, fn,
                absl::StrCat("options->reserved is ", in->reserved, ", must be 0"));
  }
  out->scale = in->scale;
  out->aggregation = static_cast<GqaAggregation>(in->aggregation);
  out->accumulate_scores = in->accumulate_scores != 0;
  out->stream = in->stream;
  if (in->read_policy != nullptr) {
    if (kvc_status s = ToReadPolicy(fn, in->read_policy, &out->read_policy); s != KVC_OK) {
      return s;
    }
  }
  return KVC_OK;
}

kvc_decode_plan* DecodePlanFromId(uint64_t id) {
  return reinterpret_cast<kvc_decode_plan*>(static_cast<uintptr_t>(id));
}

// The prologue of every call on a decode-plan handle (KVC_INVALID_ARGUMENT naming a bad handle).
template <class Body>
kvc_status WithDecodePlan(const char* fn, const kvc_decode_plan* plan, Body&& body) {
  return Guard(fn, [&]() -> kvc_status {
    std::string what;
    std::shared_ptr<DecodePlanHandle> p =
        Registry::Get().Find<DecodePlanHandle>(IdOf(plan), &what);
    if (p == nullptr) return Fail(KVC_INVALID_ARGUMENT, fn, what);
    return body(p);
  });
}

std::span<const SequenceId> BatchOf(const kvc_seq* batch, int32_t batch_size) {
  return std::span<const SequenceId>(batch, static_cast<size_t>(batch_size));
}

kvc_status CheckBatch(const char* fn, const kvc_seq* batch, int32_t batch_size) {
  if (batch_size <= 0) {
    return Fail(KVC_INVALID_ARGUMENT, fn,
                absl::StrCat("batch_size is ", batch_size, ", must be > 0"));
  }
  if (batch == nullptr) return NullArg(fn, "batch");
  return KVC_OK;
}

}  // namespace
}  // namespace kvcache::capi

using kvcache::capi::BatchOf;
using kvcache::capi::CacheHandle;
using kvcache::capi::CheckBatch;
using kvcache::capi::DecodePlanFromId;
using kvcache::capi::DecodePlanHandle;
using kvcache::capi::DecodeTensors;
using kvcache::capi::Fail;
using kvcache::capi::FromStatus;
using kvcache::capi::Guard;
using kvcache::capi::IdOf;
using kvcache::capi::NullArg;
using kvcache::capi::Registry;
using kvcache::capi::ToDecodeOptions;
using kvcache::capi::ToDecodeTensors;
using kvcache::capi::WithCache;
using kvcache::capi::WithDecodePlan;

extern "C" {

void kvc_decode_options_init(kvc_decode_options* options) {
  if (options == nullptr) return;
  options->scale = 0.0f;
  options->aggregation = KVC_GQA_MEAN;
  options->accumulate_scores = 0;
  options->reserved = 0;
  options->read_policy = nullptr;
  options->stream = nullptr;
}

kvc_status kvc_decode_attention_tensors(kvc_cache* cache, const kvc_seq* batch,
                                        int32_t batch_size, int32_t layer, const kvc_tensor* q,
                                        const kvc_tensor* out, const kvc_tensor* lse,
                                        const kvc_decode_options* options) {
  static constexpr const char* fn = "kvc_decode_attention_tensors";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    if (kvc_status s = CheckBatch(fn, batch, batch_size); s != KVC_OK) return s;
    DecodeTensors t;
    if (kvc_status s = ToDecodeTensors(fn, q, out, lse, &t); s != KVC_OK) return s;
    kvcache::DecodeOptions o;
    if (kvc_status s = ToDecodeOptions(fn, options, &o); s != KVC_OK) return s;
    return FromStatus(fn, h->cache->DecodeAttention(BatchOf(batch, batch_size), layer, t.q,
                                                    t.out, t.lse, o));
  });
}

kvc_status kvc_synchronize(kvc_cache* cache, void* stream) {
  static constexpr const char* fn = "kvc_synchronize";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    return FromStatus(fn, h->cache->Synchronize(stream));
  });
}

kvc_status kvc_prepare_decode(kvc_cache* cache, const kvc_seq* batch, int32_t batch_size,
                              kvc_decode_plan** out) {
  static constexpr const char* fn = "kvc_prepare_decode";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    if (out == nullptr) return NullArg(fn, "out");
    if (kvc_status s = CheckBatch(fn, batch, batch_size); s != KVC_OK) return s;
    absl::StatusOr<kvcache::DecodePlan> plan =
        h->cache->PrepareDecode(BatchOf(batch, batch_size));
    if (!plan.ok()) return FromStatus(fn, plan.status());
    auto handle = std::make_shared<DecodePlanHandle>();
    handle->cache_id = h->id;
    {
      absl::MutexLock lock(&handle->mu);
      handle->plan = *std::move(plan);
    }
    *out = DecodePlanFromId(Registry::Get().Add(std::move(handle)));
    return KVC_OK;
  });
}

kvc_status kvc_decode_plan_info(const kvc_decode_plan* plan, int32_t* batch_size,
                                int32_t* first_layer, int32_t* num_layers) {
  static constexpr const char* fn = "kvc_decode_plan_info";
  return WithDecodePlan(fn, plan, [&](const std::shared_ptr<DecodePlanHandle>& p) -> kvc_status {
    absl::MutexLock lock(&p->mu);
    if (batch_size != nullptr) *batch_size = static_cast<int32_t>(p->plan.batch().size());
    if (first_layer != nullptr) *first_layer = p->plan.first_layer();
    if (num_layers != nullptr) *num_layers = p->plan.num_layers();
    return KVC_OK;
  });
}

kvc_status kvc_decode_attention_planned(kvc_cache* cache, kvc_decode_plan* plan, int32_t layer,
                                        const kvc_tensor* q, const kvc_tensor* out,
                                        const kvc_tensor* lse,
                                        const kvc_decode_options* options) {
  static constexpr const char* fn = "kvc_decode_attention_planned";
  return WithCache(fn, cache, [&](const std::shared_ptr<CacheHandle>& h) -> kvc_status {
    std::string what;
    std::shared_ptr<DecodePlanHandle> p =
        Registry::Get().Find<DecodePlanHandle>(IdOf(plan), &what);
    if (p == nullptr) return Fail(KVC_INVALID_ARGUMENT, fn, what);
    if (p->cache_id != h->id) {
      return Fail(KVC_INVALID_ARGUMENT, fn,
                  absl::StrCat("decode plan ", IdOf(plan), " was prepared on cache ",
                               p->cache_id, ", not on cache ", h->id));
    }
    DecodeTensors t;
    if (kvc_status s = ToDecodeTensors(fn, q, out, lse, &t); s != KVC_OK) return s;
    kvcache::DecodeOptions o;
    if (kvc_status s = ToDecodeOptions(fn, options, &o); s != KVC_OK) return s;
    absl::MutexLock lock(&p->mu);
    return FromStatus(fn, h->cache->DecodeAttention(p->plan, layer, t.q, t.out, t.lse, o));
  });
}

kvc_status kvc_decode_plan_destroy(kvc_decode_plan* plan) {
  static constexpr const char* fn = "kvc_decode_plan_destroy";
  return Guard(fn, [&]() -> kvc_status {
    std::string what;
    if (Registry::Get().Remove<DecodePlanHandle>(IdOf(plan), &what) == nullptr) {
      return Fail(KVC_INVALID_ARGUMENT, fn, what);
    }
    return KVC_OK;  // the plan dies with the last reference (this one, or a call in flight)
  });
}

}  // extern "C"
