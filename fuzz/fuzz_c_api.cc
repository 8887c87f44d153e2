// Fuzz target: the C API (include/kvcache/c_api.h) with fuzzed call sequences, arguments and
// handles, checked against a simple model.
//
// The input drives up to two caches at a time (fuzzed configs, some invalid, some with
// KVC_CONFIG_PAGE_SUMMARIES, backends "cpu" / "cpu-reference" / unknown) and a sequence of
// calls: sequence add/fork/free, append (fuzzed dtype, token count, positions, modalities, admit
// masks, layer), score rows (fuzzed token_scores capacity), dense and sparse decode (fuzzed read
// policies), policy plan / inspect / apply / destroy (fuzzed names and parameter strings,
// observations), compress, stream reads (fuzzed capacities), score deltas, page-table export,
// stats, config, validate. Handles are drawn from: live ones, destroyed ones, the other cache's,
// a plan passed as a cache (and the reverse), NULL and made-up values.
//
// Buffers: the C API cannot check buffer lengths, so every buffer passed is exactly as large as
// the contract in c_api.h requires for the counts passed; the values and counts are fuzzed.
//
// Properties: no crash or sanitizer report; every status is a kvc_status; every non-OK status
// comes with a non-empty kvc_last_error() and every OK with ""; misuse of handles fails; after
// every call kvc_cache_validate is OK on every live cache, the live sequence set and every
// per-stream length (kvc_stream_length) equal the model, and kvc_cache_stats agrees
// (sequences, tokens, pages). The model predicts lengths after appends (admit masks), forks,
// frees and the apply of a plan on an unchanged sequence (the plan's kept counts); after
// kvc_compress (whose per-stream result the model cannot predict) it checks tokens_before
// against the model and tokens_after against the read-back lengths, then takes those. At the end
// every plan and cache is destroyed; LeakSanitizer reports anything left.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "kvcache/c_api.h"

namespace {

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_c_api: %s (last error: '%s')\n", what.c_str(), kvc_last_error());
  std::abort();
}
void Expect(bool ok, const std::string& what) {
  if (!ok) Fail(what);
}

// FUZZ_C_API_VERBOSE=1 prints every call and its status (to pick seeds, to read a finding).
const bool g_verbose = std::getenv("FUZZ_C_API_VERBOSE") != nullptr;

// Every returned status: a kvc_status; a message exactly when it is not OK.
kvc_status Checked(kvc_status s, const char* call) {
  if (g_verbose) std::fprintf(stderr, "%s -> %s %s\n", call, kvc_status_name(s), kvc_last_error());
  Expect(s >= KVC_OK && s <= KVC_INTERNAL, std::string(call) + " returned an unknown status");
  Expect(s != KVC_INTERNAL, std::string(call) + " returned KVC_INTERNAL");
  const char* msg = kvc_last_error();
  Expect(msg != nullptr, std::string(call) + ": kvc_last_error() is NULL");
  if (s == KVC_OK) {
    Expect(msg[0] == '\0', std::string(call) + " succeeded but kvc_last_error() is not empty");
  } else {
    Expect(msg[0] != '\0', std::string(call) + " failed with " + kvc_status_name(s) +
                               " and an empty kvc_last_error()");
  }
  return s;
}
#define CALL(expr) Checked((expr), #expr)

int DTypeBytes(int32_t dtype) { return dtype == KVC_DTYPE_F32 ? 4 : 2; }

struct SeqModel {
  std::vector<int32_t> length;         // [layers * kv_heads]
  std::vector<int32_t> last_position;  // [layers], -1 = nothing appended
  uint64_t version = 0;                // bumped by every change of lengths
};

struct CacheState {
  kvc_cache* handle = nullptr;
  kvc_config cfg{};
  std::map<kvc_seq, SeqModel> seqs;
  uint64_t next_version = 1;
};

struct PlanState {
  kvc_plan* handle = nullptr;
  kvc_cache* cache = nullptr;  // the cache it was made from
  kvc_seq seq = 0;
  uint64_t seq_version = 0;     // the sequence's version when planned
  std::vector<int32_t> kept;    // [layers * kv_heads] kept counts
  bool applied = false;
};

class Harness {
 public:
  explicit Harness(FuzzedDataProvider& in) : in_(in) {}

  void Run() {
    int steps = 0;
    while (in_.remaining_bytes() > 0 && steps++ < 64) {
      Step();
      CheckAll();
    }
    Teardown();
  }

 private:
  // ---- Handle choice ----------------------------------------------------------------------------
  CacheState* Live(int i) { return caches_.empty() ? nullptr : &caches_[i % caches_.size()]; }

  // Returns a cache handle and, when it is a live one, its state (else nullptr).
  kvc_cache* PickCache(CacheState** state) {
    *state = nullptr;
    const int kind = in_.ConsumeIntegralInRange(0, 15);
    if (kind < 11 && !caches_.empty()) {
      *state = Live(kind);
      return (*state)->handle;
    }
    switch (kind) {
      case 11:
        if (!dead_caches_.empty()) return dead_caches_[in_.ConsumeIntegral<uint8_t>() % dead_caches_.size()];
        return nullptr;
      case 12:
        if (!plans_.empty()) {
          return reinterpret_cast<kvc_cache*>(plans_[in_.ConsumeIntegral<uint8_t>() % plans_.size()].handle);
        }
        return nullptr;
      case 13: {
        const uint64_t v = in_.ConsumeIntegral<uint64_t>();
        auto* h = reinterpret_cast<kvc_cache*>(static_cast<uintptr_t>(v));
        for (CacheState& c : caches_) {
          if (c.handle == h) *state = &c;
        }
        return h;
      }
      default:
        return nullptr;
    }
  }

  // A sequence id of `c`: usually a live one, sometimes an unknown one.
  kvc_seq PickSeq(const CacheState* c, bool* live) {
    *live = false;
    if (c != nullptr && !c->seqs.empty() && in_.ConsumeIntegralInRange(0, 7) != 0) {
      auto it = c->seqs.begin();
      std::advance(it, in_.ConsumeIntegralInRange<size_t>(0, c->seqs.size() - 1));
      *live = true;
      return it->first;
    }
    const kvc_seq s = in_.ConsumeIntegralInRange<int64_t>(-2, 40);
    if (c != nullptr && c->seqs.count(s) != 0) *live = true;
    return s;
  }

  SeqModel NewSeqModel(const CacheState& c) {
    SeqModel m;
    m.length.assign(static_cast<size_t>(c.cfg.num_layers) * c.cfg.num_kv_heads, 0);
    m.last_position.assign(c.cfg.num_layers, -1);
    return m;
  }

  // ---- Operations -------------------------------------------------------------------------------
  void Step() {
    // Without a live cache most calls only exercise the bad-handle paths: usually make one.
    if (caches_.empty() && in_.ConsumeIntegralInRange(0, 3) != 0) {
      CreateCache();
      return;
    }
    switch (in_.ConsumeIntegralInRange(0, 17)) {
      case 0: CreateCache(); break;
      case 1: DestroyCache(); break;
      case 2: AddSequence(); break;
      case 3: Fork(); break;
      case 4: FreeSequence(); break;
      case 5:
      case 6: Append(); break;
      case 7: ScoreRows(); break;
      case 8: Decode(); break;
      case 9: Plan(); break;
      case 10: ApplyPlan(); break;
      case 11: DestroyPlan(); break;
      case 12: Compress(); break;
      case 13: StreamRead(); break;
      case 14: AddScores(); break;
      case 15: ExportPageTable(); break;
      case 16: Introspect(); break;
      default: NullArguments(); break;
    }
  }

  void CreateCache() {
    kvc_config cfg;
    kvc_config_init(&cfg);
    cfg.num_layers = in_.ConsumeIntegralInRange(1, 3);
    cfg.num_kv_heads = in_.ConsumeIntegralInRange(1, 2);
    cfg.num_q_heads = cfg.num_kv_heads * in_.ConsumeIntegralInRange(1, 2);
    cfg.head_dim = 4 << in_.ConsumeIntegralInRange(0, 2);
    cfg.dtype = in_.ConsumeIntegralInRange(0, 2);
    const int row_bytes = 2 * cfg.head_dim * DTypeBytes(cfg.dtype);
    const int unit = 64 / std::gcd(64, row_bytes);
    cfg.page_tokens = unit * in_.ConsumeIntegralInRange(1, std::max(1, 8 / unit));
    cfg.page_bytes = 0;
    cfg.num_pages = in_.ConsumeIntegralInRange(2, 64);
    cfg.flags = in_.ConsumeBool() ? KVC_CONFIG_PAGE_SUMMARIES : 0;
    const char* backend = in_.ConsumeBool() ? "cpu" : "cpu-reference";
    // Sometimes one field made invalid (or of uncertain validity), within small magnitudes.
    bool valid = true;
    switch (in_.ConsumeIntegralInRange(0, 15)) {
      case 0: cfg.num_layers = in_.ConsumeIntegralInRange(-3, 0); valid = false; break;
      case 1: cfg.num_kv_heads = in_.ConsumeIntegralInRange(-3, 0); valid = false; break;
      case 2: cfg.num_q_heads = cfg.num_kv_heads * 2 + 1; valid = cfg.num_kv_heads == 1; break;
      case 3: cfg.head_dim = in_.ConsumeIntegralInRange(-4, 0); valid = false; break;
      case 4: cfg.dtype = in_.ConsumeBool() ? 3 : -1; valid = false; break;
      case 5: cfg.flags = in_.ConsumeIntegralInRange(2, 9); valid = false; break;
      case 6: cfg.num_pages = in_.ConsumeIntegralInRange(-3, 0); valid = false; break;
      case 7: cfg.page_tokens = in_.ConsumeIntegralInRange(-3, 0); valid = false; break;
      case 8:  // page_bytes given instead of page_tokens: validity depends on the geometry
        cfg.page_tokens = 0;
        cfg.page_bytes = in_.ConsumeIntegralInRange<int64_t>(-64, 4096);
        valid = false;
        break;
      case 9: backend = in_.ConsumeBool() ? "gpu" : ""; valid = false; break;
      case 10: cfg.num_pages = in_.ConsumeIntegralInRange(1, 3); break;
      default: break;
    }
    kvc_cache* handle = nullptr;
    const kvc_status s = CALL(kvc_cache_create(&cfg, backend, &handle));
    if (valid) Expect(s == KVC_OK, "a valid config was rejected");
    if (s != KVC_OK) {
      Expect(handle == nullptr, "a failed kvc_cache_create wrote a handle");
      return;
    }
    CacheState c;
    c.handle = handle;
    Expect(CALL(kvc_cache_get_config(handle, &c.cfg)) == KVC_OK, "get_config");
    Expect(c.cfg.num_layers == cfg.num_layers && c.cfg.num_kv_heads == cfg.num_kv_heads &&
               c.cfg.num_q_heads == cfg.num_q_heads && c.cfg.head_dim == cfg.head_dim &&
               c.cfg.dtype == cfg.dtype && c.cfg.flags == cfg.flags &&
               c.cfg.num_pages == cfg.num_pages,
           "get_config differs from the config created");
    caches_.push_back(std::move(c));
    if (caches_.size() > 2) {  // keep at most two live caches
      Expect(CALL(kvc_cache_destroy(caches_.front().handle)) == KVC_OK, "destroy");
      dead_caches_.push_back(caches_.front().handle);
      caches_.erase(caches_.begin());
    }
  }

  void DestroyCache() {
    CacheState* c = nullptr;
    kvc_cache* h = PickCache(&c);
    const kvc_status s = CALL(kvc_cache_destroy(h));
    if (c == nullptr) {
      Expect(s == KVC_INVALID_ARGUMENT, "destroy of a bad cache handle did not fail");
      return;
    }
    Expect(s == KVC_OK, "destroy of a live cache failed");
    dead_caches_.push_back(h);
    caches_.erase(caches_.begin() + (c - caches_.data()));
  }

  void AddSequence() {
    CacheState* c = nullptr;
    kvc_cache* h = PickCache(&c);
    kvc_seq id = -7;
    const kvc_status s = CALL(kvc_sequence_add(h, &id));
    if (c == nullptr) {
      Expect(s == KVC_INVALID_ARGUMENT, "sequence_add on a bad handle did not fail");
      return;
    }
    Expect(s == KVC_OK, "sequence_add failed");
    Expect(c->seqs.count(id) == 0, "sequence_add returned a live id");
    c->seqs[id] = NewSeqModel(*c);
    if (c->seqs.size() > 8) FreeOne(*c);
  }

  void FreeOne(CacheState& c) {
    const kvc_seq id = c.seqs.begin()->first;
    Expect(CALL(kvc_sequence_free(c.handle, id)) == KVC_OK, "free");
    c.seqs.erase(id);
  }

  void Fork() {
    CacheState* c = nullptr;
    kvc_cache* h = PickCache(&c);
    bool live = false;
    const kvc_seq parent = PickSeq(c, &live);
    kvc_seq child = -7;
    const kvc_status s = CALL(kvc_sequence_fork(h, parent, &child));
    if (c == nullptr) {
      Expect(s == KVC_INVALID_ARGUMENT, "fork on a bad handle did not fail");
      return;
    }
    if (!live) {
      Expect(s == KVC_NOT_FOUND, "fork of an unknown sequence did not return NOT_FOUND");
      return;
    }
    Expect(s == KVC_OK, "fork failed");
    SeqModel m = c->seqs[parent];
    m.version = c->next_version++;
    c->seqs[child] = m;
    if (c->seqs.size() > 8) FreeOne(*c);
  }

  void FreeSequence() {
    CacheState* c = nullptr;
    kvc_cache* h = PickCache(&c);
    bool live = false;
    const kvc_seq id = PickSeq(c, &live);
    const kvc_status s = CALL(kvc_sequence_free(h, id));
    if (c == nullptr) {
      Expect(s == KVC_INVALID_ARGUMENT, "free on a bad handle did not fail");
      return;
    }
    if (!live) {
      Expect(s == KVC_NOT_FOUND, "free of an unknown sequence did not return NOT_FOUND");
      return;
    }
    Expect(s == KVC_OK, "free failed");
    c->seqs.erase(id);
  }

  void Append() {
    CacheState* c = nullptr;
    kvc_cache* h = PickCache(&c);
    bool live = false;
    const kvc_seq id = PickSeq(c, &live);
    const int32_t layers = c != nullptr ? c->cfg.num_layers : 1;
    const int32_t heads = c != nullptr ? c->cfg.num_kv_heads : 1;
    const int32_t dim = c != nullptr ? c->cfg.head_dim : 4;
    bool valid = c != nullptr && live;
    int32_t layer = in_.ConsumeIntegralInRange(0, layers - 1);
    if (in_.ConsumeIntegralInRange(0, 15) == 0) {
      layer = in_.ConsumeBool() ? -1 : layers;
      valid = false;
    }
    int32_t n = in_.ConsumeIntegralInRange(1, 24);
    int32_t claimed = n;
    if (in_.ConsumeIntegralInRange(0, 15) == 0) {
      claimed = in_.ConsumeIntegralInRange(-2, 0);  // buffers stay n long (more than needed)
      valid = false;
    }
    int32_t dtype = in_.ConsumeIntegralInRange(0, 2);
    if (in_.ConsumeIntegralInRange(0, 15) == 0) {
      dtype = in_.ConsumeBool() ? 3 : -1;
      valid = false;
    }
    int32_t last = -1;
    if (c != nullptr && live && layer >= 0 && layer < layers) {
      last = c->seqs[id].last_position[layer];
    }
    std::vector<int32_t> pos(n);
    int32_t p = last + 1 + in_.ConsumeIntegralInRange(0, 3);
    const int bad = in_.ConsumeIntegralInRange(0, 11);
    if (bad == 0) {
      p = std::max(-1, last - in_.ConsumeIntegralInRange(0, 2));  // not above the last one
      valid = false;
    }
    for (int32_t i = 0; i < n; ++i) {
      pos[i] = p;
      p += 1 + in_.ConsumeIntegralInRange(0, 2);
    }
    if (bad == 1 && n > 1) {  // not strictly increasing within the call
      pos[n - 1] = pos[n - 2];
      valid = false;
    }
    std::vector<uint8_t> mods;
    if (in_.ConsumeBool()) {
      mods.resize(n);
      for (auto& m : mods) m = in_.ConsumeIntegralInRange<uint8_t>(0, 3);
      if (in_.ConsumeIntegralInRange(0, 15) == 0) {
        mods[in_.ConsumeIntegralInRange(0, n - 1)] = in_.ConsumeIntegralInRange<uint8_t>(4, 255);
        valid = false;
      }
    }
    std::vector<uint8_t> admit;
    if (in_.ConsumeIntegralInRange(0, 3) == 0) {
      admit.resize(n);
      for (auto& a : admit) a = in_.ConsumeIntegralInRange<uint8_t>(0, 2);
    }
    // keys, values: [n, heads, dim] of dtype (raw bits), finite values.
    const size_t elems = static_cast<size_t>(n) * heads * dim;
    const size_t bytes = elems * (dtype == KVC_DTYPE_F32 || dtype < 0 || dtype > 2 ? 4 : 2);
    std::vector<uint8_t> keys(bytes), values(bytes);
    FillValues(keys, dtype);
    FillValues(values, dtype);
    const kvc_status s = CALL(kvc_append(h, id, layer, claimed, dtype, keys.data(), values.data(),
                                         pos.data(), mods.empty() ? nullptr : mods.data(),
                                         admit.empty() ? nullptr : admit.data()));
    if (!valid) {
      Expect(s != KVC_OK, "an invalid append succeeded");
      return;
    }
    Expect(s == KVC_OK || s == KVC_OUT_OF_MEMORY, "a valid append failed");
    if (s != KVC_OK) return;
    SeqModel& m = c->seqs[id];
    int32_t stored = 0;
    for (int32_t i = 0; i < n; ++i) stored += admit.empty() || admit[i] != 0 ? 1 : 0;
    for (int32_t hd = 0; hd < heads; ++hd) m.length[layer * heads + hd] += stored;
    m.last_position[layer] = pos[n - 1];
    m.version = c->next_version++;
  }

  void FillValues(std::vector<uint8_t>& buf, int32_t dtype) {
    const float scale = static_cast<float>(in_.ConsumeIntegralInRange(0, 8)) * 0.25f;
    if (dtype == KVC_DTYPE_F16 || dtype == KVC_DTYPE_BF16) {
      // f16/bf16 bits of small finite values: sign, a moderate exponent, any mantissa bits.
      for (size_t i = 0; i + 1 < buf.size(); i += 2) {
        const uint16_t bits = dtype == KVC_DTYPE_F16
                                  ? static_cast<uint16_t>(((i * 37) & 0x83ff) | 0x3800)
                                  : static_cast<uint16_t>(((i * 37) & 0x807f) | 0x3f00);
        std::memcpy(&buf[i], &bits, 2);
      }
      return;
    }
    for (size_t i = 0; i + 3 < buf.size(); i += 4) {
      const float v = scale * std::sin(static_cast<float>(i));
      std::memcpy(&buf[i], &v, 4);
    }
  }

  std::vector<float> Queries(size_t count) {
    std::vector<float> q(count);
    const float scale = static_cast<float>(in_.ConsumeIntegralInRange(0, 8));
    for (size_t i = 0; i < q.size(); ++i) q[i] = scale * std::cos(static_cast<float>(i) * 0.7f);
    return q;
  }

  int64_t LayerTotal(const CacheState& c, kvc_seq id, int32_t layer) {
    const SeqModel& m = c.seqs.at(id);
    int64_t t = 0;
    for (int32_t hd = 0; hd < c.cfg.num_kv_heads; ++hd) t += m.length[layer * c.cfg.num_kv_heads + hd];
    return t;
  }

  void ScoreRows() {
    CacheState* c = nullptr;
    kvc_cache* h = PickCache(&c);
    bool live = false;
    const kvc_seq id = PickSeq(c, &live);
    const int32_t layers = c != nullptr ? c->cfg.num_layers : 1;
    const int32_t qh = c != nullptr ? c->cfg.num_q_heads : 1;
    const int32_t dim = c != nullptr ? c->cfg.head_dim : 4;
    const int32_t layer = in_.ConsumeIntegralInRange(0, layers - 1);
    const int32_t rows = in_.ConsumeIntegralInRange(1, 4);
    std::vector<float> q = Queries(static_cast<size_t>(rows) * qh * dim);
    std::vector<int32_t> pos(rows);
    for (auto& p : pos) p = in_.ConsumeIntegralInRange(0, 120);
    const bool negative_position = in_.ConsumeIntegralInRange(0, 15) == 0;
    if (negative_position) pos[in_.ConsumeIntegralInRange(0, rows - 1)] = -1;
    const int32_t aggregation = in_.ConsumeIntegralInRange(0, 3);
    const int64_t total = c != nullptr && live ? LayerTotal(*c, id, layer) : 0;
    const int mode = in_.ConsumeIntegralInRange(0, 3);  // 0 NULL, 1 too small, else enough
    int64_t capacity = 0;
    if (mode == 1) capacity = in_.ConsumeIntegralInRange<int64_t>(0, std::max<int64_t>(0, total - 1));
    if (mode >= 2) capacity = total + in_.ConsumeIntegralInRange(0, 2);
    std::vector<float> scores(static_cast<size_t>(std::max<int64_t>(capacity, 1)));
    std::vector<int64_t> below(qh), causal(qh);
    int64_t required = -1;
    const bool counts = in_.ConsumeBool();
    const kvc_status s = CALL(kvc_score_rows(
        h, id, layer, rows, q.data(), pos.data(), 0.0f, aggregation,
        static_cast<float>(in_.ConsumeIntegralInRange(0, 4)) * 0.01f, in_.ConsumeBool() ? 1 : 0,
        mode == 0 ? nullptr : scores.data(), capacity, &required,
        counts ? below.data() : nullptr, counts ? causal.data() : nullptr));
    if (c == nullptr) {
      Expect(s == KVC_INVALID_ARGUMENT, "score_rows on a bad handle did not fail");
      return;
    }
    if (!live) {
      Expect(s != KVC_OK, "score_rows of an unknown sequence succeeded");
      return;
    }
    if (aggregation == 3) {
      Expect(s == KVC_INVALID_ARGUMENT, "score_rows with a bad aggregation did not fail");
      return;
    }
    if (mode == 1 && capacity < total) {
      Expect(s == KVC_BUFFER_TOO_SMALL, "score_rows into a too small buffer did not fail");
      Expect(required == total, "score_rows required size differs from the model");
      return;
    }
    if (negative_position) {
      Expect(s == KVC_INVALID_ARGUMENT, "score_rows with a negative position did not fail");
      return;
    }
    Expect(s == KVC_OK, "score_rows failed");
    Expect(required == total, "score_rows required size differs from the model");
    if (mode != 0) {
      for (int64_t i = 0; i < total; ++i) Expect(std::isfinite(scores[i]), "non-finite score");
    }
  }

  void FillReadPolicy(kvc_read_policy* r) {
    kvc_read_policy_init(r);
    r->kind = in_.ConsumeIntegralInRange(-1, 3);
    if (in_.ConsumeBool()) r->dense_first_layers = in_.ConsumeIntegralInRange(-1, 3);
    r->token_budget = in_.ConsumeIntegralInRange(-2, 40);
    r->top_k = in_.ConsumeIntegralInRange(-1, 40);
    r->exact_search = in_.ConsumeBool() ? 1 : 0;
    r->ef_search = in_.ConsumeIntegralInRange(-1, 80);
    r->sink_tokens = in_.ConsumeIntegralInRange(-1, 6);
    r->recent_tokens = in_.ConsumeIntegralInRange(-1, 6);
    if (in_.ConsumeBool()) r->index_m = in_.ConsumeIntegralInRange(-1, 24);
    if (in_.ConsumeBool()) r->index_ef_construction = in_.ConsumeIntegralInRange(-1, 120);
  }

  void Decode() {
    CacheState* c = nullptr;
    kvc_cache* h = PickCache(&c);
    const int32_t layers = c != nullptr ? c->cfg.num_layers : 1;
    const int32_t qh = c != nullptr ? c->cfg.num_q_heads : 1;
    const int32_t dim = c != nullptr ? c->cfg.head_dim : 4;
    const int32_t layer = in_.ConsumeIntegralInRange(0, layers - 1);
    const int32_t batch_size = in_.ConsumeIntegralInRange(1, 3);
    std::vector<kvc_seq> batch(batch_size);
    bool all_live = true;
    for (auto& b : batch) {
      bool live = false;
      b = PickSeq(c, &live);
      all_live = all_live && live;
    }
    std::vector<float> q = Queries(static_cast<size_t>(batch_size) * qh * dim);
    std::vector<float> out(q.size(), -1.0f);
    std::vector<float> lse(static_cast<size_t>(batch_size) * qh);
    const bool with_lse = in_.ConsumeBool();
    const int32_t aggregation = in_.ConsumeIntegralInRange(0, 3);
    const int32_t accumulate = in_.ConsumeBool() ? 1 : 0;
    kvc_status s;
    if (in_.ConsumeBool()) {
      s = CALL(kvc_decode_attention(h, batch.data(), batch_size, layer, q.data(), out.data(),
                                    with_lse ? lse.data() : nullptr, 0.0f, aggregation,
                                    accumulate));
    } else {
      kvc_read_policy r;
      FillReadPolicy(&r);
      s = CALL(kvc_decode_attention_sparse(h, batch.data(), batch_size, layer, q.data(),
                                           out.data(), with_lse ? lse.data() : nullptr, 0.0f,
                                           aggregation, accumulate,
                                           in_.ConsumeIntegralInRange(0, 7) == 0 ? nullptr : &r));
    }
    if (c == nullptr) {
      Expect(s == KVC_INVALID_ARGUMENT, "decode on a bad handle did not fail");
      return;
    }
    if (!all_live) Expect(s != KVC_OK, "decode of an unknown sequence succeeded");
    if (aggregation == 3) Expect(s != KVC_OK, "decode with a bad aggregation succeeded");
    if (s == KVC_OK) {
      for (float x : out) Expect(std::isfinite(x), "decode wrote a non-finite output");
    }
  }

  // Policy specs: registered names (with and without parameters), unknown names, odd strings.
  std::string PolicyName() {
    static const char* const kNames[] = {
        "full", "streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "tova", "knorm",
        "random", "vlcache", "fastv", "prumerge", "think", "snapkv:keep=0.3,window=4",
        "streamingllm:keep=0.5,sinks=2", "h2o:heavy=0.2,recent=0.2", "random:keep=0.5,seed=3",
        "knorm:keep=0.4,sinks=1,window=2", "tova:keep=0.25", "nope", "", "snapkv:",
        "snapkv:keep=2", "pyramidkv:keep=0.3,window=4,beta=3", "adakv:keep=0.3,window=4"};
    const size_t k = in_.ConsumeIntegralInRange<size_t>(0, std::size(kNames));
    if (k == std::size(kNames)) return in_.ConsumeRandomLengthString(40);
    return kNames[k];
  }
  std::string PolicyParams(bool* null) {
    static const char* const kParams[] = {
        "keep=0.5", "keep=0.2,window=4", "tokens=3", "keep=0.5,merge=average",
        "keep=0.5,merge=pivot", "keep=1", "keep=0", "keep=-1", "window=0", "keep=0.5,think=0.5",
        "bogus=1", "keep=0.5,keep=0.5", "keep=nan", "=", ",", "keep=0.3,protect_text=1"};
    *null = false;
    const size_t k = in_.ConsumeIntegralInRange<size_t>(0, std::size(kParams) + 1);
    if (k == std::size(kParams)) {
      *null = true;
      return "";
    }
    if (k == std::size(kParams) + 1) return in_.ConsumeRandomLengthString(40);
    return kParams[k];
  }

  // Observations for `c`, buffers sized from the counts they claim. Returns NULL sometimes.
  struct ObservationBuffers {
    std::vector<kvc_layer_observation> layers;
    std::vector<std::vector<float>> queries;
    std::vector<std::vector<int32_t>> positions;
    std::vector<int32_t> image_positions;
    std::vector<float> image_scores;
    kvc_observations obs{};
  };
  const kvc_observations* Observations(const CacheState* c, ObservationBuffers* b) {
    if (c == nullptr || in_.ConsumeBool()) return nullptr;
    int32_t num_layers = in_.ConsumeIntegralInRange(0, 7) == 0
                             ? in_.ConsumeIntegralInRange(0, 4)
                             : c->cfg.num_layers;
    b->layers.resize(num_layers);
    b->queries.resize(num_layers);
    b->positions.resize(num_layers);
    for (int32_t l = 0; l < num_layers; ++l) {
      const int32_t rows = in_.ConsumeIntegralInRange(0, 3);
      b->queries[l] = Queries(static_cast<size_t>(rows) * c->cfg.num_q_heads * c->cfg.head_dim);
      b->positions[l].resize(rows);
      int32_t p = in_.ConsumeIntegralInRange(0, 60);
      for (auto& x : b->positions[l]) x = p++;
      b->layers[l].num_rows = rows;
      b->layers[l].reserved = in_.ConsumeIntegralInRange(0, 31) == 0 ? 1 : 0;
      b->layers[l].queries = rows > 0 ? b->queries[l].data() : nullptr;
      b->layers[l].positions = rows > 0 ? b->positions[l].data() : nullptr;
    }
    const int32_t images = in_.ConsumeIntegralInRange(0, 4);
    int32_t p = 0;
    for (int32_t i = 0; i < images; ++i) {
      p += in_.ConsumeIntegralInRange(0, 3);
      b->image_positions.push_back(p);
      b->image_scores.push_back(static_cast<float>(in_.ConsumeIntegralInRange(0, 10)) * 0.1f);
    }
    b->obs.num_layers = num_layers;
    b->obs.layers = num_layers > 0 ? b->layers.data() : nullptr;
    b->obs.num_image_scores = images;
    b->obs.image_score_positions = images > 0 ? b->image_positions.data() : nullptr;
    b->obs.image_scores = images > 0 ? b->image_scores.data() : nullptr;
    return &b->obs;
  }

  void Plan() {
    CacheState* c = nullptr;
    kvc_cache* h = PickCache(&c);
    bool live = false;
    const kvc_seq id = PickSeq(c, &live);
    const std::string name = PolicyName();
    bool null_params = false;
    std::string params = PolicyParams(&null_params);
    if (name.find(':') != std::string::npos && in_.ConsumeIntegralInRange(0, 3) != 0) {
      null_params = true;  // a full spec in `name` takes no separate parameters
    }
    ObservationBuffers buffers;
    const kvc_observations* obs = Observations(c, &buffers);
    kvc_plan* plan = nullptr;
    const kvc_status s = CALL(kvc_policy_plan(h, id, name.c_str(),
                                              null_params ? nullptr : params.c_str(), obs, &plan));
    if (c == nullptr) {
      Expect(s == KVC_INVALID_ARGUMENT, "plan on a bad handle did not fail");
      return;
    }
    if (!live) Expect(s != KVC_OK, "plan of an unknown sequence succeeded");
    if (s != KVC_OK) return;
    PlanState ps;
    ps.handle = plan;
    ps.cache = h;
    ps.seq = id;
    const SeqModel& m = c->seqs.at(id);
    ps.seq_version = m.version;
    const int32_t heads = c->cfg.num_kv_heads;
    ps.kept.resize(m.length.size());
    for (int32_t l = 0; l < c->cfg.num_layers; ++l) {
      for (int32_t hd = 0; hd < heads; ++hd) {
        int32_t kept = -1;
        Expect(CALL(kvc_plan_kept_count(plan, l, hd, &kept)) == KVC_OK, "plan_kept_count");
        Expect(kept >= 0 && kept <= m.length[l * heads + hd], "plan keeps more than the stream");
        ps.kept[l * heads + hd] = kept;
      }
    }
    Expect(CALL(kvc_plan_kept_count(plan, c->cfg.num_layers, 0, nullptr)) != KVC_OK,
           "plan_kept_count out of range succeeded");
    InspectPlan(ps, *c);
    plans_.push_back(std::move(ps));
    if (plans_.size() > 6) {
      Expect(CALL(kvc_plan_destroy(plans_.front().handle)) == KVC_OK, "plan_destroy");
      dead_plans_.push_back(plans_.front().handle);
      plans_.erase(plans_.begin());
    }
  }

  void InspectPlan(const PlanState& ps, const CacheState& c) {
    int32_t streams = -1;
    Expect(CALL(kvc_plan_num_streams(ps.handle, &streams)) == KVC_OK, "plan_num_streams");
    Expect(streams >= 0 && streams <= c.cfg.num_layers * c.cfg.num_kv_heads, "plan stream count");
    kvc_seq seq = -1;
    int64_t kept_total = -1;
    Expect(CALL(kvc_plan_info(ps.handle, &seq, &kept_total)) == KVC_OK, "plan_info");
    Expect(seq == ps.seq, "plan_info names another sequence");
    int64_t named_total = 0;
    for (int32_t i = 0; i < streams; ++i) {
      int32_t layer = -1, head = -1, kept = -1, channels = -1;
      Expect(CALL(kvc_plan_stream(ps.handle, i, &layer, &head, &kept, &channels)) == KVC_OK,
             "plan_stream");
      Expect(layer >= 0 && layer < c.cfg.num_layers && head >= 0 && head < c.cfg.num_kv_heads,
             "plan_stream names a stream outside the cache");
      Expect(kept == ps.kept[layer * c.cfg.num_kv_heads + head], "plan_stream vs kept_count");
      Expect(channels >= 0 && channels <= c.cfg.head_dim, "plan key channels");
      named_total += kept;
      // Kept indices with a fuzzed capacity.
      const int32_t cap = in_.ConsumeIntegralInRange(0, kept + 1);
      std::vector<int32_t> idx(static_cast<size_t>(std::max(cap, 1)));
      int32_t required = -1;
      const kvc_status s = CALL(kvc_plan_kept_tokens(ps.handle, i, idx.data(), cap, &required));
      Expect(required == kept, "plan_kept_tokens required size");
      if (cap < kept) {
        Expect(s == KVC_BUFFER_TOO_SMALL, "plan_kept_tokens into a too small buffer");
      } else {
        Expect(s == KVC_OK, "plan_kept_tokens failed");
        for (int32_t k = 1; k < kept; ++k) Expect(idx[k] > idx[k - 1], "kept tokens not ascending");
      }
    }
    Expect(named_total == kept_total, "plan_info kept_tokens vs the named streams");
    Expect(CALL(kvc_plan_stream(ps.handle, streams, nullptr, nullptr, nullptr, nullptr)) != KVC_OK,
           "plan_stream out of range succeeded");
  }

  // A plan handle: live, destroyed, a cache passed as a plan, NULL or made up.
  kvc_plan* PickPlan(PlanState** state) {
    *state = nullptr;
    const int kind = in_.ConsumeIntegralInRange(0, 11);
    if (kind < 8 && !plans_.empty()) {
      *state = &plans_[kind % plans_.size()];
      return (*state)->handle;
    }
    switch (kind) {
      case 8:
        if (!dead_plans_.empty()) return dead_plans_[in_.ConsumeIntegral<uint8_t>() % dead_plans_.size()];
        return nullptr;
      case 9:
        if (!caches_.empty()) return reinterpret_cast<kvc_plan*>(Live(in_.ConsumeIntegral<uint8_t>())->handle);
        return nullptr;
      case 10: {
        auto* p = reinterpret_cast<kvc_plan*>(static_cast<uintptr_t>(in_.ConsumeIntegral<uint64_t>()));
        for (PlanState& ps : plans_) {
          if (ps.handle == p) *state = &ps;
        }
        return p;
      }
      default:
        return nullptr;
    }
  }

  void ApplyPlan() {
    PlanState* p = nullptr;
    kvc_plan* plan = PickPlan(&p);
    CacheState* c = nullptr;
    kvc_cache* h = PickCache(&c);
    const kvc_status s = CALL(kvc_plan_apply(h, plan));
    if (c == nullptr || p == nullptr) {
      Expect(s != KVC_OK, "apply with a bad handle succeeded");
      return;
    }
    if (p->cache != h) {
      Expect(s == KVC_FAILED_PRECONDITION, "apply on another cache did not fail");
      return;
    }
    if (p->applied) {
      Expect(s == KVC_FAILED_PRECONDITION, "second apply of a plan did not fail");
      return;
    }
    auto it = c->seqs.find(p->seq);
    if (it == c->seqs.end()) {
      Expect(s != KVC_OK, "apply to a freed sequence succeeded");
      return;
    }
    if (it->second.version == p->seq_version) {
      Expect(s == KVC_OK || s == KVC_OUT_OF_MEMORY, "apply of a fresh plan failed");
      if (s != KVC_OK) return;
      p->applied = true;
      it->second.length = p->kept;
      it->second.version = c->next_version++;
      return;
    }
    // The sequence changed since planning: the plan may or may not still fit.
    if (s == KVC_OK) {
      p->applied = true;
      Resync(*c, p->seq);
    }
  }

  // Takes the lengths of `id` from the cache (only where the model cannot predict them).
  void Resync(CacheState& c, kvc_seq id) {
    SeqModel& m = c.seqs.at(id);
    for (int32_t l = 0; l < c.cfg.num_layers; ++l) {
      for (int32_t hd = 0; hd < c.cfg.num_kv_heads; ++hd) {
        int32_t len = -1;
        Expect(CALL(kvc_stream_length(c.handle, id, l, hd, &len)) == KVC_OK, "stream_length");
        Expect(len >= 0 && len <= m.length[l * c.cfg.num_kv_heads + hd],
               "a policy grew a stream");
        m.length[l * c.cfg.num_kv_heads + hd] = len;
      }
    }
    m.version = c.next_version++;
  }

  void DestroyPlan() {
    PlanState* p = nullptr;
    kvc_plan* plan = PickPlan(&p);
    const kvc_status s = CALL(kvc_plan_destroy(plan));
    if (p == nullptr) {
      Expect(s == KVC_INVALID_ARGUMENT, "destroy of a bad plan handle did not fail");
      return;
    }
    Expect(s == KVC_OK, "plan_destroy failed");
    dead_plans_.push_back(plan);
    plans_.erase(plans_.begin() + (p - plans_.data()));
  }

  void Compress() {
    CacheState* c = nullptr;
    kvc_cache* h = PickCache(&c);
    bool live = false;
    const kvc_seq id = PickSeq(c, &live);
    const std::string name = PolicyName();
    bool null_params = false;
    std::string params = PolicyParams(&null_params);
    if (name.find(':') != std::string::npos && in_.ConsumeIntegralInRange(0, 3) != 0) {
      null_params = true;  // a full spec in `name` takes no separate parameters
    }
    ObservationBuffers buffers;
    const kvc_observations* obs = Observations(c, &buffers);
    kvc_compress_result r{};
    const bool with_result = in_.ConsumeIntegralInRange(0, 3) != 0;
    const kvc_status s = CALL(kvc_compress(h, id, name.c_str(),
                                           null_params ? nullptr : params.c_str(), obs,
                                           with_result ? &r : nullptr));
    if (c == nullptr) {
      Expect(s == KVC_INVALID_ARGUMENT, "compress on a bad handle did not fail");
      return;
    }
    if (!live) Expect(s != KVC_OK, "compress of an unknown sequence succeeded");
    if (s != KVC_OK) return;
    const SeqModel& m = c->seqs.at(id);
    const int64_t before = std::accumulate(m.length.begin(), m.length.end(), int64_t{0});
    Resync(*c, id);
    const SeqModel& after = c->seqs.at(id);
    if (with_result) {
      Expect(r.tokens_before == before, "compress tokens_before differs from the model");
      Expect(r.tokens_after ==
                 std::accumulate(after.length.begin(), after.length.end(), int64_t{0}),
             "compress tokens_after differs from the stream lengths");
      Expect(r.streams_changed >= 0 &&
                 r.streams_changed <= c->cfg.num_layers * c->cfg.num_kv_heads,
             "compress streams_changed");
    }
  }

  void StreamRead() {
    CacheState* c = nullptr;
    kvc_cache* h = PickCache(&c);
    bool live = false;
    const kvc_seq id = PickSeq(c, &live);
    const int32_t layers = c != nullptr ? c->cfg.num_layers : 1;
    const int32_t heads = c != nullptr ? c->cfg.num_kv_heads : 1;
    const int32_t dim = c != nullptr ? c->cfg.head_dim : 4;
    int32_t layer = in_.ConsumeIntegralInRange(0, layers - 1);
    int32_t head = in_.ConsumeIntegralInRange(0, heads - 1);
    bool in_range = true;
    if (in_.ConsumeIntegralInRange(0, 15) == 0) {
      (in_.ConsumeBool() ? layer : head) = in_.ConsumeBool() ? -1 : std::max(layers, heads);
      in_range = false;
    }
    const int32_t len = c != nullptr && live && in_range ? c->seqs[id].length[layer * heads + head] : 0;
    const int32_t capacity = in_.ConsumeBool() ? len + in_.ConsumeIntegralInRange(0, 2)
                                               : in_.ConsumeIntegralInRange(0, len + 2);
    const size_t cap = static_cast<size_t>(std::max(capacity, 1));
    std::vector<int32_t> positions(cap);
    std::vector<uint8_t> mods(cap);
    std::vector<float> scores(cap), keys(cap * dim), values(cap * dim);
    const int mask = in_.ConsumeIntegralInRange(0, 31);
    int32_t length = -1;
    const kvc_status s = CALL(kvc_stream_read(
        h, id, layer, head, capacity, &length, mask & 1 ? positions.data() : nullptr,
        mask & 2 ? mods.data() : nullptr, mask & 4 ? scores.data() : nullptr,
        mask & 8 ? keys.data() : nullptr, mask & 16 ? values.data() : nullptr));
    if (c == nullptr) {
      Expect(s == KVC_INVALID_ARGUMENT, "stream_read on a bad handle did not fail");
      return;
    }
    if (!live || !in_range) {
      Expect(s != KVC_OK, "stream_read of an unknown stream succeeded");
      return;
    }
    Expect(length == len, "stream_read length differs from the model");
    if (capacity < len) {
      Expect(s == KVC_BUFFER_TOO_SMALL, "stream_read into a too small buffer did not fail");
      return;
    }
    Expect(s == KVC_OK, "stream_read failed");
    if (mask & 1) {
      for (int32_t i = 1; i < len; ++i) Expect(positions[i] > positions[i - 1], "positions order");
      if (len > 0) {
        Expect(positions[0] >= 0 && positions[len - 1] <= c->seqs[id].last_position[layer],
               "stream positions outside what was appended");
      }
    }
    if (mask & 2) {
      for (int32_t i = 0; i < len; ++i) Expect(mods[i] <= KVC_MODALITY_AUDIO, "modality read back");
    }
  }

  void AddScores() {
    CacheState* c = nullptr;
    kvc_cache* h = PickCache(&c);
    bool live = false;
    const kvc_seq id = PickSeq(c, &live);
    const int32_t layers = c != nullptr ? c->cfg.num_layers : 1;
    const int32_t heads = c != nullptr ? c->cfg.num_kv_heads : 1;
    const int32_t layer = in_.ConsumeIntegralInRange(0, layers - 1);
    const int32_t head = in_.ConsumeIntegralInRange(0, heads - 1);
    const int32_t len = c != nullptr && live ? c->seqs[id].length[layer * heads + head] : 0;
    const int32_t n = in_.ConsumeIntegralInRange(0, 3) == 0 ? len + in_.ConsumeIntegralInRange(-1, 1) : len;
    std::vector<float> delta(static_cast<size_t>(std::max(n, 1)), 0.5f);
    const kvc_status s = CALL(kvc_stream_add_scores(h, id, layer, head, delta.data(), n));
    if (c == nullptr) {
      Expect(s == KVC_INVALID_ARGUMENT, "add_scores on a bad handle did not fail");
      return;
    }
    if (!live || n != len) {
      Expect(s != KVC_OK, "add_scores of an unknown sequence or with a wrong count succeeded");
      return;
    }
    if (len == 0) return;  // an empty delta for an empty stream: either answer is fine
    Expect(s == KVC_OK, "add_scores failed");
  }

  void ExportPageTable() {
    CacheState* c = nullptr;
    kvc_cache* h = PickCache(&c);
    const int32_t layers = c != nullptr ? c->cfg.num_layers : 1;
    const int32_t heads = c != nullptr ? c->cfg.num_kv_heads : 1;
    const int32_t layer = in_.ConsumeIntegralInRange(-1, layers);
    const int32_t batch_size = in_.ConsumeIntegralInRange(1, 3);
    std::vector<kvc_seq> batch(batch_size);
    bool all_live = true;
    for (auto& b : batch) {
      bool live = false;
      b = PickSeq(c, &live);
      all_live = all_live && live;
    }
    const size_t rows = static_cast<size_t>(batch_size) * heads;
    int64_t nnz = -1;
    kvc_page_layout layout{};
    const kvc_status size_query = CALL(kvc_export_page_table(
        h, layer, batch.data(), batch_size, nullptr, nullptr, 0, &nnz, nullptr, &layout));
    if (c == nullptr) {
      Expect(size_query == KVC_INVALID_ARGUMENT, "export on a bad handle did not fail");
      return;
    }
    const bool layer_ok = layer >= 0 && layer < layers;
    if (!layer_ok || !all_live) {
      Expect(size_query != KVC_OK, "export of a bad layer or sequence succeeded");
      return;
    }
    if (size_query != KVC_OK) {
      Expect(size_query == KVC_FAILED_PRECONDITION, "export size query failed unexpectedly");
      return;
    }
    Expect(nnz >= 0, "export nnz");
    Expect(layout.num_pages == c->cfg.num_pages && layout.head_dim == c->cfg.head_dim &&
               layout.dtype == c->cfg.dtype && layout.pool_base != nullptr,
           "export layout");
    const int64_t capacity = in_.ConsumeBool() ? nnz : in_.ConsumeIntegralInRange<int64_t>(0, nnz + 1);
    std::vector<int32_t> indptr(rows + 1, -1), indices(static_cast<size_t>(std::max<int64_t>(capacity, 1)), -1),
        last(rows, -1);
    int64_t nnz2 = -1;
    const kvc_status s = CALL(kvc_export_page_table(h, layer, batch.data(), batch_size,
                                                    indptr.data(), indices.data(), capacity,
                                                    &nnz2, last.data(), nullptr));
    Expect(nnz2 == nnz, "export nnz changed between calls");
    if (capacity < nnz) {
      Expect(s == KVC_BUFFER_TOO_SMALL, "export into a too small buffer did not fail");
      return;
    }
    Expect(s == KVC_OK, "export failed");
    Expect(indptr[0] == 0 && indptr[rows] == nnz, "indptr ends");
    for (size_t r = 0; r < rows; ++r) {
      Expect(indptr[r + 1] >= indptr[r], "indptr not monotonic");
      const int32_t tokens = c->seqs.at(batch[r / heads]).length[layer * heads + r % heads];
      const int32_t pages = indptr[r + 1] - indptr[r];
      Expect(last[r] >= 0 && last[r] <= layout.tokens_per_page, "last_page_len range");
      Expect(pages == 0 ? tokens == 0
                        : int64_t{pages - 1} * layout.tokens_per_page + last[r] == tokens,
             "page table does not cover the stream length");
    }
    for (int64_t i = 0; i < nnz; ++i) Expect(indices[i] >= 0 && indices[i] < layout.num_pages, "page id");
  }

  void Introspect() {
    CacheState* c = nullptr;
    kvc_cache* h = PickCache(&c);
    kvc_stats st{};
    const kvc_status s1 = CALL(kvc_cache_stats(h, &st));
    const kvc_status s2 = CALL(kvc_cache_validate(h));
    kvc_config cfg{};
    const kvc_status s3 = CALL(kvc_cache_get_config(h, &cfg));
    int32_t len = -1;
    const kvc_status s4 = CALL(kvc_stream_length(h, 0, 0, 0, &len));
    if (c == nullptr) {
      Expect(s1 == KVC_INVALID_ARGUMENT && s2 == KVC_INVALID_ARGUMENT &&
                 s3 == KVC_INVALID_ARGUMENT && s4 == KVC_INVALID_ARGUMENT,
             "introspection of a bad handle did not fail");
      return;
    }
    Expect(s1 == KVC_OK && s2 == KVC_OK && s3 == KVC_OK, "introspection failed");
    Expect(std::memcmp(&cfg, &c->cfg, sizeof(cfg)) == 0, "get_config changed");
    Expect(s4 == (c->seqs.count(0) ? KVC_OK : KVC_NOT_FOUND), "stream_length of sequence 0");
  }

  void NullArguments() {
    CacheState* c = nullptr;
    kvc_cache* h = PickCache(&c);
    int32_t i32 = 0;
    kvc_seq seq = 0;
    switch (in_.ConsumeIntegralInRange(0, 9)) {
      case 0: Expect(CALL(kvc_cache_create(nullptr, "cpu", nullptr)) == KVC_INVALID_ARGUMENT, "create NULL"); break;
      case 1: {
        kvc_config cfg;
        kvc_config_init(&cfg);
        kvc_config_init(nullptr);
        Expect(CALL(kvc_cache_create(&cfg, nullptr, nullptr)) == KVC_INVALID_ARGUMENT, "create NULL backend");
        break;
      }
      case 2: Expect(CALL(kvc_sequence_add(h, nullptr)) == KVC_INVALID_ARGUMENT, "add NULL out"); break;
      case 3: Expect(CALL(kvc_sequence_fork(h, 0, nullptr)) != KVC_OK, "fork NULL out"); break;
      case 4: Expect(CALL(kvc_stream_length(h, 0, 0, 0, nullptr)) != KVC_OK, "stream_length NULL out"); break;
      case 5: Expect(CALL(kvc_cache_stats(h, nullptr)) != KVC_OK, "stats NULL out"); break;
      case 6: {
        kvc_plan* plan = reinterpret_cast<kvc_plan*>(0x1);
        Expect(CALL(kvc_policy_plan(h, 0, nullptr, nullptr, nullptr, &plan)) != KVC_OK, "plan NULL name");
        Expect(CALL(kvc_policy_plan(h, 0, "snapkv", nullptr, nullptr, nullptr)) != KVC_OK, "plan NULL out");
        break;
      }
      case 7: {
        PlanState* p = nullptr;
        kvc_plan* plan = PickPlan(&p);
        const kvc_status a = CALL(kvc_plan_num_streams(plan, nullptr));
        Expect(a != KVC_OK, "plan_num_streams NULL out");
        const kvc_status b = CALL(kvc_plan_info(plan, &seq, nullptr));
        if (p == nullptr) Expect(b == KVC_INVALID_ARGUMENT, "plan_info of a bad plan handle");
        const kvc_status d = CALL(kvc_plan_num_streams(plan, &i32));
        if (p == nullptr) Expect(d == KVC_INVALID_ARGUMENT, "plan_num_streams of a bad handle");
        break;
      }
      case 8: {
        const float q = 0.0f;
        float out = 0.0f;
        Expect(CALL(kvc_decode_attention(h, nullptr, 1, 0, &q, &out, nullptr, 0.0f, 0, 0)) != KVC_OK,
               "decode NULL batch");
        Expect(CALL(kvc_append(h, 0, 0, 1, 0, nullptr, nullptr, nullptr, nullptr, nullptr)) != KVC_OK,
               "append NULL buffers");
        break;
      }
      default: {
        int major = -1, minor = -1, patch = -1;
        kvc_version(&major, &minor, &patch);
        kvc_version(nullptr, nullptr, nullptr);
        Expect(kvc_abi_version() == KVC_ABI_VERSION, "abi version");
        Expect(kvc_version_string() != nullptr && major >= 0, "version");
        // Unknown codes too. Only within the C++ enum's value range [0, 15]: this driver is C++,
        // where even forming a kvc_status outside it is undefined; tests/test_c_api.c (C, where
        // any integer is fine) passes -1 to the library.
        const int32_t raw = in_.ConsumeIntegralInRange(0, 15);
        const char* name = kvc_status_name(static_cast<kvc_status>(raw));
        Expect(name != nullptr && (raw < 0 || raw > KVC_INTERNAL
                                       ? std::strcmp(name, "KVC_UNKNOWN_STATUS") == 0
                                       : std::strncmp(name, "KVC_", 4) == 0),
               "status_name");
        break;
      }
    }
  }

  // ---- Invariants ---------------------------------------------------------------------------------
  void CheckAll() {
    for (const CacheState& c : caches_) {
      Expect(CALL(kvc_cache_validate(c.handle)) == KVC_OK, "validate failed");
      kvc_stats st{};
      Expect(CALL(kvc_cache_stats(c.handle, &st)) == KVC_OK, "stats failed");
      Expect(st.num_sequences == static_cast<int32_t>(c.seqs.size()), "stats num_sequences vs model");
      Expect(st.pages_total == c.cfg.num_pages && st.pages_used + st.pages_free == st.pages_total,
             "stats pages");
      Expect(st.bytes_used == int64_t{st.pages_used} * st.page_bytes, "stats bytes_used");
      int64_t tokens = 0;
      for (const auto& [id, m] : c.seqs) {
        for (int32_t l = 0; l < c.cfg.num_layers; ++l) {
          for (int32_t hd = 0; hd < c.cfg.num_kv_heads; ++hd) {
            int32_t len = -1;
            Expect(CALL(kvc_stream_length(c.handle, id, l, hd, &len)) == KVC_OK, "stream_length");
            Expect(len == m.length[l * c.cfg.num_kv_heads + hd],
                   "stream length " + std::to_string(len) + " differs from the model " +
                       std::to_string(m.length[l * c.cfg.num_kv_heads + hd]));
            tokens += len;
          }
        }
      }
      Expect(st.tokens_stored == tokens, "stats tokens_stored vs model");
      if (c.seqs.empty()) Expect(st.pages_used == 0, "pages used by no sequence (leak)");
    }
    for (kvc_cache* dead : dead_caches_) {
      Expect(CALL(kvc_cache_validate(dead)) == KVC_INVALID_ARGUMENT, "validate of a destroyed cache");
    }
  }

  void Teardown() {
    for (const PlanState& p : plans_) Expect(CALL(kvc_plan_destroy(p.handle)) == KVC_OK, "plan_destroy");
    for (kvc_plan* p : dead_plans_) {
      Expect(CALL(kvc_plan_destroy(p)) == KVC_INVALID_ARGUMENT, "double plan_destroy");
    }
    for (CacheState& c : caches_) {
      // Free every sequence first: the pool must then be entirely free.
      while (!c.seqs.empty()) FreeOne(c);
      kvc_stats st{};
      Expect(CALL(kvc_cache_stats(c.handle, &st)) == KVC_OK && st.pages_used == 0,
             "pages still used after freeing every sequence");
      Expect(CALL(kvc_cache_destroy(c.handle)) == KVC_OK, "destroy");
      Expect(CALL(kvc_cache_destroy(c.handle)) == KVC_INVALID_ARGUMENT, "double destroy");
    }
  }

  FuzzedDataProvider& in_;
  std::vector<CacheState> caches_;
  std::vector<kvc_cache*> dead_caches_;
  std::vector<PlanState> plans_;
  std::vector<kvc_plan*> dead_plans_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  Harness h(in);
  h.Run();
  return 0;
}
