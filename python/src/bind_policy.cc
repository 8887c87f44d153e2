// python/src/bind_policy.cc — policies by registry name, plans, Cache.plan/apply/compress,
// Dynamic-LLaVA admission.
//
// A Plan made by Cache.plan remembers every stream length it was planned against; Cache.apply
// refuses it (RuntimeError, FailedPrecondition) when a stream changed since (an append in
// between would otherwise drop the new tokens, which are not in the kept lists), as the C API
// does. A Plan built by hand from Python carries no lengths and is applied as given.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bindings.h"
#include "kvcache/plan.h"
#include "kvcache/policy/admission.h"
#include "kvcache/policy/policy.h"
#include "kvcache/policy/registry.h"
#include "kvcache/policy/snapshot.h"
#include "tensor.h"

namespace kvcache::python {
namespace {

using namespace nb::literals;
using policy::Policy;

struct PyPolicy {
  std::shared_ptr<Policy> policy;
};

struct PyPlan {
  EvictionPlan plan;
  std::vector<int32_t> lengths;  // [layers * kv_heads] at planning time, or empty (hand-made)
};

struct PyAdmission {
  std::shared_ptr<policy::Admission> admission;
};

std::shared_ptr<Policy> PolicyFrom(const nb::handle& obj) {
  if (nb::isinstance<nb::str>(obj)) {
    absl::StatusOr<std::unique_ptr<Policy>> p =
        policy::CreatePolicy(nb::cast<std::string>(obj));
    ThrowIfError(p.status());
    return std::shared_ptr<Policy>(std::move(*p));
  }
  if (nb::isinstance<PyPolicy>(obj)) return nb::cast<PyPolicy&>(obj).policy;
  throw nb::type_error("policy must be a registry spec string or a kvcache.Policy");
}

// Python observations -> policy::Observations. `keep` owns the converted arrays for the call.
struct ObservationsHolder {
  std::vector<HostTensor> queries;
  std::vector<std::vector<int32_t>> positions;
  std::vector<int32_t> image_positions;
  HostTensor image_scores;
  policy::Observations obs;
};

void ConvertObservations(const CacheConfig& cfg, const nb::handle& observations,
                         const nb::handle& image_scores, ObservationsHolder* h) {
  if (!observations.is_none()) {
    nb::sequence seq = nb::borrow<nb::sequence>(observations);
    const size_t n = nb::len(seq);
    if (n != static_cast<size_t>(cfg.num_layers)) {
      throw nb::value_error(absl::StrCat("observations has ", n, " entries, expected one per "
                                         "layer (", cfg.num_layers, ") or None")
                                .c_str());
    }
    h->queries.resize(n);
    h->positions.resize(n);
    h->obs.layers.resize(n);
    for (size_t l = 0; l < n; ++l) {
      nb::handle item = seq[l];
      if (item.is_none()) continue;
      auto pair = nb::cast<std::tuple<nb::ndarray<nb::ro>, nb::ndarray<nb::ro>>>(item);
      const std::string qname = absl::StrCat("observations[", l, "] queries");
      const std::string pname = absl::StrCat("observations[", l, "] positions");
      h->queries[l] = ToHostTensor(std::get<0>(pair), qname.c_str(),
                                   {-1, cfg.num_q_heads, cfg.head_dim}, kF32Only);
      h->positions[l] = ToInt32Vector(std::get<1>(pair), pname.c_str(), h->queries[l].shape[0]);
      h->obs.layers[l] = {.queries = std::span<const float>(
                              h->queries[l].f32(), static_cast<size_t>(h->queries[l].numel)),
                          .positions = h->positions[l]};
    }
  }
  if (!image_scores.is_none()) {
    auto pair = nb::cast<std::tuple<nb::ndarray<nb::ro>, nb::ndarray<nb::ro>>>(image_scores);
    h->image_scores = ToHostTensor(std::get<1>(pair), "image_scores scores", {-1}, kF32Only);
    h->image_positions = ToInt32Vector(std::get<0>(pair), "image_scores positions",
                                       h->image_scores.shape[0]);
    h->obs.image_score_positions = h->image_positions;
    h->obs.image_scores =
        std::span<const float>(h->image_scores.f32(), static_cast<size_t>(h->image_scores.numel));
  }
}

PyPlan MakePlan(PyCache& c, SequenceId seq, const nb::handle& policy_obj,
                const nb::handle& observations, const nb::handle& image_scores) {
  std::shared_ptr<Policy> p = PolicyFrom(policy_obj);
  ObservationsHolder holder;
  ConvertObservations(c.cache->config(), observations, image_scores, &holder);
  absl::Status status;
  PyPlan out;
  {
    nb::gil_scoped_release release;
    absl::StatusOr<policy::SequenceSnapshot> snap =
        policy::CollectSnapshot(*c.cache, seq, holder.obs, p->Needs());
    if (!snap.ok()) {
      status = snap.status();
    } else {
      absl::StatusOr<EvictionPlan> planned = p->Plan(*snap);
      if (!planned.ok()) {
        status = planned.status();
      } else {
        out.plan = *std::move(planned);
        for (const policy::StreamSnapshot& st : snap->streams) out.lengths.push_back(st.length());
      }
    }
  }
  ThrowIfError(status);
  return out;
}

absl::Status CheckPlanCurrent(const Cache& cache, const PyPlan& p) {
  if (p.lengths.empty()) return absl::OkStatus();
  const int32_t heads = cache.config().num_kv_heads;
  for (const StreamPlan& sp : p.plan.streams) {
    absl::StatusOr<int32_t> now = cache.StreamLength(p.plan.sequence, sp.layer, sp.kv_head);
    if (!now.ok()) return now.status();
    const size_t i = static_cast<size_t>(sp.layer) * heads + sp.kv_head;
    if (i >= p.lengths.size()) continue;  // out-of-range streams: Apply names them
    if (*now != p.lengths[i]) {
      return absl::FailedPreconditionError(
          absl::StrCat("stream (sequence ", p.plan.sequence, ", layer ", sp.layer, ", kv head ",
                       sp.kv_head, ") has ", *now, " tokens but had ", p.lengths[i],
                       " when the plan was made; plan again"));
    }
  }
  return absl::OkStatus();
}

void ApplyPlan(PyCache& c, const PyPlan& p) {
  absl::Status s;
  {
    nb::gil_scoped_release release;
    s = CheckPlanCurrent(*c.cache, p);
    if (s.ok()) s = c.cache->Apply(p.plan);
  }
  ThrowIfError(s);
}

nb::dict NeedsDict(const policy::SnapshotRequest& r) {
  nb::dict d;
  d["keys"] = r.keys;
  d["window_rows"] = r.window_rows;
  d["post_vision"] = r.post_vision;
  d["sparsity"] = r.sparsity;
  d["last_row"] = r.last_row;
  d["query_rows"] = r.query_rows;
  d["sparsity_threshold"] = r.sparsity_threshold;
  d["scale"] = r.scale;
  return d;
}

}  // namespace

void BindPolicy(nb::module_& m, nb::class_<PyCache>& cache_class) {
  m.def(
      "list_policies",
      []() {
        nb::list out;
        for (const policy::PolicyInfo& i : policy::ListPolicies()) {
          out.append(nb::make_tuple(i.name, i.summary, i.defaults));
        }
        return out;
      },
      "Every registry policy as (name, summary, defaults) tuples (docs/POLICIES.md).");

  nb::class_<PyPolicy>(m, "Policy",
                       "A policy built by registry spec, e.g. Policy('snapkv:keep=0.1,window=8')."
                       " Raises ValueError for an unknown name, key or value.")
      .def(
          "__init__",
          [](PyPolicy* self, const std::string& spec) {
            absl::StatusOr<std::unique_ptr<Policy>> p = policy::CreatePolicy(spec);
            ThrowIfError(p.status());
            new (self) PyPolicy{std::shared_ptr<Policy>(std::move(*p))};
          },
          "spec"_a)
      .def_prop_ro("name", [](const PyPolicy& p) { return std::string(p.policy->name()); })
      .def("describe", [](const PyPolicy& p) { return p.policy->Describe(); })
      .def(
          "needs", [](const PyPolicy& p) { return NeedsDict(p.policy->Needs()); },
          "What the policy needs collected: keys, window_rows (observation rows scored), "
          "post_vision, sparsity, last_row, query_rows, sparsity_threshold, scale.")
      .def("__repr__", [](const PyPolicy& p) {
        return absl::StrCat("kvcache.Policy('", p.policy->Describe(), "')");
      });

  nb::class_<MergeTerm>(m, "MergeTerm")
      .def(nb::init<>())
      .def_rw("kept_slot", &MergeTerm::kept_slot)
      .def_rw("source", &MergeTerm::source)
      .def_rw("key_weight", &MergeTerm::key_weight)
      .def_rw("value_weight", &MergeTerm::value_weight);

  nb::class_<StreamPlan>(m, "StreamPlan",
                         "Kept token indices (and optional kept key channels, merges) of one "
                         "(layer, kv head) stream (include/kvcache/plan.h).")
      .def(
          "__init__",
          [](StreamPlan* s, int32_t layer, int32_t kv_head, std::vector<int32_t> kept) {
            new (s) StreamPlan{.layer = layer, .kv_head = kv_head, .kept = std::move(kept)};
          },
          "layer"_a = 0, "kv_head"_a = 0, "kept"_a = std::vector<int32_t>{})
      .def_rw("layer", &StreamPlan::layer)
      .def_rw("kv_head", &StreamPlan::kv_head)
      .def_rw("kept", &StreamPlan::kept)
      .def_rw("key_channels", &StreamPlan::key_channels)
      .def_rw("full_width_recent", &StreamPlan::full_width_recent)
      .def_rw("merges", &StreamPlan::merges)
      .def_rw("kept_key_weight", &StreamPlan::kept_key_weight)
      .def_rw("kept_value_weight", &StreamPlan::kept_value_weight);

  nb::class_<PyPlan>(m, "Plan",
                     "An eviction plan: plain data, applied by Cache.apply. Plans made by "
                     "Cache.plan are refused by apply once a stream changed length.")
      .def(
          "__init__",
          [](PyPlan* p, SequenceId sequence, std::vector<StreamPlan> streams,
             const std::string& policy) {
            new (p) PyPlan{};
            p->plan.sequence = sequence;
            p->plan.streams = std::move(streams);
            p->plan.policy = policy;
          },
          "sequence"_a, "streams"_a = std::vector<StreamPlan>{}, "policy"_a = "")
      .def_prop_rw(
          "sequence", [](const PyPlan& p) { return p.plan.sequence; },
          [](PyPlan& p, SequenceId s) { p.plan.sequence = s; })
      .def_prop_rw(
          "streams", [](const PyPlan& p) { return p.plan.streams; },
          [](PyPlan& p, std::vector<StreamPlan> s) { p.plan.streams = std::move(s); })
      .def_prop_ro("policy", [](const PyPlan& p) { return p.plan.policy; })
      .def("kept_tokens", [](const PyPlan& p) { return p.plan.KeptTokens(); },
           "Kept tokens summed over the streams the plan names.")
      .def("__repr__", [](const PyPlan& p) {
        return absl::StrCat("kvcache.Plan(sequence=", p.plan.sequence,
                            ", streams=", p.plan.streams.size(), ", policy='", p.plan.policy,
                            "')");
      });

  cache_class
      .def(
          "plan",
          [](PyCache& c, SequenceId seq, nb::handle policy, nb::handle observations,
             nb::handle image_scores) {
            return MakePlan(c, seq, policy, observations, image_scores);
          },
          "seq"_a, "policy"_a, "observations"_a = nb::none(), "image_scores"_a = nb::none(),
          "Collects what the policy needs and plans (the cache is not changed).\n\n"
          "policy: a registry spec ('snapkv:keep=0.1') or a kvcache.Policy. observations: None "
          "or one entry per layer, each None or (queries [rows, num_q_heads, head_dim] float32, "
          "positions [rows]) -- the post-RoPE query rows the engine observed (the last window "
          "rows for SnapKV & co, the rows after the last image token for VL-Cache). "
          "image_scores: None or (positions [k], scores [k] float32), PruMerge's CLS scores.")
      .def("apply", &ApplyPlan, "plan"_a,
           "Applies a plan: compacts the kept tokens into fresh pages and frees the old ones.")
      .def(
          "compress",
          [](PyCache& c, SequenceId seq, nb::handle policy, nb::handle observations,
             nb::handle image_scores) {
            PyPlan p = MakePlan(c, seq, policy, observations, image_scores);
            ApplyPlan(c, p);
            return p;
          },
          "seq"_a, "policy"_a, "observations"_a = nb::none(), "image_scores"_a = nb::none(),
          "plan() then apply() in one call; returns the applied plan.");

  nb::class_<PyAdmission>(m, "Admission",
                          "Dynamic-LLaVA decode-time admission (include/kvcache/policy/"
                          "admission.h): decides per new token whether layers >= start_layer "
                          "store its K/V.")
      .def_static(
          "fixed_rate",
          [](double rate, uint64_t seed, int32_t start_layer) {
            auto a = policy::Admission::FixedRate(rate, seed, start_layer);
            ThrowIfError(a.status());
            return PyAdmission{std::make_shared<policy::Admission>(*std::move(a))};
          },
          "rate"_a, "seed"_a = 0, "start_layer"_a = 2)
      .def_static(
          "attention_based",
          [](double threshold, int32_t start_layer) {
            auto a = policy::Admission::AttentionBased(threshold, start_layer);
            ThrowIfError(a.status());
            return PyAdmission{std::make_shared<policy::Admission>(*std::move(a))};
          },
          "threshold"_a = 1.0, "start_layer"_a = 2)
      .def_prop_ro("start_layer", [](const PyAdmission& a) { return a.admission->start_layer(); })
      .def(
          "decide",
          [](const PyAdmission& a, const nb::ndarray<nb::ro>& positions,
             const std::optional<nb::ndarray<nb::ro>>& self_weight,
             const std::optional<nb::ndarray<nb::ro>>& context_length) {
            std::vector<int32_t> pos = ToInt32Vector(positions, "positions", -1);
            const int64_t n = static_cast<int64_t>(pos.size());
            HostTensor w;
            std::vector<int32_t> ctx;
            policy::AdmissionInput in{.positions = pos};
            if (self_weight) {
              w = ToHostTensor(*self_weight, "self_weight", {n}, kF32Only);
              in.self_weight = std::span<const float>(w.f32(), static_cast<size_t>(n));
            }
            if (context_length) {
              ctx = ToInt32Vector(*context_length, "context_length", n);
              in.context_length = ctx;
            }
            absl::StatusOr<std::vector<uint8_t>> d = a.admission->Decide(in);
            ThrowIfError(d.status());
            return NumpyCopy(*d, {d->size()});
          },
          "positions"_a, "self_weight"_a = nb::none(), "context_length"_a = nb::none(),
          "One decision per token (1 = store in layers >= start_layer), uint8.")
      .def(
          "mask_for_layer",
          [](const PyAdmission& a, int32_t layer, const nb::ndarray<nb::ro>& decisions) {
            std::vector<int32_t> raw = ToInt32Vector(decisions, "decisions", -1);
            std::vector<uint8_t> d(raw.begin(), raw.end());
            std::vector<uint8_t> mask = a.admission->MaskForLayer(layer, d);
            return NumpyCopy(mask, {mask.size()});
          },
          "layer"_a, "decisions"_a, "The append admit mask of `layer`.");
}

}  // namespace kvcache::python
