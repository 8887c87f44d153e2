// cuda/emulation/emulated_backend.h — the "cuda-emulated" backend (internal): cuda/cuda_backend.cc
// and cuda/kernels.cu compiled by the host compiler and run by the CPU emulator of this
// directory (docs/ARCHITECTURE.md, "The emulated CUDA backend"). It exists so that every CUDA
// kernel executes in CI without a GPU; it is slow (each CUDA thread is a fiber) and meant for
// tests, not for serving.
//
// Example:
//   absl::StatusOr<std::unique_ptr<kvcache::Backend>> b = kvcache::CreateBackend("cuda-emulated");
#ifndef KVCACHE_CUDA_EMULATION_EMULATED_BACKEND_H_
#define KVCACHE_CUDA_EMULATION_EMULATED_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "kvcache/backend.h"

namespace kvcache::cuda_emulated {

// Defined by cuda/cuda_backend.cc built with KVCACHE_CUDA_NAMESPACE=cuda_emulated.
[[nodiscard]] absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend();

}  // namespace kvcache::cuda_emulated

#endif  // KVCACHE_CUDA_EMULATION_EMULATED_BACKEND_H_
