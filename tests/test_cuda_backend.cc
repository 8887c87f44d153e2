// Tests of the CUDA backend (cuda/): every Backend operation on the CUDA backend against
// "cpu-reference" on identical inputs. Two caches with the same configuration, one per backend,
// receive the same appends, forks, plans, decode steps and scoring requests; the stored rows
// (ReadStream), the attention outputs, log-sum-exps, score accumulators and ScoreRows results are
// compared with a tolerance per dtype. Configurations cover G in {1, 4, 8}, head_dim in
// {64, 128, 80} (80 takes the generic kernel), f32/f16/bf16, pages of 1 to 64 tokens, and lengths
// around a page boundary and long enough for several key splits per stream.
//
// The backend under test is "cuda" when a CUDA device is present, else "cuda-emulated" (the same
// kernels on the CPU emulator of cuda/emulation/, so CI executes every kernel without a GPU).
// Under the emulator each case runs twice: with the fibers of every block (and the blocks of
// every grid) scheduled in thread-index order and in reverse order, so that a missing barrier
// changes what some thread reads. Long streams are shorter under the emulator (it runs each CUDA
// thread as a fiber) but still span several key splits. Without either backend every test case
// prints "SKIPPED: <reason>" and exits with 4, which CTest reports as skipped.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "kvcache/backend.h"
#include "kvcache/cache.h"
#include "kvcache/plan.h"
#include "test_util.h"

namespace kvcache {
namespace {

using testing::RandomVector;
using testing::ToBits;

// A long length on a GPU, a shorter one (still several key splits) under the emulator, or on
// a GPU with KVCACHE_CUDA_TEST_SHORT=1 (scripts/gpu_check.sh under compute-sanitizer).
int32_t Long(int32_t on_gpu, int32_t emulated) {
  static const bool short_streams = Emulated() || std::getenv("KVCACHE_CUDA_TEST_SHORT") != nullptr;
  return short_streams ? emulated : on_gpu;
}

struct Tolerance {
  float storage;    // stored K/V read back (relative to 1 + |cpu value|)
  float attention;  // out, lse
  float scores;     // score accumulators, ScoreRows token scores
};

// Both backends store the same floats with the same round-to-nearest-even conversions, and the
// CUDA gather accumulates in the CPU's order without contracted multiply-adds, so stored rows are
// expected to be identical; one unit in the last place of the dtype is still allowed. Attention
// reads identical stored values and differs only by f32 summation order (lane partial sums,
// row-group and split merges).
Tolerance ToleranceFor(DType t) {
  switch (t) {
    case DType::kF32:
      return {1e-6f, 1e-4f, 2e-5f};
    case DType::kF16:
      return {1e-3f, 2e-4f, 2e-5f};
    case DType::kBF16:
    default:
      return {8e-3f, 2e-4f, 2e-5f};
  }
}

bool Close(float got, float want, float tol) {
  if (std::isinf(got) || std::isinf(want)) return got == want;
  return std::fabs(got - want) <= tol * (1.0f + std::fabs(want));
}

void CheckClose(const std::vector<float>& got, const std::vector<float>& want, float tol,
                const std::string& what) {
  REQUIRE(got.size() == want.size());
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!Close(got[i], want[i], tol)) {
      if (bad == 0) first = i;
      ++bad;
    }
  }
  std::ostringstream message;
  message << what << ": " << bad << " of " << got.size() << " values differ";
  if (bad > 0)
    message << "; first at " << first << ": cuda " << got[first] << ", cpu " << want[first];
  INFO(message.str());
  CHECK(bad == 0);
}

// The same cache on "cuda" and "cpu-reference"; every operation is applied to both.
class Twin {
 public:
  explicit Twin(const CacheConfig& config) : config_(config) {
    absl::StatusOr<std::unique_ptr<Cache>> gpu = Cache::Create(config, CudaBackend());
    INFO(gpu.status().ToString());
    REQUIRE(gpu.ok());
    absl::StatusOr<std::unique_ptr<Cache>> cpu = Cache::Create(config, "cpu-reference");
    INFO(cpu.status().ToString());
    REQUIRE(cpu.ok());
    gpu_ = *std::move(gpu);
    cpu_ = *std::move(cpu);
  }

  const CacheConfig& config() const { return config_; }
  Cache& gpu() { return *gpu_; }

  SequenceId AddSequence() {
    absl::StatusOr<SequenceId> a = gpu_->AddSequence();
    absl::StatusOr<SequenceId> b = cpu_->AddSequence();
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    REQUIRE(*a == *b);
    return *a;
  }
  SequenceId Fork(SequenceId parent) {
    absl::StatusOr<SequenceId> a = gpu_->Fork(parent);
    absl::StatusOr<SequenceId> b = cpu_->Fork(parent);
    INFO(a.status().ToString());
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    REQUIRE(*a == *b);
    return *a;
  }
  void Free(SequenceId seq) {
    REQUIRE(gpu_->Free(seq).ok());
    REQUIRE(cpu_->Free(seq).ok());
  }

  // n random tokens at positions first_position, first_position + 1, ... into every layer;
  // src_dtype is the dtype the engine hands over (f32, or f16/bf16 bits).
  void Append(SequenceId seq, int32_t n, int32_t first_position, std::mt19937& rng,
              DType src_dtype = DType::kF32) {
    const size_t elements = static_cast<size_t>(n) * config_.num_kv_heads * config_.head_dim;
    std::vector<int32_t> positions(n);
    std::vector<Modality> modalities(n);
    for (int32_t i = 0; i < n; ++i) {
      positions[i] = first_position + i;
      modalities[i] = i % 5 < 3 ? Modality::kImage : Modality::kText;
    }
    for (int32_t layer = 0; layer < config_.num_layers; ++layer) {
      const std::vector<float> k = RandomVector(rng, elements);  // [n, kv_heads, head_dim]
      const std::vector<float> v = RandomVector(rng, elements);  // [n, kv_heads, head_dim]
      std::vector<uint16_t> k_bits, v_bits;
      AppendRequest request;
      request.positions = positions;
      request.modalities = modalities;
      if (src_dtype == DType::kF32) {
        request.keys = TensorRef::Of(k);
        request.values = TensorRef::Of(v);
      } else {
        k_bits = ToBits(k, src_dtype);
        v_bits = ToBits(v, src_dtype);
        request.keys = TensorRef::Of(k_bits, src_dtype);
        request.values = TensorRef::Of(v_bits, src_dtype);
      }
      const absl::Status a = gpu_->Append(seq, layer, request);
      const absl::Status b = cpu_->Append(seq, layer, request);
      INFO(a.ToString());
      REQUIRE(a.ok());
      REQUIRE(b.ok());
    }
  }

  void Apply(const EvictionPlan& plan) {
    const absl::Status a = gpu_->Apply(plan);
    const absl::Status b = cpu_->Apply(plan);
    INFO(a.ToString() << " / " << b.ToString());
    REQUIRE(a.ok());
    REQUIRE(b.ok());
  }

  void CompareStreams(SequenceId seq) {
    const Tolerance tol = ToleranceFor(config_.dtype);
    for (int32_t layer = 0; layer < config_.num_layers; ++layer) {
      for (int32_t h = 0; h < config_.num_kv_heads; ++h) {
        INFO("sequence " << seq << " layer " << layer << " kv head " << h);
        absl::StatusOr<StreamContents> a = gpu_->ReadStream(seq, layer, h);
        absl::StatusOr<StreamContents> b = cpu_->ReadStream(seq, layer, h);
        INFO(a.status().ToString());
        REQUIRE(a.ok());
        REQUIRE(b.ok());
        REQUIRE(a->length == b->length);
        CHECK(a->positions == b->positions);
        CHECK(a->modalities == b->modalities);
        CHECK(a->key_width == b->key_width);
        CHECK(a->num_segments == b->num_segments);
        CheckClose(a->keys, b->keys, tol.storage, "keys");
        CheckClose(a->values, b->values, tol.storage, "values");
        CheckClose(a->scores, b->scores, tol.scores, "scores");
      }
    }
  }

  void CompareDecode(const std::vector<SequenceId>& batch, int32_t layer,
                     const DecodeOptions& options, bool with_lse, std::mt19937& rng) {
    const Tolerance tol = ToleranceFor(config_.dtype);
    const size_t heads = batch.size() * config_.num_q_heads;
    const std::vector<float> q = RandomVector(rng, heads * config_.head_dim);     // [B, Hq, D]
    std::vector<float> out_a(q.size()), out_b(q.size());                          // [B, Hq, D]
    std::vector<float> lse_a(with_lse ? heads : 0), lse_b(with_lse ? heads : 0);  // [B, Hq]
    const absl::Status a = gpu_->DecodeAttention(batch, layer, q, out_a, lse_a, options);
    const absl::Status b = cpu_->DecodeAttention(batch, layer, q, out_b, lse_b, options);
    INFO("layer " << layer << " accumulate " << options.accumulate_scores << ": " << a.ToString());
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    CheckClose(out_a, out_b, tol.attention, "decode out");
    CheckClose(lse_a, lse_b, tol.attention, "decode lse");
  }

  void CompareScoreRows(SequenceId seq, int32_t layer, const std::vector<int32_t>& positions,
                        GqaAggregation aggregation, bool accumulate, std::mt19937& rng) {
    const Tolerance tol = ToleranceFor(config_.dtype);
    const std::vector<float> queries =  // [rows, Hq, D]
        RandomVector(rng, positions.size() * config_.num_q_heads * config_.head_dim);
    ScoreRequest request;
    request.queries = queries;
    request.positions = positions;
    request.aggregation = aggregation;
    request.sparsity_threshold = 0.05f;
    request.accumulate = accumulate;
    absl::StatusOr<ScoreResult> a = gpu_->ScoreRows(seq, layer, request);
    absl::StatusOr<ScoreResult> b = cpu_->ScoreRows(seq, layer, request);
    INFO("ScoreRows layer " << layer << " aggregation " << static_cast<int>(aggregation) << ": "
                            << a.status().ToString());
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    REQUIRE(a->token_scores.size() == b->token_scores.size());
    for (size_t h = 0; h < a->token_scores.size(); ++h) {
      CheckClose(a->token_scores[h], b->token_scores[h], tol.scores, "token scores");
    }
    CHECK(a->causal_entries == b->causal_entries);
    REQUIRE(a->below_threshold.size() == b->below_threshold.size());
    for (size_t i = 0; i < a->below_threshold.size(); ++i) {
      // A probability within rounding of the threshold may land on either side of it.
      const int64_t slack = std::max<int64_t>(2, b->causal_entries[i] / 500);
      INFO("q head " << i << ": cuda " << a->below_threshold[i] << ", cpu "
                     << b->below_threshold[i]);
      CHECK(std::llabs(a->below_threshold[i] - b->below_threshold[i]) <= slack);
    }
  }

 private:
  CacheConfig config_;
  std::unique_ptr<Cache> gpu_;
  std::unique_ptr<Cache> cpu_;
};

CacheConfig Config(DType dtype, int32_t group, int32_t head_dim, int32_t num_pages = 2048,
                   int32_t page_tokens = 16) {
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 2 * group;
  c.head_dim = head_dim;
  c.dtype = dtype;
  c.page_tokens = page_tokens;
  c.num_pages = num_pages;
  return c;
}

// Keeps about 40% of the tokens (always the last), optionally storing about half the key channels
// for all but the last few kept tokens, and optionally merging evicted tokens into kept ones.
StreamPlan RandomPlan(int32_t layer, int32_t kv_head, int32_t length, int32_t head_dim, bool prune,
                      bool merge, std::mt19937& rng) {
  StreamPlan p;
  p.layer = layer;
  p.kv_head = kv_head;
  std::bernoulli_distribution keep(0.4);
  std::vector<int32_t> evicted;
  for (int32_t t = 0; t < length; ++t) {
    if (keep(rng) || t == length - 1) {
      p.kept.push_back(t);
    } else {
      evicted.push_back(t);
    }
  }
  if (prune) {
    std::vector<int32_t> channels(head_dim);
    std::iota(channels.begin(), channels.end(), 0);
    std::shuffle(channels.begin(), channels.end(), rng);
    // An odd count: the values of such a page start at a byte offset that is not a multiple
    // of 16, which takes the kernels' unaligned value path.
    channels.resize(head_dim / 2 - 3);
    std::sort(channels.begin(), channels.end());
    p.key_channels = channels;
    p.full_width_recent = std::min<int32_t>(4, static_cast<int32_t>(p.kept.size()));
  }
  if (merge && !p.kept.empty()) {
    std::uniform_int_distribution<int32_t> slot(0, static_cast<int32_t>(p.kept.size()) - 1);
    for (size_t i = 0; i < evicted.size() && i < 12; ++i) {
      p.merges.push_back({slot(rng), evicted[i], 0.3f, -0.25f});
    }
    p.kept_key_weight.assign(p.kept.size(), 0.7f);
    p.kept_value_weight.assign(p.kept.size(), 1.25f);
  }
  return p;
}

std::string Describe(DType dtype, int32_t group, int32_t head_dim, int32_t length) {
  std::ostringstream s;
  s << DTypeName(dtype) << " G=" << group << " D=" << head_dim << " length=" << length;
  return s.str();
}

constexpr int32_t kFirstPosition = 5;  // so that a query row at position < 5 sees no key

TEST_CASE("cuda: append, fork and decode match cpu-reference", "[cuda]") {
  KVCACHE_CUDA_CASE();
  const DType dtype = GENERATE(DType::kF32, DType::kF16, DType::kBF16);
  const int32_t group = GENERATE(1, 4, 8);
  const int32_t head_dim = GENERATE(64, 128, 80);
  Twin twin(Config(dtype, group, head_dim));
  std::mt19937 rng(1234u + group * 7u + static_cast<unsigned>(head_dim));
  for (int32_t length : {1, 15, 16, 17, Long(3000, 600)}) {
    INFO(Describe(dtype, group, head_dim, length));
    const SequenceId seq = twin.AddSequence();
    twin.Append(seq, length, kFirstPosition, rng);
    // Decode-style appends fill the partial tail page one token at a time.
    twin.Append(seq, 1, kFirstPosition + length, rng);
    twin.Append(seq, 1, kFirstPosition + length + 1, rng);
    twin.CompareStreams(seq);

    DecodeOptions accumulate;
    accumulate.accumulate_scores = true;
    twin.CompareDecode({seq}, 0, accumulate, /*with_lse=*/true, rng);
    twin.CompareDecode({seq}, 1, DecodeOptions{}, /*with_lse=*/false, rng);
    twin.CompareStreams(seq);

    // Fork, then append to the child: the shared partial tail page is copied (CopyPages).
    const SequenceId child = twin.Fork(seq);
    twin.Append(child, 1, kFirstPosition + length + 2, rng);
    twin.CompareStreams(seq);
    twin.CompareStreams(child);
    DecodeOptions max_scores;
    max_scores.accumulate_scores = true;
    max_scores.aggregation = GqaAggregation::kMax;
    max_scores.scale = 0.05f;
    twin.CompareDecode({child, seq}, 0, max_scores, /*with_lse=*/true, rng);
    twin.CompareStreams(seq);
    twin.CompareStreams(child);
    twin.Free(child);
    twin.Free(seq);
  }
}

TEST_CASE("cuda: Apply with kept subsets, key channels and merges matches cpu-reference",
          "[cuda]") {
  KVCACHE_CUDA_CASE();
  const DType dtype = GENERATE(DType::kF32, DType::kF16, DType::kBF16);
  const int32_t group = GENERATE(1, 4, 8);
  const int32_t head_dim = GENERATE(64, 128, 80);
  Twin twin(Config(dtype, group, head_dim));
  std::mt19937 rng(99u + group * 13u + static_cast<unsigned>(head_dim));
  for (int32_t length : {17, 300, Long(2100, 600)}) {
    INFO(Describe(dtype, group, head_dim, length));
    const SequenceId seq = twin.AddSequence();
    twin.Append(seq, length, kFirstPosition, rng);
    DecodeOptions accumulate;
    accumulate.accumulate_scores = true;
    twin.CompareDecode({seq}, 0, accumulate, /*with_lse=*/true, rng);  // non-zero scores

    EvictionPlan plan;
    plan.sequence = seq;
    plan.policy = "test: random subsets, ThinK channels, merges";
    plan.streams.push_back(RandomPlan(0, 0, length, head_dim, /*prune=*/true, /*merge=*/true, rng));
    plan.streams.push_back(
        RandomPlan(0, 1, length, head_dim, /*prune=*/true, /*merge=*/false, rng));
    plan.streams.push_back(
        RandomPlan(1, 0, length, head_dim, /*prune=*/false, /*merge=*/true, rng));
    plan.streams.push_back(
        RandomPlan(1, 1, length, head_dim, /*prune=*/false, /*merge=*/false, rng));
    twin.Apply(plan);
    twin.CompareStreams(seq);

    // Attention over pruned + full-width segments, then over a fresh tail segment as well.
    DecodeOptions sum_scores;
    sum_scores.accumulate_scores = true;
    sum_scores.aggregation = GqaAggregation::kSum;
    twin.CompareDecode({seq}, 0, sum_scores, /*with_lse=*/true, rng);
    twin.CompareDecode({seq}, 1, sum_scores, /*with_lse=*/true, rng);
    twin.Append(seq, 3, kFirstPosition + length, rng);
    twin.CompareDecode({seq}, 0, accumulate, /*with_lse=*/true, rng);
    twin.CompareStreams(seq);

    const std::vector<int32_t> rows = {2, kFirstPosition, kFirstPosition + length / 2,
                                       kFirstPosition + length + 2, kFirstPosition + length + 9};
    twin.CompareScoreRows(seq, 0, rows, GqaAggregation::kMean, /*accumulate=*/true, rng);
    twin.CompareScoreRows(seq, 1, rows, GqaAggregation::kMax, /*accumulate=*/false, rng);
    twin.CompareStreams(seq);
    twin.Free(seq);
  }
}

TEST_CASE("cuda: ScoreRows matches cpu-reference", "[cuda]") {
  KVCACHE_CUDA_CASE();
  const DType dtype = GENERATE(DType::kF32, DType::kF16, DType::kBF16);
  const int32_t group = GENERATE(1, 4, 8);
  const int32_t head_dim = GENERATE(64, 128, 80);
  Twin twin(Config(dtype, group, head_dim));
  std::mt19937 rng(7u + group * 31u + static_cast<unsigned>(head_dim));
  for (int32_t length : {1, 15, 16, 17, Long(700, 300)}) {
    INFO(Describe(dtype, group, head_dim, length));
    const SequenceId seq = twin.AddSequence();
    twin.Append(seq, length, kFirstPosition, rng);
    std::vector<int32_t> rows = {0, kFirstPosition};  // sees nothing; sees one key
    std::uniform_int_distribution<int32_t> position(kFirstPosition, kFirstPosition + length + 4);
    // Each row is a full attention pass over the stream; the emulator takes fewer of them.
    for (int i = 0; i < Long(30, 6); ++i) rows.push_back(position(rng));
    const GqaAggregation all[] = {GqaAggregation::kMean, GqaAggregation::kSum,
                                  GqaAggregation::kMax};
    for (int a = 0; a < 3; ++a) {
      // Under the emulator the long stream takes one aggregation per configuration, rotating
      // so that every (dtype, head_dim) meets all three across the group sizes.
      const int group_index = group == 1 ? 0 : group == 4 ? 1 : 2;
      const int rotation = (group_index + static_cast<int>(dtype) + head_dim / 16) % 3;
      if (length > 17 && Long(0, 1) == 1 && a != rotation) continue;
      twin.CompareScoreRows(seq, 0, rows, all[a], /*accumulate=*/true, rng);
    }
    twin.CompareStreams(seq);
    twin.Free(seq);
  }
}

TEST_CASE("cuda: batched decode over sequences of different lengths, one of them empty", "[cuda]") {
  KVCACHE_CUDA_CASE();
  const DType dtype = GENERATE(DType::kF16, DType::kBF16);
  Twin twin(Config(dtype, /*group=*/4, /*head_dim=*/128, /*num_pages=*/4096));
  std::mt19937 rng(5u);
  std::vector<SequenceId> batch;
  for (int32_t length : {0, 1, 33, Long(5000, 1100)}) {
    const SequenceId seq = twin.AddSequence();
    if (length > 0) twin.Append(seq, length, kFirstPosition, rng);
    batch.push_back(seq);
  }
  DecodeOptions accumulate;
  accumulate.accumulate_scores = true;
  for (int step = 0; step < 3; ++step) {
    twin.CompareDecode(batch, step % 2, accumulate, /*with_lse=*/true, rng);
  }
  for (SequenceId seq : batch) twin.CompareStreams(seq);
}

TEST_CASE("cuda: a long stream (many key splits) matches cpu-reference", "[cuda]") {
  KVCACHE_CUDA_CASE();
  const DType dtype = GENERATE(DType::kF16, DType::kBF16);
  CacheConfig c = Config(dtype, /*group=*/8, /*head_dim=*/128, /*num_pages=*/4096);
  c.num_layers = 1;
  c.num_kv_heads = 1;
  c.num_q_heads = 8;
  Twin twin(c);
  std::mt19937 rng(11u);
  const SequenceId seq = twin.AddSequence();
  twin.Append(seq, Long(20000, 2400), kFirstPosition, rng);
  DecodeOptions accumulate;
  accumulate.accumulate_scores = true;
  twin.CompareDecode({seq}, 0, accumulate, /*with_lse=*/true, rng);
  twin.CompareStreams(seq);
}

TEST_CASE("cuda: partial and multiple head tiles, small and large head_dim", "[cuda]") {
  KVCACHE_CUDA_CASE();
  // G = 2 takes the 2-head tile, G = 3 a 4-head tile with one idle head, G = 16 two 8-head
  // tiles (blockIdx.z > 0); head_dim 32 and 72 (generic kernel, lanes without channels) and
  // 256 (kMaxHeadDim, eight channels per lane).
  struct Shape {
    int32_t group;
    int32_t head_dim;
  };
  const Shape shape = GENERATE(Shape{2, 128}, Shape{3, 64}, Shape{16, 72}, Shape{3, 256},
                               Shape{16, 32});
  const DType dtype = GENERATE(DType::kF16, DType::kF32);
  const int32_t length = Long(900, 300);
  INFO(Describe(dtype, shape.group, shape.head_dim, length));
  Twin twin(Config(dtype, shape.group, shape.head_dim));
  std::mt19937 rng(31u + static_cast<unsigned>(shape.group * shape.head_dim));
  const SequenceId seq = twin.AddSequence();
  twin.Append(seq, length, kFirstPosition, rng);
  const SequenceId other = twin.AddSequence();
  twin.Append(other, 17, kFirstPosition, rng);
  DecodeOptions accumulate;
  accumulate.accumulate_scores = true;
  twin.CompareDecode({seq, other}, 0, accumulate, /*with_lse=*/true, rng);
  accumulate.aggregation = GqaAggregation::kMax;
  twin.CompareDecode({seq}, 1, accumulate, /*with_lse=*/true, rng);
  EvictionPlan plan;
  plan.sequence = seq;
  plan.policy = "test: random subsets, ThinK channels, merges";
  for (int32_t layer = 0; layer < 2; ++layer) {
    for (int32_t h = 0; h < 2; ++h) {
      plan.streams.push_back(RandomPlan(layer, h, length, shape.head_dim, /*prune=*/h == 0,
                                        /*merge=*/layer == 0, rng));
    }
  }
  twin.Apply(plan);
  twin.CompareStreams(seq);
  twin.CompareDecode({seq}, 0, accumulate, /*with_lse=*/true, rng);
  const std::vector<int32_t> rows = {2, kFirstPosition + 3, kFirstPosition + length};
  twin.CompareScoreRows(seq, 0, rows, GqaAggregation::kMean, /*accumulate=*/true, rng);
  twin.CompareScoreRows(seq, 1, rows, GqaAggregation::kMax, /*accumulate=*/false, rng);
  twin.CompareStreams(seq);
  twin.CompareStreams(other);
}

TEST_CASE("cuda: pages of 1, 5 and 64 tokens match cpu-reference", "[cuda]") {
  KVCACHE_CUDA_CASE();
  const int32_t page_tokens = GENERATE(1, 5, 64);
  const DType dtype = GENERATE(DType::kF32, DType::kBF16);
  const int32_t head_dim = GENERATE(64, 80);
  const int32_t length = Long(1000, 300);
  INFO(Describe(dtype, 4, head_dim, length) << " page_tokens=" << page_tokens);
  // Room for both layers and kv heads of the stream, a fork's copied tail and the compaction.
  const int32_t num_pages = 8 * (length / page_tokens + 4);
  Twin twin(Config(dtype, /*group=*/4, head_dim, num_pages, page_tokens));
  std::mt19937 rng(21u + static_cast<unsigned>(page_tokens));
  const SequenceId seq = twin.AddSequence();
  twin.Append(seq, length, kFirstPosition, rng);
  twin.CompareStreams(seq);
  DecodeOptions accumulate;
  accumulate.accumulate_scores = true;
  twin.CompareDecode({seq}, 0, accumulate, /*with_lse=*/true, rng);
  const SequenceId child = twin.Fork(seq);
  twin.Append(child, 1, kFirstPosition + length, rng);
  twin.CompareDecode({seq, child}, 1, accumulate, /*with_lse=*/true, rng);
  twin.CompareStreams(child);
  twin.Free(child);

  EvictionPlan plan;
  plan.sequence = seq;
  plan.policy = "test: random subsets, ThinK channels, merges";
  plan.streams.push_back(RandomPlan(0, 0, length, head_dim, /*prune=*/true, /*merge=*/true, rng));
  plan.streams.push_back(RandomPlan(0, 1, length, head_dim, /*prune=*/false, /*merge=*/true, rng));
  plan.streams.push_back(RandomPlan(1, 0, length, head_dim, /*prune=*/true, /*merge=*/false, rng));
  plan.streams.push_back(
      RandomPlan(1, 1, length, head_dim, /*prune=*/false, /*merge=*/false, rng));
  twin.Apply(plan);
  twin.CompareStreams(seq);
  twin.CompareDecode({seq}, 0, accumulate, /*with_lse=*/true, rng);
  const std::vector<int32_t> rows = {kFirstPosition, kFirstPosition + length / 3,
                                     kFirstPosition + length};
  twin.CompareScoreRows(seq, 0, rows, GqaAggregation::kMean, /*accumulate=*/true, rng);
  twin.CompareScoreRows(seq, 1, rows, GqaAggregation::kMax, /*accumulate=*/false, rng);
  twin.CompareStreams(seq);
}

TEST_CASE("cuda: f16 and bf16 engine buffers are stored like the cpu backend stores them",
          "[cuda]") {
  KVCACHE_CUDA_CASE();
  struct Case {
    DType pool;
    DType source;
  };
  const Case c = GENERATE(Case{DType::kF16, DType::kF16}, Case{DType::kBF16, DType::kBF16},
                          Case{DType::kF16, DType::kBF16}, Case{DType::kF32, DType::kF16});
  INFO(DTypeName(c.pool) << " pool from " << DTypeName(c.source) << " rows");
  Twin twin(Config(c.pool, /*group=*/4, /*head_dim=*/64));
  std::mt19937 rng(3u);
  const SequenceId seq = twin.AddSequence();
  twin.Append(seq, 40, kFirstPosition, rng, c.source);
  twin.Append(seq, 1, kFirstPosition + 40, rng, c.source);
  twin.CompareStreams(seq);
}

TEST_CASE("cuda: head_dim above the kernel limit is reported as unimplemented", "[cuda]") {
  KVCACHE_CUDA_CASE();
  CacheConfig c = Config(DType::kF16, /*group=*/1, /*head_dim=*/512, /*num_pages=*/64);
  Twin twin(c);
  std::mt19937 rng(2u);
  const SequenceId seq = twin.AddSequence();
  twin.Append(seq, 20, kFirstPosition, rng);
  twin.CompareStreams(seq);  // data movement has no head_dim limit
  std::vector<float> q(static_cast<size_t>(c.num_q_heads) * c.head_dim, 0.5f);
  std::vector<float> out(q.size());
  const std::vector<SequenceId> batch = {seq};
  const absl::Status s = twin.gpu().DecodeAttention(batch, 0, q, out);
  INFO(s.ToString());
  CHECK(s.code() == absl::StatusCode::kUnimplemented);
}

TEST_CASE("cuda: arena allocation validates its size", "[cuda]") {
  KVCACHE_CUDA_CASE();
  absl::StatusOr<std::unique_ptr<Backend>> backend = CreateBackend(CudaBackend());
  REQUIRE(backend.ok());
  CHECK_FALSE((*backend)->HostAccessible());
  CHECK((*backend)->Name() == CudaBackend());
  CHECK((*backend)->AllocateArena(0).status().code() == absl::StatusCode::kInvalidArgument);
  absl::StatusOr<void*> arena = (*backend)->AllocateArena(1 << 20);
  REQUIRE(arena.ok());
  CHECK(reinterpret_cast<uintptr_t>(*arena) % 256 == 0);
  (*backend)->FreeArena(*arena);
}

}  // namespace
}  // namespace kvcache
