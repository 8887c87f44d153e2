// Tests of the CPU attention kernels (cpu/attention.h): the scalar reference and the fast kernel
// against a dense attention computed here in double precision from the same (dequantised) K/V,
// over hand-built paged views with several segments, channel-pruned segments and pages in
// scrambled order; score accumulation; ScoreRows on a hand-computed example and at random.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "cpu/attention.h"
#include "kvcache/backend.h"
#include "kvcache/cache.h"
#include "kvcache/dtype.h"
#include "kvcache/internal/attention_math.h"
#include "kvcache/paged_view.h"

namespace kvcache {
namespace {

// ---- A paged view built by hand ---------------------------------------------------------------

struct SegmentSpec {
  int32_t length = 0;
  std::vector<int32_t> key_channels;  // empty: full width
};

// Owns an arena and the per-segment arrays; view() is a PagedKVView over them. Besides the pages
// it keeps, per stream, the dense data a direct attention needs: keys expanded to head_dim (0 in
// channels a pruned segment does not store) and values, both as stored (dequantised) and as the
// original floats before rounding to the pool dtype.
class TestKV {
 public:
  TestKV(DType dtype, int32_t head_dim, int32_t page_tokens,
         const std::vector<std::vector<SegmentSpec>>& streams, std::mt19937& rng)
      : dtype_(dtype), head_dim_(head_dim) {
    const int64_t page_bytes = int64_t{page_tokens} * 2 * head_dim * DTypeSize(dtype);
    // First pass: shapes and page counts.
    int32_t total_pages = 0;
    offsets_.push_back(0);
    for (const auto& stream : streams) {
      for (const SegmentSpec& spec : stream) {
        auto seg = std::make_unique<Segment>();
        seg->key_channels = spec.key_channels;
        seg->view.length = spec.length;
        seg->view.key_width =
            spec.key_channels.empty() ? head_dim : static_cast<int32_t>(spec.key_channels.size());
        seg->view.value_width = head_dim;
        seg->view.tokens_per_page =
            TokensPerPage(page_bytes, seg->view.key_width, seg->view.value_width, dtype);
        seg->pages.resize(CeilDiv(spec.length, seg->view.tokens_per_page));
        total_pages += static_cast<int32_t>(seg->pages.size());
        segments_.push_back(std::move(seg));
      }
      offsets_.push_back(static_cast<int32_t>(segments_.size()));
    }
    // Pages in scrambled order, with unused pages in between.
    const int32_t num_pages = total_pages + 3;
    std::vector<int32_t> page_ids(num_pages);
    std::iota(page_ids.begin(), page_ids.end(), 0);
    std::shuffle(page_ids.begin(), page_ids.end(), rng);
    arena_.assign(static_cast<size_t>(num_pages * page_bytes), 0xAB);  // garbage, not zeros
    pool_.base = arena_.data();
    pool_.page_bytes = page_bytes;
    pool_.num_pages = num_pages;
    pool_.dtype = dtype;

    std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
    std::uniform_int_distribution<int32_t> gap(1, 3);
    int32_t next_page = 0;
    for (size_t i = 0; i + 1 < offsets_.size(); ++i) {
      StreamData data;
      int32_t position = gap(rng) - 1;
      for (int32_t s = offsets_[i]; s < offsets_[i + 1]; ++s) {
        Segment& seg = *segments_[s];
        for (int32_t& p : seg.pages) p = page_ids[next_page++];
        seg.view.pages = seg.pages.data();
        seg.view.key_channels = seg.key_channels.empty() ? nullptr : seg.key_channels.data();
        for (int32_t t = 0; t < seg.view.length; ++t) {
          seg.positions.push_back(position);
          data.positions.push_back(position);
          position += gap(rng);
          std::vector<float> raw_key(head_dim), raw_value(head_dim);
          for (float& x : raw_key) x = uniform(rng);
          for (float& x : raw_value) x = uniform(rng);
          std::vector<float> key(head_dim, 0.0f), raw_key_kept(head_dim, 0.0f);
          uint8_t* k = SegmentKeyRow(pool_, seg.view, t);
          for (int32_t c = 0; c < seg.view.key_width; ++c) {
            const int32_t channel = seg.key_channels.empty() ? c : seg.key_channels[c];
            StoreFromFloat(k, dtype, c, raw_key[channel]);
            key[channel] = LoadAsFloat(k, dtype, c);
            raw_key_kept[channel] = raw_key[channel];
          }
          uint8_t* v = SegmentValueRow(pool_, seg.view, t);
          for (int32_t c = 0; c < head_dim; ++c) {
            StoreFromFloat(v, dtype, c, raw_value[c]);
            data.values.push_back(LoadAsFloat(v, dtype, c));
          }
          data.keys.insert(data.keys.end(), key.begin(), key.end());
          data.raw_keys.insert(data.raw_keys.end(), raw_key_kept.begin(), raw_key_kept.end());
          data.raw_values.insert(data.raw_values.end(), raw_value.begin(), raw_value.end());
        }
        seg.modalities.assign(seg.view.length, 0);
        seg.scores.assign(seg.view.length, 0.0f);
      }
      streams_.push_back(std::move(data));
    }
    for (auto& seg : segments_) {
      seg->view.positions = seg->positions.data();
      seg->view.modalities = seg->modalities.data();
      seg->view.scores = seg->scores.data();
      views_.push_back(seg->view);
    }
  }

  PagedKVView view() const {
    PagedKVView v;
    v.pool = pool_;
    v.head_dim = head_dim_;
    v.num_streams = static_cast<int32_t>(streams_.size());
    v.stream_segment_offsets = offsets_.data();
    v.segments = views_.data();
    return v;
  }

  int32_t num_streams() const { return static_cast<int32_t>(streams_.size()); }
  int64_t length(int32_t stream) const {
    return static_cast<int64_t>(streams_[stream].positions.size());
  }
  const std::vector<float>& keys(int32_t s) const { return streams_[s].keys; }  // [n, D]
  const std::vector<float>& values(int32_t s) const { return streams_[s].values; }
  const std::vector<float>& raw_keys(int32_t s) const { return streams_[s].raw_keys; }
  const std::vector<float>& raw_values(int32_t s) const { return streams_[s].raw_values; }
  const std::vector<int32_t>& positions(int32_t s) const { return streams_[s].positions; }

  // Score accumulators of stream s in token order.
  std::vector<float> Scores(int32_t s) const {
    std::vector<float> out;
    for (int32_t i = offsets_[s]; i < offsets_[s + 1]; ++i) {
      out.insert(out.end(), segments_[i]->scores.begin(), segments_[i]->scores.end());
    }
    return out;
  }
  void FillScores(float value) {
    for (auto& seg : segments_) std::fill(seg->scores.begin(), seg->scores.end(), value);
  }

 private:
  struct Segment {
    SegmentView view;
    std::vector<int32_t> pages, key_channels, positions;
    std::vector<uint8_t> modalities;
    std::vector<float> scores;
  };
  struct StreamData {
    std::vector<float> keys, values, raw_keys, raw_values;  // [n, D]
    std::vector<int32_t> positions;                         // [n]
  };

  DType dtype_;
  int32_t head_dim_;
  PoolView pool_;
  std::vector<uint8_t> arena_;
  std::vector<std::unique_ptr<Segment>> segments_;
  std::vector<SegmentView> views_;
  std::vector<int32_t> offsets_;
  std::vector<StreamData> streams_;
};

// ---- Dense oracle ------------------------------------------------------------------------------

struct DenseHead {
  std::vector<double> out;  // [D]
  double lse = -INFINITY;
  std::vector<double> probs;  // [n]
};

// softmax(scale * q . k_t) over the tokens t with visible[t] (all when visible is empty).
DenseHead DenseAttention(const std::vector<float>& keys, const std::vector<float>& values,
                         int64_t n, int32_t d, const float* q, double scale,
                         const std::vector<uint8_t>& visible = {}) {
  DenseHead r;
  r.out.assign(d, 0.0);
  r.probs.assign(n, 0.0);
  std::vector<double> logits(n, -INFINITY);
  double m = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    if (!visible.empty() && !visible[t]) continue;
    double dot = 0.0;
    for (int32_t c = 0; c < d; ++c) dot += static_cast<double>(q[c]) * keys[t * d + c];
    logits[t] = scale * dot;
    m = std::max(m, logits[t]);
  }
  if (m == -INFINITY) return r;
  double l = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    if (logits[t] != -INFINITY) l += std::exp(logits[t] - m);
  }
  for (int64_t t = 0; t < n; ++t) {
    if (logits[t] == -INFINITY) continue;
    r.probs[t] = std::exp(logits[t] - m) / l;
    for (int32_t c = 0; c < d; ++c) r.out[c] += r.probs[t] * values[t * d + c];
  }
  r.lse = m + std::log(l);
  return r;
}

double Aggregate(const std::vector<double>& per_head, GqaAggregation a) {
  if (a == GqaAggregation::kMax) return *std::max_element(per_head.begin(), per_head.end());
  const double sum = std::accumulate(per_head.begin(), per_head.end(), 0.0);
  return a == GqaAggregation::kSum ? sum : sum / static_cast<double>(per_head.size());
}

std::vector<float> RandomQueries(int64_t count, float magnitude, std::mt19937& rng) {
  std::uniform_real_distribution<float> uniform(-magnitude, magnitude);
  std::vector<float> q(count);
  for (float& x : q) x = uniform(rng);
  return q;
}

// Random ascending subset of [0, d) with `keep` channels.
std::vector<int32_t> RandomChannels(int32_t d, int32_t keep, std::mt19937& rng) {
  std::vector<int32_t> all(d);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(keep);
  std::sort(all.begin(), all.end());
  return all;
}

// Splits `length` tokens into up to three segments; the first of several is channel-pruned.
std::vector<SegmentSpec> RandomStream(int32_t length, int32_t d, std::mt19937& rng) {
  std::vector<SegmentSpec> specs;
  if (length <= 2) {
    specs.push_back({length, {}});
    return specs;
  }
  std::uniform_int_distribution<int32_t> cut(1, length - 1);
  int32_t a = cut(rng), b = cut(rng);
  if (a > b) std::swap(a, b);
  specs.push_back({a, RandomChannels(d, d * 3 / 5, rng)});
  if (b > a) specs.push_back({b - a, {}});
  specs.push_back({0, {}});  // an empty segment must be harmless
  specs.push_back({length - b, {}});
  return specs;
}

const char* Name(DType t) { return t == DType::kF32 ? "f32" : t == DType::kF16 ? "f16" : "bf16"; }

// ---- attention_math.h -------------------------------------------------------------------------

TEST_CASE("attention_math: online steps and merges equal a direct softmax", "[attention_math]") {
  const float logits[5] = {0.5f, -1.0f, 3.0f, 2.0f, -INFINITY};
  const float values[5] = {1.0f, 2.0f, 3.0f, 4.0f, 100.0f};
  double m = 3.0, l = 0.0, acc = 0.0;
  for (int t = 0; t < 4; ++t) {
    l += std::exp(logits[t] - m);
    acc += std::exp(logits[t] - m) * values[t];
  }
  // One piece per key split at every position, merged in order.
  for (int split = 0; split <= 5; ++split) {
    SoftmaxState a, b;
    float acc_a = 0.0f, acc_b = 0.0f;
    for (int t = 0; t < split; ++t) OnlineSoftmaxAccumulate(a, &acc_a, logits[t], &values[t], 1);
    for (int t = split; t < 5; ++t) OnlineSoftmaxAccumulate(b, &acc_b, logits[t], &values[t], 1);
    MergeSoftmaxStates(a, &acc_a, b, &acc_b, 1);
    float out;
    FinalizeSoftmax(a, &acc_a, &out, 1);
    CAPTURE(split);
    CHECK(out == Approx(acc / l).epsilon(1e-6));
    CHECK(SoftmaxLse(a) == Approx(m + std::log(l)).epsilon(1e-6));
    CHECK(SoftmaxProbability(a, logits[2]) == Approx(1.0 / l).epsilon(1e-6));
  }
  SoftmaxState empty;
  float acc_e = 0.0f, out_e = 1.0f;
  FinalizeSoftmax(empty, &acc_e, &out_e, 1);
  CHECK(out_e == 0.0f);
  CHECK(SoftmaxLse(empty) == -INFINITY);
  SoftmaxState only_neg_inf;
  float acc_n = 0.0f;
  OnlineSoftmaxAccumulate(only_neg_inf, &acc_n, -INFINITY, &values[0], 1);
  CHECK(only_neg_inf.l == 0.0f);
  CHECK(acc_n == 0.0f);
}

// ---- Decode attention -------------------------------------------------------------------------

// Runs the fast kernels with at most `cap` while alive (they otherwise pick the best instruction
// set the CPU has, and the other code paths would go untested on such a machine).
class IsaLimit {
 public:
  explicit IsaLimit(cpu::KernelIsa cap) { cpu::LimitKernelIsa(cap); }
  ~IsaLimit() { cpu::LimitKernelIsa(cpu::KernelIsa::kAvx512); }
};

// Every instruction set the fast kernels can use on this CPU, portable first.
std::vector<cpu::KernelIsa> AvailableIsas() {
  std::vector<cpu::KernelIsa> isas;
  for (cpu::KernelIsa isa : {cpu::KernelIsa::kPortable, cpu::KernelIsa::kAvx2, cpu::KernelIsa::kAvx512}) {
    IsaLimit limit(isa);
    if (cpu::ActiveKernelIsa() == isa) isas.push_back(isa);
  }
  return isas;
}

struct DecodeRun {
  std::vector<float> out, lse;
};

DecodeRun RunDecode(bool fast, const PagedKVView& view, const DecodeParams& params,
                    const std::vector<float>& q) {
  DecodeRun r;
  r.out.assign(static_cast<size_t>(view.num_streams) * params.group_size * view.head_dim, 7.0f);
  r.lse.assign(static_cast<size_t>(view.num_streams) * params.group_size, 7.0f);
  const absl::Status s =
      fast ? cpu::DecodeAttentionFast(view, params, q.data(), r.out.data(), r.lse.data())
           : cpu::DecodeAttentionReference(view, params, q.data(), r.out.data(), r.lse.data());
  REQUIRE(s.ok());
  return r;
}

// Largest |a - b| over the outputs (and lse) against the dense oracle on the stored values;
// also the largest error against the un-rounded original floats (the dtype's own error).
struct Errors {
  double out = 0.0, lse = 0.0, out_vs_raw = 0.0;
};

Errors CompareWithDense(const TestKV& kv, const DecodeParams& params, const std::vector<float>& q,
                        const DecodeRun& run) {
  Errors e;
  const int32_t d = kv.view().head_dim, group = params.group_size;
  const double scale =
      params.scale != 0.0f ? params.scale : 1.0 / std::sqrt(static_cast<double>(d));
  for (int32_t i = 0; i < kv.num_streams(); ++i) {
    for (int32_t g = 0; g < group; ++g) {
      const int64_t head = int64_t{i} * group + g;
      const float* qh = q.data() + head * d;
      const DenseHead dense = DenseAttention(kv.keys(i), kv.values(i), kv.length(i), d, qh, scale);
      const DenseHead raw =
          DenseAttention(kv.raw_keys(i), kv.raw_values(i), kv.length(i), d, qh, scale);
      for (int32_t c = 0; c < d; ++c) {
        e.out = std::max(e.out, std::abs(run.out[head * d + c] - dense.out[c]));
        e.out_vs_raw = std::max(e.out_vs_raw, std::abs(run.out[head * d + c] - raw.out[c]));
      }
      if (kv.length(i) == 0) {
        // Empty stream: exactly 0 and -inf, no tolerance.
        e.lse = std::max(e.lse, run.lse[head] == -INFINITY ? 0.0 : 1e9);
      } else {
        e.lse = std::max(e.lse, std::abs(run.lse[head] - dense.lse));
      }
    }
  }
  return e;
}

// What rounding K/V to the pool dtype may cost in the output (vs the original floats), measured
// with margin on these distributions: f32 rounds nothing, f16 keeps 11 bits, bf16 8 bits.
double RawTolerance(DType t) { return t == DType::kF32 ? 2e-6 : t == DType::kF16 ? 2e-3 : 1.5e-2; }

TEST_CASE("decode: reference and fast equal dense attention over paged segments", "[decode]") {
  std::mt19937 rng(1234);
  // Tolerance against the dense oracle on the stored values: only f32 summation order differs.
  constexpr double kOutTolerance = 2e-6;
  constexpr double kLseTolerance = 1e-5;
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    // G = 6 and D = 36 exercise the head-group and channel tails of the vector kernels.
    for (int32_t group : {1, 4, 8, 6}) {
      for (int32_t d : {64, 128, 80, 36}) {
        const int32_t page_tokens = group == 4 ? 64 : 16;
        for (int32_t length : {1, page_tokens - 1, page_tokens, page_tokens + 1, 3001}) {
          // Two streams of different lengths plus an empty one: batch 3.
          std::vector<std::vector<SegmentSpec>> streams = {
              RandomStream(length, d, rng), {}, RandomStream(length / 2 + 1, d, rng)};
          TestKV kv(dtype, d, page_tokens, streams, rng);
          DecodeParams params;
          params.group_size = group;
          const std::vector<float> q =
              RandomQueries(int64_t{kv.num_streams()} * group * d, 3.0f, rng);
          const DecodeRun ref = RunDecode(false, kv.view(), params, q);
          const DecodeRun fast = RunDecode(true, kv.view(), params, q);
          INFO("dtype " << Name(dtype) << " G " << group << " D " << d << " length " << length);
          for (cpu::KernelIsa isa : AvailableIsas()) {
            DecodeRun limited;
            {
              IsaLimit limit(isa);
              limited = RunDecode(true, kv.view(), params, q);
            }
            INFO("kernel " << cpu::KernelIsaName(isa));
            const Errors e_limited = CompareWithDense(kv, params, q, limited);
            CHECK(e_limited.out <= kOutTolerance);
            CHECK(e_limited.lse <= kLseTolerance);
          }
          const Errors e_ref = CompareWithDense(kv, params, q, ref);
          const Errors e_fast = CompareWithDense(kv, params, q, fast);
          CHECK(e_ref.out <= kOutTolerance);
          CHECK(e_ref.lse <= kLseTolerance);
          CHECK(e_fast.out <= kOutTolerance);
          CHECK(e_fast.lse <= kLseTolerance);
          CHECK(e_fast.out_vs_raw <= RawTolerance(dtype));
          // The empty stream (index 1) yields exact zeros.
          for (int64_t j = 0; j < int64_t{group} * d; ++j) {
            REQUIRE(fast.out[int64_t{group} * d + j] == 0.0f);
            REQUIRE(ref.out[int64_t{group} * d + j] == 0.0f);
          }
        }
      }
    }
  }
}

TEST_CASE("decode: blocks that span several pages, G = 4 and D = 128", "[decode]") {
  // The headline shape (G = 4 register tiles, D = 128) over pages of 1, 3, 7 and 16 tokens: a
  // block never crosses a page, so tiny pages give blocks of 1-7 rows (the tiles' row tails) and
  // page runs that start and end mid-page (the segment cuts, the task splits of the 2600-token
  // stream). A kernel that gathers blocks across pages must pass it unchanged.
  std::mt19937 rng(77);
  const int32_t d = 128, group = 4;
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int32_t page_tokens : {1, 3, 7, 16}) {
      std::vector<std::vector<SegmentSpec>> streams = {RandomStream(2600, d, rng),
                                                       RandomStream(45, d, rng)};
      TestKV kv(dtype, d, page_tokens, streams, rng);
      DecodeParams params;
      params.group_size = group;
      const std::vector<float> q =
          RandomQueries(int64_t{kv.num_streams()} * group * d, 3.0f, rng);
      for (cpu::KernelIsa isa : AvailableIsas()) {
        DecodeRun run;
        {
          IsaLimit limit(isa);
          run = RunDecode(true, kv.view(), params, q);
        }
        INFO("dtype " << Name(dtype) << " page tokens " << page_tokens << " kernel "
                      << cpu::KernelIsaName(isa));
        const Errors e = CompareWithDense(kv, params, q, run);
        CHECK(e.out <= 2e-6);
        CHECK(e.lse <= 1e-5);
      }
    }
  }
}

TEST_CASE("decode: explicit scale, null lse, long single stream split across tasks", "[decode]") {
  std::mt19937 rng(99);
  const int32_t d = 128, group = 4;
  // One stream of 20000 tokens: the fast kernel must split it into several key ranges.
  TestKV kv(DType::kF16, d, 16, {RandomStream(20000, d, rng)}, rng);
  DecodeParams params;
  params.group_size = group;
  params.scale = 0.3f;
  const std::vector<float> q = RandomQueries(int64_t{group} * d, 2.0f, rng);
  std::vector<float> out(int64_t{group} * d);
  REQUIRE(cpu::DecodeAttentionFast(kv.view(), params, q.data(), out.data(), nullptr).ok());
  DecodeRun run{out, std::vector<float>(group, 0.0f)};
  for (int32_t g = 0; g < group; ++g) {
    run.lse[g] = static_cast<float>(
        DenseAttention(kv.keys(0), kv.values(0), kv.length(0), d, q.data() + g * d, 0.3).lse);
  }
  CHECK(CompareWithDense(kv, params, q, run).out <= 2e-6);
}

TEST_CASE("decode: the optional whole-page prefetch changes no result", "[decode]") {
  std::mt19937 rng(5);
  const int32_t d = 64, group = 4;
  // Multi-segment streams (compacted runs in front of a tail) of lengths that end mid-page, and a
  // long one split into several tasks: the prefetch walks ahead to each range's last page only.
  std::vector<std::vector<SegmentSpec>> streams = {RandomStream(3001, d, rng),
                                                   RandomStream(37, d, rng),
                                                   RandomStream(9000, d, rng)};
  for (int32_t page_tokens : {16, 64}) {
    TestKV kv(DType::kF16, d, page_tokens, streams, rng);
    DecodeParams params;
    params.group_size = group;
    const std::vector<float> q = RandomQueries(int64_t{kv.num_streams()} * group * d, 2.0f, rng);
    const DecodeRun plain = RunDecode(true, kv.view(), params, q);
    for (int pages : {1, 3, 100}) {
      INFO("page tokens " << page_tokens << " prefetch pages " << pages);
      const int previous = cpu::SetDecodePrefetchPages(pages);
      REQUIRE(cpu::DecodePrefetchPages() == pages);
      const DecodeRun prefetched = RunDecode(true, kv.view(), params, q);
      cpu::SetDecodePrefetchPages(previous);
      REQUIRE(prefetched.out == plain.out);
      REQUIRE(prefetched.lse == plain.lse);
    }
  }
  CHECK(cpu::DecodePrefetchPages() == 0);
}

TEST_CASE("decode: score accumulation adds the aggregated probabilities", "[decode][scores]") {
  for (cpu::KernelIsa isa : AvailableIsas()) {  // the score pass is compiled per ISA too
    IsaLimit limit(isa);
    std::mt19937 rng(77);
    for (GqaAggregation aggregation :
         {GqaAggregation::kMean, GqaAggregation::kSum, GqaAggregation::kMax}) {
      for (int32_t group : {1, 4}) {
        for (int32_t length : {1, 17, 2500}) {
          const int32_t d = 64;
          std::vector<std::vector<SegmentSpec>> streams = {RandomStream(length, d, rng),
                                                           RandomStream(length + 3, d, rng)};
          std::mt19937 rng_copy = rng;
          TestKV fast_kv(DType::kF16, d, 16, streams, rng);
          TestKV ref_kv(DType::kF16, d, 16, streams, rng_copy);  // identical data
          fast_kv.FillScores(0.25f);
          ref_kv.FillScores(0.25f);
          DecodeParams params;
          params.group_size = group;
          params.accumulate_scores = true;
          params.aggregation = aggregation;
          const std::vector<float> q =
              RandomQueries(int64_t{fast_kv.num_streams()} * group * d, 3.0f, rng);
          const DecodeRun fast = RunDecode(true, fast_kv.view(), params, q);
          const DecodeRun ref = RunDecode(false, ref_kv.view(), params, q);
          INFO("aggregation " << static_cast<int>(aggregation) << " G " << group << " length "
                              << length);
          // Accumulation must not change the attention output itself.
          params.accumulate_scores = false;
          CHECK(CompareWithDense(fast_kv, params, q, fast).out <= 2e-6);
          const double scale = 1.0 / std::sqrt(static_cast<double>(d));
          for (int32_t i = 0; i < fast_kv.num_streams(); ++i) {
            const std::vector<float> fs = fast_kv.Scores(i), rs = ref_kv.Scores(i);
            std::vector<DenseHead> heads;
            for (int32_t g = 0; g < group; ++g) {
              heads.push_back(DenseAttention(fast_kv.keys(i), fast_kv.values(i), fast_kv.length(i), d,
                                             q.data() + (int64_t{i} * group + g) * d, scale));
            }
            double fast_sum = 0.0;
            for (int64_t t = 0; t < fast_kv.length(i); ++t) {
              std::vector<double> per_head;
              for (const DenseHead& h : heads) per_head.push_back(h.probs[t]);
              const double expected = 0.25 + Aggregate(per_head, aggregation);
              REQUIRE(std::abs(fs[t] - expected) <= 1e-7 + 1e-5 * expected);
              REQUIRE(std::abs(rs[t] - expected) <= 1e-7 + 1e-5 * expected);
              fast_sum += fs[t] - 0.25;
            }
            if (aggregation == GqaAggregation::kMean) CHECK(fast_sum == Approx(1.0).epsilon(1e-4));
            if (aggregation == GqaAggregation::kSum) CHECK(fast_sum == Approx(group).epsilon(1e-4));
            if (aggregation == GqaAggregation::kMax) CHECK(fast_sum >= 1.0 - 1e-4);
          }
        }
      }
    }
  }
}

TEST_CASE("decode: kernel instruction-set dispatch and caps", "[decode]") {
  const std::vector<cpu::KernelIsa> isas = AvailableIsas();
  REQUIRE(!isas.empty());
  CHECK(isas.front() == cpu::KernelIsa::kPortable);  // always available
  // With no cap the best available one runs; a cap is honoured; lifting it restores the best.
  CHECK(cpu::ActiveKernelIsa() == isas.back());
  CHECK(cpu::LimitKernelIsa(cpu::KernelIsa::kPortable) == cpu::KernelIsa::kPortable);
  CHECK(cpu::ActiveKernelIsa() == cpu::KernelIsa::kPortable);
  CHECK(cpu::LimitKernelIsa(cpu::KernelIsa::kAvx512) == isas.back());
  CHECK(std::string(cpu::KernelIsaName(cpu::KernelIsa::kAvx512)) == "avx512");
  CHECK(std::string(cpu::KernelIsaName(cpu::KernelIsa::kAvx2)) == "avx2");
  CHECK(std::string(cpu::KernelIsaName(cpu::KernelIsa::kPortable)) == "portable");
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // multiversioned builds
  // Every x86-64 CPU this project targets has AVX2 (the dispatch must find it when present).
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    CHECK(std::find(isas.begin(), isas.end(), cpu::KernelIsa::kAvx2) != isas.end());
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    CHECK(isas.back() == cpu::KernelIsa::kAvx512);
  }
#endif
}

// ---- ScoreRows ---------------------------------------------------------------------------------

struct ScoreRun {
  std::vector<float> scores;
  std::vector<int64_t> below, causal;
};

// fast selects ScoreRowsFast (or, with pairwise, its pre-blocking benchmark baseline) over
// ScoreRowsReference.
ScoreRun RunScoreRows(bool fast, const PagedKVView& view, const ScoreRowsParams& params,
                      const std::vector<float>& queries, const std::vector<int32_t>& positions,
                      int64_t total_tokens, bool pairwise = false) {
  ScoreRun r;
  // Garbage first: every output is overwritten, not accumulated.
  r.scores.assign(total_tokens, 9.0f);
  r.below.assign(static_cast<size_t>(view.num_streams) * params.group_size, 99);
  r.causal.assign(static_cast<size_t>(view.num_streams) * params.group_size, 99);
  const absl::Status s =
      fast && pairwise
          ? cpu::ScoreRowsFastPairwise(view, params, queries.data(), positions.data(),
                                       r.scores.data(), r.below.data(), r.causal.data())
      : fast ? cpu::ScoreRowsFast(view, params, queries.data(), positions.data(), r.scores.data(),
                                r.below.data(), r.causal.data())
           : cpu::ScoreRowsReference(view, params, queries.data(), positions.data(),
                                     r.scores.data(), r.below.data(), r.causal.data());
  REQUIRE(s.ok());
  return r;
}

TEST_CASE("score rows: hand-computed example", "[score_rows]") {
  // One stream, 3 keys of width 2 at positions 2, 3, 5; G = 2 query heads, scale 1.
  // Head 0 uses q = (1, 0) so the logits are the keys' first channel: 0, ln 2, ln 4 — the
  // softmax over all three is 1/7, 2/7, 4/7. Head 1 uses q = 0: a uniform softmax.
  // Row 0 at position 3 sees keys 0, 1; row 1 at position 7 sees all; row 2 at position 1 sees
  // none and contributes nothing.
  std::mt19937 rng(1);
  TestKV kv(DType::kF32, 2, 2, {{{3, {}}}}, rng);
  PagedKVView view = kv.view();
  // Overwrite the random rows with the example (f32 pool: stored exactly).
  const float keys[3][2] = {{0.0f, 5.0f}, {std::log(2.0f), -3.0f}, {std::log(4.0f), 1.0f}};
  const int32_t positions[3] = {2, 3, 5};
  std::vector<int32_t> pos_store(positions, positions + 3);
  SegmentView seg = view.segments[0];
  seg.positions = pos_store.data();
  for (int t = 0; t < 3; ++t) {
    for (int c = 0; c < 2; ++c)
      StoreFromFloat(SegmentKeyRow(view.pool, seg, t), DType::kF32, c, keys[t][c]);
  }
  view.segments = &seg;
  // queries [rows 3, q_heads 2, D 2]
  const std::vector<float> queries = {1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0};
  const std::vector<int32_t> rows = {3, 7, 1};
  ScoreRowsParams params;
  params.group_size = 2;
  params.scale = 1.0f;
  params.num_rows = 3;
  params.sparsity_threshold = 0.4f;

  const double h0_r0[2] = {1.0 / 3, 2.0 / 3}, h1_r0[2] = {0.5, 0.5};
  const double h0_r1[3] = {1.0 / 7, 2.0 / 7, 4.0 / 7}, h1_r1[3] = {1.0 / 3, 1.0 / 3, 1.0 / 3};
  for (GqaAggregation a : {GqaAggregation::kMean, GqaAggregation::kSum, GqaAggregation::kMax}) {
    params.aggregation = a;
    auto agg = [a](double x, double y) {
      return a == GqaAggregation::kMean  ? (x + y) / 2
             : a == GqaAggregation::kSum ? x + y
                                         : std::max(x, y);
    };
    const double expected[3] = {agg(h0_r0[0], h1_r0[0]) + agg(h0_r1[0], h1_r1[0]),
                                agg(h0_r0[1], h1_r0[1]) + agg(h0_r1[1], h1_r1[1]),
                                agg(h0_r1[2], h1_r1[2])};
    for (bool fast : {false, true}) {
      INFO((fast ? "fast" : "reference") << " aggregation " << static_cast<int>(a));
      const ScoreRun r = RunScoreRows(fast, view, params, queries, rows, 3);
      for (int t = 0; t < 3; ++t) CHECK(r.scores[t] == Approx(expected[t]).epsilon(1e-6));
      // Head 0: row 0 max 2/3, threshold 0.267: none below; row 1 max 4/7, threshold 0.229:
      // 1/7 below. Head 1 is uniform: nothing below. Causal entries: 2 + 3 per head.
      CHECK(r.below == std::vector<int64_t>{1, 0});
      CHECK(r.causal == std::vector<int64_t>{5, 5});
    }
  }
}

TEST_CASE("score rows: fast and reference equal dense softmax with the causal rule",
          "[score_rows]") {
  std::mt19937 rng(4321);
  // The fast kernel works on register tiles of 16 keys x 6 (AVX2) or 4 (portable) query
  // vectors: the shapes below leave partial tiles everywhere — rows * G not a multiple of 4 or
  // 6 (G = 3, rows 7), pages of 7 tokens (short key tiles inside a segment), an odd head_dim
  // (37) and pruned segments of 3/5 of the channels (48 and 22 wide), streams of 17 tokens.
  struct Shape {
    int32_t head_dim, page_tokens;
  };
  for (const Shape shape : {Shape{80, 16}, Shape{37, 7}})
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int32_t group : {1, 3, 4}) {
      for (int32_t num_rows : {1, 7, 40}) {
        const int32_t d = shape.head_dim;
        std::vector<std::vector<SegmentSpec>> streams = {
            RandomStream(300, d, rng), RandomStream(17, d, rng), {}, RandomStream(1200, d, rng)};
        TestKV kv(dtype, d, shape.page_tokens, streams, rng);
        int64_t total = 0;
        int32_t max_position = 0;
        for (int32_t i = 0; i < kv.num_streams(); ++i) {
          total += kv.length(i);
          if (kv.length(i) > 0) max_position = std::max(max_position, kv.positions(i).back());
        }
        // Row positions spread over the whole range, including before the first key.
        std::uniform_int_distribution<int32_t> pos(-1, max_position + 2);
        std::vector<int32_t> rows(num_rows);
        for (int32_t& p : rows) p = pos(rng);
        rows[0] = max_position;  // at least one row sees every key
        ScoreRowsParams params;
        params.group_size = group;
        params.num_rows = num_rows;
        params.sparsity_threshold = 0.05f;
        // Every aggregation across the shapes (the fast kernels aggregate vectorised).
        params.aggregation = static_cast<GqaAggregation>((group + num_rows) % 3);
        const int64_t q_heads = int64_t{kv.num_streams()} * group;
        const std::vector<float> queries = RandomQueries(num_rows * q_heads * d, 4.0f, rng);
        const ScoreRun ref = RunScoreRows(false, kv.view(), params, queries, rows, total);
        const ScoreRun fast = RunScoreRows(true, kv.view(), params, queries, rows, total);
        ScoreRun portable;
        {
          IsaLimit force(cpu::KernelIsa::kPortable);
          portable = RunScoreRows(true, kv.view(), params, queries, rows, total);
        }
        const ScoreRun pairwise = RunScoreRows(true, kv.view(), params, queries, rows, total, true);
        INFO("dtype " << Name(dtype) << " G " << group << " rows " << num_rows << " head_dim "
                      << d << " page tokens " << shape.page_tokens << " aggregation "
                      << static_cast<int>(params.aggregation));
        // Below-threshold counts are compared with the dense double-precision count further down
        // (exactly, up to the entries within float rounding of the threshold).
        CHECK(pairwise.causal == ref.causal);
        for (size_t t = 0; t < ref.scores.size(); ++t) {
          REQUIRE(std::abs(pairwise.scores[t] - ref.scores[t]) <= 1e-7 + 1e-5 * ref.scores[t]);
        }
        CHECK(portable.causal == ref.causal);
        for (size_t t = 0; t < ref.scores.size(); ++t) {
          REQUIRE(std::abs(portable.scores[t] - ref.scores[t]) <= 1e-7 + 1e-5 * ref.scores[t]);
        }
        for (cpu::KernelIsa isa : AvailableIsas()) {  // every vector code path on this CPU
          if (isa == cpu::KernelIsa::kPortable) continue;
          ScoreRun limited;
          {
            IsaLimit limit(isa);
            limited = RunScoreRows(true, kv.view(), params, queries, rows, total);
          }
          INFO("kernel " << cpu::KernelIsaName(isa));
          CHECK(limited.causal == ref.causal);
          for (size_t t = 0; t < ref.scores.size(); ++t) {
            REQUIRE(std::abs(limited.scores[t] - ref.scores[t]) <= 1e-7 + 1e-5 * ref.scores[t]);
          }
        }
        CHECK(fast.causal == ref.causal);
        const double scale = 1.0 / std::sqrt(static_cast<double>(d));
        int64_t base = 0;
        for (int32_t i = 0; i < kv.num_streams(); ++i) {
          const int64_t n = kv.length(i);
          std::vector<double> expected(n, 0.0);
          std::vector<int64_t> below(group, 0), causal(group, 0);
          // Entries so close to the threshold that float rounding may put them on either side.
          std::vector<int64_t> ambiguous(group, 0);
          for (int32_t r = 0; r < num_rows; ++r) {
            std::vector<uint8_t> visible(n);
            for (int64_t t = 0; t < n; ++t) visible[t] = kv.positions(i)[t] <= rows[r];
            if (std::count(visible.begin(), visible.end(), 1) == 0) continue;
            std::vector<DenseHead> heads;
            for (int32_t g = 0; g < group; ++g) {
              const float* qh = queries.data() + (r * q_heads + int64_t{i} * group + g) * d;
              heads.push_back(DenseAttention(kv.keys(i), kv.values(i), n, d, qh, scale, visible));
              const double row_max =
                  *std::max_element(heads[g].probs.begin(), heads[g].probs.end());
              for (int64_t t = 0; t < n; ++t) {
                if (!visible[t]) continue;
                ++causal[g];
                const double threshold = params.sparsity_threshold * row_max;
                below[g] += heads[g].probs[t] < threshold;
                ambiguous[g] += std::abs(heads[g].probs[t] - threshold) <= 1e-5 * threshold;
              }
            }
            for (int64_t t = 0; t < n; ++t) {
              if (!visible[t]) continue;
              std::vector<double> per_head;
              for (const DenseHead& h : heads) per_head.push_back(h.probs[t]);
              expected[t] += Aggregate(per_head, params.aggregation);
            }
          }
          for (int64_t t = 0; t < n; ++t) {
            REQUIRE(std::abs(ref.scores[base + t] - expected[t]) <= 1e-7 + 1e-5 * expected[t]);
            REQUIRE(std::abs(fast.scores[base + t] - expected[t]) <= 1e-7 + 1e-5 * expected[t]);
          }
          for (int32_t g = 0; g < group; ++g) {
            const int64_t at = int64_t{i} * group + g;
            CHECK(ref.causal[at] == causal[g]);
            INFO("stream " << i << " head " << g << " entries near the threshold " << ambiguous[g]);
            const ScoreRun* runs[] = {&ref, &fast, &portable, &pairwise};
            for (const ScoreRun* run : runs) {
              CHECK(std::abs(run->below[at] - below[g]) <= ambiguous[g]);
            }
          }
          base += n;
        }
      }
    }
  }
}

TEST_CASE("score rows: null count outputs are allowed", "[score_rows]") {
  std::mt19937 rng(5);
  TestKV kv(DType::kF16, 64, 16, {RandomStream(50, 64, rng)}, rng);
  ScoreRowsParams params;
  params.num_rows = 2;
  const std::vector<float> queries = RandomQueries(2 * 64, 1.0f, rng);
  const std::vector<int32_t> rows = {1000, 1000};
  std::vector<float> a(50), b(50);
  REQUIRE(
      cpu::ScoreRowsFast(kv.view(), params, queries.data(), rows.data(), a.data(), nullptr, nullptr)
          .ok());
  REQUIRE(cpu::ScoreRowsReference(kv.view(), params, queries.data(), rows.data(), b.data(), nullptr,
                                  nullptr)
              .ok());
  double sum = 0.0;
  for (int t = 0; t < 50; ++t) {
    CHECK(a[t] == Approx(b[t]).epsilon(1e-4));
    sum += a[t];
  }
  CHECK(sum == Approx(2.0).epsilon(1e-5));  // two rows, each a distribution over the keys
}

// ---- Through kvcache::Cache --------------------------------------------------------------------

// Appends `n` random tokens at positions first, first + 1, ... to every layer of a sequence.
void AppendRandom(Cache& cache, SequenceId seq, int32_t n, int32_t first, std::mt19937& rng) {
  const CacheConfig& c = cache.config();
  std::vector<int32_t> positions(n);
  std::iota(positions.begin(), positions.end(), first);
  for (int32_t layer = 0; layer < c.num_layers; ++layer) {
    const std::vector<float> k = RandomQueries(int64_t{n} * c.num_kv_heads * c.head_dim, 1.0f, rng);
    const std::vector<float> v = RandomQueries(int64_t{n} * c.num_kv_heads * c.head_dim, 1.0f, rng);
    AppendRequest request;
    request.keys = TensorRef::Of(k);
    request.values = TensorRef::Of(v);
    request.positions = positions;
    REQUIRE(cache.Append(seq, layer, request).ok());
  }
}

TEST_CASE("cache: decode and score rows over forked, compacted, channel-pruned streams",
          "[cache]") {
  for (const char* backend : {"cpu", "cpu-reference"}) {
    INFO("backend " << backend);
    std::mt19937 rng(2024);
    CacheConfig cfg;
    cfg.num_layers = 2;
    cfg.num_kv_heads = 2;
    cfg.num_q_heads = 8;
    cfg.head_dim = 64;
    cfg.dtype = DType::kF16;
    cfg.page_tokens = 16;
    cfg.num_pages = 256;
    auto created = Cache::Create(cfg, backend);
    REQUIRE(created.ok());
    Cache& cache = **created;
    const SequenceId a = *cache.AddSequence();
    AppendRandom(cache, a, 100, 0, rng);
    auto forked = cache.Fork(a);
    REQUIRE(forked.ok());
    const SequenceId b = *forked;
    AppendRandom(cache, b, 5, 100, rng);  // copy-on-write of the shared tail page
    // Compact a: keep every third token plus the last 10, keys of all but the last 4 kept slots
    // narrowed to 40 channels.
    EvictionPlan plan;
    plan.sequence = a;
    for (int32_t h = 0; h < cfg.num_kv_heads; ++h) {
      StreamPlan sp;
      sp.layer = 0;
      sp.kv_head = h;
      for (int32_t t = 0; t < 100; ++t) {
        if (t % 3 == 0 || t >= 90) sp.kept.push_back(t);
      }
      sp.key_channels = RandomChannels(cfg.head_dim, 40, rng);
      sp.full_width_recent = 4;
      plan.streams.push_back(sp);
    }
    REQUIRE(cache.Apply(plan).ok());
    AppendRandom(cache, a, 3, 200, rng);  // new full-width tokens after the pruned segment

    const int32_t d = cfg.head_dim, group = cfg.group_size();
    const std::vector<SequenceId> batch = {b, a};
    const std::vector<float> q =
        RandomQueries(int64_t{2} * cfg.num_q_heads * d, 3.0f, rng);  // [batch, q_heads, D]
    std::vector<float> out(q.size()), lse(2 * cfg.num_q_heads);
    DecodeOptions options;
    options.accumulate_scores = true;
    REQUIRE(cache.DecodeAttention(batch, 0, q, out, lse, options).ok());
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    for (size_t bi = 0; bi < batch.size(); ++bi) {
      for (int32_t h = 0; h < cfg.num_kv_heads; ++h) {
        auto stream = cache.ReadStream(batch[bi], 0, h, /*with_kv=*/true);
        REQUIRE(stream.ok());
        if (batch[bi] == a) {
          REQUIRE(stream->length == static_cast<int32_t>(plan.streams[h].kept.size()) + 3);
          REQUIRE(stream->num_segments >= 2);
        }
        std::vector<double> mean_probs(stream->length, 0.0);
        for (int32_t g = 0; g < group; ++g) {
          const int64_t head = (static_cast<int64_t>(bi) * cfg.num_kv_heads + h) * group + g;
          const DenseHead dense = DenseAttention(stream->keys, stream->values, stream->length, d,
                                                 q.data() + head * d, scale);
          for (int32_t c = 0; c < d; ++c) {
            REQUIRE(std::abs(out[head * d + c] - dense.out[c]) <= 2e-6);
          }
          REQUIRE(std::abs(lse[head] - dense.lse) <= 1e-5);
          for (int32_t t = 0; t < stream->length; ++t) mean_probs[t] += dense.probs[t] / group;
        }
        // Accumulators started at 0 (Apply keeps them; nothing else added to them).
        for (int32_t t = 0; t < stream->length; ++t) {
          REQUIRE(std::abs(stream->scores[t] - mean_probs[t]) <= 1e-7 + 1e-5 * mean_probs[t]);
        }
      }
    }

    // ScoreRows on the compacted sequence: rows before, inside and after the kept positions.
    const std::vector<int32_t> rows = {50, 99, 201};
    const std::vector<float> queries =
        RandomQueries(int64_t{3} * cfg.num_q_heads * d, 3.0f, rng);  // [rows, q_heads, D]
    ScoreRequest request;
    request.queries = queries;
    request.positions = rows;
    request.sparsity_threshold = 0.1f;
    auto scored = cache.ScoreRows(a, 0, request);
    REQUIRE(scored.ok());
    for (int32_t h = 0; h < cfg.num_kv_heads; ++h) {
      auto stream = cache.ReadStream(a, 0, h, true);
      REQUIRE(stream.ok());
      REQUIRE(scored->token_scores[h].size() == static_cast<size_t>(stream->length));
      std::vector<double> expected(stream->length, 0.0);
      for (size_t r = 0; r < rows.size(); ++r) {
        std::vector<uint8_t> visible(stream->length);
        for (int32_t t = 0; t < stream->length; ++t) visible[t] = stream->positions[t] <= rows[r];
        for (int32_t g = 0; g < group; ++g) {
          const float* qh = queries.data() + (r * cfg.num_q_heads + h * group + g) * d;
          const DenseHead dense =
              DenseAttention(stream->keys, stream->values, stream->length, d, qh, scale, visible);
          for (int32_t t = 0; t < stream->length; ++t) expected[t] += dense.probs[t] / group;
        }
      }
      int64_t causal = 0;
      for (int32_t r : rows) {
        for (int32_t p : stream->positions) causal += p <= r;
      }
      for (int32_t t = 0; t < stream->length; ++t) {
        REQUIRE(std::abs(scored->token_scores[h][t] - expected[t]) <= 1e-7 + 1e-5 * expected[t]);
      }
      for (int32_t g = 0; g < group; ++g) CHECK(scored->causal_entries[h * group + g] == causal);
    }
    REQUIRE(cache.Validate().ok());
  }
}

TEST_CASE("cache: attention entry points reject bad input", "[cache]") {
  CacheConfig cfg;
  cfg.num_layers = 2;
  cfg.num_kv_heads = 2;
  cfg.num_q_heads = 4;
  cfg.head_dim = 32;
  cfg.dtype = DType::kF32;
  cfg.num_pages = 16;
  auto created = Cache::Create(cfg, "cpu");
  REQUIRE(created.ok());
  Cache& cache = **created;
  std::mt19937 rng(3);
  const SequenceId seq = *cache.AddSequence();
  AppendRandom(cache, seq, 10, 0, rng);
  const int64_t per_seq = int64_t{cfg.num_q_heads} * cfg.head_dim;
  std::vector<float> q(per_seq, 0.1f), out(per_seq);
  const std::vector<SequenceId> one = {seq};

  CHECK(cache.DecodeAttention(one, 0, q, out).ok());
  std::vector<float> short_q(per_seq - 1, 0.1f);
  CHECK(cache.DecodeAttention(one, 0, short_q, out).code() == absl::StatusCode::kInvalidArgument);
  std::vector<float> short_out(per_seq - 1);
  CHECK(cache.DecodeAttention(one, 0, q, short_out).code() == absl::StatusCode::kInvalidArgument);
  std::vector<float> bad_lse(3);
  CHECK(cache.DecodeAttention(one, 0, q, out, bad_lse).code() ==
        absl::StatusCode::kInvalidArgument);
  // (Typed empties: `{}` for q and out would also fit the TensorRef overload.)
  CHECK(cache.DecodeAttention({}, 0, std::span<const float>(), std::span<float>()).code() ==
        absl::StatusCode::kInvalidArgument);
  CHECK(cache.DecodeAttention(one, 2, q, out).code() == absl::StatusCode::kOutOfRange);
  CHECK(cache.DecodeAttention(one, -1, q, out).code() == absl::StatusCode::kOutOfRange);
  const std::vector<SequenceId> unknown = {seq + 1000};
  CHECK(cache.DecodeAttention(unknown, 0, q, out).code() == absl::StatusCode::kNotFound);
  const std::vector<SequenceId> twice = {seq, seq};
  std::vector<float> q2(2 * per_seq, 0.1f), out2(2 * per_seq);
  CHECK(cache.DecodeAttention(twice, 0, q2, out2).code() == absl::StatusCode::kInvalidArgument);
  DecodeOptions negative_scale;
  negative_scale.scale = -1.0f;
  CHECK(cache.DecodeAttention(one, 0, q, out, {}, negative_scale).code() ==
        absl::StatusCode::kInvalidArgument);

  const std::vector<int32_t> rows = {5};
  ScoreRequest request;
  request.queries = q;
  request.positions = rows;
  CHECK(cache.ScoreRows(seq, 0, request).ok());
  CHECK(cache.ScoreRows(seq, 2, request).status().code() == absl::StatusCode::kOutOfRange);
  CHECK(cache.ScoreRows(seq + 1000, 0, request).status().code() == absl::StatusCode::kNotFound);
  ScoreRequest wrong_size = request;
  wrong_size.queries = short_q;
  CHECK(cache.ScoreRows(seq, 0, wrong_size).status().code() == absl::StatusCode::kInvalidArgument);
  ScoreRequest no_rows = request;
  no_rows.positions = {};
  CHECK(cache.ScoreRows(seq, 0, no_rows).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(cache.Validate().ok());
}

}  // namespace
}  // namespace kvcache
