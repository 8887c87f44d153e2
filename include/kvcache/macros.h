// kvcache/macros.h — portability and debug-check macros shared by host and device code.
//
// KVC_HOST_DEVICE marks inline functions that both the CPU backend and CUDA kernels call (the
// online-softmax step, dtype conversion, page address math). Debug checks come in tiers that
// compile away in release builds (mimalloc style):
//   KVC_DCHECK(cond)            cheap invariant, on when NDEBUG is not defined
//   KVC_DCHECK_EXPENSIVE(cond)  O(n) invariant, on only with KVCACHE_EXPENSIVE_CHECKS
//
// Example:
//   KVC_HOST_DEVICE inline int CeilDiv(int a, int b) { return (a + b - 1) / b; }
#ifndef KVCACHE_MACROS_H_
#define KVCACHE_MACROS_H_

#include <cstdio>
#include <cstdlib>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KVC_HOST_DEVICE __host__ __device__
#else
#define KVC_HOST_DEVICE
#endif

#if !defined(NDEBUG) && !defined(__CUDA_ARCH__)
#define KVC_DCHECK(cond)                                                                  \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "%s:%d: KVC_DCHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                       \
    }                                                                                     \
  } while (0)
#else
#define KVC_DCHECK(cond) \
  do {                   \
  } while (0)
#endif

#if defined(KVCACHE_EXPENSIVE_CHECKS)
#define KVC_DCHECK_EXPENSIVE(cond) KVC_DCHECK(cond)
#else
#define KVC_DCHECK_EXPENSIVE(cond) \
  do {                             \
  } while (0)
#endif

namespace kvcache {

KVC_HOST_DEVICE inline constexpr long long CeilDiv(long long a, long long b) {
  return (a + b - 1) / b;
}

}  // namespace kvcache

#endif  // KVCACHE_MACROS_H_
