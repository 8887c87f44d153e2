// Tests for kvcache/page_pool.h: allocation, reference counts, exhaustion, validation.
#include <catch2/catch.hpp>

#include <algorithm>
#include <set>
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
