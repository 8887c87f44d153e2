// Tests for kvcache/page_pool.h: allocation, reference counts, exhaustion, validation.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "kvcache/backend.h"
#include "kvcache/page_pool.h"

using namespace kvcache;

static std::unique_ptr<Backend> Cpu() { return *CreateBackend("cpu"); }

TEST_CASE("allocate hands out distinct pages and release returns them", "[pool]") {
  auto backend = Cpu();
  auto pool = *PagePool::Create(backend.get(), 256, 8);
  REQUIRE(pool->NumFree() == 8);
  std::vector<int32_t> pages(5);
  REQUIRE(pool->Allocate(5, pages.data()).ok());
  REQUIRE(std::set<int32_t>(pages.begin(), pages.end()).size() == 5);
  for (int32_t p : pages) {
    REQUIRE(p >= 0);
    REQUIRE(p < 8);
    REQUIRE(pool->RefCount(p) == 1);
  }
  REQUIRE(pool->NumFree() == 3);
  REQUIRE(pool->NumUsed() == 5);
  pool->Release(pages);
  REQUIRE(pool->NumFree() == 8);
  REQUIRE(pool->Validate().ok());
  // Pages are writable across their whole size.
  REQUIRE(pool->Allocate(1, pages.data()).ok());
  std::fill_n(pool->view().base + pages[0] * 256, 256, uint8_t{0xAB});
  REQUIRE(pool->view().base[pages[0] * 256 + 255] == 0xAB);
}

TEST_CASE("exhaustion is an error that leaves the pool unchanged", "[pool]") {
  auto backend = Cpu();
  auto pool = *PagePool::Create(backend.get(), 256, 4);
  std::vector<int32_t> pages(4, -7);
  REQUIRE(pool->Allocate(3, pages.data()).ok());
  std::vector<int32_t> more(2, -7);
  absl::Status s = pool->Allocate(2, more.data());
  REQUIRE(s.code() == absl::StatusCode::kResourceExhausted);
  REQUIRE(std::string(s.message()).find("requested 2 pages, 1 free of 4") != std::string::npos);
  REQUIRE(more == std::vector<int32_t>{-7, -7});
  REQUIRE(pool->NumFree() == 1);
  REQUIRE(pool->Validate().ok());
  REQUIRE(pool->Allocate(-1, more.data()).code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(pool->Allocate(0, more.data()).ok());
}

TEST_CASE("reference counts: a shared page is freed by its last owner", "[pool]") {
  auto backend = Cpu();
  auto pool = *PagePool::Create(backend.get(), 256, 4);
  int32_t page;
  REQUIRE(pool->Allocate(1, &page).ok());
  pool->AddRef({&page, 1});
  pool->AddRef({&page, 1});
  REQUIRE(pool->RefCount(page) == 3);
  std::vector<int32_t> expected(4, 0);
  expected[page] = 3;
  REQUIRE(pool->Validate(expected).ok());
  expected[page] = 2;
  REQUIRE(pool->Validate(expected).code() == absl::StatusCode::kInternal);
  pool->Release({&page, 1});
  pool->Release({&page, 1});
  REQUIRE(pool->NumFree() == 3);
  pool->Release({&page, 1});
  REQUIRE(pool->NumFree() == 4);
  REQUIRE(pool->RefCount(page) == 0);
  REQUIRE(pool->RefCount(99) == -1);
}

TEST_CASE("injected allocation failure fires exactly once on the chosen call", "[pool]") {
  auto backend = Cpu();
  auto pool = *PagePool::Create(backend.get(), 256, 8);
  pool->FailAllocationAfter(2);
  int32_t pages[2];
  REQUIRE(pool->Allocate(1, pages).ok());
  REQUIRE(pool->Allocate(1, pages + 1).code() == absl::StatusCode::kResourceExhausted);
  REQUIRE(pool->NumFree() == 7);
  REQUIRE(pool->Allocate(1, pages + 1).ok());
  REQUIRE(pool->Validate().ok());
}

TEST_CASE("single-threaded order is one LIFO stack, beyond the per-thread cache", "[pool]") {
  auto backend = Cpu();
  const int32_t n = 3 * PagePool::kCacheCapacity + 5;
  auto pool = *PagePool::Create(backend.get(), 64, n + 10);
  std::vector<int32_t> pages(n);
  REQUIRE(pool->Allocate(n, pages.data()).ok());
  for (int32_t i = 0; i < n; ++i) REQUIRE(pages[i] == i);  // a fresh pool hands out 0, 1, 2, ...
  pool->Release(pages);  // released 0 .. n-1: the newest free page is n - 1
  std::vector<int32_t> again(n);
  for (int32_t i = 0; i < n; ++i) REQUIRE(pool->Allocate(1, &again[i]).ok());
  for (int32_t i = 0; i < n; ++i) REQUIRE(again[i] == n - 1 - i);
  int32_t next;
  REQUIRE(pool->Allocate(1, &next).ok());
  REQUIRE(next == n);  // then the never-used pages, lowest first
  REQUIRE(pool->Validate().ok());
}

TEST_CASE("pages cached by another thread still serve a request for the whole pool", "[pool]") {
  auto backend = Cpu();
  constexpr int32_t kPages = 40;  // fewer than one cache holds
  auto pool = *PagePool::Create(backend.get(), 64, kPages);
  std::thread other([&] {
    std::vector<int32_t> pages(kPages);
    REQUIRE(pool->Allocate(kPages, pages.data()).ok());
    pool->Release(pages);  // all 40 now sit in this thread's cache
  });
  other.join();
  REQUIRE(pool->NumFree() == kPages);
  REQUIRE(pool->Validate().ok());
  std::vector<int32_t> all(kPages, -1);
  REQUIRE(pool->Allocate(kPages, all.data()).ok());
  REQUIRE(std::set<int32_t>(all.begin(), all.end()).size() == kPages);
  int32_t extra = -7;
  const absl::Status s = pool->Allocate(1, &extra);
  REQUIRE(s.code() == absl::StatusCode::kResourceExhausted);
  REQUIRE(std::string(s.message()).find("requested 1 pages, 0 free of 40") != std::string::npos);
  REQUIRE(extra == -7);
  pool->Release(all);
  REQUIRE(pool->Validate().ok());
}

// Stress for ThreadSanitizer (scripts/tsan.sh) and for the pool's bookkeeping: threads allocate,
// share, write and release pages of one small pool (so caches spill, refill and the whole-pool
// path runs), while another thread validates. Every page a thread owns carries its stamp; a page
// handed to two owners at once shows up as a foreign stamp.
TEST_CASE("concurrent allocate, share and release keep every contract", "[pool][concurrency]") {
  auto backend = Cpu();
  constexpr int32_t kPages = 192;
  constexpr int kThreads = 4;
  constexpr int kRounds = 3000;
  auto pool = *PagePool::Create(backend.get(), 64, kPages);
  uint8_t* base = pool->view().base;
  std::atomic<int> failures{0}, done{0};
  std::atomic<int64_t> exhausted{0};
  auto worker = [&](int id) {
    std::mt19937 rng(static_cast<uint32_t>(id) + 1);
    std::vector<int32_t> held;  // one entry per reference this thread owns
    std::vector<int32_t> batch(24);
    for (int round = 0; round < kRounds; ++round) {
      const int32_t want = 1 + static_cast<int32_t>(rng() % 24);
      const absl::Status s = pool->Allocate(want, batch.data());
      if (s.ok()) {
        for (int32_t i = 0; i < want; ++i) {
          const int32_t p = batch[i];
          if (p < 0 || p >= kPages || pool->RefCount(p) != 1) failures.fetch_add(1);
          std::memset(base + int64_t{p} * 64, id + 1, 64);  // this thread's stamp
          held.push_back(p);
        }
      } else if (s.code() == absl::StatusCode::kResourceExhausted) {
        exhausted.fetch_add(1);
      } else {
        failures.fetch_add(1);
      }
      // Share a page with itself (a fork), and release about as much as was taken.
      if (!held.empty() && rng() % 4 == 0) {
        const int32_t p = held[rng() % held.size()];
        pool->AddRef({&p, 1});
        held.push_back(p);
      }
      std::shuffle(held.begin(), held.end(), rng);
      const size_t keep = held.size() > 48 ? held.size() / 2 : held.size() / 4 * 3;
      for (size_t i = keep; i < held.size(); ++i) {
        const int32_t p = held[i];
        if (base[int64_t{p} * 64] != id + 1 || base[int64_t{p} * 64 + 63] != id + 1) {
          failures.fetch_add(1);
        }
      }
      pool->Release({held.data() + keep, held.size() - keep});
      held.resize(keep);
    }
    pool->Release(held);
    done.fetch_add(1);
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  int validations = 0;
  while (done.load() < kThreads) {
    if (!pool->Validate().ok()) failures.fetch_add(1);
    const int32_t free = pool->NumFree();
    if (free < 0 || free > kPages) failures.fetch_add(1);
    ++validations;
    std::this_thread::yield();
  }
  for (std::thread& t : threads) t.join();
  CHECK(failures.load() == 0);
  CHECK(validations > 0);
  REQUIRE(pool->NumFree() == kPages);
  REQUIRE(pool->Validate(std::vector<int32_t>(kPages, 0)).ok());
  INFO("exhausted requests: " << exhausted.load());
}

TEST_CASE("bad pool parameters are rejected", "[pool]") {
  auto backend = Cpu();
  REQUIRE(PagePool::Create(backend.get(), 0, 8).status().code() ==
          absl::StatusCode::kInvalidArgument);
  REQUIRE(PagePool::Create(backend.get(), 100, 8).status().code() ==
          absl::StatusCode::kInvalidArgument);
  REQUIRE(PagePool::Create(backend.get(), 256, 0).status().code() ==
          absl::StatusCode::kInvalidArgument);
  REQUIRE(PagePool::Create(nullptr, 256, 8).status().code() ==
          absl::StatusCode::kInvalidArgument);
}

TEST_CASE("the backend registry creates known backends and names unknown ones", "[backend]") {
  auto names = RegisteredBackends();
  REQUIRE(std::find(names.begin(), names.end(), "cpu") != names.end());
  REQUIRE(std::find(names.begin(), names.end(), "cpu-reference") != names.end());
  auto b = CreateBackend("cpu-reference");
  REQUIRE(b.ok());
  REQUIRE((*b)->Name() == "cpu-reference");
  REQUIRE((*b)->HostAccessible());
  auto missing = CreateBackend("tpu");
  REQUIRE(missing.status().code() == absl::StatusCode::kNotFound);
  REQUIRE(std::string(missing.status().message()).find("'tpu'") != std::string::npos);
  REQUIRE(RegisterBackend("cpu", [] { return CreateBackend("cpu-reference"); }).code() ==
          absl::StatusCode::kAlreadyExists);
  REQUIRE(RegisterBackend("cpu-alias", [] { return CreateBackend("cpu"); }).ok());
  REQUIRE(CreateBackend("cpu-alias").ok());
}
