// kvcache/internal/kernel_isa.h — which instruction set the CPU kernels may use (internal).
//
// One run-time detection for every multiversioned CPU kernel (decode and row scoring in
// cpu/attention_fast.cc, Quest bounds and exact retrieval scans in cpu/sparse_decode.cc, the
// similarity tiles in src/policy/similarity.cc), and one process-wide cap that tests and
// benchmarks lower to run each code path on one machine. Kernels ask ActiveKernelIsa() when they
// pick their code, so the cap holds everywhere.
//
// Example:
//   if (kvcache::cpu::ActiveKernelIsa() >= kvcache::cpu::KernelIsa::kAvx2) { /* AVX2 copy */ }
//   kvcache::cpu::LimitKernelIsa(kvcache::cpu::KernelIsa::kPortable);   // tests: portable only
#ifndef KVCACHE_INTERNAL_KERNEL_ISA_H_
#define KVCACHE_INTERNAL_KERNEL_ISA_H_

namespace kvcache::cpu {

// The instruction sets the kernels have code for, in increasing order: portable (SSE2 on x86-64),
// AVX2 + FMA + F16C, AVX-512 F/BW/VL/DQ (+ the AVX2 set).
enum class KernelIsa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The best instruction set this CPU supports (detected once).
KernelIsa BestKernelIsa();
// Testing and benchmarking hook: the kernels use at most `cap` (a cap above what the CPU supports
// has no effect). Returns the instruction set now in use. Process-wide; not meant to be changed
// while kernels run on other threads.
KernelIsa LimitKernelIsa(KernelIsa cap);
// min(BestKernelIsa(), cap): what the kernels use now.
KernelIsa ActiveKernelIsa();
// "portable", "avx2", "avx512".
const char* KernelIsaName(KernelIsa isa);

}  // namespace kvcache::cpu

#endif  // KVCACHE_INTERNAL_KERNEL_ISA_H_
