// cuda/emulation/cuda_emulation.h — the CUDA language on the host compiler (internal): include it
// first, then a .cu file, to compile that file's kernels with g++ and run them on the CPU
// (cuda/emulation/kernels_emulated.cc does exactly that for cuda/kernels.cu).
//
// What it provides, and how:
//   - the toolkit's own host-compilable headers (cuda_runtime_api.h for types and enums,
//     cuda_fp16.h / cuda_bf16.h for __half and __nv_bfloat16 and their conversions);
//   - __global__ / __device__ / __host__ / __launch_bounds__ as nothing; __shared__ as a
//     function-local static: one instance per kernel instantiation, which the fibers of the
//     running block share (launches are serialised, see simt.h). Shared memory is not
//     re-initialised between blocks; like on a GPU, its contents at block start are undefined;
//   - threadIdx / blockIdx / blockDim / gridDim / warpSize of the running fiber;
//   - __syncthreads(), __syncwarp() and __shfl{,_up,_down,_xor}_sync() as scheduling rounds
//     (simt.h), each identified by its call site;
//   - atomics (atomicAdd / atomicMax / atomicMin / atomicExch / atomicCAS): plain read-modify-
//     write, exact because fibers only switch at synchronisation points and blocks run one
//     after another;
//   - intrinsics: __fadd_rn / __fmul_rn / __fsub_rn (IEEE round-to-nearest; the target is built
//     with -ffp-contract=off so nothing is fused), __uint_as_float, __float_as_uint, ...;
//   - the runtime calls of runtime.h under their CUDA names (cudaMalloc -> cuda_emu::Malloc),
//     stream capture and graphs included;
//   - KVCACHE_LAUNCH (cuda/launch.cuh) as a synchronous emulated launch.
#ifndef KVCACHE_CUDA_EMULATION_CUDA_EMULATION_H_
#define KVCACHE_CUDA_EMULATION_CUDA_EMULATION_H_

#if defined(__CUDACC__)
#error "cuda_emulation.h is for the host compiler; nvcc compiles the kernels natively"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_types.h>

#include <cstdint>
#include <cstring>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda/emulation/runtime.h"
#include "cuda/emulation/simt.h"

#define KVCACHE_CUDA_EMULATION 1

// ---- Execution-space keywords -------------------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __launch_bounds__(...)

// ---- Built-in variables -------------------------------------------------------------------------
#define threadIdx (::kvcache::cuda_emu::CurrentThreadIdx())
#define blockIdx (::kvcache::cuda_emu::CurrentBlockIdx())
#define blockDim (::kvcache::cuda_emu::CurrentBlockDim())
#define gridDim (::kvcache::cuda_emu::CurrentGridDim())
#define warpSize (::kvcache::cuda_emu::kWarpSize)

// ---- Synchronisation and warp primitives --------------------------------------------------------
inline void __syncthreads(std::source_location where = std::source_location::current()) {
  ::kvcache::cuda_emu::SyncThreads(where);
}
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu,
                       std::source_location where = std::source_location::current()) {
  ::kvcache::cuda_emu::WarpExchange(::kvcache::cuda_emu::WarpOp::kSyncWarp, mask, 0, 0,
                                    ::kvcache::cuda_emu::kWarpSize, where);
}

namespace kvcache::cuda_emu {
template <typename T>
T Shuffle(WarpOp op, unsigned mask, T var, int arg, int width, std::source_location where) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= sizeof(uint64_t),
                "warp shuffles move values of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = WarpExchange(op, mask, bits, arg, width, where);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace kvcache::cuda_emu

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
              std::source_location where = std::source_location::current()) {
  return ::kvcache::cuda_emu::Shuffle(::kvcache::cuda_emu::WarpOp::kShflIdx, mask, var, src_lane,
                                      width, where);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                 std::source_location where = std::source_location::current()) {
  return ::kvcache::cuda_emu::Shuffle(::kvcache::cuda_emu::WarpOp::kShflUp, mask, var,
                                      static_cast<int>(delta), width, where);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                   std::source_location where = std::source_location::current()) {
  return ::kvcache::cuda_emu::Shuffle(::kvcache::cuda_emu::WarpOp::kShflDown, mask, var,
                                      static_cast<int>(delta), width, where);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  std::source_location where = std::source_location::current()) {
  return ::kvcache::cuda_emu::Shuffle(::kvcache::cuda_emu::WarpOp::kShflXor, mask, var, lane_mask,
                                      width, where);
}

// ---- Atomics ------------------------------------------------------------------------------------
template <typename T>
T atomicAdd(T* address, T value) {
  static_assert(std::is_arithmetic_v<T>, "atomicAdd takes an arithmetic type");
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomicMax(T* address, T value) {
  const T old = *address;
  *address = value > old ? value : old;
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  const T old = *address;
  *address = value < old ? value : old;
  return old;
}
template <typename T>
T atomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  const T old = *address;
  if (old == compare) *address = value;
  return old;
}

// ---- Intrinsics ---------------------------------------------------------------------------------
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned x;
  std::memcpy(&x, &f, sizeof(x));
  return x;
}
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof(f));
  return f;
}
inline int __float_as_int(float f) {
  int x;
  std::memcpy(&x, &f, sizeof(x));
  return x;
}
// Single IEEE operations, never fused with a neighbour (-ffp-contract=off on the target).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }

// ---- Runtime ------------------------------------------------------------------------------------
#define cudaMalloc ::kvcache::cuda_emu::Malloc
#define cudaFree ::kvcache::cuda_emu::Free
#define cudaMemcpy ::kvcache::cuda_emu::Memcpy
#define cudaMemcpyAsync ::kvcache::cuda_emu::MemcpyAsync
#define cudaMemsetAsync ::kvcache::cuda_emu::MemsetAsync
#define cudaStreamCreate ::kvcache::cuda_emu::StreamCreate
#define cudaStreamCreateWithFlags ::kvcache::cuda_emu::StreamCreateWithFlags
#define cudaStreamDestroy ::kvcache::cuda_emu::StreamDestroy
#define cudaStreamSynchronize ::kvcache::cuda_emu::StreamSynchronize
#define cudaDeviceSynchronize ::kvcache::cuda_emu::DeviceSynchronize
#define cudaEventCreate ::kvcache::cuda_emu::EventCreate
#define cudaEventCreateWithFlags ::kvcache::cuda_emu::EventCreateWithFlags
#define cudaEventDestroy ::kvcache::cuda_emu::EventDestroy
#define cudaEventRecord ::kvcache::cuda_emu::EventRecord
#define cudaEventSynchronize ::kvcache::cuda_emu::EventSynchronize
#define cudaStreamWaitEvent ::kvcache::cuda_emu::StreamWaitEvent
#define cudaPointerGetAttributes ::kvcache::cuda_emu::PointerGetAttributes
#define cudaGetDeviceCount ::kvcache::cuda_emu::GetDeviceCount
#define cudaGetDevice ::kvcache::cuda_emu::GetDevice
#define cudaSetDevice ::kvcache::cuda_emu::SetDevice
#define cudaDeviceGetAttribute ::kvcache::cuda_emu::DeviceGetAttribute
#define cudaGetLastError ::kvcache::cuda_emu::GetLastError
#define cudaPeekAtLastError ::kvcache::cuda_emu::PeekAtLastError
#define cudaGetErrorName ::kvcache::cuda_emu::GetErrorName
#define cudaGetErrorString ::kvcache::cuda_emu::GetErrorString
#define cudaStreamBeginCapture ::kvcache::cuda_emu::StreamBeginCapture
#define cudaStreamEndCapture ::kvcache::cuda_emu::StreamEndCapture
#define cudaStreamIsCapturing ::kvcache::cuda_emu::StreamIsCapturing
#define cudaGraphInstantiate ::kvcache::cuda_emu::GraphInstantiate
#define cudaGraphLaunch ::kvcache::cuda_emu::GraphLaunch
#define cudaGraphExecDestroy ::kvcache::cuda_emu::GraphExecDestroy
#define cudaGraphDestroy ::kvcache::cuda_emu::GraphDestroy

// ---- Launch -------------------------------------------------------------------------------------
namespace kvcache::cuda_emu {

inline Index3 ToIndex3(dim3 d) { return {d.x, d.y, d.z}; }

// KVCACHE_LAUNCH(grid, block, shmem, stream, kernel)(args...): converts the arguments to the
// kernel's parameter types once (as a launch copies them), then runs the grid synchronously.
// Errors of the configuration are reported through cudaGetLastError, as on a GPU.
template <typename... P>
class KernelLaunch {
 public:
  KernelLaunch(void (*kernel)(P...), const char* name, dim3 grid, dim3 block, size_t shmem,
               cudaStream_t stream)
      : kernel_(kernel), name_(name), grid_(grid), block_(block), shmem_(shmem), stream_(stream) {}

  template <typename... A>
  void operator()(A&&... args) const {
    struct Context {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
      const char* name;
      dim3 grid, block;
    };
    auto* ctx = new Context{kernel_, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...),
                            name_, grid_, block_};
    auto run = [](void* c) {
      auto* context = static_cast<Context*>(c);
      const LaunchStatus status = RunGrid(
          ToIndex3(context->grid), ToIndex3(context->block), context->name,
          [](void* cc) {
            auto* inner = static_cast<Context*>(cc);
            std::apply(inner->kernel, inner->params);
          },
          c);
      if (status != LaunchStatus::kOk) SetLastError(cudaErrorInvalidConfiguration);
    };
    auto destroy = [](void* c) { delete static_cast<Context*>(c); };
    if (shmem_ > 48 * 1024) {  // dynamic shared memory is not emulated; none of ours uses it
      destroy(ctx);
      SetLastError(cudaErrorInvalidValue);
      return;
    }
    if (!IsValidStream(stream_)) {  // a destroyed or made-up stream fails the launch on a GPU
      destroy(ctx);
      SetLastError(cudaErrorInvalidResourceHandle);
      return;
    }
    // A capturing stream records the launch with its converted parameters (GraphLaunch runs it).
    if (RecordIfCapturing(stream_, run, ctx, destroy)) return;
    run(ctx);
    destroy(ctx);
  }

 private:
  void (*kernel_)(P...);
  const char* name_;
  dim3 grid_, block_;
  size_t shmem_;
  cudaStream_t stream_;
};

}  // namespace kvcache::cuda_emu

#endif  // KVCACHE_CUDA_EMULATION_CUDA_EMULATION_H_
