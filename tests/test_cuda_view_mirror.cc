// The CUDA backend's view mirror (cuda/view_mirror.h): decode page tables kept in device memory
// by stream version and brought up to date by uploading only what changed.
//
// Oracle: a twin cache on the same CUDA backend kind created with the mirror off (every decode
// stages its whole view, as before the mirror). Both caches receive the same appends, Apply
// plans, forks and frees; every decode of the mirrored cache must EQUAL the twin's bit for bit
// (same kernel, same K/V, same order; only where the page ids come from differs). Upload sizes
// are counted by the emulator (cuda_emu::HostToDeviceBytes), so those cases run on
// "cuda-emulated" only; the equality cases also run on a GPU.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "cuda_test_util.h"
#include "kvcache/cache.h"
#include "kvcache/plan.h"
#include "test_util.h"

#if KVCACHE_HAVE_CUDA_EMULATED
#define KVCACHE_CUDA_NAMESPACE cuda_emulated
#include "cuda/kernels.cuh"      // MirrorCopy
#include "cuda/view_mirror.h"  // the test hooks
#undef KVCACHE_CUDA_NAMESPACE
#endif
#if KVCACHE_HAVE_CUDA_RUNTIME
namespace kvcache::cuda {  // cuda/view_mirror.h's test hooks in the CUDA build's namespace
void SetViewMirrorBytesForTesting(int64_t min_bytes);
int64_t ViewMirrorBytesForTesting();
int64_t ViewMirrorResetsForTesting();
}  // namespace kvcache::cuda
#endif

namespace kvcache {
namespace {

#if KVCACHE_TEST_DEVICE_MEMORY

// The hooks of the backend under test.
void SetMirrorBytes(int64_t bytes) {
#if KVCACHE_HAVE_CUDA_EMULATED
  if (Emulated()) return cuda_emulated::SetViewMirrorBytesForTesting(bytes);
#endif
#if KVCACHE_HAVE_CUDA_RUNTIME
  cuda::SetViewMirrorBytesForTesting(bytes);
#endif
}
int64_t MirrorBytes() {
#if KVCACHE_HAVE_CUDA_EMULATED
  if (Emulated()) return cuda_emulated::ViewMirrorBytesForTesting();
#endif
#if KVCACHE_HAVE_CUDA_RUNTIME
  return cuda::ViewMirrorBytesForTesting();
#else
  return 0;
#endif
}
int64_t MirrorResets() {
#if KVCACHE_HAVE_CUDA_EMULATED
  if (Emulated()) return cuda_emulated::ViewMirrorResetsForTesting();
#endif
#if KVCACHE_HAVE_CUDA_RUNTIME
  return cuda::ViewMirrorResetsForTesting();
#else
  return 0;
#endif
}

constexpr int64_t kDefaultMirrorBytes = int64_t{1} << 20;  // view_mirror.h's default

CacheConfig Config() {
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 8;
  c.head_dim = 64;
  c.dtype = DType::kF16;
  c.page_tokens = 4;  // short pages: many page ids per stream, regions outgrow their spare room
  c.num_pages = 1024;
  return c;
}

std::unique_ptr<Cache> NewCache(const CacheConfig& c, int64_t mirror_bytes) {
  const int64_t saved = MirrorBytes();
  SetMirrorBytes(mirror_bytes);
  absl::StatusOr<std::unique_ptr<Cache>> cache = Cache::Create(c, CudaBackend());
  SetMirrorBytes(saved);
  INFO(cache.status().ToString());
  REQUIRE(cache.ok());
  return *std::move(cache);
}

// Two caches, one mirrored and one staging every view, driven identically. A logical sequence
// has one id in each cache and the next position of each layer.
struct Seq {
  SequenceId mirrored = 0;
  SequenceId staged = 0;
  std::vector<int32_t> next;  // [num_layers]
  std::vector<int32_t> length;  // [num_layers] tokens per stream (every head of a layer alike)
};

class Twin {
 public:
  Twin(const CacheConfig& c, int64_t mirror_bytes)
      : c_(c), mirrored_(NewCache(c, mirror_bytes)), staged_(NewCache(c, 0)) {}

  Cache& mirrored() { return *mirrored_; }

  Seq Add() {
    Seq s;
    s.mirrored = *mirrored_->AddSequence();
    s.staged = *staged_->AddSequence();
    s.next.assign(c_.num_layers, 0);
    s.length.assign(c_.num_layers, 0);
    return s;
  }
  Seq Fork(const Seq& parent) {
    Seq s = parent;
    s.mirrored = *mirrored_->Fork(parent.mirrored);
    s.staged = *staged_->Fork(parent.staged);
    return s;
  }
  void Free(const Seq& s) {
    REQUIRE(mirrored_->Free(s.mirrored).ok());
    REQUIRE(staged_->Free(s.staged).ok());
  }
  void Append(Seq& s, int32_t layer, int n, std::mt19937& rng) {
    const size_t elements = size_t(n) * c_.num_kv_heads * c_.head_dim;
    const std::vector<float> k = testing::RandomVector(rng, elements);
    const std::vector<float> v = testing::RandomVector(rng, elements);
    std::vector<int32_t> pos(n);
    std::iota(pos.begin(), pos.end(), s.next[layer]);
    s.next[layer] += n;
    s.length[layer] += n;
    const AppendRequest r{TensorRef::Of(k), TensorRef::Of(v), pos};
    const absl::Status sm = mirrored_->Append(s.mirrored, layer, r);
    INFO(sm.ToString());
    REQUIRE(sm.ok());
    REQUIRE(staged_->Append(s.staged, layer, r).ok());
  }
  // Keeps every other token of every stream of `layer` (and the last), storing `channels` key
  // channels (empty: all) for all but the last `full_width_recent` kept tokens.
  void Prune(Seq& s, int32_t layer, const std::vector<int32_t>& channels,
             int32_t full_width_recent) {
    EvictionPlan a{.sequence = s.mirrored};
    for (int32_t h = 0; h < c_.num_kv_heads; ++h) {
      StreamPlan p;
      p.layer = layer;
      p.kv_head = h;
      for (int32_t t = 0; t < s.length[layer]; t += 2) p.kept.push_back(t);
      if (p.kept.back() != s.length[layer] - 1) p.kept.push_back(s.length[layer] - 1);
      p.key_channels = channels;
      p.full_width_recent = full_width_recent;
      a.streams.push_back(p);
    }
    EvictionPlan b = a;
    b.sequence = s.staged;
    REQUIRE(mirrored_->Apply(a).ok());
    REQUIRE(staged_->Apply(b).ok());
    s.length[layer] = static_cast<int32_t>(a.streams[0].kept.size());
  }
  struct Plans {
    DecodePlan mirrored;
    DecodePlan staged;
  };
  Plans Prepare(const std::vector<Seq>& batch) {
    std::vector<SequenceId> a, b;
    for (const Seq& s : batch) {
      a.push_back(s.mirrored);
      b.push_back(s.staged);
    }
    Plans p;
    absl::StatusOr<DecodePlan> pa = mirrored_->PrepareDecode(a);
    absl::StatusOr<DecodePlan> pb = staged_->PrepareDecode(b);
    REQUIRE(pa.ok());
    REQUIRE(pb.ok());
    p.mirrored = *std::move(pa);
    p.staged = *std::move(pb);
    return p;
  }
  // Decodes `layer` with both plans (same q) and requires equal out and lse; returns the bytes
  // the mirrored call uploaded (emulator only, else 0).
  int64_t Decode(Plans& p, int32_t layer, std::mt19937& rng) {
    const size_t b = p.mirrored.batch().size();
    const std::vector<float> q =
        testing::RandomVector(rng, b * size_t(c_.num_q_heads) * c_.head_dim);
    std::vector<float> out_m(q.size()), out_s(q.size());
    std::vector<float> lse_m(b * c_.num_q_heads), lse_s(b * c_.num_q_heads);
    const int64_t before = UploadedBytes();
    const absl::Status sm = mirrored_->DecodeAttention(p.mirrored, layer, q, out_m, lse_m);
    const int64_t uploaded = UploadedBytes() - before;
    INFO(sm.ToString());
    REQUIRE(sm.ok());
    REQUIRE(staged_->DecodeAttention(p.staged, layer, q, out_s, lse_s).ok());
    REQUIRE(out_m == out_s);
    REQUIRE(lse_m == lse_s);
    return uploaded;
  }
  static int64_t UploadedBytes() {
#if KVCACHE_HAVE_CUDA_EMULATED
    if (Emulated()) return cuda_emu::HostToDeviceBytes();
#endif
    return 0;
  }

 private:
  CacheConfig c_;
  std::unique_ptr<Cache> mirrored_;
  std::unique_ptr<Cache> staged_;
};

std::vector<int32_t> HalfTheChannels(int32_t head_dim) {
  std::vector<int32_t> channels;
  for (int32_t i = 1; i < head_dim; i += 2) channels.push_back(i);
  channels.resize(channels.size() - 3);  // an odd count (unaligned value rows)
  return channels;
}

TEST_CASE("cuda view mirror: decode equals full staging through appends, pruning, Apply, "
          "Fork, Free and mirror resets",
          "[cuda][mirror]") {
  KVCACHE_CUDA_CASE();
  // The default mirror, and one so small that it resets (and grows) again and again.
  const int64_t mirror_bytes = GENERATE(int64_t{1} << 20, int64_t{256});
  INFO("mirror min bytes " << mirror_bytes);
  const CacheConfig c = Config();
  Twin twin(c, mirror_bytes);
  const int64_t resets_before = MirrorResets();
  std::mt19937 rng(17);
  std::vector<Seq> seqs;
  for (int i = 0; i < 3; ++i) {
    seqs.push_back(twin.Add());
    for (int32_t l = 0; l < c.num_layers; ++l) twin.Append(seqs.back(), l, 9 + 6 * i, rng);
  }
  {
    Twin::Plans p = twin.Prepare(seqs);
    for (int32_t l = 0; l < c.num_layers; ++l) twin.Decode(p, l, rng);
    twin.Decode(p, 1, rng);  // nothing changed
    // Decode steps: one token per step (within a page, then across), and a burst of 11.
    for (int step = 0; step < 6; ++step) {
      for (int32_t l = 0; l < c.num_layers; ++l) {
        for (Seq& s : seqs) twin.Append(s, l, step == 3 ? 11 : 1, rng);
        twin.Decode(p, l, rng);
      }
    }
  }
  // Apply: new versions (full re-mirror). Layer 1 of sequence 0 pruned to a narrow segment only
  // (the next Append opens a full-width segment after it, within that version); layer 0 of
  // sequence 1 to a narrow segment plus a full-width tail that keeps growing.
  twin.Prune(seqs[0], 1, HalfTheChannels(c.head_dim), 0);
  twin.Prune(seqs[1], 0, HalfTheChannels(c.head_dim), 3);
  {
    Twin::Plans p = twin.Prepare(seqs);
    for (int32_t l = 0; l < c.num_layers; ++l) twin.Decode(p, l, rng);
    for (int step = 0; step < 3; ++step) {
      for (int32_t l = 0; l < c.num_layers; ++l) {
        for (Seq& s : seqs) twin.Append(s, l, 1 + step, rng);
        twin.Decode(p, l, rng);
      }
    }
  }
  // Fork with a partly filled tail page: appending to the parent replaces its tail page
  // (copy-on-write) without a version change; the mirror must see the new page id.
  while (seqs[2].length[0] % c.page_tokens == 0 || seqs[2].length[1] % c.page_tokens == 0) {
    for (int32_t l = 0; l < c.num_layers; ++l) twin.Append(seqs[2], l, 1, rng);
  }
  {
    Twin::Plans p = twin.Prepare(seqs);
    for (int32_t l = 0; l < c.num_layers; ++l) twin.Decode(p, l, rng);  // mirror the parent
    Seq child = twin.Fork(seqs[2]);
    for (int32_t l = 0; l < c.num_layers; ++l) {
      twin.Append(seqs[2], l, 1, rng);  // copy-on-write of the parent's tail page
      twin.Decode(p, l, rng);
    }
    std::vector<Seq> with_child = {seqs[2], child, seqs[0]};
    Twin::Plans q = twin.Prepare(with_child);
    for (int32_t l = 0; l < c.num_layers; ++l) {
      twin.Decode(q, l, rng);
      twin.Append(with_child[1], l, 2, rng);  // the child's own copy
      twin.Append(with_child[0], l, 1, rng);
      twin.Decode(q, l, rng);
    }
    twin.Free(with_child[1]);
    seqs[2] = with_child[0];
  }
  // Free, and a new sequence that reuses the freed pages.
  twin.Free(seqs[1]);
  seqs[1] = twin.Add();
  for (int32_t l = 0; l < c.num_layers; ++l) twin.Append(seqs[1], l, 30, rng);
  {
    Twin::Plans p = twin.Prepare(seqs);
    for (int step = 0; step < 4; ++step) {
      for (int32_t l = 0; l < c.num_layers; ++l) {
        for (Seq& s : seqs) twin.Append(s, l, 1, rng);
        twin.Decode(p, l, rng);
      }
    }
  }
  // One-shot decodes read the versions from the table.
  std::vector<SequenceId> ids;
  for (const Seq& s : seqs) ids.push_back(s.mirrored);
  const int64_t n = int64_t(ids.size()) * c.num_q_heads * c.head_dim;
  const std::vector<float> q = testing::RandomVector(rng, n);
  std::vector<float> one_shot(n), planned(n);
  REQUIRE(twin.mirrored().DecodeAttention(ids, 1, q, one_shot).ok());
  DecodePlan plan = *twin.mirrored().PrepareDecode(ids);
  REQUIRE(twin.mirrored().DecodeAttention(plan, 1, q, planned).ok());
  REQUIRE(one_shot == planned);
  if (mirror_bytes < kDefaultMirrorBytes) {
    // The small mirror filled up and was reset (the first reset is the first use, which sizes
    // it), and the results stayed equal.
    CHECK(MirrorResets() - resets_before >= 2);
  }
}

#if KVCACHE_HAVE_CUDA_EMULATED
TEST_CASE("cuda view mirror: a decode uploads only new page ids and the per-segment structs",
          "[cuda][mirror]") {
  KVCACHE_CUDA_CASE();
  if (!Emulated()) return;  // upload bytes are counted by the emulator
  CacheConfig c = Config();
  c.page_tokens = 16;
  Twin twin(c, kDefaultMirrorBytes);
  std::mt19937 rng(5);
  // Streams of 32 (two full pages), 40 and 48 (three full pages) tokens: one more token opens a
  // page in sequences 0 and 2 (2 kv heads each) and not in sequence 1.
  std::vector<Seq> seqs;
  for (int n : {32, 40, 48}) {
    seqs.push_back(twin.Add());
    for (int32_t l = 0; l < c.num_layers; ++l) twin.Append(seqs.back(), l, n, rng);
  }
  Twin::Plans p = twin.Prepare(seqs);
  const int64_t streams = int64_t(seqs.size()) * c.num_kv_heads;
  const int64_t segments = streams;  // one segment per stream
  const int64_t q_bytes = int64_t(seqs.size()) * c.num_q_heads * c.head_dim * 4;
  // What a call stages besides page ids: SegmentView structs, CSR offsets (int32), token
  // offsets (int64), the host q; each block 16-byte aligned in the staging blob.
  const int64_t structs = segments * int64_t(sizeof(SegmentView)) + (streams + 1) * 4 +
                          (streams + 1) * 8 + q_bytes;
  const int64_t structs_bound = structs + 4 * 15;
  const int64_t first = twin.Decode(p, 1, rng);
  const int64_t total_pages = 2 * (2 + 3 + 3);
  CHECK(first >= structs + total_pages * 4);  // the first call mirrors every page id
  const int64_t again = twin.Decode(p, 1, rng);
  CHECK(again >= structs);
  CHECK(again <= structs_bound);  // no page id
  for (Seq& s : seqs) twin.Append(s, 1, 1, rng);
  const int64_t grown = twin.Decode(p, 1, rng);
  // 4 new page ids (sequences 0 and 2, 2 heads each) and one copy job each.
  const int64_t delta = 4 * (4 + int64_t(sizeof(cuda_emulated::MirrorCopy)));
  CHECK(grown >= structs + delta);
  CHECK(grown <= structs_bound + delta + 2 * 15);
  // Appends within the page: nothing but the structs again.
  for (Seq& s : seqs) twin.Append(s, 1, 1, rng);
  const int64_t within = twin.Decode(p, 1, rng);
  CHECK(within <= structs_bound);
  // Copy-on-write after a fork re-uploads exactly the replaced page id of each parent stream.
  Seq child = twin.Fork(seqs[1]);  // 42 tokens: a partly filled tail page
  twin.Append(seqs[1], 1, 1, rng);
  const int64_t cow = twin.Decode(p, 1, rng);
  const int64_t cow_delta = 2 * (4 + int64_t(sizeof(cuda_emulated::MirrorCopy)));
  CHECK(cow >= structs + cow_delta);
  CHECK(cow <= structs_bound + cow_delta + 2 * 15);
  twin.Free(child);
}
#endif  // KVCACHE_HAVE_CUDA_EMULATED

#endif  // KVCACHE_TEST_DEVICE_MEMORY

TEST_CASE("cuda view mirror: no CUDA backend", "[cuda][mirror]") { (void)CudaBackend(); }

}  // namespace
}  // namespace kvcache
