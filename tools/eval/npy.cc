// .npy reader: header dictionary parsed by a small bounds-checked scanner.
#include "tools/eval/npy.h"

#include <cctype>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kvcache/dtype.h"

namespace kvcache::eval {
namespace {

int TypeSize(NpyType t) {
  switch (t) {
    case NpyType::kF32: case NpyType::kI32: return 4;
    case NpyType::kF16: return 2;
    case NpyType::kI64: return 8;
    case NpyType::kU8: return 1;
  }
  return 1;
}

// Scanner over the header text (a Python dict literal).
class Scanner {
 public:
  explicit Scanner(std::string_view s) : s_(s) {}
  void SkipSpace() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n')) ++pos_;
  }
  bool Eat(char c) {
    SkipSpace();
    if (pos_ < s_.size() && s_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }
  bool Peek(char c) {
    SkipSpace();
    return pos_ < s_.size() && s_[pos_] == c;
  }
  bool String(std::string& out) {
    SkipSpace();
    if (pos_ >= s_.size() || (s_[pos_] != '\'' && s_[pos_] != '"')) return false;
    const char q = s_[pos_++];
    const size_t end = s_.find(q, pos_);
    if (end == std::string_view::npos) return false;
    out = std::string(s_.substr(pos_, end - pos_));
    pos_ = end + 1;
    return true;
  }
  bool Word(std::string& out) {
    SkipSpace();
    const size_t start = pos_;
    while (pos_ < s_.size() && std::isalpha(static_cast<unsigned char>(s_[pos_]))) ++pos_;
    out = std::string(s_.substr(start, pos_ - start));
    return !out.empty();
  }
  bool Int(int64_t& out) {
    SkipSpace();
    const size_t start = pos_;
    int64_t v = 0;
    while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') {
      if (v > (std::numeric_limits<int64_t>::max() - 9) / 10) return false;
      v = v * 10 + (s_[pos_++] - '0');
    }
    if (pos_ < s_.size() && s_[pos_] == 'L') ++pos_;  // Python 2 long suffix
    out = v;
    return pos_ > start;
  }
  bool AtEnd() {
    SkipSpace();
    return pos_ == s_.size();
  }

 private:
  std::string_view s_;
  size_t pos_ = 0;
};

uint32_t ReadLe(std::string_view b, size_t off, int bytes) {
  uint32_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<uint8_t>(b[off + i]);
  return v;
}

}  // namespace

const char* NpyTypeName(NpyType t) {
  switch (t) {
    case NpyType::kF32: return "<f4";
    case NpyType::kF16: return "<f2";
    case NpyType::kI32: return "<i4";
    case NpyType::kI64: return "<i8";
    case NpyType::kU8: return "|u1";
  }
  return "?";
}

int64_t NpyArray::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<float> NpyArray::ToFloat() const {
  const int64_t n = num_elements();
  std::vector<float> out(n);
  const uint8_t* p = data.data();
  for (int64_t i = 0; i < n; ++i) {
    switch (type) {
      case NpyType::kF32: std::memcpy(&out[i], p + 4 * i, 4); break;
      case NpyType::kF16: {
        uint16_t h;
        std::memcpy(&h, p + 2 * i, 2);
        out[i] = HalfBitsToFloat(h);
        break;
      }
      case NpyType::kI32: { int32_t v; std::memcpy(&v, p + 4 * i, 4); out[i] = static_cast<float>(v); break; }
      case NpyType::kI64: { int64_t v; std::memcpy(&v, p + 8 * i, 8); out[i] = static_cast<float>(v); break; }
      case NpyType::kU8: out[i] = p[i]; break;
    }
  }
  return out;
}

namespace {
// Float -> int64 truncated toward zero, saturated at the int64 range, NaN as 0: a plain cast of
// an out-of-range or NaN float is undefined behaviour (found by fuzz/fuzz_trace.cc).
int64_t FloatToInt64(float v) {
  if (std::isnan(v)) return 0;
  // 2^63 is exactly representable as a float; every float below it converts.
  constexpr float kLimit = 9223372036854775808.0f;
  if (v >= kLimit) return std::numeric_limits<int64_t>::max();
  if (v < -kLimit) return std::numeric_limits<int64_t>::min();
  return static_cast<int64_t>(v);
}
}  // namespace

std::vector<int64_t> NpyArray::ToInt() const {
  const int64_t n = num_elements();
  std::vector<int64_t> out(n);
  const uint8_t* p = data.data();
  for (int64_t i = 0; i < n; ++i) {
    switch (type) {
      case NpyType::kI32: { int32_t v; std::memcpy(&v, p + 4 * i, 4); out[i] = v; break; }
      case NpyType::kI64: std::memcpy(&out[i], p + 8 * i, 8); break;
      case NpyType::kU8: out[i] = p[i]; break;
      case NpyType::kF32: { float v; std::memcpy(&v, p + 4 * i, 4); out[i] = FloatToInt64(v); break; }
      case NpyType::kF16: { uint16_t h; std::memcpy(&h, p + 2 * i, 2); out[i] = FloatToInt64(HalfBitsToFloat(h)); break; }
    }
  }
  return out;
}

absl::StatusOr<NpyArray> ParseNpy(std::string_view b, const std::string& name) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": ", why));
  };
  static constexpr char kMagic[] = "\x93NUMPY";
  if (b.size() < 10 || std::memcmp(b.data(), kMagic, 6) != 0) {
    return bad(b.size() < 10 ? absl::StrCat("not a .npy file (", b.size(), " bytes, too short)")
                             : "not a .npy file (bad magic)");
  }
  const int major = static_cast<uint8_t>(b[6]);
  size_t header_len = 0, header_start = 0;
  if (major == 1) {
    header_len = ReadLe(b, 8, 2);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (b.size() < 12) return bad("truncated header length");
    header_len = ReadLe(b, 8, 4);
    header_start = 12;
  } else {
    return bad(absl::StrCat("unsupported .npy format version ", major, ".",
                            static_cast<int>(static_cast<uint8_t>(b[7]))));
  }
  if (header_len > b.size() - header_start) {
    return bad(absl::StrCat("truncated header (declares ", header_len, " bytes, file has ",
                            b.size() - header_start, ")"));
  }
  std::string_view header = b.substr(header_start, header_len);
  while (!header.empty() && (header.back() == '\n' || header.back() == ' ' || header.back() == '\0')) {
    header.remove_suffix(1);
  }
  Scanner sc(header);
  std::string descr;
  bool have_descr = false, have_order = false, have_shape = false, fortran = false;
  std::vector<int64_t> shape;
  if (!sc.Eat('{')) return bad("header is not a dictionary");
  while (!sc.Eat('}')) {
    std::string key;
    if (!sc.String(key) || !sc.Eat(':')) return bad("malformed header dictionary");
    if (key == "descr") {
      if (!sc.String(descr)) return bad("header 'descr' is not a string");
      have_descr = true;
    } else if (key == "fortran_order") {
      std::string word;
      if (!sc.Word(word) || (word != "True" && word != "False")) {
        return bad("header 'fortran_order' is not True/False");
      }
      fortran = word == "True";
      have_order = true;
    } else if (key == "shape") {
      if (!sc.Eat('(')) return bad("header 'shape' is not a tuple");
      while (!sc.Eat(')')) {
        int64_t d = 0;
        if (!sc.Int(d)) return bad("header 'shape' holds a non-integer");
        shape.push_back(d);
        if (shape.size() > 32) return bad("header 'shape' has more than 32 dimensions");
        if (!sc.Eat(',') && !sc.Peek(')')) return bad("malformed header 'shape'");
      }
      have_shape = true;
    } else {
      return bad(absl::StrCat("unexpected header key '", key, "'"));
    }
    if (!sc.Eat(',') && !sc.Peek('}')) return bad("malformed header dictionary");
  }
  if (!sc.AtEnd()) return bad("trailing characters after the header dictionary");
  if (!have_descr || !have_order || !have_shape) {
    return bad("header lacks one of 'descr', 'fortran_order', 'shape'");
  }
  if (fortran) return bad("Fortran-order arrays are not supported (save with C order)");
  NpyArray a;
  if (descr == "<f4") a.type = NpyType::kF32;
  else if (descr == "<f2") a.type = NpyType::kF16;
  else if (descr == "<i4") a.type = NpyType::kI32;
  else if (descr == "<i8") a.type = NpyType::kI64;
  else if (descr == "|u1" || descr == "<u1") a.type = NpyType::kU8;
  else {
    return bad(absl::StrCat("unsupported dtype '", descr,
                            "' (supported: <f4, <f2, <i4, <i8, |u1; little-endian only)"));
  }
  int64_t count = 1;
  for (int64_t d : shape) {
    if (d < 0) return bad("negative dimension");
    if (d != 0 && count > (int64_t{1} << 40) / d) return bad("shape is too large");
    count *= d;
  }
  a.shape = shape;
  const size_t data_start = header_start + header_len;
  const uint64_t need = static_cast<uint64_t>(count) * TypeSize(a.type);
  const uint64_t have = b.size() - data_start;
  if (have < need) {
    return absl::DataLossError(absl::StrCat(name, ": truncated data (shape (",
                                            absl::StrJoin(shape, ", "), ") of ", descr, " needs ",
                                            need, " bytes, file has ", have, ")"));
  }
  if (have > need) {
    return bad(absl::StrCat(have - need, " trailing bytes after the array data"));
  }
  a.data.assign(b.begin() + data_start, b.end());
  return a;
}

absl::StatusOr<NpyArray> ReadNpyFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat(path, ": cannot open file"));
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return ParseNpy(ss.str(), path);
}

std::string EncodeNpy(const NpyArray& a) {
  std::string header = absl::StrCat("{'descr': '", NpyTypeName(a.type),
                                    "', 'fortran_order': False, 'shape': (",
                                    absl::StrJoin(a.shape, ", "), a.shape.size() == 1 ? ",), }" : "), }");
  // Pad so that the data starts at a multiple of 64 bytes, ending the header with '\n'.
  const size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::string out("\x93NUMPY\x01\x00", 8);
  out += static_cast<char>(header.size() & 0xFF);
  out += static_cast<char>((header.size() >> 8) & 0xFF);
  out += header;
  out.append(reinterpret_cast<const char*>(a.data.data()), a.data.size());
  return out;
}

}  // namespace kvcache::eval
