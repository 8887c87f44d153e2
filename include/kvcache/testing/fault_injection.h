// kvcache/testing/fault_injection.h — a Backend decorator that makes chosen backend calls fail.
//
// Robustness tests (and engines testing their own error handling) need the backend to fail on
// demand: FaultInjectingBackend wraps any Backend, forwards every call, and makes the n-th call
// (counted from arming) of the chosen kinds return an injected absl::Status. Together with
// PagePool::FailAllocationAfter it lets a test sweep every failure point of an operation and
// check the Cache contract: the failing call returns the error and the cache is unchanged.
//
// Two failure modes:
//   kBeforeCall  the wrapped backend is not called (a launch that fails up front);
//   kAfterCall   the wrapped backend runs, then the error is reported (an asynchronous device
//                error surfacing at synchronisation: the kernel's writes already happened).
// Thread safety: every method may be called concurrently; exactly one call fails per arming.
//
// Example:
//   auto inner = *kvcache::CreateBackend("cpu");
//   auto faulty = std::make_unique<kvcache::testing::FaultInjectingBackend>(std::move(inner));
//   kvcache::testing::FaultInjectingBackend* hook = faulty.get();
//   auto cache = *kvcache::Cache::Create(config, std::move(faulty));
//   hook->FailCallAfter(1, kvcache::testing::CallMask(kvcache::testing::BackendCall::kWriteRows));
//   absl::Status s = cache->Append(seq, 0, request);   // s is the injected error; cache unchanged
#ifndef KVCACHE_TESTING_FAULT_INJECTION_H_
#define KVCACHE_TESTING_FAULT_INJECTION_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvcache/backend.h"

namespace kvcache::testing {

enum class BackendCall : uint8_t {
  kAllocateArena = 0,
  kCopyPages = 1,
  kWriteRows = 2,
  kGatherRows = 3,
  kReadRows = 4,
  kDecodeAttention = 5,
  kScoreRows = 6,
  kSparseDecodeAttention = 7,
  kCreateKeyIndex = 8,
};
inline constexpr int kNumBackendCalls = 9;
// "AllocateArena", "CopyPages", ...
const char* BackendCallName(BackendCall call);

// A set of call kinds as a bit mask.
using CallMask = uint32_t;
constexpr CallMask MaskOf(BackendCall call) { return CallMask{1} << static_cast<int>(call); }
inline constexpr CallMask kAllBackendCalls = (CallMask{1} << kNumBackendCalls) - 1;

enum class FailureMode : uint8_t { kBeforeCall = 0, kAfterCall = 1 };

class FaultInjectingBackend final : public Backend {
 public:
  explicit FaultInjectingBackend(std::unique_ptr<Backend> inner);
  ~FaultInjectingBackend() override;

  // Arms the hook: the n-th call (1-based, from now) whose kind is in `kinds` returns `error`
  // (which must not be OK); later calls succeed again. n = 0 disarms.
  void FailCallAfter(int64_t n, CallMask kinds = kAllBackendCalls,
                     FailureMode mode = FailureMode::kBeforeCall,
                     absl::Status error = absl::UnavailableError("injected backend failure"));
  void Disarm() { FailCallAfter(0); }
  // Calls of `kind` forwarded or failed since construction (or the last ResetCounts()).
  int64_t Calls(BackendCall kind) const;
  int64_t CallsIn(CallMask kinds) const;
  // Failures injected since construction (or the last ResetCounts()).
  int64_t Injected() const { return injected_.load(std::memory_order_relaxed); }
  void ResetCounts();
  Backend& inner() const { return *inner_; }

  std::string_view Name() const override;
  bool HostAccessible() const override;
  // The wrapped backend's answer (a capability query is not a call that can fail).
  bool Supports(BackendOp op) const override;
  [[nodiscard]] absl::StatusOr<void*> AllocateArena(int64_t bytes) override;
  void FreeArena(void* arena) override;
  [[nodiscard]] absl::Status CopyPages(const PoolView& pool,
                                       std::span<const PageCopy> copies) override;
  [[nodiscard]] absl::Status WriteRows(const PoolView& pool,
                                       std::span<const RowWrite> writes) override;
  [[nodiscard]] absl::Status GatherRows(const PoolView& pool,
                                        std::span<const RowGather> gathers) override;
  [[nodiscard]] absl::Status ReadRows(const PoolView& pool, const SegmentView& segment,
                                      int32_t head_dim, int32_t first_row, int32_t count,
                                      float* keys, float* values) override;
  [[nodiscard]] absl::Status DecodeAttention(const PagedKVView& kv, const DecodeParams& params,
                                             const float* q, float* out, float* lse) override;
  // Counted and failed as kDecodeAttention (the same kernel with device tensors).
  [[nodiscard]] absl::Status DeviceDecodeAttention(const PagedKVView& kv,
                                                   const DecodeParams& params,
                                                   const DecodeIO& io) override;
  // Counted and failed as kWriteRows (Append's write, on a caller's stream).
  [[nodiscard]] absl::Status EnqueueAppend(const PoolView& pool, std::span<const PageCopy> copies,
                                           std::span<const RowWrite> writes,
                                           void* stream) override;
  [[nodiscard]] absl::Status Synchronize(void* stream) override;
  [[nodiscard]] absl::Status ScoreRows(const PagedKVView& kv, const ScoreRowsParams& params,
                                       const float* queries, const int32_t* query_positions,
                                       float* token_scores, int64_t* below_threshold,
                                       int64_t* causal_entries) override;
  [[nodiscard]] absl::Status SparseDecodeAttention(const PagedKVView& kv,
                                                   const DecodeParams& params, const float* q,
                                                   float* out, float* lse) override;
  [[nodiscard]] absl::StatusOr<std::unique_ptr<KeyIndex>> CreateKeyIndex(
      const KeyIndexParams& params) override;

 private:
  // Counts the call; returns true when this call is the one to fail.
  bool ShouldFail(BackendCall kind);
  // Runs `forward` unless this call fails before it; returns the injected error or its result.
  template <typename Forward>
  absl::Status Intercept(BackendCall kind, Forward&& forward);

  std::unique_ptr<Backend> inner_;
  std::array<std::atomic<int64_t>, kNumBackendCalls> calls_{};
  std::atomic<int64_t> countdown_{0};
  std::atomic<CallMask> armed_kinds_{0};
  std::atomic<FailureMode> mode_{FailureMode::kBeforeCall};
  std::atomic<int64_t> injected_{0};
  mutable std::mutex error_mu_;  // guards error_ (std::mutex: visible to ThreadSanitizer)
  absl::Status error_;
};

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTING_FAULT_INJECTION_H_
