// python/src/module.cc — the nanobind extension `kvcache._kvcache`; the package `kvcache`
// (python/kvcache/__init__.py) re-exports it.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include "bindings.h"
#include "kvcache/version.h"
#include "tensor.h"

namespace nb = nanobind;

NB_MODULE(_kvcache, m) {
  m.doc() = "kvcache: a paged, modality-aware KV cache with per-(layer, kv head) eviction.";
  m.attr("__version__") = kvcache::VersionString();
  kvcache::python::BindCache(m);
  m.def(
      "_input_view",
      [](const nb::ndarray<nb::ro>& a) {
        kvcache::python::HostTensor t =
            kvcache::python::ToHostTensor(a, "array", {-1, -1, -1}, kvcache::python::kFloatDTypes);
        nb::dict d;
        d["data_ptr"] = reinterpret_cast<uintptr_t>(t.data);
        d["copied"] = t.copied;
        return d;
      },
      "Diagnostics: the host pointer a [*, *, *] K/V argument reaches the C++ call with, and "
      "whether it had to be copied (the conversion append/decode_attention use).");
}
