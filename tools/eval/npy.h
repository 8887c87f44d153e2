// tools/eval/npy.h — a strict reader for NumPy .npy files (format versions 1.0, 2.0, 3.0).
//
// Accepted: little-endian '<f4', '<f2', '<i4', '<i8' and '|u1' (also '<u1'), C order
// (fortran_order False), any number of dimensions. Everything else (big-endian, other dtypes,
// Fortran order, object arrays, truncated data, a malformed header) is an InvalidArgument /
// DataLoss error whose message names the file (the `name` argument) and the problem; the
// parser never reads out of bounds, so it can be fed arbitrary bytes (fuzzing).
//
// Example:
//   absl::StatusOr<kvcache::eval::NpyArray> a = kvcache::eval::ReadNpyFile("layer_000_keys.npy");
//   if (!a.ok()) std::cerr << a.status().message();   // "layer_000_keys.npy: truncated ..."
//   std::vector<float> k = a->ToFloat();               // [shape...] row-major
#ifndef KVCACHE_TOOLS_EVAL_NPY_H_
#define KVCACHE_TOOLS_EVAL_NPY_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace kvcache::eval {

enum class NpyType : uint8_t { kF32, kF16, kI32, kI64, kU8 };

// "<f4", "<f2", "<i4", "<i8", "|u1".
const char* NpyTypeName(NpyType t);

struct NpyArray {
  NpyType type = NpyType::kF32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;  // raw little-endian elements, C order

  int64_t num_elements() const;
  // Converted element-wise; f16 is widened exactly, integers converted.
  std::vector<float> ToFloat() const;
  // Floats truncated toward zero, saturated at the int64 range, NaN read as 0.
  std::vector<int64_t> ToInt() const;
};

// Parses a whole .npy file held in memory. `name` only labels error messages.
[[nodiscard]] absl::StatusOr<NpyArray> ParseNpy(std::string_view bytes, const std::string& name);
// Reads and parses a file; NotFound when it cannot be opened.
[[nodiscard]] absl::StatusOr<NpyArray> ReadNpyFile(const std::string& path);

// Serialises an array as a version 1.0 .npy (used by tests and tools).
std::string EncodeNpy(const NpyArray& array);

}  // namespace kvcache::eval

#endif  // KVCACHE_TOOLS_EVAL_NPY_H_
