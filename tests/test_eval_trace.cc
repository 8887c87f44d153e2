// The .npy reader and the trace directory reader of kvcache-eval: valid files round-trip;
// truncated, wrong-dtype, wrong-shape and garbage files give errors naming the file.
#include <catch2/catch.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>

#include "kvcache/dtype.h"
#include "tools/eval/npy.h"
#include "tools/eval/trace.h"
#include "tools/eval/workload.h"

namespace ke = kvcache::eval;
namespace fs = std::filesystem;

namespace {

std::string Npy(const std::string& descr, const std::string& shape, const std::string& data,
                char major = 1, bool fortran = false) {
  std::string header = "{'descr': '" + descr + "', 'fortran_order': " +
                       (fortran ? "True" : "False") + ", 'shape': " + shape + ", }";
  header += '\n';
  std::string out("\x93NUMPY", 6);
  out += major;
  out += '\0';
  const uint32_t len = static_cast<uint32_t>(header.size());
  const int len_bytes = major == 1 ? 2 : 4;
  for (int i = 0; i < len_bytes; ++i) out += static_cast<char>((len >> (8 * i)) & 0xFF);
  return out + header + data;
}

template <typename T>
std::string Bytes(std::initializer_list<T> v) {
  std::string s(v.size() * sizeof(T), '\0');
  std::memcpy(s.data(), std::data(v), s.size());
  return s;
}

bool Mentions(const absl::Status& s, const std::string& text) {
  return std::string(s.message()).find(text) != std::string::npos;
}

fs::path TempDir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("kvcache_eval_test_" + name + "_" +
                                            std::to_string(std::random_device{}()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

ke::Workload Tiny() {
  ke::SyntheticSpec s;
  s.num_layers = 2;
  s.num_kv_heads = 2;
  s.num_q_heads = 4;
  s.head_dim = 16;
  s.system_tokens = 4;
  s.image_tokens = 20;
  s.image_tiles = 2;
  s.question_tokens = 6;
  s.decode_steps = 3;
  return *ke::GenerateWorkload(s);
}

}  // namespace

TEST_CASE("npy: ToInt of a float array saturates and reads NaN as 0", "[eval][npy]") {
  // Regression (fuzz/fuzz_trace.cc): the plain float -> int64 cast of 2e23, inf or NaN was
  // undefined behaviour.
  const float inf = std::numeric_limits<float>::infinity();
  auto f = ke::ParseNpy(Npy("<f4", "(6,)", Bytes<float>({2.7f, -2.7f, 2e23f, -2e23f, inf,
                                                          std::numeric_limits<float>::quiet_NaN()})),
                        "f.npy");
  REQUIRE(f.ok());
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
  CHECK(f->ToInt() == std::vector<int64_t>{2, -2, kMax, kMin, kMax, 0});
  auto h = ke::ParseNpy(Npy("<f2", "(2,)", Bytes<uint16_t>({0xfc00, 0x7e00})), "h.npy");  // -inf, NaN
  REQUIRE(h.ok());
  CHECK(h->ToInt() == std::vector<int64_t>{kMin, 0});
}

TEST_CASE("npy: every supported dtype and header version parses", "[eval][npy]") {
  auto f = ke::ParseNpy(Npy("<f4", "(2, 2)", Bytes<float>({1.0f, 2.0f, -3.0f, 4.5f})), "a.npy");
  REQUIRE(f.ok());
  CHECK(f->shape == std::vector<int64_t>{2, 2});
  CHECK(f->ToFloat() == std::vector<float>{1.0f, 2.0f, -3.0f, 4.5f});
  auto h = ke::ParseNpy(Npy("<f2", "(2,)", Bytes<uint16_t>({kvcache::FloatToHalfBits(1.5f),
                                                            kvcache::FloatToHalfBits(-2.0f)})),
                        "h.npy");
  REQUIRE(h.ok());
  CHECK(h->ToFloat() == std::vector<float>{1.5f, -2.0f});
  auto i4 = ke::ParseNpy(Npy("<i4", "(3,)", Bytes<int32_t>({0, 7, -1}), 2), "i.npy");
  REQUIRE(i4.ok());
  CHECK(i4->ToInt() == std::vector<int64_t>{0, 7, -1});
  auto i8 = ke::ParseNpy(Npy("<i8", "(2,)", Bytes<int64_t>({5, 1LL << 40}), 3), "l.npy");
  REQUIRE(i8.ok());
  CHECK(i8->ToInt() == std::vector<int64_t>{5, 1LL << 40});
  auto u1 = ke::ParseNpy(Npy("|u1", "(1, 3)", std::string("\x00\x01\x02", 3)), "u.npy");
  REQUIRE(u1.ok());
  CHECK(u1->ToInt() == std::vector<int64_t>{0, 1, 2});
  auto scalar = ke::ParseNpy(Npy("<f4", "()", Bytes<float>({2.0f})), "s.npy");
  REQUIRE(scalar.ok());
  CHECK(scalar->num_elements() == 1);
  // EncodeNpy round-trips.
  auto again = ke::ParseNpy(ke::EncodeNpy(*f), "again.npy");
  REQUIRE(again.ok());
  CHECK(again->shape == f->shape);
  CHECK(again->data == f->data);
}

TEST_CASE("npy: invalid inputs give errors naming the file and the problem", "[eval][npy]") {
  const std::string good = Npy("<f4", "(2, 2)", Bytes<float>({1, 2, 3, 4}));
  struct Case {
    std::string bytes;
    std::string expect;
  };
  const Case cases[] = {
      {"", "too short"},
      {"hello world, not numpy", "bad magic"},
      {good.substr(0, good.size() - 3), "truncated data"},
      {good.substr(0, 20), "truncated header"},
      {good + "xx", "trailing bytes"},
      {Npy(">f4", "(2,)", Bytes<float>({1, 2})), "unsupported dtype '>f4'"},
      {Npy("<f8", "(1,)", Bytes<double>({1.0})), "unsupported dtype '<f8'"},
      {Npy("|O", "(1,)", "12345678"), "unsupported dtype"},
      {Npy("<f4", "(2,)", Bytes<float>({1, 2}), 1, true), "Fortran"},
      {Npy("<f4", "(a, 2)", ""), "non-integer"},
      {Npy("<f4", "[2, 2]", ""), "not a tuple"},
      {Npy("<f4", "(99999999999, 99999999999)", ""), "too large"},
      {std::string("\x93NUMPY\x07\x00\x10\x00", 10) + std::string(16, ' '), "version 7"},
      {std::string("\x93NUMPY\x01\x00\x05\x00{'a':", 15), "unexpected header key 'a'"},
      {std::string("\x93NUMPY\x01\x00\x0a\x00{'descr':", 20), "not a string"},
  };
  for (const Case& c : cases) {
    INFO("expect: " << c.expect);
    auto r = ke::ParseNpy(c.bytes, "bad.npy");
    REQUIRE_FALSE(r.ok());
    INFO(r.status().message());
    CHECK(Mentions(r.status(), "bad.npy"));
    CHECK(Mentions(r.status(), c.expect));
  }
  // Random garbage after a valid magic never crashes (and is rejected or parsed consistently).
  std::mt19937 rng(1);
  for (int i = 0; i < 2000; ++i) {
    std::string s = good;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int f = 0; f < flips; ++f) s[rng() % s.size()] = static_cast<char>(rng());
    if (rng() % 3 == 0) s.resize(rng() % s.size());
    auto r = ke::ParseNpy(s, "fuzz.npy");
    if (r.ok()) {
      CHECK(r->data.size() == static_cast<size_t>(r->num_elements()) *
                                  (r->type == ke::NpyType::kF16 ? 2
                                   : r->type == ke::NpyType::kU8 ? 1
                                   : r->type == ke::NpyType::kI64 ? 8 : 4));
    } else {
      CHECK(Mentions(r.status(), "fuzz.npy"));
    }
  }
  auto missing = ke::ReadNpyFile("/nonexistent/dir/x.npy");
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.status().code() == absl::StatusCode::kNotFound);
  CHECK(Mentions(missing.status(), "/nonexistent/dir/x.npy"));
}

TEST_CASE("trace: a written trace loads back identically", "[eval][trace]") {
  const ke::Workload w = Tiny();
  const fs::path dir = TempDir("roundtrip");
  REQUIRE(ke::WriteTrace(w, dir.string()).ok());
  auto r = ke::LoadTrace(dir.string());
  INFO(r.status().message());
  REQUIRE(r.ok());
  CHECK(r->num_layers == w.num_layers);
  CHECK(r->prompt_len == w.prompt_len);
  CHECK(r->positions == w.positions);
  CHECK(r->modalities == w.modalities);
  CHECK(r->decode_positions == w.decode_positions);
  CHECK(r->keys == w.keys);
  CHECK(r->values == w.values);
  CHECK(r->queries == w.queries);
  CHECK(r->decode_queries == w.decode_queries);
  CHECK(r->decode_keys == w.decode_keys);
  CHECK(r->decode_values == w.decode_values);
  fs::remove_all(dir);
}

TEST_CASE("trace: truncated, wrong-dtype, wrong-shape, garbage and bad manifests are named",
          "[eval][trace]") {
  const ke::Workload w = Tiny();
  const fs::path dir = TempDir("bad");
  auto reset = [&] {
    fs::remove_all(dir);
    REQUIRE(ke::WriteTrace(w, dir.string()).ok());
  };
  auto write = [&](const std::string& name, const std::string& bytes) {
    std::ofstream f(dir / name, std::ios::binary);
    f << bytes;
  };
  auto expect = [&](const std::string& file, const std::string& what) {
    auto r = ke::LoadTrace(dir.string());
    REQUIRE_FALSE(r.ok());
    INFO(r.status().message());
    CHECK(Mentions(r.status(), file));
    CHECK(Mentions(r.status(), what));
  };

  reset();
  {  // truncated keys
    std::ifstream f(dir / "layer_001_keys.npy", std::ios::binary);
    std::string s((std::istreambuf_iterator<char>(f)), {});
    write("layer_001_keys.npy", s.substr(0, s.size() / 2));
  }
  expect("layer_001_keys.npy", "truncated");

  reset();  // wrong dtype: integer values where floats are required
  write("layer_000_values.npy",
        ke::EncodeNpy({ke::NpyType::kI32, {w.prompt_len, 2, 16},
                       std::vector<uint8_t>(static_cast<size_t>(w.prompt_len) * 2 * 16 * 4)}));
  expect("layer_000_values.npy", "dtype <i4");

  reset();  // wrong shape
  write("layer_000_queries.npy",
        ke::EncodeNpy({ke::NpyType::kF32, {5, 4, 16}, std::vector<uint8_t>(5 * 4 * 16 * 4)}));
  expect("layer_000_queries.npy", "shape (5, 4, 16)");

  reset();  // garbage
  write("positions.npy", "this is not a numpy file at all");
  expect("positions.npy", "bad magic");

  reset();  // positions not increasing
  write("positions.npy", ke::EncodeNpy({ke::NpyType::kI32, {w.prompt_len},
                                        std::vector<uint8_t>(w.prompt_len * 4, 0)}));
  expect("positions.npy", "strictly increase");

  reset();  // bad modality value
  write("modalities.npy", ke::EncodeNpy({ke::NpyType::kU8, {w.prompt_len},
                                         std::vector<uint8_t>(w.prompt_len, 9)}));
  expect("modalities.npy", "modality 9");

  reset();  // missing file
  fs::remove(dir / "layer_001_decode_keys.npy");
  expect("layer_001_decode_keys.npy", "cannot open");

  reset();  // manifest problems
  write("manifest.json", "{ not json");
  expect("manifest.json", "not a JSON object");
  write("manifest.json", R"({"format": "kvcache-trace", "version": 1, "num_layers": "two"})");
  expect("manifest.json", "num_layers");
  write("manifest.json", R"({"format": "other", "version": 1})");
  expect("manifest.json", "format");
  reset();
  {
    std::ifstream f(dir / "manifest.json");
    std::string s((std::istreambuf_iterator<char>(f)), {});
    const std::string from = "\"layer_000_keys.npy\"", to = "\"../etc/passwd\"";
    s.replace(s.find(from), from.size(), to);
    write("manifest.json", s);
  }
  expect("manifest.json", "relative file name");
  fs::remove_all(dir);
  CHECK(ke::LoadTrace(dir.string()).status().code() == absl::StatusCode::kNotFound);
}
