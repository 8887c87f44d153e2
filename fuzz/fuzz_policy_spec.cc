// Fuzz target: the policy registry's spec parser, and the policy it builds.
//
// Input: a policy spec string ("name:key=value,..."), as bytes. Properties checked:
// - CreatePolicy returns a policy or an InvalidArgument error with a message; it never crashes;
// - building the same spec twice gives the same Describe() (parsing is a pure function);
// - a policy that parses plans a real 2-layer image+text sequence without crashing: the plan is
//   ok or an error, and an ok plan applies to a fork of the sequence (Apply validates it again),
//   after which Cache::Validate() holds and freeing the fork returns every page it took.
// Once per process: every registered policy's documented defaults ("name:" + defaults) build
// the same policy as the bare name.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "kvcache/cache.h"
#include "kvcache/policy/registry.h"
#include "kvcache/policy/snapshot.h"

namespace {

namespace kp = kvcache::policy;

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_policy_spec: %s\n", what.c_str());
  std::abort();
}

struct Fixture {
  std::unique_ptr<kvcache::Cache> cache;
  kvcache::SequenceId seq = 0;
  std::vector<std::vector<float>> queries;
  std::vector<int32_t> rows;
  kp::Observations obs;
};

// 2 layers x 2 kv heads x 4 q heads, head_dim 8, 40 tokens (images at [6, 30)), 10 observation
// rows: small enough for thousands of plans per second.
Fixture& Shared() {
  static Fixture* f = [] {
    auto* fx = new Fixture;
    kvcache::CacheConfig c;
    c.num_layers = 2;
    c.num_kv_heads = 2;
    c.num_q_heads = 4;
    c.head_dim = 8;
    c.dtype = kvcache::DType::kF32;
    c.page_tokens = 4;
    c.num_pages = 256;
    auto cache = kvcache::Cache::Create(c, "cpu");
    if (!cache.ok()) Fail(cache.status().ToString());
    fx->cache = *std::move(cache);
    fx->seq = *fx->cache->AddSequence();
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    constexpr int kTokens = 40, kRows = 10;
    std::vector<int32_t> pos(kTokens);
    std::vector<kvcache::Modality> mod(kTokens, kvcache::Modality::kText);
    for (int i = 0; i < kTokens; ++i) {
      pos[i] = i;
      if (i >= 6 && i < 30) mod[i] = kvcache::Modality::kImage;
    }
    for (int l = 0; l < c.num_layers; ++l) {
      std::vector<float> k(kTokens * c.num_kv_heads * c.head_dim), v(k.size());
      for (float& x : k) x = nd(rng);
      for (float& x : v) x = nd(rng);
      if (!fx->cache->Append(fx->seq, l, {kvcache::TensorRef::Of(k), kvcache::TensorRef::Of(v), pos, mod})
               .ok()) {
        Fail("fixture append");
      }
    }
    for (int r = 0; r < kRows; ++r) fx->rows.push_back(kTokens - kRows + r);
    fx->queries.resize(c.num_layers);
    for (int l = 0; l < c.num_layers; ++l) {
      fx->queries[l].resize(kRows * c.num_q_heads * c.head_dim);
      for (float& x : fx->queries[l]) x = nd(rng);
      kvcache::ScoreRequest sr;
      sr.queries = fx->queries[l];
      sr.positions = fx->rows;
      sr.accumulate = true;
      if (!fx->cache->ScoreRows(fx->seq, l, sr).ok()) Fail("fixture score");
      fx->obs.layers.push_back({.queries = fx->queries[l], .positions = fx->rows});
    }
    // Once: the documented defaults of every policy parse and mean the bare name.
    for (const kp::PolicyInfo& info : kp::ListPolicies()) {
      auto bare = kp::CreatePolicy(info.name);
      auto full = kp::CreatePolicy(info.defaults.empty() ? info.name : info.name + ":" + info.defaults);
      if (!bare.ok() || !full.ok()) Fail("defaults of " + info.name + " do not parse");
      if ((*bare)->Describe() != (*full)->Describe()) {
        Fail("defaults of " + info.name + " differ: " + (*bare)->Describe() + " vs " +
             (*full)->Describe());
      }
    }
    return fx;
  }();
  return *f;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 512) return 0;  // specs are short; longer inputs only slow the search down
  Fixture& f = Shared();
  const std::string spec(reinterpret_cast<const char*>(data), size);
  auto policy = kp::CreatePolicy(spec);
  if (!policy.ok()) {
    if (policy.status().code() != absl::StatusCode::kInvalidArgument) {
      Fail("CreatePolicy(\"" + spec + "\") returned " + policy.status().ToString());
    }
    if (policy.status().message().empty()) Fail("empty error message for \"" + spec + "\"");
    return 0;
  }
  const std::string described = (*policy)->Describe();
  if (described.empty()) Fail("empty Describe() for \"" + spec + "\"");
  auto again = kp::CreatePolicy(spec);
  if (!again.ok() || (*again)->Describe() != described) Fail("CreatePolicy is not deterministic");

  auto snap = kp::CollectSnapshot(*f.cache, f.seq, f.obs, (*policy)->Needs());
  if (!snap.ok()) return 0;  // e.g. more window rows than observed: a clean error
  auto plan = (*policy)->Plan(*snap);
  if (!plan.ok()) {
    if (plan.status().message().empty()) Fail("empty Plan error for \"" + spec + "\"");
    return 0;
  }
  const int32_t free_before = f.cache->pool().NumFree();
  auto fork = f.cache->Fork(f.seq);
  if (!fork.ok()) Fail("fork: " + fork.status().ToString());
  plan->sequence = *fork;
  const absl::Status applied = f.cache->Apply(*plan);
  if (!applied.ok() && applied.code() != absl::StatusCode::kResourceExhausted) {
    Fail("a plan of \"" + spec + "\" was rejected by Apply: " + applied.ToString());
  }
  if (absl::Status v = f.cache->Validate(); !v.ok()) Fail("Validate after Apply: " + v.ToString());
  if (!f.cache->Free(*fork).ok()) Fail("free fork");
  if (f.cache->pool().NumFree() != free_before) Fail("pages leaked by Apply on a fork");
  return 0;
}
