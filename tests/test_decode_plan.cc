// Tests for kvcache/decode_plan.h: plan once per step, run per layer. The per-layer call must
// not allocate (counted with a replacement global operator new), must see appends made after
// PrepareDecode (the engine appends token t's K/V for layer l, then decodes layer l), must give
// exactly the one-shot DecodeAttention result, and must refuse with FailedPrecondition once a
// stream of the batch was rebuilt by Apply or its sequence freed. Also the stream versions behind
// that rule (Append keeps a version, Apply changes it, Fork gets its own).
#include <oneapi/tbb/task_arena.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdlib>
#include <new>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvcache/cache.h"
#include "test_util.h"

// ---- Counting allocator -----------------------------------------------------------------------
// Every global operator new of this test binary goes through here; while g_counting is set, each
// allocation (from any thread) is counted.

namespace {
std::atomic<bool> g_counting{false};
std::atomic<int64_t> g_allocations{0};

void* CountedAlloc(std::size_t size, std::size_t align) {
  if (g_counting.load(std::memory_order_relaxed)) {
    g_allocations.fetch_add(1, std::memory_order_relaxed);
  }
  if (size == 0) size = 1;
  void* p = align > alignof(std::max_align_t)
                ? std::aligned_alloc(align, (size + align - 1) / align * align)
                : std::malloc(size);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
}  // namespace

void* operator new(std::size_t size) { return CountedAlloc(size, 0); }
void* operator new[](std::size_t size) { return CountedAlloc(size, 0); }
void* operator new(std::size_t size, std::align_val_t a) {
  return CountedAlloc(size, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t size, std::align_val_t a) {
  return CountedAlloc(size, static_cast<std::size_t>(a));
}
// The nothrow forms too: one left to the runtime (or to ASan's interceptors) would hand out
// memory our operator delete then frees with a mismatched allocator.
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return CountedAlloc(size, 0);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  try {
    return CountedAlloc(size, 0);
  } catch (...) {
    return nullptr;
  }
}
void* operator new(std::size_t size, std::align_val_t a, const std::nothrow_t&) noexcept {
  try {
    return CountedAlloc(size, static_cast<std::size_t>(a));
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t size, std::align_val_t a, const std::nothrow_t&) noexcept {
  try {
    return CountedAlloc(size, static_cast<std::size_t>(a));
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  std::free(p);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

using namespace kvcache;
using kvcache::testing::FromBits;
using kvcache::testing::RandomVector;
using kvcache::testing::ToBits;

namespace {

// Allocations made by fn() (any thread).
template <typename Fn>
int64_t CountAllocations(Fn&& fn) {
  g_allocations.store(0);
  g_counting.store(true);
  fn();
  g_counting.store(false);
  return g_allocations.load();
}

CacheConfig Config(int layers = 4) {
  CacheConfig c;
  c.num_layers = layers;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 16;
  c.dtype = DType::kF16;
  c.page_tokens = 8;
  c.num_pages = 2048;
  return c;
}

// Appends `n` tokens at positions [first, first + n) to one layer of a sequence.
void AppendTokens(Cache& cache, SequenceId seq, int32_t layer, int n, int first,
                  std::mt19937& rng) {
  REQUIRE(kvcache::testing::AppendRandomTokens(cache, seq, layer, n, first, rng).ok());
}

void AppendAllLayers(Cache& cache, SequenceId seq, int n, int first, std::mt19937& rng) {
  for (int32_t l = 0; l < cache.config().num_layers; ++l)
    AppendTokens(cache, seq, l, n, first, rng);
}

size_t QSize(const Cache& cache, size_t batch) {
  return batch * cache.config().num_q_heads * cache.config().head_dim;
}

// out / lse against dense attention over the streams as ReadStream returns them now (an oracle
// independent of the decode path), so a plan that missed an appended token fails here.
void RequireMatchesOracle(const Cache& cache, const std::vector<SequenceId>& batch, int32_t layer,
                          const std::vector<float>& q, const std::vector<float>& out,
                          const std::vector<float>& lse) {
  const CacheConfig& c = cache.config();
  const int32_t d = c.head_dim, group = c.num_q_heads / c.num_kv_heads;
  for (size_t b = 0; b < batch.size(); ++b) {
    for (int32_t h = 0; h < c.num_kv_heads; ++h) {
      const StreamContents sc = *cache.ReadStream(batch[b], layer, h);
      for (int32_t g = 0; g < group; ++g) {
        const size_t row = b * c.num_q_heads + h * group + g;
        std::vector<float> expected(d);
        float expected_lse = 0.0f;
        kvcache::testing::DenseAttention(q.data() + row * d, sc.keys, sc.values, sc.length, d,
                                         1.0f / std::sqrt(float(d)), expected.data(),
                                         &expected_lse);
        for (int32_t ch = 0; ch < d; ++ch) {
          REQUIRE(out[row * d + ch] == Approx(expected[ch]).margin(1e-4));
        }
        REQUIRE(lse[row] == Approx(expected_lse).margin(1e-4));
      }
    }
  }
}

}  // namespace

TEST_CASE("the counting allocator sees allocations (the no-allocation checks can fail)",
          "[decode_plan]") {
  const int64_t n = CountAllocations([] {
    std::vector<int> v(3);
    REQUIRE(v.size() == 3);
  });
  REQUIRE(n == 1);
}

// The "cpu" backend (the fast kernels, the engine path). "cpu-reference" is the scalar test
// oracle and allocates its scratch per call by design.
TEST_CASE("a per-layer decode call with a plan does not allocate (cpu backend)",
          "[decode_plan][alloc]") {
  for (const char* backend : {"cpu"}) {
    INFO(backend);
    auto cache = *Cache::Create(Config(), backend);
    std::mt19937 rng(3);
    std::vector<SequenceId> batch;
    for (int b = 0; b < 3; ++b) {
      batch.push_back(*cache->AddSequence());
      AppendAllLayers(*cache, batch.back(), 40 + 7 * b, 0, rng);
    }
    const std::vector<float> q = RandomVector(rng, QSize(*cache, batch.size()));
    std::vector<float> out(q.size());
    std::vector<float> lse(batch.size() * cache->config().num_q_heads);
    // One task arena thread: the kernels' thread-local scratch belongs to this thread only, so
    // it is grown by the warm-up step and reused after (steady state of an engine's decode loop).
    tbb::task_arena arena(1);
    arena.execute([&] {
      absl::StatusOr<DecodePlan> plan = cache->PrepareDecode(batch);
      REQUIRE(plan.ok());
      for (int32_t l = 0; l < cache->config().num_layers; ++l) {  // warm-up step
        REQUIRE(cache->DecodeAttention(*plan, l, q, out, lse).ok());
      }
      for (bool accumulate : {false, true}) {
        DecodeOptions options;
        options.accumulate_scores = accumulate;
        if (accumulate) {  // warm the score path's buffers too
          REQUIRE(cache->DecodeAttention(*plan, 0, q, out, lse, options).ok());
        }
        absl::Status status;
        const int64_t allocations = CountAllocations([&] {
          for (int32_t l = 0; l < cache->config().num_layers && status.ok(); ++l) {
            status = cache->DecodeAttention(*plan, l, q, out, lse, options);
          }
        });
        INFO("accumulate_scores " << accumulate);
        REQUIRE(status.ok());
        REQUIRE(allocations == 0);
      }
      // f16 / bf16 host q and out go through the plan's f32 scratch: still no allocation.
      const std::vector<uint16_t> q16 = ToBits(q, DType::kF16);
      const std::vector<uint16_t> qb16 = ToBits(q, DType::kBF16);
      std::vector<uint16_t> out16(q.size());
      for (auto [q_dtype, out_dtype] :
           {std::pair{DType::kF16, DType::kF16}, std::pair{DType::kBF16, DType::kBF16},
            std::pair{DType::kF32, DType::kBF16}, std::pair{DType::kF16, DType::kF32}}) {
        const TensorRef q_ref = q_dtype == DType::kF32   ? TensorRef::Of(q)
                                : q_dtype == DType::kF16 ? TensorRef::Of(q16, DType::kF16)
                                                         : TensorRef::Of(qb16, DType::kBF16);
        const MutableTensorRef out_ref = out_dtype == DType::kF32
                                             ? MutableTensorRef::Of(out)
                                             : MutableTensorRef::Of(out16, out_dtype);
        absl::Status status;
        const int64_t allocations = CountAllocations([&] {
          for (int32_t l = 0; l < cache->config().num_layers && status.ok(); ++l) {
            status = cache->DecodeAttention(*plan, l, q_ref, out_ref, MutableTensorRef::Of(lse));
          }
        });
        INFO("q " << DTypeName(q_dtype) << ", out " << DTypeName(out_dtype));
        REQUIRE(status.ok());
        REQUIRE(allocations == 0);
      }
    });
  }
}

TEST_CASE("plan reuse across layers equals the one-shot call, with appends after PrepareDecode",
          "[decode_plan]") {
  auto cache = *Cache::Create(Config(), "cpu");
  std::mt19937 rng(5);
  std::vector<SequenceId> batch;
  for (int b = 0; b < 2; ++b) {
    batch.push_back(*cache->AddSequence());
    AppendAllLayers(*cache, batch.back(), 30 + 11 * b, 0, rng);
  }
  int next_position = 100;
  for (int step = 0; step < 3; ++step, ++next_position) {
    absl::StatusOr<DecodePlan> plan = cache->PrepareDecode(batch);
    REQUIRE(plan.ok());
    REQUIRE(plan->num_layers() == cache->config().num_layers);
    REQUIRE(std::vector<SequenceId>(plan->batch().begin(), plan->batch().end()) == batch);
    for (int32_t l = 0; l < cache->config().num_layers; ++l) {
      // The engine's order: this step's token for layer l, then layer l's attention.
      for (SequenceId s : batch) AppendTokens(*cache, s, l, 1, next_position, rng);
      const std::vector<float> q = RandomVector(rng, QSize(*cache, batch.size()));
      std::vector<float> planned(q.size()), one_shot(q.size());
      std::vector<float> planned_lse(batch.size() * 4), one_shot_lse(batch.size() * 4);
      REQUIRE(cache->DecodeAttention(*plan, l, q, planned, planned_lse).ok());
      REQUIRE(cache->DecodeAttention(batch, l, q, one_shot, one_shot_lse).ok());
      REQUIRE(planned == one_shot);
      REQUIRE(planned_lse == one_shot_lse);
      RequireMatchesOracle(*cache, batch, l, q, planned, planned_lse);
    }
  }
}

TEST_CASE("a plan sees the segment an Append opens on an empty stream", "[decode_plan]") {
  auto cache = *Cache::Create(Config(2), "cpu");
  std::mt19937 rng(7);
  const SequenceId seq = *cache->AddSequence();
  const std::vector<SequenceId> batch{seq};
  absl::StatusOr<DecodePlan> plan = cache->PrepareDecode(batch);  // every stream empty
  REQUIRE(plan.ok());
  AppendTokens(*cache, seq, 0, 5, 0, rng);
  const std::vector<float> q = RandomVector(rng, QSize(*cache, 1));
  std::vector<float> planned(q.size()), one_shot(q.size());
  REQUIRE(cache->DecodeAttention(*plan, 0, q, planned).ok());
  REQUIRE(cache->DecodeAttention(batch, 0, q, one_shot).ok());
  REQUIRE(planned == one_shot);
  REQUIRE(std::any_of(planned.begin(), planned.end(), [](float x) { return x != 0.0f; }));
}

TEST_CASE("Append keeps a stream's version, Apply changes it, Fork gets its own",
          "[decode_plan][version]") {
  auto cache = *Cache::Create(Config(2), "cpu");
  std::mt19937 rng(9);
  const SequenceId seq = *cache->AddSequence();
  AppendAllLayers(*cache, seq, 20, 0, rng);
  const uint64_t v0 = *cache->StreamVersion(seq, 0, 0);
  const uint64_t v1 = *cache->StreamVersion(seq, 0, 1);
  REQUIRE(v0 != v1);
  AppendTokens(*cache, seq, 0, 3, 50, rng);
  REQUIRE(*cache->StreamVersion(seq, 0, 0) == v0);

  // An identity plan changes nothing, so the version stays.
  EvictionPlan identity{.sequence = seq};
  identity.streams.push_back({.layer = 0, .kv_head = 0});
  for (int32_t t = 0; t < 23; ++t) identity.streams[0].kept.push_back(t);
  REQUIRE(cache->Apply(identity).ok());
  REQUIRE(*cache->StreamVersion(seq, 0, 0) == v0);

  EvictionPlan evict{.sequence = seq};
  evict.streams.push_back({.layer = 0, .kv_head = 0, .kept = {0, 1, 5, 22}});
  REQUIRE(cache->Apply(evict).ok());
  const uint64_t v0_after = *cache->StreamVersion(seq, 0, 0);
  REQUIRE(v0_after != v0);
  REQUIRE(*cache->StreamVersion(seq, 0, 1) == v1);  // untouched stream

  const SequenceId child = *cache->Fork(seq);
  REQUIRE(*cache->StreamVersion(seq, 0, 0) == v0_after);
  REQUIRE(*cache->StreamVersion(child, 0, 0) != v0_after);
  REQUIRE(*cache->StreamVersion(child, 0, 1) != v1);
  REQUIRE(cache->StreamVersion(seq, 2, 0).status().code() == absl::StatusCode::kOutOfRange);
  REQUIRE(cache->StreamVersion(999, 0, 0).status().code() == absl::StatusCode::kNotFound);
  REQUIRE(cache->Validate().ok());
}

TEST_CASE("a plan is refused after Apply or Free of its batch, kept after Fork",
          "[decode_plan][errors]") {
  auto cache = *Cache::Create(Config(2), "cpu");
  std::mt19937 rng(11);
  const SequenceId a = *cache->AddSequence(), b = *cache->AddSequence();
  AppendAllLayers(*cache, a, 24, 0, rng);
  AppendAllLayers(*cache, b, 17, 0, rng);
  const std::vector<SequenceId> batch{a, b};
  const std::vector<float> q = RandomVector(rng, QSize(*cache, 2));
  std::vector<float> out(q.size(), 7.0f);

  absl::StatusOr<DecodePlan> plan = cache->PrepareDecode(batch);
  REQUIRE(plan.ok());
  (void)*cache->Fork(a);  // the parent keeps its versions
  REQUIRE(cache->DecodeAttention(*plan, 0, q, out).ok());

  EvictionPlan evict{.sequence = b};
  evict.streams.push_back({.layer = 1, .kv_head = 1, .kept = {0, 3, 16}});
  REQUIRE(cache->Apply(evict).ok());
  REQUIRE(cache->DecodeAttention(*plan, 0, q, out).ok());  // layer 0 untouched
  std::fill(out.begin(), out.end(), 7.0f);
  absl::Status s = cache->DecodeAttention(*plan, 1, q, out);
  INFO(s.ToString());
  REQUIRE(s.code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE(s.message().find("prepare again") != std::string_view::npos);
  REQUIRE(std::all_of(out.begin(), out.end(), [](float x) { return x == 7.0f; }));  // not run

  absl::StatusOr<DecodePlan> fresh = cache->PrepareDecode(batch);
  REQUIRE(fresh.ok());
  REQUIRE(cache->DecodeAttention(*fresh, 1, q, out).ok());
  REQUIRE(cache->Free(a).ok());
  s = cache->DecodeAttention(*fresh, 0, q, out);
  REQUIRE(s.code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE(s.message().find("freed") != std::string_view::npos);
  // The one-shot call keeps its NotFound for an unknown sequence.
  REQUIRE(cache->DecodeAttention(batch, 0, q, out).code() == absl::StatusCode::kNotFound);
}

TEST_CASE("PrepareDecode and planned calls reject bad input", "[decode_plan][errors]") {
  auto cache = *Cache::Create(Config(2), "cpu");
  auto other = *Cache::Create(Config(2), "cpu");
  std::mt19937 rng(13);
  const SequenceId a = *cache->AddSequence();
  AppendAllLayers(*cache, a, 9, 0, rng);
  REQUIRE(cache->PrepareDecode({}).status().code() == absl::StatusCode::kInvalidArgument);
  const std::vector<SequenceId> twice{a, a};
  REQUIRE(cache->PrepareDecode(twice).status().code() == absl::StatusCode::kInvalidArgument);
  const std::vector<SequenceId> unknown{a, 77};
  REQUIRE(cache->PrepareDecode(unknown).status().code() == absl::StatusCode::kNotFound);

  const std::vector<SequenceId> batch{a};
  DecodePlan plan = *cache->PrepareDecode(batch);
  const std::vector<float> q = RandomVector(rng, QSize(*cache, 1));
  std::vector<float> out(q.size());
  REQUIRE(cache->DecodeAttention(plan, 2, q, out).code() == absl::StatusCode::kOutOfRange);
  std::vector<float> short_out(out.size() - 1);
  REQUIRE(cache->DecodeAttention(plan, 0, q, short_out).code() ==
          absl::StatusCode::kInvalidArgument);
  REQUIRE(other->DecodeAttention(plan, 0, q, out).code() == absl::StatusCode::kInvalidArgument);
  DecodePlan moved = std::move(plan);
  REQUIRE(!plan.valid());  // NOLINT(bugprone-use-after-move): the moved-from state is the point
  REQUIRE(cache->DecodeAttention(plan, 0, q, out).code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(cache->DecodeAttention(moved, 0, q, out).ok());
}

// Host f16 / bf16 q and out on every host backend: exactly the f32 decode of the widened q,
// rounded to the out dtype (the Cache converts; the kernels are the f32 ones), planned and
// one-shot alike.
TEST_CASE("f16 and bf16 host q and out equal the f32 decode, converted", "[decode_plan][dtype]") {
  for (const char* backend : {"cpu", "cpu-reference"}) {
    INFO(backend);
    auto cache = *Cache::Create(Config(2), backend);
    std::mt19937 rng(17);
    std::vector<SequenceId> batch;
    for (int b = 0; b < 2; ++b) {
      batch.push_back(*cache->AddSequence());
      AppendAllLayers(*cache, batch.back(), 21 + 9 * b, 0, rng);
    }
    DecodePlan plan = *cache->PrepareDecode(batch);
    const std::vector<float> q_raw = RandomVector(rng, QSize(*cache, batch.size()));
    const size_t n_lse = batch.size() * cache->config().num_q_heads;
    for (DType q_dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
      for (DType out_dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
        INFO("q " << DTypeName(q_dtype) << ", out " << DTypeName(out_dtype));
        const std::vector<uint16_t> q_bits =
            ToBits(q_raw, q_dtype == DType::kF32 ? DType::kF16 : q_dtype);
        const std::vector<float> q =
            q_dtype == DType::kF32 ? q_raw : FromBits(q_bits, q_dtype);  // the widened q
        std::vector<float> expected(q.size()), expected_lse(n_lse);
        REQUIRE(cache->DecodeAttention(plan, 1, q, expected, expected_lse).ok());
        const TensorRef q_ref =
            q_dtype == DType::kF32 ? TensorRef::Of(q_raw) : TensorRef::Of(q_bits, q_dtype);
        for (bool planned : {true, false}) {
          INFO("planned " << planned);
          std::vector<float> out32(q.size(), 9.0f), lse(n_lse, 9.0f);
          std::vector<uint16_t> out16(q.size(), 0xFFFF);
          const MutableTensorRef out_ref = out_dtype == DType::kF32
                                               ? MutableTensorRef::Of(out32)
                                               : MutableTensorRef::Of(out16, out_dtype);
          const absl::Status s =
              planned ? cache->DecodeAttention(plan, 1, q_ref, out_ref, MutableTensorRef::Of(lse))
                      : cache->DecodeAttention(batch, 1, q_ref, out_ref, MutableTensorRef::Of(lse));
          INFO(s.ToString());
          REQUIRE(s.ok());
          REQUIRE(lse == expected_lse);
          if (out_dtype == DType::kF32) {
            REQUIRE(out32 == expected);
          } else {
            REQUIRE(out16 == ToBits(expected, out_dtype));
          }
        }
      }
    }
  }
}

TEST_CASE("tensor refs: device tensors, streams and bad sizes or dtypes are refused on cpu",
          "[decode_plan][dtype][errors]") {
  auto cache = *Cache::Create(Config(2), "cpu");
  std::mt19937 rng(19);
  const SequenceId a = *cache->AddSequence();
  AppendAllLayers(*cache, a, 12, 0, rng);
  const std::vector<SequenceId> batch{a};
  DecodePlan plan = *cache->PrepareDecode(batch);
  std::vector<float> q = RandomVector(rng, QSize(*cache, 1));
  std::vector<float> out(q.size(), 7.0f), lse(4, 7.0f);
  const auto untouched = [&] {
    return std::all_of(out.begin(), out.end(), [](float x) { return x == 7.0f; }) &&
           std::all_of(lse.begin(), lse.end(), [](float x) { return x == 7.0f; });
  };
  const auto expect = [&](absl::Status s, absl::StatusCode code, const std::string& needle) {
    INFO(s.ToString());
    REQUIRE(s.code() == code);
    REQUIRE(s.message().find(needle) != std::string_view::npos);
    REQUIRE(untouched());
  };
  const TensorRef hq = TensorRef::Of(q);
  const MutableTensorRef hout = MutableTensorRef::Of(out), hlse = MutableTensorRef::Of(lse);
  const int64_t n = static_cast<int64_t>(q.size());
  // Device tensors on a backend without them (the pointers are host memory: never read).
  expect(cache->DecodeAttention(plan, 0, TensorRef::OnDevice(q.data(), DType::kF32, n),
                                MutableTensorRef::OnDevice(out.data(), DType::kF32, n),
                                MutableTensorRef::OnDevice(lse.data(), DType::kF32, 4)),
         absl::StatusCode::kInvalidArgument, "cpu backend has no device tensors");
  expect(cache->DecodeAttention(batch, 0, TensorRef::OnDevice(q.data(), DType::kF32, n),
                                MutableTensorRef::OnDevice(out.data(), DType::kF32, n)),
         absl::StatusCode::kInvalidArgument, "cpu backend has no device tensors");
  // Mixed memory spaces.
  expect(cache->DecodeAttention(plan, 0, hq, MutableTensorRef::OnDevice(out.data(), DType::kF32, n),
                                hlse),
         absl::StatusCode::kInvalidArgument, "out is in device memory");
  // A stream on a backend without streams.
  int fake_stream = 0;
  DecodeOptions with_stream;
  with_stream.stream = &fake_stream;
  expect(cache->DecodeAttention(plan, 0, hq, hout, hlse, with_stream),
         absl::StatusCode::kInvalidArgument, "cpu backend has no streams");
  REQUIRE(cache->Synchronize().ok());
  REQUIRE(cache->Synchronize(&fake_stream).code() == absl::StatusCode::kInvalidArgument);
  // Sizes and dtypes.
  expect(cache->DecodeAttention(plan, 0, TensorRef{q.data(), DType::kF32, n - 1}, hout, hlse),
         absl::StatusCode::kInvalidArgument, "q has " + std::to_string(n - 1) + " elements");
  expect(
      cache->DecodeAttention(plan, 0, hq, MutableTensorRef{out.data(), DType::kF16, n + 1}, hlse),
      absl::StatusCode::kInvalidArgument, "out has " + std::to_string(n + 1) + " elements");
  expect(cache->DecodeAttention(plan, 0, hq, hout, MutableTensorRef{lse.data(), DType::kF16, 4}),
         absl::StatusCode::kInvalidArgument, "lse has dtype");
  expect(cache->DecodeAttention(plan, 0, hq, hout, MutableTensorRef{lse.data(), DType::kF32, 3}),
         absl::StatusCode::kInvalidArgument, "lse has 3 elements");
  expect(cache->DecodeAttention(plan, 0, TensorRef{q.data(), static_cast<DType>(7), n}, hout, hlse),
         absl::StatusCode::kInvalidArgument, "q has dtype 7");
  expect(cache->DecodeAttention(plan, 0, TensorRef{nullptr, DType::kF32, n}, hout, hlse),
         absl::StatusCode::kInvalidArgument, "null pointer");
  // Device K/V in Append: refused, the stream unchanged.
  const int32_t before = *cache->StreamLength(a, 0, 0);
  std::vector<float> kv(2 * 2 * 16, 1.0f);
  const std::vector<int32_t> positions{100, 101};
  AppendRequest req;
  req.keys = TensorRef::OnDevice(kv.data(), DType::kF32, static_cast<int64_t>(kv.size()));
  req.values = req.keys;
  req.positions = positions;
  absl::Status s = cache->Append(a, 0, req);
  INFO(s.ToString());
  REQUIRE(s.code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(s.message().find("cpu backend has no device tensors") != std::string_view::npos);
  req.values = TensorRef::Of(kv);
  REQUIRE(cache->Append(a, 0, req).code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(*cache->StreamLength(a, 0, 0) == before);
  REQUIRE(cache->DecodeAttention(plan, 0, hq, hout, hlse).ok());  // the plan still works
}
