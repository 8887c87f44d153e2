// kvcache/types.h — small vocabulary types: token modality, sequence ids, tensor references.
//
// Every token the cache holds carries its original position (int32, kept forever so RoPE stays
// correct after eviction) and its modality. Tensors cross the API as a TensorRef (read) or a
// MutableTensorRef (written): a pointer, its element type, its element count (so every entry
// point can check the size it was given) and its memory space. Host memory is the default;
// device memory (OnDevice) is accepted only by a backend that supports
// BackendOp::kDeviceTensors (the CUDA backend), where the pointer is memory of that backend's
// device (cudaMalloc'd), checked before use.
//
// Example:
//   std::vector<float> k(n * heads * dim);
//   kvcache::TensorRef keys = kvcache::TensorRef::Of(k);   // f32, k.size() elements, host
//   std::vector<uint16_t> out(m);                           // bf16 bits
//   kvcache::MutableTensorRef o = kvcache::MutableTensorRef::Of(out, kvcache::DType::kBF16);
//   kvcache::TensorRef dq = kvcache::TensorRef::OnDevice(d_q, kvcache::DType::kF16, m);
#ifndef KVCACHE_TYPES_H_
#define KVCACHE_TYPES_H_

#include <cstdint>
#include <span>
#include <string_view>

#include "kvcache/dtype.h"

namespace kvcache {

enum class Modality : uint8_t { kText = 0, kImage = 1, kVideo = 2, kAudio = 3 };
inline constexpr int kNumModalities = 4;

// "text", "image", "video", "audio".
const char* ModalityName(Modality m);

// A sequence handle. Ids are never reused within one Cache.
using SequenceId = int64_t;

// Where a tensor's memory lives: host memory, or the device memory of the cache's backend.
enum class MemorySpace : uint8_t { kHost = 0, kDevice = 1 };
// "host", "device".
const char* MemorySpaceName(MemorySpace s);

// A read-only buffer with its element type, element count and memory space.
struct TensorRef {
  const void* data = nullptr;  // [num_elements] of dtype, in `space`
  DType dtype = DType::kF32;
  int64_t num_elements = 0;
  MemorySpace space = MemorySpace::kHost;

  static TensorRef Of(std::span<const float> s) {
    return {s.data(), DType::kF32, static_cast<int64_t>(s.size())};
  }
  // f16 or bf16 bits.
  static TensorRef Of(std::span<const uint16_t> s, DType t) {
    return {s.data(), t, static_cast<int64_t>(s.size())};
  }
  // `n` elements of `t` in the backend's device memory.
  static TensorRef OnDevice(const void* data, DType t, int64_t n) {
    return {data, t, n, MemorySpace::kDevice};
  }
};

// A writable buffer with its element type, element count and memory space. A default-constructed
// one (data null, 0 elements) means "not requested" where an output is optional.
struct MutableTensorRef {
  void* data = nullptr;  // [num_elements] of dtype, in `space`
  DType dtype = DType::kF32;
  int64_t num_elements = 0;
  MemorySpace space = MemorySpace::kHost;

  static MutableTensorRef Of(std::span<float> s) {
    return {s.data(), DType::kF32, static_cast<int64_t>(s.size())};
  }
  // f16 or bf16 bits.
  static MutableTensorRef Of(std::span<uint16_t> s, DType t) {
    return {s.data(), t, static_cast<int64_t>(s.size())};
  }
  // `n` elements of `t` in the backend's device memory.
  static MutableTensorRef OnDevice(void* data, DType t, int64_t n) {
    return {data, t, n, MemorySpace::kDevice};
  }
};

}  // namespace kvcache

#endif  // KVCACHE_TYPES_H_
