// kvcache/backend.h — the user face of the compute backends: create one by name, list them,
// register more, and the names of the optional operations a backend may support.
//
// A backend owns device memory for the page pool and runs the kernels over the paged layout
// described in paged_view.h. Implementers write against backend_impl.h (the Backend interface
// and its request structs); this header includes it at the end so that a
// std::unique_ptr<Backend> is a complete type for its users and code that implemented a backend
// against this header keeps compiling.
//
// Example:
//   absl::StatusOr<std::unique_ptr<kvcache::Backend>> b = kvcache::CreateBackend("cpu");
//   if (!b.ok()) return b.status();
//   bool sparse = (*b)->Supports(kvcache::BackendOp::kSparseDecodeAttention);   // true on cpu
//   std::vector<std::string> names = kvcache::RegisteredBackends();   // {"cpu", ...}
#ifndef KVCACHE_BACKEND_H_
#define KVCACHE_BACKEND_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvcache {

// How the G query heads of a kv head combine into one score per token (ALGORITHMS.md: mean).
enum class GqaAggregation : uint8_t { kMean = 0, kSum = 1, kMax = 2 };

// The optional operations of a backend (Backend::Supports). Memory, page copies, row writes,
// gathers and read-back are mandatory and not listed.
enum class BackendOp : uint8_t {
  kDecodeAttention = 0,        // dense decode attention
  kSparseDecodeAttention = 1,  // Quest / retrieval read policies
  kKeyIndex = 2,               // CreateKeyIndex (retrieval without exact_search)
  kScoreRows = 3,              // prefill-time row scoring
  // q / out / lse of a dense decode and the K/V of Append in the backend's device memory
  // (TensorRef::OnDevice), an optional stream handle, Synchronize (the CUDA backend).
  kDeviceTensors = 4,
};
// "DecodeAttention", "SparseDecodeAttention", "KeyIndex", "ScoreRows", "DeviceTensors".
const char* BackendOpName(BackendOp op);

class Backend;  // backend_impl.h

using BackendFactory = std::function<absl::StatusOr<std::unique_ptr<Backend>>()>;

// Registers a backend by name. Built in: "cpu" (the fast kernels), "cpu-reference" (the scalar
// oracle kernels) and "cuda" when built with CUDA. Returns AlreadyExists for a duplicate name.
absl::Status RegisterBackend(std::string name, BackendFactory factory);
// Creates a backend by name; NotFound names the unknown backend and lists the known ones.
[[nodiscard]] absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(std::string_view name);
std::vector<std::string> RegisteredBackends();

}  // namespace kvcache

#include "kvcache/backend_impl.h"  // IWYU pragma: export

#endif  // KVCACHE_BACKEND_H_
