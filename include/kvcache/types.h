// kvcache/types.h — small vocabulary types: token modality, sequence ids, tensor references.
//
// Every token the cache holds carries its original position (int32, kept forever so RoPE stays
// correct after eviction) and its modality. Host tensors cross the API as a TensorRef: a pointer,
// its element type and its element count, so every entry point can check the size it was given.
//
// Example:
//   std::vector<float> k(n * heads * dim);
//   kvcache::TensorRef keys = kvcache::TensorRef::Of(k);   // f32, k.size() elements
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

// A read-only host buffer with its element type and element count.
struct TensorRef {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t num_elements = 0;

  static TensorRef Of(std::span<const float> s) { return {s.data(), DType::kF32, (int64_t)s.size()}; }
  // f16 or bf16 bits.
  static TensorRef Of(std::span<const uint16_t> s, DType t) {
    return {s.data(), t, static_cast<int64_t>(s.size())};
  }
};

}  // namespace kvcache

#endif  // KVCACHE_TYPES_H_
