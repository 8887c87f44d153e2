// kvcache-eval runner: full-cache reference and one run per policy configuration.
#include "tools/eval/runner.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kvcache/cache.h"
#include "kvcache/policy/registry.h"
#include "kvcache/policy/snapshot.h"

namespace kvcache::eval {
namespace {

double NowMs() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string Name(const std::string& spec) { return spec.substr(0, spec.find(':')); }

bool IsReadPolicy(const std::string& name) { return name == "quest" || name == "retrieval"; }

// Whether the spec sets its budget itself (then --keep does not apply to it). Only h2o's
// heavy/recent and a "ratio" (fastv's dropped image share; the per-image keep ratio of the image
// baselines) are budgets; vlcache's and think's "recent" and the read policies' "recent" are
// windows inside a budget.
bool SetsBudget(const std::string& spec) {
  const size_t colon = spec.find(':');
  if (colon == std::string::npos) return false;
  const std::string name = Name(spec);
  const bool read = IsReadPolicy(name);
  for (absl::string_view item : absl::StrSplit(spec.substr(colon + 1), ',')) {
    const absl::string_view key = item.substr(0, item.find('='));
    if (key == "keep" || key == "tokens") return true;
    if (read ? key == "top_k"
             : ((name == "h2o" && (key == "heavy" || key == "recent")) || key == "ratio")) {
      return true;
    }
  }
  return false;
}

std::string WithParams(const std::string& spec, const std::string& params) {
  return spec.find(':') == std::string::npos ? absl::StrCat(spec, ":", params)
                                             : absl::StrCat(spec, ",", params);
}

// Read policies (read_policy.h) run as pseudo-policies: every token stays cached and each decode
// step reads a query-dependent subset. Spec: "quest[:keep=r|tokens=n,dense_layers=n]" or
// "retrieval[:keep=r|top_k=n,exact=0|1,ef=n,sinks=n,recent=n,dense_layers=n]"; keep r means
// round(r * prompt length) tokens read per stream (Quest) or keys per query head (retrieval).
absl::StatusOr<ReadPolicy> ParseReadPolicy(const std::string& spec, int32_t prompt_len) {
  const std::string name = Name(spec);
  ReadPolicy r;
  r.kind = name == "quest" ? ReadPolicy::Kind::kQuest : ReadPolicy::Kind::kRetrieval;
  double keep = 0.1;
  int32_t tokens = 0;
  const size_t colon = spec.find(':');
  if (colon != std::string::npos) {
    for (absl::string_view item : absl::StrSplit(spec.substr(colon + 1), ',')) {
      const size_t eq = item.find('=');
      const std::string key(item.substr(0, eq));
      const std::string value(eq == absl::string_view::npos ? "" : item.substr(eq + 1));
      auto bad = [&] {
        return absl::InvalidArgumentError(
            absl::StrCat(name, ": bad parameter '", std::string(item), "'"));
      };
      int32_t n = 0;
      if (key == "keep") {
        if (!absl::SimpleAtod(value, &keep) || !(keep > 0.0 && keep <= 1.0)) return bad();
        continue;
      }
      if (!absl::SimpleAtoi(value, &n) || n < 0) return bad();
      if (key == "dense_layers") {
        r.dense_first_layers = n;
      } else if (name == "quest" && key == "tokens") {
        tokens = n;
      } else if (name == "retrieval" && key == "top_k") {
        tokens = n;
      } else if (name == "retrieval" && key == "exact") {
        r.exact_search = n != 0;
      } else if (name == "retrieval" && key == "ef") {
        r.ef_search = n;
      } else if (name == "retrieval" && key == "sinks") {
        r.sink_tokens = n;
      } else if (name == "retrieval" && key == "recent") {
        r.recent_tokens = n;
      } else {
        return absl::InvalidArgumentError(absl::StrCat(name, ": unknown parameter '", key, "'"));
      }
    }
  }
  if (tokens == 0) {
    tokens = std::max<int32_t>(1, static_cast<int32_t>(std::lround(keep * prompt_len)));
  }
  if (r.kind == ReadPolicy::Kind::kQuest) {
    r.token_budget = tokens;
  } else {
    r.top_k = tokens;
  }
  return r;
}

// Score accumulators of every (layer, kv head) stream after the observation rows were scored,
// as an engine running H2O during prefill would have them.
using Accumulators = std::vector<std::vector<float>>;  // [layer * kv_heads][prompt_len]

// The full cache's attention probabilities of every decode query, recorded on the reference run
// (ScoreRows with the step's query right after the step's Append): the denominator and the
// weights of attention-mass recall.
struct Reference {
  int32_t steps = 0, layers = 0, kv_heads = 0, prompt_len = 0;
  std::vector<float> prompt_scores;  // [steps, layers, kv_heads, prompt_len]
  std::vector<float> decode_mass;    // [steps, layers, kv_heads] mass on decode tokens so far
  float* prompt(int32_t t, int32_t l, int32_t h) {
    return &prompt_scores[((static_cast<size_t>(t) * layers + l) * kv_heads + h) * prompt_len];
  }
};

struct Prepared {
  std::unique_ptr<Cache> cache;
  SequenceId seq = 0;
};

absl::StatusOr<Prepared> Prefill(const Workload& w, const EvalOptions& o,
                                 bool page_summaries = false) {
  CacheConfig cfg;
  cfg.page_summaries = page_summaries;
  cfg.num_layers = w.num_layers;
  cfg.num_kv_heads = w.num_kv_heads;
  cfg.num_q_heads = w.num_q_heads;
  cfg.head_dim = w.head_dim;
  cfg.dtype = o.dtype;
  cfg.page_tokens = o.page_tokens;
  // The whole sequence twice over (Apply allocates the compacted copy before freeing).
  const int64_t per_stream = (w.prompt_len + w.decode_steps + o.page_tokens - 1) / o.page_tokens + 2;
  const int64_t pages = 2 * per_stream * w.num_layers * w.num_kv_heads + 64;
  if (pages > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("workload needs ", pages, " pages; too large"));
  }
  cfg.num_pages = static_cast<int32_t>(pages);
  auto cache = Cache::Create(cfg, "cpu");
  if (!cache.ok()) return cache.status();
  Prepared p;
  p.cache = std::move(*cache);
  auto seq = p.cache->AddSequence();
  if (!seq.ok()) return seq.status();
  p.seq = *seq;
  for (int32_t l = 0; l < w.num_layers; ++l) {
    AppendRequest req;
    req.keys = TensorRef::Of(w.keys[l]);
    req.values = TensorRef::Of(w.values[l]);
    req.positions = w.positions;
    req.modalities = w.modalities;
    if (absl::Status s = p.cache->Append(p.seq, l, req); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("prefill layer ", l, ": ", s.message()));
    }
  }
  return p;
}

absl::StatusOr<Accumulators> ComputeAccumulators(const Workload& w, Cache& cache, SequenceId seq) {
  Accumulators acc(static_cast<size_t>(w.num_layers) * w.num_kv_heads);
  for (int32_t l = 0; l < w.num_layers; ++l) {
    ScoreRequest sr;
    sr.queries = w.queries[l];
    sr.positions = w.query_positions;
    sr.accumulate = true;
    if (auto r = cache.ScoreRows(seq, l, sr); !r.ok()) return r.status();
    for (int32_t h = 0; h < w.num_kv_heads; ++h) {
      auto c = cache.ReadStream(seq, l, h, /*with_kv=*/false);
      if (!c.ok()) return c.status();
      acc[static_cast<size_t>(l) * w.num_kv_heads + h] = std::move(c->scores);
    }
  }
  return acc;
}

absl::Status RunOne(const Workload& w, const EvalOptions& o, const Accumulators& acc,
                    const std::string& spec, RunResult& r, int64_t& done, int64_t total,
                    Reference* record) {
  const bool read_only = IsReadPolicy(Name(spec));
  DecodeOptions decode_options;
  r.spec = spec;
  std::unique_ptr<policy::Policy> token_policy;
  if (read_only) {
    auto rp = ParseReadPolicy(spec, w.prompt_len);
    if (!rp.ok()) return rp.status();
    decode_options.read_policy = *rp;
    r.policy = Name(spec);
    r.describe = rp->kind == ReadPolicy::Kind::kQuest
                     ? absl::StrCat("Quest sparse decode: ", rp->token_budget,
                                    " tokens read per stream, first ", rp->dense_first_layers,
                                    " layers dense")
                     : absl::StrCat("IceFormer retrieval decode: top ", rp->top_k,
                                    " keys per query head (", rp->exact_search ? "exact scan" : "hnsw",
                                    "), first ", rp->dense_first_layers, " layers dense");
  } else {
    auto policy = policy::CreatePolicy(spec);
    if (!policy.ok()) return policy.status();
    token_policy = std::move(*policy);
    r.policy = std::string(token_policy->name());
    r.describe = token_policy->Describe();
  }
  auto prepared = Prefill(w, o, decode_options.read_policy.kind == ReadPolicy::Kind::kQuest);
  if (!prepared.ok()) return prepared.status();
  Cache& cache = *prepared->cache;
  const SequenceId seq = prepared->seq;
  const int32_t L = w.num_layers, H = w.num_kv_heads, QH = w.num_q_heads, D = w.head_dim;
  for (int32_t l = 0; l < L; ++l) {
    for (int32_t h = 0; h < H; ++h) {
      if (absl::Status s = cache.AddScores(seq, l, h, acc[static_cast<size_t>(l) * H + h]);
          !s.ok()) {
        return s;
      }
    }
  }

  if (!read_only) {
    policy::Observations obs;
    for (int32_t l = 0; l < L; ++l) {
      obs.layers.push_back({.queries = w.queries[l], .positions = w.query_positions});
    }
    double t0 = NowMs();
    auto snap = policy::CollectSnapshot(cache, seq, obs, token_policy->Needs());
    if (!snap.ok()) {
      return absl::Status(snap.status().code(), absl::StrCat(spec, ": collecting the snapshot: ",
                                                             snap.status().message()));
    }
    double t1 = NowMs();
    auto plan = token_policy->Plan(*snap);
    if (!plan.ok()) {
      return absl::Status(plan.status().code(),
                          absl::StrCat(spec, ": planning: ", plan.status().message()));
    }
    double t2 = NowMs();
    plan->sequence = seq;
    if (absl::Status s = cache.Apply(*plan); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat(spec, ": applying the plan: ", s.message()));
    }
    double t3 = NowMs();
    r.collect_ms = t1 - t0;
    r.plan_ms = t2 - t1;
    r.apply_ms = t3 - t2;
  }

  const CacheStats after = cache.Stats();
  r.pages = after.pages_used;
  r.kv_bytes = after.bytes_used;

  // What survived, by modality, layer and position bin.
  const int32_t bins = std::max(1, std::min(o.map_bins, w.prompt_len));
  std::vector<int64_t> bin_total(bins, 0);
  for (int32_t i = 0; i < w.prompt_len; ++i) {
    ++bin_total[static_cast<int64_t>(i) * bins / w.prompt_len];
  }
  r.kept_by_layer.assign(L, {});
  r.kept_map.assign(L, std::vector<float>(bins, 0.0f));
  r.kept_by_modality = {};
  r.total_by_modality = {};
  for (Modality m : w.modalities) r.total_by_modality[static_cast<int>(m)] += int64_t{L} * H;
  r.tokens_total = int64_t{w.prompt_len} * L * H;
  r.tokens_kept = 0;
  r.kept.assign(static_cast<size_t>(L) * H, std::vector<uint8_t>(w.prompt_len, 0));
  for (int32_t l = 0; l < L; ++l) {
    std::vector<int64_t> bin_kept(bins, 0);
    for (int32_t h = 0; h < H; ++h) {
      auto c = cache.ReadStream(seq, l, h, /*with_kv=*/false);
      if (!c.ok()) return c.status();
      std::vector<uint8_t>& kept = r.kept[static_cast<size_t>(l) * H + h];
      for (int32_t t = 0; t < c->length; ++t) {
        const auto it = std::lower_bound(w.positions.begin(), w.positions.end(), c->positions[t]);
        if (it == w.positions.end() || *it != c->positions[t]) continue;  // not a prompt token
        const int64_t idx = it - w.positions.begin();
        kept[idx] = 1;
        const int m = static_cast<int>(c->modalities[t]);
        ++r.kept_by_modality[m];
        ++r.kept_by_layer[l][m];
        ++r.tokens_kept;
        ++bin_kept[idx * bins / w.prompt_len];
      }
    }
    for (int32_t b = 0; b < bins; ++b) {
      r.kept_map[l][b] = static_cast<float>(static_cast<double>(bin_kept[b]) /
                                            (static_cast<double>(bin_total[b]) * H));
    }
  }
  r.kept_share = static_cast<double>(r.tokens_kept) / static_cast<double>(r.tokens_total);
  if (record != nullptr) {
    record->steps = w.decode_steps;
    record->layers = L;
    record->kv_heads = H;
    record->prompt_len = w.prompt_len;
    record->prompt_scores.assign(static_cast<size_t>(w.decode_steps) * L * H * w.prompt_len, 0);
    record->decode_mass.assign(static_cast<size_t>(w.decode_steps) * L * H, 0);
  }

  // Decode: each step appends its token to every layer, then attends with its query.
  const size_t qsize = static_cast<size_t>(QH) * D, kvsize = static_cast<size_t>(H) * D;
  if (decode_options.read_policy.kind == ReadPolicy::Kind::kRetrieval &&
      !decode_options.read_policy.exact_search) {
    // The hnsw index of a stream is built on its first retrieval decode: do that here, untimed
    // by the decode clock and reported as the policy's preparation (plan ms), like an engine
    // building it right after prefill. Later appends extend it inside Append.
    std::vector<float> scratch(qsize);
    const SequenceId one[] = {seq};
    const double a = NowMs();
    for (int32_t l = 0; l < L; ++l) {
      const std::span<const float> q(w.decode_queries[l].data(), qsize);
      if (absl::Status s = cache.DecodeAttention(one, l, q, scratch, {}, decode_options);
          !s.ok()) {
        return absl::Status(s.code(), absl::StrCat(spec, ": building the key index of layer ",
                                                   l, ": ", s.message()));
      }
    }
    r.plan_ms = NowMs() - a;
  }
  r.outputs.assign(static_cast<size_t>(w.decode_steps) * L * qsize, 0.0f);
  const SequenceId batch[] = {seq};
  const Modality text[] = {Modality::kText};
  double decode_ms = 0;
  for (int32_t t = 0; t < w.decode_steps; ++t) {
    for (int32_t l = 0; l < L; ++l) {
      AppendRequest req;
      req.keys = TensorRef::Of(std::span<const float>(&w.decode_keys[l][t * kvsize], kvsize));
      req.values = TensorRef::Of(std::span<const float>(&w.decode_values[l][t * kvsize], kvsize));
      req.positions = std::span<const int32_t>(&w.decode_positions[t], 1);
      req.modalities = text;
      if (absl::Status s = cache.Append(seq, l, req); !s.ok()) {
        return absl::Status(s.code(), absl::StrCat(spec, ": decode step ", t, " layer ", l,
                                                   ": ", s.message()));
      }
      const std::span<const float> q(&w.decode_queries[l][t * qsize], qsize);
      const std::span<float> out(&r.outputs[(static_cast<size_t>(t) * L + l) * qsize], qsize);
      const double a = NowMs();
      if (absl::Status s = cache.DecodeAttention(batch, l, q, out, {}, decode_options);
          !s.ok()) {
        return absl::Status(s.code(), absl::StrCat(spec, ": decode attention step ", t,
                                                   " layer ", l, ": ", s.message()));
      }
      decode_ms += NowMs() - a;
      if (record != nullptr) {
        // The full cache's probabilities of this query (untimed): prompt tokens, then the
        // decode tokens appended so far.
        ScoreRequest sr;
        sr.queries = q;
        sr.positions = std::span<const int32_t>(&w.decode_positions[t], 1);
        auto scores = cache.ScoreRows(seq, l, sr);
        if (!scores.ok()) return scores.status();
        for (int32_t h = 0; h < H; ++h) {
          const std::vector<float>& ts = scores->token_scores[h];
          if (ts.size() != static_cast<size_t>(w.prompt_len + t + 1)) {
            return absl::InternalError(absl::StrCat("reference scores of layer ", l, " head ", h,
                                                    " have ", ts.size(), " tokens"));
          }
          std::copy(ts.begin(), ts.begin() + w.prompt_len, record->prompt(t, l, h));
          double tail = 0;
          for (size_t i = w.prompt_len; i < ts.size(); ++i) tail += ts[i];
          record->decode_mass[(static_cast<size_t>(t) * L + l) * H + h] = static_cast<float>(tail);
        }
      }
    }
    ++done;
    if (o.progress) o.progress(done, total, spec);
  }
  r.decode_ms_per_step = decode_ms / w.decode_steps;
  const CacheStats end = cache.Stats();
  r.pages_end = end.pages_used;
  r.kv_bytes_end = end.bytes_used;
  return absl::OkStatus();
}

void ScoreFidelity(const Workload& w, const RunResult& full, Reference& ref, bool read_policy,
                   RunResult& r) {
  const int32_t L = w.num_layers, H = w.num_kv_heads, n = w.prompt_len;
  const size_t qsize = static_cast<size_t>(w.num_q_heads) * w.head_dim;
  r.layer_cosine.assign(L, 0.0);
  r.layer_rel_l2.assign(L, 0.0);
  r.layer_norm_ratio.assign(L, 0.0);
  r.layer_attn_recall.assign(L, 0.0);
  r.min_cosine = 1.0;
  for (int32_t t = 0; t < w.decode_steps; ++t) {
    for (int32_t l = 0; l < L; ++l) {
      const size_t off = (static_cast<size_t>(t) * L + l) * qsize;
      const Fidelity f = Compare(&full.outputs[off], &r.outputs[off], qsize);
      r.layer_cosine[l] += f.cosine;
      r.layer_rel_l2[l] += f.rel_l2;
      r.layer_norm_ratio[l] += f.norm_ratio;
      r.min_cosine = std::min(r.min_cosine, f.cosine);
      if (read_policy) continue;
      double recall = 0;
      for (int32_t h = 0; h < H; ++h) {
        const float* p = ref.prompt(t, l, h);
        const std::vector<uint8_t>& kept = r.kept[static_cast<size_t>(l) * H + h];
        double mass = ref.decode_mass[(static_cast<size_t>(t) * L + l) * H + h];
        double total = mass;
        for (int32_t i = 0; i < n; ++i) {
          total += p[i];
          if (kept[i]) mass += p[i];
        }
        recall += total > 0 ? mass / total : 1.0;
      }
      r.layer_attn_recall[l] += recall / H;
    }
  }
  r.cosine = r.rel_l2 = r.norm_ratio = r.attn_recall = 0;
  r.rel_l2_worst = -1;
  r.attn_recall_worst = 2;
  // Sums first, one division each: identical outputs then give exactly 1 and 0.
  for (int32_t l = 0; l < L; ++l) {
    r.layer_cosine[l] /= w.decode_steps;
    r.layer_rel_l2[l] /= w.decode_steps;
    r.layer_norm_ratio[l] /= w.decode_steps;
    r.layer_attn_recall[l] = read_policy ? std::nan("") : r.layer_attn_recall[l] / w.decode_steps;
    r.cosine += r.layer_cosine[l];
    r.rel_l2 += r.layer_rel_l2[l];
    r.norm_ratio += r.layer_norm_ratio[l];
    r.attn_recall += r.layer_attn_recall[l];
    if (r.layer_rel_l2[l] > r.rel_l2_worst) {
      r.rel_l2_worst = r.layer_rel_l2[l];
      r.rel_l2_worst_layer = l;
    }
    if (!read_policy && r.layer_attn_recall[l] < r.attn_recall_worst) {
      r.attn_recall_worst = r.layer_attn_recall[l];
      r.attn_recall_worst_layer = l;
    }
  }
  r.cosine /= L;
  r.rel_l2 /= L;
  r.norm_ratio /= L;
  r.attn_recall /= L;
  if (read_policy) r.attn_recall = r.attn_recall_worst = std::nan("");
  r.kept.clear();
  r.kept.shrink_to_fit();
}

}  // namespace

Fidelity Compare(const float* a, const float* b, size_t n) {
  if (std::equal(a, a + n, b)) return {1.0, 0.0};
  double ab = 0, aa = 0, bb = 0, dd = 0;
  for (size_t i = 0; i < n; ++i) {
    ab += double{a[i]} * b[i];
    aa += double{a[i]} * a[i];
    bb += double{b[i]} * b[i];
    const double d = double{b[i]} - a[i];
    dd += d * d;
  }
  Fidelity f;
  f.cosine = (aa > 0 && bb > 0) ? ab / std::sqrt(aa * bb) : 0.0;
  f.rel_l2 = aa > 0 ? std::sqrt(dd / aa) : std::sqrt(dd);
  f.norm_ratio = aa > 0 ? std::sqrt(bb / aa) : 0.0;
  return f;
}

absl::StatusOr<std::vector<RunSpec>> ExpandRuns(const std::vector<std::string>& policies,
                                                const std::vector<double>& keeps) {
  for (double k : keeps) {
    if (!(k > 0.0 && k <= 1.0)) {
      return absl::InvalidArgumentError(absl::StrCat("keep ratio ", k, " is outside (0, 1]"));
    }
  }
  if (policies.empty()) return absl::InvalidArgumentError("no policy given");
  std::vector<RunSpec> out;
  for (const std::string& spec : policies) {
    const std::string name = Name(spec);
    if (IsReadPolicy(name)) {
      if (auto probe = ParseReadPolicy(spec, 1); !probe.ok()) return probe.status();
      if (SetsBudget(spec) || keeps.empty()) {
        out.push_back({spec, -1.0});
      } else {
        for (double k : keeps) out.push_back({WithParams(spec, absl::StrCat("keep=", k)), k});
      }
      continue;
    }
    auto probe = policy::CreatePolicy(spec);
    if (!probe.ok()) return probe.status();
    const bool keep_knob = name != "full" && name != "prumerge" && name != "think";
    if (!keep_knob || SetsBudget(spec) || keeps.empty()) {
      out.push_back({spec, -1.0});
      continue;
    }
    for (double k : keeps) {
      std::string params;
      if (name == "h2o") {
        params = absl::StrCat("heavy=", k / 2, ",recent=", k / 2);
      } else {
        params = absl::StrCat("keep=", k);
      }
      const std::string full_spec = WithParams(spec, params);
      auto p = policy::CreatePolicy(full_spec);
      if (!p.ok()) return p.status();
      out.push_back({full_spec, k});
    }
  }
  return out;
}

absl::StatusOr<EvalResults> RunEval(const Workload& w, const std::vector<RunSpec>& runs,
                                    const EvalOptions& o) {
  if (absl::Status s = w.Validate(); !s.ok()) return s;
  if (o.page_tokens < 1 || o.map_bins < 1) {
    return absl::InvalidArgumentError(absl::StrCat("page_tokens=", o.page_tokens, " map_bins=",
                                                   o.map_bins, " must be positive"));
  }
  EvalResults res;
  res.model = w.model;
  res.num_layers = w.num_layers;
  res.num_kv_heads = w.num_kv_heads;
  res.num_q_heads = w.num_q_heads;
  res.head_dim = w.head_dim;
  res.prompt_len = w.prompt_len;
  res.decode_steps = w.decode_steps;
  res.query_rows = w.query_rows;
  for (Modality m : w.modalities) ++res.prompt_by_modality[static_cast<int>(m)];
  res.dtype = o.dtype;
  res.page_tokens = o.page_tokens;
  res.page_bytes = int64_t{o.page_tokens} * 2 * w.head_dim * DTypeSize(o.dtype);
  res.map_bins = std::max(1, std::min(o.map_bins, w.prompt_len));

  Accumulators acc;
  {
    auto p = Prefill(w, o);
    if (!p.ok()) return p.status();
    auto a = ComputeAccumulators(w, *p->cache, p->seq);
    if (!a.ok()) return a.status();
    acc = std::move(*a);
    // Warm-up (thread pool start, first-touch of kernel code), so the first timed run (the
    // reference) is not charged for it.
    const size_t qsize = static_cast<size_t>(w.num_q_heads) * w.head_dim;
    std::vector<float> out(qsize);
    const SequenceId batch[] = {p->seq};
    for (int rep = 0; rep < 2; ++rep) {
      for (int32_t l = 0; l < w.num_layers; ++l) {
        const std::span<const float> q(w.decode_queries[l].data(), qsize);
        if (absl::Status s = p->cache->DecodeAttention(batch, l, q, out); !s.ok()) return s;
      }
    }
  }
  const int64_t total = int64_t{w.decode_steps} * static_cast<int64_t>(runs.size() + 1);
  int64_t done = 0;
  Reference ref;
  if (absl::Status s = RunOne(w, o, acc, "full", res.full, done, total, &ref); !s.ok()) return s;
  ScoreFidelity(w, res.full, ref, false, res.full);
  for (const RunSpec& spec : runs) {
    RunResult r;
    r.keep = spec.keep;
    if (absl::Status s = RunOne(w, o, acc, spec.spec, r, done, total, nullptr); !s.ok()) return s;
    ScoreFidelity(w, res.full, ref, IsReadPolicy(Name(spec.spec)), r);
    r.outputs.clear();
    r.outputs.shrink_to_fit();
    res.runs.push_back(std::move(r));
  }
  res.full.keep = 1.0;
  return res;
}

}  // namespace kvcache::eval
