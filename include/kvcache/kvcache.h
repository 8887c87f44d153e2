// kvcache/kvcache.h — umbrella header: the whole public C++ API.
//
// Example:
//   #include "kvcache/kvcache.h"
//   auto cache = kvcache::Cache::Create(config, "cpu");
#ifndef KVCACHE_KVCACHE_H_
#define KVCACHE_KVCACHE_H_

#include "kvcache/backend.h"
#include "kvcache/cache.h"
#include "kvcache/config.h"
#include "kvcache/dtype.h"
#include "kvcache/page_pool.h"
#include "kvcache/paged_view.h"
#include "kvcache/plan.h"
#include "kvcache/read_policy.h"
#include "kvcache/types.h"
#include "kvcache/version.h"

#endif  // KVCACHE_KVCACHE_H_
