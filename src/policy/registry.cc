// Policy registry: "name:key=value,..." -> Policy.
#include "kvcache/policy/registry.h"

#include <cmath>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "kvcache/policy/image_select.h"
#include "kvcache/policy/prumerge.h"

namespace kvcache::policy {
namespace {

struct Param {
  std::string key;
  std::string default_value;
};

// The parsed key=value list of one policy, with typed, range-checked getters.
class Args {
 public:
  Args(std::string policy, std::map<std::string, std::string> values)
      : policy_(std::move(policy)), values_(std::move(values)) {}

  absl::StatusOr<double> Real(const std::string& key, double lo, double hi, bool lo_open = false,
                              bool hi_open = false) const {
    const std::string& text = values_.at(key);
    double v = 0.0;
    if (!absl::SimpleAtod(text, &v)) return Error(key, text, "is not a number");
    const bool ok = (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
    if (!ok) {
      return Error(key, text, absl::StrCat("is outside ", lo_open ? "(" : "[", lo, ", ", hi,
                                           hi_open ? ")" : "]"));
    }
    return v;
  }
  absl::StatusOr<int32_t> Int(const std::string& key, int32_t lo, int32_t hi) const {
    const std::string& text = values_.at(key);
    int32_t v = 0;
    if (!absl::SimpleAtoi(text, &v)) return Error(key, text, "is not an integer");
    if (v < lo || v > hi) return Error(key, text, absl::StrCat("is outside [", lo, ", ", hi, "]"));
    return v;
  }
  absl::StatusOr<uint64_t> U64(const std::string& key) const {
    const std::string& text = values_.at(key);
    uint64_t v = 0;
    if (!absl::SimpleAtoi(text, &v)) return Error(key, text, "is not a non-negative integer");
    return v;
  }
  absl::StatusOr<bool> Bool(const std::string& key) const {
    const std::string& text = values_.at(key);
    if (text == "1" || text == "true") return true;
    if (text == "0" || text == "false") return false;
    return Error(key, text, "is not a boolean (0, 1, true, false)");
  }
  absl::StatusOr<int> Choice(const std::string& key, const std::vector<std::string>& options) const {
    const std::string& text = values_.at(key);
    for (size_t i = 0; i < options.size(); ++i) {
      if (text == options[i]) return static_cast<int>(i);
    }
    return Error(key, text, absl::StrCat("is not one of ", absl::StrJoin(options, ", ")));
  }
  bool Has(const std::string& key) const { return values_.count(key) > 0; }
  const std::string& policy() const { return policy_; }

 private:
  absl::Status Error(const std::string& key, const std::string& text, std::string_view why) const {
    return absl::InvalidArgumentError(
        absl::StrCat(policy_, ": ", key, "='", text, "' ", std::string(why)));
  }
  std::string policy_;
  std::map<std::string, std::string> values_;
};

#define KVC_ASSIGN(lhs, expr)                      \
  do {                                             \
    auto kvc_value = (expr);                       \
    if (!kvc_value.ok()) return kvc_value.status(); \
    lhs = *kvc_value;                              \
  } while (0)

using Builder = std::function<absl::StatusOr<std::unique_ptr<Policy>>(const Args&)>;

struct Entry {
  std::string name;
  std::string summary;
  std::vector<Param> params;
  Builder build;
};

const std::vector<Param>& CommonTokenParams() {
  static const std::vector<Param> kParams = {
      {"merge", "none"},      {"think", "0"},         {"think_window", "32"},
      {"think_recent", "32"}, {"protect_text", "0"},  {"keep_text", "-1"},
      {"keep_image", "-1"},   {"keep_video", "-1"},   {"keep_audio", "-1"}};
  return kParams;
}

// Reads the keys every token policy shares, then builds it.
absl::StatusOr<std::unique_ptr<Policy>> BuildToken(const Args& a, TokenPolicyOptions o) {
  o.name = a.policy();
  int merge = 0;
  KVC_ASSIGN(merge, a.Choice("merge", {"none", "pivot", "average"}));
  o.merge = static_cast<MergeMode>(merge);
  double think = 0.0;
  KVC_ASSIGN(think, a.Real("think", 0.0, 1.0, false, true));
  o.think = think > 0.0;
  o.think_options.lambda = think;
  KVC_ASSIGN(o.think_options.window, a.Int("think_window", 1, 1 << 20));
  KVC_ASSIGN(o.think_options.recent, a.Int("think_recent", 0, 1 << 30));
  KVC_ASSIGN(o.protect_text, a.Bool("protect_text"));
  const char* kKeys[kNumModalities] = {"keep_text", "keep_image", "keep_video", "keep_audio"};
  for (int m = 0; m < kNumModalities; ++m) {
    double r = 0.0;
    KVC_ASSIGN(r, a.Real(kKeys[m], -1.0, 1.0));
    if (r < 0.0 && r != -1.0) {
      return absl::InvalidArgumentError(absl::StrCat(a.policy(), ": ", kKeys[m], "=", r,
                                                     " must be -1 (no cap) or in [0, 1]"));
    }
    o.modality_keep[m] = static_cast<float>(r);
  }
  if (a.Has("tokens")) KVC_ASSIGN(o.tokens, a.Int("tokens", 0, 1 << 30));
  return MakeTokenPolicy(o);
}

absl::Status ReadPooling(const Args& a, TokenPolicyOptions& o) {
  int pool = 0;
  KVC_ASSIGN(pool, a.Choice("pool", {"none", "avg", "max"}));
  o.pooling = static_cast<Pooling>(pool);
  KVC_ASSIGN(o.pool_kernel, a.Int("kernel", 1, 1025));
  KVC_ASSIGN(o.window, a.Int("window", 1, 1 << 20));
  return absl::OkStatus();
}

std::vector<Param> With(std::vector<Param> own, bool token = true) {
  if (token) {
    for (const Param& p : CommonTokenParams()) own.push_back(p);
  }
  return own;
}

const std::vector<Entry>& Entries() {
  static const std::vector<Entry> kEntries = [] {
    std::vector<Entry> e;
    e.push_back({"full", "keep everything (baseline; empty plan)", {},
                 [](const Args& a) {
                   TokenPolicyOptions o;
                   o.name = a.policy();
                   o.layer_budget = LayerBudgetKind::kFull;
                   return MakeTokenPolicy(o);
                 }});
    e.push_back({"streamingllm", "attention sinks + most recent tokens",
                 With({{"keep", "0.1"}, {"tokens", "0"}, {"sinks", "4"}}),
                 [](const Args& a) -> absl::StatusOr<std::unique_ptr<Policy>> {
                   TokenPolicyOptions o;
                   o.score = TokenScore::kRecency;
                   KVC_ASSIGN(o.keep, a.Real("keep", 0.0, 1.0, true));
                   KVC_ASSIGN(o.sinks, a.Int("sinks", 0, 1 << 20));
                   return BuildToken(a, o);
                 }});
    e.push_back({"h2o", "heavy hitters by accumulated attention + recent window",
                 With({{"heavy", "0.1"}, {"recent", "0.1"}}),
                 [](const Args& a) -> absl::StatusOr<std::unique_ptr<Policy>> {
                   TokenPolicyOptions o;
                   o.layer_budget = LayerBudgetKind::kH2O;
                   o.score = TokenScore::kAccumulated;
                   KVC_ASSIGN(o.h2o_heavy, a.Real("heavy", 0.0, 1.0));
                   KVC_ASSIGN(o.h2o_recent, a.Real("recent", 0.0, 1.0));
                   return BuildToken(a, o);
                 }});
    e.push_back({"snapkv", "observation-window attention, pooled; window kept",
                 With({{"keep", "0.1"}, {"tokens", "0"}, {"window", "32"}, {"kernel", "5"},
                       {"pool", "avg"}}),
                 [](const Args& a) -> absl::StatusOr<std::unique_ptr<Policy>> {
                   TokenPolicyOptions o;
                   o.score = TokenScore::kWindow;
                   o.window_within_budget = true;
                   KVC_ASSIGN(o.keep, a.Real("keep", 0.0, 1.0, true));
                   if (absl::Status s = ReadPooling(a, o); !s.ok()) return s;
                   return BuildToken(a, o);
                 }});
    e.push_back({"pyramidkv", "SnapKV scores with PyramidKV layer budgets",
                 With({{"keep", "0.1"}, {"window", "32"}, {"kernel", "5"}, {"pool", "avg"},
                       {"beta", "20"}}),
                 [](const Args& a) -> absl::StatusOr<std::unique_ptr<Policy>> {
                   TokenPolicyOptions o;
                   o.layer_budget = LayerBudgetKind::kPyramid;
                   o.score = TokenScore::kWindow;
                   KVC_ASSIGN(o.keep, a.Real("keep", 0.0, 1.0, true));
                   KVC_ASSIGN(o.pyramid_beta, a.Int("beta", 1, 1 << 20));
                   if (absl::Status s = ReadPooling(a, o); !s.ok()) return s;
                   return BuildToken(a, o);
                 }});
    e.push_back({"adakv", "SnapKV scores with AdaKV head-wise budgets",
                 With({{"keep", "0.1"}, {"tokens", "0"}, {"window", "32"}, {"kernel", "5"},
                       {"pool", "avg"}, {"floor", "0.2"}}),
                 [](const Args& a) -> absl::StatusOr<std::unique_ptr<Policy>> {
                   TokenPolicyOptions o;
                   o.head_budget = HeadBudgetKind::kAdaKv;
                   o.score = TokenScore::kWindow;
                   o.window_within_budget = true;
                   KVC_ASSIGN(o.keep, a.Real("keep", 0.0, 1.0, true));
                   KVC_ASSIGN(o.adakv_floor, a.Real("floor", 0.0, 1.0));
                   if (absl::Status s = ReadPooling(a, o); !s.ok()) return s;
                   return BuildToken(a, o);
                 }});
    e.push_back({"tova", "last query row, one ranking per layer",
                 With({{"keep", "0.1"}, {"tokens", "0"}}),
                 [](const Args& a) -> absl::StatusOr<std::unique_ptr<Policy>> {
                   TokenPolicyOptions o;
                   o.score = TokenScore::kLastRow;
                   o.shared_ranking = true;
                   KVC_ASSIGN(o.keep, a.Real("keep", 0.0, 1.0, true));
                   return BuildToken(a, o);
                 }});
    e.push_back({"knorm", "keep the smallest-norm keys",
                 With({{"keep", "0.1"}, {"tokens", "0"}, {"sinks", "0"}, {"window", "0"}}),
                 [](const Args& a) -> absl::StatusOr<std::unique_ptr<Policy>> {
                   TokenPolicyOptions o;
                   o.score = TokenScore::kKeyNorm;
                   KVC_ASSIGN(o.keep, a.Real("keep", 0.0, 1.0, true));
                   KVC_ASSIGN(o.sinks, a.Int("sinks", 0, 1 << 20));
                   KVC_ASSIGN(o.window, a.Int("window", 0, 1 << 20));
                   return BuildToken(a, o);
                 }});
    e.push_back({"random", "seeded uniform scores (baseline)",
                 With({{"keep", "0.1"}, {"tokens", "0"}, {"seed", "0"}}),
                 [](const Args& a) -> absl::StatusOr<std::unique_ptr<Policy>> {
                   TokenPolicyOptions o;
                   o.score = TokenScore::kRandom;
                   KVC_ASSIGN(o.keep, a.Real("keep", 0.0, 1.0, true));
                   KVC_ASSIGN(o.seed, a.U64("seed"));
                   return BuildToken(a, o);
                 }});
    e.push_back({"vlcache", "VL-Cache: sparsity-aware layer budgets + post-vision attention",
                 With({{"keep", "0.1"}, {"p", "0.01"}, {"recent", "0.1"}, {"renorm", "1"},
                       {"shared", "0"}}),
                 [](const Args& a) -> absl::StatusOr<std::unique_ptr<Policy>> {
                   TokenPolicyOptions o;
                   o.layer_budget = LayerBudgetKind::kVlCache;
                   o.score = TokenScore::kPostVision;
                   KVC_ASSIGN(o.keep, a.Real("keep", 0.0, 1.0, true));
                   double p = 0.0;
                   KVC_ASSIGN(p, a.Real("p", 0.0, 1.0));
                   o.sparsity_threshold = static_cast<float>(p);
                   KVC_ASSIGN(o.recent_fraction, a.Real("recent", 0.0, 1.0));
                   KVC_ASSIGN(o.renormalize, a.Bool("renorm"));
                   KVC_ASSIGN(o.shared_ranking, a.Bool("shared"));
                   return BuildToken(a, o);
                 }});
    e.push_back({"fastv", "FastV: drop low-attention image tokens from layer K on",
                 {{"layer", "2"}, {"ratio", "0.5"}, {"keep", "0"}},
                 [](const Args& a) -> absl::StatusOr<std::unique_ptr<Policy>> {
                   FastVOptions o;
                   KVC_ASSIGN(o.layer, a.Int("layer", 1, 1 << 16));
                   KVC_ASSIGN(o.ratio, a.Real("ratio", 0.0, 1.0, false, true));
                   KVC_ASSIGN(o.keep, a.Real("keep", 0.0, 1.0));
                   return MakeFastVPolicy(o);
                 }});
    e.push_back({"prumerge", "LLaVA-PruMerge: IQR outlier image tokens + kNN merge",
                 {{"knn", "32"}, {"plus", "0"}, {"merge", "1"}, {"merge_keys", "0"},
                  {"scores", "attention"}},
                 [](const Args& a) -> absl::StatusOr<std::unique_ptr<Policy>> {
                   PruMergeOptions o;
                   KVC_ASSIGN(o.knn, a.Int("knn", 0, 1 << 20));
                   KVC_ASSIGN(o.plus, a.Bool("plus"));
                   KVC_ASSIGN(o.merge, a.Bool("merge"));
                   KVC_ASSIGN(o.merge_keys, a.Bool("merge_keys"));
                   int scores = 0;
                   KVC_ASSIGN(scores, a.Choice("scores", {"attention", "cls"}));
                   o.engine_scores = scores == 1;
                   return MakePruMergePolicy(o);
                 }});
    // The image-token baselines: keep is the share of the prompt KV (text kept, the image tokens
    // get the rest), ratio > 0 the share of each image's tokens (the papers' knob).
    auto image_select = [](auto make) {
      return [make](const Args& a) -> absl::StatusOr<std::unique_ptr<Policy>> {
        ImageSelectOptions o;
        KVC_ASSIGN(o.keep, a.Real("keep", 0.0, 1.0, true));
        KVC_ASSIGN(o.ratio, a.Real("ratio", 0.0, 1.0));
        return make(o);
      };
    };
    e.push_back({"downsample", "uniform stride of each image's tokens, text kept (baseline)",
                 {{"keep", "0.1"}, {"ratio", "0"}}, image_select(MakeDownsamplePolicy)});
    e.push_back({"divprune",
                 "DivPrune: max-min key-cosine diversity of each image's tokens per kv head, "
                 "text kept (baseline)",
                 {{"keep", "0.1"}, {"ratio", "0"}}, image_select(MakeDivPrunePolicy)});
    e.push_back({"think", "ThinK key-channel pruning (all tokens kept)",
                 {{"lambda", "0.4"}, {"window", "32"}, {"recent", "32"}},
                 [](const Args& a) -> absl::StatusOr<std::unique_ptr<Policy>> {
                   TokenPolicyOptions o;
                   o.name = a.policy();
                   o.layer_budget = LayerBudgetKind::kFull;
                   o.think = true;
                   KVC_ASSIGN(o.think_options.lambda, a.Real("lambda", 0.0, 1.0, false, true));
                   KVC_ASSIGN(o.think_options.window, a.Int("window", 1, 1 << 20));
                   KVC_ASSIGN(o.think_options.recent, a.Int("recent", 0, 1 << 30));
                   return MakeTokenPolicy(o);
                 }});
    return e;
  }();
  return kEntries;
}

std::string Known() {
  std::vector<std::string> names;
  for (const Entry& e : Entries()) names.push_back(e.name);
  return absl::StrJoin(names, ", ");
}

}  // namespace

absl::StatusOr<std::unique_ptr<Policy>> CreatePolicy(std::string_view spec) {
  const size_t colon = spec.find(':');
  if (colon == std::string_view::npos) return CreatePolicy(spec, "");
  return CreatePolicy(spec.substr(0, colon), spec.substr(colon + 1));
}

absl::StatusOr<std::unique_ptr<Policy>> CreatePolicy(std::string_view name,
                                                     std::string_view params) {
  const Entry* entry = nullptr;
  for (const Entry& e : Entries()) {
    if (e.name == name) entry = &e;
  }
  if (entry == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("unknown policy '", std::string(name),
                                                   "' (known: ", Known(), ")"));
  }
  std::map<std::string, std::string> values;
  for (const Param& p : entry->params) values[p.key] = p.default_value;
  std::map<std::string, bool> given;
  if (!params.empty()) {
    for (absl::string_view item :
         absl::StrSplit(absl::string_view(params.data(), params.size()), ',')) {
      const size_t eq = item.find('=');
      if (eq == absl::string_view::npos || eq == 0 || eq + 1 == item.size()) {
        return absl::InvalidArgumentError(absl::StrCat(entry->name, ": '", item,
                                                       "' is not key=value"));
      }
      const std::string key(item.substr(0, eq));
      if (values.count(key) == 0) {
        std::vector<std::string> keys;
        for (const Param& p : entry->params) keys.push_back(p.key);
        return absl::InvalidArgumentError(absl::StrCat(
            entry->name, ": unknown key '", key, "' (known: ",
            keys.empty() ? std::string("none") : absl::StrJoin(keys, ", "), ")"));
      }
      if (given[key]) {
        return absl::InvalidArgumentError(absl::StrCat(entry->name, ": key '", key,
                                                       "' given twice"));
      }
      given[key] = true;
      values[key] = std::string(item.substr(eq + 1));
    }
  }
  return entry->build(Args(entry->name, std::move(values)));
}

std::vector<PolicyInfo> ListPolicies() {
  std::vector<PolicyInfo> out;
  for (const Entry& e : Entries()) {
    std::vector<std::string> kv;
    for (const Param& p : e.params) kv.push_back(absl::StrCat(p.key, "=", p.default_value));
    out.push_back({e.name, e.summary, absl::StrJoin(kv, ",")});
  }
  return out;
}

}  // namespace kvcache::policy
