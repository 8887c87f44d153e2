// Fuzz target: the kvcache-eval trace reader (tools/eval/npy.h ParseNpy, tools/eval/trace.h
// LoadTrace) over arbitrary bytes.
//
// (a) ParseNpy on the whole input. When it succeeds: the payload holds exactly
//     num_elements * element size bytes, and EncodeNpy + ParseNpy round-trips (same type, shape
//     and bytes); the float/int conversions yield num_elements values.
// (b) The input is split at every kSeparator into parts: part 0 is written as manifest.json,
//     part i (i >= 1) as "<i>.npy" (at most kMaxFiles files), into a temporary directory made
//     once per process and emptied before every input. LoadTrace on it must either succeed with
//     a workload whose every array has the size the manifest implies and that passes
//     Workload::Validate(), or fail with a non-empty message naming the directory (every error
//     names manifest.json, one of the .npy files or the directory). Each part is also fed to
//     ParseNpy as in (a).
//
// Input format for hand-made seeds (fuzz/make_trace_seeds.py writes them):
//   manifest.json bytes  kSeparator  1.npy bytes  kSeparator  2.npy bytes ...
// A manifest naming "1.npy" ... refers to those parts.
#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "tools/eval/npy.h"
#include "tools/eval/trace.h"

namespace {

namespace fs = std::filesystem;
using kvcache::eval::NpyArray;
using kvcache::eval::NpyType;

constexpr std::string_view kSeparator = "\n#~FILE~#\n";
constexpr int kMaxFiles = 16;

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_trace: %s\n", what.c_str());
  std::abort();
}
void Expect(bool ok, const std::string& what) {
  if (!ok) Fail(what);
}

int64_t ElementSize(NpyType t) {
  switch (t) {
    case NpyType::kF32:
    case NpyType::kI32:
      return 4;
    case NpyType::kF16:
      return 2;
    case NpyType::kI64:
      return 8;
    case NpyType::kU8:
      return 1;
  }
  Fail("unknown NpyType");
}

void CheckNpy(std::string_view bytes) {
  auto parsed = kvcache::eval::ParseNpy(bytes, "input.npy");
  if (!parsed.ok()) {
    const std::string msg(parsed.status().message());
    Expect(msg.find("input.npy") != std::string::npos, "ParseNpy error does not name the file: " + msg);
    return;
  }
  const NpyArray& a = *parsed;
  int64_t elements = 1;
  for (int64_t d : a.shape) {
    Expect(d >= 0, "negative dimension accepted");
    elements *= d;  // bounded: the payload (<= input size) holds them all
  }
  Expect(elements == a.num_elements(), "num_elements disagrees with the shape");
  Expect(static_cast<int64_t>(a.data.size()) == elements * ElementSize(a.type),
         "payload size is not shape x element size");
  Expect(static_cast<int64_t>(a.ToFloat().size()) == elements, "ToFloat size");
  Expect(static_cast<int64_t>(a.ToInt().size()) == elements, "ToInt size");

  const std::string encoded = kvcache::eval::EncodeNpy(a);
  auto again = kvcache::eval::ParseNpy(encoded, "encoded.npy");
  Expect(again.ok(), "EncodeNpy output does not parse: " + again.status().ToString());
  Expect(again->type == a.type, "round trip changed the dtype");
  Expect(again->shape == a.shape, "round trip changed the shape");
  Expect(again->data == a.data, "round trip changed the payload");
}

// The per-process scratch directory (removed at exit). Heap-held and never freed: the atexit
// handler runs after the destructors of statics constructed before it was registered.
const std::string& ScratchDir() {
  static const std::string* const dir = [] {
    std::string tmpl = (fs::temp_directory_path() / "fuzz_trace.XXXXXX").string();
    if (mkdtemp(tmpl.data()) == nullptr) Fail("mkdtemp failed");
    auto* held = new std::string(tmpl);
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(ScratchDir(), ec);
    });
    return held;
  }();
  return *dir;
}

void WriteFile(const std::string& path, std::string_view bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  Expect(static_cast<bool>(f), "cannot write " + path);
}

void CheckTrace(std::string_view input) {
  std::vector<std::string_view> parts;
  size_t start = 0;
  while (parts.size() < kMaxFiles + 1) {
    const size_t at = input.find(kSeparator, start);
    if (at == std::string_view::npos || parts.size() == kMaxFiles) {
      parts.push_back(input.substr(start));
      break;
    }
    parts.push_back(input.substr(start, at - start));
    start = at + kSeparator.size();
  }

  const std::string& dir = ScratchDir();
  // Empty the directory so that no file of an earlier input is visible to this one.
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) fs::remove_all(entry.path(), ec);
  WriteFile((fs::path(dir) / "manifest.json").string(), parts[0]);
  for (size_t i = 1; i < parts.size(); ++i) {
    WriteFile((fs::path(dir) / (std::to_string(i) + ".npy")).string(), parts[i]);
    CheckNpy(parts[i]);
  }

  auto w = kvcache::eval::LoadTrace(dir);
  if (!w.ok()) {
    const std::string msg(w.status().message());
    Expect(!msg.empty(), "LoadTrace failed with an empty message");
    Expect(msg.find(dir) != std::string::npos, "LoadTrace error names no file of the trace: " + msg);
    return;
  }
  Expect(w->Validate().ok(), "LoadTrace returned an invalid workload: " + w->Validate().ToString());
  const size_t L = static_cast<size_t>(w->num_layers);
  const size_t n = static_cast<size_t>(w->prompt_len);
  const size_t H = static_cast<size_t>(w->num_kv_heads);
  const size_t QH = static_cast<size_t>(w->num_q_heads);
  const size_t D = static_cast<size_t>(w->head_dim);
  const size_t steps = static_cast<size_t>(w->decode_steps);
  const size_t rows = static_cast<size_t>(w->query_rows);
  Expect(w->positions.size() == n && w->modalities.size() == n, "positions/modalities size");
  Expect(w->decode_positions.size() == steps, "decode_positions size");
  Expect(w->query_positions.size() == rows, "query_positions size");
  for (size_t i = 1; i < n; ++i) Expect(w->positions[i] > w->positions[i - 1], "positions order");
  Expect(w->keys.size() == L && w->values.size() == L && w->queries.size() == L &&
             w->decode_queries.size() == L && w->decode_keys.size() == L &&
             w->decode_values.size() == L,
         "per-layer array count");
  for (size_t l = 0; l < L; ++l) {
    Expect(w->keys[l].size() == n * H * D && w->values[l].size() == n * H * D, "keys/values size");
    Expect(w->queries[l].size() == rows * QH * D, "queries size");
    Expect(w->decode_queries[l].size() == steps * QH * D, "decode_queries size");
    Expect(w->decode_keys[l].size() == steps * H * D && w->decode_values[l].size() == steps * H * D,
           "decode keys/values size");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  CheckNpy(input);
  CheckTrace(input);
  return 0;
}
