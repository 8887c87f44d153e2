// Device tensors through the C API (c_api.h kvc_tensor with KVC_MEMORY_DEVICE): a planned and a
// one-shot decode with q / out / lse in device memory, on the backend's own stream and on a
// caller's stream (kvc_decode_options.stream, kvc_synchronize), and device K/V through
// kvc_append_tensors. The oracle is the same cache's host-tensor f32 C call: the device path
// runs the same kernel over the same pool, so results are EQUAL, bit for bit.
//
// A C++ test because device memory of the emulated backend comes from the emulator's runtime
// inside this process (tests/cuda_test_util.h); the C API's sources are compiled into this
// binary for the same reason (libkvcache_c.so has its own, hidden, copy of the emulator).
// Runs on "cuda" with a GPU, else on "cuda-emulated", else skips (exit code 4).
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "kvcache/c_api.h"
#include "test_util.h"

namespace kvcache {
namespace {

using testing::FromBits;
using testing::RandomVector;
using testing::ToBits;

#if KVCACHE_TEST_DEVICE_MEMORY

constexpr int32_t kLayers = 2, kHeads = 2, kQHeads = 8, kDim = 64;

kvc_cache* NewCCache() {
  kvc_config cfg;
  kvc_config_init(&cfg);
  cfg.num_layers = kLayers;
  cfg.num_kv_heads = kHeads;
  cfg.num_q_heads = kQHeads;
  cfg.head_dim = kDim;
  cfg.dtype = KVC_DTYPE_F16;
  cfg.page_tokens = 16;
  cfg.num_pages = 256;
  kvc_cache* cache = nullptr;
  const kvc_status s = kvc_cache_create(&cfg, CudaBackend().c_str(), &cache);
  INFO(kvc_last_error());
  REQUIRE(s == KVC_OK);
  return cache;
}

kvc_tensor Device(void* p, int64_t n, kvc_dtype t) {
  return kvc_tensor{p, n, t, KVC_MEMORY_DEVICE};
}

kvc_tensor Host(void* p, int64_t n, kvc_dtype t) { return kvc_tensor{p, n, t, KVC_MEMORY_HOST}; }

#define REQUIRE_KVC_OK(expr)      \
  do {                            \
    const kvc_status s_ = (expr); \
    INFO(kvc_last_error());       \
    REQUIRE(s_ == KVC_OK);        \
  } while (0)

TEST_CASE("C API device tensors: planned and one-shot decode equal the host f32 C decode",
          "[cuda][device][c_api]") {
  KVCACHE_CUDA_CASE();
  kvc_cache* cache = NewCCache();
  std::mt19937 rng(71);
  std::vector<kvc_seq> batch(3);
  for (int b = 0; b < 3; ++b) {
    REQUIRE_KVC_OK(kvc_sequence_add(cache, &batch[b]));
    const int32_t n = 11 + 21 * b;
    std::vector<int32_t> pos(n);
    for (int32_t i = 0; i < n; ++i) pos[i] = i;
    for (int32_t l = 0; l < kLayers; ++l) {
      const std::vector<float> k = RandomVector(rng, size_t(n) * kHeads * kDim);
      const std::vector<float> v = RandomVector(rng, size_t(n) * kHeads * kDim);
      REQUIRE_KVC_OK(kvc_append(cache, batch[b], l, n, KVC_DTYPE_F32, k.data(), v.data(),
                                pos.data(), nullptr, nullptr));
    }
  }
  const int64_t n = int64_t{3} * kQHeads * kDim;
  const int64_t n_lse = int64_t{3} * kQHeads;
  const std::vector<float> raw = RandomVector(rng, static_cast<size_t>(n));
  DeviceMemory d_q(n * 4), d_out(n * 4), d_lse(n_lse * 4);
  TestStream stream;
  kvc_decode_plan* plan = nullptr;
  REQUIRE_KVC_OK(kvc_prepare_decode(cache, batch.data(), 3, &plan));
  for (int32_t layer = 0; layer < kLayers; ++layer) {
    for (kvc_dtype q_dtype : {KVC_DTYPE_F32, KVC_DTYPE_F16, KVC_DTYPE_BF16}) {
      const DType qt = static_cast<DType>(q_dtype);
      std::vector<float> widened = raw;
      if (q_dtype == KVC_DTYPE_F32) {
        d_q.Upload(raw.data(), raw.size() * 4);
      } else {
        const std::vector<uint16_t> bits = ToBits(raw, qt);
        widened = FromBits(bits, qt);
        d_q.Upload(bits.data(), bits.size() * 2);
      }
      std::vector<float> expected(n), expected_lse(n_lse);
      REQUIRE_KVC_OK(kvc_decode_attention(cache, batch.data(), 3, layer, widened.data(),
                                          expected.data(), expected_lse.data(), 0.0f,
                                          KVC_GQA_MEAN, 0));
      for (kvc_dtype out_dtype : {KVC_DTYPE_F32, KVC_DTYPE_F16, KVC_DTYPE_BF16}) {
        for (int mode = 0; mode < 3; ++mode) {  // planned, planned on a caller stream, one-shot
          INFO("layer " << layer << ", q " << int{q_dtype} << ", out " << int{out_dtype}
                        << ", mode " << mode);
          const std::vector<uint8_t> poison(n * 4, 0xEE);
          d_out.Upload(poison.data(), poison.size());
          d_lse.Upload(poison.data(), n_lse * 4);
          kvc_decode_options options;
          kvc_decode_options_init(&options);
          if (mode == 1) options.stream = stream.get();
          const kvc_tensor q = Device(d_q.get(), n, q_dtype);
          const kvc_tensor out = Device(d_out.get(), n, out_dtype);
          const kvc_tensor lse = Device(d_lse.get(), n_lse, KVC_DTYPE_F32);
          REQUIRE_KVC_OK(mode < 2 ? kvc_decode_attention_planned(cache, plan, layer, &q, &out,
                                                                 &lse, &options)
                                  : kvc_decode_attention_tensors(cache, batch.data(), 3, layer,
                                                                 &q, &out, &lse, &options));
          REQUIRE_KVC_OK(kvc_synchronize(cache, options.stream));
          std::vector<float> got_lse(n_lse);
          d_lse.Download(got_lse.data(), got_lse.size() * 4);
          REQUIRE(got_lse == expected_lse);
          if (out_dtype == KVC_DTYPE_F32) {
            std::vector<float> got(n);
            d_out.Download(got.data(), got.size() * 4);
            REQUIRE(got == expected);
          } else {
            std::vector<uint16_t> got(n);
            d_out.Download(got.data(), got.size() * 2);
            REQUIRE(got == ToBits(expected, static_cast<DType>(out_dtype)));
          }
        }
      }
    }
  }
#if KVCACHE_HAVE_CUDA_EMULATED
  if (Emulated()) {  // the caller's stream reaches the backend: counted by the emulator only
    TestStream other;
    const kvc_tensor q = Device(d_q.get(), n, KVC_DTYPE_F32);
    const kvc_tensor out = Device(d_out.get(), n, KVC_DTYPE_F32);
    kvc_decode_options options;
    kvc_decode_options_init(&options);
    options.stream = stream.get();
    REQUIRE_KVC_OK(kvc_decode_attention_planned(cache, plan, 0, &q, &out, nullptr, &options));
    const int64_t waits = cuda_emu::StreamWaitEventCount(static_cast<cudaStream_t>(other.get()));
    options.stream = other.get();  // another stream: waits for the decode on `stream`
    REQUIRE_KVC_OK(kvc_decode_attention_planned(cache, plan, 0, &q, &out, nullptr, &options));
    REQUIRE(cuda_emu::StreamWaitEventCount(static_cast<cudaStream_t>(other.get())) > waits);
    REQUIRE_KVC_OK(kvc_synchronize(cache, other.get()));
  }
#endif
  // Mixed memory spaces are refused, naming both; nothing is written.
  std::vector<float> host_out(n, 7.0f);
  const kvc_tensor q = Device(d_q.get(), n, KVC_DTYPE_F32);
  const kvc_tensor out = Host(host_out.data(), n, KVC_DTYPE_F32);
  REQUIRE(kvc_decode_attention_planned(cache, plan, 0, &q, &out, nullptr, nullptr) ==
          KVC_INVALID_ARGUMENT);
  REQUIRE(std::string(kvc_last_error()).find("memory space") != std::string::npos);
  REQUIRE(host_out == std::vector<float>(n, 7.0f));
  REQUIRE_KVC_OK(kvc_decode_plan_destroy(plan));
  REQUIRE_KVC_OK(kvc_cache_validate(cache));
  REQUIRE_KVC_OK(kvc_cache_destroy(cache));
}

TEST_CASE("C API device tensors: kvc_append_tensors with device K/V stores what a host append "
          "stores",
          "[cuda][device][c_api]") {
  KVCACHE_CUDA_CASE();
  kvc_cache* cache = NewCCache();
  std::mt19937 rng(73);
  kvc_seq from_device = 0, from_host = 0;
  REQUIRE_KVC_OK(kvc_sequence_add(cache, &from_device));
  REQUIRE_KVC_OK(kvc_sequence_add(cache, &from_host));
  const int32_t tokens = 37;
  std::vector<int32_t> pos(tokens);
  for (int32_t i = 0; i < tokens; ++i) pos[i] = 3 * i;
  const int64_t elems = int64_t{tokens} * kHeads * kDim;
  for (kvc_dtype dtype : {KVC_DTYPE_F32, KVC_DTYPE_BF16}) {
    const int32_t layer = dtype == KVC_DTYPE_F32 ? 0 : 1;
    const std::vector<float> k = RandomVector(rng, static_cast<size_t>(elems));
    const std::vector<float> v = RandomVector(rng, static_cast<size_t>(elems));
    std::vector<uint8_t> kb(elems * 4), vb(elems * 4);
    size_t bytes = elems * 4;
    if (dtype == KVC_DTYPE_F32) {
      std::memcpy(kb.data(), k.data(), bytes);
      std::memcpy(vb.data(), v.data(), bytes);
    } else {
      bytes = elems * 2;
      const std::vector<uint16_t> kbits = ToBits(k, DType::kBF16);
      const std::vector<uint16_t> vbits = ToBits(v, DType::kBF16);
      std::memcpy(kb.data(), kbits.data(), bytes);
      std::memcpy(vb.data(), vbits.data(), bytes);
    }
    DeviceMemory d_k(bytes), d_v(bytes);
    d_k.Upload(kb.data(), bytes);
    d_v.Upload(vb.data(), bytes);
    const kvc_tensor dk = Device(d_k.get(), elems, dtype), dv = Device(d_v.get(), elems, dtype);
    const kvc_tensor hk = Host(kb.data(), elems, dtype), hv = Host(vb.data(), elems, dtype);
    REQUIRE_KVC_OK(kvc_append_tensors(cache, from_device, layer, tokens, &dk, &dv, pos.data(),
                                      nullptr, nullptr));
    REQUIRE_KVC_OK(kvc_append_tensors(cache, from_host, layer, tokens, &hk, &hv, pos.data(),
                                      nullptr, nullptr));
    // Mixed: device keys, host values.
    REQUIRE(kvc_append_tensors(cache, from_host, layer, tokens, &dk, &hv, pos.data(), nullptr,
                               nullptr) == KVC_INVALID_ARGUMENT);
    for (int32_t h = 0; h < kHeads; ++h) {
      std::vector<float> ka(tokens * kDim), va(tokens * kDim), kh(tokens * kDim),
          vh(tokens * kDim);
      std::vector<int32_t> pa(tokens), ph(tokens);
      int32_t la = 0, lh = 0;
      REQUIRE_KVC_OK(kvc_stream_read(cache, from_device, layer, h, tokens, &la, pa.data(),
                                     nullptr, nullptr, ka.data(), va.data()));
      REQUIRE_KVC_OK(kvc_stream_read(cache, from_host, layer, h, tokens, &lh, ph.data(), nullptr,
                                     nullptr, kh.data(), vh.data()));
      REQUIRE(la == tokens);
      REQUIRE(lh == tokens);
      REQUIRE(pa == ph);
      REQUIRE(ka == kh);
      REQUIRE(va == vh);
    }
  }
  REQUIRE_KVC_OK(kvc_cache_validate(cache));
  REQUIRE_KVC_OK(kvc_cache_destroy(cache));
}

#else  // no CUDA runtime of any kind: the [cuda] cases skip (exit code 4)

TEST_CASE("C API device tensors: no CUDA backend", "[cuda][device][c_api]") {
  (void)CudaBackend();
}

#endif  // KVCACHE_TEST_DEVICE_MEMORY

}  // namespace
}  // namespace kvcache
