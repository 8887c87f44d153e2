// The C API under threads: per-thread error messages, concurrent work on different sequences,
// and kvc_cache_destroy racing with calls in flight (they must finish or fail cleanly with
// KVC_INVALID_ARGUMENT, never crash). Links libkvcache_c.so (tests/CMakeLists.txt).
#include <catch2/catch.hpp>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "kvcache/c_api.h"

namespace {

kvc_cache* MakeCache(int32_t layers, int32_t pages) {
  kvc_config cfg;
  kvc_config_init(&cfg);
  cfg.num_layers = layers;
  cfg.num_kv_heads = 2;
  cfg.num_q_heads = 4;
  cfg.head_dim = 16;
  cfg.dtype = KVC_DTYPE_F32;
  cfg.page_tokens = 4;
  cfg.num_pages = pages;
  kvc_cache* cache = nullptr;
  REQUIRE(kvc_cache_create(&cfg, "cpu", &cache) == KVC_OK);
  return cache;
}

}  // namespace

TEST_CASE("last error is per thread", "[c_api]") {
  kvc_cache* cache = MakeCache(2, 64);
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 500; ++i) {
        int32_t len = 0;
        const int32_t bad_layer = 100 + t;  // each thread names its own bad value
        if (kvc_stream_length(cache, 1, bad_layer, 0, &len) != KVC_OUT_OF_RANGE ||
            std::strstr(kvc_last_error(), ("layer " + std::to_string(bad_layer)).c_str()) ==
                nullptr) {
          ++mismatches;
        }
        kvc_stats stats;
        if (kvc_cache_stats(cache, &stats) != KVC_OK || kvc_last_error()[0] != '\0') {
          ++mismatches;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(mismatches == 0);
  REQUIRE(kvc_cache_destroy(cache) == KVC_OK);
}

TEST_CASE("threads drive their own sequences concurrently", "[c_api]") {
  kvc_cache* cache = MakeCache(2, 4096);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      kvc_seq seq = 0;
      if (kvc_sequence_add(cache, &seq) != KVC_OK) {
        ++failures;
        return;
      }
      std::vector<float> k(2 * 16), v(2 * 16), q(4 * 16, 0.1f * t), out(4 * 16);
      for (int32_t pos = 0; pos < 64; ++pos) {
        for (size_t i = 0; i < k.size(); ++i) k[i] = v[i] = 0.01f * (pos + i + t);
        for (int32_t layer = 0; layer < 2; ++layer) {
          if (kvc_append(cache, seq, layer, 1, KVC_DTYPE_F32, k.data(), v.data(), &pos, nullptr,
                         nullptr) != KVC_OK ||
              kvc_decode_attention(cache, &seq, 1, layer, q.data(), out.data(), nullptr, 0.0f,
                                   KVC_GQA_MEAN, 1) != KVC_OK) {
            ++failures;
          }
        }
        if (pos % 16 == 15 &&
            kvc_compress(cache, seq, "h2o", "heavy=0.3,recent=0.2", nullptr, nullptr) != KVC_OK) {
          ++failures;
        }
      }
      if (kvc_sequence_free(cache, seq) != KVC_OK) ++failures;
    });
  }
  for (auto& th : threads) th.join();
  CHECK(failures == 0);
  CHECK(kvc_cache_validate(cache) == KVC_OK);
  kvc_stats stats;
  REQUIRE(kvc_cache_stats(cache, &stats) == KVC_OK);
  CHECK(stats.pages_used == 0);
  REQUIRE(kvc_cache_destroy(cache) == KVC_OK);
}

TEST_CASE("destroy races with calls in flight", "[c_api]") {
  for (int round = 0; round < 20; ++round) {
    kvc_cache* cache = MakeCache(1, 256);
    kvc_seq seq = 0;
    REQUIRE(kvc_sequence_add(cache, &seq) == KVC_OK);
    std::atomic<int> unexpected{0}, invalid{0};
    std::atomic<bool> go{false};
    std::vector<std::thread> threads;
    for (int t = 0; t < 3; ++t) {
      threads.emplace_back([&] {
        while (!go) {
        }
        // Each call either completes (OK) or sees the destroyed handle; nothing else.
        for (;;) {
          int32_t len = 0;
          const kvc_status s = kvc_stream_length(cache, seq, 0, 0, &len);
          if (s == KVC_INVALID_ARGUMENT) {
            if (std::strstr(kvc_last_error(), "destroyed") == nullptr) ++unexpected;
            ++invalid;
            return;
          }
          if (s != KVC_OK) {
            ++unexpected;
            return;
          }
        }
      });
    }
    go = true;
    REQUIRE(kvc_cache_destroy(cache) == KVC_OK);
    for (auto& th : threads) th.join();
    CHECK(unexpected == 0);
    CHECK(invalid == 3);
  }
}

TEST_CASE("plans are checked against their cache", "[c_api]") {
  kvc_cache* a = MakeCache(1, 64);
  kvc_cache* b = MakeCache(1, 64);
  kvc_seq sa = 0, sb = 0;
  REQUIRE(kvc_sequence_add(a, &sa) == KVC_OK);
  REQUIRE(kvc_sequence_add(b, &sb) == KVC_OK);
  std::vector<float> k(8 * 2 * 16, 0.5f), v(k.size(), 0.25f);
  std::vector<int32_t> pos = {0, 1, 2, 3, 4, 5, 6, 7};
  REQUIRE(kvc_append(a, sa, 0, 8, KVC_DTYPE_F32, k.data(), v.data(), pos.data(), nullptr,
                     nullptr) == KVC_OK);
  REQUIRE(kvc_append(b, sb, 0, 8, KVC_DTYPE_F32, k.data(), v.data(), pos.data(), nullptr,
                     nullptr) == KVC_OK);
  kvc_plan* plan = nullptr;
  REQUIRE(kvc_policy_plan(a, sa, "streamingllm:keep=0.5,sinks=1", nullptr, nullptr, &plan) ==
          KVC_OK);
  CHECK(kvc_plan_apply(b, plan) == KVC_FAILED_PRECONDITION);
  CHECK(std::string(kvc_last_error()).find("made for cache handle") != std::string::npos);
  int32_t len = 0;
  REQUIRE(kvc_stream_length(b, sb, 0, 0, &len) == KVC_OK);
  CHECK(len == 8);  // b untouched
  // The plan outlives its cache as plain data; applying it then fails cleanly.
  REQUIRE(kvc_cache_destroy(a) == KVC_OK);
  int32_t streams = 0;
  CHECK(kvc_plan_num_streams(plan, &streams) == KVC_OK);
  CHECK(streams == 2);
  CHECK(kvc_plan_apply(a, plan) == KVC_INVALID_ARGUMENT);
  CHECK(kvc_plan_destroy(plan) == KVC_OK);
  CHECK(kvc_cache_destroy(b) == KVC_OK);
}
