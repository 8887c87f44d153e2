// tests/cuda_test_util.h — what the [cuda] test binaries share: picking the CUDA backend under
// test ("cuda" on a GPU, else "cuda-emulated", else skip with CTest's code 4), the emulator's
// thread order per pass, and device memory / streams of that backend for device-tensor tests.
#ifndef KVCACHE_TESTS_CUDA_TEST_UTIL_H_
#define KVCACHE_TESTS_CUDA_TEST_UTIL_H_

#include <catch2/catch.hpp>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "kvcache/backend.h"
#if KVCACHE_HAVE_CUDA_EMULATED || KVCACHE_HAVE_CUDA_RUNTIME
#include <cuda_runtime_api.h>
#define KVCACHE_TEST_DEVICE_MEMORY 1  // DeviceMemory and TestStream below exist
#endif
#if KVCACHE_HAVE_CUDA_EMULATED
#include "cuda/emulation/runtime.h"
#include "cuda/emulation/simt.h"
#endif

namespace kvcache {

// "cuda" when a CUDA device can be used, else "cuda-emulated" when built, else "" (with the
// reason in *why).
inline std::string FindCudaBackend(std::string* why) {
  absl::StatusOr<std::unique_ptr<Backend>> real = CreateBackend("cuda");
  if (real.ok()) return "cuda";
  absl::StatusOr<std::unique_ptr<Backend>> emulated = CreateBackend("cuda-emulated");
  if (emulated.ok()) return "cuda-emulated";
  *why = real.status().ToString() + "; " + emulated.status().ToString();
  return "";
}

inline const std::string& CudaBackend() {
  static const std::string* name = [] {
    std::string why;
    auto* n = new std::string(FindCudaBackend(&why));
    if (n->empty()) {
      std::printf("SKIPPED: %s\n", why.c_str());
      std::fflush(stdout);
      std::exit(4);
    }
    std::printf("CUDA backend under test: %s\n", n->c_str());
    return n;
  }();
  return *name;
}

inline bool Emulated() { return CudaBackend() == "cuda-emulated"; }

// Call first in every [cuda] test case with `reverse` = GENERATE(false, true): exits with CTest's
// skip code when no CUDA backend exists, sets the emulator's thread order, and returns false for
// the reverse pass on a real device (nothing to reorder there), where the case returns at once.
inline bool UseCudaBackend(bool reverse) {
  const std::string& name = CudaBackend();
  if (name != "cuda-emulated") return !reverse;
#if KVCACHE_HAVE_CUDA_EMULATED
  cuda_emu::SetThreadOrder(reverse ? cuda_emu::ThreadOrder::kReverse
                                   : cuda_emu::ThreadOrder::kForward);
#endif
  return true;
}

// The start of every [cuda] test case (the generator must be in the test case itself).
#define KVCACHE_CUDA_CASE()                                         \
  const bool reverse_order = GENERATE(false, true);                 \
  INFO("thread order " << (reverse_order ? "reverse" : "forward")); \
  if (!UseCudaBackend(reverse_order)) return

#if KVCACHE_TEST_DEVICE_MEMORY
// ---- Device memory and streams of the backend under test ------------------------------------
// The real CUDA runtime on a GPU, the emulator's runtime under "cuda-emulated" (its allocations
// are what the emulated backend accepts as device memory).

inline cudaError_t TestMalloc(void** p, size_t bytes) {
#if KVCACHE_HAVE_CUDA_EMULATED
  if (Emulated()) return cuda_emu::Malloc(p, bytes);
#endif
#if KVCACHE_HAVE_CUDA_RUNTIME
  return cudaMalloc(p, bytes);
#else
  return cudaErrorNoDevice;
#endif
}

inline void TestFree(void* p) {
#if KVCACHE_HAVE_CUDA_EMULATED
  if (Emulated()) {
    cuda_emu::Free(p);
    return;
  }
#endif
#if KVCACHE_HAVE_CUDA_RUNTIME
  cudaFree(p);
#endif
}

// Synchronous in every respect: on a GPU the copy is followed by a device synchronisation,
// because a pageable host-to-device cudaMemcpy may return before its DMA lands and the
// backend's streams are non-blocking (no implicit ordering with the legacy default stream).
inline cudaError_t TestMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
#if KVCACHE_HAVE_CUDA_EMULATED
  if (Emulated()) return cuda_emu::Memcpy(dst, src, bytes, kind);
#endif
#if KVCACHE_HAVE_CUDA_RUNTIME
  if (cudaError_t e = cudaMemcpy(dst, src, bytes, kind); e != cudaSuccess) return e;
  return cudaDeviceSynchronize();
#else
  return cudaErrorNoDevice;
#endif
}

// `bytes` of device memory, freed on destruction.
class DeviceMemory {
 public:
  explicit DeviceMemory(size_t bytes) : bytes_(bytes) {
    REQUIRE(TestMalloc(&data_, bytes) == cudaSuccess);
  }
  ~DeviceMemory() { TestFree(data_); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  void* get() const { return data_; }
  size_t bytes() const { return bytes_; }
  void Upload(const void* host, size_t bytes) {
    REQUIRE(bytes <= bytes_);
    REQUIRE(TestMemcpy(data_, host, bytes, cudaMemcpyHostToDevice) == cudaSuccess);
  }
  void Download(void* host, size_t bytes) const {
    REQUIRE(bytes <= bytes_);
    REQUIRE(TestMemcpy(host, data_, bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
  }

 private:
  void* data_ = nullptr;
  size_t bytes_;
};

// A stream of the backend under test, destroyed on destruction.
class TestStream {
 public:
  TestStream() {
#if KVCACHE_HAVE_CUDA_EMULATED
    if (Emulated()) {
      REQUIRE(cuda_emu::StreamCreateWithFlags(&stream_, 1) == cudaSuccess);
      return;
    }
#endif
#if KVCACHE_HAVE_CUDA_RUNTIME
    REQUIRE(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking) == cudaSuccess);
#endif
  }
  ~TestStream() {
#if KVCACHE_HAVE_CUDA_EMULATED
    if (Emulated()) {
      cuda_emu::StreamDestroy(stream_);
      return;
    }
#endif
#if KVCACHE_HAVE_CUDA_RUNTIME
    cudaStreamDestroy(stream_);
#endif
  }
  TestStream(const TestStream&) = delete;
  TestStream& operator=(const TestStream&) = delete;
  void* get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// ---- Stream capture and graphs of the backend under test (global capture mode) ---------------
// The emulator's (cuda/emulation/runtime.h: records, refuses what a GPU refuses) or the real
// runtime's, so a capture test runs on both.
inline cudaError_t TestBeginCapture(cudaStream_t s) {
#if KVCACHE_HAVE_CUDA_EMULATED
  if (Emulated()) return cuda_emu::StreamBeginCapture(s, cudaStreamCaptureModeGlobal);
#endif
#if KVCACHE_HAVE_CUDA_RUNTIME
  return cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
#else
  return cudaErrorNoDevice;
#endif
}

inline cudaError_t TestEndCapture(cudaStream_t s, cudaGraph_t* graph) {
#if KVCACHE_HAVE_CUDA_EMULATED
  if (Emulated()) return cuda_emu::StreamEndCapture(s, graph);
#endif
#if KVCACHE_HAVE_CUDA_RUNTIME
  return cudaStreamEndCapture(s, graph);
#else
  return cudaErrorNoDevice;
#endif
}

inline cudaError_t TestGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph) {
#if KVCACHE_HAVE_CUDA_EMULATED
  if (Emulated()) return cuda_emu::GraphInstantiate(exec, graph);
#endif
#if KVCACHE_HAVE_CUDA_RUNTIME
  return cudaGraphInstantiate(exec, graph, 0);
#else
  return cudaErrorNoDevice;
#endif
}

inline cudaError_t TestGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
#if KVCACHE_HAVE_CUDA_EMULATED
  if (Emulated()) return cuda_emu::GraphLaunch(exec, s);
#endif
#if KVCACHE_HAVE_CUDA_RUNTIME
  return cudaGraphLaunch(exec, s);
#else
  return cudaErrorNoDevice;
#endif
}

inline cudaError_t TestGraphDestroy(cudaGraphExec_t exec, cudaGraph_t graph) {
#if KVCACHE_HAVE_CUDA_EMULATED
  if (Emulated()) {
    if (cudaError_t e = cuda_emu::GraphExecDestroy(exec); e != cudaSuccess) return e;
    return cuda_emu::GraphDestroy(graph);
  }
#endif
#if KVCACHE_HAVE_CUDA_RUNTIME
  if (cudaError_t e = cudaGraphExecDestroy(exec); e != cudaSuccess) return e;
  return cudaGraphDestroy(graph);
#else
  return cudaErrorNoDevice;
#endif
}

#endif  // KVCACHE_TEST_DEVICE_MEMORY

}  // namespace kvcache

#endif  // KVCACHE_TESTS_CUDA_TEST_UTIL_H_
