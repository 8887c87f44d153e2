// Tests for the engine-facing calls of kvcache/cache.h that used to live only in the C API: the
// stale-plan check (Stamp / CheckPlanCurrent / ApplyIfCurrent) and the FlashInfer-style
// page-table export (ExportPageTable); and for Backend::Supports, which the Cache asks before it
// locks anything.
#include <atomic>
#include <catch2/catch.hpp>
#include <random>
#include <vector>

#include "kvcache/cache.h"
#include "kvcache/testing/fault_injection.h"
#include "kvcache/testing/forwarding_backend.h"
#include "test_util.h"

using namespace kvcache;
using kvcache::testing::RandomVector;
using kvcache::testing::SameImage;
using kvcache::testing::Snapshot;

namespace {

CacheConfig Config() {
  CacheConfig c;
  c.num_layers = 2;
  c.num_kv_heads = 2;
  c.num_q_heads = 4;
  c.head_dim = 8;
  c.dtype = DType::kF32;
  c.page_tokens = 4;
  c.num_pages = 256;
  return c;
}

void AppendTokens(Cache& cache, SequenceId seq, int32_t layer, int n, int first,
                  std::mt19937& rng) {
  REQUIRE(kvcache::testing::AppendRandomTokens(cache, seq, layer, n, first, rng).ok());
}

EvictionPlan KeepEven(SequenceId seq, int32_t layer, int32_t kv_head, int32_t length) {
  EvictionPlan plan{.sequence = seq};
  plan.streams.push_back({.layer = layer, .kv_head = kv_head});
  for (int32_t t = 0; t < length; t += 2) plan.streams[0].kept.push_back(t);
  return plan;
}

}  // namespace

TEST_CASE("a plan stamped before an Append is refused, the cache unchanged", "[cache][stamp]") {
  auto cache = *Cache::Create(Config(), "cpu");
  std::mt19937 rng(1);
  const SequenceId seq = *cache->AddSequence();
  AppendTokens(*cache, seq, 0, 10, 0, rng);
  const StreamStamp stamp = *cache->Stamp(seq);
  REQUIRE(stamp.sequence == seq);
  REQUIRE(stamp.lengths == std::vector<int32_t>{10, 10, 0, 0});
  const EvictionPlan plan = KeepEven(seq, 0, 1, 10);
  REQUIRE(cache->CheckPlanCurrent(plan, stamp).ok());

  AppendTokens(*cache, seq, 0, 2, 10, rng);
  absl::Status s = cache->CheckPlanCurrent(plan, stamp);
  INFO(s.ToString());
  REQUIRE(s.code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE(s.message().find("plan again") != std::string_view::npos);
  REQUIRE(s.message().find("kv head 1") != std::string_view::npos);
  const auto before = Snapshot(*cache);
  REQUIRE(cache->ApplyIfCurrent(plan, stamp).code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE(SameImage(before, Snapshot(*cache)));

  // A plan that names only streams that did not change is still current.
  const EvictionPlan layer1 = KeepEven(seq, 1, 0, 0);
  REQUIRE(cache->CheckPlanCurrent(layer1, stamp).ok());

  const StreamStamp again = *cache->Stamp(seq);
  REQUIRE(cache->ApplyIfCurrent(KeepEven(seq, 0, 1, 12), again).ok());
  REQUIRE(*cache->StreamLength(seq, 0, 1) == 6);
  REQUIRE(cache->Validate().ok());
}

TEST_CASE("a plan stamped before another Apply is refused even at the same length",
          "[cache][stamp]") {
  auto cache = *Cache::Create(Config(), "cpu");
  std::mt19937 rng(2);
  const SequenceId seq = *cache->AddSequence();
  AppendTokens(*cache, seq, 0, 8, 0, rng);
  const StreamStamp stamp = *cache->Stamp(seq);
  // Evict two tokens, append two: same length, different tokens at the same indices.
  REQUIRE(cache->Apply(KeepEven(seq, 0, 0, 4)).ok());  // keeps tokens 0 and 2
  REQUIRE(*cache->StreamLength(seq, 0, 0) == 2);
  AppendTokens(*cache, seq, 0, 6, 8, rng);
  REQUIRE(*cache->StreamLength(seq, 0, 0) == 8);
  absl::Status s = cache->CheckPlanCurrent(KeepEven(seq, 0, 0, 8), stamp);
  INFO(s.ToString());
  REQUIRE(s.code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE(s.message().find("rebuilt by Apply") != std::string_view::npos);
}

TEST_CASE("stamps of another sequence or shape are rejected", "[cache][stamp][errors]") {
  auto cache = *Cache::Create(Config(), "cpu");
  const SequenceId a = *cache->AddSequence(), b = *cache->AddSequence();
  const StreamStamp stamp_a = *cache->Stamp(a);
  REQUIRE(cache->CheckPlanCurrent(KeepEven(b, 0, 0, 0), stamp_a).code() ==
          absl::StatusCode::kInvalidArgument);
  StreamStamp short_stamp = stamp_a;
  short_stamp.lengths.pop_back();
  REQUIRE(cache->CheckPlanCurrent(KeepEven(a, 0, 0, 0), short_stamp).code() ==
          absl::StatusCode::kInvalidArgument);
  REQUIRE(cache->CheckPlanCurrent(KeepEven(a, 0, 5, 0), stamp_a).code() ==
          absl::StatusCode::kOutOfRange);
  REQUIRE(cache->Stamp(42).status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("ExportPageTable lists every stream's pages in FlashInfer form", "[cache][export]") {
  auto cache = *Cache::Create(Config(), "cpu");
  std::mt19937 rng(3);
  const SequenceId a = *cache->AddSequence(), b = *cache->AddSequence();
  AppendTokens(*cache, a, 1, 10, 0, rng);  // 3 pages of 4 tokens, last holds 2
  AppendTokens(*cache, b, 1, 4, 0, rng);   // 1 full page
  const std::vector<SequenceId> batch{a, b, *cache->AddSequence()};  // the third is empty
  absl::StatusOr<PageTable> table = cache->ExportPageTable(1, batch);
  REQUIRE(table.ok());
  REQUIRE(table->indptr == std::vector<int32_t>{0, 3, 6, 7, 8, 8, 8});
  REQUIRE(table->last_page_len == std::vector<int32_t>{2, 2, 4, 4, 0, 0});
  for (int32_t row = 0; row < 4; ++row) {
    const SequenceId seq = batch[row / 2];
    const std::vector<SegmentLayout> segs = *cache->StreamPages(seq, 1, row % 2);
    REQUIRE(segs.size() == 1);
    REQUIRE(std::vector<int32_t>(table->indices.begin() + table->indptr[row],
                                 table->indices.begin() + table->indptr[row + 1]) == segs[0].pages);
  }
  const PageTableLayout& l = table->layout;
  REQUIRE(l.pool_base == cache->pool().view().base);
  REQUIRE(l.tokens_per_page == 4);
  REQUIRE(l.head_dim == 8);
  REQUIRE(l.row_stride_bytes == 8 * 4);
  REQUIRE(l.value_offset_bytes == 4 * 8 * 4);
  REQUIRE(!l.is_device);

  // Channel-pruned streams are not one list of full-width pages.
  EvictionPlan prune{.sequence = a};
  prune.streams.push_back({.layer = 1, .kv_head = 0, .kept = {0, 1, 2}, .key_channels = {0, 3}});
  REQUIRE(cache->Apply(prune).ok());
  absl::Status s = cache->ExportPageTable(1, batch).status();
  INFO(s.ToString());
  REQUIRE(s.code() == absl::StatusCode::kFailedPrecondition);
  REQUIRE(s.message().find("key_width 2") != std::string_view::npos);
  REQUIRE(cache->ExportPageTable(2, batch).status().code() == absl::StatusCode::kOutOfRange);
  const std::vector<SequenceId> unknown{b, 99};
  REQUIRE(cache->ExportPageTable(1, unknown).status().code() == absl::StatusCode::kNotFound);
  REQUIRE(cache->ExportPageTable(1, {}).status().code() == absl::StatusCode::kInvalidArgument);
}

namespace {

// The CPU backend with DecodeAttention reported unsupported; records whether it was called.
class NoDecodeBackend final : public kvcache::testing::ForwardingBackend {
 public:
  NoDecodeBackend() : ForwardingBackend(*CreateBackend("cpu")) {}
  std::string_view Name() const override { return "no-decode"; }
  bool Supports(BackendOp op) const override { return op == BackendOp::kScoreRows; }
  absl::Status DecodeAttention(const PagedKVView& kv, const DecodeParams& params, const float* q,
                               float* out, float* lse) override {
    decode_calls.fetch_add(1);
    return ForwardingBackend::DecodeAttention(kv, params, q, out, lse);
  }
  std::atomic<int> decode_calls{0};
};

}  // namespace

TEST_CASE("the Cache asks Supports before it calls an optional kernel", "[cache][backend]") {
  for (BackendOp op : {BackendOp::kDecodeAttention, BackendOp::kSparseDecodeAttention,
                       BackendOp::kKeyIndex, BackendOp::kScoreRows}) {
    INFO(BackendOpName(op));
    REQUIRE((*CreateBackend("cpu"))->Supports(op));
    REQUIRE((*CreateBackend("cpu-reference"))->Supports(op));
  }
  auto faulty = std::make_unique<kvcache::testing::FaultInjectingBackend>(
      std::make_unique<NoDecodeBackend>());
  REQUIRE(!faulty->Supports(BackendOp::kDecodeAttention));  // forwarded to the wrapped backend
  REQUIRE(faulty->Supports(BackendOp::kScoreRows));

  auto backend = std::make_unique<NoDecodeBackend>();
  NoDecodeBackend* hook = backend.get();
  auto cache = *Cache::Create(Config(), std::move(backend));
  std::mt19937 rng(4);
  const SequenceId seq = *cache->AddSequence();
  AppendTokens(*cache, seq, 0, 5, 0, rng);
  const std::vector<SequenceId> batch{seq};
  const std::vector<float> q = RandomVector(rng, 4 * 8);
  std::vector<float> out(q.size());
  absl::Status s = cache->DecodeAttention(batch, 0, q, out);
  INFO(s.ToString());
  REQUIRE(s.code() == absl::StatusCode::kUnimplemented);
  REQUIRE(s.message().find("no-decode") != std::string_view::npos);
  DecodePlan plan = *cache->PrepareDecode(batch);
  REQUIRE(cache->DecodeAttention(plan, 0, q, out).code() == absl::StatusCode::kUnimplemented);
  REQUIRE(hook->decode_calls.load() == 0);
}
