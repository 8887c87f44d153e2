// kvcache/testing/forwarding_backend.h — a Backend that forwards every call to another one.
//
// Tests and benchmarks often need "the cpu backend, except ...": a kernel reported unsupported,
// a kernel that counts its calls or does nothing. ForwardingBackend forwards every method
// (memory, row operations, kernels, Supports) to the wrapped backend, so such a variant
// overrides only what differs instead of restating the whole interface.
//
// Example (the cpu backend without sparse reads):
//   class DenseOnly final : public kvcache::testing::ForwardingBackend {
//    public:
//     DenseOnly() : ForwardingBackend(*kvcache::CreateBackend("cpu")) {}
//     std::string_view Name() const override { return "dense-only"; }
//     bool Supports(kvcache::BackendOp op) const override {
//       return op == kvcache::BackendOp::kDecodeAttention;
//     }
//   };
#ifndef KVCACHE_TESTING_FORWARDING_BACKEND_H_
#define KVCACHE_TESTING_FORWARDING_BACKEND_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvcache/backend.h"

namespace kvcache::testing {

class ForwardingBackend : public Backend {
 public:
  explicit ForwardingBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {}

  std::string_view Name() const override { return inner_->Name(); }
  bool HostAccessible() const override { return inner_->HostAccessible(); }
  bool Supports(BackendOp op) const override { return inner_->Supports(op); }
  absl::StatusOr<void*> AllocateArena(int64_t bytes) override {
    return inner_->AllocateArena(bytes);
  }
  void FreeArena(void* arena) override { inner_->FreeArena(arena); }
  absl::Status CopyPages(const PoolView& pool, std::span<const PageCopy> copies) override {
    return inner_->CopyPages(pool, copies);
  }
  absl::Status WriteRows(const PoolView& pool, std::span<const RowWrite> writes) override {
    return inner_->WriteRows(pool, writes);
  }
  absl::Status GatherRows(const PoolView& pool, std::span<const RowGather> gathers) override {
    return inner_->GatherRows(pool, gathers);
  }
  absl::Status ReadRows(const PoolView& pool, const SegmentView& segment, int32_t head_dim,
                        int32_t first_row, int32_t count, float* keys, float* values) override {
    return inner_->ReadRows(pool, segment, head_dim, first_row, count, keys, values);
  }
  absl::Status DecodeAttention(const PagedKVView& kv, const DecodeParams& params, const float* q,
                               float* out, float* lse) override {
    return inner_->DecodeAttention(kv, params, q, out, lse);
  }
  absl::Status DeviceDecodeAttention(const PagedKVView& kv, const DecodeParams& params,
                                     const DecodeIO& io) override {
    return inner_->DeviceDecodeAttention(kv, params, io);
  }
  absl::Status EnqueueAppend(const PoolView& pool, std::span<const PageCopy> copies,
                             std::span<const RowWrite> writes, void* stream) override {
    return inner_->EnqueueAppend(pool, copies, writes, stream);
  }
  absl::Status Synchronize(void* stream) override { return inner_->Synchronize(stream); }
  absl::StatusOr<std::unique_ptr<StepBuffers>> CreateStepBuffers(const StepShape& shape) override {
    return inner_->CreateStepBuffers(shape);
  }
  absl::Status UploadStep(StepBuffers& buffers, std::span<const StepLayer> layers,
                          void* stream) override {
    return inner_->UploadStep(buffers, layers, stream);
  }
  absl::Status StepWriteRows(StepBuffers& buffers, int32_t layer, const void* keys,
                             const void* values, DType dtype, void* stream) override {
    return inner_->StepWriteRows(buffers, layer, keys, values, dtype, stream);
  }
  absl::Status StepDecode(StepBuffers& buffers, int32_t layer, const DecodeParams& params,
                          const DecodeIO& io) override {
    return inner_->StepDecode(buffers, layer, params, io);
  }
  absl::Status SparseDecodeAttention(const PagedKVView& kv, const DecodeParams& params,
                                     const float* q, float* out, float* lse) override {
    return inner_->SparseDecodeAttention(kv, params, q, out, lse);
  }
  absl::StatusOr<std::unique_ptr<KeyIndex>> CreateKeyIndex(
      const KeyIndexParams& params) override {
    return inner_->CreateKeyIndex(params);
  }
  absl::Status ScoreRows(const PagedKVView& kv, const ScoreRowsParams& params,
                         const float* queries, const int32_t* query_positions,
                         float* token_scores, int64_t* below_threshold,
                         int64_t* causal_entries) override {
    return inner_->ScoreRows(kv, params, queries, query_positions, token_scores,
                             below_threshold, causal_entries);
  }

 protected:
  Backend& inner() const { return *inner_; }

 private:
  std::unique_ptr<Backend> inner_;
};

}  // namespace kvcache::testing

#endif  // KVCACHE_TESTING_FORWARDING_BACKEND_H_
