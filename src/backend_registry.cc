// The backend registry: built-in backends plus any the user registers.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "cpu/cpu_backend.h"
#include "kvcache/backend.h"
#if KVCACHE_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif
#if KVCACHE_HAVE_CUDA_EMULATED
#include "cuda/emulation/emulated_backend.h"
#endif

namespace kvcache {
namespace {

struct Registry {
  absl::Mutex mu;
  std::map<std::string, BackendFactory> factories ABSL_GUARDED_BY(mu);
};

Registry& GetRegistry() {
  static Registry* registry = [] {
    auto* r = new Registry;
    absl::MutexLock lock(&r->mu);
    r->factories["cpu"] = [] { return cpu::CreateCpuBackend(cpu::KernelFlavor::kFast); };
    r->factories["cpu-reference"] = [] {
      return cpu::CreateCpuBackend(cpu::KernelFlavor::kReference);
    };
#if KVCACHE_HAVE_CUDA
    r->factories["cuda"] = [] { return cuda::CreateCudaBackend(); };
#endif
#if KVCACHE_HAVE_CUDA_EMULATED
    r->factories["cuda-emulated"] = [] { return cuda_emulated::CreateCudaBackend(); };
#endif
    return r;
  }();
  return *registry;
}

}  // namespace

absl::Status RegisterBackend(std::string name, BackendFactory factory) {
  if (name.empty()) return absl::InvalidArgumentError("backend name must not be empty");
  if (!factory) return absl::InvalidArgumentError(absl::StrCat("backend '", name, "' has no factory"));
  Registry& r = GetRegistry();
  absl::MutexLock lock(&r.mu);
  if (r.factories.count(name)) {
    return absl::AlreadyExistsError(absl::StrCat("backend '", name, "' is already registered"));
  }
  r.factories[std::move(name)] = std::move(factory);
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(std::string_view name) {
  Registry& r = GetRegistry();
  BackendFactory factory;
  {
    absl::MutexLock lock(&r.mu);
    auto it = r.factories.find(std::string(name));
    if (it == r.factories.end()) {
      std::vector<std::string> known;
      for (const auto& [n, f] : r.factories) known.push_back(n);
      return absl::NotFoundError(absl::StrCat("unknown backend '", std::string(name), "'; registered: ",
                                              absl::StrJoin(known, ", ")));
    }
    factory = it->second;
  }
  return factory();
}

const char* BackendOpName(BackendOp op) {
  switch (op) {
    case BackendOp::kDecodeAttention: return "DecodeAttention";
    case BackendOp::kSparseDecodeAttention: return "SparseDecodeAttention";
    case BackendOp::kKeyIndex: return "KeyIndex";
    case BackendOp::kScoreRows: return "ScoreRows";
    case BackendOp::kDeviceTensors: return "DeviceTensors";
  }
  return "unknown";
}

std::vector<std::string> RegisteredBackends() {
  Registry& r = GetRegistry();
  absl::MutexLock lock(&r.mu);
  std::vector<std::string> names;
  for (const auto& [n, f] : r.factories) names.push_back(n);
  return names;
}

}  // namespace kvcache
