// cpu/cpu_backend.h — the CPU backend (internal): host memory arena, row writes, compaction,
// and the attention kernels of cpu/attention.h.
//
// Two flavours share everything but the attention kernels: kFast (oneTBB-parallel, vectorised)
// is registered as "cpu"; kReference (scalar, the test oracle) as "cpu-reference".
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
