// cpu/cpu_backend.h — the CPU backend (internal): host memory arena, row writes, compaction,
// and the attention kernels of cpu/attention.h.
//
// Two flavours share the arena and page copies: kFast (oneTBB-parallel, vectorised attention
// kernels and row conversions) is registered as "cpu"; kReference (scalar kernels and scalar
// per-element row conversions, the test oracle) as "cpu-reference". Both flavours' row writes,
// gathers and reads give bit-identical pool contents and outputs.
#ifndef KVCACHE_CPU_CPU_BACKEND_H_
#define KVCACHE_CPU_CPU_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "kvcache/backend.h"

namespace kvcache::cpu {

enum class KernelFlavor { kReference, kFast };

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(KernelFlavor flavor);

}  // namespace kvcache::cpu

#endif  // KVCACHE_CPU_CPU_BACKEND_H_
