// Fuzz target: operation sequences on the C++ Cache API against a reference model.
//
// The input picks a cache shape (layers, heads, head_dim, dtype, page size, a deliberately small
// pool) and then a sequence of operations with fuzzed arguments: AddSequence, Append (token
// counts, position gaps, modalities, admit masks, source dtype, sometimes invalid positions),
// Fork, Free (also of unknown ids), ScoreRows (with and without accumulation), DecodeAttention
// (fuzzed batches, duplicates), Apply of fuzzed plans (kept subsets, key channels, merges,
// weights; sometimes deliberately invalid), policy planning + Apply, and armed faults (the next
// page allocation or backend call fails, FaultInjectingBackend).
//
// The model holds, per sequence and stream, the positions, modalities and stored key widths of
// every token, and the last appended position per layer. After every step: Validate() holds,
// the sequence set equals the model's, every stream reads back exactly the model (lengths,
// positions, modalities, key widths) and Stats().tokens_stored equals the model's total. An
// operation the model considers valid may only succeed or fail with ResourceExhausted (pool full
// / injected) or Unavailable (injected backend fault), and a failure must leave the model state
// (checked) unchanged; an invalid one must fail. At the end every sequence is freed and the pool
// must be entirely free (no leaked page).
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "kvcache/cache.h"
#include "kvcache/policy/registry.h"
#include "kvcache/policy/snapshot.h"
#include "kvcache/testing/fault_injection.h"

namespace {

using namespace kvcache;
using kvcache::testing::FaultInjectingBackend;

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_cache_ops: %s\n", what.c_str());
  std::abort();
}
void Expect(bool ok, const std::string& what) {
  if (!ok) Fail(what);
}

struct ModelToken {
  int32_t position;
  Modality modality;
  int32_t key_width;
};
struct ModelSequence {
  std::vector<std::vector<ModelToken>> streams;  // [layers * kv_heads]
  std::vector<int32_t> last_position;            // [layers]
};

class Harness {
 public:
  explicit Harness(FuzzedDataProvider& in) : in_(in) {
    c_.num_layers = in_.ConsumeIntegralInRange(1, 3);
    c_.num_kv_heads = in_.ConsumeIntegralInRange(1, 2);
    c_.num_q_heads = c_.num_kv_heads * in_.ConsumeIntegralInRange(1, 2);
    c_.head_dim = 4 << in_.ConsumeIntegralInRange(0, 2);  // 4, 8, 16
    c_.dtype = static_cast<DType>(in_.ConsumeIntegralInRange(0, 2));
    // Pages must be a multiple of 64 bytes: page_tokens is a multiple of the smallest count that
    // makes whole 64-byte units for this row size.
    const int row_bytes = 2 * c_.head_dim * DTypeSize(c_.dtype);
    const int unit = 64 / std::gcd(64, row_bytes);
    c_.page_tokens = unit * in_.ConsumeIntegralInRange(1, std::max(1, 8 / unit));
    c_.num_pages = in_.ConsumeIntegralInRange(4, 96);
    const bool reference = in_.ConsumeBool();
    auto inner = CreateBackend(reference ? "cpu-reference" : "cpu");
    Expect(inner.ok(), "backend");
    auto faulty = std::make_unique<FaultInjectingBackend>(*std::move(inner));
    hook_ = faulty.get();
    auto cache = Cache::Create(c_, std::move(faulty));
    Expect(cache.ok(), "Create: " + cache.status().ToString());
    cache_ = *std::move(cache);
  }

  void Run() {
    for (int step = 0; step < 48 && in_.remaining_bytes() > 0; ++step) {
      switch (in_.ConsumeIntegralInRange(0, 10)) {
        case 0: AddSequence(); break;
        case 1: case 2: Append(); break;
        case 3: Fork(); break;
        case 4: Free(); break;
        case 5: Score(); break;
        case 6: Decode(); break;
        case 7: ApplyFuzzedPlan(); break;
        case 8: ApplyPolicy(); break;
        case 9: ArmPoolFault(); break;
        case 10: ArmBackendFault(); break;
      }
      Check();
    }
    cache_->pool().FailAllocationAfter(0);
    hook_->Disarm();
    for (const auto& [id, m] : model_) Expect(cache_->Free(id).ok(), "final free");
    model_.clear();
    Check();
    Expect(cache_->pool().NumFree() == c_.num_pages, "pages leaked after freeing everything");
  }

 private:
  int Streams() const { return c_.num_layers * c_.num_kv_heads; }

  // A live sequence id, or occasionally an id that is not (never issued or freed).
  SequenceId PickSequence(bool* live) {
    if (model_.empty() || in_.ConsumeIntegralInRange(0, 15) == 0) {
      *live = false;
      return in_.ConsumeBool() ? 0 : static_cast<SequenceId>(1000 + in_.ConsumeIntegral<uint8_t>());
    }
    auto it = model_.begin();
    std::advance(it, in_.ConsumeIntegralInRange<size_t>(0, model_.size() - 1));
    *live = true;
    return it->first;
  }

  // A failure of an operation the model considers valid: only resource or injected faults.
  void ExpectTolerable(const absl::Status& s, const char* op) {
    if (s.ok()) return;
    const bool tolerated = s.code() == absl::StatusCode::kResourceExhausted ||
                           (s.code() == absl::StatusCode::kUnavailable && backend_fault_armed_);
    Expect(tolerated, std::string(op) + " of a valid request failed: " + s.ToString());
  }

  void AddSequence() {
    if (model_.size() >= 8) return;
    auto id = cache_->AddSequence();
    Expect(id.ok(), "AddSequence");
    ModelSequence m;
    m.streams.resize(Streams());
    m.last_position.assign(c_.num_layers, -1);
    model_[*id] = std::move(m);
  }

  void Append() {
    bool live = false;
    const SequenceId id = PickSequence(&live);
    const int32_t layer = in_.ConsumeIntegralInRange(0, c_.num_layers - 1);
    const int n = in_.ConsumeIntegralInRange(0, 24);
    const int last = live ? model_[id].last_position[layer] : -1;
    // Mostly valid positions; sometimes one that does not exceed the previous one.
    const bool bad_positions = in_.ConsumeIntegralInRange(0, 15) == 0;
    int32_t p = bad_positions ? std::max(0, last) : last + 1 + in_.ConsumeIntegralInRange(0, 3);
    std::vector<int32_t> pos(n);
    std::vector<Modality> mod(n);
    std::vector<uint8_t> admit;
    const bool with_admit = in_.ConsumeIntegralInRange(0, 3) == 0;
    for (int i = 0; i < n; ++i) {
      pos[i] = p;
      p += 1 + in_.ConsumeIntegralInRange(0, 2);
      mod[i] = static_cast<Modality>(in_.ConsumeIntegralInRange(0, kNumModalities - 1));
      if (with_admit) admit.push_back(in_.ConsumeBool() ? 1 : 0);
    }
    const DType src = static_cast<DType>(in_.ConsumeIntegralInRange(0, 2));
    const size_t elems = size_t(n) * c_.num_kv_heads * c_.head_dim;
    std::vector<float> kf(elems), vf(elems);
    for (size_t i = 0; i < elems; ++i) {
      kf[i] = static_cast<float>(static_cast<int>(i % 7) - 3) * 0.25f;
      vf[i] = static_cast<float>(static_cast<int>(i % 5) - 2) * 0.5f;
    }
    std::vector<uint16_t> kh(elems), vh(elems);
    AppendRequest req;
    if (src == DType::kF32) {
      req.keys = TensorRef::Of(kf);
      req.values = TensorRef::Of(vf);
    } else {
      for (size_t i = 0; i < elems; ++i) {
        kh[i] = src == DType::kF16 ? FloatToHalfBits(kf[i]) : FloatToBF16Bits(kf[i]);
        vh[i] = src == DType::kF16 ? FloatToHalfBits(vf[i]) : FloatToBF16Bits(vf[i]);
      }
      req.keys = TensorRef::Of(kh, src);
      req.values = TensorRef::Of(vh, src);
    }
    req.positions = pos;
    req.modalities = mod;
    req.admit = admit;
    const absl::Status s = cache_->Append(id, layer, req);
    const bool valid = live && n > 0 && !(bad_positions && pos[0] <= last);
    if (!valid) {
      Expect(!s.ok(), "an invalid Append succeeded");
      return;
    }
    ExpectTolerable(s, "Append");
    if (!s.ok()) return;
    ModelSequence& m = model_[id];
    for (int h = 0; h < c_.num_kv_heads; ++h) {
      auto& st = m.streams[layer * c_.num_kv_heads + h];
      for (int i = 0; i < n; ++i) {
        if (admit.empty() || admit[i]) st.push_back({pos[i], mod[i], c_.head_dim});
      }
    }
    m.last_position[layer] = pos[n - 1];
  }

  void Fork() {
    bool live = false;
    const SequenceId id = PickSequence(&live);
    if (live && model_.size() >= 8) return;
    auto child = cache_->Fork(id);
    if (!live) {
      Expect(child.status().code() == absl::StatusCode::kNotFound, "Fork of an unknown id");
      return;
    }
    Expect(child.ok(), "Fork failed: " + child.status().ToString());
    model_[*child] = model_[id];
  }

  void Free() {
    bool live = false;
    const SequenceId id = PickSequence(&live);
    const absl::Status s = cache_->Free(id);
    if (!live) {
      Expect(s.code() == absl::StatusCode::kNotFound, "Free of an unknown id");
      return;
    }
    Expect(s.ok(), "Free failed");
    model_.erase(id);
  }

  std::vector<float> Queries(int rows) {
    std::vector<float> q(size_t(rows) * c_.num_q_heads * c_.head_dim);
    const float scale = static_cast<float>(in_.ConsumeIntegralInRange(0, 8));
    for (size_t i = 0; i < q.size(); ++i) q[i] = scale * std::sin(static_cast<float>(i));
    return q;
  }

  void Score() {
    bool live = false;
    const SequenceId id = PickSequence(&live);
    const int32_t layer = in_.ConsumeIntegralInRange(0, c_.num_layers - 1);
    const int rows = in_.ConsumeIntegralInRange(1, 4);
    std::vector<float> q = Queries(rows);
    std::vector<int32_t> pos(rows);
    for (int r = 0; r < rows; ++r) pos[r] = in_.ConsumeIntegralInRange(0, 200);
    ScoreRequest req;
    req.queries = q;
    req.positions = pos;
    req.accumulate = in_.ConsumeBool();
    req.aggregation = static_cast<GqaAggregation>(in_.ConsumeIntegralInRange(0, 2));
    auto res = cache_->ScoreRows(id, layer, req);
    if (!live) {
      Expect(!res.ok(), "ScoreRows of an unknown id");
      return;
    }
    ExpectTolerable(res.status(), "ScoreRows");
    if (!res.ok()) return;
    const ModelSequence& m = model_[id];
    for (int h = 0; h < c_.num_kv_heads; ++h) {
      const auto& st = m.streams[layer * c_.num_kv_heads + h];
      Expect(res->token_scores[h].size() == st.size(), "ScoreRows result size");
      // Each row spreads probability <= 1 per q head (max aggregation <= 1, sum <= G).
      const float bound = static_cast<float>(rows) * c_.group_size() * 1.001f + 1e-3f;
      for (float x : res->token_scores[h]) {
        Expect(std::isfinite(x) && x >= 0.0f && x <= bound, "ScoreRows score out of range");
      }
    }
  }

  void Decode() {
    std::vector<SequenceId> batch;
    bool all_live = true;
    const int b = in_.ConsumeIntegralInRange(1, 4);
    for (int i = 0; i < b; ++i) {
      bool live = false;
      batch.push_back(PickSequence(&live));
      all_live = all_live && live;
    }
    std::vector<SequenceId> sorted = batch;
    std::sort(sorted.begin(), sorted.end());
    const bool dup = std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end();
    const int32_t layer = in_.ConsumeIntegralInRange(0, c_.num_layers - 1);
    std::vector<float> q = Queries(b);
    std::vector<float> out(q.size(), -1.0f), lse(size_t(b) * c_.num_q_heads);
    DecodeOptions o;
    o.accumulate_scores = in_.ConsumeBool();
    const absl::Status s = cache_->DecodeAttention(batch, layer, q, out, lse, o);
    if (!all_live || dup) {
      Expect(!s.ok(), "DecodeAttention with an unknown or duplicate id succeeded");
      return;
    }
    ExpectTolerable(s, "DecodeAttention");
    if (!s.ok()) return;
    for (float x : out) Expect(std::isfinite(x), "DecodeAttention output not finite");
  }

  // Applies `plan` to the model (same semantics as Cache::Apply for positions and widths).
  void ApplyToModel(const EvictionPlan& plan) {
    ModelSequence& m = model_[plan.sequence];
    const int d = c_.head_dim;
    for (const StreamPlan& sp : plan.streams) {
      auto& st = m.streams[sp.layer * c_.num_kv_heads + sp.kv_head];
      const auto ones = [](const std::vector<float>& w) {
        return std::all_of(w.begin(), w.end(), [](float x) { return x == 1.0f; });
      };
      const bool identity = sp.kept.size() == st.size() && sp.merges.empty() &&
                            (sp.key_channels.empty() || int(sp.key_channels.size()) == d) &&
                            ones(sp.kept_key_weight) && ones(sp.kept_value_weight);
      if (identity) continue;
      const int kept = static_cast<int>(sp.kept.size());
      const bool prune = !sp.key_channels.empty() && int(sp.key_channels.size()) < d;
      const int pruned = prune ? kept - sp.full_width_recent : 0;
      std::vector<ModelToken> next;
      for (int i = 0; i < kept; ++i) {
        ModelToken t = st[sp.kept[i]];
        t.key_width = i < pruned ? static_cast<int32_t>(sp.key_channels.size()) : d;
        next.push_back(t);
      }
      st = std::move(next);
    }
  }

  void ApplyFuzzedPlan() {
    bool live = false;
    const SequenceId id = PickSequence(&live);
    EvictionPlan plan{.sequence = id};
    const int d = c_.head_dim;
    bool valid = live;
    std::vector<uint8_t> used(Streams(), 0);
    const int count = in_.ConsumeIntegralInRange(0, Streams());
    for (int k = 0; k < count; ++k) {
      StreamPlan sp;
      sp.layer = in_.ConsumeIntegralInRange(0, c_.num_layers - 1);
      sp.kv_head = in_.ConsumeIntegralInRange(0, c_.num_kv_heads - 1);
      const int index = sp.layer * c_.num_kv_heads + sp.kv_head;
      if (used[index]) continue;  // a duplicate stream is tested below, deliberately
      used[index] = 1;
      const int len = live ? static_cast<int>(model_[id].streams[index].size()) : 0;
      for (int j = 0; j < len; ++j) {
        if (in_.ConsumeBool()) sp.kept.push_back(j);
      }
      if (in_.ConsumeIntegralInRange(0, 2) == 0) {
        for (int ch = 0; ch < d; ++ch) {
          if (in_.ConsumeBool()) sp.key_channels.push_back(ch);
        }
        sp.full_width_recent =
            in_.ConsumeIntegralInRange(0, static_cast<int>(sp.kept.size()));
      }
      if (!sp.kept.empty() && in_.ConsumeIntegralInRange(0, 2) == 0) {
        const int merges = in_.ConsumeIntegralInRange(1, 4);
        for (int t = 0; t < merges && len > 0; ++t) {
          sp.merges.push_back({in_.ConsumeIntegralInRange(0, int(sp.kept.size()) - 1),
                               in_.ConsumeIntegralInRange(0, len - 1), 0.5f, 0.25f});
        }
      }
      if (!sp.kept.empty() && in_.ConsumeIntegralInRange(0, 3) == 0) {
        sp.kept_value_weight.assign(sp.kept.size(), 0.75f);
      }
      plan.streams.push_back(std::move(sp));
    }
    // Sometimes break the plan in one known way; Apply must then refuse it.
    if (!plan.streams.empty() && in_.ConsumeIntegralInRange(0, 7) == 0) {
      StreamPlan& sp = plan.streams[0];
      switch (in_.ConsumeIntegralInRange(0, 4)) {
        case 0: sp.kept.push_back(1 << 20); break;                  // out of range
        case 1: sp.key_channels = {d}; break;                       // channel out of range
        case 2: sp.full_width_recent = int(sp.kept.size()) + 1; break;
        case 3: sp.merges.push_back({int(sp.kept.size()), 0, 1.0f, 1.0f}); break;
        case 4: plan.streams.push_back(plan.streams[0]); break;     // stream named twice
      }
      valid = false;
    }
    const absl::Status s = cache_->Apply(plan);
    if (!valid) {
      Expect(!s.ok(), "an invalid plan was applied");
      return;
    }
    ExpectTolerable(s, "Apply");
    if (s.ok()) ApplyToModel(plan);
  }

  void ApplyPolicy() {
    static const char* const kSpecs[] = {
        "snapkv:keep=0.5,window=2",  "h2o",          "tova:keep=0.4",
        "knorm:keep=0.5",            "random:keep=0.3,seed=1",
        "streamingllm:keep=0.5",     "vlcache:keep=0.5",
        "fastv:layer=1",             "prumerge:knn=2,plus=1",
        "think:lambda=0.5,window=2,recent=1", "h2o:merge=pivot",
        "pyramidkv:keep=0.5,window=2", "adakv:keep=0.6,window=2"};
    bool live = false;
    const SequenceId id = PickSequence(&live);
    const char* spec = kSpecs[in_.ConsumeIntegralInRange<size_t>(0, std::size(kSpecs) - 1)];
    auto policy = policy::CreatePolicy(spec);
    Expect(policy.ok(), std::string("CreatePolicy ") + spec);
    const int rows = in_.ConsumeIntegralInRange(1, 4);
    std::vector<std::vector<float>> q(c_.num_layers);
    std::vector<int32_t> pos(rows);
    int32_t top = 0;
    if (live) {
      for (int32_t v : model_[id].last_position) top = std::max(top, v);
    }
    for (int r = 0; r < rows; ++r) pos[r] = top - rows + 1 + r + in_.ConsumeIntegralInRange(0, 1) * rows;
    std::sort(pos.begin(), pos.end());
    pos.erase(std::unique(pos.begin(), pos.end()), pos.end());
    policy::Observations obs;
    for (int l = 0; l < c_.num_layers; ++l) {
      q[l] = Queries(static_cast<int>(pos.size()));
      obs.layers.push_back({.queries = q[l], .positions = pos});
    }
    auto snap = policy::CollectSnapshot(*cache_, id, obs, (*policy)->Needs());
    if (!snap.ok()) {
      Expect(!live || snap.status().code() != absl::StatusCode::kNotFound,
             "CollectSnapshot lost a live sequence");
      return;
    }
    Expect(live, "CollectSnapshot of an unknown id succeeded");
    auto plan = (*policy)->Plan(*snap);
    if (!plan.ok()) return;  // e.g. budget below the window: a clean error
    const absl::Status s = cache_->Apply(*plan);
    Expect(s.ok() || s.code() == absl::StatusCode::kResourceExhausted ||
               (s.code() == absl::StatusCode::kUnavailable && backend_fault_armed_),
           std::string("Apply of a ") + spec + " plan: " + s.ToString());
    if (s.ok()) ApplyToModel(*plan);
  }

  void ArmPoolFault() { cache_->pool().FailAllocationAfter(in_.ConsumeIntegralInRange(0, 3)); }

  void ArmBackendFault() {
    backend_fault_armed_ = true;
    const auto mode = in_.ConsumeBool() ? testing::FailureMode::kBeforeCall
                                        : testing::FailureMode::kAfterCall;
    // kAfterCall on DecodeAttention may leave accumulated scores behind (documented backend
    // contract); scores are not part of this model, so every kind may be armed.
    hook_->FailCallAfter(in_.ConsumeIntegralInRange(1, 3),
                         in_.ConsumeIntegralInRange<uint32_t>(1, testing::kAllBackendCalls), mode);
  }

  void Check() {
    if (absl::Status v = cache_->Validate(); !v.ok()) Fail("Validate: " + v.ToString());
    std::vector<SequenceId> ids = cache_->Sequences();
    Expect(ids.size() == model_.size(), "sequence count differs from the model");
    size_t i = 0;
    for (const auto& [id, m] : model_) {
      Expect(ids[i++] == id, "sequence ids differ from the model");
      for (int si = 0; si < Streams(); ++si) {
        auto sc = cache_->ReadStream(id, si / c_.num_kv_heads, si % c_.num_kv_heads,
                                     /*with_kv=*/false);
        Expect(sc.ok(), "ReadStream: " + sc.status().ToString());
        const auto& want = m.streams[si];
        Expect(sc->length == static_cast<int32_t>(want.size()), "stream length differs");
        for (size_t t = 0; t < want.size(); ++t) {
          Expect(sc->positions[t] == want[t].position, "position differs");
          Expect(sc->modalities[t] == want[t].modality, "modality differs");
          Expect(sc->key_width[t] == want[t].key_width, "key width differs");
        }
      }
    }
    int64_t tokens = 0;
    for (const auto& [id, m] : model_) {
      for (const auto& st : m.streams) tokens += static_cast<int64_t>(st.size());
    }
    Expect(cache_->Stats().tokens_stored == tokens, "Stats().tokens_stored differs from the model");
  }

  FuzzedDataProvider& in_;
  CacheConfig c_;
  FaultInjectingBackend* hook_ = nullptr;
  std::unique_ptr<Cache> cache_;
  std::map<SequenceId, ModelSequence> model_;
  bool backend_fault_armed_ = false;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  Harness h(in);
  h.Run();
  return 0;
}
