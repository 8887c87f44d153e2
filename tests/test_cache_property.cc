// Property test: thousands of random operation sequences (add, append, fork, apply with
// channels and merges, free, injected failures) against a simple in-memory model. After every
// step the cache's contents equal the model's and Validate() passes.
#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <random>

#include "kvcache/cache.h"
#include "test_util.h"

using namespace kvcache;
using kvcache::testing::RoundTo;

namespace {

struct ModelToken {
  int32_t position;
  Modality modality;
  float score;
  std::vector<float> key, value;  // [head_dim], pruned channels 0
};
using ModelStream = std::vector<ModelToken>;
struct ModelSequence {
  std::vector<ModelStream> streams;  // [layers * heads]
  std::vector<int32_t> last_position;
};

class PropertyRun {
 public:
  PropertyRun(uint32_t seed, DType dtype) : rng_(seed) {
    config_.num_layers = 2;
    config_.num_kv_heads = 2;
    config_.num_q_heads = 2;
    config_.head_dim = 16;  // 64-byte f16 rows: any page_tokens gives aligned pages
    config_.dtype = dtype;
    config_.page_tokens = 1 + static_cast<int32_t>(rng_() % 4);
    config_.num_pages = 24 + static_cast<int32_t>(rng_() % 24);
    cache_ = *Cache::Create(config_, "cpu");
  }

  void Step() {
    const int op = Uniform(0, 99);
    if (op < 10 || model_.empty()) {
      AddSequence();
    } else if (op < 55) {
      Append();
    } else if (op < 65) {
      Fork();
    } else if (op < 90) {
      Apply();
    } else if (op < 97) {
      Free();
    } else {
      InjectedFailure();
    }
    Check();
  }

  int exhausted() const { return exhausted_; }

 private:
  int Uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }
  SequenceId PickSequence() {
    auto it = model_.begin();
    std::advance(it, Uniform(0, static_cast<int>(model_.size()) - 1));
    return it->first;
  }
  int Streams() const { return config_.num_layers * config_.num_kv_heads; }

  void AddSequence() {
    SequenceId id = *cache_->AddSequence();
    model_[id] = ModelSequence{std::vector<ModelStream>(Streams()),
                               std::vector<int32_t>(config_.num_layers, -1)};
  }

  void Append() {
    const SequenceId id = PickSequence();
    ModelSequence& m = model_[id];
    const int layer = Uniform(0, config_.num_layers - 1);
    const int n = Uniform(1, Uniform(0, 9) == 0 ? 40 : 6);  // sometimes big enough to exhaust
    const int heads = config_.num_kv_heads, d = config_.head_dim;
    std::vector<float> k(size_t(n) * heads * d), v(k.size());
    for (float& x : k) x = static_cast<float>(Uniform(-100, 100)) / 16.0f;
    for (float& x : v) x = static_cast<float>(Uniform(-100, 100)) / 16.0f;
    std::vector<int32_t> pos(n);
    int32_t p = m.last_position[layer];
    for (int i = 0; i < n; ++i) pos[i] = p += Uniform(1, 3);
    std::vector<Modality> mod(n);
    for (auto& x : mod) x = static_cast<Modality>(Uniform(0, 3));
    std::vector<uint8_t> admit;
    if (Uniform(0, 3) == 0) {
      admit.resize(n);
      for (auto& a : admit) a = static_cast<uint8_t>(Uniform(0, 1));
    }
    absl::Status s = cache_->Append(id, layer, {TensorRef::Of(k), TensorRef::Of(v), pos, mod, admit});
    if (s.code() == absl::StatusCode::kResourceExhausted) {
      ++exhausted_;
      return;  // the model is unchanged, and Check() verifies the cache is too
    }
    REQUIRE(s.ok());
    m.last_position[layer] = pos.back();
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < n; ++i) {
        if (!admit.empty() && !admit[i]) continue;
        ModelToken t{pos[i], mod[i], 0.0f, std::vector<float>(d), std::vector<float>(d)};
        for (int c = 0; c < d; ++c) {
          t.key[c] = RoundTo(config_.dtype, k[(size_t(i) * heads + h) * d + c]);
          t.value[c] = RoundTo(config_.dtype, v[(size_t(i) * heads + h) * d + c]);
        }
        m.streams[layer * heads + h].push_back(std::move(t));
      }
    }
    // Occasionally give the tokens scores so that we can check they travel with compaction.
    if (Uniform(0, 2) == 0) {
      const int h = Uniform(0, heads - 1);
      ModelStream& st = m.streams[layer * heads + h];
      std::vector<float> delta(st.size());
      for (size_t i = 0; i < st.size(); ++i) delta[i] = static_cast<float>(Uniform(0, 8));
      REQUIRE(cache_->AddScores(id, layer, h, delta).ok());
      for (size_t i = 0; i < st.size(); ++i) st[i].score += delta[i];
    }
  }

  void Fork() {
    const SequenceId parent = PickSequence();
    SequenceId child = *cache_->Fork(parent);
    model_[child] = model_[parent];
  }

  void Apply() {
    const SequenceId id = PickSequence();
    ModelSequence& m = model_[id];
    const int d = config_.head_dim;
    EvictionPlan plan{.sequence = id};
    std::vector<int> chosen;
    for (int si = 0; si < Streams(); ++si) {
      if (Uniform(0, 1)) chosen.push_back(si);
    }
    std::vector<ModelStream> results;
    for (int si : chosen) {
      const ModelStream& st = m.streams[si];
      StreamPlan sp{.layer = si / config_.num_kv_heads, .kv_head = si % config_.num_kv_heads};
      for (int t = 0; t < static_cast<int>(st.size()); ++t) {
        if (Uniform(0, 2) != 0) sp.kept.push_back(t);
      }
      if (!sp.kept.empty() && Uniform(0, 2) == 0) {
        for (int c = 0; c < d; ++c) {
          if (Uniform(0, 1)) sp.key_channels.push_back(c);
        }
        if (sp.key_channels.empty()) sp.key_channels.push_back(Uniform(0, d - 1));
        sp.full_width_recent = Uniform(0, static_cast<int>(sp.kept.size()));
      }
      if (!sp.kept.empty() && !st.empty() && Uniform(0, 2) == 0) {
        for (int i = 0; i < 3; ++i) {
          sp.merges.push_back({Uniform(0, static_cast<int>(sp.kept.size()) - 1),
                               Uniform(0, static_cast<int>(st.size()) - 1),
                               static_cast<float>(Uniform(0, 4)) / 4.0f,
                               static_cast<float>(Uniform(0, 4)) / 4.0f});
        }
        sp.kept_value_weight.assign(sp.kept.size(), 0.5f);
      }
      // The model's result, computed the way the plan's semantics say.
      ModelStream out;
      const bool prune = !sp.key_channels.empty() && static_cast<int>(sp.key_channels.size()) < d;
      const int pruned_count = prune ? static_cast<int>(sp.kept.size()) - sp.full_width_recent : 0;
      for (size_t slot = 0; slot < sp.kept.size(); ++slot) {
        ModelToken t = st[sp.kept[slot]];
        const float kw = 1.0f;
        const float vw = sp.kept_value_weight.empty() ? 1.0f : sp.kept_value_weight[slot];
        for (int c = 0; c < d; ++c) t.key[c] = 0.0f + kw * st[sp.kept[slot]].key[c];
        for (int c = 0; c < d; ++c) t.value[c] = 0.0f + vw * st[sp.kept[slot]].value[c];
        for (const MergeTerm& mt : sp.merges) {
          if (mt.kept_slot != static_cast<int>(slot)) continue;
          for (int c = 0; c < d; ++c) t.key[c] += mt.key_weight * st[mt.source].key[c];
          for (int c = 0; c < d; ++c) t.value[c] += mt.value_weight * st[mt.source].value[c];
        }
        for (int c = 0; c < d; ++c) {
          t.key[c] = RoundTo(config_.dtype, t.key[c]);
          t.value[c] = RoundTo(config_.dtype, t.value[c]);
        }
        if (static_cast<int>(slot) < pruned_count) {
          for (int c = 0; c < d; ++c) {
            if (!std::binary_search(sp.key_channels.begin(), sp.key_channels.end(), c)) {
              t.key[c] = 0.0f;
            }
          }
        }
        out.push_back(std::move(t));
      }
      results.push_back(std::move(out));
      plan.streams.push_back(std::move(sp));
    }
    absl::Status s = cache_->Apply(plan);
    if (s.code() == absl::StatusCode::kResourceExhausted) {
      ++exhausted_;
      return;
    }
    REQUIRE(s.ok());
    for (size_t i = 0; i < chosen.size(); ++i) m.streams[chosen[i]] = std::move(results[i]);
  }

  void Free() {
    const SequenceId id = PickSequence();
    REQUIRE(cache_->Free(id).ok());
    model_.erase(id);
  }

  void InjectedFailure() {
    cache_->pool().FailAllocationAfter(1);
    Append();  // if it allocated, it failed and changed nothing; if it needed no page, it worked
    cache_->pool().FailAllocationAfter(0);
  }

  void Check() {
    REQUIRE(cache_->Validate().ok());
    REQUIRE(cache_->Sequences().size() == model_.size());
    for (const auto& [id, m] : model_) {
      for (int si = 0; si < Streams(); ++si) {
        const ModelStream& st = m.streams[si];
        StreamContents sc =
            *cache_->ReadStream(id, si / config_.num_kv_heads, si % config_.num_kv_heads);
        REQUIRE(sc.length == static_cast<int32_t>(st.size()));
        for (size_t t = 0; t < st.size(); ++t) {
          REQUIRE(sc.positions[t] == st[t].position);
          REQUIRE(sc.modalities[t] == st[t].modality);
          REQUIRE(sc.scores[t] == st[t].score);
          for (int c = 0; c < config_.head_dim; ++c) {
            REQUIRE(sc.keys[t * config_.head_dim + c] == Approx(st[t].key[c]).margin(1e-2));
            REQUIRE(sc.values[t * config_.head_dim + c] == Approx(st[t].value[c]).margin(1e-2));
          }
        }
      }
    }
  }

  std::mt19937 rng_;
  CacheConfig config_;
  std::unique_ptr<Cache> cache_;
  std::map<SequenceId, ModelSequence> model_;
  int exhausted_ = 0;
};

}  // namespace

TEST_CASE("random operation sequences match the model and keep every invariant",
          "[cache][property]") {
  int exhausted = 0;
  const int kRuns = 1500;
  for (int run = 0; run < kRuns; ++run) {
    const DType dtype = static_cast<DType>(run % 3);
    PropertyRun p(static_cast<uint32_t>(run) * 7919u + 1u, dtype);
    for (int step = 0; step < 25; ++step) p.Step();
    exhausted += p.exhausted();
  }
  // The workload is sized to run into the pool limit: make sure that path was exercised.
  REQUIRE(exhausted > 100);
}
