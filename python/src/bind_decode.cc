// python/src/bind_decode.cc — decode from Python: Cache.decode_attention (over a batch, or over a
// kvcache.DecodePlan) and Cache.prepare_decode (include/kvcache/decode_plan.h).
//
// q and out may be float32, float16 or bfloat16 host arrays (numpy float16, torch float16 /
// bfloat16 CPU tensors); the C++ Cache converts (q widened exactly, out rounded to nearest even
// from the f32 result). Arrays on a device (torch CUDA tensors) are refused with a ValueError
// naming the argument: the Python layer passes host memory only. The GIL is released around
// the kernel; a plan used from two Python threads at once takes turns on its own mutex (the C++
// plan must not be used concurrently).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "bindings.h"
#include "kvcache/cache.h"
#include "kvcache/decode_plan.h"
#include "tensor.h"

namespace kvcache::python {
namespace {

using namespace nb::literals;

// kvcache.DecodePlan: the C++ plan and the mutex that serialises its per-layer calls.
struct PyDecodePlan {
  DecodePlan plan;
  std::mutex mu;
};

// The shared body of both decode_attention overloads: converts q / out / lse for a batch of
// `b` sequences, runs `run(q, out, lse, options)` without the GIL, returns out (the caller's
// array, or a new f32 numpy array when out is None).
template <class Run>
nb::object Decode(PyCache& c, int64_t b, const nb::ndarray<nb::ro>& q,
                  const std::optional<nb::ndarray<>>& out, const std::optional<nb::ndarray<>>& lse,
                  float scale, bool accumulate_scores, const std::string& aggregation,
                  const std::optional<ReadPolicy>& read_policy, Run&& run) {
  const CacheConfig& cfg = c.cache->config();
  HostTensor qt = ToHostTensor(q, "q", {b, cfg.num_q_heads, cfg.head_dim}, kFloatDTypes);
  nb::object result;
  MutableTensorRef out_ref;
  if (out) {
    out_ref = ToOutputTensor(*out, "out", {b, cfg.num_q_heads, cfg.head_dim}, kFloatDTypes);
    result = nb::cast(*out);
  } else {
    float* data = nullptr;
    result = nb::cast(NumpyZerosF32({static_cast<size_t>(b), static_cast<size_t>(cfg.num_q_heads),
                                     static_cast<size_t>(cfg.head_dim)},
                                    &data));
    out_ref = MutableTensorRef::Of(
        std::span<float>(data, static_cast<size_t>(b * cfg.num_q_heads * cfg.head_dim)));
  }
  MutableTensorRef lse_ref;
  if (lse) lse_ref = ToOutputTensor(*lse, "lse", {b, cfg.num_q_heads}, kF32Only);
  DecodeOptions opts;
  opts.scale = scale;
  opts.accumulate_scores = accumulate_scores;
  opts.aggregation = ParseAggregation(aggregation);
  if (read_policy) opts.read_policy = *read_policy;
  absl::Status s;
  {
    nb::gil_scoped_release release;
    s = run(qt.ref(), out_ref, lse_ref, opts);
  }
  ThrowIfError(s);
  return result;
}

constexpr const char* kDecodeDoc =
    "Attention of one new query token per sequence over `layer`'s compressed streams.\n\n"
    "batch: the sequence ids, or a DecodePlan from prepare_decode (plan once per step, then one "
    "call per layer: the batch-wide host work is done once; bit for bit the same result). q: "
    "[batch, num_q_heads, head_dim] float32, float16 or bfloat16 host array (numpy, or a torch "
    "CPU tensor). out (optional, written in place): the same shape, float32 / float16 / "
    "bfloat16, C-contiguous (rounded to nearest even from the f32 result); a new float32 numpy "
    "array is returned when omitted. lse (optional, written in place): [batch, num_q_heads] "
    "float32. accumulate_scores adds each token's attention probability (aggregated over the "
    "GQA group by `aggregation`) to its score accumulator (H2O). Returns out. With a plan: "
    "RuntimeError (FailedPrecondition, 'prepare again') when a sequence of the batch was "
    "compressed (apply) or freed since prepare_decode; appends are seen. Device arrays (torch "
    "CUDA tensors) are refused with ValueError.";

}  // namespace

void BindDecode(nb::module_& m, nb::class_<PyCache>& cache_class) {
  nb::class_<PyDecodePlan>(m, "DecodePlan",
                           "The host half of a decode step for a batch (Cache.prepare_decode), "
                           "made once and run per layer by Cache.decode_attention(plan, layer, "
                           "...). Keeps its cache alive.")
      .def_prop_ro("batch",
                   [](const PyDecodePlan& p) {
                     const std::span<const SequenceId> b = p.plan.batch();
                     return std::vector<SequenceId>(b.begin(), b.end());
                   },
                   "The sequence ids, in the order of the q / out rows.")
      .def_prop_ro("first_layer", [](const PyDecodePlan& p) { return p.plan.first_layer(); })
      .def_prop_ro("num_layers", [](const PyDecodePlan& p) { return p.plan.num_layers(); },
                   "Layers [first_layer, first_layer + num_layers) can be decoded.");

  cache_class
      .def(
          "prepare_decode",
          [](PyCache& c, const std::vector<SequenceId>& batch) {
            absl::StatusOr<DecodePlan> plan;
            {
              nb::gil_scoped_release release;
              plan = c.cache->PrepareDecode(batch);
            }
            ThrowIfError(plan.status());
            auto p = std::make_unique<PyDecodePlan>();
            p->plan = *std::move(plan);
            return p;
          },
          "batch"_a, nb::keep_alive<0, 1>(),
          "Plans a decode step of `batch` for every layer (same checks as decode_attention: "
          "non-empty, known sequences (KeyError), no duplicate (ValueError)). Use the plan for "
          "each layer's decode_attention of this step.")
      .def(
          "decode_attention",
          [](PyCache& c, const std::vector<SequenceId>& batch, int32_t layer,
             const nb::ndarray<nb::ro>& q, std::optional<nb::ndarray<>> out,
             std::optional<nb::ndarray<>> lse, float scale, bool accumulate_scores,
             const std::string& aggregation, const std::optional<ReadPolicy>& read_policy) {
            return Decode(c, static_cast<int64_t>(batch.size()), q, out, lse, scale,
                          accumulate_scores, aggregation, read_policy,
                          [&](TensorRef qt, MutableTensorRef o, MutableTensorRef l,
                              const DecodeOptions& opts) {
                            return c.cache->DecodeAttention(batch, layer, qt, o, l, opts);
                          });
          },
          "batch"_a, "layer"_a, "q"_a, "out"_a = nb::none(), "lse"_a = nb::none(),
          "scale"_a = 0.0f, "accumulate_scores"_a = false, "aggregation"_a = "mean",
          "read_policy"_a = nb::none(), kDecodeDoc)
      .def(
          "decode_attention",
          [](PyCache& c, PyDecodePlan& plan, int32_t layer, const nb::ndarray<nb::ro>& q,
             std::optional<nb::ndarray<>> out, std::optional<nb::ndarray<>> lse, float scale,
             bool accumulate_scores, const std::string& aggregation,
             const std::optional<ReadPolicy>& read_policy) {
            return Decode(c, static_cast<int64_t>(plan.plan.batch().size()), q, out, lse, scale,
                          accumulate_scores, aggregation, read_policy,
                          [&](TensorRef qt, MutableTensorRef o, MutableTensorRef l,
                              const DecodeOptions& opts) {
                            std::lock_guard<std::mutex> lock(plan.mu);
                            return c.cache->DecodeAttention(plan.plan, layer, qt, o, l, opts);
                          });
          },
          "plan"_a, "layer"_a, "q"_a, "out"_a = nb::none(), "lse"_a = nb::none(),
          "scale"_a = 0.0f, "accumulate_scores"_a = false, "aggregation"_a = "mean",
          "read_policy"_a = nb::none(), kDecodeDoc);
}

}  // namespace kvcache::python
