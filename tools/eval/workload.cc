// The synthetic LLaVA-like workload generator (docs/EVAL.md, "The default workload").
//
// Per (layer, kv head) the head dimension is split into semantic channels (a sink channel, an
// image channel, a text channel, one channel per image patch prototype) and content channels;
// a seeded signed permutation then scatters them over the head's channels. Logits are designed
// in these coordinates: a query q = sqrt(D) * (sum of semantic coefficients + s_l * w) against a
// key k = (semantic coefficients) + content z gives q.k / sqrt(D) = designed bias + s_l * (w.z).
#include "tools/eval/workload.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace kvcache::eval {
namespace {

// splitmix64: a small, portable generator so a seed gives the same workload everywhere.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double Uniform() { return (Next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
  float Normal() {
    if (have_spare_) {
      have_spare_ = false;
      return spare_;
    }
    double u1 = Uniform();
    while (u1 <= 1e-300) u1 = Uniform();
    const double u2 = Uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = static_cast<float>(r * std::sin(2.0 * M_PI * u2));
    have_spare_ = true;
    return static_cast<float>(r * std::cos(2.0 * M_PI * u2));
  }
  int32_t Below(int32_t n) { return static_cast<int32_t>(Next() % static_cast<uint64_t>(n)); }

 private:
  uint64_t state_;
  bool have_spare_ = false;
  float spare_ = 0.0f;
};

// An independent stream for (seed, a, b, c): order of generation never changes the data.
Rng StreamRng(uint64_t seed, uint64_t a, uint64_t b = 0, uint64_t c = 0) {
  Rng mix(seed ^ 0x5DEECE66Dull);
  uint64_t s = mix.Next();
  for (uint64_t x : {a, b, c}) {
    Rng m(s ^ (x * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull));
    s = m.Next();
  }
  return Rng(s);
}

enum class Kind : uint8_t { kSink, kText, kImage };

// Layout of one head's semantic channels (before the per-head permutation).
struct Channels {
  int32_t dim = 0;
  int32_t prototypes = 0;
  static constexpr int32_t kSink = 0, kImage = 1, kText = 2, kFirstPrototype = 3;
  int32_t first_content() const { return kFirstPrototype + prototypes; }
  int32_t content() const { return dim - first_content(); }
};

int32_t NumPrototypes(int32_t head_dim) { return std::clamp(head_dim / 4, 2, 32); }

// Per (layer, kv head): where each logical channel lands, and its sign.
struct HeadFrame {
  std::vector<int32_t> perm;  // [dim] logical -> physical channel
  std::vector<float> sign;    // [dim]
};

HeadFrame MakeFrame(uint64_t seed, int32_t layer, int32_t head, int32_t dim) {
  Rng rng = StreamRng(seed, 1, layer, head);
  HeadFrame f;
  f.perm.resize(dim);
  std::iota(f.perm.begin(), f.perm.end(), 0);
  for (int32_t i = dim - 1; i > 0; --i) std::swap(f.perm[i], f.perm[rng.Below(i + 1)]);
  f.sign.resize(dim);
  for (float& s : f.sign) s = (rng.Next() & 1) ? 1.0f : -1.0f;
  return f;
}

// Unit-norm (in expectation) random vector over the content channels.
void RandomContent(Rng& rng, int32_t n, float scale, std::vector<float>& out) {
  out.resize(n);
  const float s = scale / std::sqrt(static_cast<float>(n));
  for (float& x : out) x = s * rng.Normal();
}

}  // namespace

int32_t Workload::CountModality(Modality m) const {
  return static_cast<int32_t>(std::count(modalities.begin(), modalities.end(), m));
}

absl::Status Workload::Validate() const {
  if (num_layers < 1 || num_kv_heads < 1 || num_q_heads < 1 || head_dim < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "workload shape must be positive: num_layers=", num_layers, " num_kv_heads=",
        num_kv_heads, " num_q_heads=", num_q_heads, " head_dim=", head_dim));
  }
  if (num_q_heads % num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_q_heads=", num_q_heads,
                                                   " is not a multiple of num_kv_heads=",
                                                   num_kv_heads));
  }
  if (prompt_len < 1 || decode_steps < 1 || query_rows < 1 || query_rows > prompt_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "need prompt_len >= 1, decode_steps >= 1 and 1 <= query_rows <= prompt_len; got prompt_len=",
        prompt_len, " decode_steps=", decode_steps, " query_rows=", query_rows));
  }
  if (positions.size() != static_cast<size_t>(prompt_len) ||
      modalities.size() != static_cast<size_t>(prompt_len)) {
    return absl::InvalidArgumentError(absl::StrCat("positions/modalities must have prompt_len=",
                                                   prompt_len, " entries; got ", positions.size(),
                                                   "/", modalities.size()));
  }
  for (int32_t i = 0; i < prompt_len; ++i) {
    if (positions[i] < 0 || (i > 0 && positions[i] <= positions[i - 1])) {
      return absl::InvalidArgumentError(
          absl::StrCat("positions must be >= 0 and strictly increasing; positions[", i,
                       "]=", positions[i]));
    }
    if (static_cast<int>(modalities[i]) >= kNumModalities) {
      return absl::InvalidArgumentError(absl::StrCat("modalities[", i, "]=",
                                                     static_cast<int>(modalities[i]),
                                                     " is not a modality (0..3)"));
    }
  }
  if (query_positions.size() != static_cast<size_t>(query_rows) ||
      !std::equal(query_positions.begin(), query_positions.end(),
                  positions.end() - query_rows)) {
    return absl::InvalidArgumentError("query_positions must be the last query_rows positions");
  }
  if (decode_positions.size() != static_cast<size_t>(decode_steps)) {
    return absl::InvalidArgumentError(absl::StrCat("decode_positions must have decode_steps=",
                                                   decode_steps, " entries"));
  }
  for (int32_t i = 0; i < decode_steps; ++i) {
    const int32_t prev = i == 0 ? positions.back() : decode_positions[i - 1];
    if (decode_positions[i] <= prev) {
      return absl::InvalidArgumentError(absl::StrCat("decode_positions[", i, "]=",
                                                     decode_positions[i],
                                                     " is not after the previous position ",
                                                     prev));
    }
  }
  const size_t kv = static_cast<size_t>(num_kv_heads) * head_dim;
  const size_t qd = static_cast<size_t>(num_q_heads) * head_dim;
  struct Field {
    const char* name;
    const std::vector<std::vector<float>>* data;
    size_t per_layer;
  };
  const Field fields[] = {
      {"keys", &keys, prompt_len * kv},
      {"values", &values, prompt_len * kv},
      {"queries", &queries, query_rows * qd},
      {"decode_queries", &decode_queries, decode_steps * qd},
      {"decode_keys", &decode_keys, decode_steps * kv},
      {"decode_values", &decode_values, decode_steps * kv},
  };
  for (const Field& f : fields) {
    if (f.data->size() != static_cast<size_t>(num_layers)) {
      return absl::InvalidArgumentError(absl::StrCat(f.name, " has ", f.data->size(),
                                                     " layers; expected ", num_layers));
    }
    for (int32_t l = 0; l < num_layers; ++l) {
      if ((*f.data)[l].size() != f.per_layer) {
        return absl::InvalidArgumentError(absl::StrCat(f.name, "[layer ", l, "] has ",
                                                       (*f.data)[l].size(),
                                                       " elements; expected ", f.per_layer));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateSpec(const SyntheticSpec& s) {
  auto bad = [](const char* knob, int64_t v, const char* why) {
    return absl::InvalidArgumentError(absl::StrCat(knob, "=", v, " ", why));
  };
  if (s.num_layers < 1 || s.num_layers > 1024) return bad("layers", s.num_layers, "is outside [1, 1024]");
  if (s.num_kv_heads < 1 || s.num_kv_heads > 256) return bad("kv-heads", s.num_kv_heads, "is outside [1, 256]");
  if (s.num_q_heads < s.num_kv_heads || s.num_q_heads % s.num_kv_heads != 0 || s.num_q_heads > 1024) {
    return bad("q-heads", s.num_q_heads, "must be a multiple of kv-heads and at most 1024");
  }
  if (s.head_dim < 16 || s.head_dim > 512) return bad("head-dim", s.head_dim, "is outside [16, 512]");
  if (s.system_tokens < 1 || s.system_tokens > 100000) return bad("system-tokens", s.system_tokens, "is outside [1, 100000]");
  if (s.image_tiles < 1 || s.image_tiles > 64) return bad("image-tiles", s.image_tiles, "is outside [1, 64]");
  if (s.image_tokens < s.image_tiles || s.image_tokens > 1000000) {
    return bad("image-tokens", s.image_tokens, "must be at least image-tiles and at most 1000000");
  }
  if (s.question_tokens < 1 || s.question_tokens > 100000) return bad("question-tokens", s.question_tokens, "is outside [1, 100000]");
  if (s.decode_steps < 1 || s.decode_steps > 100000) return bad("steps", s.decode_steps, "is outside [1, 100000]");
  return absl::OkStatus();
}

absl::StatusOr<Workload> GenerateWorkload(const SyntheticSpec& spec) {
  if (absl::Status s = ValidateSpec(spec); !s.ok()) return s;
  Workload w;
  w.model = "synthetic-llava-1.6-7b";
  w.num_layers = spec.num_layers;
  w.num_kv_heads = spec.num_kv_heads;
  w.num_q_heads = spec.num_q_heads;
  w.head_dim = spec.head_dim;
  w.prompt_len = spec.system_tokens + spec.image_tokens + spec.question_tokens;
  w.decode_steps = spec.decode_steps;
  w.query_rows = spec.question_tokens;
  const int32_t n = w.prompt_len, L = w.num_layers, H = w.num_kv_heads, QH = w.num_q_heads;
  const int32_t D = w.head_dim, G = QH / H, steps = w.decode_steps;
  const Channels ch{D, NumPrototypes(D)};
  const int32_t C = ch.content();

  // Token layout: [BOS (sink) + system text][image tiles][question text]; positions 0..n-1.
  std::vector<Kind> kind(n, Kind::kText);
  std::vector<int32_t> proto(n, -1);
  kind[0] = Kind::kSink;
  w.positions.resize(n);
  std::iota(w.positions.begin(), w.positions.end(), 0);
  w.modalities.assign(n, Modality::kText);
  {
    // Patches of a tile lie row-major on a near-square grid; each 3x3 block of patches shows one
    // prototype (a region of similar content), so neighbours are near duplicates.
    Rng rng = StreamRng(spec.seed, 2);
    const int32_t per_tile = spec.image_tokens / spec.image_tiles;
    int32_t j = spec.system_tokens;
    for (int32_t t = 0; t < spec.image_tiles; ++t) {
      const int32_t count = t + 1 == spec.image_tiles
                                ? spec.image_tokens - per_tile * (spec.image_tiles - 1)
                                : per_tile;
      const int32_t width = std::max(1, static_cast<int32_t>(std::ceil(std::sqrt(count))));
      const int32_t blocks_per_row = (width + 2) / 3;
      std::vector<int32_t> region_proto(static_cast<size_t>(blocks_per_row) * blocks_per_row + blocks_per_row + 1);
      for (int32_t& p : region_proto) p = rng.Below(ch.prototypes);
      for (int32_t i = 0; i < count; ++i, ++j) {
        const int32_t region = (i / width / 3) * blocks_per_row + (i % width) / 3;
        kind[j] = Kind::kImage;
        proto[j] = region_proto[std::min<size_t>(region, region_proto.size() - 1)];
        w.modalities[j] = Modality::kImage;
      }
    }
  }
  w.query_positions.assign(w.positions.end() - w.query_rows, w.positions.end());
  w.decode_positions.resize(steps);
  std::iota(w.decode_positions.begin(), w.decode_positions.end(), n);

  w.keys.resize(L);
  w.values.resize(L);
  w.queries.resize(L);
  w.decode_queries.resize(L);
  w.decode_keys.resize(L);
  w.decode_values.resize(L);
  std::vector<float> logical(D), content;
  for (int32_t l = 0; l < L; ++l) {
    const double depth = L > 1 ? static_cast<double>(l) / (L - 1) : 0.0;
    // Layer sharpness s_l: the first two layers are diffuse (dense attention, no sink, as in
    // LLaMA-family models); the others draw s_l from [0.5, 2.5] -> sparsity differs per layer.
    Rng layer_rng = StreamRng(spec.seed, 3, l);
    const float sharp = l < 2 ? 0.3f : static_cast<float>(0.5 + 2.0 * layer_rng.Uniform());
    const float image_bias = static_cast<float>(1.0 - 3.5 * depth);   // deep: image ignored
    const float topic_bias = static_cast<float>(0.5 + 2.5 * (1.0 - depth));
    constexpr float kTextBias = 0.5f;
    w.keys[l].resize(static_cast<size_t>(n) * H * D);
    w.values[l].resize(w.keys[l].size());
    w.queries[l].resize(static_cast<size_t>(w.query_rows) * QH * D);
    w.decode_queries[l].resize(static_cast<size_t>(steps) * QH * D);
    w.decode_keys[l].resize(static_cast<size_t>(steps) * H * D);
    w.decode_values[l].resize(w.decode_keys[l].size());
    for (int32_t h = 0; h < H; ++h) {
      const HeadFrame frame = MakeFrame(spec.seed, l, h, D);
      auto scatter = [&](const std::vector<float>& in, float* out) {
        for (int32_t c = 0; c < D; ++c) out[frame.perm[c]] = frame.sign[c] * in[c];
      };
      Rng rng = StreamRng(spec.seed, 4, l, h);
      // Prototype contents and values, shared by every patch showing that prototype.
      std::vector<std::vector<float>> proto_content(ch.prototypes), proto_value(ch.prototypes);
      for (int32_t p = 0; p < ch.prototypes; ++p) {
        RandomContent(rng, C, 1.0f, proto_content[p]);
        proto_value[p].resize(D);
        for (float& x : proto_value[p]) x = rng.Normal();
      }
      auto make_key = [&](Kind k, int32_t p, float* key, float* value) {
        std::fill(logical.begin(), logical.end(), 0.0f);
        if (k == Kind::kSink) {
          logical[Channels::kSink] = 1.0f;
          RandomContent(rng, C, 0.2f, content);
        } else if (k == Kind::kText) {
          logical[Channels::kText] = 1.0f;
          RandomContent(rng, C, 1.0f, content);
        } else {
          logical[Channels::kImage] = 1.0f;
          logical[Channels::kFirstPrototype + p] = 1.0f;
          RandomContent(rng, C, 0.25f, content);
          for (int32_t c = 0; c < C; ++c) content[c] += proto_content[p][c];
        }
        for (int32_t c = 0; c < C; ++c) logical[ch.first_content() + c] = content[c];
        scatter(logical, key);
        // Values: sinks carry almost nothing (as observed); patches share their prototype's.
        for (int32_t c = 0; c < D; ++c) {
          const float noise = rng.Normal();
          value[c] = k == Kind::kSink    ? 0.05f * noise
                     : k == Kind::kImage ? proto_value[p][c] + 0.3f * noise
                                         : noise;
        }
      };
      for (int32_t j = 0; j < n; ++j) {
        const size_t off = (static_cast<size_t>(j) * H + h) * D;
        make_key(kind[j], proto[j], &w.keys[l][off], &w.values[l][off]);
      }
      for (int32_t t = 0; t < steps; ++t) {
        const size_t off = (static_cast<size_t>(t) * H + h) * D;
        make_key(Kind::kText, -1, &w.decode_keys[l][off], &w.decode_values[l][off]);
      }
      // Queries of the G query heads of this kv head. Each q head has a persistent interest w0
      // (the same tokens stay heavy hitters across rows) and two persistent topic prototypes;
      // every row adds fresh interest and one random topic.
      for (int32_t g = 0; g < G; ++g) {
        const int32_t qh = h * G + g;
        Rng qrng = StreamRng(spec.seed, 5, l, qh);
        const float sink_bias = l < 2 ? 1.0f : static_cast<float>(8.0 + qrng.Uniform());
        std::vector<float> w0(C);
        for (float& x : w0) x = qrng.Normal();
        const int32_t topic_a = qrng.Below(ch.prototypes), topic_b = qrng.Below(ch.prototypes);
        auto make_query = [&](float* q) {
          std::fill(logical.begin(), logical.end(), 0.0f);
          logical[Channels::kSink] = sink_bias;
          logical[Channels::kImage] = image_bias;
          logical[Channels::kText] = kTextBias;
          for (int32_t p : {topic_a, topic_b, qrng.Below(ch.prototypes)}) {
            logical[Channels::kFirstPrototype + p] += topic_bias;
          }
          for (int32_t c = 0; c < C; ++c) {
            logical[ch.first_content() + c] = sharp * (0.8f * w0[c] + 0.6f * qrng.Normal());
          }
          const float root = std::sqrt(static_cast<float>(D));
          for (float& x : logical) x *= root;
          scatter(logical, q);
        };
        for (int32_t r = 0; r < w.query_rows; ++r) {
          make_query(&w.queries[l][(static_cast<size_t>(r) * QH + qh) * D]);
        }
        for (int32_t t = 0; t < steps; ++t) {
          make_query(&w.decode_queries[l][(static_cast<size_t>(t) * QH + qh) * D]);
        }
      }
    }
  }
  return w;
}

}  // namespace kvcache::eval
