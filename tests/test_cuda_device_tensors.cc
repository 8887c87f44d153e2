// Device-resident tensors on the CUDA backend (types.h MemorySpace, Cache::DecodeAttention with
// TensorRef / MutableTensorRef, DecodeOptions::stream, Cache::Synchronize, device K/V Append).
//
// The oracle is the same cache's host-tensor f32 decode: both run the same attention kernel
// over the same pool, and the device path only reads q in place or widens it exactly (f16 /
// bf16 -> f32) and rounds out with the round-to-nearest-even of dtype.h, so results must be
// EQUAL, bit for bit, to the host decode of the widened q with out rounded on the host. Runs on
// "cuda" with a GPU, else on "cuda-emulated" (tests/cuda_test_util.h), else skips.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "kvcache/cache.h"
#include "test_util.h"

namespace kvcache {
namespace {

using testing::FromBits;
using testing::RandomVector;
using testing::ToBits;

#if KVCACHE_TEST_DEVICE_MEMORY

CacheConfig Config(int32_t layers = 2) {
  CacheConfig c;
  c.num_layers = layers;
  c.num_kv_heads = 2;
  c.num_q_heads = 8;
  c.head_dim = 64;
  c.dtype = DType::kF16;
  c.page_tokens = 16;
  c.num_pages = 512;
  return c;
}

// q in `dtype` as host bytes, and the f32 values the kernel sees (exact widening).
struct Query {
  std::vector<uint8_t> bytes;
  std::vector<float> widened;
};
Query MakeQuery(const std::vector<float>& raw, DType dtype) {
  Query q;
  if (dtype == DType::kF32) {
    q.widened = raw;
  } else {
    const std::vector<uint16_t> bits = ToBits(raw, dtype);
    q.widened = FromBits(bits, dtype);
    q.bytes.resize(bits.size() * 2);
    std::memcpy(q.bytes.data(), bits.data(), q.bytes.size());
    return q;
  }
  q.bytes.resize(raw.size() * 4);
  std::memcpy(q.bytes.data(), raw.data(), q.bytes.size());
  return q;
}

std::unique_ptr<Cache> NewCache(const CacheConfig& c) {
  absl::StatusOr<std::unique_ptr<Cache>> cache = Cache::Create(c, CudaBackend());
  INFO(cache.status().ToString());
  REQUIRE(cache.ok());
  return *std::move(cache);
}

TEST_CASE("cuda device tensors: q / out in f32, f16, bf16 equal the host f32 decode",
          "[cuda][device]") {
  KVCACHE_CUDA_CASE();
  const CacheConfig c = Config();
  auto cache = NewCache(c);
  REQUIRE(cache->backend().Supports(BackendOp::kDeviceTensors));
  std::mt19937 rng(41);
  std::vector<SequenceId> batch;
  for (int b = 0; b < 3; ++b) {
    batch.push_back(*cache->AddSequence());
    for (int32_t l = 0; l < c.num_layers; ++l) {
      REQUIRE(testing::AppendRandomTokens(*cache, batch.back(), l, 19 + 23 * b, 0, rng).ok());
    }
  }
  const int64_t n = static_cast<int64_t>(batch.size()) * c.num_q_heads * c.head_dim;
  const int64_t n_lse = static_cast<int64_t>(batch.size()) * c.num_q_heads;
  const std::vector<float> raw = RandomVector(rng, static_cast<size_t>(n));
  DeviceMemory d_q(n * 4), d_out(n * 4), d_lse(n_lse * 4);
  TestStream stream;
  DecodePlan plan = *cache->PrepareDecode(batch);
  for (DType q_dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    const Query q = MakeQuery(raw, q_dtype);
    std::vector<float> expected(n), expected_lse(n_lse);
    REQUIRE(cache->DecodeAttention(plan, 1, q.widened, expected, expected_lse).ok());
    d_q.Upload(q.bytes.data(), q.bytes.size());
    for (DType out_dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
      for (int mode = 0; mode < 3; ++mode) {  // planned + own stream, planned + caller's, one-shot
        INFO("q " << DTypeName(q_dtype) << ", out " << DTypeName(out_dtype) << ", mode " << mode);
        const std::vector<uint8_t> poison(n * 4, 0xEE);
        d_out.Upload(poison.data(), poison.size());
        d_lse.Upload(poison.data(), n_lse * 4);
        DecodeOptions options;
        if (mode == 1) options.stream = stream.get();
        const TensorRef dq = TensorRef::OnDevice(d_q.get(), q_dtype, n);
        const MutableTensorRef dout = MutableTensorRef::OnDevice(d_out.get(), out_dtype, n);
        const MutableTensorRef dlse = MutableTensorRef::OnDevice(d_lse.get(), DType::kF32, n_lse);
        const absl::Status s = mode < 2 ? cache->DecodeAttention(plan, 1, dq, dout, dlse, options)
                                        : cache->DecodeAttention(batch, 1, dq, dout, dlse, options);
        INFO(s.ToString());
        REQUIRE(s.ok());
        REQUIRE(cache->Synchronize(options.stream).ok());
        std::vector<float> lse(n_lse);
        d_lse.Download(lse.data(), lse.size() * 4);
        REQUIRE(lse == expected_lse);
        if (out_dtype == DType::kF32) {
          std::vector<float> out(n);
          d_out.Download(out.data(), out.size() * 4);
          REQUIRE(out == expected);
        } else {
          std::vector<uint16_t> out(n);
          d_out.Download(out.data(), out.size() * 2);
          REQUIRE(out == ToBits(expected, out_dtype));
        }
      }
    }
  }
  // Without lse, alternating streams (the shared buffers are handed from one stream to the
  // other through the backend's event), then a host-tensor call on the backend's own stream.
  TestStream other;
  for (void* s : {stream.get(), other.get(), static_cast<void*>(nullptr), other.get()}) {
    DecodeOptions options;
    options.stream = s;
    std::vector<float> expected(n);
    REQUIRE(cache->DecodeAttention(plan, 0, raw, expected).ok());
    d_q.Upload(raw.data(), raw.size() * 4);
    REQUIRE(cache
                ->DecodeAttention(plan, 0, TensorRef::OnDevice(d_q.get(), DType::kF32, n),
                                  MutableTensorRef::OnDevice(d_out.get(), DType::kF32, n), {},
                                  options)
                .ok());
    REQUIRE(cache->Synchronize(s).ok());
    std::vector<float> out(n);
    d_out.Download(out.data(), out.size() * 4);
    REQUIRE(out == expected);
  }
}

TEST_CASE("cuda device tensors: score accumulation equals the host-tensor decode's",
          "[cuda][device]") {
  KVCACHE_CUDA_CASE();
  const CacheConfig c = Config(1);
  auto host = NewCache(c);
  auto device = NewCache(c);
  std::mt19937 rng_h(43), rng_d(43);
  const SequenceId a = *host->AddSequence();
  REQUIRE(*device->AddSequence() == a);
  REQUIRE(testing::AppendRandomTokens(*host, a, 0, 37, 0, rng_h).ok());
  REQUIRE(testing::AppendRandomTokens(*device, a, 0, 37, 0, rng_d).ok());
  const std::vector<SequenceId> batch{a};
  const int64_t n = int64_t{c.num_q_heads} * c.head_dim;
  const std::vector<float> q = RandomVector(rng_h, static_cast<size_t>(n));
  DeviceMemory d_q(n * 4), d_out(n * 2);
  d_q.Upload(q.data(), q.size() * 4);
  DecodeOptions options;
  options.accumulate_scores = true;
  std::vector<float> out(n);
  for (int step = 0; step < 2; ++step) {
    REQUIRE(host->DecodeAttention(batch, 0, q, out, {}, options).ok());
    REQUIRE(device
                ->DecodeAttention(batch, 0, TensorRef::OnDevice(d_q.get(), DType::kF32, n),
                                  MutableTensorRef::OnDevice(d_out.get(), DType::kBF16, n), {},
                                  options)
                .ok());
  }
  for (int32_t h = 0; h < c.num_kv_heads; ++h) {
    const StreamContents hs = *host->ReadStream(a, 0, h, false);
    const StreamContents ds = *device->ReadStream(a, 0, h, false);
    REQUIRE(hs.scores == ds.scores);
    REQUIRE(std::any_of(ds.scores.begin(), ds.scores.end(), [](float x) { return x > 0.0f; }));
  }
}

TEST_CASE("cuda device tensors: host memory passed as device, short buffers, bad dtypes",
          "[cuda][device][errors]") {
  KVCACHE_CUDA_CASE();
  const CacheConfig c = Config(1);
  auto cache = NewCache(c);
  std::mt19937 rng(47);
  const SequenceId a = *cache->AddSequence();
  REQUIRE(testing::AppendRandomTokens(*cache, a, 0, 9, 0, rng).ok());
  const std::vector<SequenceId> batch{a};
  DecodePlan plan = *cache->PrepareDecode(batch);
  const int64_t n = int64_t{c.num_q_heads} * c.head_dim;
  DeviceMemory d_q(n * 4), d_out(n * 4), d_lse(c.num_q_heads * 4), d_short(n * 2 - 2);
  std::vector<float> host(n, 0.5f);
  const std::vector<uint8_t> poison(n * 4, 0xEE);
  d_out.Upload(poison.data(), poison.size());
  const auto out_untouched = [&] {
    std::vector<uint8_t> now(n * 4);
    d_out.Download(now.data(), now.size());
    return now == poison;
  };
  const TensorRef dq = TensorRef::OnDevice(d_q.get(), DType::kF32, n);
  const MutableTensorRef dout = MutableTensorRef::OnDevice(d_out.get(), DType::kF32, n);
  const MutableTensorRef dlse = MutableTensorRef::OnDevice(d_lse.get(), DType::kF32, c.num_q_heads);
  const auto expect = [&](absl::Status s, const std::string& needle) {
    INFO(s.ToString());
    REQUIRE(s.code() == absl::StatusCode::kInvalidArgument);
    REQUIRE(s.message().find(needle) != std::string_view::npos);
    REQUIRE(out_untouched());
  };
  // Host memory labelled device: the backend asks the runtime and names the tensor.
  expect(
      cache->DecodeAttention(plan, 0, TensorRef::OnDevice(host.data(), DType::kF32, n), dout, dlse),
      "DecodeAttention: q");
  expect(
      cache->DecodeAttention(plan, 0, dq, dout,
                             MutableTensorRef::OnDevice(host.data(), DType::kF32, c.num_q_heads)),
      "DecodeAttention: lse");
  std::vector<float> host_out(n, 7.0f);
  {
    const absl::Status s = cache->DecodeAttention(
        plan, 0, dq, MutableTensorRef::OnDevice(host_out.data(), DType::kF32, n), dlse);
    INFO(s.ToString());
    REQUIRE(s.code() == absl::StatusCode::kInvalidArgument);
    REQUIRE(s.message().find("DecodeAttention: out") != std::string_view::npos);
    REQUIRE(std::all_of(host_out.begin(), host_out.end(), [](float x) { return x == 7.0f; }));
  }
  // A device buffer shorter than the tensor claims (n bf16 elements need n * 2 bytes).
  expect(cache->DecodeAttention(plan, 0, TensorRef::OnDevice(d_short.get(), DType::kBF16, n), dout,
                                dlse),
         "DecodeAttention: q");
  // Sizes, dtypes, mixed memory spaces: refused by the Cache before anything runs.
  expect(cache->DecodeAttention(plan, 0, TensorRef::OnDevice(d_q.get(), DType::kF32, n - 1), dout,
                                dlse),
         "q has " + std::to_string(n - 1) + " elements");
  expect(
      cache->DecodeAttention(plan, 0, dq, dout,
                             MutableTensorRef::OnDevice(d_lse.get(), DType::kBF16, c.num_q_heads)),
      "lse has dtype");
  expect(cache->DecodeAttention(plan, 0, TensorRef::Of(host), dout, dlse), "q is in host memory");
  DecodeOptions with_stream;
  TestStream stream;
  with_stream.stream = stream.get();
  std::vector<float> q_host(n, 0.1f), o_host(n);
  expect(cache->DecodeAttention(plan, 0, q_host, o_host, {}, with_stream), "host tensors");
  // Sparse reads take host tensors.
  DecodeOptions quest;
  quest.read_policy.kind = ReadPolicy::Kind::kQuest;
  quest.read_policy.token_budget = 8;
  quest.read_policy.dense_first_layers = 0;
  expect(cache->DecodeAttention(plan, 0, dq, dout, dlse, quest), "sparse");
  // The cache is usable after every refusal.
  REQUIRE(cache->DecodeAttention(plan, 0, dq, dout, dlse).ok());
  REQUIRE(cache->Synchronize().ok());
  REQUIRE(cache->Validate().ok());
}

#if KVCACHE_HAVE_CUDA_EMULATED
// The shared device buffers pass from one stream to another through an event: a call on a
// stream other than the previous device decode's waits for it (and one on the same stream does
// not need to). Every emulated call completes before it returns, so the waits are counted.
TEST_CASE("cuda device tensors: a call on another stream waits for the previous decode",
          "[cuda][device][streams]") {
  KVCACHE_CUDA_CASE();
  if (!Emulated()) return;  // counted by the emulator only
  const CacheConfig c = Config(1);
  auto cache = NewCache(c);
  std::mt19937 rng(61);
  const SequenceId a = *cache->AddSequence();
  REQUIRE(testing::AppendRandomTokens(*cache, a, 0, 11, 0, rng).ok());
  const std::vector<SequenceId> batch{a};
  const int64_t n = int64_t{c.num_q_heads} * c.head_dim;
  DeviceMemory d_q(n * 4), d_out(n * 4);
  const std::vector<float> q = RandomVector(rng, static_cast<size_t>(n));
  d_q.Upload(q.data(), q.size() * 4);
  TestStream s1, s2;
  const auto decode_on = [&](void* stream) {
    DecodeOptions options;
    options.stream = stream;
    REQUIRE(cache
                ->DecodeAttention(batch, 0, TensorRef::OnDevice(d_q.get(), DType::kF32, n),
                                  MutableTensorRef::OnDevice(d_out.get(), DType::kF32, n), {},
                                  options)
                .ok());
  };
  const auto waits = [](void* stream) {
    return cuda_emu::StreamWaitEventCount(static_cast<cudaStream_t>(stream));
  };
  decode_on(s1.get());
  const int64_t w1 = waits(s1.get()), w2 = waits(s2.get());
  decode_on(s1.get());  // same stream: stream order suffices
  REQUIRE(waits(s1.get()) == w1);
  decode_on(s2.get());  // another stream: waits for s1's decode
  REQUIRE(waits(s2.get()) == w2 + 1);
  decode_on(s1.get());  // and back
  REQUIRE(waits(s1.get()) == w1 + 1);
  // A host-tensor call runs on the backend's own stream, so it waits for s1's decode as well
  // (observed through its result being right; its stream is internal).
  std::vector<float> out(n), expected(n);
  REQUIRE(cache->DecodeAttention(batch, 0, q, expected).ok());
  REQUIRE(cache->Synchronize(s1.get()).ok());
  d_out.Download(out.data(), out.size() * 4);
  REQUIRE(out == expected);
}
#endif  // KVCACHE_HAVE_CUDA_EMULATED

bool SameSummaries(const std::vector<PageSummary>& a, const std::vector<PageSummary>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].first_token != b[i].first_token || a[i].num_tokens != b[i].num_tokens ||
        a[i].key_channels != b[i].key_channels || a[i].key_min != b[i].key_min ||
        a[i].key_max != b[i].key_max) {
      return false;
    }
  }
  return true;
}

// Device K/V Append: the write kernel reads the caller's strided device rows in place. Two
// caches receive the same tokens, one from host buffers and one from device buffers: every
// stored row, position, page summary (read back from the pool for device K/V) and decode must
// be equal, for f32 / f16 / bf16 sources, with an admission mask that splits the rows into
// runs, a partial tail page filled one token at a time, and a forked (copy-on-write) tail.
// Device K/V go on the backend's stream, or on a caller's stream (AppendRequest::stream:
// enqueued, CoW page copies included, without waiting; with page summaries the call reads the
// keys back and so synchronises); without summaries nothing synchronises the caller's stream
// until the decode, which is ordered after it.
TEST_CASE("cuda device tensors: Append of device K/V equals Append of host K/V",
          "[cuda][device][append]") {
  KVCACHE_CUDA_CASE();
  const bool on_stream = GENERATE(false, true);
  const bool summaries = GENERATE(true, false);
  INFO("on a caller's stream " << on_stream << ", page summaries " << summaries);
  CacheConfig c = Config(2);
  c.page_summaries = summaries;
  auto host = NewCache(c);
  auto device = NewCache(c);
  TestStream stream;
  std::mt19937 rng(53);
  const SequenceId a = *host->AddSequence();
  REQUIRE(*device->AddSequence() == a);
  const int64_t row = int64_t{c.num_kv_heads} * c.head_dim;
  int32_t next_position = 0;
  const auto append_both = [&](SequenceId seq, int32_t layer, int n, DType dtype, bool with_admit) {
    INFO("append " << n << " tokens of " << DTypeName(dtype) << " to layer " << layer);
    const std::vector<float> kf = RandomVector(rng, static_cast<size_t>(n * row));
    const std::vector<float> vf = RandomVector(rng, static_cast<size_t>(n * row));
    const Query k = MakeQuery(kf, dtype), v = MakeQuery(vf, dtype);  // bytes in `dtype`
    std::vector<int32_t> positions(n);
    std::vector<uint8_t> admit(n);
    for (int i = 0; i < n; ++i) {
      positions[i] = next_position++;
      admit[i] = (i % 5 == 2) ? 0 : 1;
    }
    DeviceMemory dk(k.bytes.size()), dv(v.bytes.size());
    dk.Upload(k.bytes.data(), k.bytes.size());
    dv.Upload(v.bytes.data(), v.bytes.size());
    AppendRequest h_req, d_req;
    h_req.keys = TensorRef{k.bytes.data(), dtype, n * row};
    h_req.values = TensorRef{v.bytes.data(), dtype, n * row};
    d_req.keys = TensorRef::OnDevice(dk.get(), dtype, n * row);
    d_req.values = TensorRef::OnDevice(dv.get(), dtype, n * row);
    if (on_stream) d_req.stream = stream.get();
    h_req.positions = d_req.positions = positions;
    if (with_admit) h_req.admit = d_req.admit = admit;
    REQUIRE(host->Append(seq, layer, h_req).ok());
    const absl::Status s = device->Append(seq, layer, d_req);
    INFO(s.ToString());
    REQUIRE(s.ok());
    // dk / dv are freed on return: the enqueued write must have read them first.
    if (on_stream) REQUIRE(device->Synchronize(stream.get()).ok());
  };
  const auto compare = [&](SequenceId seq) {
    for (int32_t l = 0; l < c.num_layers; ++l) {
      for (int32_t h = 0; h < c.num_kv_heads; ++h) {
        INFO("sequence " << seq << " layer " << l << " kv head " << h);
        const StreamContents hs = *host->ReadStream(seq, l, h);
        const StreamContents ds = *device->ReadStream(seq, l, h);
        REQUIRE(ds.length == hs.length);
        REQUIRE(ds.positions == hs.positions);
        REQUIRE(ds.keys == hs.keys);
        REQUIRE(ds.values == hs.values);
        if (summaries) {
          REQUIRE(SameSummaries(*device->ReadPageSummaries(seq, l, h),
                                *host->ReadPageSummaries(seq, l, h)));
        }
      }
    }
  };
  append_both(a, 0, 37, DType::kF32, true);
  append_both(a, 1, 37, DType::kBF16, false);
  compare(a);
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32}) {  // decode-style single tokens
    append_both(a, 0, 1, dtype, false);
    append_both(a, 1, 1, dtype, false);
  }
  const SequenceId child = *host->Fork(a);
  REQUIRE(*device->Fork(a) == child);
  append_both(child, 0, 3, DType::kF16, false);  // copies the shared partial tail page first
  compare(a);
  compare(child);
  // And the decodes over them agree.
  const std::vector<SequenceId> batch{a, child};
  const std::vector<float> q =
      RandomVector(rng, 2 * static_cast<size_t>(c.num_q_heads) * c.head_dim);
  std::vector<float> h_out(q.size()), d_out(q.size());
  REQUIRE(host->DecodeAttention(batch, 0, q, h_out).ok());
  REQUIRE(device->DecodeAttention(batch, 0, q, d_out).ok());
  REQUIRE(h_out == d_out);
  REQUIRE(device->Validate().ok());
}

#if KVCACHE_HAVE_CUDA_EMULATED
// Append on a caller's stream is ordered like a device-tensor decode: nothing to wait for on the
// same stream, a wait for the previous stream's work on another one, and later calls on other
// streams wait for it. Without page summaries it does not synchronise: its results become
// visible through the ordered decode.
TEST_CASE("cuda device tensors: Append on a caller's stream waits across streams",
          "[cuda][device][append][streams]") {
  KVCACHE_CUDA_CASE();
  if (!Emulated()) return;  // counted by the emulator only
  const CacheConfig c = Config(1);
  auto cache = NewCache(c);
  auto host = NewCache(c);
  std::mt19937 rng(67);
  const SequenceId a = *cache->AddSequence();
  REQUIRE(*host->AddSequence() == a);
  const int64_t row = int64_t{c.num_kv_heads} * c.head_dim;
  TestStream s1, s2;
  const auto waits = [](void* stream) {
    return cuda_emu::StreamWaitEventCount(static_cast<cudaStream_t>(stream));
  };
  int32_t next = 0;
  std::vector<std::unique_ptr<DeviceMemory>> keep;  // sources live until the end
  const auto append_on = [&](void* stream, int n) {
    const std::vector<float> k = RandomVector(rng, static_cast<size_t>(n * row));
    const std::vector<float> v = RandomVector(rng, static_cast<size_t>(n * row));
    std::vector<int32_t> positions(n);
    for (int i = 0; i < n; ++i) positions[i] = next++;
    keep.push_back(std::make_unique<DeviceMemory>(k.size() * 4));
    keep.back()->Upload(k.data(), k.size() * 4);
    void* dk = keep.back()->get();
    keep.push_back(std::make_unique<DeviceMemory>(v.size() * 4));
    keep.back()->Upload(v.data(), v.size() * 4);
    AppendRequest req{TensorRef::OnDevice(dk, DType::kF32, n * row),
                      TensorRef::OnDevice(keep.back()->get(), DType::kF32, n * row), positions};
    req.stream = stream;
    REQUIRE(cache->Append(a, 0, req).ok());
    REQUIRE(host->Append(a, 0, {TensorRef::Of(k), TensorRef::Of(v), positions}).ok());
  };
  append_on(s1.get(), 9);
  const int64_t w1 = waits(s1.get()), w2 = waits(s2.get());
  append_on(s1.get(), 1);  // same stream: stream order suffices
  REQUIRE(waits(s1.get()) == w1);
  append_on(s2.get(), 8);  // another stream: waits for s1's append
  REQUIRE(waits(s2.get()) == w2 + 1);
  const int64_t n = int64_t{c.num_q_heads} * c.head_dim;
  const std::vector<float> q = RandomVector(rng, static_cast<size_t>(n));
  DeviceMemory d_q(n * 4), d_out(n * 4);
  d_q.Upload(q.data(), q.size() * 4);
  DecodeOptions options;
  options.stream = s1.get();
  const std::vector<SequenceId> batch{a};
  REQUIRE(cache
              ->DecodeAttention(batch, 0, TensorRef::OnDevice(d_q.get(), DType::kF32, n),
                                MutableTensorRef::OnDevice(d_out.get(), DType::kF32, n), {},
                                options)
              .ok());
  REQUIRE(waits(s1.get()) == w1 + 1);  // the decode on s1 waits for s2's append
  REQUIRE(cache->Synchronize(s1.get()).ok());
  std::vector<float> out(n), expected(n);
  d_out.Download(out.data(), out.size() * 4);
  REQUIRE(host->DecodeAttention(batch, 0, q, expected).ok());
  REQUIRE(out == expected);
  REQUIRE(testing::SameContents(*cache->ReadStream(a, 0, 1), *host->ReadStream(a, 0, 1)));
}
#endif  // KVCACHE_HAVE_CUDA_EMULATED

TEST_CASE("cuda device tensors: Append refuses host memory labelled device and mixed spaces",
          "[cuda][device][append][errors]") {
  KVCACHE_CUDA_CASE();
  auto cache = NewCache(Config(1));
  const CacheConfig& c = cache->config();
  std::mt19937 rng(59);
  const SequenceId a = *cache->AddSequence();
  REQUIRE(testing::AppendRandomTokens(*cache, a, 0, 5, 0, rng).ok());
  const StreamContents before = *cache->ReadStream(a, 0, 0);
  const int64_t n = 2 * int64_t{c.num_kv_heads} * c.head_dim;
  std::vector<float> host(static_cast<size_t>(n), 1.0f);
  DeviceMemory d(n * 4), d_short(n * 4 - 4);
  const std::vector<int32_t> positions{10, 11};
  const auto expect = [&](const AppendRequest& req, const std::string& needle) {
    const absl::Status s = cache->Append(a, 0, req);
    INFO(s.ToString());
    REQUIRE(s.code() == absl::StatusCode::kInvalidArgument);
    REQUIRE(s.message().find(needle) != std::string_view::npos);
    REQUIRE(testing::SameContents(*cache->ReadStream(a, 0, 0), before));
  };
  AppendRequest req;
  req.positions = positions;
  req.keys = TensorRef::OnDevice(host.data(), DType::kF32, n);
  req.values = TensorRef::OnDevice(d.get(), DType::kF32, n);
  expect(req, "WriteRows: keys");
  req.keys = TensorRef::OnDevice(d.get(), DType::kF32, n);
  req.values = TensorRef::OnDevice(d_short.get(), DType::kF32, n);  // 4 bytes short
  expect(req, "WriteRows: values");
  req.values = TensorRef::Of(host);
  expect(req, "both host or both device");
  TestStream stream;
  AppendRequest host_req;  // a stream orders device K/V only
  host_req.positions = positions;
  host_req.keys = host_req.values = TensorRef::Of(host);
  host_req.stream = stream.get();
  expect(host_req, "a stream was given but keys and values are host tensors");
  req.values = TensorRef::OnDevice(d.get(), DType::kF32, n);
  REQUIRE(cache->Append(a, 0, req).ok());
  REQUIRE(*cache->StreamLength(a, 0, 0) == before.length + 2);
  REQUIRE(cache->Validate().ok());
  // A backend without device tensors has no streams.
  absl::StatusOr<std::unique_ptr<Cache>> cpu = Cache::Create(Config(1), "cpu");
  REQUIRE(cpu.ok());
  const SequenceId b = *(*cpu)->AddSequence();
  const absl::Status s = (*cpu)->Append(b, 0, host_req);
  REQUIRE(s.code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(s.message().find("backend has no streams") != std::string_view::npos);
  REQUIRE(*(*cpu)->StreamLength(b, 0, 0) == 0);
}

#else  // no CUDA runtime of any kind: the [cuda] cases skip (exit code 4)

TEST_CASE("cuda device tensors: no CUDA backend", "[cuda][device]") { (void)CudaBackend(); }

#endif  // KVCACHE_TEST_DEVICE_MEMORY

}  // namespace
}  // namespace kvcache
