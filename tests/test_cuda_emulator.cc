// Tests of the CUDA emulator itself (cuda/emulation/): warp shuffles return what the CUDA
// documentation says, barriers order shared memory, the reverse thread order exposes a missing
// barrier, misuse (divergent barriers, a warp split between a shuffle and a barrier, partial
// masks, a barrier some threads left) aborts with a message naming the call sites, and the
// emulated runtime rejects copies whose direction does not match their pointers. Built only with
// the emulated backend (KVCACHE_CUDA_EMULATED).
#include "cuda/emulation/cuda_emulation.h"
// (cuda_emulation.h must come first.)
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include "cuda/launch.cuh"

namespace {

using kvcache::cuda_emu::ThreadOrder;

// ---- Kernels ------------------------------------------------------------------------------------

// out[t] for each shuffle flavour, lane l = t % 32 holding the value 100 * warp + l.
__global__ void ShuffleKernel(int* out) {
  const int t = threadIdx.x;
  const int v = 100 * (t / 32) + t % 32;
  out[0 * 128 + t] = __shfl_xor_sync(0xFFFFFFFFu, v, 5);
  out[1 * 128 + t] = __shfl_down_sync(0xFFFFFFFFu, v, 3);
  out[2 * 128 + t] = __shfl_up_sync(0xFFFFFFFFu, v, 2, 8);
  out[3 * 128 + t] = __shfl_sync(0xFFFFFFFFu, v, 7, 16);
}

// Each thread writes its slot, then (after the barrier when `barrier`) reads its neighbour's.
__global__ void NeighbourKernel(int* out, bool barrier, int round) {
  __shared__ int slots[128];
  const int t = threadIdx.x;
  slots[t] = round * 1000 + t;
  if (barrier) __syncthreads();
  out[t] = slots[(t + 1) % 128];
}

// Sum of in[0..n) with warp shuffles and a shared-memory step, added atomically to *out.
__global__ void SumKernel(const float* in, int n, float* out) {
  __shared__ float warp_sums[4];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? in[i] : 0.0f;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(out, warp_sums[0] + warp_sums[1] + warp_sums[2] + warp_sums[3]);
  }
}

__global__ void DivergentBarriers(int* unused) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void ShuffleAgainstBarrier(int* unused) {
  int v = 1;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  __syncthreads();
}

__global__ void PartialMask(int* unused) {
  int v = 1;
  v = __shfl_xor_sync(0x0000FFFFu, v, 1);
}

__global__ void ExitBeforeBarrier(int* unused) {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

// ---- Helpers ------------------------------------------------------------------------------------

struct DeviceInts {
  explicit DeviceInts(size_t n) : size(n) {
    REQUIRE(cudaMalloc(reinterpret_cast<void**>(&data), n * sizeof(int)) == cudaSuccess);
    REQUIRE(cudaMemsetAsync(data, 0, n * sizeof(int), nullptr) == cudaSuccess);
  }
  ~DeviceInts() { cudaFree(data); }
  std::vector<int> Read() const {
    std::vector<int> host(size);
    REQUIRE(cudaMemcpyAsync(host.data(), data, size * sizeof(int), cudaMemcpyDeviceToHost,
                            nullptr) == cudaSuccess);
    return host;
  }
  int* data = nullptr;
  size_t size;
};

// Runs `launch` in a child process; returns its stderr, and whether it died of SIGABRT.
template <typename F>
std::string RunInChild(F launch, bool* aborted) {
  int fds[2];
  REQUIRE(pipe(fds) == 0);
  std::fflush(nullptr);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    std::signal(SIGABRT, SIG_DFL);  // not Catch2's fatal-condition handler
    dup2(fds[1], 2);
    close(fds[0]);
    launch();
    _exit(0);
  }
  close(fds[1]);
  std::string err;
  char buffer[4096];
  for (ssize_t n; (n = read(fds[0], buffer, sizeof(buffer))) > 0;) err.append(buffer, n);
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  *aborted = WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
  return err;
}

// ---- Tests --------------------------------------------------------------------------------------

TEST_CASE("cuda emulator: warp shuffles follow the CUDA definitions", "[cuda-emulator]") {
  const ThreadOrder order = GENERATE(ThreadOrder::kForward, ThreadOrder::kReverse);
  kvcache::cuda_emu::SetThreadOrder(order);
  DeviceInts out(4 * 128);
  KVCACHE_LAUNCH(1, 128, 0, nullptr, ShuffleKernel)(out.data);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  const std::vector<int> got = out.Read();
  for (int t = 0; t < 128; ++t) {
    const int warp = 100 * (t / 32), l = t % 32;
    INFO("thread " << t);
    CHECK(got[0 * 128 + t] == warp + (l ^ 5));
    CHECK(got[1 * 128 + t] == warp + (l + 3 < 32 ? l + 3 : l));  // beyond the warp: own value
    CHECK(got[2 * 128 + t] == warp + (l % 8 >= 2 ? l - 2 : l));  // segments of 8 lanes
    CHECK(got[3 * 128 + t] == warp + (l / 16) * 16 + 7);         // lane 7 of each 16
  }
  kvcache::cuda_emu::SetThreadOrder(ThreadOrder::kForward);
}

TEST_CASE("cuda emulator: barriers order shared memory, reverse order shows a missing one",
          "[cuda-emulator]") {
  DeviceInts out(128);
  std::vector<std::vector<int>> without_barrier;
  int round = 0;
  for (ThreadOrder order : {ThreadOrder::kForward, ThreadOrder::kReverse}) {
    kvcache::cuda_emu::SetThreadOrder(order);
    ++round;
    KVCACHE_LAUNCH(1, 128, 0, nullptr, NeighbourKernel)(out.data, true, round);
    std::vector<int> got = out.Read();
    for (int t = 0; t < 128; ++t) CHECK(got[t] == round * 1000 + (t + 1) % 128);
    ++round;
    KVCACHE_LAUNCH(1, 128, 0, nullptr, NeighbourKernel)(out.data, false, round);
    without_barrier.push_back(out.Read());
    // Fibers only switch at synchronisation points, so without the barrier every thread ran to
    // its end before (forward) or after (reverse) its neighbour wrote: a stale read in at least
    // one of the two orders.
    int stale = 0;
    for (int t = 0; t < 128; ++t) {
      stale += without_barrier.back()[t] != round * 1000 + (t + 1) % 128;
    }
    if (order == ThreadOrder::kForward) {
      CHECK(stale == 127);  // thread 127 reads slot 0, written before it ran
    } else {
      CHECK(stale == 1);  // thread 127 read slot 0 before thread 0 ran
    }
  }
  kvcache::cuda_emu::SetThreadOrder(ThreadOrder::kForward);
}

TEST_CASE("cuda emulator: a grid reduction with shuffles, shared memory and atomics",
          "[cuda-emulator]") {
  const ThreadOrder order = GENERATE(ThreadOrder::kForward, ThreadOrder::kReverse);
  kvcache::cuda_emu::SetThreadOrder(order);
  const int n = 1000;
  std::vector<float> host(n);
  float want = 0.0f;
  for (int i = 0; i < n; ++i) want += host[i] = static_cast<float>(i % 9);
  float* in = nullptr;
  float* sum = nullptr;
  REQUIRE(cudaMalloc(reinterpret_cast<void**>(&in), n * sizeof(float)) == cudaSuccess);
  REQUIRE(cudaMalloc(reinterpret_cast<void**>(&sum), sizeof(float)) == cudaSuccess);
  REQUIRE(cudaMemcpyAsync(in, host.data(), n * sizeof(float), cudaMemcpyHostToDevice, nullptr) ==
          cudaSuccess);
  REQUIRE(cudaMemsetAsync(sum, 0, sizeof(float), nullptr) == cudaSuccess);
  KVCACHE_LAUNCH((n + 127) / 128, 128, 0, nullptr, SumKernel)(in, n, sum);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  float got = 0.0f;
  REQUIRE(cudaMemcpyAsync(&got, sum, sizeof(float), cudaMemcpyDeviceToHost, nullptr) ==
          cudaSuccess);
  CHECK(got == want);  // small integers: exact in any order
  cudaFree(in);
  cudaFree(sum);
  kvcache::cuda_emu::SetThreadOrder(ThreadOrder::kForward);
}

TEST_CASE("cuda emulator: launch configuration errors are reported by cudaGetLastError",
          "[cuda-emulator]") {
  KVCACHE_LAUNCH(1, 2048, 0, nullptr, SumKernel)(nullptr, 0, nullptr);  // > 1024 threads
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
  KVCACHE_LAUNCH(dim3(1, 70000), 128, 0, nullptr, SumKernel)(nullptr, 0, nullptr);
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration);
  CHECK(cudaGetLastError() == cudaSuccess);  // reading it cleared it
}

TEST_CASE("cuda emulator: misuse of barriers and warp primitives aborts naming the call sites",
          "[cuda-emulator]") {
  struct Case {
    void (*kernel)(int*);
    const char* expected;
  };
  const Case c = GENERATE(
      Case{DivergentBarriers, "threads reached different __syncthreads() calls"},
      Case{ShuffleAgainstBarrier, "no barrier or warp round can complete"},
      Case{PartialMask, "partial warp masks are not supported"},
      Case{ExitBeforeBarrier, "some threads exited while others wait at __syncthreads()"});
  bool aborted = false;
  const std::string err =
      RunInChild([&] { KVCACHE_LAUNCH(1, 128, 0, nullptr, *c.kernel)(nullptr); }, &aborted);
  INFO(err);
  CHECK(aborted);
  CHECK(err.find(c.expected) != std::string::npos);
  CHECK(err.find("test_cuda_emulator.cc:") != std::string::npos);  // the call site
}

TEST_CASE("cuda emulator: copies must match their direction", "[cuda-emulator]") {
  int host[4] = {1, 2, 3, 4};
  int* device = nullptr;
  REQUIRE(cudaMalloc(reinterpret_cast<void**>(&device), sizeof(host)) == cudaSuccess);
  CHECK(reinterpret_cast<uintptr_t>(device) % 256 == 0);
  CHECK(cudaMemcpyAsync(device, host, sizeof(host), cudaMemcpyHostToDevice, nullptr) ==
        cudaSuccess);
  CHECK(cudaMemcpyAsync(device, host, sizeof(host), cudaMemcpyDeviceToHost, nullptr) ==
        cudaErrorInvalidValue);
  CHECK(cudaMemcpyAsync(host, device, sizeof(host), cudaMemcpyHostToDevice, nullptr) ==
        cudaErrorInvalidValue);
  CHECK(cudaMemcpyAsync(device + 1, host, sizeof(host), cudaMemcpyHostToDevice, nullptr) ==
        cudaErrorInvalidValue);  // runs past the allocation
  CHECK(cudaMemsetAsync(host, 0, sizeof(host), nullptr) == cudaErrorInvalidValue);
  CHECK(cudaFree(host) == cudaErrorInvalidValue);
  CHECK(cudaFree(device) == cudaSuccess);
  cudaGetLastError();
}

}  // namespace
