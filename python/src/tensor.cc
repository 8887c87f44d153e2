// python/src/tensor.cc — array conversion and status mapping (see tensor.h).
#include "tensor.h"

#include <Python.h>

#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kvcache::python {
namespace {

template <class Array>
std::string ShapeString(const Array& a) {
  std::vector<int64_t> s;
  for (size_t i = 0; i < a.ndim(); ++i) s.push_back(static_cast<int64_t>(a.shape(i)));
  return absl::StrCat("(", absl::StrJoin(s, ", "), ")");
}

std::string ExpectedString(std::initializer_list<int64_t> shape) {
  std::vector<std::string> parts;
  for (int64_t e : shape) parts.push_back(e < 0 ? "*" : absl::StrCat(e));
  return absl::StrCat("(", absl::StrJoin(parts, ", "), ")");
}

std::string DTypeString(nb::dlpack::dtype t) {
  const char* kind = "?";
  switch (static_cast<nb::dlpack::dtype_code>(t.code)) {
    case nb::dlpack::dtype_code::Int: kind = "int"; break;
    case nb::dlpack::dtype_code::UInt: kind = "uint"; break;
    case nb::dlpack::dtype_code::Float: kind = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: kind = "bfloat"; break;
    case nb::dlpack::dtype_code::Complex: kind = "complex"; break;
    case nb::dlpack::dtype_code::Bool: kind = "bool"; break;
    default: break;
  }
  return absl::StrCat(kind, t.bits);
}

const char* DeviceName(int32_t type) {
  switch (type) {
    case 1: return "cpu";
    case 2: return "cuda";
    case 3: return "cuda_host";
    case 4: return "opencl";
    case 7: return "vulkan";
    case 8: return "metal";
    case 10: return "rocm";
    case 13: return "cuda_managed";
    case 14: return "oneapi";
    default: return "an unknown device";
  }
}

[[noreturn]] void Fail(const std::string& message) { throw nb::value_error(message.c_str()); }

template <class Array>
void CheckDeviceAndShape(const Array& a, const char* name,
                         std::initializer_list<int64_t> shape) {
  if (a.device_type() != nb::device::cpu::value) {
    Fail(absl::StrCat(name, " is on device ", DeviceName(a.device_type()), " (DLPack type ",
                      a.device_type(), "); kvcache's Python layer takes host (CPU) arrays"));
  }
  bool ok = a.ndim() == shape.size();
  size_t i = 0;
  for (int64_t e : shape) {
    if (ok && e >= 0 && static_cast<int64_t>(a.shape(i)) != e) ok = false;
    ++i;
  }
  if (!ok) {
    Fail(absl::StrCat(name, " has shape ", ShapeString(a), ", expected ", ExpectedString(shape)));
  }
}

template <class Array>
bool IsCContiguous(const Array& a) {
  int64_t expected = 1;
  for (size_t i = a.ndim(); i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expected) return false;
    expected *= static_cast<int64_t>(a.shape(i));
  }
  return true;
}

template <class Array>
int64_t NumElements(const Array& a) {
  int64_t n = 1;
  for (size_t i = 0; i < a.ndim(); ++i) n *= static_cast<int64_t>(a.shape(i));
  return n;
}

// Gathers a strided array of `elem` bytes per element into dense C order.
template <class Array>
void GatherDense(const Array& a, size_t elem, uint8_t* dst) {
  const int64_t n = NumElements(a);
  const size_t nd = a.ndim();
  std::vector<int64_t> index(nd, 0);
  const auto* base = static_cast<const uint8_t*>(a.data());
  for (int64_t e = 0; e < n; ++e) {
    int64_t offset = 0;
    for (size_t d = 0; d < nd; ++d) offset += index[d] * a.stride(d);
    std::memcpy(dst + e * elem, base + offset * static_cast<int64_t>(elem), elem);
    for (size_t d = nd; d-- > 0;) {
      if (++index[d] < static_cast<int64_t>(a.shape(d))) break;
      index[d] = 0;
    }
  }
}

// The kvcache dtype of a float array argument (f32; f16 / bf16 too with kFloatDTypes), or a
// ValueError naming `name`.
DType FloatDType(const nb::dlpack::dtype& t, const char* name, DTypeSet dtypes) {
  const auto code = static_cast<nb::dlpack::dtype_code>(t.code);
  if (t.lanes == 1 && code == nb::dlpack::dtype_code::Float && t.bits == 32) return DType::kF32;
  if (dtypes == kFloatDTypes && t.lanes == 1 && t.bits == 16) {
    if (code == nb::dlpack::dtype_code::Float) return DType::kF16;
    if (code == nb::dlpack::dtype_code::Bfloat) return DType::kBF16;
  }
  Fail(absl::StrCat(name, " has dtype ", DTypeString(t), ", expected ",
                    dtypes == kF32Only ? "float32" : "float32, float16 or bfloat16"));
}

}  // namespace

HostTensor ToHostTensor(const InArray& a, const char* name,
                        std::initializer_list<int64_t> shape, DTypeSet dtypes) {
  CheckDeviceAndShape(a, name, shape);
  HostTensor out;
  out.dtype = FloatDType(a.dtype(), name, dtypes);
  for (size_t i = 0; i < a.ndim(); ++i) out.shape.push_back(static_cast<int64_t>(a.shape(i)));
  out.numel = NumElements(a);
  if (IsCContiguous(a)) {
    out.data = a.data();
    return out;
  }
  const size_t elem = DTypeSize(out.dtype);
  out.storage.resize(static_cast<size_t>(out.numel) * elem);
  GatherDense(a, elem, out.storage.data());
  out.data = out.storage.data();
  out.copied = true;
  return out;
}

MutableTensorRef ToOutputTensor(const nb::ndarray<>& a, const char* name,
                                std::initializer_list<int64_t> shape, DTypeSet dtypes) {
  CheckDeviceAndShape(a, name, shape);
  MutableTensorRef out;
  out.dtype = FloatDType(a.dtype(), name, dtypes);
  if (!IsCContiguous(a)) Fail(absl::StrCat(name, " must be C-contiguous (it is written in place)"));
  out.data = a.data();
  out.num_elements = NumElements(a);
  return out;
}

float* ToOutputF32(const nb::ndarray<>& a, const char* name,
                   std::initializer_list<int64_t> shape) {
  return static_cast<float*>(ToOutputTensor(a, name, shape, kF32Only).data);
}

std::vector<int32_t> ToInt32Vector(const InArray& a, const char* name, int64_t length) {
  CheckDeviceAndShape(a, name, {length});
  const nb::dlpack::dtype t = a.dtype();
  const auto code = static_cast<nb::dlpack::dtype_code>(t.code);
  const bool is_int = code == nb::dlpack::dtype_code::Int || code == nb::dlpack::dtype_code::UInt;
  if (!is_int || t.lanes != 1 || (t.bits != 8 && t.bits != 16 && t.bits != 32 && t.bits != 64)) {
    Fail(absl::StrCat(name, " has dtype ", DTypeString(t), ", expected an integer dtype"));
  }
  const size_t n = a.shape(0);
  std::vector<int32_t> out(n);
  const auto* base = static_cast<const uint8_t*>(a.data());
  const size_t elem = t.bits / 8;
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* p = base + static_cast<int64_t>(i) * a.stride(0) * static_cast<int64_t>(elem);
    int64_t v = 0;
    const bool u = code == nb::dlpack::dtype_code::UInt;
    switch (t.bits) {
      case 8: v = u ? int64_t{*p} : int64_t{static_cast<int8_t>(*p)}; break;
      case 16: { uint16_t x; std::memcpy(&x, p, 2); v = u ? int64_t{x} : int64_t{int16_t(x)}; break; }
      case 32: { uint32_t x; std::memcpy(&x, p, 4); v = u ? int64_t{x} : int64_t{int32_t(x)}; break; }
      default: {
        uint64_t x; std::memcpy(&x, p, 8);
        if (u && x > uint64_t{std::numeric_limits<int64_t>::max()}) {
          Fail(absl::StrCat(name, "[", i, "] = ", x, " does not fit int32"));
        }
        v = static_cast<int64_t>(x);
      }
    }
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
      Fail(absl::StrCat(name, "[", i, "] = ", v, " does not fit int32"));
    }
    out[i] = static_cast<int32_t>(v);
  }
  return out;
}

nb::ndarray<nb::numpy, float> NumpyZerosF32(std::initializer_list<size_t> shape, float** data) {
  size_t n = 1;
  for (size_t e : shape) n *= e;
  float* p = new float[n == 0 ? 1 : n]();
  nb::capsule owner(p, [](void* q) noexcept { delete[] static_cast<float*>(q); });
  *data = p;
  return nb::ndarray<nb::numpy, float>(p, shape, owner);
}

void ThrowIfError(const absl::Status& status) {
  if (status.ok()) return;
  PyObject* type = PyExc_RuntimeError;
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kAlreadyExists:
      type = PyExc_ValueError;
      break;
    case absl::StatusCode::kNotFound:
      type = PyExc_KeyError;
      break;
    case absl::StatusCode::kOutOfRange:
      type = PyExc_IndexError;
      break;
    case absl::StatusCode::kResourceExhausted:
      type = PyExc_MemoryError;
      break;
    default:
      break;
  }
  const std::string message(status.message());
  PyErr_SetString(type, message.c_str());
  throw nb::python_error();
}

}  // namespace kvcache::python
