// python/src/bindings.h — pieces of the nanobind module `kvcache._kvcache` (module.cc).
#ifndef KVCACHE_PYTHON_BINDINGS_H_
#define KVCACHE_PYTHON_BINDINGS_H_

#include <nanobind/nanobind.h>

#include <memory>
#include <string>

#include "kvcache/backend.h"
#include "kvcache/cache.h"

namespace kvcache::python {

namespace nb = nanobind;

// The Python-side Cache: owns the C++ cache and remembers its backend name.
struct PyCache {
  std::unique_ptr<Cache> cache;
  std::string backend;
};

// "mean" | "sum" | "max" (ValueError otherwise).
GqaAggregation ParseAggregation(const std::string& s);

void BindCache(nb::module_& m);                                   // bind_cache.cc
void BindPolicy(nb::module_& m, nb::class_<PyCache>& cache_class);  // bind_policy.cc
void BindDecode(nb::module_& m, nb::class_<PyCache>& cache_class);  // bind_decode.cc

}  // namespace kvcache::python

#endif  // KVCACHE_PYTHON_BINDINGS_H_
