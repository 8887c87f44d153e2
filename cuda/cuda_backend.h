// cuda/cuda_backend.h — the CUDA backend (internal): a cudaMalloc'd pool arena and the kernels of
// cuda/kernels.cuh behind the kvcache::Backend interface. Registered as "cuda" by the backend
// registry when the library is built with CUDA.
//
// The views the Cache hands a backend keep their small arrays (page ids, key channel maps,
// positions, score accumulators) in host memory; each call mirrors what its kernels need into a
// reusable device buffer. Every call runs on the backend's own stream and waits for it, so it is
// synchronous and the host arrays may change as soon as it returns, except a device-tensor
// decode (BackendOp::kDeviceTensors, DeviceDecodeAttention) without score accumulation: it is
// enqueued on the caller's stream (or the backend's) and returns at once; Synchronize(stream)
// waits (docs/ARCHITECTURE.md, "Device tensors, streams and what synchronises"). Calls are
// serialised by one lock (the Cache may call from several threads).
//
// Example:
//   absl::StatusOr<std::unique_ptr<kvcache::Backend>> b = kvcache::cuda::CreateCudaBackend();
//   if (!b.ok()) return b.status();   // Unavailable when there is no CUDA device
#ifndef KVCACHE_CUDA_CUDA_BACKEND_H_
#define KVCACHE_CUDA_CUDA_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "kvcache/backend.h"

#ifndef KVCACHE_CUDA_NAMESPACE  // cuda_emulated in the emulated build (see cuda/kernels.cuh)
#define KVCACHE_CUDA_NAMESPACE cuda
#endif

namespace kvcache::KVCACHE_CUDA_NAMESPACE {

// The backend on the calling thread's current CUDA device. Unavailable (naming the CUDA error)
// when no device or driver can be used.
[[nodiscard]] absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend();

}  // namespace kvcache::KVCACHE_CUDA_NAMESPACE

#endif  // KVCACHE_CUDA_CUDA_BACKEND_H_
