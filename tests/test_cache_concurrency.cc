// Concurrency test (the thread-safety contract of cache.h): several threads append to, fork,
// compact and free their own sequences while others allocate and release pool pages directly.
// Run under ThreadSanitizer in the reliability build; here it checks the end state.
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdio>
#include <random>
#include <thread>

#include "kvcache/cache.h"
#include "test_util.h"

using namespace kvcache;

namespace {

// Worker threads each own a sequence (append, fork + compact + free a child); `hammer_pool` adds
// a thread that allocates and releases pool pages directly; otherwise a thread runs Validate()
// continuously (pages taken straight from the pool have no owning segment, so Validate would
// rightly flag them while the hammer holds them).
void RunConcurrently(bool hammer_pool) {
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 16;
  c.dtype = DType::kF16;
  c.page_tokens = 4;
  c.num_pages = 4096;
  auto cache = *Cache::Create(c, "cpu");
  const int kThreads = 4, kIterations = 300;
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      SequenceId s = *cache->AddSequence();
      int32_t next_pos[2] = {0, 0};
      int expected_len[2] = {0, 0};
      for (int i = 0; i < kIterations; ++i) {
        const int layer = i % 2;
        const int n = 1 + static_cast<int>(rng() % 5);
        auto k = kvcache::testing::RandomVector(rng, size_t(n) * 2 * 16);
        auto v = kvcache::testing::RandomVector(rng, k.size());
        std::vector<int32_t> pos(n);
        for (auto& p : pos) p = next_pos[layer]++;
        if (!cache->Append(s, layer, {TensorRef::Of(k), TensorRef::Of(v), pos}).ok()) ++failures;
        expected_len[layer] += n;
        if (i % 50 == 49) {  // fork, compact the child to its last 3 tokens, free it
          SequenceId child = *cache->Fork(s);
          EvictionPlan plan{.sequence = child};
          const int len = expected_len[layer];
          plan.streams.push_back({.layer = layer, .kv_head = 0, .kept = {len - 3, len - 2, len - 1}});
          if (!cache->Apply(plan).ok()) ++failures;
          if (*cache->StreamLength(child, layer, 0) != 3) ++failures;
          if (!cache->Free(child).ok()) ++failures;
        }
      }
      for (int l = 0; l < 2; ++l) {
        auto contents = cache->ReadStream(s, l, 1);
        if (!contents.ok() || contents->length != expected_len[l]) ++failures;
        for (int j = 0; contents.ok() && j < contents->length; ++j) {
          if (contents->positions[j] != j) ++failures;
        }
      }
    });
  }
  std::atomic<bool> workers_done{false};
  std::thread extra([&] {
    std::vector<int32_t> pages(8);
    int validations = 0;
    while (!workers_done.load() || validations == 0) {
      if (hammer_pool) {
        if (cache->pool().Allocate(8, pages.data()).ok()) cache->pool().Release(pages);
      } else {
        if (absl::Status s = cache->Validate(); !s.ok()) {
          std::fprintf(stderr, "concurrent Validate: %s\n", s.ToString().c_str());
          ++failures;
        }
      }
      ++validations;
    }
  });
  for (auto& th : threads) th.join();
  workers_done = true;
  extra.join();
  REQUIRE(failures.load() == 0);
  REQUIRE(cache->Validate().ok());
  REQUIRE(cache->Sequences().size() == kThreads);
  for (SequenceId s : cache->Sequences()) REQUIRE(cache->Free(s).ok());
  REQUIRE(cache->pool().NumFree() == c.num_pages);
}

}  // namespace

TEST_CASE("threads on different sequences and a thread on the pool do not interfere",
          "[cache][concurrency]") {
  RunConcurrently(/*hammer_pool=*/true);
}

TEST_CASE("Validate may run while other threads mutate their sequences", "[cache][concurrency]") {
  RunConcurrently(/*hammer_pool=*/false);
}
