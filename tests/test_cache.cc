// Tests for kvcache/cache.h: append/read back, fork with copy-on-write, compaction with channel
// selection and merges, and bad input that must leave the cache unchanged.
#include <catch2/catch.hpp>

#include <numeric>

#include "kvcache/cache.h"
#include "test_util.h"

using namespace kvcache;
using kvcache::testing::RandomVector;
using kvcache::testing::RoundTo;
using kvcache::testing::SameImage;
using kvcache::testing::Snapshot;

namespace {

CacheConfig SmallConfig(DType dtype = DType::kF32) {
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 8;
  c.dtype = dtype;
  c.page_tokens = 4;
  c.num_pages = 64;
  return c;
}

struct Batch {
  std::vector<float> k, v;
  std::vector<int32_t> pos;
  std::vector<Modality> mod;
  AppendRequest Request() const {
    return {TensorRef::Of(k), TensorRef::Of(v), pos, mod, {}};
  }
};

Batch MakeBatch(const CacheConfig& c, int n, int first_pos, std::mt19937& rng) {
  Batch b;
  b.k = RandomVector(rng, size_t(n) * c.num_kv_heads * c.head_dim);
  b.v = RandomVector(rng, size_t(n) * c.num_kv_heads * c.head_dim);
  for (int i = 0; i < n; ++i) {
    b.pos.push_back(first_pos + i);
    b.mod.push_back(i % 3 == 0 ? Modality::kImage : Modality::kText);
  }
  return b;
}

// Expected key of token t (batch-local) of head h after rounding to the cache dtype.
float Key(const CacheConfig& c, const Batch& b, int t, int h, int ch) {
  return RoundTo(c.dtype, b.k[(size_t(t) * c.num_kv_heads + h) * c.head_dim + ch]);
}
float Value(const CacheConfig& c, const Batch& b, int t, int h, int ch) {
  return RoundTo(c.dtype, b.v[(size_t(t) * c.num_kv_heads + h) * c.head_dim + ch]);
}

}  // namespace

TEST_CASE("append then read back returns every token of every head", "[cache]") {
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    CacheConfig c = SmallConfig(dtype);
    auto cache = *Cache::Create(c, "cpu");
    std::mt19937 rng(1);
    SequenceId s = *cache->AddSequence();
    Batch a = MakeBatch(c, 7, 0, rng), b = MakeBatch(c, 6, 7, rng);
    REQUIRE(cache->Append(s, 1, a.Request()).ok());
    REQUIRE(cache->Append(s, 1, b.Request()).ok());
    REQUIRE(cache->Validate().ok());
    for (int h = 0; h < c.num_kv_heads; ++h) {
      StreamContents sc = *cache->ReadStream(s, 1, h);
      REQUIRE(sc.length == 13);
      REQUIRE(sc.num_segments == 1);
      for (int t = 0; t < 13; ++t) {
        const Batch& src = t < 7 ? a : b;
        const int local = t < 7 ? t : t - 7;
        REQUIRE(sc.positions[t] == t);
        REQUIRE(sc.modalities[t] == src.mod[local]);
        REQUIRE(sc.scores[t] == 0.0f);
        for (int ch = 0; ch < c.head_dim; ++ch) {
          REQUIRE(sc.keys[t * c.head_dim + ch] == Key(c, src, local, h, ch));
          REQUIRE(sc.values[t * c.head_dim + ch] == Value(c, src, local, h, ch));
        }
      }
    }
    REQUIRE(*cache->StreamLength(s, 0, 0) == 0);  // layer 0 untouched
    // 13 tokens at 4 per page = 4 pages, per head.
    REQUIRE(cache->Stats().pages_used == 8);
    REQUIRE(cache->Stats().tokens_stored == 26);
  }
}

TEST_CASE("append converts f32 input to the cache dtype and f16 input is stored bit-exactly",
          "[cache]") {
  CacheConfig c = SmallConfig(DType::kF16);
  auto cache = *Cache::Create(c, "cpu");
  SequenceId s = *cache->AddSequence();
  const int n = 3, e = n * c.num_kv_heads * c.head_dim;
  std::vector<uint16_t> k(e), v(e);
  for (int i = 0; i < e; ++i) k[i] = FloatToHalfBits(0.25f * i), v[i] = FloatToHalfBits(-1.0f * i);
  std::vector<int32_t> pos{10, 20, 30};
  REQUIRE(cache->Append(s, 0, {TensorRef::Of(k, DType::kF16), TensorRef::Of(v, DType::kF16), pos})
              .ok());
  StreamContents sc = *cache->ReadStream(s, 0, 1);
  REQUIRE(sc.keys[0] == 0.25f * (1 * 8));  // token 0, head 1, channel 0
  REQUIRE(sc.values[2 * 8 + 3] == -1.0f * ((2 * 2 + 1) * 8 + 3));
}

TEST_CASE("admit masks store only the admitted tokens but advance the position", "[cache]") {
  CacheConfig c = SmallConfig();
  auto cache = *Cache::Create(c, "cpu");
  std::mt19937 rng(2);
  SequenceId s = *cache->AddSequence();
  Batch a = MakeBatch(c, 6, 0, rng);
  std::vector<uint8_t> admit{1, 0, 1, 1, 0, 1};
  AppendRequest r = a.Request();
  r.admit = admit;
  REQUIRE(cache->Append(s, 0, r).ok());
  StreamContents sc = *cache->ReadStream(s, 0, 0);
  REQUIRE(sc.positions == std::vector<int32_t>{0, 2, 3, 5});
  REQUIRE(sc.keys[1 * c.head_dim] == Key(c, a, 2, 0, 0));
  REQUIRE(sc.keys[3 * c.head_dim + 5] == Key(c, a, 5, 0, 5));
  std::vector<uint8_t> none(6, 0);
  Batch b = MakeBatch(c, 6, 6, rng);
  r = b.Request();
  r.admit = none;
  REQUIRE(cache->Append(s, 0, r).ok());
  REQUIRE(*cache->StreamLength(s, 0, 0) == 4);
  // The skipped tokens still advanced the layer's position.
  Batch again = MakeBatch(c, 1, 11, rng);
  REQUIRE(cache->Append(s, 0, again.Request()).code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(cache->Validate().ok());
}

TEST_CASE("fork shares pages and copies on write", "[cache][fork]") {
  CacheConfig c = SmallConfig();
  auto cache = *Cache::Create(c, "cpu");
  std::mt19937 rng(3);
  SequenceId parent = *cache->AddSequence();
  Batch a = MakeBatch(c, 6, 0, rng);  // 2 pages per stream, the second half full
  REQUIRE(cache->Append(parent, 0, a.Request()).ok());
  const int used = cache->Stats().pages_used;
  SequenceId child = *cache->Fork(parent);
  REQUIRE(cache->Stats().pages_used == used);  // nothing copied
  REQUIRE(cache->Validate().ok());
  Batch b = MakeBatch(c, 1, 6, rng), b2 = MakeBatch(c, 1, 6, rng);
  REQUIRE(cache->Append(child, 0, b.Request()).ok());
  // The child's shared half-full tail page was copied: one new page per stream.
  REQUIRE(cache->Stats().pages_used == used + c.num_kv_heads);
  REQUIRE(cache->Append(parent, 0, b2.Request()).ok());
  // The parent is now the tail page's sole owner and writes in place.
  REQUIRE(cache->Stats().pages_used == used + c.num_kv_heads);
  REQUIRE(cache->Validate().ok());
  for (int h = 0; h < c.num_kv_heads; ++h) {
    StreamContents pc = *cache->ReadStream(parent, 0, h), cc = *cache->ReadStream(child, 0, h);
    REQUIRE(pc.length == 7);
    REQUIRE(cc.length == 7);
    for (int t = 0; t < 6; ++t) {
      REQUIRE(pc.keys[t * 8] == Key(c, a, t, h, 0));
      REQUIRE(cc.keys[t * 8] == Key(c, a, t, h, 0));
    }
    REQUIRE(pc.keys[6 * 8 + 1] == Key(c, b2, 0, h, 1));
    REQUIRE(cc.keys[6 * 8 + 1] == Key(c, b, 0, h, 1));
  }
  REQUIRE(cache->Free(parent).ok());
  REQUIRE(cache->Validate().ok());
  REQUIRE(cache->ReadStream(child, 0, 0)->length == 7);
  REQUIRE(cache->Free(child).ok());
  REQUIRE(cache->pool().NumFree() == c.num_pages);
  REQUIRE(cache->Free(child).code() == absl::StatusCode::kNotFound);
}

TEST_CASE("apply compacts kept tokens into fresh pages and frees the old ones", "[cache][apply]") {
  CacheConfig c = SmallConfig();
  auto cache = *Cache::Create(c, "cpu");
  std::mt19937 rng(4);
  SequenceId s = *cache->AddSequence();
  Batch a = MakeBatch(c, 16, 100, rng);  // 4 pages per stream
  REQUIRE(cache->Append(s, 0, a.Request()).ok());
  std::vector<float> bump(16);
  std::iota(bump.begin(), bump.end(), 1.0f);
  REQUIRE(cache->AddScores(s, 0, 1, bump).ok());
  const int free_before = cache->pool().NumFree();
  EvictionPlan plan{.sequence = s};
  plan.streams.push_back({.layer = 0, .kv_head = 1, .kept = {0, 3, 4, 9, 15}});
  REQUIRE(cache->Apply(plan).ok());
  REQUIRE(cache->Validate().ok());
  REQUIRE(cache->pool().NumFree() == free_before + 4 - 2);  // 5 tokens need 2 pages
  StreamContents sc = *cache->ReadStream(s, 0, 1);
  REQUIRE(sc.positions == std::vector<int32_t>{100, 103, 104, 109, 115});
  REQUIRE(sc.scores == std::vector<float>{1, 4, 5, 10, 16});
  for (int i = 0; i < 5; ++i) {
    const int t = sc.positions[i] - 100;
    REQUIRE(sc.modalities[i] == a.mod[t]);
    for (int ch = 0; ch < 8; ++ch) {
      REQUIRE(sc.keys[i * 8 + ch] == Key(c, a, t, 1, ch));
      REQUIRE(sc.values[i * 8 + ch] == Value(c, a, t, 1, ch));
    }
  }
  REQUIRE(cache->ReadStream(s, 0, 0)->length == 16);  // the other head is untouched
  // Appending after compaction continues the compacted segment.
  Batch b = MakeBatch(c, 2, 116, rng);
  REQUIRE(cache->Append(s, 0, b.Request()).ok());
  REQUIRE(cache->ReadStream(s, 0, 1)->num_segments == 1);
  REQUIRE(cache->ReadStream(s, 0, 1)->length == 7);
  // Keeping nothing empties the stream.
  plan.streams[0].kept.clear();
  REQUIRE(cache->Apply(plan).ok());
  REQUIRE(*cache->StreamLength(s, 0, 1) == 0);
  REQUIRE(cache->Validate().ok());
}

TEST_CASE("channel-pruned segments store fewer channels in fewer pages", "[cache][apply]") {
  CacheConfig c = SmallConfig(DType::kF16);
  c.head_dim = 16;
  c.page_tokens = 4;  // full row 64 bytes -> 256-byte pages
  auto cache = *Cache::Create(c, "cpu");
  std::mt19937 rng(5);
  SequenceId s = *cache->AddSequence();
  Batch a = MakeBatch(c, 24, 0, rng);  // 6 pages per stream
  REQUIRE(cache->Append(s, 0, a.Request()).ok());
  std::vector<int32_t> kept(24);
  std::iota(kept.begin(), kept.end(), 0);
  EvictionPlan plan{.sequence = s};
  // Keep 8 of 16 key channels for all but the last 4 tokens: rows of (8 + 16) * 2 = 48 bytes,
  // 5 per page -> 4 pages for 20 tokens, plus 1 full-width page for the 4 recent ones.
  plan.streams.push_back({.layer = 0,
                          .kv_head = 0,
                          .kept = kept,
                          .key_channels = {0, 2, 4, 6, 8, 10, 12, 14},
                          .full_width_recent = 4});
  const int free_before = cache->pool().NumFree();
  REQUIRE(cache->Apply(plan).ok());
  REQUIRE(cache->Validate().ok());
  REQUIRE(cache->pool().NumFree() == free_before + 6 - 5);
  StreamContents sc = *cache->ReadStream(s, 0, 0);
  REQUIRE(sc.num_segments == 2);
  REQUIRE(sc.key_width[0] == 8);
  REQUIRE(sc.key_width[23] == 16);
  for (int t = 0; t < 24; ++t) {
    for (int ch = 0; ch < 16; ++ch) {
      const float expected = (t >= 20 || ch % 2 == 0) ? Key(c, a, t, 0, ch) : 0.0f;
      REQUIRE(sc.keys[t * 16 + ch] == expected);
      REQUIRE(sc.values[t * 16 + ch] == Value(c, a, t, 0, ch));
    }
  }
  // New decode tokens open a full-width segment after the recent one... (appends extend the
  // full-width tail segment).
  Batch b = MakeBatch(c, 1, 24, rng);
  REQUIRE(cache->Append(s, 0, b.Request()).ok());
  REQUIRE(cache->ReadStream(s, 0, 0)->num_segments == 2);
  // Compacting a channel-pruned stream again keeps the zeros for pruned channels.
  EvictionPlan again{.sequence = s};
  again.streams.push_back({.layer = 0, .kv_head = 0, .kept = {1, 22, 24}});
  REQUIRE(cache->Apply(again).ok());
  StreamContents sc2 = *cache->ReadStream(s, 0, 0);
  REQUIRE(sc2.positions == std::vector<int32_t>{1, 22, 24});
  REQUIRE(sc2.keys[1] == 0.0f);  // channel 1 of token 1 was pruned
  REQUIRE(sc2.keys[16 + 1] == Key(c, a, 22, 0, 1));
  REQUIRE(cache->Validate().ok());
}

TEST_CASE("ReadStream reads keys and values only when asked", "[cache]") {
  CacheConfig c = SmallConfig(DType::kF16);
  c.head_dim = 16;
  c.page_tokens = 4;
  auto cache = *Cache::Create(c, "cpu");
  std::mt19937 rng(11);
  SequenceId s = *cache->AddSequence();
  Batch a = MakeBatch(c, 13, 0, rng);
  REQUIRE(cache->Append(s, 0, a.Request()).ok());
  // Two segments: a channel-pruned one (pruned channels read as 0) and a full-width tail.
  std::vector<int32_t> kept(13);
  std::iota(kept.begin(), kept.end(), 0);
  EvictionPlan plan{.sequence = s};
  plan.streams.push_back(
      {.layer = 0, .kv_head = 1, .kept = kept, .key_channels = {1, 3, 5, 7}, .full_width_recent = 3});
  REQUIRE(cache->Apply(plan).ok());
  for (int32_t h = 0; h < c.num_kv_heads; ++h) {
    const StreamContents full = *cache->ReadStream(s, 0, h);
    REQUIRE(full.keys.size() == 13u * 16);
    REQUIRE(full.values.size() == 13u * 16);
    const StreamContents keys_only =
        *cache->ReadStream(s, 0, h, StreamReadOptions{.keys = true, .values = false});
    CHECK(keys_only.keys == full.keys);
    CHECK(keys_only.values.empty());
    const StreamContents values_only =
        *cache->ReadStream(s, 0, h, StreamReadOptions{.keys = false, .values = true});
    CHECK(values_only.keys.empty());
    CHECK(values_only.values == full.values);
    const StreamContents neither = *cache->ReadStream(s, 0, h, StreamReadOptions{false, false});
    CHECK(neither.keys.empty());
    CHECK(neither.values.empty());
    // The side data does not depend on what was asked for.
    for (const StreamContents* sc : {&keys_only, &values_only, &neither}) {
      CHECK(sc->length == full.length);
      CHECK(sc->positions == full.positions);
      CHECK(sc->modalities == full.modalities);
      CHECK(sc->scores == full.scores);
      CHECK(sc->key_width == full.key_width);
      CHECK(sc->num_segments == full.num_segments);
    }
    // The bool form is the same as asking for both or neither.
    CHECK(cache->ReadStream(s, 0, h, false)->keys.empty());
  }
  CHECK(cache->ReadStream(s, 0, 1)->num_segments == 2);
  CHECK(cache->ReadStream(s, 0, 1, StreamReadOptions{.keys = true, .values = false})
            .value()
            .keys[0 * 16 + 0] == 0.0f);  // channel 0 was pruned from the first segment
  CHECK(cache->ReadStream(s, 0, 9, StreamReadOptions{}).status().code() ==
        absl::StatusCode::kOutOfRange);
}

TEST_CASE("merges add weighted evicted rows into kept rows", "[cache][apply]") {
  CacheConfig c = SmallConfig();
  auto cache = *Cache::Create(c, "cpu");
  std::mt19937 rng(6);
  SequenceId s = *cache->AddSequence();
  Batch a = MakeBatch(c, 5, 0, rng);
  REQUIRE(cache->Append(s, 1, a.Request()).ok());
  EvictionPlan plan{.sequence = s};
  StreamPlan sp{.layer = 1, .kv_head = 0, .kept = {1, 3}};
  sp.merges = {{0, 0, 0.5f, 0.25f}, {0, 2, 0.0f, 1.0f}, {1, 4, 1.0f, 0.0f}};
  sp.kept_key_weight = {0.5f, 1.0f};
  plan.streams.push_back(sp);
  REQUIRE(cache->Apply(plan).ok());
  StreamContents sc = *cache->ReadStream(s, 1, 0);
  for (int ch = 0; ch < 8; ++ch) {
    const float k0 = 0.5f * Key(c, a, 1, 0, ch) + 0.5f * Key(c, a, 0, 0, ch) + 0.0f * Key(c, a, 2, 0, ch);
    const float v0 = Value(c, a, 1, 0, ch) + 0.25f * Value(c, a, 0, 0, ch) + Value(c, a, 2, 0, ch);
    REQUIRE(sc.keys[ch] == Approx(k0).margin(1e-6));
    REQUIRE(sc.values[ch] == Approx(v0).margin(1e-6));
    REQUIRE(sc.keys[8 + ch] == Approx(Key(c, a, 3, 0, ch) + Key(c, a, 4, 0, ch)).margin(1e-6));
    REQUIRE(sc.values[8 + ch] == Approx(Value(c, a, 3, 0, ch)).margin(1e-6));
  }
}

TEST_CASE("apply on a forked sequence leaves the sibling intact", "[cache][fork][apply]") {
  CacheConfig c = SmallConfig();
  auto cache = *Cache::Create(c, "cpu");
  std::mt19937 rng(7);
  SequenceId p = *cache->AddSequence();
  Batch a = MakeBatch(c, 10, 0, rng);
  REQUIRE(cache->Append(p, 0, a.Request()).ok());
  SequenceId child = *cache->Fork(p);
  auto before = *cache->ReadStream(p, 0, 0);
  EvictionPlan plan{.sequence = child};
  plan.streams.push_back({.layer = 0, .kv_head = 0, .kept = {2, 8}});
  REQUIRE(cache->Apply(plan).ok());
  REQUIRE(cache->Validate().ok());
  REQUIRE(kvcache::testing::SameContents(*cache->ReadStream(p, 0, 0), before));
  REQUIRE(cache->ReadStream(child, 0, 0)->positions == std::vector<int32_t>{2, 8});
  // A plan that keeps every token unchanged is a no-op: no page is allocated or copied.
  const int free_before = cache->pool().NumFree();
  EvictionPlan keep_all{.sequence = child};
  keep_all.streams.push_back({.layer = 0, .kv_head = 1, .kept = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}});
  REQUIRE(cache->Apply(keep_all).ok());
  REQUIRE(cache->pool().NumFree() == free_before);
  REQUIRE(cache->ReadStream(child, 0, 1)->length == 10);
  // ...but the same plan with a weight is not, and writes fresh pages.
  keep_all.streams[0].kept_value_weight.assign(10, 2.0f);
  REQUIRE(cache->Apply(keep_all).ok());
  REQUIRE(cache->pool().NumFree() == free_before - 3);
  REQUIRE(cache->ReadStream(child, 0, 1)->values[0] ==
          2.0f * cache->ReadStream(p, 0, 1)->values[0]);
  REQUIRE(cache->Validate().ok());
}

TEST_CASE("bad input returns a clear error and leaves the cache unchanged", "[cache][errors]") {
  CacheConfig c = SmallConfig();
  auto cache = *Cache::Create(c, "cpu");
  std::mt19937 rng(8);
  SequenceId s = *cache->AddSequence();
  Batch a = MakeBatch(c, 5, 0, rng);
  REQUIRE(cache->Append(s, 0, a.Request()).ok());
  const auto image = Snapshot(*cache);
  auto expect = [&](absl::Status st, absl::StatusCode code, const std::string& needle) {
    INFO(st.ToString());
    REQUIRE(st.code() == code);
    REQUIRE(std::string(st.message()).find(needle) != std::string::npos);
    REQUIRE(cache->Validate().ok());
    REQUIRE(SameImage(Snapshot(*cache), image));
  };
  Batch b = MakeBatch(c, 3, 5, rng);
  AppendRequest r = b.Request();
  expect(cache->Append(s, 2, r), absl::StatusCode::kOutOfRange, "layer 2");
  expect(cache->Append(s, -1, r), absl::StatusCode::kOutOfRange, "layer -1");
  expect(cache->Append(99, 0, r), absl::StatusCode::kNotFound, "99");
  r.keys.num_elements -= 1;
  expect(cache->Append(s, 0, r), absl::StatusCode::kInvalidArgument, "keys has 47 elements");
  r = b.Request();
  r.values.data = nullptr;
  expect(cache->Append(s, 0, r), absl::StatusCode::kInvalidArgument, "values.data is null");
  r = b.Request();
  std::vector<int32_t> bad_pos{5, 7, 6};
  r.positions = bad_pos;
  expect(cache->Append(s, 0, r), absl::StatusCode::kInvalidArgument, "positions[2] = 6");
  std::vector<int32_t> old_pos{4, 5, 6};
  r.positions = old_pos;
  expect(cache->Append(s, 0, r), absl::StatusCode::kInvalidArgument, "last position");
  std::vector<int32_t> neg{-3, 5, 6};
  r.positions = neg;
  expect(cache->Append(s, 0, r), absl::StatusCode::kInvalidArgument, "negative");
  r = b.Request();
  std::vector<Modality> two_mods(2, Modality::kText);
  r.modalities = two_mods;
  expect(cache->Append(s, 0, r), absl::StatusCode::kInvalidArgument, "modalities has 2");
  std::vector<Modality> bad_mod(3, static_cast<Modality>(7));
  r.modalities = bad_mod;
  expect(cache->Append(s, 0, r), absl::StatusCode::kInvalidArgument, "unknown value 7");
  r = b.Request();
  std::vector<uint8_t> short_admit(1, 1);
  r.admit = short_admit;
  expect(cache->Append(s, 0, r), absl::StatusCode::kInvalidArgument, "admit has 1");
  r = b.Request();
  r.positions = {};
  expect(cache->Append(s, 0, r), absl::StatusCode::kInvalidArgument, "0 tokens");
  r = b.Request();
  r.values.dtype = DType::kBF16;
  r.values.num_elements = r.keys.num_elements;
  expect(cache->Append(s, 0, r), absl::StatusCode::kInvalidArgument, "but values are bf16");

  auto plan_with = [&](StreamPlan sp) {
    EvictionPlan p{.sequence = s};
    p.streams.push_back(std::move(sp));
    return p;
  };
  expect(cache->Apply(plan_with({.layer = 5, .kv_head = 0, .kept = {0}})), absl::StatusCode::kOutOfRange, "layer 5");
  expect(cache->Apply(plan_with({.layer = 0, .kv_head = 2, .kept = {0}})), absl::StatusCode::kOutOfRange, "kv_head 2");
  expect(cache->Apply(plan_with({.layer = 0, .kv_head = 0, .kept = {0, 5}})), absl::StatusCode::kOutOfRange, "kept[1] = 5");
  expect(cache->Apply(plan_with({.layer = 0, .kv_head = 0, .kept = {2, 1}})), absl::StatusCode::kInvalidArgument, "ascending");
  expect(cache->Apply(plan_with({.layer = 0, .kv_head = 0, .kept = {1}, .key_channels = {3, 8}})),
         absl::StatusCode::kOutOfRange, "key_channels[1] = 8");
  expect(cache->Apply(plan_with({.layer = 0, .kv_head = 0, .kept = {1}, .key_channels = {3, 3}})),
         absl::StatusCode::kInvalidArgument, "key_channels must be strictly ascending");
  expect(cache->Apply(plan_with({.layer = 0, .kv_head = 0, .kept = {1}, .full_width_recent = 2})),
         absl::StatusCode::kInvalidArgument, "full_width_recent = 2");
  StreamPlan merge_bad{.layer = 0, .kv_head = 0, .kept = {1}};
  merge_bad.merges = {{1, 0, 1.0f, 1.0f}};
  expect(cache->Apply(plan_with(merge_bad)), absl::StatusCode::kOutOfRange, "kept_slot = 1");
  merge_bad.merges = {{0, 9, 1.0f, 1.0f}};
  expect(cache->Apply(plan_with(merge_bad)), absl::StatusCode::kOutOfRange, "source = 9");
  merge_bad.merges = {{0, 2, NAN, 1.0f}};
  expect(cache->Apply(plan_with(merge_bad)), absl::StatusCode::kInvalidArgument, "non-finite");
  StreamPlan weights_bad{.layer = 0, .kv_head = 0, .kept = {1, 2}};
  weights_bad.kept_value_weight = {1.0f};
  expect(cache->Apply(plan_with(weights_bad)), absl::StatusCode::kInvalidArgument, "kept weights");
  EvictionPlan twice{.sequence = s};
  twice.streams.push_back({.layer = 0, .kv_head = 0, .kept = {0}});
  twice.streams.push_back({.layer = 0, .kv_head = 0, .kept = {1}});
  expect(cache->Apply(twice), absl::StatusCode::kInvalidArgument, "named twice");
  EvictionPlan unknown{.sequence = 1234};
  expect(cache->Apply(unknown), absl::StatusCode::kNotFound, "1234");

  expect(cache->Fork(77).status(), absl::StatusCode::kNotFound, "77");
  expect(cache->Free(77), absl::StatusCode::kNotFound, "77");
  expect(cache->ReadStream(s, 0, 9).status(), absl::StatusCode::kOutOfRange, "kv_head 9");
  expect(cache->StreamLength(s, 3, 0).status(), absl::StatusCode::kOutOfRange, "layer 3");
  std::vector<float> wrong(2);
  expect(cache->AddScores(s, 0, 0, wrong), absl::StatusCode::kInvalidArgument, "delta has 2");

  std::vector<float> q(c.num_q_heads * c.head_dim), out(q.size());
  std::vector<SequenceId> batch{s};
  expect(cache->DecodeAttention({}, 0, q, out), absl::StatusCode::kInvalidArgument, "empty batch");
  expect(cache->DecodeAttention(batch, 4, q, out), absl::StatusCode::kOutOfRange, "layer 4");
  expect(cache->DecodeAttention(batch, 0, std::span<const float>(q).first(3), out),
         absl::StatusCode::kInvalidArgument, "q has 3 elements");
  expect(cache->DecodeAttention(batch, 0, q, std::span<float>(out).first(5)),
         absl::StatusCode::kInvalidArgument, "out has 5");
  std::vector<SequenceId> dup{s, s};
  std::vector<float> q2(2 * q.size()), out2(2 * q.size());
  expect(cache->DecodeAttention(dup, 0, q2, out2), absl::StatusCode::kInvalidArgument, "twice");
  std::vector<SequenceId> missing{s, 55};
  expect(cache->DecodeAttention(missing, 0, q2, out2), absl::StatusCode::kNotFound, "55");
  std::vector<float> lse(3);
  expect(cache->DecodeAttention(batch, 0, q, out, lse), absl::StatusCode::kInvalidArgument, "lse has 3");
  DecodeOptions bad_scale;
  bad_scale.scale = NAN;
  expect(cache->DecodeAttention(batch, 0, q, out, {}, bad_scale), absl::StatusCode::kInvalidArgument, "scale");

  std::vector<int32_t> rows{4};
  ScoreRequest sr{.queries = q, .positions = rows};
  expect(cache->ScoreRows(s, 7, sr).status(), absl::StatusCode::kOutOfRange, "layer 7");
  expect(cache->ScoreRows(88, 0, sr).status(), absl::StatusCode::kNotFound, "88");
  sr.queries = std::span<const float>(q).first(4);
  expect(cache->ScoreRows(s, 0, sr).status(), absl::StatusCode::kInvalidArgument, "queries has 4");
  sr.queries = q;
  sr.positions = {};
  expect(cache->ScoreRows(s, 0, sr).status(), absl::StatusCode::kInvalidArgument, "no query rows");
  sr.positions = rows;
  sr.sparsity_threshold = 2.0f;
  expect(cache->ScoreRows(s, 0, sr).status(), absl::StatusCode::kInvalidArgument, "sparsity_threshold 2");
}

TEST_CASE("pool exhaustion during append and apply is an error that changes nothing",
          "[cache][errors]") {
  CacheConfig c = SmallConfig();
  c.num_pages = 6;
  auto cache = *Cache::Create(c, "cpu");
  std::mt19937 rng(9);
  SequenceId s = *cache->AddSequence();
  Batch a = MakeBatch(c, 8, 0, rng);  // 2 pages per head = 4
  REQUIRE(cache->Append(s, 0, a.Request()).ok());
  auto image = Snapshot(*cache);
  Batch big = MakeBatch(c, 5, 8, rng);  // needs 2 more pages per head = 4 > 2 free
  absl::Status st = cache->Append(s, 0, big.Request());
  REQUIRE(st.code() == absl::StatusCode::kResourceExhausted);
  REQUIRE(std::string(st.message()).find("exhausted") != std::string::npos);
  REQUIRE(SameImage(Snapshot(*cache), image));
  // Apply needs fresh pages before it frees the old ones: keeping 7 of 8 tokens on both heads
  // needs 4 pages while 2 are free.
  EvictionPlan plan{.sequence = s};
  plan.streams.push_back({.layer = 0, .kv_head = 0, .kept = {0, 1, 2, 3, 4, 5, 6}});
  plan.streams.push_back({.layer = 0, .kv_head = 1, .kept = {0, 1, 2, 3, 4, 5, 6}});
  REQUIRE(cache->Apply(plan).code() == absl::StatusCode::kResourceExhausted);
  REQUIRE(SameImage(Snapshot(*cache), image));
  REQUIRE(cache->Validate().ok());
  // After freeing room, the same append works.
  plan.streams.pop_back();
  plan.streams[0].kept = {0, 1};
  REQUIRE(cache->Apply(plan).ok());
  REQUIRE(cache->pool().NumFree() == 3);
  Batch small = MakeBatch(c, 3, 8, rng);
  REQUIRE(cache->Append(s, 0, small.Request()).ok());
  REQUIRE(cache->Validate().ok());
}

TEST_CASE("Create rejects a bad config or backend", "[cache][errors]") {
  CacheConfig c = SmallConfig();
  c.head_dim = -1;
  REQUIRE(Cache::Create(c, "cpu").status().code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(Cache::Create(SmallConfig(), "nope").status().code() == absl::StatusCode::kNotFound);
  REQUIRE(Cache::Create(SmallConfig(), std::unique_ptr<Backend>()).status().code() ==
          absl::StatusCode::kInvalidArgument);
}
