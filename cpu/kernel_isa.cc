// Run-time instruction-set detection and the process-wide cap (kvcache/internal/kernel_isa.h).
#include "kvcache/internal/kernel_isa.h"

#include <algorithm>
#include <atomic>

namespace kvcache::cpu {
namespace {

std::atomic<int> isa_cap{static_cast<int>(KernelIsa::kAvx512)};

}  // namespace

KernelIsa BestKernelIsa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const KernelIsa best = [] {
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    return avx512 ? KernelIsa::kAvx512 : avx2 ? KernelIsa::kAvx2 : KernelIsa::kPortable;
  }();
  return best;
#else
  return KernelIsa::kPortable;  // the kernels are multiversioned only for GCC on x86-64
#endif
}

KernelIsa LimitKernelIsa(KernelIsa cap) {
  isa_cap.store(static_cast<int>(cap), std::memory_order_relaxed);
  return ActiveKernelIsa();
}

KernelIsa ActiveKernelIsa() {
  return static_cast<KernelIsa>(
      std::min(static_cast<int>(BestKernelIsa()), isa_cap.load(std::memory_order_relaxed)));
}

const char* KernelIsaName(KernelIsa isa) {
  switch (isa) {
    case KernelIsa::kPortable: return "portable";
    case KernelIsa::kAvx2: return "avx2";
    case KernelIsa::kAvx512: return "avx512";
  }
  return "unknown";
}

}  // namespace kvcache::cpu
