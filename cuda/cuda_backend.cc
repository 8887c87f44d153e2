// The CUDA backend: device arena, mirroring of the host-side view arrays into a reusable device
// buffer, the kernels of cuda/kernels.cuh, and cudaError_t -> absl::Status mapping.
//
// Every operation follows one pattern: validate on the host (the kernels trust their input),
// pack everything the kernels read into one host staging blob (page ids, key channel maps,
// positions, SegmentView structs rewritten to device addresses, query vectors, source rows),
// copy it with one cudaMemcpyAsync into `inputs_`, carve outputs and scratch out of `work_`,
// launch, copy the results back and synchronise. Both device buffers only grow, so steady-state
// decode allocates no device memory.
// Device tensors (DeviceDecodeAttention) skip the q upload and the result download (q / out /
// lse are the caller's device buffers) and the synchronisation; device K/V row writes skip
// the row packing (the write kernel reads the caller's strided rows).
// Decode views that carry stream versions keep their page tables in a third device buffer, the
// view mirror (view_mirror.h): a call stages only what changed since the mirror last saw each
// stream version and scatters it with one kernel (docs/ARCHITECTURE.md, "The view mirror").
#include "cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "cuda/kernels.cuh"
#include "cuda/view_mirror.h"
#include "kvcache/internal/attention_math.h"

// The registry name: "cuda-emulated" in the emulated build (cuda/emulation/).
#ifndef KVCACHE_CUDA_BACKEND_NAME
#define KVCACHE_CUDA_BACKEND_NAME "cuda"
#endif

namespace kvcache::KVCACHE_CUDA_NAMESPACE {
namespace {

static_assert(static_cast<int>(GqaAggregation::kMean) == static_cast<int>(Aggregation::kMean) &&
                  static_cast<int>(GqaAggregation::kSum) == static_cast<int>(Aggregation::kSum) &&
                  static_cast<int>(GqaAggregation::kMax) == static_cast<int>(Aggregation::kMax),
              "kernels.cuh Aggregation must mirror GqaAggregation");
static_assert(sizeof(GatherTerm) == sizeof(GatherTermDevice) &&
                  offsetof(GatherTerm, src_segment) == offsetof(GatherTermDevice, src_segment) &&
                  offsetof(GatherTerm, src_row) == offsetof(GatherTermDevice, src_row) &&
                  offsetof(GatherTerm, key_weight) == offsetof(GatherTermDevice, key_weight) &&
                  offsetof(GatherTerm, value_weight) == offsetof(GatherTermDevice, value_weight),
              "GatherTerm is copied to the device byte for byte");
static_assert(sizeof(unsigned long long) == sizeof(int64_t), "counts are copied byte for byte");

constexpr int64_t kAlign = 256;

int64_t AlignUp(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

absl::Status CudaError(cudaError_t e, absl::string_view what) {
  const std::string message = absl::StrCat("cuda backend: ", what, ": ", cudaGetErrorName(e), " (",
                                           cudaGetErrorString(e), ")");
  switch (e) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    case cudaErrorNotSupported:
      return absl::UnimplementedError(message);
    case cudaErrorInvalidValue:
    case cudaErrorInvalidResourceHandle:  // e.g. a destroyed or made-up stream
      return absl::InvalidArgumentError(message);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInitializationError:
    case cudaErrorDevicesUnavailable:
      return absl::UnavailableError(message);
    default:
      return absl::InternalError(message);
  }
}

// Host bytes packed for one host -> device copy. Offsets stay valid as the blob grows; pointers
// from At() do not, so callers patch pointers only after the last Append.
class StagingBlob {
 public:
  void Clear() { bytes_.clear(); }
  int64_t Reserve(int64_t n) {
    const int64_t offset = AlignUp(static_cast<int64_t>(bytes_.size()), 16);
    bytes_.resize(static_cast<size_t>(offset + n));
    return offset;
  }
  int64_t Append(const void* data, int64_t n) {
    const int64_t offset = Reserve(n);
    if (n > 0) std::memcpy(bytes_.data() + offset, data, static_cast<size_t>(n));
    return offset;
  }
  template <typename T>
  T* At(int64_t offset) {
    return reinterpret_cast<T*>(bytes_.data() + offset);
  }
  const uint8_t* data() const { return bytes_.data(); }
  int64_t size() const { return static_cast<int64_t>(bytes_.size()); }

 private:
  std::vector<uint8_t> bytes_;
};

// A device buffer that only grows (by at least 1.5x, so a slowly growing context reallocates
// O(log n) times).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (data_ != nullptr) cudaFree(data_);
  }
  absl::Status Reserve(int64_t bytes, absl::string_view what) {
    if (bytes <= capacity_) return absl::OkStatus();
    const int64_t grown = std::max<int64_t>({bytes, capacity_ + capacity_ / 2, int64_t{1} << 20});
    if (data_ != nullptr) {
      cudaFree(data_);
      data_ = nullptr;
      capacity_ = 0;
    }
    if (cudaError_t e = cudaMalloc(&data_, static_cast<size_t>(grown)); e != cudaSuccess) {
      data_ = nullptr;
      return CudaError(e, absl::StrCat(what, ": scratch of ", grown, " bytes"));
    }
    capacity_ = grown;
    return absl::OkStatus();
  }
  uint8_t* data() const { return static_cast<uint8_t*>(data_); }

 private:
  void* data_ = nullptr;
  int64_t capacity_ = 0;
};

// Offsets of device regions carved out of one buffer, each 256-byte aligned.
class Carver {
 public:
  int64_t Take(int64_t bytes) {
    const int64_t offset = AlignUp(size_, kAlign);
    size_ = offset + std::max<int64_t>(bytes, 0);
    return offset;
  }
  int64_t size() const { return size_; }

 private:
  int64_t size_ = 0;
};

// Where a segment's arrays landed in the staging blob (-1: not mirrored).
struct SegmentArrays {
  int64_t pages = -1;
  int64_t key_channels = -1;
  int64_t positions = -1;
};

// Copies the arrays of `s` a kernel reads: the ids of the pages covering `rows` rows, the key
// channel map, and the positions when `with_positions`.
SegmentArrays StageSegment(StagingBlob& blob, const SegmentView& s, int64_t rows,
                           bool with_positions) {
  SegmentArrays a;
  const int64_t pages = s.tokens_per_page > 0 ? CeilDiv(rows, s.tokens_per_page) : 0;
  if (pages > 0) a.pages = blob.Append(s.pages, pages * static_cast<int64_t>(sizeof(int32_t)));
  if (s.key_channels != nullptr) {
    a.key_channels = blob.Append(s.key_channels, int64_t{s.key_width} * sizeof(int32_t));
  }
  if (with_positions && s.length > 0) {
    a.positions = blob.Append(s.positions, int64_t{s.length} * sizeof(int32_t));
  }
  return a;
}

// The view with its pointers moved to the device copy (modalities and scores are never read by
// a kernel: scores are accumulated on the host from the per-token probabilities).
SegmentView DeviceSegment(const SegmentView& s, const SegmentArrays& a, uint8_t* device_base) {
  SegmentView v = s;
  v.pages = a.pages >= 0 ? reinterpret_cast<const int32_t*>(device_base + a.pages) : nullptr;
  v.key_channels = a.key_channels >= 0
                       ? reinterpret_cast<const int32_t*>(device_base + a.key_channels)
                       : nullptr;
  v.positions =
      a.positions >= 0 ? reinterpret_cast<const int32_t*>(device_base + a.positions) : nullptr;
  v.modalities = nullptr;
  v.scores = nullptr;
  return v;
}

absl::Status CheckSegment(const SegmentView& s, int32_t head_dim, absl::string_view what) {
  if (s.length < 0 || (s.length > 0 && (s.pages == nullptr || s.tokens_per_page <= 0))) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": segment of length ", s.length,
                                                   " with tokens_per_page ", s.tokens_per_page));
  }
  if (s.value_width != head_dim) {
    return absl::UnimplementedError(absl::StrCat(what, ": value_width ", s.value_width,
                                                 " != head_dim ", head_dim,
                                                 " is not supported by the cuda backend"));
  }
  if (s.key_channels == nullptr ? s.key_width != head_dim
                                : (s.key_width <= 0 || s.key_width > head_dim)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": key_width ", s.key_width, " does not fit head_dim ", head_dim));
  }
  return absl::OkStatus();
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, int num_sms, cudaStream_t stream, cudaEvent_t buffers_free,
              cudaEvent_t own_done)
      : device_(device),
        num_sms_(num_sms),
        stream_(stream),
        buffers_free_(buffers_free),
        own_done_(own_done),
        mirror_enabled_(ViewMirrorBytesForTesting() > 0),
        mirror_(ViewMirrorBytesForTesting()) {}
  ~CudaBackend() override {
    cudaSetDevice(device_);
    // The caller's streams may still run a device-tensor decode that reads inputs_ / work_:
    // wait for it before the buffers are freed (cudaFree would also wait, for the device).
    cudaEventSynchronize(buffers_free_);
    cudaStreamSynchronize(stream_);
    cudaEventDestroy(buffers_free_);
    cudaEventDestroy(own_done_);
    cudaStreamDestroy(stream_);
  }

  std::string_view Name() const override { return KVCACHE_CUDA_BACKEND_NAME; }
  bool HostAccessible() const override { return false; }
  bool Supports(BackendOp op) const override {
    return op == BackendOp::kDecodeAttention || op == BackendOp::kScoreRows ||
           op == BackendOp::kDeviceTensors;
  }

  absl::StatusOr<void*> AllocateArena(int64_t bytes) override {
    if (bytes <= 0) return absl::InvalidArgumentError(absl::StrCat("arena of ", bytes, " bytes"));
    absl::MutexLock lock(&mu_);
    if (cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) return CudaError(e, "set device");
    void* p = nullptr;
    // cudaMalloc returns 256-byte aligned memory, as the Backend contract requires.
    if (cudaError_t e = cudaMalloc(&p, static_cast<size_t>(bytes)); e != cudaSuccess) {
      return CudaError(e, absl::StrCat("arena of ", bytes, " bytes"));
    }
    return p;
  }

  void FreeArena(void* arena) override {
    if (arena == nullptr) return;
    absl::MutexLock lock(&mu_);
    cudaSetDevice(device_);
    cudaFree(arena);
  }

  absl::Status CopyPages(const PoolView& pool, std::span<const PageCopy> copies) override {
    for (const PageCopy& c : copies) {
      if (c.src < 0 || c.src >= pool.num_pages || c.dst < 0 || c.dst >= pool.num_pages) {
        return absl::OutOfRangeError(absl::StrCat("CopyPages: page ", c.src, " -> ", c.dst,
                                                  " outside [0, ", pool.num_pages, ")"));
      }
    }
    absl::MutexLock lock(&mu_);
    if (absl::Status s = Begin(stream_); !s.ok()) return s;
    for (const PageCopy& c : copies) {
      if (cudaError_t e = cudaMemcpyAsync(pool.base + int64_t{c.dst} * pool.page_bytes,
                                          pool.base + int64_t{c.src} * pool.page_bytes,
                                          static_cast<size_t>(pool.page_bytes),
                                          cudaMemcpyDeviceToDevice, stream_);
          e != cudaSuccess) {
        return CudaError(e, "CopyPages");
      }
    }
    return Finish("CopyPages");
  }

  absl::Status WriteRows(const PoolView& pool, std::span<const RowWrite> writes) override {
    return Write(pool, {}, writes, nullptr);
  }

  absl::Status EnqueueAppend(const PoolView& pool, std::span<const PageCopy> copies,
                             std::span<const RowWrite> writes, void* stream) override {
    if (stream == nullptr) return absl::InvalidArgumentError("EnqueueAppend: no stream");
    return Write(pool, copies, writes, static_cast<cudaStream_t>(stream));
  }

  // CopyPages then WriteRows. caller == nullptr: on the backend's stream, synchronised (what
  // WriteRows is). Else enqueued on the caller's stream without waiting (EnqueueAppend): the
  // staging blob may be refilled at once (the pageable-upload argument of DecodeLocked), the
  // device K/V are read in place in that stream's order, and buffers_free_ recorded after the
  // writes orders every later operation of the backend, on any stream, after them.
  absl::Status Write(const PoolView& pool, std::span<const PageCopy> copies,
                     std::span<const RowWrite> writes, cudaStream_t caller) {
    for (const PageCopy& c : copies) {
      if (c.src < 0 || c.src >= pool.num_pages || c.dst < 0 || c.dst >= pool.num_pages) {
        return absl::OutOfRangeError(absl::StrCat("CopyPages: page ", c.src, " -> ", c.dst,
                                                  " outside [0, ", pool.num_pages, ")"));
      }
    }
    if (writes.empty() && copies.empty()) return absl::OkStatus();
    const int32_t head_dim = writes.empty() ? 1 : writes[0].head_dim;
    int64_t total_rows = 0;
    for (const RowWrite& w : writes) {
      if (w.head_dim != head_dim || head_dim <= 0 || w.num_tokens < 0 || w.first_row < 0 ||
          (w.num_tokens > 0 && (w.keys == nullptr || w.values == nullptr ||
                                w.dst.tokens_per_page <= 0 || w.dst.pages == nullptr))) {
        return absl::InvalidArgumentError(absl::StrCat("WriteRows: bad write (head_dim ",
                                                       w.head_dim, ", first_row ", w.first_row,
                                                       ", num_tokens ", w.num_tokens, ")"));
      }
      if (w.dst.key_width > head_dim || w.dst.value_width > head_dim ||
          (w.dst.key_channels == nullptr && w.dst.key_width != head_dim)) {
        return absl::InvalidArgumentError(absl::StrCat("WriteRows: row format ", w.dst.key_width,
                                                       "/", w.dst.value_width,
                                                       " does not fit head_dim ", head_dim));
      }
      if (w.src_dtype != writes[0].src_dtype) {
        return absl::UnimplementedError("WriteRows: writes of one call must share src_dtype");
      }
      total_rows += w.num_tokens;
    }
    if (total_rows == 0 && copies.empty()) return absl::OkStatus();
    if (total_rows > INT32_MAX) return absl::InvalidArgumentError("WriteRows: too many rows");
    const DType src_dtype = writes.empty() ? DType::kF32 : writes[0].src_dtype;
    // Device sources (device K/V Append) are read in place: check they are device memory.
    int64_t host_rows = 0;
    for (size_t j = 0; j < writes.size(); ++j) {
      const RowWrite& w = writes[j];
      if (w.src_space == MemorySpace::kHost) {
        host_rows += w.num_tokens;
        continue;
      }
      if (w.num_tokens == 0) continue;
      const int64_t span_bytes =
          ((int64_t{w.num_tokens} - 1) * w.src_stride + head_dim) * DTypeSize(src_dtype);
      if (w.src_stride < head_dim) {
        return absl::InvalidArgumentError(absl::StrCat("WriteRows[", j, "]: src_stride ",
                                                       w.src_stride, " < head_dim ", head_dim));
      }
      if (absl::Status s = CheckDeviceMemory(w.keys, span_bytes, "WriteRows: keys"); !s.ok()) {
        return s;
      }
      if (absl::Status s = CheckDeviceMemory(w.values, span_bytes, "WriteRows: values"); !s.ok()) {
        return s;
      }
    }

    absl::MutexLock lock(&mu_);
    const cudaStream_t stream = caller != nullptr ? caller : stream_;
    if (absl::Status s = Begin(stream); !s.ok()) return s;
    absl::Status status =
        WriteLocked(pool, copies, writes, total_rows, host_rows, head_dim, src_dtype, stream);
    if (caller == nullptr) return status.ok() ? Finish("WriteRows") : status;
    // Whatever happened, work on `caller` may now use the pool and inputs_ (a failure can follow
    // a launch): later calls on other streams wait for it (Begin).
    absl::Status recorded = Enqueued("Append", caller);
    return status.ok() ? recorded : status;
  }

  absl::Status WriteLocked(const PoolView& pool, std::span<const PageCopy> copies,
                           std::span<const RowWrite> writes, int64_t total_rows,
                           int64_t host_rows, int32_t head_dim, DType src_dtype,
                           cudaStream_t stream) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    for (const PageCopy& c : copies) {
      if (cudaError_t e = cudaMemcpyAsync(pool.base + int64_t{c.dst} * pool.page_bytes,
                                          pool.base + int64_t{c.src} * pool.page_bytes,
                                          static_cast<size_t>(pool.page_bytes),
                                          cudaMemcpyDeviceToDevice, stream);
          e != cudaSuccess) {
        return CudaError(e, "CopyPages");
      }
    }
    if (total_rows == 0) return absl::OkStatus();
    const int64_t row_bytes = int64_t{head_dim} * DTypeSize(src_dtype);
    staging_.Clear();
    // Host source rows, packed densely: the engine's buffers are strided and live in host
    // memory. Device sources need no staging (the kernel reads them strided).
    const int64_t keys_at = staging_.Reserve(host_rows * row_bytes);
    const int64_t values_at = staging_.Reserve(host_rows * row_bytes);
    std::vector<SegmentArrays> arrays(writes.size());
    std::vector<int64_t> packed_first(writes.size(), 0);  // first packed row of a host write
    std::vector<int2> rows;
    rows.reserve(static_cast<size_t>(total_rows));
    {
      int64_t r = 0;
      for (size_t j = 0; j < writes.size(); ++j) {
        const RowWrite& w = writes[j];
        for (int32_t t = 0; t < w.num_tokens; ++t) {
          rows.push_back(int2{static_cast<int>(j), w.first_row + t});
        }
        if (w.src_space != MemorySpace::kHost) continue;
        packed_first[j] = r;
        const int64_t stride_bytes = w.src_stride * DTypeSize(src_dtype);
        for (int32_t t = 0; t < w.num_tokens; ++t, ++r) {
          std::memcpy(staging_.At<uint8_t>(keys_at) + r * row_bytes,
                      static_cast<const uint8_t*>(w.keys) + t * stride_bytes,
                      static_cast<size_t>(row_bytes));
          std::memcpy(staging_.At<uint8_t>(values_at) + r * row_bytes,
                      static_cast<const uint8_t*>(w.values) + t * stride_bytes,
                      static_cast<size_t>(row_bytes));
        }
      }
    }
    for (size_t j = 0; j < writes.size(); ++j) {
      const RowWrite& w = writes[j];
      const int64_t covered = std::max<int64_t>(w.dst.length, int64_t{w.first_row} + w.num_tokens);
      arrays[j] = StageSegment(staging_, w.dst, covered, /*with_positions=*/false);
    }
    const int64_t rows_at = staging_.Append(rows.data(), total_rows * sizeof(int2));
    const int64_t jobs_at =
        staging_.Reserve(static_cast<int64_t>(writes.size()) * sizeof(WriteJob));
    if (absl::Status s = inputs_.Reserve(staging_.size(), "WriteRows"); !s.ok()) return s;
    uint8_t* dev = inputs_.data();
    for (size_t j = 0; j < writes.size(); ++j) {
      const RowWrite& w = writes[j];
      WriteJob& job = staging_.At<WriteJob>(jobs_at)[j];
      job.dst = DeviceSegment(w.dst, arrays[j], dev);
      job.first_row = w.first_row;
      if (w.src_space == MemorySpace::kHost) {
        job.keys = dev + keys_at + packed_first[j] * row_bytes;
        job.values = dev + values_at + packed_first[j] * row_bytes;
        job.src_stride = head_dim;
      } else {
        job.keys = w.keys;
        job.values = w.values;
        job.src_stride = w.src_stride;
      }
    }
    if (absl::Status s = Upload("WriteRows", stream); !s.ok()) return s;
    WriteRowsArgs args;
    args.pool = pool;
    args.head_dim = head_dim;
    args.src_dtype = src_dtype;
    args.jobs = reinterpret_cast<const WriteJob*>(dev + jobs_at);
    args.rows = reinterpret_cast<const int2*>(dev + rows_at);
    args.num_rows = static_cast<int32_t>(total_rows);
    if (cudaError_t e = LaunchWriteRows(args, stream); e != cudaSuccess) {
      return CudaError(e, "WriteRows");
    }
    return absl::OkStatus();
  }

  absl::Status GatherRows(const PoolView& pool, std::span<const RowGather> gathers) override {
    int64_t total_rows = 0;
    for (size_t j = 0; j < gathers.size(); ++j) {
      const RowGather& g = gathers[j];
      const std::string what = absl::StrCat("GatherRows[", j, "]");
      if (absl::Status s = CheckSegment(g.dst, g.head_dim, what); !s.ok()) return s;
      if (g.term_offsets.size() != static_cast<size_t>(g.dst.length) + 1 ||
          g.term_offsets[0] != 0 ||
          static_cast<size_t>(g.term_offsets[g.dst.length]) != g.terms.size()) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": term_offsets do not match ",
                                                       g.dst.length, " rows and ", g.terms.size(),
                                                       " terms"));
      }
      for (int32_t r = 0; r < g.dst.length; ++r) {
        if (g.term_offsets[r + 1] < g.term_offsets[r]) {
          return absl::InvalidArgumentError(absl::StrCat(what, ": term_offsets decrease at ", r));
        }
      }
      for (const SegmentView& s : g.sources) {
        if (absl::Status st = CheckSegment(s, g.head_dim, what); !st.ok()) return st;
      }
      for (const GatherTerm& t : g.terms) {
        if (t.src_segment < 0 || static_cast<size_t>(t.src_segment) >= g.sources.size() ||
            t.src_row < 0 || t.src_row >= g.sources[t.src_segment].length) {
          return absl::OutOfRangeError(absl::StrCat(what, ": term (segment ", t.src_segment,
                                                    ", row ", t.src_row, ") is out of range"));
        }
      }
      total_rows += g.dst.length;
    }
    if (total_rows == 0) return absl::OkStatus();
    if (total_rows > INT32_MAX) return absl::InvalidArgumentError("GatherRows: too many rows");

    absl::MutexLock lock(&mu_);
    if (absl::Status s = Begin(stream_); !s.ok()) return s;
    staging_.Clear();
    struct Staged {
      SegmentArrays dst;
      std::vector<SegmentArrays> sources;
      int64_t sources_at = 0;
      int64_t term_offsets_at = 0;
      int64_t terms_at = 0;
    };
    std::vector<Staged> staged(gathers.size());
    std::vector<int2> rows;
    rows.reserve(static_cast<size_t>(total_rows));
    for (size_t j = 0; j < gathers.size(); ++j) {
      const RowGather& g = gathers[j];
      Staged& st = staged[j];
      st.dst = StageSegment(staging_, g.dst, g.dst.length, false);
      for (const SegmentView& s : g.sources) {
        st.sources.push_back(StageSegment(staging_, s, s.length, false));
      }
      st.sources_at =
          staging_.Reserve(static_cast<int64_t>(g.sources.size()) * sizeof(SegmentView));
      st.term_offsets_at =
          staging_.Append(g.term_offsets.data(), static_cast<int64_t>(g.term_offsets.size_bytes()));
      st.terms_at = staging_.Append(g.terms.data(), static_cast<int64_t>(g.terms.size_bytes()));
      for (int32_t r = 0; r < g.dst.length; ++r) rows.push_back(int2{static_cast<int>(j), r});
    }
    const int64_t rows_at = staging_.Append(rows.data(), total_rows * sizeof(int2));
    const int64_t jobs_at =
        staging_.Reserve(static_cast<int64_t>(gathers.size()) * sizeof(GatherJob));
    if (absl::Status s = inputs_.Reserve(staging_.size(), "GatherRows"); !s.ok()) return s;
    uint8_t* dev = inputs_.data();
    for (size_t j = 0; j < gathers.size(); ++j) {
      const RowGather& g = gathers[j];
      const Staged& st = staged[j];
      for (size_t k = 0; k < g.sources.size(); ++k) {
        staging_.At<SegmentView>(st.sources_at)[k] =
            DeviceSegment(g.sources[k], st.sources[k], dev);
      }
      GatherJob& job = staging_.At<GatherJob>(jobs_at)[j];
      job.dst = DeviceSegment(g.dst, st.dst, dev);
      job.sources = reinterpret_cast<const SegmentView*>(dev + st.sources_at);
      job.term_offsets = reinterpret_cast<const int32_t*>(dev + st.term_offsets_at);
      job.terms = reinterpret_cast<const GatherTermDevice*>(dev + st.terms_at);
    }
    if (absl::Status s = Upload("GatherRows"); !s.ok()) return s;
    GatherRowsArgs args;
    args.pool = pool;
    args.head_dim = gathers[0].head_dim;
    args.jobs = reinterpret_cast<const GatherJob*>(dev + jobs_at);
    args.rows = reinterpret_cast<const int2*>(dev + rows_at);
    args.num_rows = static_cast<int32_t>(total_rows);
    if (cudaError_t e = LaunchGatherRows(args, stream_); e != cudaSuccess) {
      return CudaError(e, "GatherRows");
    }
    return Finish("GatherRows");
  }

  absl::Status ReadRows(const PoolView& pool, const SegmentView& segment, int32_t head_dim,
                        int32_t first_row, int32_t count, float* keys, float* values) override {
    if (head_dim <= 0 || first_row < 0 || count < 0 ||
        int64_t{first_row} + count > std::max(segment.length, 0) ||
        (count > 0 && (segment.pages == nullptr || segment.tokens_per_page <= 0))) {
      return absl::OutOfRangeError(absl::StrCat("ReadRows: rows [", first_row, ", ",
                                                int64_t{first_row} + count,
                                                ") of a segment of length ", segment.length));
    }
    if (segment.key_width > head_dim || segment.value_width > head_dim) {
      return absl::InvalidArgumentError(absl::StrCat("ReadRows: row format ", segment.key_width,
                                                     "/", segment.value_width,
                                                     " does not fit head_dim ", head_dim));
    }
    if (count == 0 || (keys == nullptr && values == nullptr)) return absl::OkStatus();
    absl::MutexLock lock(&mu_);
    if (absl::Status s = Begin(stream_); !s.ok()) return s;
    staging_.Clear();
    const SegmentArrays arrays =
        StageSegment(staging_, segment, int64_t{first_row} + count, /*with_positions=*/false);
    if (absl::Status s = inputs_.Reserve(staging_.size(), "ReadRows"); !s.ok()) return s;
    const int64_t elements = int64_t{count} * head_dim;
    Carver carve;
    const int64_t keys_at = carve.Take(keys != nullptr ? elements * 4 : 0);
    const int64_t values_at = carve.Take(values != nullptr ? elements * 4 : 0);
    if (absl::Status s = work_.Reserve(carve.size(), "ReadRows"); !s.ok()) return s;
    if (absl::Status s = Upload("ReadRows"); !s.ok()) return s;
    ReadRowsArgs args;
    args.pool = pool;
    args.segment = DeviceSegment(segment, arrays, inputs_.data());
    args.head_dim = head_dim;
    args.first_row = first_row;
    args.count = count;
    args.keys = keys != nullptr ? reinterpret_cast<float*>(work_.data() + keys_at) : nullptr;
    args.values = values != nullptr ? reinterpret_cast<float*>(work_.data() + values_at) : nullptr;
    if (cudaError_t e = LaunchReadRows(args, stream_); e != cudaSuccess) {
      return CudaError(e, "ReadRows");
    }
    if (absl::Status s = Download(keys, args.keys, elements * 4, "ReadRows"); !s.ok()) return s;
    if (absl::Status s = Download(values, args.values, elements * 4, "ReadRows"); !s.ok()) return s;
    return Finish("ReadRows");
  }

  absl::Status DecodeAttention(const PagedKVView& kv, const DecodeParams& params, const float* q,
                               float* out, float* lse) override {
    DecodeIO io;
    io.q = q;
    io.out = out;
    io.lse = lse;
    return Decode(kv, params, io, /*device=*/false);
  }

  absl::Status DeviceDecodeAttention(const PagedKVView& kv, const DecodeParams& params,
                                     const DecodeIO& io) override {
    return Decode(kv, params, io, /*device=*/true);
  }

  absl::Status Synchronize(void* stream) override {
    if (cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) return CudaError(e, "set device");
    cudaStream_t s = stream != nullptr ? static_cast<cudaStream_t>(stream) : stream_;
    if (cudaError_t e = cudaStreamSynchronize(s); e != cudaSuccess) {
      return CudaError(e, "Synchronize");
    }
    return absl::OkStatus();
  }

  absl::Status ScoreRows(const PagedKVView& kv, const ScoreRowsParams& params, const float* queries,
                         const int32_t* query_positions, float* token_scores,
                         int64_t* below_threshold, int64_t* causal_entries) override {
    StreamLayout layout;
    if (absl::Status s = CheckView(kv, params.group_size, "ScoreRows", layout); !s.ok()) return s;
    if (params.num_rows <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("ScoreRows: num_rows ", params.num_rows));
    }
    const int64_t num_queries = int64_t{params.num_rows} * kv.num_streams;
    if (num_queries > INT32_MAX) {
      return absl::InvalidArgumentError("ScoreRows: num_rows * num_streams exceeds int32");
    }
    const int32_t group = params.group_size;
    const int32_t d = kv.head_dim;
    const int64_t heads = int64_t{kv.num_streams} * group;

    // Causal entries need no kernel: row r sees the keys of stream i at positions <= its own.
    if (causal_entries != nullptr) {
      std::vector<int32_t> positions;
      for (int32_t i = 0; i < kv.num_streams; ++i) {
        positions.clear();
        for (int32_t sidx = kv.stream_segment_offsets[i]; sidx < kv.stream_segment_offsets[i + 1];
             ++sidx) {
          const SegmentView& s = kv.segments[sidx];
          positions.insert(positions.end(), s.positions, s.positions + s.length);
        }
        std::sort(positions.begin(), positions.end());
        int64_t visible = 0;
        for (int32_t r = 0; r < params.num_rows; ++r) {
          visible += std::upper_bound(positions.begin(), positions.end(), query_positions[r]) -
                     positions.begin();
        }
        for (int32_t g = 0; g < group; ++g) causal_entries[int64_t{i} * group + g] = visible;
      }
    }
    if (kv.num_streams == 0) return absl::OkStatus();

    absl::MutexLock lock(&mu_);
    if (absl::Status s = Begin(stream_); !s.ok()) return s;
    staging_.Clear();
    const StagedView view = StageView(kv, layout, /*with_positions=*/true);
    const int64_t q_at = staging_.Append(queries, num_queries * group * d * sizeof(float));
    const int64_t positions_at =
        staging_.Append(query_positions, int64_t{params.num_rows} * sizeof(int32_t));
    if (absl::Status s = inputs_.Reserve(staging_.size(), "ScoreRows"); !s.ok()) return s;

    const DecodeSplit split =
        PlanDecodeSplit(static_cast<int32_t>(num_queries), group, layout.max_length, num_sms_);
    Carver carve;
    const int64_t m_at = carve.Take(num_queries * group * 4);
    const int64_t l_at = carve.Take(num_queries * group * 4);
    const int64_t scores_at = carve.Take(layout.total_tokens * 4);
    const int64_t below_at = carve.Take(heads * 8);
    const int64_t workspace_at =
        carve.Take(DecodeWorkspaceFloats(split, static_cast<int32_t>(num_queries), group, d) * 4);
    if (absl::Status s = work_.Reserve(carve.size(), "ScoreRows"); !s.ok()) return s;

    uint8_t* dev = inputs_.data();
    uint8_t* work = work_.data();
    ScoreRowsArgs sargs;
    AttentionArgs& args = sargs.attention;
    args = DeviceArgs(kv, view, layout, dev);
    args.num_queries = static_cast<int32_t>(num_queries);
    args.group_size = group;
    args.scale = ResolveScale(params.scale, d);
    args.q = reinterpret_cast<const float*>(dev + q_at);
    args.query_positions = reinterpret_cast<const int32_t*>(dev + positions_at);
    args.state_m = reinterpret_cast<float*>(work + m_at);
    args.state_l = reinterpret_cast<float*>(work + l_at);
    args.aggregation = static_cast<Aggregation>(params.aggregation);
    sargs.num_rows = params.num_rows;
    sargs.sparsity_threshold = params.sparsity_threshold;
    sargs.token_scores = reinterpret_cast<float*>(work + scores_at);
    sargs.below_threshold = reinterpret_cast<unsigned long long*>(work + below_at);
    if (absl::Status s = Upload("ScoreRows"); !s.ok()) return s;
    if (cudaError_t e = cudaMemsetAsync(sargs.below_threshold, 0, heads * 8, stream_);
        e != cudaSuccess) {
      return CudaError(e, "ScoreRows");
    }
    // Pass 1: the final softmax state (m, l) of every (row, head) over its visible keys.
    if (cudaError_t e = LaunchDecodeAttention(
            args, split, reinterpret_cast<float*>(work + workspace_at), stream_);
        e != cudaSuccess) {
      return CudaError(e, "ScoreRows (softmax states)");
    }
    // Pass 2: probabilities, token sums and below-threshold counts.
    if (cudaError_t e = LaunchScoreRowsAggregate(sargs, stream_); e != cudaSuccess) {
      return CudaError(e, "ScoreRows (aggregation)");
    }
    if (absl::Status s =
            Download(token_scores, sargs.token_scores, layout.total_tokens * 4, "ScoreRows");
        !s.ok()) {
      return s;
    }
    if (below_threshold != nullptr) {
      if (absl::Status s = Download(below_threshold, sargs.below_threshold, heads * 8, "ScoreRows");
          !s.ok()) {
        return s;
      }
    }
    return Finish("ScoreRows");
  }

  // ---- Capturable decode steps (backend_impl.h StepBuffers) ------------------------------------

  absl::StatusOr<std::unique_ptr<StepBuffers>> CreateStepBuffers(const StepShape& shape) override {
    if (shape.num_layers <= 0 || shape.num_streams <= 0 || shape.group_size <= 0 ||
        shape.head_dim <= 0 || shape.max_context <= 0 ||
        shape.segment_capacity.size() != static_cast<size_t>(shape.num_layers) ||
        shape.index_capacity.size() != static_cast<size_t>(shape.num_layers)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "CreateStepBuffers: ", shape.num_layers, " layers, ", shape.num_streams, " streams, G ",
          shape.group_size, ", head_dim ", shape.head_dim, ", max_context ", shape.max_context));
    }
    if (shape.head_dim > kMaxHeadDim) {
      return absl::UnimplementedError(absl::StrCat("CreateStepBuffers: head_dim ", shape.head_dim,
                                                   " exceeds the cuda backend's maximum ",
                                                   kMaxHeadDim));
    }
    auto step = std::make_unique<CudaStep>();
    const int64_t streams = shape.num_streams;
    const int64_t heads = streams * shape.group_size;
    step->pool = shape.pool;
    step->num_streams = shape.num_streams;
    step->group_size = shape.group_size;
    step->head_dim = shape.head_dim;
    step->max_context = shape.max_context;
    // The split is fixed by max_context: the kernel clips every split to its stream's length,
    // so shorter streams (every stream before the last steps) leave trailing splits empty.
    step->split = PlanDecodeSplit(shape.num_streams, shape.group_size, shape.max_context, num_sms_);
    Carver carve;
    for (int32_t l = 0; l < shape.num_layers; ++l) {
      CudaStep::Layer layer;
      layer.segment_capacity = shape.segment_capacity[l];
      layer.index_capacity = shape.index_capacity[l];
      layer.segments_at = carve.Take(int64_t{layer.segment_capacity} * sizeof(SegmentView));
      layer.segment_offsets_at = carve.Take((streams + 1) * sizeof(int32_t));
      layer.token_offsets_at = carve.Take((streams + 1) * sizeof(int64_t));
      layer.indices_at = carve.Take(int64_t{layer.index_capacity} * sizeof(int32_t));
      layer.jobs_at = carve.Take(streams * static_cast<int64_t>(sizeof(WriteJob)));
      layer.rows_at = carve.Take(streams * static_cast<int64_t>(sizeof(int2)));
      step->layers.push_back(layer);
    }
    step->tables_bytes = carve.size();
    const int64_t elements = heads * shape.head_dim;
    step->q32_at = carve.Take(elements * 4);
    step->out32_at = carve.Take(elements * 4);
    step->lse_at = carve.Take(heads * 4);
    step->workspace_at = carve.Take(
        DecodeWorkspaceFloats(step->split, shape.num_streams, shape.group_size, shape.head_dim) *
        4);
    absl::MutexLock lock(&mu_);
    if (cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) return CudaError(e, "set device");
    if (cudaError_t e = cudaMalloc(&step->memory, static_cast<size_t>(carve.size()));
        e != cudaSuccess) {
      step->memory = nullptr;
      return CudaError(e, absl::StrCat("CreateStepBuffers: ", carve.size(), " bytes"));
    }
    step->image.assign(static_cast<size_t>(step->tables_bytes), 0);
    return std::unique_ptr<StepBuffers>(std::move(step));
  }

  absl::Status UploadStep(StepBuffers& buffers, std::span<const StepLayer> layers,
                          void* stream) override {
    CudaStep& step = static_cast<CudaStep&>(buffers);
    if (layers.size() != step.layers.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "UploadStep: ", layers.size(), " layers for buffers of ", step.layers.size()));
    }
    // Check everything before the image changes: a refused upload leaves the device as it was.
    std::vector<StreamLayout> layouts(layers.size());
    for (size_t l = 0; l < layers.size(); ++l) {
      const PagedKVView& kv = layers[l].kv;
      const CudaStep::Layer& cap = step.layers[l];
      if (kv.num_streams != step.num_streams || kv.head_dim != step.head_dim) {
        return absl::InvalidArgumentError(absl::StrCat("UploadStep: layer ", l, " has ",
                                                       kv.num_streams, " streams of head_dim ",
                                                       kv.head_dim));
      }
      if (absl::Status s = CheckView(kv, step.group_size, "UploadStep", layouts[l]); !s.ok()) {
        return s;
      }
      const int32_t num_segments = kv.stream_segment_offsets[kv.num_streams];
      int64_t indices = 0;
      for (int32_t s = 0; s < num_segments; ++s) indices += StepIndices(kv.segments[s]);
      if (num_segments > cap.segment_capacity || indices > cap.index_capacity ||
          layouts[l].max_length > step.max_context) {
        return absl::FailedPreconditionError(absl::StrCat(
            "UploadStep: layer ", l, " needs ", num_segments, " segments, ", indices,
            " page ids / key channels and streams of up to ", layouts[l].max_length,
            " tokens; the plan's buffers hold ", cap.segment_capacity, ", ", cap.index_capacity,
            " and ", step.max_context, " (recapture with a new plan)"));
      }
      if (!layers[l].writes.empty() &&
          layers[l].writes.size() != static_cast<size_t>(step.num_streams)) {
        return absl::InvalidArgumentError(absl::StrCat("UploadStep: layer ", l, " has ",
                                                       layers[l].writes.size(), " writes for ",
                                                       step.num_streams, " streams"));
      }
    }
    uint8_t* dev = static_cast<uint8_t*>(step.memory);
    uint8_t* image = step.image.data();
    for (size_t l = 0; l < layers.size(); ++l) {
      const PagedKVView& kv = layers[l].kv;
      CudaStep::Layer& cap = step.layers[l];
      const int32_t num_segments = kv.stream_segment_offsets[kv.num_streams];
      auto* indices = reinterpret_cast<int32_t*>(image + cap.indices_at);
      int64_t at = 0;
      // Device copies of every segment's page ids and key channel map, packed.
      auto device_view = [&](const SegmentView& s) {
        SegmentView v = s;
        const int64_t pages = s.tokens_per_page > 0 ? CeilDiv(s.length, s.tokens_per_page) : 0;
        v.pages = nullptr;
        if (pages > 0) {
          std::memcpy(indices + at, s.pages, static_cast<size_t>(pages) * 4);
          v.pages = reinterpret_cast<const int32_t*>(dev + cap.indices_at) + at;
          at += pages;
        }
        if (s.key_channels != nullptr) {
          std::memcpy(indices + at, s.key_channels, static_cast<size_t>(s.key_width) * 4);
          v.key_channels = reinterpret_cast<const int32_t*>(dev + cap.indices_at) + at;
          at += s.key_width;
        }
        v.positions = nullptr;
        v.modalities = nullptr;
        v.scores = nullptr;
        return v;
      };
      auto* segments = reinterpret_cast<SegmentView*>(image + cap.segments_at);
      for (int32_t s = 0; s < num_segments; ++s) segments[s] = device_view(kv.segments[s]);
      std::memcpy(image + cap.segment_offsets_at, kv.stream_segment_offsets,
                  (static_cast<size_t>(kv.num_streams) + 1) * 4);
      std::memcpy(image + cap.token_offsets_at, layouts[l].token_offsets.data(),
                  layouts[l].token_offsets.size() * 8);
      cap.num_writes = static_cast<int32_t>(layers[l].writes.size());
      auto* jobs = reinterpret_cast<WriteJob*>(image + cap.jobs_at);
      auto* rows = reinterpret_cast<int2*>(image + cap.rows_at);
      for (int32_t i = 0; i < cap.num_writes; ++i) {
        const RowWrite& w = layers[l].writes[static_cast<size_t>(i)];
        // The reserved row's segment is the stream's last: its pages were just packed, so the
        // job points at the same device copy the decode reads.
        const SegmentView dst = segments[kv.stream_segment_offsets[i + 1] - 1];
        jobs[i] = WriteJob{};
        jobs[i].dst = dst;
        jobs[i].first_row = w.first_row;
        jobs[i].src_stride = step.head_dim;
        jobs[i].src_offset = int64_t{i} * step.head_dim;
        rows[i] = int2{i, w.first_row};
      }
    }
    absl::MutexLock lock(&mu_);
    if (cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) return CudaError(e, "set device");
    cudaStream_t s = stream != nullptr ? static_cast<cudaStream_t>(stream) : stream_;
    // Without a stream the replays' stream is unknown: wait for everything on the device.
    if (stream == nullptr) {
      if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) {
        return CudaError(e, "UploadStep");
      }
    }
    // Pageable source: the copy has left step.image when cudaMemcpyAsync returns (see Decode).
    if (cudaError_t e = cudaMemcpyAsync(step.memory, image, static_cast<size_t>(step.tables_bytes),
                                        cudaMemcpyHostToDevice, s);
        e != cudaSuccess) {
      return CudaError(e, "UploadStep");
    }
    if (stream == nullptr) {
      if (cudaError_t e = cudaStreamSynchronize(s); e != cudaSuccess) {
        return CudaError(e, "UploadStep");
      }
    }
    return absl::OkStatus();
  }

  absl::Status StepWriteRows(StepBuffers& buffers, int32_t layer, const void* keys,
                             const void* values, DType dtype, void* stream) override {
    CudaStep& step = static_cast<CudaStep&>(buffers);
    if (layer < 0 || layer >= static_cast<int32_t>(step.layers.size()) ||
        step.layers[static_cast<size_t>(layer)].num_writes == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("StepWriteRows: layer slot ", layer, " has no reserved rows"));
    }
    const int64_t bytes = int64_t{step.num_streams} * step.head_dim * DTypeSize(dtype);
    if (absl::Status s = step.CheckOnce(*this, 0, keys, bytes, "AppendStep: keys"); !s.ok()) {
      return s;
    }
    if (absl::Status s = step.CheckOnce(*this, 1, values, bytes, "AppendStep: values"); !s.ok()) {
      return s;
    }
    const CudaStep::Layer& cap = step.layers[static_cast<size_t>(layer)];
    uint8_t* dev = static_cast<uint8_t*>(step.memory);
    WriteRowsArgs args;
    args.pool = step.pool;
    args.head_dim = step.head_dim;
    args.src_dtype = dtype;
    args.jobs = reinterpret_cast<const WriteJob*>(dev + cap.jobs_at);
    args.rows = reinterpret_cast<const int2*>(dev + cap.rows_at);
    args.num_rows = cap.num_writes;
    args.keys = keys;
    args.values = values;
    if (cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) return CudaError(e, "set device");
    cudaStream_t s = stream != nullptr ? static_cast<cudaStream_t>(stream) : stream_;
    if (cudaError_t e = LaunchWriteRows(args, s); e != cudaSuccess) {
      return CudaError(e, "AppendStep");
    }
    return absl::OkStatus();
  }

  absl::Status StepDecode(StepBuffers& buffers, int32_t layer, const DecodeParams& params,
                          const DecodeIO& io) override {
    CudaStep& step = static_cast<CudaStep&>(buffers);
    if (layer < 0 || layer >= static_cast<int32_t>(step.layers.size())) {
      return absl::InvalidArgumentError(absl::StrCat("StepDecode: layer slot ", layer));
    }
    if (params.accumulate_scores || params.group_size != step.group_size) {
      return absl::InvalidArgumentError(
          "StepDecode: score accumulation (host accumulators) is not capturable");
    }
    const int32_t d = step.head_dim;
    const int64_t heads = int64_t{step.num_streams} * step.group_size;
    if (absl::Status s =
            step.CheckOnce(*this, 2, io.q, heads * d * DTypeSize(io.q_dtype), "DecodeAttention: q");
        !s.ok()) {
      return s;
    }
    if (absl::Status s = step.CheckOnce(*this, 3, io.out, heads * d * DTypeSize(io.out_dtype),
                                        "DecodeAttention: out");
        !s.ok()) {
      return s;
    }
    if (io.lse != nullptr) {
      if (absl::Status s = step.CheckOnce(*this, 4, io.lse, heads * 4, "DecodeAttention: lse");
          !s.ok()) {
        return s;
      }
    }
    const CudaStep::Layer& cap = step.layers[static_cast<size_t>(layer)];
    uint8_t* dev = static_cast<uint8_t*>(step.memory);
    const bool q_in_place = io.q_dtype == DType::kF32;
    const bool out_in_place = io.out_dtype == DType::kF32;
    AttentionArgs args;
    args.pool = step.pool;
    args.head_dim = d;
    args.num_streams = step.num_streams;
    args.stream_segment_offsets = reinterpret_cast<const int32_t*>(dev + cap.segment_offsets_at);
    args.segments = reinterpret_cast<const SegmentView*>(dev + cap.segments_at);
    args.stream_token_offsets = reinterpret_cast<const int64_t*>(dev + cap.token_offsets_at);
    args.max_stream_length = step.max_context;
    args.num_queries = step.num_streams;
    args.group_size = step.group_size;
    args.scale = ResolveScale(params.scale, d);
    args.q = q_in_place ? static_cast<const float*>(io.q)
                        : reinterpret_cast<const float*>(dev + step.q32_at);
    args.out =
        out_in_place ? static_cast<float*>(io.out) : reinterpret_cast<float*>(dev + step.out32_at);
    args.lse = io.lse != nullptr ? io.lse : reinterpret_cast<float*>(dev + step.lse_at);
    if (cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) return CudaError(e, "set device");
    cudaStream_t s = io.stream != nullptr ? static_cast<cudaStream_t>(io.stream) : stream_;
    if (!q_in_place) {
      if (cudaError_t e =
              LaunchConvert(io.q, io.q_dtype, dev + step.q32_at, DType::kF32, heads * d, s);
          e != cudaSuccess) {
        return CudaError(e, "DecodeAttention (q conversion)");
      }
    }
    if (cudaError_t e = LaunchDecodeAttention(args, step.split,
                                              reinterpret_cast<float*>(dev + step.workspace_at), s);
        e != cudaSuccess) {
      return CudaError(e, "DecodeAttention");
    }
    if (!out_in_place) {
      if (cudaError_t e =
              LaunchConvert(dev + step.out32_at, DType::kF32, io.out, io.out_dtype, heads * d, s);
          e != cudaSuccess) {
        return CudaError(e, "DecodeAttention (out conversion)");
      }
    }
    return absl::OkStatus();
  }

 private:
  // int32 slots a segment's device copy takes in a step's index area.
  static int64_t StepIndices(const SegmentView& s) {
    const int64_t pages = s.tokens_per_page > 0 ? CeilDiv(s.length, s.tokens_per_page) : 0;
    return pages + (s.key_channels != nullptr ? s.key_width : 0);
  }

  // A capturable plan's device memory (backend_impl.h StepBuffers): one cudaMalloc, carved.
  struct CudaStep final : StepBuffers {
    struct Layer {
      int32_t segment_capacity = 0;
      int32_t index_capacity = 0;
      int32_t num_writes = 0;
      int64_t segments_at = 0, segment_offsets_at = 0, token_offsets_at = 0, indices_at = 0;
      int64_t jobs_at = 0, rows_at = 0;
    };
    ~CudaStep() override {
      if (memory != nullptr) cudaFree(memory);
    }
    // Checks once per new pointer (and size) that a tensor is device memory of the backend:
    // cudaPointerGetAttributes runs when an engine first passes a buffer (outside a capture, or
    // during the capture of the first step: the call is not a stream operation), never on the
    // calls that reuse the buffer.
    absl::Status CheckOnce(const CudaBackend& backend, int slot, const void* p, int64_t bytes,
                           absl::string_view what) {
      if (checked[slot] == p && checked_bytes[slot] == bytes) return absl::OkStatus();
      if (absl::Status s = backend.CheckDeviceMemory(p, bytes, what); !s.ok()) return s;
      checked[slot] = p;
      checked_bytes[slot] = bytes;
      return absl::OkStatus();
    }
    PoolView pool;
    void* memory = nullptr;
    std::vector<uint8_t> image;  // [tables_bytes] host image of the tables, uploaded whole
    int64_t tables_bytes = 0;
    std::vector<Layer> layers;
    int32_t num_streams = 0, group_size = 1, head_dim = 0, max_context = 0;
    DecodeSplit split;
    int64_t q32_at = 0, out32_at = 0, lse_at = 0, workspace_at = 0;
    const void* checked[5] = {};  // keys, values, q, out, lse
    int64_t checked_bytes[5] = {};
  };

  struct StreamLayout {
    std::vector<int64_t> token_offsets;  // [num_streams + 1]
    int64_t total_tokens = 0;
    int32_t max_length = 0;
  };
  struct StagedView {
    std::vector<SegmentArrays> arrays;  // [num segments], unless mirrored
    // Mirrored (StageMirroredView): the segments' arrays are in mirror_buf_ (mirror_update_
    // says where); the staged values and copy jobs bring it up to date.
    bool mirrored = false;
    int64_t values_at = 0;
    int64_t copies_at = 0;
    int32_t num_copies = 0;
    int64_t segments_at = 0;
    int64_t segment_offsets_at = 0;
    int64_t token_offsets_at = 0;
  };

  // Dense decode for both faces. Host (device = false): q / out / lse are f32 host memory, q is
  // staged with the views, results are downloaded and the stream is synchronised. Device:
  // q / out / lse are the caller's device memory in their dtypes, enqueued on io.stream (or
  // stream_) without synchronising unless scores are accumulated (the accumulators are host
  // memory, added below once the probabilities are back).
  //
  // f16 / bf16 device q and out are converted by a small elementwise kernel into / out of f32
  // scratch in work_, rather than by templating the attention kernels on the q and out dtypes:
  // q and out are batch * q_heads * head_dim elements (one row per query head; 1 MiB of f32 at
  // batch 64, 32 heads, 128 dims) while the attention kernel reads every cached K/V row of the
  // batch (about 0.5 GiB at 8k context for the same shape in bf16), so the extra pass moves
  // well under 1% of the bytes; it costs one launch each way (a few microseconds, and none for
  // f32), and it keeps the number of attention kernel instantiations (pool dtype x head dim x
  // group tile) from growing by 9x. Not measured on a GPU (none was available to this change):
  // the argument is the byte count above.
  absl::Status Decode(const PagedKVView& kv, const DecodeParams& params, const DecodeIO& io,
                      bool device) {
    StreamLayout layout;
    if (absl::Status s = CheckView(kv, params.group_size, "DecodeAttention", layout); !s.ok()) {
      return s;
    }
    const int32_t group = params.group_size;
    const int32_t d = kv.head_dim;
    const int64_t heads = int64_t{kv.num_streams} * group;
    if (device) {
      if (absl::Status s =
              CheckDeviceMemory(io.q, heads * d * DTypeSize(io.q_dtype), "DecodeAttention: q");
          !s.ok()) {
        return s;
      }
      if (absl::Status s = CheckDeviceMemory(io.out, heads * d * DTypeSize(io.out_dtype),
                                             "DecodeAttention: out");
          !s.ok()) {
        return s;
      }
      if (io.lse != nullptr) {
        if (absl::Status s = CheckDeviceMemory(io.lse, heads * 4, "DecodeAttention: lse");
            !s.ok()) {
          return s;
        }
      }
    }
    if (kv.num_streams == 0) return absl::OkStatus();
    cudaStream_t stream =
        device && io.stream != nullptr ? static_cast<cudaStream_t>(io.stream) : stream_;

    absl::MutexLock lock(&mu_);
    if (absl::Status s = Begin(stream); !s.ok()) return s;
    absl::Status status = DecodeLocked(kv, params, io, device, layout, stream);
    if (device) {
      // Whatever happened, work on `stream` may read inputs_ / work_ from now on (a failure
      // can follow a launch): calls on other streams wait for it (Begin).
      absl::Status recorded = Enqueued("DecodeAttention", stream);
      if (status.ok()) status = recorded;
    }
    return status;
  }

  // Decode after Begin(stream), under mu_. Returns with the work enqueued (device tensors
  // without score accumulation) or finished.
  absl::Status DecodeLocked(const PagedKVView& kv, const DecodeParams& params, const DecodeIO& io,
                            bool device, const StreamLayout& layout, cudaStream_t stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int32_t group = params.group_size;
    const int32_t d = kv.head_dim;
    const int64_t heads = int64_t{kv.num_streams} * group;
    const bool accumulate = params.accumulate_scores;
    const bool q_in_place = device && io.q_dtype == DType::kF32;
    const bool out_in_place = device && io.out_dtype == DType::kF32;
    const bool lse_in_place = device && io.lse != nullptr;
    staging_.Clear();
    StagedView view;
    if (mirror_enabled_ && kv.stream_versions != nullptr) {
      if (absl::Status s = StageMirroredView(kv, layout, view); !s.ok()) return s;
    } else {
      view = StageView(kv, layout, /*with_positions=*/false);
    }
    // Between the mirror's bookkeeping (StageMirroredView) and the enqueueing of its copies, a
    // failure leaves entries the device does not hold: forget them.
    auto fail = [&](absl::Status s) {
      if (view.mirrored) mirror_.Forget();
      return s;
    };
    const int64_t q_at = device ? -1 : staging_.Append(io.q, heads * d * sizeof(float));
    if (absl::Status s = inputs_.Reserve(staging_.size(), "DecodeAttention"); !s.ok()) {
      return fail(s);
    }

    const DecodeSplit split = PlanDecodeSplit(kv.num_streams, group, layout.max_length, num_sms_);
    Carver carve;
    const int64_t q32_at = carve.Take(device && !q_in_place ? heads * d * 4 : 0);
    const int64_t out_at = carve.Take(out_in_place ? 0 : heads * d * 4);
    const int64_t lse_at = carve.Take(lse_in_place ? 0 : heads * 4);
    const int64_t m_at = carve.Take(accumulate ? heads * 4 : 0);
    const int64_t l_at = carve.Take(accumulate ? heads * 4 : 0);
    const int64_t logits_at = carve.Take(accumulate ? layout.total_tokens * group * 4 : 0);
    const int64_t probs_at = carve.Take(accumulate ? layout.total_tokens * 4 : 0);
    const int64_t workspace_at =
        carve.Take(DecodeWorkspaceFloats(split, kv.num_streams, group, d) * 4);
    if (absl::Status s = work_.Reserve(carve.size(), "DecodeAttention"); !s.ok()) {
      return fail(s);
    }

    uint8_t* dev = inputs_.data();
    uint8_t* work = work_.data();
    AttentionArgs args = DeviceArgs(kv, view, layout, dev);
    args.num_queries = kv.num_streams;
    args.group_size = group;
    args.scale = ResolveScale(params.scale, d);
    args.q = !device      ? reinterpret_cast<const float*>(dev + q_at)
             : q_in_place ? static_cast<const float*>(io.q)
                          : reinterpret_cast<const float*>(work + q32_at);
    args.out = out_in_place ? static_cast<float*>(io.out) : reinterpret_cast<float*>(work + out_at);
    args.lse = lse_in_place ? io.lse : reinterpret_cast<float*>(work + lse_at);
    if (accumulate) {
      args.state_m = reinterpret_cast<float*>(work + m_at);
      args.state_l = reinterpret_cast<float*>(work + l_at);
      args.logits = reinterpret_cast<float*>(work + logits_at);
      args.token_probs = reinterpret_cast<float*>(work + probs_at);
      args.aggregation = static_cast<Aggregation>(params.aggregation);
    }
    // The staging blob is pageable host memory: cudaMemcpyAsync from pageable memory returns
    // only once the driver has copied the source into its own pinned staging buffer (CUDA
    // runtime "API synchronization behavior"), so the next call may clear and refill staging_
    // as soon as this one returns, even though the copy to inputs_ may still be in flight. The
    // device side of inputs_ / work_ is protected by stream order on one stream and by the
    // buffers_free_ event across streams (Begin).
    if (absl::Status s = Upload("DecodeAttention", stream); !s.ok()) return fail(s);
    if (view.mirrored) {
      if (cudaError_t e = LaunchMirrorCopies(
              reinterpret_cast<const MirrorCopy*>(dev + view.copies_at), view.num_copies, stream);
          e != cudaSuccess) {
        return fail(CudaError(e, "DecodeAttention (view mirror copies)"));
      }
    }
    if (device && !q_in_place) {
      if (cudaError_t e =
              LaunchConvert(io.q, io.q_dtype, work + q32_at, DType::kF32, heads * d, stream);
          e != cudaSuccess) {
        return CudaError(e, "DecodeAttention (q conversion)");
      }
    }
    if (cudaError_t e = LaunchDecodeAttention(
            args, split, reinterpret_cast<float*>(work + workspace_at), stream);
        e != cudaSuccess) {
      return CudaError(e, "DecodeAttention");
    }
    if (device && !out_in_place) {
      if (cudaError_t e =
              LaunchConvert(work + out_at, DType::kF32, io.out, io.out_dtype, heads * d, stream);
          e != cudaSuccess) {
        return CudaError(e, "DecodeAttention (out conversion)");
      }
    }
    if (!device) {
      if (absl::Status s = Download(io.out, args.out, heads * d * 4, "DecodeAttention", stream);
          !s.ok()) {
        return s;
      }
      if (absl::Status s = Download(io.lse, args.lse, heads * 4, "DecodeAttention", stream);
          !s.ok()) {
        return s;
      }
    }
    if (!accumulate) {
      // Device tensors: asynchronous, no host synchronisation (Decode records the event).
      return device ? absl::OkStatus() : Finish("DecodeAttention", stream);
    }
    // Score accumulation: the accumulators are host memory (SegmentView::scores), so the
    // probabilities come back and the stream is synchronised, device tensors or not.
    std::vector<float> probs(static_cast<size_t>(layout.total_tokens));
    if (absl::Status s = Download(probs.data(), args.token_probs, layout.total_tokens * 4,
                                  "DecodeAttention", stream);
        !s.ok()) {
      return s;
    }
    if (absl::Status s = Finish("DecodeAttention", stream); !s.ok()) return s;
    int64_t t = 0;  // add in token order
    for (int32_t i = 0; i < kv.num_streams; ++i) {
      for (int32_t sidx = kv.stream_segment_offsets[i]; sidx < kv.stream_segment_offsets[i + 1];
           ++sidx) {
        const SegmentView& seg = kv.segments[sidx];
        for (int32_t j = 0; j < seg.length; ++j, ++t) {
          if (seg.scores != nullptr) seg.scores[j] += probs[static_cast<size_t>(t)];
        }
      }
    }
    return absl::OkStatus();
  }

  // InvalidArgument unless [p, p + bytes) is memory of this backend's device (device or
  // managed memory), naming `what`. cudaPointerGetAttributes describes the allocation holding
  // one address, so both ends are asked: a buffer too short for `bytes` ends outside it (up to
  // an adjacent allocation of the same device, which no check short of the allocator's own
  // records could tell apart).
  absl::Status CheckDeviceMemory(const void* p, int64_t bytes, absl::string_view what) const {
    if (bytes <= 0) return absl::OkStatus();
    for (const void* at :
         {p, static_cast<const void*>(static_cast<const uint8_t*>(p) + bytes - 1)}) {
      cudaPointerAttributes a{};
      const cudaError_t e = cudaPointerGetAttributes(&a, at);
      if (e != cudaSuccess) {
        cudaGetLastError();  // not sticky: clear it so that later calls do not report it
        return absl::InvalidArgumentError(absl::StrCat(
            what, " (", bytes, " bytes at 0x", absl::Hex(reinterpret_cast<uintptr_t>(p)),
            ") is not device memory: ", cudaGetErrorName(e)));
      }
      if ((a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged) ||
          a.device != device_) {
        return absl::InvalidArgumentError(absl::StrCat(
            what, " (", bytes, " bytes at 0x", absl::Hex(reinterpret_cast<uintptr_t>(p)),
            ") is not memory of CUDA device ", device_,
            a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged
                ? absl::StrCat(" (it is on device ", a.device, ")")
                : std::string(" (it is host memory)")));
      }
    }
    return absl::OkStatus();
  }

  absl::Status CheckView(const PagedKVView& kv, int32_t group, absl::string_view what,
                         StreamLayout& layout) const {
    if (kv.num_streams < 0 || kv.head_dim <= 0 || group <= 0 ||
        (kv.num_streams > 0 && (kv.stream_segment_offsets == nullptr))) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": num_streams ", kv.num_streams,
                                                     ", head_dim ", kv.head_dim, ", group_size ",
                                                     group));
    }
    if (kv.head_dim > kMaxHeadDim) {
      return absl::UnimplementedError(absl::StrCat(
          what, ": head_dim ", kv.head_dim, " exceeds the cuda backend's maximum ", kMaxHeadDim));
    }
    layout.token_offsets.assign(static_cast<size_t>(kv.num_streams) + 1, 0);
    for (int32_t i = 0; i < kv.num_streams; ++i) {
      int64_t n = 0;
      for (int32_t sidx = kv.stream_segment_offsets[i]; sidx < kv.stream_segment_offsets[i + 1];
           ++sidx) {
        if (absl::Status s = CheckSegment(kv.segments[sidx], kv.head_dim, what); !s.ok()) return s;
        n += kv.segments[sidx].length;
      }
      if (n > INT32_MAX) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ": stream ", i, " has ", n, " tokens"));
      }
      layout.max_length = std::max(layout.max_length, static_cast<int32_t>(n));
      layout.token_offsets[i + 1] = layout.token_offsets[i] + n;
    }
    layout.total_tokens = layout.token_offsets.back();
    return absl::OkStatus();
  }

  // Stages the view's arrays; the SegmentView structs are written by DeviceArgs once the device
  // buffer (and so every device address) is known.
  StagedView StageView(const PagedKVView& kv, const StreamLayout& layout, bool with_positions) {
    StagedView v;
    const int32_t num_segments = kv.stream_segment_offsets[kv.num_streams];
    v.arrays.reserve(static_cast<size_t>(num_segments));
    for (int32_t s = 0; s < num_segments; ++s) {
      v.arrays.push_back(
          StageSegment(staging_, kv.segments[s], kv.segments[s].length, with_positions));
    }
    v.segments_at = staging_.Reserve(int64_t{num_segments} * sizeof(SegmentView));
    v.segment_offsets_at =
        staging_.Append(kv.stream_segment_offsets, (int64_t{kv.num_streams} + 1) * sizeof(int32_t));
    v.token_offsets_at = staging_.Append(layout.token_offsets.data(),
                                         static_cast<int64_t>(layout.token_offsets.size()) * 8);
    return v;
  }

  // Stages a decode view whose page tables live in the view mirror (mirror_buf_): only what
  // changed since the mirror last saw each stream version is staged (new page ids, the
  // copy-on-write replacement of a last page, every array of a segment never seen), plus the
  // copy jobs that scatter it on the device. The SegmentView structs and the CSR / token
  // offsets are O(segments) and are staged whole: lengths change every step.
  absl::Status StageMirroredView(const PagedKVView& kv, const StreamLayout& layout, StagedView& v)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!mirror_.Plan(kv, mirror_update_)) {
      // Full (or first use): forget every entry and mirror this view from scratch. Growing
      // mirror_buf_ (cudaFree + cudaMalloc) waits for the whole device, so no kernel still
      // reads the old buffer; it happens O(log) times (view_mirror.h).
      mirror_.Reset(kv);
      if (absl::Status s =
              mirror_buf_.Reserve(mirror_.capacity(), "DecodeAttention (view mirror)");
          !s.ok()) {
        mirror_.Drop();
        return s;
      }
      if (!mirror_.Plan(kv, mirror_update_)) {
        mirror_.Forget();
        return absl::InternalError("DecodeAttention: the view mirror does not fit after a reset");
      }
    }
    const ViewMirror::Update& u = mirror_update_;
    v.mirrored = true;
    v.values_at =
        staging_.Append(u.values.data(), static_cast<int64_t>(u.values.size()) * sizeof(int32_t));
    v.num_copies = static_cast<int32_t>(u.copies.size());
    v.copies_at = staging_.Reserve(int64_t{v.num_copies} * sizeof(MirrorCopy));
    const int32_t num_segments = kv.stream_segment_offsets[kv.num_streams];
    v.segments_at = staging_.Reserve(int64_t{num_segments} * sizeof(SegmentView));
    v.segment_offsets_at =
        staging_.Append(kv.stream_segment_offsets, (int64_t{kv.num_streams} + 1) * sizeof(int32_t));
    v.token_offsets_at = staging_.Append(layout.token_offsets.data(),
                                         static_cast<int64_t>(layout.token_offsets.size()) * 8);
    return absl::OkStatus();
  }

  AttentionArgs DeviceArgs(const PagedKVView& kv, const StagedView& v, const StreamLayout& layout,
                           uint8_t* dev) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    const int32_t num_segments = kv.stream_segment_offsets[kv.num_streams];
    if (v.mirrored) {
      uint8_t* mirror = mirror_buf_.data();
      const ViewMirror::Update& u = mirror_update_;
      for (int32_t s = 0; s < num_segments; ++s) {
        const ViewMirror::Region& r = u.segments[static_cast<size_t>(s)];
        SegmentView dv = kv.segments[s];
        dv.pages = r.pages_at >= 0 ? reinterpret_cast<const int32_t*>(mirror + r.pages_at) : nullptr;
        dv.key_channels = r.key_channels_at >= 0
                              ? reinterpret_cast<const int32_t*>(mirror + r.key_channels_at)
                              : nullptr;
        dv.positions = nullptr;
        dv.modalities = nullptr;
        dv.scores = nullptr;
        staging_.At<SegmentView>(v.segments_at)[s] = dv;
      }
      for (int32_t j = 0; j < v.num_copies; ++j) {
        const ViewMirror::Copy& c = u.copies[static_cast<size_t>(j)];
        MirrorCopy& job = staging_.At<MirrorCopy>(v.copies_at)[j];
        job.src = reinterpret_cast<const int32_t*>(dev + v.values_at) + c.value;
        job.dst = reinterpret_cast<int32_t*>(mirror + c.at);
        job.count = c.count;
      }
    } else {
      for (int32_t s = 0; s < num_segments; ++s) {
        staging_.At<SegmentView>(v.segments_at)[s] =
            DeviceSegment(kv.segments[s], v.arrays[s], dev);
      }
    }
    AttentionArgs args;
    args.pool = kv.pool;
    args.head_dim = kv.head_dim;
    args.num_streams = kv.num_streams;
    args.stream_segment_offsets = reinterpret_cast<const int32_t*>(dev + v.segment_offsets_at);
    args.segments = reinterpret_cast<const SegmentView*>(dev + v.segments_at);
    args.stream_token_offsets = reinterpret_cast<const int64_t*>(dev + v.token_offsets_at);
    args.max_stream_length = layout.max_length;
    return args;
  }

  // Start of every device operation on `stream`: the calling thread may have another device
  // current, and a previous asynchronous failure must not be blamed on this call. inputs_ and
  // work_ are shared by every call, so `stream` first waits for the earlier users that may
  // still run on other streams:
  //   - a device-tensor decode on a caller's stream (recorded in buffers_free_ right after it,
  //     since the caller may destroy its stream later);
  //   - work left on the backend's own stream by an operation that failed before its Finish
  //     (recorded now in own_done_: stream_ lives as long as the backend).
  absl::Status Begin(cudaStream_t stream) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (cudaError_t e = cudaSetDevice(device_); e != cudaSuccess) return CudaError(e, "set device");
    if (own_pending_ && stream != stream_) {
      if (cudaError_t e = cudaEventRecord(own_done_, stream_); e != cudaSuccess) {
        return CudaError(e, "record the backend stream's work");
      }
      if (cudaError_t e = cudaStreamWaitEvent(stream, own_done_, 0); e != cudaSuccess) {
        return CudaError(e, "wait for the backend stream's work");
      }
    }
    if (in_flight_ && stream != in_flight_stream_) {
      if (cudaError_t e = cudaStreamWaitEvent(stream, buffers_free_, 0); e != cudaSuccess) {
        return CudaError(e, "wait for the previous decode's stream");
      }
    }
    if (stream == stream_) own_pending_ = true;
    return absl::OkStatus();
  }
  absl::Status Upload(absl::string_view what, cudaStream_t stream = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (staging_.size() == 0) return absl::OkStatus();
    if (cudaError_t e =
            cudaMemcpyAsync(inputs_.data(), staging_.data(), static_cast<size_t>(staging_.size()),
                            cudaMemcpyHostToDevice, stream != nullptr ? stream : stream_);
        e != cudaSuccess) {
      return CudaError(e, what);
    }
    return absl::OkStatus();
  }
  absl::Status Download(void* host, const void* device, int64_t bytes, absl::string_view what,
                        cudaStream_t stream = nullptr) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (host == nullptr || bytes == 0) return absl::OkStatus();
    if (cudaError_t e =
            cudaMemcpyAsync(host, device, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost,
                            stream != nullptr ? stream : stream_);
        e != cudaSuccess) {
      return CudaError(e, what);
    }
    return absl::OkStatus();
  }
  // Waits for `stream` (stream_ when null): results are on the host, the staging blob may be
  // reused, and every earlier user of the buffers is done (Begin made `stream` wait for it).
  absl::Status Finish(absl::string_view what, cudaStream_t stream = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (stream == nullptr) stream = stream_;
    if (cudaError_t e = cudaStreamSynchronize(stream); e != cudaSuccess) {
      return CudaError(e, what);
    }
    in_flight_ = false;
    if (stream == stream_) own_pending_ = false;
    return absl::OkStatus();
  }
  // End of a device-tensor decode on `stream` (asynchronous, or failed after enqueueing
  // something): records when the buffers are free again.
  absl::Status Enqueued(absl::string_view what, cudaStream_t stream)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (cudaError_t e = cudaEventRecord(buffers_free_, stream); e != cudaSuccess) {
      return CudaError(e, what);
    }
    in_flight_ = true;
    in_flight_stream_ = stream;
    return absl::OkStatus();
  }

  const int device_;
  const int num_sms_;
  cudaStream_t stream_;
  // Recorded after the last device-tensor decode, on its stream; valid while in_flight_.
  cudaEvent_t buffers_free_;
  // Recorded on stream_ when a call on another stream must wait for it (own_pending_).
  cudaEvent_t own_done_;
  absl::Mutex mu_;
  bool in_flight_ ABSL_GUARDED_BY(mu_) = false;
  cudaStream_t in_flight_stream_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool own_pending_ ABSL_GUARDED_BY(mu_) = false;  // stream_ may have unfinished work
  StagingBlob staging_ ABSL_GUARDED_BY(mu_);
  DeviceBuffer inputs_ ABSL_GUARDED_BY(mu_);  // mirrored host arrays and source rows
  DeviceBuffer work_ ABSL_GUARDED_BY(mu_);    // outputs and scratch
  // The view mirror (view_mirror.h): decode page tables and key channel maps by stream version.
  // Written only by LaunchMirrorCopies on the stream of the call that planned the copies, after
  // Begin's waits: every call is ordered after the previous one (same stream: stream order;
  // another stream: buffers_free_ / own_done_; host calls synchronise), so a region rewritten in
  // place (a copy-on-write page id, pages appended into spare room, a region reused after a
  // reset) is never read by a kernel of an earlier call still running.
  const bool mirror_enabled_;
  ViewMirror mirror_ ABSL_GUARDED_BY(mu_);
  ViewMirror::Update mirror_update_ ABSL_GUARDED_BY(mu_);
  DeviceBuffer mirror_buf_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend() {
  int count = 0;
  if (cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess) {
    cudaGetLastError();  // clear it so that later, unrelated runtime calls do not report it
    return absl::UnavailableError(
        absl::StrCat("cuda backend: no usable CUDA device: ", cudaGetErrorName(e), " (",
                     cudaGetErrorString(e), ")"));
  }
  if (count == 0) return absl::UnavailableError("cuda backend: no CUDA device is present");
  int device = 0;
  if (cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) {
    return CudaError(e, "cudaGetDevice");
  }
  if (cudaError_t e = cudaSetDevice(device); e != cudaSuccess) return CudaError(e, "set device");
  int num_sms = 0;
  if (cudaError_t e = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
      e != cudaSuccess) {
    return CudaError(e, "multiprocessor count");
  }
  cudaStream_t stream = nullptr;
  if (cudaError_t e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking); e != cudaSuccess) {
    return CudaError(e, "stream creation");
  }
  cudaEvent_t events[2] = {nullptr, nullptr};  // buffers_free, own_done
  for (int i = 0; i < 2; ++i) {
    if (cudaError_t e = cudaEventCreateWithFlags(&events[i], cudaEventDisableTiming);
        e != cudaSuccess) {
      if (i == 1) cudaEventDestroy(events[0]);
      cudaStreamDestroy(stream);
      return CudaError(e, "event creation");
    }
  }
  return std::unique_ptr<Backend>(new CudaBackend(device, num_sms, stream, events[0], events[1]));
}

}  // namespace kvcache::KVCACHE_CUDA_NAMESPACE
