// PagePool: a stack of free page ids and a reference count per page, behind one lock.
#include "kvcache/page_pool.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace kvcache {

absl::StatusOr<std::unique_ptr<PagePool>> PagePool::Create(Backend* backend, int64_t page_bytes,
                                                           int32_t num_pages, DType dtype) {
  if (backend == nullptr) return absl::InvalidArgumentError("PagePool::Create: backend is null");
  if (page_bytes <= 0 || page_bytes % 64 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_bytes must be a positive multiple of 64, got ", page_bytes));
  }
  if (num_pages <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_pages must be > 0, got ", num_pages));
  }
  absl::StatusOr<void*> arena = backend->AllocateArena(page_bytes * num_pages);
  if (!arena.ok()) return arena.status();
  return std::unique_ptr<PagePool>(
      new PagePool(backend, static_cast<uint8_t*>(*arena), page_bytes, num_pages, dtype));
}

PagePool::PagePool(Backend* backend, uint8_t* base, int64_t page_bytes, int32_t num_pages,
                   DType dtype)
    : backend_(backend), base_(base), page_bytes_(page_bytes), num_pages_(num_pages), dtype_(dtype) {
  free_list_.resize(num_pages);
  // Lowest ids on top of the stack so fresh pools hand out 0, 1, 2, ... (readable in tests).
  for (int32_t i = 0; i < num_pages; ++i) free_list_[i] = num_pages - 1 - i;
  ref_counts_.assign(num_pages, 0);
}

PagePool::~PagePool() { backend_->FreeArena(base_); }

absl::Status PagePool::Allocate(int32_t count, int32_t* out) {
  if (count < 0) return absl::InvalidArgumentError(absl::StrCat("cannot allocate ", count, " pages"));
  if (count == 0) return absl::OkStatus();
  PoolLockGuard lock(&mu_);
  if (fail_countdown_ > 0 && --fail_countdown_ == 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("page pool: injected allocation failure (request of ", count, " pages)"));
  }
  const int64_t available = static_cast<int64_t>(free_list_.size());
  if (count > available) {
    return absl::ResourceExhaustedError(absl::StrCat("page pool exhausted: requested ", count,
                                                     " pages, ", available, " free of ", num_pages_));
  }
  for (int32_t i = 0; i < count; ++i) {
    const int32_t page = free_list_.back();
    free_list_.pop_back();
    KVC_DCHECK(ref_counts_[page] == 0);
    ref_counts_[page] = 1;
    out[i] = page;
  }
  return absl::OkStatus();
}

void PagePool::AddRef(std::span<const int32_t> pages) {
  PoolLockGuard lock(&mu_);
  for (int32_t page : pages) {
    KVC_DCHECK(page >= 0 && page < num_pages_ && ref_counts_[page] > 0);
    ++ref_counts_[page];
  }
}

void PagePool::Release(std::span<const int32_t> pages) {
  PoolLockGuard lock(&mu_);
  for (int32_t page : pages) {
    KVC_DCHECK(page >= 0 && page < num_pages_ && ref_counts_[page] > 0);
    if (--ref_counts_[page] == 0) free_list_.push_back(page);
  }
}

int32_t PagePool::RefCount(int32_t page) const {
  PoolLockGuard lock(&mu_);
  if (page < 0 || page >= num_pages_) return -1;
  return ref_counts_[page];
}

int32_t PagePool::NumFree() const {
  PoolLockGuard lock(&mu_);
  return static_cast<int32_t>(free_list_.size());
}

void PagePool::FailAllocationAfter(int64_t n) {
  PoolLockGuard lock(&mu_);
  fail_countdown_ = n < 0 ? 0 : n;
}

absl::Status PagePool::Validate(std::span<const int32_t> expected_refs) const {
  PoolLockGuard lock(&mu_);
  std::vector<uint8_t> on_free_list(num_pages_, 0);
  for (int32_t page : free_list_) {
    if (page < 0 || page >= num_pages_) {
      return absl::InternalError(absl::StrCat("free list holds invalid page id ", page));
    }
    if (on_free_list[page]) {
      return absl::InternalError(absl::StrCat("page ", page, " is on the free list twice"));
    }
    on_free_list[page] = 1;
  }
  for (int32_t page = 0; page < num_pages_; ++page) {
    const int32_t refs = ref_counts_[page];
    if (refs < 0) return absl::InternalError(absl::StrCat("page ", page, " has ref count ", refs));
    if ((refs == 0) != (on_free_list[page] != 0)) {
      return absl::InternalError(absl::StrCat("page ", page, " has ref count ", refs, " but is ",
                                              on_free_list[page] ? "" : "not ", "on the free list"));
    }
    if (!expected_refs.empty() && expected_refs[page] != refs) {
      return absl::InternalError(absl::StrCat("page ", page, " has ref count ", refs, " but ",
                                              expected_refs[page], " owners"));
    }
  }
  return absl::OkStatus();
}

}  // namespace kvcache
