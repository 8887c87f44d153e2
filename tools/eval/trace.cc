// Trace directory reader/writer (manifest.json + .npy files).
#include "tools/eval/trace.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "tools/eval/npy.h"

namespace kvcache::eval {
namespace {

namespace fs = std::filesystem;

std::string ShapeText(const std::vector<int64_t>& s) {
  return absl::StrCat("(", absl::StrJoin(s, ", "), ")");
}

class Loader {
 public:
  Loader(std::string dir, const nlohmann::json& m) : dir_(std::move(dir)), m_(m) {}

  absl::StatusOr<int32_t> Int(const char* key, int32_t lo) const {
    if (!m_.contains(key) || !m_[key].is_number_integer()) {
      return Error(absl::StrCat("field '", key, "' is missing or not an integer"));
    }
    const int64_t v = m_[key].get<int64_t>();
    if (v < lo || v > (int64_t{1} << 30)) {
      return Error(absl::StrCat("field '", key, "'=", v, " is out of range"));
    }
    return static_cast<int32_t>(v);
  }

  // Resolves a file name from the manifest; only plain relative names inside the directory.
  absl::StatusOr<std::string> File(const nlohmann::json& obj, const std::string& key,
                                   const std::string& where) const {
    if (!obj.contains(key) || !obj[key].is_string()) {
      return Error(absl::StrCat(where, "'", key, "' is missing or not a file name"));
    }
    const std::string name = obj[key].get<std::string>();
    const fs::path p(name);
    if (name.empty() || p.is_absolute() || name.find("..") != std::string::npos) {
      return Error(absl::StrCat(where, "'", key, "'='", name,
                                "' must be a relative file name inside the trace directory"));
    }
    return (fs::path(dir_) / p).string();
  }

  // Loads an array and checks its shape; float arrays may be f32 or f16.
  absl::StatusOr<NpyArray> Array(const std::string& path, const std::vector<int64_t>& shape,
                                 bool floating) const {
    auto a = ReadNpyFile(path);
    if (!a.ok()) return a.status();
    if (a->shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": shape ", ShapeText(a->shape),
                                                     " but the manifest implies ",
                                                     ShapeText(shape)));
    }
    const bool is_float = a->type == NpyType::kF32 || a->type == NpyType::kF16;
    if (floating != is_float) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": dtype ", NpyTypeName(a->type), " but ",
          floating ? "a float array (<f4 or <f2)" : "an integer array (<i4, <i8 or |u1)",
          " is required"));
    }
    return a;
  }

  absl::Status Error(const std::string& why) const {
    return absl::InvalidArgumentError(absl::StrCat((fs::path(dir_) / "manifest.json").string(),
                                                   ": ", why));
  }

 private:
  std::string dir_;
  const nlohmann::json& m_;
};

#define TRACE_ASSIGN(lhs, expr)                    \
  do {                                             \
    auto trace_v = (expr);                         \
    if (!trace_v.ok()) return trace_v.status();    \
    lhs = std::move(*trace_v);                     \
  } while (0)

absl::Status WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  if (!f) return absl::InvalidArgumentError(absl::StrCat("cannot open '", path, "' for writing"));
  f << bytes;
  f.close();
  if (!f) return absl::DataLossError(absl::StrCat("writing '", path, "' failed"));
  return absl::OkStatus();
}

template <typename T>
NpyArray MakeArray(NpyType type, std::vector<int64_t> shape, const std::vector<T>& v) {
  NpyArray a;
  a.type = type;
  a.shape = std::move(shape);
  a.data.resize(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(a.data.data(), v.data(), a.data.size());
  return a;
}

}  // namespace

absl::StatusOr<Workload> LoadTrace(const std::string& dir) {
  const std::string manifest_path = (fs::path(dir) / "manifest.json").string();
  std::ifstream f(manifest_path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat(manifest_path, ": cannot open file"));
  std::ostringstream ss;
  ss << f.rdbuf();
  const nlohmann::json m = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (m.is_discarded() || !m.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(manifest_path, ": not a JSON object"));
  }
  Loader ld(dir, m);
  if (!m.contains("format") || m["format"] != "kvcache-trace") {
    return ld.Error("field 'format' must be \"kvcache-trace\"");
  }
  if (!m.contains("version") || m["version"] != 1) {
    return ld.Error("field 'version' must be 1");
  }
  Workload w;
  w.model = m.contains("model") && m["model"].is_string() ? m["model"].get<std::string>()
                                                          : std::string("trace");
  TRACE_ASSIGN(w.num_layers, ld.Int("num_layers", 1));
  TRACE_ASSIGN(w.num_kv_heads, ld.Int("num_kv_heads", 1));
  TRACE_ASSIGN(w.num_q_heads, ld.Int("num_q_heads", 1));
  TRACE_ASSIGN(w.head_dim, ld.Int("head_dim", 1));
  TRACE_ASSIGN(w.prompt_len, ld.Int("prompt_len", 1));
  TRACE_ASSIGN(w.decode_steps, ld.Int("decode_steps", 1));
  TRACE_ASSIGN(w.query_rows, ld.Int("query_rows", 1));
  if (w.query_rows > w.prompt_len) {
    return ld.Error(absl::StrCat("query_rows=", w.query_rows, " exceeds prompt_len=", w.prompt_len));
  }
  if (w.num_q_heads % w.num_kv_heads != 0) {
    return ld.Error(absl::StrCat("num_q_heads=", w.num_q_heads,
                                 " is not a multiple of num_kv_heads=", w.num_kv_heads));
  }
  const int64_t n = w.prompt_len, H = w.num_kv_heads, QH = w.num_q_heads, D = w.head_dim;
  const int64_t steps = w.decode_steps;

  std::string path;
  TRACE_ASSIGN(path, ld.File(m, "positions", ""));
  NpyArray pos;
  TRACE_ASSIGN(pos, ld.Array(path, {n}, false));
  for (int64_t v : pos.ToInt()) {
    if (v < 0 || v > (int64_t{1} << 30)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": position ", v, " out of range"));
    }
    w.positions.push_back(static_cast<int32_t>(v));
  }
  for (int64_t i = 1; i < n; ++i) {
    if (w.positions[i] <= w.positions[i - 1]) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": positions must strictly increase (index ", i, ")"));
    }
  }
  TRACE_ASSIGN(path, ld.File(m, "modalities", ""));
  NpyArray mod;
  TRACE_ASSIGN(mod, ld.Array(path, {n}, false));
  for (int64_t v : mod.ToInt()) {
    if (v < 0 || v >= kNumModalities) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": modality ", v,
                                                     " is not 0 (text), 1 (image), 2 (video) or 3 (audio)"));
    }
    w.modalities.push_back(static_cast<Modality>(v));
  }
  if (m.contains("decode_positions")) {
    TRACE_ASSIGN(path, ld.File(m, "decode_positions", ""));
    NpyArray dp;
    TRACE_ASSIGN(dp, ld.Array(path, {steps}, false));
    for (int64_t v : dp.ToInt()) {
      const int32_t prev = w.decode_positions.empty() ? w.positions.back() : w.decode_positions.back();
      if (v <= prev || v > (int64_t{1} << 30)) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": decode position ", v,
                                                       " does not follow ", prev));
      }
      w.decode_positions.push_back(static_cast<int32_t>(v));
    }
  } else {
    for (int64_t t = 0; t < steps; ++t) w.decode_positions.push_back(w.positions.back() + 1 + static_cast<int32_t>(t));
  }
  w.query_positions.assign(w.positions.end() - w.query_rows, w.positions.end());

  if (!m.contains("layers") || !m["layers"].is_array() ||
      m["layers"].size() != static_cast<size_t>(w.num_layers)) {
    return ld.Error(absl::StrCat("field 'layers' must be an array of num_layers=", w.num_layers,
                                 " objects"));
  }
  struct Item {
    const char* key;
    std::vector<std::vector<float>>* out;
    std::vector<int64_t> shape;
  };
  const Item items[] = {
      {"keys", &w.keys, {n, H, D}},
      {"values", &w.values, {n, H, D}},
      {"queries", &w.queries, {w.query_rows, QH, D}},
      {"decode_queries", &w.decode_queries, {steps, QH, D}},
      {"decode_keys", &w.decode_keys, {steps, H, D}},
      {"decode_values", &w.decode_values, {steps, H, D}},
  };
  for (const Item& it : items) it.out->resize(w.num_layers);
  for (int32_t l = 0; l < w.num_layers; ++l) {
    const nlohmann::json& layer = m["layers"][l];
    if (!layer.is_object()) return ld.Error(absl::StrCat("layers[", l, "] is not an object"));
    for (const Item& it : items) {
      TRACE_ASSIGN(path, ld.File(layer, it.key, absl::StrCat("layers[", l, "].")));
      NpyArray a;
      TRACE_ASSIGN(a, ld.Array(path, it.shape, true));
      (*it.out)[l] = a.ToFloat();
      for (float x : (*it.out)[l]) {
        if (!std::isfinite(x)) {
          return absl::InvalidArgumentError(absl::StrCat(path, ": holds a non-finite value"));
        }
      }
    }
  }
  if (absl::Status s = w.Validate(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": ", s.message()));
  }
  return w;
}

absl::Status WriteTrace(const Workload& w, const std::string& dir) {
  if (absl::Status s = w.Validate(); !s.ok()) return s;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("cannot create '", dir, "': ", ec.message()));
  const int64_t n = w.prompt_len, H = w.num_kv_heads, QH = w.num_q_heads, D = w.head_dim;
  const int64_t steps = w.decode_steps;
  nlohmann::json m;
  m["format"] = "kvcache-trace";
  m["version"] = 1;
  m["model"] = w.model;
  m["num_layers"] = w.num_layers;
  m["num_kv_heads"] = w.num_kv_heads;
  m["num_q_heads"] = w.num_q_heads;
  m["head_dim"] = w.head_dim;
  m["prompt_len"] = w.prompt_len;
  m["decode_steps"] = w.decode_steps;
  m["query_rows"] = w.query_rows;
  m["positions"] = "positions.npy";
  m["modalities"] = "modalities.npy";
  m["decode_positions"] = "decode_positions.npy";
  auto put = [&](const std::string& name, const NpyArray& a) {
    return WriteFile((fs::path(dir) / name).string(), EncodeNpy(a));
  };
  std::vector<uint8_t> mods;
  for (Modality x : w.modalities) mods.push_back(static_cast<uint8_t>(x));
  if (absl::Status s = put("positions.npy", MakeArray(NpyType::kI32, {n}, w.positions)); !s.ok()) return s;
  if (absl::Status s = put("modalities.npy", MakeArray(NpyType::kU8, {n}, mods)); !s.ok()) return s;
  if (absl::Status s = put("decode_positions.npy", MakeArray(NpyType::kI32, {steps}, w.decode_positions)); !s.ok()) return s;
  nlohmann::json layers = nlohmann::json::array();
  for (int32_t l = 0; l < w.num_layers; ++l) {
    nlohmann::json e;
    const struct {
      const char* key;
      const std::vector<float>* data;
      std::vector<int64_t> shape;
    } items[] = {{"keys", &w.keys[l], {n, H, D}},
                 {"values", &w.values[l], {n, H, D}},
                 {"queries", &w.queries[l], {w.query_rows, QH, D}},
                 {"decode_queries", &w.decode_queries[l], {steps, QH, D}},
                 {"decode_keys", &w.decode_keys[l], {steps, H, D}},
                 {"decode_values", &w.decode_values[l], {steps, H, D}}};
    for (const auto& it : items) {
      const std::string name = absl::StrFormat("layer_%03d_%s.npy", l, it.key);
      if (absl::Status s = put(name, MakeArray(NpyType::kF32, it.shape, *it.data)); !s.ok()) return s;
      e[it.key] = name;
    }
    layers.push_back(e);
  }
  m["layers"] = layers;
  return WriteFile((fs::path(dir) / "manifest.json").string(), m.dump(1) + "\n");
}

}  // namespace kvcache::eval
