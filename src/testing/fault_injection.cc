// FaultInjectingBackend: forwards to the wrapped backend; one armed call per arming fails.
#include "kvcache/testing/fault_injection.h"

#include <utility>

namespace kvcache::testing {

const char* BackendCallName(BackendCall call) {
  switch (call) {
    case BackendCall::kAllocateArena: return "AllocateArena";
    case BackendCall::kCopyPages: return "CopyPages";
    case BackendCall::kWriteRows: return "WriteRows";
    case BackendCall::kGatherRows: return "GatherRows";
    case BackendCall::kReadRows: return "ReadRows";
    case BackendCall::kDecodeAttention: return "DecodeAttention";
    case BackendCall::kScoreRows: return "ScoreRows";
    case BackendCall::kSparseDecodeAttention: return "SparseDecodeAttention";
    case BackendCall::kCreateKeyIndex: return "CreateKeyIndex";
  }
  return "unknown";
}

FaultInjectingBackend::FaultInjectingBackend(std::unique_ptr<Backend> inner)
    : inner_(std::move(inner)) {}

FaultInjectingBackend::~FaultInjectingBackend() = default;

void FaultInjectingBackend::FailCallAfter(int64_t n, CallMask kinds, FailureMode mode,
                                          absl::Status error) {
  // Disarm first so no call sees a half-updated arming.
  armed_kinds_.store(0, std::memory_order_release);
  countdown_.store(0, std::memory_order_release);
  if (n <= 0 || kinds == 0) return;
  {
    std::lock_guard<std::mutex> lock(error_mu_);
    error_ = error.ok() ? absl::UnavailableError("injected backend failure") : std::move(error);
  }
  mode_.store(mode, std::memory_order_release);
  countdown_.store(n, std::memory_order_release);
  armed_kinds_.store(kinds, std::memory_order_release);
}

int64_t FaultInjectingBackend::Calls(BackendCall kind) const {
  return calls_[static_cast<int>(kind)].load(std::memory_order_relaxed);
}

int64_t FaultInjectingBackend::CallsIn(CallMask kinds) const {
  int64_t n = 0;
  for (int k = 0; k < kNumBackendCalls; ++k) {
    if (kinds & (CallMask{1} << k)) n += calls_[k].load(std::memory_order_relaxed);
  }
  return n;
}

void FaultInjectingBackend::ResetCounts() {
  for (auto& c : calls_) c.store(0, std::memory_order_relaxed);
  injected_.store(0, std::memory_order_relaxed);
}

bool FaultInjectingBackend::ShouldFail(BackendCall kind) {
  calls_[static_cast<int>(kind)].fetch_add(1, std::memory_order_relaxed);
  if ((armed_kinds_.load(std::memory_order_acquire) & MaskOf(kind)) == 0) return false;
  // Exactly one caller sees the countdown go from 1 to 0, however many race here.
  if (countdown_.fetch_sub(1, std::memory_order_acq_rel) != 1) return false;
  injected_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

template <typename Forward>
absl::Status FaultInjectingBackend::Intercept(BackendCall kind, Forward&& forward) {
  if (!ShouldFail(kind)) return forward();
  if (mode_.load(std::memory_order_acquire) == FailureMode::kAfterCall) {
    // The work happens; only its completion is reported as failed. The inner status is dropped
    // on purpose: the injected error is what the caller must handle.
    (void)forward();
  }
  std::lock_guard<std::mutex> lock(error_mu_);
  return error_;
}

std::string_view FaultInjectingBackend::Name() const { return inner_->Name(); }
bool FaultInjectingBackend::HostAccessible() const { return inner_->HostAccessible(); }
bool FaultInjectingBackend::Supports(BackendOp op) const { return inner_->Supports(op); }

absl::StatusOr<void*> FaultInjectingBackend::AllocateArena(int64_t bytes) {
  if (ShouldFail(BackendCall::kAllocateArena)) {
    // kAfterCall makes no sense for an allocation (it would leak); both modes fail up front.
    std::lock_guard<std::mutex> lock(error_mu_);
    return error_;
  }
  return inner_->AllocateArena(bytes);
}

void FaultInjectingBackend::FreeArena(void* arena) { inner_->FreeArena(arena); }

absl::Status FaultInjectingBackend::CopyPages(const PoolView& pool,
                                              std::span<const PageCopy> copies) {
  return Intercept(BackendCall::kCopyPages, [&] { return inner_->CopyPages(pool, copies); });
}

absl::Status FaultInjectingBackend::WriteRows(const PoolView& pool,
                                              std::span<const RowWrite> writes) {
  return Intercept(BackendCall::kWriteRows, [&] { return inner_->WriteRows(pool, writes); });
}

absl::Status FaultInjectingBackend::GatherRows(const PoolView& pool,
                                               std::span<const RowGather> gathers) {
  return Intercept(BackendCall::kGatherRows, [&] { return inner_->GatherRows(pool, gathers); });
}

absl::Status FaultInjectingBackend::ReadRows(const PoolView& pool, const SegmentView& segment,
                                             int32_t head_dim, int32_t first_row, int32_t count,
                                             float* keys, float* values) {
  return Intercept(BackendCall::kReadRows, [&] {
    return inner_->ReadRows(pool, segment, head_dim, first_row, count, keys, values);
  });
}

absl::Status FaultInjectingBackend::DecodeAttention(const PagedKVView& kv,
                                                    const DecodeParams& params, const float* q,
                                                    float* out, float* lse) {
  return Intercept(BackendCall::kDecodeAttention,
                   [&] { return inner_->DecodeAttention(kv, params, q, out, lse); });
}

absl::Status FaultInjectingBackend::DeviceDecodeAttention(const PagedKVView& kv,
                                                          const DecodeParams& params,
                                                          const DecodeIO& io) {
  return Intercept(BackendCall::kDecodeAttention,
                   [&] { return inner_->DeviceDecodeAttention(kv, params, io); });
}

absl::Status FaultInjectingBackend::EnqueueAppend(const PoolView& pool,
                                                  std::span<const PageCopy> copies,
                                                  std::span<const RowWrite> writes, void* stream) {
  return Intercept(BackendCall::kWriteRows,
                   [&] { return inner_->EnqueueAppend(pool, copies, writes, stream); });
}

absl::Status FaultInjectingBackend::Synchronize(void* stream) {
  return inner_->Synchronize(stream);
}

absl::Status FaultInjectingBackend::ScoreRows(const PagedKVView& kv, const ScoreRowsParams& params,
                                              const float* queries,
                                              const int32_t* query_positions, float* token_scores,
                                              int64_t* below_threshold,
                                              int64_t* causal_entries) {
  return Intercept(BackendCall::kScoreRows, [&] {
    return inner_->ScoreRows(kv, params, queries, query_positions, token_scores, below_threshold,
                             causal_entries);
  });
}

absl::Status FaultInjectingBackend::SparseDecodeAttention(const PagedKVView& kv,
                                                          const DecodeParams& params,
                                                          const float* q, float* out,
                                                          float* lse) {
  return Intercept(BackendCall::kSparseDecodeAttention,
                   [&] { return inner_->SparseDecodeAttention(kv, params, q, out, lse); });
}

absl::StatusOr<std::unique_ptr<KeyIndex>> FaultInjectingBackend::CreateKeyIndex(
    const KeyIndexParams& params) {
  // A StatusOr result: the injected error replaces the index (kAfterCall builds it, then drops
  // it, like a device allocation whose failure surfaces late).
  absl::StatusOr<std::unique_ptr<KeyIndex>> result = absl::UnknownError("not called");
  absl::Status status = Intercept(BackendCall::kCreateKeyIndex, [&] {
    result = inner_->CreateKeyIndex(params);
    return result.status();
  });
  if (!status.ok()) return status;
  return result;
}

}  // namespace kvcache::testing
