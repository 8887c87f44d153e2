// capi/c_api_internal.h — what the C API's translation units share (internal, not installed):
// the thread-local error and the status mapping, Guard (no exception crosses into C), the handle
// registry (handles are never-reused ids, see c_api.h) and the small argument checks.
//
// c_api.cc holds the cache, sequence, kernel, policy and introspection calls; c_api_decode.cc
// the decode plans and tensor (f16 / bf16 / device) calls.
#ifndef KVCACHE_CAPI_C_API_INTERNAL_H_
#define KVCACHE_CAPI_C_API_INTERNAL_H_

#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kvcache/c_api.h"
#include "kvcache/cache.h"
#include "kvcache/decode_plan.h"
#include "kvcache/plan.h"
#include "kvcache/read_policy.h"

namespace kvcache::capi {

using kvcache::Cache;
using kvcache::EvictionPlan;
using kvcache::SequenceId;

using kvcache::Cache;
using kvcache::EvictionPlan;
using kvcache::SequenceId;

// ---- Errors -----------------------------------------------------------------------------------

inline thread_local std::string g_last_error;

inline kvc_status SetError(kvc_status code, const std::string& message) {
  try {
    g_last_error = message;
  } catch (...) {
    g_last_error.clear();  // cannot even store the message; the code still tells the story
  }
  return code;
}

inline kvc_status FromStatus(const char* fn, const absl::Status& s) {
  if (s.ok()) return KVC_OK;
  kvc_status code = KVC_INTERNAL;
  switch (s.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kAlreadyExists:
      code = KVC_INVALID_ARGUMENT;
      break;
    case absl::StatusCode::kNotFound:
      code = KVC_NOT_FOUND;
      break;
    case absl::StatusCode::kOutOfRange:
      code = KVC_OUT_OF_RANGE;
      break;
    case absl::StatusCode::kResourceExhausted:
      code = KVC_OUT_OF_MEMORY;
      break;
    case absl::StatusCode::kFailedPrecondition:
      code = KVC_FAILED_PRECONDITION;
      break;
    case absl::StatusCode::kUnimplemented:
      code = KVC_UNIMPLEMENTED;
      break;
    default:
      code = KVC_INTERNAL;
      break;
  }
  return SetError(code, absl::StrCat(fn, ": ", std::string(s.message())));
}

inline kvc_status Fail(kvc_status code, const char* fn, const std::string& what) {
  return SetError(code, absl::StrCat(fn, ": ", what));
}

// Runs body() with every exception turned into a status.
template <class Body>
kvc_status Guard(const char* fn, Body&& body) {
  g_last_error.clear();
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return SetError(KVC_OUT_OF_MEMORY, std::string(fn) + ": out of host memory (std::bad_alloc)");
  } catch (const std::exception& e) {
    return SetError(KVC_INTERNAL, std::string(fn) + ": unexpected exception: " + e.what());
  } catch (...) {
    return SetError(KVC_INTERNAL, std::string(fn) + ": unexpected non-standard exception");
  }
}

// ---- Handles ----------------------------------------------------------------------------------

struct CacheHandle {
  uint64_t id = 0;
  std::unique_ptr<Cache> cache;
};

struct PlanHandle {
  uint64_t cache_id = 0;
  EvictionPlan plan;
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  std::vector<int32_t> lengths;  // [num_layers * num_kv_heads] stream lengths when planned
  kvcache::StreamStamp stamp;    // what Cache::ApplyIfCurrent checks (the stale-plan check)
  std::atomic<bool> applied{false};
};

// A decode plan (kvcache::DecodePlan) and the cache it was prepared on. The C++ plan must not
// be used by two threads at once; the mutex makes concurrent C calls on one plan take turns
// instead of racing (uncontended in the engine loop: one thread per step).
struct DecodePlanHandle {
  uint64_t cache_id = 0;
  absl::Mutex mu;
  kvcache::DecodePlan plan ABSL_GUARDED_BY(mu);
};

// What a handle id can name: which table of the registry it lives in.
enum class HandleKind { kCache, kPlan, kDecodePlan };

inline const char* HandleKindName(HandleKind k) {
  switch (k) {
    case HandleKind::kCache: return "cache";
    case HandleKind::kPlan: return "plan";
    case HandleKind::kDecodePlan: return "decode plan";
  }
  return "?";
}

template <class H> struct KindOf;
template <> struct KindOf<CacheHandle> { static constexpr HandleKind kValue = HandleKind::kCache; };
template <> struct KindOf<PlanHandle> { static constexpr HandleKind kValue = HandleKind::kPlan; };
template <> struct KindOf<DecodePlanHandle> {
  static constexpr HandleKind kValue = HandleKind::kDecodePlan;
};

// id -> handle, one table per kind, ids from one counter (never reused, so a destroyed handle
// can never alias a newer object of any kind).
class Registry {
 public:
  static Registry& Get() {
    static Registry* registry = new Registry();  // never destroyed: no exit-time ordering issues
    return *registry;
  }

  template <class H>
  uint64_t Add(std::shared_ptr<H> h) {
    absl::MutexLock lock(&mu_);
    const uint64_t id = next_id_++;
    if constexpr (std::is_same_v<H, CacheHandle>) h->id = id;
    Table<H>()[id] = std::move(h);
    return id;
  }
  // Null when unknown; *what says why.
  template <class H>
  std::shared_ptr<H> Find(uint64_t id, std::string* what) {
    absl::MutexLock lock(&mu_);
    auto& table = Table<H>();
    if (auto it = table.find(id); it != table.end()) return it->second;
    *what = Describe(id, KindOf<H>::kValue);
    return nullptr;
  }
  template <class H>
  std::shared_ptr<H> Remove(uint64_t id, std::string* what) {
    absl::MutexLock lock(&mu_);
    auto& table = Table<H>();
    auto it = table.find(id);
    if (it == table.end()) {
      *what = Describe(id, KindOf<H>::kValue);
      return nullptr;
    }
    std::shared_ptr<H> h = std::move(it->second);
    table.erase(it);
    return h;
  }

  uint64_t AddCache(std::shared_ptr<CacheHandle> h) { return Add(std::move(h)); }
  uint64_t AddPlan(std::shared_ptr<PlanHandle> h) { return Add(std::move(h)); }
  std::shared_ptr<CacheHandle> FindCache(uint64_t id, std::string* what) {
    return Find<CacheHandle>(id, what);
  }
  std::shared_ptr<PlanHandle> FindPlan(uint64_t id, std::string* what) {
    return Find<PlanHandle>(id, what);
  }
  std::shared_ptr<CacheHandle> RemoveCache(uint64_t id, std::string* what) {
    return Remove<CacheHandle>(id, what);
  }
  std::shared_ptr<PlanHandle> RemovePlan(uint64_t id, std::string* what) {
    return Remove<PlanHandle>(id, what);
  }

 private:
  template <class H>
  absl::flat_hash_map<uint64_t, std::shared_ptr<H>>& Table() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if constexpr (std::is_same_v<H, CacheHandle>) {
      return caches_;
    } else if constexpr (std::is_same_v<H, PlanHandle>) {
      return plans_;
    } else {
      return decode_plans_;
    }
  }

  std::string Describe(uint64_t id, HandleKind wanted) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const char* name = HandleKindName(wanted);
    if (id == 0) return absl::StrCat(name, " handle is NULL");
    const char* actual = caches_.contains(id)         ? "cache"
                         : plans_.contains(id)        ? "plan"
                         : decode_plans_.contains(id) ? "decode plan"
                                                      : nullptr;
    if (actual != nullptr) {
      return absl::StrCat("handle ", id, " is a ", actual, " handle, not a ", name, " handle");
    }
    if (id < next_id_) return absl::StrCat(name, " handle ", id, " was already destroyed");
    return absl::StrCat(name, " handle ", id, " was never created by this library");
  }

  absl::Mutex mu_;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<uint64_t, std::shared_ptr<CacheHandle>> caches_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, std::shared_ptr<PlanHandle>> plans_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<uint64_t, std::shared_ptr<DecodePlanHandle>> decode_plans_
      ABSL_GUARDED_BY(mu_);
};

inline uint64_t IdOf(const void* handle) {
  return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(handle));
}
inline kvc_cache* CacheFromId(uint64_t id) {
  return reinterpret_cast<kvc_cache*>(static_cast<uintptr_t>(id));
}
inline kvc_plan* PlanFromId(uint64_t id) {
  return reinterpret_cast<kvc_plan*>(static_cast<uintptr_t>(id));
}

// Looks up a cache handle or returns (via *status) KVC_INVALID_ARGUMENT.
inline std::shared_ptr<CacheHandle> LookupCache(const char* fn, const kvc_cache* handle,
                                                kvc_status* status) {
  std::string what;
  std::shared_ptr<CacheHandle> h = Registry::Get().FindCache(IdOf(handle), &what);
  if (h == nullptr) *status = Fail(KVC_INVALID_ARGUMENT, fn, what);
  return h;
}

inline std::shared_ptr<PlanHandle> LookupPlan(const char* fn, const kvc_plan* handle,
                                              kvc_status* status) {
  std::string what;
  std::shared_ptr<PlanHandle> h = Registry::Get().FindPlan(IdOf(handle), &what);
  if (h == nullptr) *status = Fail(KVC_INVALID_ARGUMENT, fn, what);
  return h;
}

// The entry prologue of every call on a cache handle: Guard, then the handle lookup
// (KVC_INVALID_ARGUMENT naming a bad handle), then body(handle).
template <class Body>
kvc_status WithCache(const char* fn, const kvc_cache* cache, Body&& body) {
  return Guard(fn, [&]() -> kvc_status {
    kvc_status status = KVC_OK;
    std::shared_ptr<CacheHandle> h = LookupCache(fn, cache, &status);
    if (h == nullptr) return status;
    return body(h);
  });
}

// The same for calls on a plan handle.
template <class Body>
kvc_status WithPlan(const char* fn, const kvc_plan* plan, Body&& body) {
  return Guard(fn, [&]() -> kvc_status {
    kvc_status status = KVC_OK;
    std::shared_ptr<PlanHandle> p = LookupPlan(fn, plan, &status);
    if (p == nullptr) return status;
    return body(p);
  });
}

inline kvc_status NullArg(const char* fn, const char* name) {
  return Fail(KVC_INVALID_ARGUMENT, fn, absl::StrCat(name, " is NULL"));
}

inline bool ValidDType(int32_t dtype) { return dtype >= KVC_DTYPE_F32 && dtype <= KVC_DTYPE_BF16; }

inline bool ValidAggregation(int32_t a) { return a >= KVC_GQA_MEAN && a <= KVC_GQA_MAX; }

inline kvc_status CheckLayerHead(const char* fn, const kvcache::CacheConfig& c, int32_t layer,
                                 int32_t kv_head) {
  if (layer < 0 || layer >= c.num_layers) {
    return Fail(KVC_OUT_OF_RANGE, fn,
                absl::StrCat("layer ", layer, " is out of range [0, ", c.num_layers, ")"));
  }
  if (kv_head < 0 || kv_head >= c.num_kv_heads) {
    return Fail(KVC_OUT_OF_RANGE, fn,
                absl::StrCat("kv_head ", kv_head, " is out of range [0, ", c.num_kv_heads, ")"));
  }
  return KVC_OK;
}
// Converts a kvc_read_policy (its kind checked here, the rest by the Cache).
inline kvc_status ToReadPolicy(const char* fn, const kvc_read_policy* policy,
                               kvcache::ReadPolicy* r) {
  if (policy->kind < KVC_READ_DENSE || policy->kind > KVC_READ_RETRIEVAL) {
    return Fail(KVC_INVALID_ARGUMENT, fn,
                absl::StrCat("policy->kind ", policy->kind,
                             " is not a kvc_read_kind (0 dense, 1 quest, 2 retrieval)"));
  }
  r->kind = static_cast<kvcache::ReadPolicy::Kind>(policy->kind);
  r->dense_first_layers = policy->dense_first_layers;
  r->token_budget = policy->token_budget;
  r->top_k = policy->top_k;
  r->exact_search = policy->exact_search != 0;
  r->ef_search = policy->ef_search;
  r->sink_tokens = policy->sink_tokens;
  r->recent_tokens = policy->recent_tokens;
  r->index_m = policy->index_m;
  r->index_ef_construction = policy->index_ef_construction;
  return KVC_OK;
}

// A kvc_tensor as a TensorRef; `name` names it when it is NULL or its dtype or memory is not a
// valid value (sizes and spaces are checked by the Cache, which knows the shapes).
inline kvc_status ToTensorRef(const char* fn, const char* name, const kvc_tensor* t,
                              kvcache::TensorRef* out) {
  if (t == nullptr) return NullArg(fn, name);
  if (!ValidDType(t->dtype)) {
    return Fail(KVC_INVALID_ARGUMENT, fn,
                absl::StrCat(name, "->dtype ", t->dtype,
                             " is not a kvc_dtype (0 f32, 1 f16, 2 bf16)"));
  }
  if (t->memory != KVC_MEMORY_HOST && t->memory != KVC_MEMORY_DEVICE) {
    return Fail(KVC_INVALID_ARGUMENT, fn,
                absl::StrCat(name, "->memory ", t->memory,
                             " is not a kvc_memory (0 host, 1 device)"));
  }
  *out = kvcache::TensorRef{t->data, static_cast<kvcache::DType>(t->dtype), t->num_elements,
                            t->memory == KVC_MEMORY_DEVICE ? kvcache::MemorySpace::kDevice
                                                           : kvcache::MemorySpace::kHost};
  return KVC_OK;
}

}  // namespace kvcache::capi

#endif  // KVCACHE_CAPI_C_API_INTERNAL_H_
