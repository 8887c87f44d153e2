// kvcache/page_pool.h — fixed-size pages from one arena, O(1) allocate/free, reference counts.
//
// Contract (stated once, mimalloc style):
// - Allocate(n, out): all-or-nothing. On success out[0..n) hold n distinct pages, each with
//   reference count 1. On failure (ResourceExhausted, naming the request and what is free) the
//   pool is unchanged. O(n).
// - AddRef(pages): every page must be allocated (ref >= 1); each gains one reference.
// - Release(pages): each page loses one reference; a page whose count reaches 0 returns to the
//   free list. Releasing a free page is a programming error caught by KVC_DCHECK and Validate().
// - Thread safety: every method may be called concurrently from any thread (one internal spin lock;
//   a page's bytes are not protected — the owner of a reference coordinates its writes).
//
// Example:
//   auto pool = kvcache::PagePool::Create(backend.get(), /*page_bytes=*/8192, /*num_pages=*/64);
//   int32_t pages[4];
//   if (absl::Status s = (*pool)->Allocate(4, pages); !s.ok()) { /* pool is unchanged */ }
//   (*pool)->Release(pages);
#ifndef KVCACHE_PAGE_POOL_H_
#define KVCACHE_PAGE_POOL_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include <atomic>

#include "kvcache/backend.h"
#include "kvcache/paged_view.h"

namespace kvcache {

// A test-and-test-and-set spin lock. The pool's critical sections are a few loads and stores,
// far shorter than a futex round trip, so spinning beats absl::Mutex here (bench_store).
class ABSL_LOCKABLE PoolSpinLock {
 public:
  void Lock() ABSL_EXCLUSIVE_LOCK_FUNCTION() {
    while (locked_.exchange(true, std::memory_order_acquire)) {
      while (locked_.load(std::memory_order_relaxed)) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      }
    }
  }
  void Unlock() ABSL_UNLOCK_FUNCTION() { locked_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> locked_{false};
};

class ABSL_SCOPED_LOCKABLE PoolLockGuard {
 public:
  explicit PoolLockGuard(PoolSpinLock* lock) ABSL_EXCLUSIVE_LOCK_FUNCTION(lock) : lock_(lock) {
    lock_->Lock();
  }
  ~PoolLockGuard() ABSL_UNLOCK_FUNCTION() { lock_->Unlock(); }

 private:
  PoolSpinLock* lock_;
};

class PagePool {
 public:
  // The arena comes from `backend`, which must outlive the pool.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<PagePool>> Create(Backend* backend,
                                                                        int64_t page_bytes,
                                                                        int32_t num_pages,
                                                                        DType dtype = DType::kF16);
  ~PagePool();
  PagePool(const PagePool&) = delete;
  PagePool& operator=(const PagePool&) = delete;

  [[nodiscard]] absl::Status Allocate(int32_t count, int32_t* out);
  void AddRef(std::span<const int32_t> pages);
  void Release(std::span<const int32_t> pages);

  int32_t RefCount(int32_t page) const;
  int32_t num_pages() const { return num_pages_; }
  int64_t page_bytes() const { return page_bytes_; }
  int32_t NumFree() const;
  int32_t NumUsed() const { return num_pages_ - NumFree(); }
  PoolView view() const { return PoolView{base_, page_bytes_, num_pages_, dtype_}; }
  Backend* backend() const { return backend_; }

  // Checks the free list and reference counts against each other. `expected_refs`, when not
  // empty, must hold the number of owners the caller counted for every page ([num_pages]).
  [[nodiscard]] absl::Status Validate(std::span<const int32_t> expected_refs = {}) const;

  // Fault injection for tests: the `n`-th Allocate call from now (1-based) fails with
  // ResourceExhausted as if the pool were full; 0 disables.
  void FailAllocationAfter(int64_t n);

 private:
  PagePool(Backend* backend, uint8_t* base, int64_t page_bytes, int32_t num_pages, DType dtype);

  Backend* backend_;
  uint8_t* base_;
  const int64_t page_bytes_;
  const int32_t num_pages_;
  const DType dtype_;

  mutable PoolSpinLock mu_;
  std::vector<int32_t> free_list_ ABSL_GUARDED_BY(mu_);  // stack of free page ids
  std::vector<int32_t> ref_counts_ ABSL_GUARDED_BY(mu_);  // [num_pages]
  int64_t fail_countdown_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvcache

#endif  // KVCACHE_PAGE_POOL_H_
