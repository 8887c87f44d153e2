// Decode steps prepared before they run (decode_plan.h, StepOptions): step reservation +
// AppendStep on "cpu" and the CUDA backend, capturable plans captured into a CUDA graph and
// replayed after in-place re-prepares (emulated capture, cuda/emulation/runtime.h), and the
// emulator's capture rules themselves.
//
// The oracle is a second cache fed the same data through Append + DecodeAttention: a reserved
// row written by AppendStep holds exactly what Append writes (the same write kernel / CPU row
// conversion), and the decode reads the same rows with the same kernel and split, so results
// must be EQUAL bit for bit.
#include <catch2/catch.hpp>
#include <cmath>
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

using testing::RandomVector;
using testing::SameImage;
using testing::Snapshot;
using testing::ToBits;

CacheConfig Config() {
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 16;
  c.dtype = DType::kF16;
  c.page_tokens = 4;  // a page boundary every 4 steps
  c.num_pages = 256;
  return c;
}

std::unique_ptr<Cache> NewCache(const CacheConfig& c, const std::string& backend) {
  absl::StatusOr<std::unique_ptr<Cache>> cache = Cache::Create(c, backend);
  INFO(cache.status().ToString());
  REQUIRE(cache.ok());
  return *std::move(cache);
}

// The same prefill in every cache: sequence A with 6 tokens per layer, then B = Fork(A) (B's
// tail page is shared and partly filled: its first reserved row copies it on write).
std::vector<SequenceId> Prefill(Cache& cache, uint32_t seed) {
  std::mt19937 rng(seed);
  const SequenceId a = *cache.AddSequence();
  for (int32_t l = 0; l < cache.config().num_layers; ++l) {
    REQUIRE(testing::AppendRandomTokens(cache, a, l, 6, 0, rng).ok());
  }
  const SequenceId b = *cache.Fork(a);
  return {a, b};
}

// One step's K/V of one layer, [batch, kv_heads, head_dim], as f32 values and as `dtype` bytes.
struct StepKV {
  std::vector<float> k, v;
  std::vector<uint16_t> k16, v16;
  TensorRef Keys(DType t) const {
    return t == DType::kF32 ? TensorRef::Of(k) : TensorRef::Of(k16, t);
  }
  TensorRef Values(DType t) const {
    return t == DType::kF32 ? TensorRef::Of(v) : TensorRef::Of(v16, t);
  }
};
StepKV MakeKV(std::mt19937& rng, size_t n, DType t) {
  StepKV kv{RandomVector(rng, n), RandomVector(rng, n), {}, {}};
  if (t != DType::kF32) {
    kv.k16 = ToBits(kv.k, t);
    kv.v16 = ToBits(kv.v, t);
  }
  return kv;
}

// Reserve + AppendStep + planned decode equals Append + decode over `steps` steps.
void CheckReservationMatchesAppend(const std::string& backend, DType kv_dtype, bool device_kv) {
  const CacheConfig c = Config();
  auto ref = NewCache(c, backend);
  auto step = NewCache(c, backend);
  const std::vector<SequenceId> batch = Prefill(*ref, 7);
  REQUIRE(Prefill(*step, 7) == batch);
  const int32_t batch_size = static_cast<int32_t>(batch.size());
  const size_t kv_elements = size_t(batch_size) * c.num_kv_heads * c.head_dim;
  const size_t q_elements = size_t(batch_size) * c.num_q_heads * c.head_dim;
  std::mt19937 rng(99);
  for (int32_t t = 0; t < 7; ++t) {  // positions 6..12: crosses the page boundary at 8 and 12
    const std::vector<int32_t> positions(batch_size, 6 + t);
    StepOptions options;
    options.append_tokens = 1;
    options.positions = positions;
    absl::StatusOr<DecodePlan> plan = step->PrepareDecode(batch, options);
    INFO(plan.status().ToString());
    REQUIRE(plan.ok());
    REQUIRE(plan->reserved());
    for (int32_t l = 0; l < c.num_layers; ++l) {
      const StepKV kv = MakeKV(rng, kv_elements, kv_dtype);
      const std::vector<float> q = RandomVector(rng, q_elements);
      // Reference: one Append per sequence, then decode.
      for (int32_t b = 0; b < batch_size; ++b) {
        const size_t row = size_t(b) * c.num_kv_heads * c.head_dim;
        const size_t n = size_t(c.num_kv_heads) * c.head_dim;
        const int32_t pos = positions[b];
        AppendRequest req;
        if (kv_dtype == DType::kF32) {
          req.keys = TensorRef::Of(std::span<const float>(kv.k).subspan(row, n));
          req.values = TensorRef::Of(std::span<const float>(kv.v).subspan(row, n));
        } else {
          req.keys = TensorRef::Of(std::span<const uint16_t>(kv.k16).subspan(row, n), kv_dtype);
          req.values = TensorRef::Of(std::span<const uint16_t>(kv.v16).subspan(row, n), kv_dtype);
        }
        req.positions = std::span<const int32_t>(&pos, 1);
        REQUIRE(ref->Append(batch[b], l, req).ok());
      }
      std::vector<float> want(q_elements), got(q_elements);
      REQUIRE(ref->DecodeAttention(batch, l, q, want).ok());
      // Under test: the reserved rows written by AppendStep.
      TensorRef keys = kv.Keys(kv_dtype), values = kv.Values(kv_dtype);
#if KVCACHE_TEST_DEVICE_MEMORY
      std::unique_ptr<DeviceMemory> dk, dv;
      if (device_kv) {
        const size_t bytes = kv_elements * DTypeSize(kv_dtype);
        dk = std::make_unique<DeviceMemory>(bytes);
        dv = std::make_unique<DeviceMemory>(bytes);
        dk->Upload(keys.data, bytes);
        dv->Upload(values.data, bytes);
        keys = TensorRef::OnDevice(dk->get(), kv_dtype, keys.num_elements);
        values = TensorRef::OnDevice(dv->get(), kv_dtype, values.num_elements);
      }
#else
      REQUIRE(!device_kv);
#endif
      absl::Status s = step->AppendStep(*plan, l, keys, values);
      INFO(s.ToString());
      REQUIRE(s.ok());
      REQUIRE(step->DecodeAttention(*plan, l, q, got).ok());
      INFO("step " << t << " layer " << l);
      REQUIRE(std::memcmp(want.data(), got.data(), want.size() * 4) == 0);
    }
  }
  REQUIRE(step->Validate().ok());
  REQUIRE(SameImage(Snapshot(*ref), Snapshot(*step)));
}

TEST_CASE("step reservation: reserve + AppendStep + decode == Append + decode (cpu)", "[step]") {
  for (DType t : {DType::kF32, DType::kF16}) {
    INFO("K/V dtype " << DTypeName(t));
    CheckReservationMatchesAppend("cpu", t, /*device_kv=*/false);
  }
}

TEST_CASE("step reservation: refusals leave the cache unchanged (cpu)", "[step]") {
  CacheConfig c = Config();
  // The prefill takes 8 pages (2 per stream); reserving for A and its fork B copies all 8
  // shared, partly filled tails on write: 4 free pages cover some streams, not all.
  c.num_pages = 12;
  auto cache = NewCache(c, "cpu");
  const std::vector<SequenceId> batch = Prefill(*cache, 3);
  const testing::CacheImage before = Snapshot(*cache);
  std::vector<int32_t> positions = {6, 6};
  StepOptions options;
  options.append_tokens = 1;
  options.positions = positions;

  // Not after the last appended position.
  positions = {6, 5};
  options.positions = positions;
  absl::StatusOr<DecodePlan> plan = cache->PrepareDecode(batch, options);
  REQUIRE(plan.status().code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(plan.status().message().find("positions[1] = 5") != std::string::npos);
  positions = {6, 6};
  // Positions of the wrong size; append_tokens out of range.
  const std::vector<int32_t> one = {6};
  options.positions = one;
  REQUIRE(cache->PrepareDecode(batch, options).status().code() ==
          absl::StatusCode::kInvalidArgument);
  options.positions = positions;
  options.append_tokens = 2;
  REQUIRE(cache->PrepareDecode(batch, options).status().code() ==
          absl::StatusCode::kInvalidArgument);
  options.append_tokens = 1;
  // Capturable on a host backend.
  options.capturable = true;
  options.max_context = 64;
  REQUIRE(cache->PrepareDecode(batch, options).status().code() ==
          absl::StatusCode::kInvalidArgument);
  options.capturable = false;
  options.max_context = 0;
  // Pool exhaustion reserves nothing (all layers and streams or none).
  plan = cache->PrepareDecode(batch, options);
  INFO(plan.status().ToString());
  REQUIRE(plan.status().code() == absl::StatusCode::kResourceExhausted);
  REQUIRE(SameImage(before, Snapshot(*cache)));
  REQUIRE(cache->Validate().ok());
  // With A alone (its tail no longer shared once B is freed) the reservation fits.
  REQUIRE(cache->Free(batch[1]).ok());
  const std::vector<SequenceId> a = {batch[0]};
  const std::vector<int32_t> a_position = {6};
  options.positions = a_position;
  REQUIRE(cache->PrepareDecode(a, options).ok());

  // Page summaries need the keys on the host at reservation.
  CacheConfig cs = Config();
  cs.page_summaries = true;
  auto summaries = NewCache(cs, "cpu");
  const std::vector<SequenceId> b2 = Prefill(*summaries, 3);
  const testing::CacheImage image = Snapshot(*summaries);
  options.positions = positions;
  REQUIRE(summaries->PrepareDecode(b2, options).status().code() ==
          absl::StatusCode::kFailedPrecondition);
  REQUIRE(SameImage(image, Snapshot(*summaries)));
}

TEST_CASE("step reservation: AppendStep misuse (cpu)", "[step]") {
  const CacheConfig c = Config();
  auto cache = NewCache(c, "cpu");
  const std::vector<SequenceId> batch = Prefill(*cache, 5);
  const std::vector<int32_t> positions = {6, 6};
  StepOptions options;
  options.append_tokens = 1;
  options.positions = positions;
  absl::StatusOr<DecodePlan> plan = cache->PrepareDecode(batch, options);
  REQUIRE(plan.ok());
  std::mt19937 rng(1);
  const size_t n = size_t(batch.size()) * c.num_kv_heads * c.head_dim;
  const std::vector<float> k = RandomVector(rng, n), v = RandomVector(rng, n);
  const std::vector<float> q = RandomVector(rng, batch.size() * c.num_q_heads * c.head_dim);
  std::vector<float> out(q.size());
  // Decode before the layer's AppendStep would read an unwritten row.
  REQUIRE(cache->DecodeAttention(*plan, 0, q, out).code() == absl::StatusCode::kFailedPrecondition);
  // Wrong shape, wrong layer.
  REQUIRE(cache->AppendStep(*plan, 0, TensorRef::Of(std::span(k).first(n - 1)), TensorRef::Of(v))
              .code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(cache->AppendStep(*plan, 2, TensorRef::Of(k), TensorRef::Of(v)).code() ==
          absl::StatusCode::kOutOfRange);
  REQUIRE(cache->AppendStep(*plan, 0, TensorRef::Of(k), TensorRef::Of(v)).ok());
  // Twice for one layer in one step.
  REQUIRE(cache->AppendStep(*plan, 0, TensorRef::Of(k), TensorRef::Of(v)).code() ==
          absl::StatusCode::kFailedPrecondition);
  REQUIRE(cache->DecodeAttention(*plan, 0, q, out).ok());
  // A plan without a reservation.
  absl::StatusOr<DecodePlan> plain = cache->PrepareDecode(batch);
  REQUIRE(plain.ok());
  REQUIRE(cache->AppendStep(*plain, 1, TensorRef::Of(k), TensorRef::Of(v)).code() ==
          absl::StatusCode::kFailedPrecondition);
  REQUIRE(cache->Validate().ok());
}

TEST_CASE("step reservation: streams with a retrieval key index are refused (cpu)", "[step]") {
  const CacheConfig c = Config();
  auto cache = NewCache(c, "cpu");
  const std::vector<SequenceId> batch = Prefill(*cache, 9);
  std::mt19937 rng(2);
  const std::vector<float> q = RandomVector(rng, batch.size() * c.num_q_heads * c.head_dim);
  std::vector<float> out(q.size());
  DecodeOptions retrieval;
  retrieval.read_policy.kind = ReadPolicy::Kind::kRetrieval;
  retrieval.read_policy.top_k = 2;
  retrieval.read_policy.dense_first_layers = 0;
  REQUIRE(cache->DecodeAttention(batch, 1, q, out, {}, retrieval).ok());  // builds the indexes
  const testing::CacheImage before = Snapshot(*cache);
  const std::vector<int32_t> positions = {6, 6};
  StepOptions options;
  options.append_tokens = 1;
  options.positions = positions;
  const absl::Status s = cache->PrepareDecode(batch, options).status();
  INFO(s.ToString());
  REQUIRE(s.code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE(s.message().find("key index") != std::string::npos);
  REQUIRE(SameImage(before, Snapshot(*cache)));
}

#if KVCACHE_TEST_DEVICE_MEMORY

TEST_CASE("cuda capturable plan: misuse is refused", "[cuda][step]") {
  KVCACHE_CUDA_CASE();
  const CacheConfig c = Config();
  auto cache = NewCache(c, CudaBackend());
  const std::vector<SequenceId> batch = Prefill(*cache, 4);
  const size_t kv_elements = batch.size() * size_t(c.num_kv_heads) * c.head_dim;
  const size_t q_elements = batch.size() * size_t(c.num_q_heads) * c.head_dim;
  DeviceMemory k(kv_elements * 4), v(kv_elements * 4), q(q_elements * 4), out(q_elements * 4);
  std::vector<float> zeros(q_elements, 0.0f), host_out(q_elements);
  k.Upload(zeros.data(), kv_elements * 4);
  v.Upload(zeros.data(), kv_elements * 4);
  q.Upload(zeros.data(), q_elements * 4);
  const std::vector<int32_t> positions = {6, 6};
  StepOptions options;
  options.append_tokens = 1;
  options.positions = positions;
  options.capturable = true;
  // max_context missing, or shorter than a stream after the reservation.
  REQUIRE(cache->PrepareDecode(batch, options).status().code() ==
          absl::StatusCode::kInvalidArgument);
  options.max_context = 6;
  const testing::CacheImage before = Snapshot(*cache);
  REQUIRE(cache->PrepareDecode(batch, options).status().code() ==
          absl::StatusCode::kInvalidArgument);
  REQUIRE(SameImage(before, Snapshot(*cache)));
  options.max_context = 32;
  absl::StatusOr<DecodePlan> plan = cache->PrepareDecode(batch, options);
  INFO(plan.status().ToString());
  REQUIRE(plan.ok());
  const TensorRef dk = TensorRef::OnDevice(k.get(), DType::kF32, kv_elements);
  const TensorRef dv = TensorRef::OnDevice(v.get(), DType::kF32, kv_elements);
  const TensorRef dq = TensorRef::OnDevice(q.get(), DType::kF32, q_elements);
  const MutableTensorRef dout = MutableTensorRef::OnDevice(out.get(), DType::kF32, q_elements);
  // Host K/V: a capturable plan takes device memory only.
  std::vector<float> host_kv(kv_elements);
  REQUIRE(cache->AppendStep(*plan, 0, TensorRef::Of(host_kv), TensorRef::Of(host_kv)).code() ==
          absl::StatusCode::kInvalidArgument);
  REQUIRE(cache->AppendStep(*plan, 0, dk, dv).ok());
  // Host q / out, score accumulation: not capturable.
  REQUIRE(cache->DecodeAttention(*plan, 0, zeros, host_out).code() ==
          absl::StatusCode::kInvalidArgument);
  DecodeOptions accumulate;
  accumulate.accumulate_scores = true;
  REQUIRE(cache->DecodeAttention(*plan, 0, dq, dout, {}, accumulate).code() ==
          absl::StatusCode::kInvalidArgument);
  REQUIRE(cache->DecodeAttention(*plan, 0, dq, dout).ok());
  // An Append after the reservation changes the streams the device buffers describe.
  std::mt19937 rng(8);
  REQUIRE(testing::AppendRandomTokens(*cache, batch[0], 1, 1, 7, rng).ok());
  REQUIRE(cache->AppendStep(*plan, 1, dk, dv).code() == absl::StatusCode::kFailedPrecondition);
  // Re-prepare with another batch or other capture options: a new plan is needed.
  const std::vector<SequenceId> one = {batch[0]};
  const std::vector<int32_t> one_position = {8};
  StepOptions other = options;
  other.positions = one_position;
  REQUIRE(cache->PrepareDecode(*plan, one, other).code() == absl::StatusCode::kInvalidArgument);
  other = options;
  other.max_context = 64;
  REQUIRE(cache->PrepareDecode(*plan, batch, other).code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(cache->Synchronize().ok());
  REQUIRE(cache->Validate().ok());
}

TEST_CASE("cuda capturable plan: max_context far above the streams (trailing splits empty)",
          "[cuda][step]") {
  KVCACHE_CUDA_CASE();
  // max_context 2048 fixes a 4-way key split on the emulated device (4 SMs, 4 streams), of
  // which the 7..8-token streams fill only the first split: the kernel clips each split to its
  // stream and the merge gives the empty ones weight 0.
  const CacheConfig c = Config();
  auto ref = NewCache(c, CudaBackend());
  auto step = NewCache(c, CudaBackend());
  const std::vector<SequenceId> batch = Prefill(*ref, 21);
  REQUIRE(Prefill(*step, 21) == batch);
  const size_t kv_elements = batch.size() * size_t(c.num_kv_heads) * c.head_dim;
  const size_t q_elements = batch.size() * size_t(c.num_q_heads) * c.head_dim;
  DeviceMemory dk(kv_elements * 4), dv(kv_elements * 4), dq(q_elements * 4), dout(q_elements * 4);
  std::mt19937 rng(6);
  for (int32_t t = 0; t < 2; ++t) {
    const std::vector<int32_t> positions(batch.size(), 6 + t);
    StepOptions options;
    options.append_tokens = 1;
    options.positions = positions;
    options.capturable = true;
    options.max_context = 2048;
    absl::StatusOr<DecodePlan> plan = step->PrepareDecode(batch, options);
    INFO(plan.status().ToString());
    REQUIRE(plan.ok());
    for (int32_t l = 0; l < c.num_layers; ++l) {
      const std::vector<float> k = RandomVector(rng, kv_elements),
                               v = RandomVector(rng, kv_elements);
      const std::vector<float> q = RandomVector(rng, q_elements);
      for (size_t b = 0; b < batch.size(); ++b) {
        const size_t row = b * c.num_kv_heads * c.head_dim, n = size_t(c.num_kv_heads) * c.head_dim;
        REQUIRE(ref->Append(batch[b], l,
                            {TensorRef::Of(std::span<const float>(k).subspan(row, n)),
                             TensorRef::Of(std::span<const float>(v).subspan(row, n)),
                             std::span<const int32_t>(&positions[b], 1)})
                    .ok());
      }
      std::vector<float> want(q_elements), got(q_elements);
      REQUIRE(ref->DecodeAttention(batch, l, q, want).ok());
      dk.Upload(k.data(), k.size() * 4);
      dv.Upload(v.data(), v.size() * 4);
      dq.Upload(q.data(), q.size() * 4);
      REQUIRE(step->AppendStep(*plan, l, TensorRef::OnDevice(dk.get(), DType::kF32, kv_elements),
                               TensorRef::OnDevice(dv.get(), DType::kF32, kv_elements))
                  .ok());
      REQUIRE(step->DecodeAttention(*plan, l,
                                    TensorRef::OnDevice(dq.get(), DType::kF32, q_elements),
                                    MutableTensorRef::OnDevice(dout.get(), DType::kF32, q_elements))
                  .ok());
      REQUIRE(step->Synchronize().ok());
      dout.Download(got.data(), got.size() * 4);
      // The reference runs one split: the merge pass rounds differently, so not bit for bit.
      for (size_t i = 0; i < got.size(); ++i) {
        INFO("step " << t << " layer " << l << " element " << i);
        REQUIRE(std::abs(got[i] - want[i]) <= 1e-5f * (1.0f + std::abs(want[i])));
      }
    }
  }
}

TEST_CASE("cuda step reservation: reserve + AppendStep + decode == Append + decode",
          "[cuda][step]") {
  KVCACHE_CUDA_CASE();
  for (DType t : {DType::kF32, DType::kF16}) {
    for (bool device : {false, true}) {
      INFO("K/V dtype " << DTypeName(t) << (device ? " device" : " host"));
      CheckReservationMatchesAppend(CudaBackend(), t, device);
    }
  }
}

#if KVCACHE_HAVE_CUDA_EMULATED

// Device buffers of one layer of a step, at fixed addresses for the graph.
struct LayerBuffers {
  explicit LayerBuffers(size_t kv_bytes, size_t q_bytes)
      : k(kv_bytes), v(kv_bytes), q(q_bytes), out(q_bytes) {}
  DeviceMemory k, v, q, out;
};

// q / out of layer 1 are f16: the captured path's conversion kernels and scratch.
DType QDType(int32_t layer) { return layer == 1 ? DType::kF16 : DType::kF32; }

TEST_CASE("cuda capturable plan: a graph captured at step 1 replays steps 2..N after re-prepares",
          "[cuda][step][graph]") {
  // The capture runs on the emulator (its capture rules: cuda/emulation/runtime.h) and, on a GPU,
  // on the real runtime (scripts/gpu_check.sh).
  KVCACHE_CUDA_CASE();
  const CacheConfig c = Config();
  auto ref = NewCache(c, CudaBackend());
  auto step = NewCache(c, CudaBackend());
  const std::vector<SequenceId> batch = Prefill(*ref, 11);
  REQUIRE(Prefill(*step, 11) == batch);
  const int32_t batch_size = static_cast<int32_t>(batch.size());
  const size_t kv_elements = size_t(batch_size) * c.num_kv_heads * c.head_dim;
  const size_t q_elements = size_t(batch_size) * c.num_q_heads * c.head_dim;
  std::vector<std::unique_ptr<LayerBuffers>> layers;
  for (int32_t l = 0; l < c.num_layers; ++l) {
    layers.push_back(std::make_unique<LayerBuffers>(kv_elements * 4, q_elements * 4));
  }
  TestStream stream;
  cudaStream_t s = static_cast<cudaStream_t>(stream.get());
  std::mt19937 rng(5);
  DecodePlan plan;
  cudaGraphExec_t exec = nullptr;
  cudaGraph_t graph = nullptr;
  for (int32_t t = 0; t < 7; ++t) {  // positions 6..12: page boundaries at 8 and 12
    INFO("step " << t);
    const std::vector<int32_t> positions(batch_size, 6 + t);
    if (t == 3) {
      // Between two replays the engine evicts sequence A's first token everywhere: the streams
      // get new versions and pages, which the next in-place prepare uploads to the same
      // addresses (the graph holds no page id).
      EvictionPlan evict;
      evict.sequence = batch[0];
      for (int32_t l = 0; l < c.num_layers; ++l) {
        for (int32_t h = 0; h < c.num_kv_heads; ++h) {
          StreamPlan sp;
          sp.layer = l;
          sp.kv_head = h;
          for (int32_t i = 1; i < 6 + t; ++i) sp.kept.push_back(i);
          evict.streams.push_back(sp);
        }
      }
      REQUIRE(ref->Apply(evict).ok());
      REQUIRE(step->Apply(evict).ok());
    }
    std::vector<std::vector<float>> want(c.num_layers);
    for (int32_t l = 0; l < c.num_layers; ++l) {
      const std::vector<float> k = RandomVector(rng, kv_elements);
      const std::vector<float> v = RandomVector(rng, kv_elements);
      std::vector<float> q = RandomVector(rng, q_elements);
      layers[l]->k.Upload(k.data(), k.size() * 4);
      layers[l]->v.Upload(v.data(), v.size() * 4);
      if (QDType(l) == DType::kF32) {
        layers[l]->q.Upload(q.data(), q.size() * 4);
      } else {  // the reference decodes the exactly widened q
        const std::vector<uint16_t> bits = ToBits(q, QDType(l));
        layers[l]->q.Upload(bits.data(), bits.size() * 2);
        q = testing::FromBits(bits, QDType(l));
      }
      for (int32_t b = 0; b < batch_size; ++b) {
        const size_t row = size_t(b) * c.num_kv_heads * c.head_dim;
        const size_t n = size_t(c.num_kv_heads) * c.head_dim;
        const int32_t pos = positions[b];
        REQUIRE(ref->Append(batch[b], l,
                            {TensorRef::Of(std::span<const float>(k).subspan(row, n)),
                             TensorRef::Of(std::span<const float>(v).subspan(row, n)),
                             std::span<const int32_t>(&pos, 1)})
                    .ok());
      }
      want[l].resize(q_elements);
      REQUIRE(ref->DecodeAttention(batch, l, q, want[l]).ok());
    }
    StepOptions options;
    options.append_tokens = 1;
    options.positions = positions;
    options.capturable = true;
    options.max_context = 13;  // the streams end the test with 13 tokens
    options.stream = stream.get();
    if (t == 0) {
      absl::StatusOr<DecodePlan> made = step->PrepareDecode(batch, options);
      INFO(made.status().ToString());
      REQUIRE(made.ok());
      REQUIRE(made->capturable());
      plan = *std::move(made);
      REQUIRE(TestBeginCapture(s) == cudaSuccess);
      for (int32_t l = 0; l < c.num_layers; ++l) {
        absl::Status st = step->AppendStep(
            plan, l, TensorRef::OnDevice(layers[l]->k.get(), DType::kF32, kv_elements),
            TensorRef::OnDevice(layers[l]->v.get(), DType::kF32, kv_elements), stream.get());
        INFO(st.ToString());
        REQUIRE(st.ok());
        DecodeOptions d;
        d.stream = stream.get();
        st = step->DecodeAttention(
            plan, l, TensorRef::OnDevice(layers[l]->q.get(), QDType(l), q_elements),
            MutableTensorRef::OnDevice(layers[l]->out.get(), QDType(l), q_elements), {}, d);
        INFO(st.ToString());
        REQUIRE(st.ok());
      }
      REQUIRE(TestEndCapture(s, &graph) == cudaSuccess);
      REQUIRE(TestGraphInstantiate(&exec, graph) == cudaSuccess);
    } else {
      absl::Status st = step->PrepareDecode(plan, batch, options);
      INFO(st.ToString());
      REQUIRE(st.ok());
    }
    // The captured work ran only now (a capture records, it does not run).
    REQUIRE(TestGraphLaunch(exec, s) == cudaSuccess);
    REQUIRE(step->Synchronize(stream.get()).ok());
    for (int32_t l = 0; l < c.num_layers; ++l) {
      INFO("layer " << l);
      if (QDType(l) == DType::kF32) {
        std::vector<float> got(q_elements);
        layers[l]->out.Download(got.data(), got.size() * 4);
        REQUIRE(std::memcmp(want[l].data(), got.data(), got.size() * 4) == 0);
      } else {  // out rounded from the f32 result with the round-to-nearest-even of dtype.h
        std::vector<uint16_t> got(q_elements);
        layers[l]->out.Download(got.data(), got.size() * 2);
        REQUIRE(got == ToBits(want[l], QDType(l)));
      }
    }
  }
  REQUIRE(TestGraphDestroy(exec, graph) == cudaSuccess);
  REQUIRE(step->Validate().ok());
  REQUIRE(testing::SameImage(testing::Snapshot(*ref), testing::Snapshot(*step)));

  // A step longer than max_context does not fit the captured buffers: recapture, cache unchanged.
  const testing::CacheImage image = testing::Snapshot(*step);
  const std::vector<int32_t> next(batch_size, 13);
  StepOptions too_long;
  too_long.append_tokens = 1;
  too_long.positions = next;
  too_long.capturable = true;
  too_long.max_context = 13;
  too_long.stream = stream.get();
  const absl::Status refused = step->PrepareDecode(plan, batch, too_long);
  INFO(refused.ToString());
  REQUIRE(refused.code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE(testing::SameImage(image, testing::Snapshot(*step)));
}

TEST_CASE("cuda capturable plan: the non-capturable decode fails under capture",
          "[cuda][step][graph]") {
  KVCACHE_CUDA_CASE();
  if (!Emulated()) return;
  const CacheConfig c = Config();
  auto cache = NewCache(c, CudaBackend());
  const std::vector<SequenceId> batch = Prefill(*cache, 2);
  const size_t q_elements = batch.size() * size_t(c.num_q_heads) * c.head_dim;
  DeviceMemory q(q_elements * 4), out(q_elements * 4);
  std::mt19937 rng(3);
  const std::vector<float> qv = RandomVector(rng, q_elements);
  q.Upload(qv.data(), qv.size() * 4);
  TestStream stream;
  cudaStream_t s = static_cast<cudaStream_t>(stream.get());
  absl::StatusOr<DecodePlan> plan = cache->PrepareDecode(batch);
  REQUIRE(plan.ok());
  DecodeOptions d;
  d.stream = stream.get();
  // Once outside a capture, so that the backend's scratch buffers exist (their first cudaMalloc
  // would fail the capture too): what fails below is the per-call staging upload.
  REQUIRE(cache
              ->DecodeAttention(*plan, 0, TensorRef::OnDevice(q.get(), DType::kF32, q_elements),
                                MutableTensorRef::OnDevice(out.get(), DType::kF32, q_elements), {},
                                d)
              .ok());
  REQUIRE(cache->Synchronize(stream.get()).ok());
  REQUIRE(cuda_emu::StreamBeginCapture(s, cudaStreamCaptureModeGlobal) == cudaSuccess);
  // The old path stages its views with a pageable host -> device copy on the stream.
  const absl::Status st =
      cache->DecodeAttention(*plan, 0, TensorRef::OnDevice(q.get(), DType::kF32, q_elements),
                             MutableTensorRef::OnDevice(out.get(), DType::kF32, q_elements), {}, d);
  INFO(st.ToString());
  REQUIRE(!st.ok());
  REQUIRE(st.message().find("cudaErrorStreamCaptureUnsupported") != std::string::npos);
  cudaGraph_t graph = nullptr;
  REQUIRE(cuda_emu::StreamEndCapture(s, &graph) == cudaErrorStreamCaptureInvalidated);
  REQUIRE(graph == nullptr);
  cuda_emu::GetLastError();
}

TEST_CASE("cuda emulator capture: records device work, refuses syncs, allocations, host copies",
          "[cuda][graph]") {
  KVCACHE_CUDA_CASE();
  if (!Emulated()) return;
  TestStream stream;
  cudaStream_t s = static_cast<cudaStream_t>(stream.get());
  DeviceMemory a(64), b(64);
  std::vector<uint8_t> host(64, 7), back(64);
  a.Upload(host.data(), 64);
  // Recorded, not run: b changes only when the graph is launched.
  REQUIRE(cuda_emu::StreamBeginCapture(s, cudaStreamCaptureModeGlobal) == cudaSuccess);
  cudaStreamCaptureStatus status{};
  REQUIRE(cuda_emu::StreamIsCapturing(s, &status) == cudaSuccess);
  REQUIRE(status == cudaStreamCaptureStatusActive);
  REQUIRE(cuda_emu::MemsetAsync(b.get(), 0, 64, s) == cudaSuccess);
  REQUIRE(cuda_emu::MemcpyAsync(b.get(), a.get(), 32, cudaMemcpyDeviceToDevice, s) == cudaSuccess);
  cudaGraph_t graph = nullptr;
  REQUIRE(cuda_emu::StreamEndCapture(s, &graph) == cudaSuccess);
  std::vector<uint8_t> before(64, 1);
  b.Upload(before.data(), 64);
  cudaGraphExec_t exec = nullptr;
  REQUIRE(cuda_emu::GraphInstantiate(&exec, graph) == cudaSuccess);
  b.Download(back.data(), 64);
  REQUIRE(back == before);
  REQUIRE(cuda_emu::GraphLaunch(exec, s) == cudaSuccess);
  b.Download(back.data(), 64);
  for (int i = 0; i < 64; ++i) REQUIRE(back[i] == (i < 32 ? 7 : 0));
  REQUIRE(cuda_emu::GraphExecDestroy(exec) == cudaSuccess);
  REQUIRE(cuda_emu::GraphDestroy(graph) == cudaSuccess);

  // Each refused call invalidates the capture.
  for (int which = 0; which < 4; ++which) {
    INFO("refused call " << which);
    REQUIRE(cuda_emu::StreamBeginCapture(s, cudaStreamCaptureModeGlobal) == cudaSuccess);
    void* p = nullptr;
    cudaError_t e = cudaSuccess;
    switch (which) {
      case 0:
        e = cuda_emu::StreamSynchronize(s);
        break;
      case 1:
        e = cuda_emu::Malloc(&p, 64);
        break;
      case 2:
        e = cuda_emu::MemcpyAsync(b.get(), host.data(), 64, cudaMemcpyHostToDevice, s);
        break;
      case 3:
        e = cuda_emu::DeviceSynchronize();
        break;
    }
    REQUIRE(e == cudaErrorStreamCaptureUnsupported);
    REQUIRE(cuda_emu::StreamIsCapturing(s, &status) == cudaSuccess);
    REQUIRE(status == cudaStreamCaptureStatusInvalidated);
    REQUIRE(cuda_emu::StreamEndCapture(s, &graph) == cudaErrorStreamCaptureInvalidated);
    cuda_emu::GetLastError();
  }
}

#endif  // KVCACHE_HAVE_CUDA_EMULATED
#endif  // KVCACHE_TEST_DEVICE_MEMORY

}  // namespace
}  // namespace kvcache
