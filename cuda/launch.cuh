// cuda/launch.cuh — the one way kernels of this directory are launched (internal).
//
//   KVCACHE_LAUNCH(grid, block, shared_bytes, stream, Kernel<...>)(arguments...);
//
// is Kernel<...><<<grid, block, shared_bytes, stream>>>(arguments...) under nvcc, and a
// synchronous launch on the CPU emulator (cuda/emulation/cuda_emulation.h) under the host
// compiler. The kernel comes last so that template arguments may contain commas.
#ifndef KVCACHE_CUDA_LAUNCH_CUH_
#define KVCACHE_CUDA_LAUNCH_CUH_

#if defined(__CUDACC__)
#define KVCACHE_LAUNCH(grid, block, shared_bytes, stream, ...) \
  __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#elif defined(KVCACHE_CUDA_EMULATION)
#define KVCACHE_LAUNCH(grid, block, shared_bytes, stream, ...)                         \
  ::kvcache::cuda_emu::KernelLaunch(&__VA_ARGS__, #__VA_ARGS__, dim3(grid), dim3(block), \
                                    shared_bytes, stream)
#else
#error "cuda/launch.cuh needs nvcc or cuda/emulation/cuda_emulation.h included first"
#endif

#endif  // KVCACHE_CUDA_LAUNCH_CUH_
