// Soak test (not run by ctest): millions of random operations on one Cache from many threads,
// with a thread running Validate() continuously and every worker checking its own sequences
// against a model. Exits 0 when every check held, 1 (with the first failure) otherwise.
//
// Each worker owns a few sequences and runs a random mix of Append (with admit masks, image
// tokens, f32/f16 sources), Fork (of its own or of ANOTHER worker's sequence: the child becomes
// its own), Apply of random compaction / channel-pruning / merge plans, policy plans
// (CollectSnapshot + Plan + Apply), ScoreRows (accumulating), DecodeAttention over batches that
// may include other workers' sequences, ReadStream of any sequence, and Free. The pool is sized
// so that it runs full: ResourceExhausted is expected and counted, never an error. Reads of
// another worker's sequence may see NotFound (it was freed meanwhile); nothing else may fail.
//
// Usage (from the build directory of the tests):
//   tests/kvcache_soak [--threads=4] [--ops=1000000] [--seconds=0] [--seed=1]
//                      [--pages=256] [--check_every=64]
//   --ops is the total over all workers; --seconds > 0 stops earlier when the time is up.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvcache/cache.h"
#include "kvcache/policy/registry.h"
#include "kvcache/policy/snapshot.h"

namespace {

using namespace kvcache;

struct Options {
  int threads = 4;
  int64_t ops = 1000000;
  double seconds = 0.0;
  uint32_t seed = 1;
  int32_t pages = 256;  // small enough that the pool runs full
  int check_every = 64;
};

bool Flag(const char* arg, const char* name, std::string* value) {
  const size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  *value = arg + n + 1;
  return true;
}

Options Parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string v;
    if (Flag(argv[i], "--threads", &v)) o.threads = std::max(1, std::atoi(v.c_str()));
    else if (Flag(argv[i], "--ops", &v)) o.ops = std::atoll(v.c_str());
    else if (Flag(argv[i], "--seconds", &v)) o.seconds = std::atof(v.c_str());
    else if (Flag(argv[i], "--seed", &v)) o.seed = static_cast<uint32_t>(std::atoll(v.c_str()));
    else if (Flag(argv[i], "--pages", &v)) o.pages = std::max(16, std::atoi(v.c_str()));
    else if (Flag(argv[i], "--check_every", &v)) o.check_every = std::max(1, std::atoi(v.c_str()));
    else {
      std::fprintf(stderr, "unknown argument %s\n", argv[i]);
      std::exit(2);
    }
  }
  return o;
}

std::atomic<bool> g_failed{false};
// Every append takes its positions from this one counter, so they exceed every position any
// sequence ever received, including a parent forked from another worker (whose last appended
// position the cache does not expose). Runs stop before it could overflow int32.
std::atomic<int64_t> g_next_position{0};
constexpr int64_t kPositionLimit = int64_t{2000000000};
std::mutex g_fail_mu;

void Failure(const std::string& what) {
  std::lock_guard<std::mutex> lock(g_fail_mu);
  if (!g_failed.exchange(true)) std::fprintf(stderr, "SOAK FAILURE: %s\n", what.c_str());
}

// Sequences published for other workers to read, fork and batch (they may be freed anytime).
std::mutex g_pub_mu;
std::vector<SequenceId> g_published;

SequenceId AnyPublished(std::mt19937& rng) {
  std::lock_guard<std::mutex> lock(g_pub_mu);
  if (g_published.empty()) return 0;
  return g_published[rng() % g_published.size()];
}
void Publish(SequenceId s) {
  std::lock_guard<std::mutex> lock(g_pub_mu);
  g_published.push_back(s);
}
void Unpublish(SequenceId s) {
  std::lock_guard<std::mutex> lock(g_pub_mu);
  g_published.erase(std::remove(g_published.begin(), g_published.end(), s), g_published.end());
}

enum Op { kAppend, kFork, kApply, kPolicy, kScore, kDecode, kRead, kFree, kNumOps };
const char* const kOpNames[kNumOps] = {"append", "fork", "apply", "policy", "score", "decode",
                                       "read", "free"};

struct Counters {
  std::atomic<int64_t> done[kNumOps] = {};
  std::atomic<int64_t> exhausted{0};
  std::atomic<int64_t> not_found{0};
  std::atomic<int64_t> plan_errors{0};
};

struct Model {
  std::vector<std::vector<int32_t>> positions;  // [streams] positions of each stream
};

class Worker {
 public:
  Worker(Cache& cache, Counters& counters, uint32_t seed, int check_every)
      : cache_(cache), c_(cache.config()), counters_(counters), rng_(seed),
        check_every_(check_every) {}

  void Run(std::atomic<int64_t>& budget, std::chrono::steady_clock::time_point deadline,
           bool timed) {
    int64_t done = 0;
    while (!g_failed.load(std::memory_order_relaxed)) {
      if (budget.fetch_sub(1, std::memory_order_relaxed) <= 0) break;
      if (g_next_position.load(std::memory_order_relaxed) > kPositionLimit) break;
      if (timed && (done & 255) == 0 && std::chrono::steady_clock::now() > deadline) break;
      if (own_.size() < 2) AddOwn();
      const int r = static_cast<int>(rng_() % 100);
      const Op op = r < 35 ? kAppend : r < 42 ? kFork : r < 50 ? kApply : r < 54 ? kPolicy
                  : r < 64 ? kScore : r < 76 ? kDecode : r < 92 ? kRead : kFree;
      switch (op) {
        case kAppend: Append(); break;
        case kFork: Fork(); break;
        case kApply: ApplyRandom(); break;
        case kPolicy: ApplyPolicy(); break;
        case kScore: Score(); break;
        case kDecode: Decode(); break;
        case kRead: Read(); break;
        case kFree: FreeOne(); break;
        default: break;
      }
      counters_.done[op].fetch_add(1, std::memory_order_relaxed);
      if (++done % check_every_ == 0) CheckOwn();
    }
    CheckOwn();
    for (auto& [id, m] : own_) {
      Unpublish(id);
      if (!cache_.Free(id).ok()) Failure("final Free");
    }
    own_.clear();
  }

 private:
  int Streams() const { return c_.num_layers * c_.num_kv_heads; }

  void AddOwn() {
    auto id = cache_.AddSequence();
    if (!id.ok()) return Failure("AddSequence");
    Model m;
    m.positions.resize(Streams());
    own_[*id] = std::move(m);
    Publish(*id);
  }

  std::map<SequenceId, Model>::iterator PickOwn() {
    auto it = own_.begin();
    std::advance(it, rng_() % own_.size());
    return it;
  }

  bool Tolerable(const absl::Status& s, const char* what, bool foreign = false) {
    if (s.ok()) return true;
    if (s.code() == absl::StatusCode::kResourceExhausted) {
      counters_.exhausted.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    if (foreign && s.code() == absl::StatusCode::kNotFound) {
      counters_.not_found.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    Failure(std::string(what) + ": " + s.ToString());
    return false;
  }

  void Append() {
    auto it = PickOwn();
    Model& m = it->second;
    const int layer = static_cast<int>(rng_() % c_.num_layers);
    const int n = 1 + static_cast<int>(rng_() % (rng_() % 8 == 0 ? 48 : 6));
    std::vector<int32_t> pos(n);
    std::vector<Modality> mod(n);
    std::vector<uint8_t> admit;
    const bool masked = rng_() % 8 == 0;
    int64_t p = g_next_position.fetch_add(2 * n, std::memory_order_relaxed);
    for (int i = 0; i < n; ++i) {
      pos[i] = static_cast<int32_t>(p);
      p += 1 + static_cast<int64_t>(rng_() % 2);
      mod[i] = rng_() % 3 == 0 ? Modality::kImage : Modality::kText;
      if (masked) admit.push_back(rng_() % 2);
    }
    std::normal_distribution<float> nd;
    const size_t elems = size_t(n) * c_.num_kv_heads * c_.head_dim;
    std::vector<float> k(elems), v(elems);
    for (float& x : k) x = nd(rng_);
    for (float& x : v) x = nd(rng_);
    std::vector<uint16_t> kh, vh;
    AppendRequest req{TensorRef::Of(k), TensorRef::Of(v), pos, mod, admit};
    if (rng_() % 4 == 0) {
      for (float x : k) kh.push_back(FloatToHalfBits(x));
      for (float x : v) vh.push_back(FloatToHalfBits(x));
      req.keys = TensorRef::Of(kh, DType::kF16);
      req.values = TensorRef::Of(vh, DType::kF16);
    }
    if (!Tolerable(cache_.Append(it->first, layer, req), "Append")) return;
    for (int h = 0; h < c_.num_kv_heads; ++h) {
      auto& st = m.positions[layer * c_.num_kv_heads + h];
      for (int i = 0; i < n; ++i) {
        if (admit.empty() || admit[i]) st.push_back(pos[i]);
      }
    }
  }

  void Fork() {
    if (own_.size() >= 6) return FreeOne();
    const bool foreign = rng_() % 2 == 0;
    const SequenceId parent = foreign ? AnyPublished(rng_) : PickOwn()->first;
    if (parent == 0) return;
    auto child = cache_.Fork(parent);
    if (!Tolerable(child.status(), "Fork", foreign)) return;
    // The child is ours alone: its contents now are its model.
    Model m;
    m.positions.resize(Streams());
    for (int si = 0; si < Streams(); ++si) {
      auto sc = cache_.ReadStream(*child, si / c_.num_kv_heads, si % c_.num_kv_heads, false);
      if (!sc.ok()) return Failure("ReadStream of a new child: " + sc.status().ToString());
      m.positions[si] = sc->positions;
    }
    own_[*child] = std::move(m);
    Publish(*child);
  }

  void ApplyRandom() {
    auto it = PickOwn();
    Model& m = it->second;
    EvictionPlan plan{.sequence = it->first};
    for (int si = 0; si < Streams(); ++si) {
      if (rng_() % 2) continue;
      StreamPlan sp{.layer = si / c_.num_kv_heads, .kv_head = si % c_.num_kv_heads};
      const int len = static_cast<int>(m.positions[si].size());
      for (int j = 0; j < len; ++j) {
        if (rng_() % 4 != 0) sp.kept.push_back(j);
      }
      if (rng_() % 4 == 0) {
        for (int ch = 0; ch < c_.head_dim; ch += 2) sp.key_channels.push_back(ch);
        sp.full_width_recent = std::min<int>(2, static_cast<int>(sp.kept.size()));
      }
      if (!sp.kept.empty() && len > 0 && rng_() % 4 == 0) {
        sp.merges.push_back({0, static_cast<int32_t>(rng_() % len), 0.5f, 0.5f});
      }
      plan.streams.push_back(std::move(sp));
    }
    if (!Tolerable(cache_.Apply(plan), "Apply")) return;
    Update(m, plan);
  }

  void Update(Model& m, const EvictionPlan& plan) {
    for (const StreamPlan& sp : plan.streams) {
      auto& st = m.positions[sp.layer * c_.num_kv_heads + sp.kv_head];
      std::vector<int32_t> next;
      for (int32_t j : sp.kept) next.push_back(st[j]);
      st = std::move(next);
    }
  }

  void ApplyPolicy() {
    static const char* const kSpecs[] = {"snapkv:keep=0.5,window=2", "h2o", "tova:keep=0.5",
                                         "knorm:keep=0.6", "streamingllm:keep=0.5",
                                         "think:lambda=0.5,window=2,recent=2",
                                         "h2o:merge=average", "vlcache:keep=0.6"};
    auto it = PickOwn();
    auto policy = policy::CreatePolicy(kSpecs[rng_() % std::size(kSpecs)]);
    if (!policy.ok()) return Failure("CreatePolicy");
    const int32_t top = static_cast<int32_t>(g_next_position.load(std::memory_order_relaxed));
    std::vector<int32_t> rows = {top + 1, top + 2};
    std::vector<std::vector<float>> q(c_.num_layers);
    policy::Observations obs;
    std::normal_distribution<float> nd;
    for (int l = 0; l < c_.num_layers; ++l) {
      q[l].resize(rows.size() * c_.num_q_heads * c_.head_dim);
      for (float& x : q[l]) x = nd(rng_);
      obs.layers.push_back({.queries = q[l], .positions = rows});
    }
    auto snap = policy::CollectSnapshot(cache_, it->first, obs, (*policy)->Needs());
    if (!Tolerable(snap.status(), "CollectSnapshot")) return;
    auto plan = (*policy)->Plan(*snap);
    if (!plan.ok()) {  // e.g. a budget below the window on a short sequence
      counters_.plan_errors.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    if (!Tolerable(cache_.Apply(*plan), "Apply(policy)")) return;
    Update(it->second, *plan);
  }

  void Score() {
    auto it = PickOwn();
    const int layer = static_cast<int>(rng_() % c_.num_layers);
    std::vector<float> q(size_t(2) * c_.num_q_heads * c_.head_dim);
    std::normal_distribution<float> nd;
    for (float& x : q) x = nd(rng_);
    const int32_t top = static_cast<int32_t>(g_next_position.load(std::memory_order_relaxed));
    std::vector<int32_t> pos = {top, top + 1};
    ScoreRequest req{.queries = q, .positions = pos, .accumulate = true};
    Tolerable(cache_.ScoreRows(it->first, layer, req).status(), "ScoreRows");
  }

  void Decode() {
    std::vector<SequenceId> batch = {PickOwn()->first};
    bool foreign = false;
    if (rng_() % 2 == 0) {
      const SequenceId other = AnyPublished(rng_);
      if (other != 0 && other != batch[0]) {
        batch.push_back(other);
        foreign = true;
      }
    }
    const int layer = static_cast<int>(rng_() % c_.num_layers);
    std::vector<float> q(batch.size() * c_.num_q_heads * c_.head_dim), out(q.size());
    std::normal_distribution<float> nd;
    for (float& x : q) x = nd(rng_);
    DecodeOptions o;
    o.accumulate_scores = rng_() % 2 == 0;
    Tolerable(cache_.DecodeAttention(batch, layer, q, out, {}, o), "DecodeAttention", foreign);
  }

  void Read() {
    const bool foreign = rng_() % 2 == 0;
    const SequenceId s = foreign ? AnyPublished(rng_) : PickOwn()->first;
    if (s == 0) return;
    auto sc = cache_.ReadStream(s, static_cast<int>(rng_() % c_.num_layers),
                                static_cast<int>(rng_() % c_.num_kv_heads), rng_() % 4 == 0);
    if (!Tolerable(sc.status(), "ReadStream", foreign)) return;
    for (size_t i = 1; i < sc->positions.size(); ++i) {
      if (sc->positions[i] <= sc->positions[i - 1]) Failure("ReadStream: positions not ascending");
    }
  }

  void FreeOne() {
    auto it = PickOwn();
    Unpublish(it->first);
    if (!cache_.Free(it->first).ok()) Failure("Free");
    own_.erase(it);
  }

  void CheckOwn() {
    for (const auto& [id, m] : own_) {
      for (int si = 0; si < Streams(); ++si) {
        auto sc = cache_.ReadStream(id, si / c_.num_kv_heads, si % c_.num_kv_heads, false);
        if (!sc.ok()) return Failure("ReadStream of an own sequence: " + sc.status().ToString());
        if (sc->positions != m.positions[si]) {
          return Failure("sequence " + std::to_string(id) + " stream " + std::to_string(si) +
                         " differs from the model");
        }
      }
    }
  }

  Cache& cache_;
  const CacheConfig& c_;
  Counters& counters_;
  std::mt19937 rng_;
  int check_every_;
  std::map<SequenceId, Model> own_;
};

}  // namespace

int main(int argc, char** argv) {
  const Options o = Parse(argc, argv);
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 16;
  c.dtype = DType::kF16;
  c.page_tokens = 8;
  c.num_pages = o.pages;
  auto cache = Cache::Create(c, "cpu");
  if (!cache.ok()) {
    std::fprintf(stderr, "Create: %s\n", cache.status().ToString().c_str());
    return 1;
  }
  std::printf("soak: threads=%d ops=%lld seconds=%g seed=%u pages=%d check_every=%d\n",
              o.threads, static_cast<long long>(o.ops), o.seconds, o.seed, o.pages,
              o.check_every);
  Counters counters;
  std::atomic<int64_t> budget{o.ops};
  std::atomic<bool> done{false};
  std::atomic<int64_t> validations{0};
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                    std::chrono::duration<double>(o.seconds));
  std::thread validator([&] {
    while (!done.load()) {
      if (absl::Status s = (*cache)->Validate(); !s.ok()) Failure("Validate: " + s.ToString());
      validations.fetch_add(1);
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  std::vector<std::thread> workers;
  for (int t = 0; t < o.threads; ++t) {
    workers.emplace_back([&, t] {
      Worker w(**cache, counters, o.seed * 1000003u + static_cast<uint32_t>(t), o.check_every);
      w.Run(budget, deadline, o.seconds > 0);
    });
  }
  for (auto& w : workers) w.join();
  done = true;
  validator.join();
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (absl::Status s = (*cache)->Validate(); !s.ok()) Failure("final Validate: " + s.ToString());
  if (!(*cache)->Sequences().empty()) Failure("sequences left after every worker freed its own");
  if ((*cache)->pool().NumFree() != c.num_pages) Failure("pages leaked");
  int64_t total = 0;
  for (int i = 0; i < kNumOps; ++i) total += counters.done[i].load();
  std::printf("soak: %lld operations in %.1f s (%.0f ops/s), %lld validations\n",
              static_cast<long long>(total), secs, total / std::max(secs, 1e-9),
              static_cast<long long>(validations.load()));
  for (int i = 0; i < kNumOps; ++i) {
    std::printf("  %-7s %lld\n", kOpNames[i], static_cast<long long>(counters.done[i].load()));
  }
  std::printf("  pool full (ResourceExhausted): %lld, foreign sequence gone (NotFound): %lld, "
              "plan errors: %lld\n",
              static_cast<long long>(counters.exhausted.load()),
              static_cast<long long>(counters.not_found.load()),
              static_cast<long long>(counters.plan_errors.load()));
  std::printf("soak: %s\n", g_failed.load() ? "FAILED" : "ok");
  return g_failed.load() ? 1 : 0;
}
