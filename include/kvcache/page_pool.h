// kvcache/page_pool.h — fixed-size pages from one arena, O(1) allocate/free, reference counts.
//
// Contract (stated once, mimalloc style):
// - Allocate(n, out): all-or-nothing. On success out[0..n) hold n distinct pages, each with
//   reference count 1. On failure (ResourceExhausted, naming the request and what is free) the
//   pool is unchanged. O(n).
// - AddRef(pages): every page must be allocated (ref >= 1); each gains one reference.
// - Release(pages): each page loses one reference; a page whose count reaches 0 returns to the
//   free list. Releasing a free page is a programming error caught by KVC_DCHECK and Validate().
// - Thread safety: every method may be called concurrently from any thread (a page's bytes are not
//   protected — the owner of a reference coordinates its writes). Free pages live in a shared
//   stack plus small per-thread caches in front of it, so threads allocating and releasing at once
//   do not serialise on one lock; a request the calling thread's cache and the shared stack cannot
//   serve takes every cache back first, so it fails only when the pool as a whole is short.
//   Single-threaded, pages come back in the order one LIFO stack would give (a fresh pool hands
//   out 0, 1, 2, ...).
//
// Example:
//   auto pool = kvcache::PagePool::Create(backend.get(), /*page_bytes=*/8192, /*num_pages=*/64);
//   int32_t pages[4];
//   if (absl::Status s = (*pool)->Allocate(4, pages); !s.ok()) { /* pool is unchanged */ }
//   (*pool)->Release(pages);
#ifndef KVCACHE_PAGE_POOL_H_
#define KVCACHE_PAGE_POOL_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"

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
  // Exact: a consistent snapshot taken under every lock (O(kCacheSlots); not for hot loops).
  int32_t NumFree() const;
  int32_t NumUsed() const { return num_pages_ - NumFree(); }
  PoolView view() const { return PoolView{base_, page_bytes_, num_pages_, dtype_}; }
  Backend* backend() const { return backend_; }

  // Checks the free pages (shared stack and every thread cache) and reference counts against each
  // other. `expected_refs`, when not empty, must hold the number of owners the caller counted for
  // every page ([num_pages]).
  [[nodiscard]] absl::Status Validate(std::span<const int32_t> expected_refs = {}) const;

  // Fault injection for tests: the `n`-th Allocate call from now (1-based) fails with
  // ResourceExhausted as if the pool were full; 0 disables.
  void FailAllocationAfter(int64_t n);

  // Per-thread caches: a thread uses slot (its process-wide index % kCacheSlots), so threads beyond
  // kCacheSlots share slots (correct, only slower). A cache holds at most kCacheCapacity pages;
  // when full, its older half moves to the shared stack, and an empty cache refills kCacheRefill.
  static constexpr int kCacheSlots = 32;
  static constexpr int kCacheCapacity = 64;
  static constexpr int kCacheRefill = 32;

 private:
  struct alignas(64) CacheSlot {
    mutable PoolSpinLock mu;
    int32_t count ABSL_GUARDED_BY(mu) = 0;
    int32_t pages[kCacheCapacity] ABSL_GUARDED_BY(mu);  // [count] free ids, newest last
  };

  PagePool(Backend* backend, uint8_t* base, int64_t page_bytes, int32_t num_pages, DType dtype);
  CacheSlot& ThreadSlot() const;
  // Takes one injected failure if armed; true when this call must fail.
  bool InjectedFailure();
  // Moves the older half of a full cache to the shared stack (caller holds slot.mu).
  void SpillHalf(CacheSlot& slot);
  // Every slot lock in index order, then mu_ (the pool's lock order: slots by index, then mu_).
  void LockAll() const;
  void UnlockAll() const;
  absl::Status AllocateSlow(int32_t count, int32_t* out);

  Backend* backend_;
  uint8_t* base_;
  const int64_t page_bytes_;
  const int32_t num_pages_;
  const DType dtype_;

  mutable PoolSpinLock mu_;
  std::vector<int32_t> free_list_ ABSL_GUARDED_BY(mu_);  // shared stack of free ids, top last
  // [num_pages] reference counts. Atomic because two threads may hold different slot locks while
  // they change the counts of one shared page; Validate holds every lock, so it sees no change.
  std::unique_ptr<std::atomic<int32_t>[]> ref_counts_;
  std::unique_ptr<CacheSlot[]> slots_;  // [kCacheSlots]
  std::atomic<bool> fail_armed_{false};  // read on every Allocate: a shared, unwritten line
  int64_t fail_countdown_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace kvcache

#endif  // KVCACHE_PAGE_POOL_H_
