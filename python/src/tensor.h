// python/src/tensor.h — numpy / torch arrays into the C++ API, and status into exceptions.
//
// Arrays cross as nanobind ndarrays (the buffer protocol for numpy, DLPack for torch). A host
// array in C order is used in place: its data pointer goes straight into the C++ call (no copy).
// Any other strides are gathered into a dense host buffer once (a copy, reported by `copied`).
// Arrays on another device, of an unsupported dtype or of the wrong shape are refused with a
// ValueError naming the argument, the bad value and the expected one, before the cache is touched.
//
// Example:
//   HostTensor k = ToHostTensor(keys, "keys", {-1, num_kv_heads, head_dim}, kFloatDTypes);
//   request.keys = k.ref();            // f32 / f16 / bf16 TensorRef over the caller's memory
#ifndef KVCACHE_PYTHON_TENSOR_H_
#define KVCACHE_PYTHON_TENSOR_H_

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kvcache/dtype.h"
#include "kvcache/types.h"

namespace kvcache::python {

namespace nb = nanobind;

// Which element types an argument accepts.
// Input arrays: read-only views (numpy arrays with writeable=False are accepted too).
using InArray = nb::ndarray<nb::ro>;

enum DTypeSet : uint8_t { kF32Only = 1, kFloatDTypes = 2 };

// A host view of an array argument: the caller's memory when it was C-contiguous, else a dense
// copy owned here. Valid while the ndarray argument it came from is alive.
struct HostTensor {
  const void* data = nullptr;   // [numel] elements of dtype
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  int64_t numel = 0;
  bool copied = false;
  std::vector<uint8_t> storage;  // the dense copy when `copied`

  TensorRef ref() const { return {data, dtype, numel}; }
  const float* f32() const { return static_cast<const float*>(data); }
};

// Checks device, dtype and shape (-1 in `shape` accepts any extent) and returns the host view.
// Throws nb::value_error naming `name` on a mismatch.
HostTensor ToHostTensor(const InArray& array, const char* name,
                        std::initializer_list<int64_t> shape, DTypeSet dtypes);

// The same for an output argument: C-contiguous, on the host and writable (no copy is possible,
// the kernel writes into it), f32 or (kFloatDTypes) f16 / bf16.
MutableTensorRef ToOutputTensor(const nb::ndarray<>& array, const char* name,
                                std::initializer_list<int64_t> shape, DTypeSet dtypes);
// ToOutputTensor(kF32Only).data.
float* ToOutputF32(const nb::ndarray<>& array, const char* name,
                   std::initializer_list<int64_t> shape);

// Any 1-D integer host array (int8..int64, uint8..uint64) of length `length` (-1: any), copied
// into int32 (positions, token indices: small side data). Values outside int32 are refused.
std::vector<int32_t> ToInt32Vector(const InArray& array, const char* name,
                                   int64_t length);

// A fresh numpy array owning a copy of `values` (shape given; product must equal size).
template <class T>
nb::ndarray<nb::numpy, T> NumpyCopy(const std::vector<T>& values,
                                    std::initializer_list<size_t> shape) {
  T* data = new T[values.empty() ? 1 : values.size()];
  std::copy(values.begin(), values.end(), data);
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  return nb::ndarray<nb::numpy, T>(data, shape, owner);
}

// A fresh zero-filled numpy f32 array of the given shape and a pointer to its data.
nb::ndarray<nb::numpy, float> NumpyZerosF32(std::initializer_list<size_t> shape, float** data);

// Raises the Python exception that fits `status` (InvalidArgument/AlreadyExists -> ValueError,
// NotFound -> KeyError, OutOfRange -> IndexError, ResourceExhausted -> MemoryError, everything
// else -> RuntimeError) with the library's message. Call with the GIL held. No-op when ok.
void ThrowIfError(const absl::Status& status);

}  // namespace kvcache::python

#endif  // KVCACHE_PYTHON_TENSOR_H_
