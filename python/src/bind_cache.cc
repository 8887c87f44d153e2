// python/src/bind_cache.cc — kvcache.Config, kvcache.Cache and kvcache.ReadPolicy (the decode
// methods of Cache are bind_decode.cc's, the policy methods bind_policy.cc's).
//
// The methods mirror include/kvcache/cache.h one for one; arrays are converted by tensor.h (no
// copy for C-contiguous host arrays), every C++ call that touches K/V runs with the GIL
// released, and a non-OK status becomes the exception tensor.h names (the cache is unchanged:
// the C++ layer validates before it commits).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "bindings.h"
#include "kvcache/cache.h"
#include "kvcache/config.h"
#include "tensor.h"

namespace kvcache::python {
namespace {

using namespace nb::literals;

DType ParseDType(const std::string& s) {
  if (s == "f32" || s == "float32") return DType::kF32;
  if (s == "f16" || s == "float16") return DType::kF16;
  if (s == "bf16" || s == "bfloat16") return DType::kBF16;
  throw nb::value_error(
      absl::StrCat("dtype '", s, "' is not one of f32, f16, bf16 (float32, float16, bfloat16)")
          .c_str());
}

const char* DTypeShortName(DType t) {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
  }
  return "?";
}

ReadPolicy::Kind ParseReadKind(const std::string& s) {
  if (s == "dense") return ReadPolicy::Kind::kDense;
  if (s == "quest") return ReadPolicy::Kind::kQuest;
  if (s == "retrieval") return ReadPolicy::Kind::kRetrieval;
  throw nb::value_error(
      absl::StrCat("read policy kind '", s, "' is not one of dense, quest, retrieval").c_str());
}

const char* ReadKindName(ReadPolicy::Kind k) {
  switch (k) {
    case ReadPolicy::Kind::kDense: return "dense";
    case ReadPolicy::Kind::kQuest: return "quest";
    case ReadPolicy::Kind::kRetrieval: return "retrieval";
  }
  return "?";
}

std::vector<Modality> ToModalities(const InArray& a, int64_t length) {
  std::vector<int32_t> raw = ToInt32Vector(a, "modalities", length);
  std::vector<Modality> out(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) {
    if (raw[i] < 0 || raw[i] >= kNumModalities) {
      throw nb::value_error(absl::StrCat("modalities[", i, "] = ", raw[i],
                                         " is not a modality (0 text, 1 image, 2 video, 3 audio)")
                                .c_str());
    }
    out[i] = static_cast<Modality>(raw[i]);
  }
  return out;
}

nb::dict ContentsToDict(const StreamContents& c, int32_t head_dim) {
  nb::dict d;
  const size_t n = static_cast<size_t>(c.length);
  d["length"] = c.length;
  d["num_segments"] = c.num_segments;
  d["positions"] = NumpyCopy(c.positions, {n});
  std::vector<uint8_t> mods(n);
  for (size_t i = 0; i < n; ++i) mods[i] = static_cast<uint8_t>(c.modalities[i]);
  d["modalities"] = NumpyCopy(mods, {n});
  d["scores"] = NumpyCopy(c.scores, {n});
  d["key_width"] = NumpyCopy(c.key_width, {n});
  const size_t dim = static_cast<size_t>(head_dim);
  d["keys"] = c.keys.empty() ? nb::none() : nb::cast(NumpyCopy(c.keys, {n, dim}));
  d["values"] = c.values.empty() ? nb::none() : nb::cast(NumpyCopy(c.values, {n, dim}));
  return d;
}

}  // namespace

GqaAggregation ParseAggregation(const std::string& s) {
  if (s == "mean") return GqaAggregation::kMean;
  if (s == "sum") return GqaAggregation::kSum;
  if (s == "max") return GqaAggregation::kMax;
  throw nb::value_error(
      absl::StrCat("aggregation '", s, "' is not one of mean, sum, max").c_str());
}

void BindCache(nb::module_& m) {
  nb::class_<CacheConfig>(m, "Config",
                          "Shape of a cache (include/kvcache/config.h). Every field is a keyword "
                          "argument; dtype is 'f32', 'f16' or 'bf16'.")
      .def(
          "__init__",
          [](CacheConfig* c, int32_t num_layers, int32_t num_kv_heads, int32_t num_q_heads,
             int32_t head_dim, const std::string& dtype, int32_t page_tokens, int64_t page_bytes,
             int32_t num_pages, bool page_summaries) {
            new (c) CacheConfig{.num_layers = num_layers,
                                .num_kv_heads = num_kv_heads,
                                .num_q_heads = num_q_heads,
                                .head_dim = head_dim,
                                .dtype = ParseDType(dtype),
                                .page_tokens = page_tokens,
                                .page_bytes = page_bytes,
                                .num_pages = num_pages,
                                .page_summaries = page_summaries};
          },
          "num_layers"_a = 1, "num_kv_heads"_a = 1, "num_q_heads"_a = 1, "head_dim"_a = 128,
          "dtype"_a = "f16", "page_tokens"_a = 16, "page_bytes"_a = 0, "num_pages"_a = 1024,
          "page_summaries"_a = false)
      .def_rw("num_layers", &CacheConfig::num_layers)
      .def_rw("num_kv_heads", &CacheConfig::num_kv_heads)
      .def_rw("num_q_heads", &CacheConfig::num_q_heads)
      .def_rw("head_dim", &CacheConfig::head_dim)
      .def_prop_rw(
          "dtype", [](const CacheConfig& c) { return std::string(DTypeShortName(c.dtype)); },
          [](CacheConfig& c, const std::string& s) { c.dtype = ParseDType(s); })
      .def_rw("page_tokens", &CacheConfig::page_tokens)
      .def_rw("page_bytes", &CacheConfig::page_bytes)
      .def_rw("num_pages", &CacheConfig::num_pages)
      .def_rw("page_summaries", &CacheConfig::page_summaries)
      .def("validate", [](const CacheConfig& c) { ThrowIfError(c.Validate()); },
           "Raises ValueError naming the offending field.")
      .def_prop_ro("resolved_page_bytes", &CacheConfig::ResolvedPageBytes)
      .def_prop_ro("resolved_page_tokens", &CacheConfig::ResolvedPageTokens)
      .def("__repr__", &CacheConfig::DebugString);

  nb::class_<ReadPolicy>(m, "ReadPolicy",
                         "Which keys a decode step reads (include/kvcache/read_policy.h): "
                         "kind 'dense' (default), 'quest' or 'retrieval'.")
      .def(
          "__init__",
          [](ReadPolicy* p, const std::string& kind, int32_t dense_first_layers,
             int32_t token_budget, int32_t top_k, bool exact_search, int32_t ef_search,
             int32_t sink_tokens, int32_t recent_tokens) {
            new (p) ReadPolicy{};
            p->kind = ParseReadKind(kind);
            p->dense_first_layers = dense_first_layers;
            p->token_budget = token_budget;
            p->top_k = top_k;
            p->exact_search = exact_search;
            p->ef_search = ef_search;
            p->sink_tokens = sink_tokens;
            p->recent_tokens = recent_tokens;
          },
          "kind"_a = "dense", "dense_first_layers"_a = 2, "token_budget"_a = 0, "top_k"_a = 32,
          "exact_search"_a = false, "ef_search"_a = 0, "sink_tokens"_a = 0,
          "recent_tokens"_a = 0)
      .def_prop_rw(
          "kind", [](const ReadPolicy& p) { return std::string(ReadKindName(p.kind)); },
          [](ReadPolicy& p, const std::string& s) { p.kind = ParseReadKind(s); })
      .def_rw("dense_first_layers", &ReadPolicy::dense_first_layers)
      .def_rw("token_budget", &ReadPolicy::token_budget)
      .def_rw("top_k", &ReadPolicy::top_k)
      .def_rw("exact_search", &ReadPolicy::exact_search)
      .def_rw("ef_search", &ReadPolicy::ef_search)
      .def_rw("sink_tokens", &ReadPolicy::sink_tokens)
      .def_rw("recent_tokens", &ReadPolicy::recent_tokens);

  nb::class_<PyCache> cache_class(m, "Cache",
                      "A paged, modality-aware KV cache (include/kvcache/cache.h): sequences, one "
                      "stream per (layer, kv head) with its own length, policies applied by "
                      "plan/apply/compress.");
  cache_class
      .def(
          "__init__",
          [](PyCache* self, const CacheConfig& config, const std::string& backend) {
            absl::StatusOr<std::unique_ptr<Cache>> c = Cache::Create(config, backend);
            ThrowIfError(c.status());
            new (self) PyCache{std::move(*c), backend};
          },
          "config"_a, "backend"_a = "cpu",
          "Creates the cache on a backend by registry name ('cpu', 'cpu-reference', 'cuda' when "
          "built with CUDA). Raises ValueError for a bad config, naming the field.")
      .def_prop_ro("config", [](const PyCache& c) { return c.cache->config(); })
      .def_prop_ro("backend", [](const PyCache& c) { return c.backend; })
      .def(
          "add_sequence",
          [](PyCache& c) {
            absl::StatusOr<SequenceId> s = c.cache->AddSequence();
            ThrowIfError(s.status());
            return *s;
          },
          "Adds an empty sequence and returns its id (ids are never reused).")
      .def(
          "fork",
          [](PyCache& c, SequenceId parent) {
            absl::StatusOr<SequenceId> s = c.cache->Fork(parent);
            ThrowIfError(s.status());
            return *s;
          },
          "parent"_a, "New sequence sharing every page of `parent` (copy-on-write).")
      .def(
          "free", [](PyCache& c, SequenceId seq) { ThrowIfError(c.cache->Free(seq)); }, "seq"_a,
          "Frees a sequence and returns its pages (KeyError when unknown).")
      .def("sequences", [](const PyCache& c) { return c.cache->Sequences(); })
      .def("__contains__", [](const PyCache& c, SequenceId s) { return c.cache->Contains(s); })
      .def(
          "append",
          [](PyCache& c, SequenceId seq, int32_t layer, const nb::ndarray<nb::ro>& keys,
             const nb::ndarray<nb::ro>& values, const nb::ndarray<nb::ro>& positions,
             const std::optional<nb::ndarray<nb::ro>>& modalities,
             const std::optional<nb::ndarray<nb::ro>>& admit) {
            const CacheConfig& cfg = c.cache->config();
            HostTensor k = ToHostTensor(keys, "keys", {-1, cfg.num_kv_heads, cfg.head_dim},
                                        kFloatDTypes);
            const int64_t n = k.shape[0];
            HostTensor v = ToHostTensor(values, "values", {n, cfg.num_kv_heads, cfg.head_dim},
                                        kFloatDTypes);
            if (v.dtype != k.dtype) {
              throw nb::value_error("values must have the same dtype as keys");
            }
            std::vector<int32_t> pos = ToInt32Vector(positions, "positions", n);
            std::vector<Modality> mods;
            if (modalities) mods = ToModalities(*modalities, n);
            std::vector<uint8_t> adm;
            if (admit) {
              std::vector<int32_t> raw = ToInt32Vector(*admit, "admit", n);
              adm.assign(raw.begin(), raw.end());
              for (size_t i = 0; i < raw.size(); ++i) {
                if (raw[i] != 0 && raw[i] != 1) {
                  throw nb::value_error(
                      absl::StrCat("admit[", i, "] = ", raw[i], ", expected 0 or 1").c_str());
                }
              }
            }
            absl::Status s;
            {
              nb::gil_scoped_release release;
              s = c.cache->Append(seq, layer,
                                  {.keys = k.ref(), .values = v.ref(), .positions = pos,
                                   .modalities = mods, .admit = adm});
            }
            ThrowIfError(s);
          },
          "seq"_a, "layer"_a, "keys"_a, "values"_a, "positions"_a, "modalities"_a = nb::none(),
          "admit"_a = nb::none(),
          "Appends num_tokens tokens to every kv head of one layer.\n\n"
          "keys, values: [num_tokens, num_kv_heads, head_dim] float32/float16/bfloat16 host "
          "arrays (numpy or torch; C-contiguous ones are read in place). positions: [num_tokens] "
          "integers, strictly increasing and past the layer's last position. modalities: "
          "[num_tokens] 0 text, 1 image, 2 video, 3 audio (default text). admit: [num_tokens] "
          "0/1 (Dynamic-LLaVA; 0 = not stored in this layer).")
      .def(
          "score_rows",
          [](PyCache& c, SequenceId seq, int32_t layer, const nb::ndarray<nb::ro>& queries,
             const nb::ndarray<nb::ro>& positions, float scale, const std::string& aggregation,
             float sparsity_threshold, bool accumulate) {
            const CacheConfig& cfg = c.cache->config();
            HostTensor qt = ToHostTensor(queries, "queries", {-1, cfg.num_q_heads, cfg.head_dim},
                                         kF32Only);
            std::vector<int32_t> pos = ToInt32Vector(positions, "positions", qt.shape[0]);
            ScoreRequest req{.queries = std::span<const float>(qt.f32(),
                                                               static_cast<size_t>(qt.numel)),
                             .positions = pos,
                             .scale = scale,
                             .aggregation = ParseAggregation(aggregation),
                             .sparsity_threshold = sparsity_threshold,
                             .accumulate = accumulate};
            absl::StatusOr<ScoreResult> r;
            {
              nb::gil_scoped_release release;
              r = c.cache->ScoreRows(seq, layer, req);
            }
            ThrowIfError(r.status());
            nb::list per_head;
            for (const std::vector<float>& h : r->token_scores) {
              per_head.append(NumpyCopy(h, {h.size()}));
            }
            nb::dict d;
            d["token_scores"] = per_head;
            d["below_threshold"] = NumpyCopy(r->below_threshold, {r->below_threshold.size()});
            d["causal_entries"] = NumpyCopy(r->causal_entries, {r->causal_entries.size()});
            return d;
          },
          "seq"_a, "layer"_a, "queries"_a, "positions"_a, "scale"_a = 0.0f,
          "aggregation"_a = "mean", "sparsity_threshold"_a = 0.01f, "accumulate"_a = false,
          "Scores every key of the layer's streams against query rows (causal by position).\n\n"
          "queries: [rows, num_q_heads, head_dim] float32; positions: [rows]. Returns a dict: "
          "token_scores (list over kv heads of [stream length] float32), below_threshold and "
          "causal_entries ([num_q_heads] int64, VL-Cache counts).")
      .def(
          "stream_length",
          [](const PyCache& c, SequenceId seq, int32_t layer, int32_t kv_head) {
            absl::StatusOr<int32_t> n = c.cache->StreamLength(seq, layer, kv_head);
            ThrowIfError(n.status());
            return *n;
          },
          "seq"_a, "layer"_a, "kv_head"_a)
      .def(
          "stream_lengths",
          [](const PyCache& c, SequenceId seq) {
            const CacheConfig& cfg = c.cache->config();
            std::vector<int32_t> lengths;
            for (int32_t l = 0; l < cfg.num_layers; ++l) {
              for (int32_t h = 0; h < cfg.num_kv_heads; ++h) {
                absl::StatusOr<int32_t> n = c.cache->StreamLength(seq, l, h);
                ThrowIfError(n.status());
                lengths.push_back(*n);
              }
            }
            return NumpyCopy(lengths, {static_cast<size_t>(cfg.num_layers),
                                       static_cast<size_t>(cfg.num_kv_heads)});
          },
          "seq"_a, "Every stream length of a sequence: [num_layers, num_kv_heads] int32.")
      .def(
          "read_stream",
          [](const PyCache& c, SequenceId seq, int32_t layer, int32_t kv_head, bool keys,
             bool values) {
            absl::StatusOr<StreamContents> r;
            {
              nb::gil_scoped_release release;
              r = c.cache->ReadStream(seq, layer, kv_head,
                                      StreamReadOptions{.keys = keys, .values = values});
            }
            ThrowIfError(r.status());
            return ContentsToDict(*r, c.cache->config().head_dim);
          },
          "seq"_a, "layer"_a, "kv_head"_a, "keys"_a = true, "values"_a = true,
          "Copies one stream back to host: a dict of length, num_segments, positions, "
          "modalities, scores, key_width and (when requested) keys / values [length, head_dim] "
          "float32 (channels a pruned segment does not store read as 0).")
      .def(
          "stream_pages",
          [](const PyCache& c, SequenceId seq, int32_t layer, int32_t kv_head) {
            absl::StatusOr<std::vector<SegmentLayout>> r =
                c.cache->StreamPages(seq, layer, kv_head);
            ThrowIfError(r.status());
            nb::list out;
            for (const SegmentLayout& s : *r) {
              nb::dict d;
              d["length"] = s.length;
              d["tokens_per_page"] = s.tokens_per_page;
              d["key_width"] = s.key_width;
              d["value_width"] = s.value_width;
              d["pages"] = NumpyCopy(s.pages, {s.pages.size()});
              out.append(d);
            }
            return out;
          },
          "seq"_a, "layer"_a, "kv_head"_a,
          "The page table of a stream: one dict per segment (length, tokens_per_page, key_width, "
          "value_width, pages [int32 pool page ids]). Valid until the next append/apply/free of "
          "the sequence.")
      .def(
          "read_page_summaries",
          [](const PyCache& c, SequenceId seq, int32_t layer, int32_t kv_head) {
            absl::StatusOr<std::vector<PageSummary>> r =
                c.cache->ReadPageSummaries(seq, layer, kv_head);
            ThrowIfError(r.status());
            nb::list out;
            for (const PageSummary& p : *r) {
              nb::dict d;
              d["first_token"] = p.first_token;
              d["num_tokens"] = p.num_tokens;
              d["key_channels"] = NumpyCopy(p.key_channels, {p.key_channels.size()});
              d["key_min"] = NumpyCopy(p.key_min, {p.key_min.size()});
              d["key_max"] = NumpyCopy(p.key_max, {p.key_max.size()});
              out.append(d);
            }
            return out;
          },
          "seq"_a, "layer"_a, "kv_head"_a,
          "Quest page summaries of a stream, page by page (RuntimeError unless the config has "
          "page_summaries=True): first_token, num_tokens, key_channels, key_min, key_max.")
      .def(
          "add_scores",
          [](PyCache& c, SequenceId seq, int32_t layer, int32_t kv_head,
             const nb::ndarray<nb::ro>& delta) {
            HostTensor d = ToHostTensor(delta, "delta", {-1}, kF32Only);
            ThrowIfError(c.cache->AddScores(
                seq, layer, kv_head, std::span<const float>(d.f32(), static_cast<size_t>(d.numel))));
          },
          "seq"_a, "layer"_a, "kv_head"_a, "delta"_a,
          "Adds delta[t] ([stream length] float32) to each token's score accumulator.")
      .def(
          "stats",
          [](const PyCache& c) {
            const CacheStats s = c.cache->Stats();
            nb::dict d;
            d["num_sequences"] = s.num_sequences;
            d["pages_total"] = s.pages_total;
            d["pages_used"] = s.pages_used;
            d["bytes_used"] = s.bytes_used;
            d["tokens_stored"] = s.tokens_stored;
            d["page_bytes"] = c.cache->config().ResolvedPageBytes();
            return d;
          },
          "Pool and store totals: num_sequences, pages_total, pages_used, bytes_used, "
          "tokens_stored, page_bytes.")
      .def(
          "validate",
          [](const PyCache& c) {
            absl::Status s;
            {
              nb::gil_scoped_release release;
              s = c.cache->Validate();
            }
            ThrowIfError(s);
          },
          "Checks every invariant of the store; raises (RuntimeError) naming the first broken "
          "one.");
  BindDecode(m, cache_class);
  BindPolicy(m, cache_class);
}

}  // namespace kvcache::python
