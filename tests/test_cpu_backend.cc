// Tests of the CPU backend's data movement (cpu/cpu_backend.cc, cpu/convert.h): the vectorised
// row conversions against the scalar ones of kvcache/dtype.h, and the "cpu" flavour's WriteRows /
// GatherRows / ReadRows against the "cpu-reference" flavour, bit for bit, for every dtype,
// full-width and channel-pruned rows, weighted merges, and head_dim 128 and 80.
#include <catch2/catch.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "cpu/convert.h"
#include "kvcache/backend.h"

namespace kvcache {
namespace {

using cpu::LoadRow;
using cpu::StoreRow;

TEST_CASE("convert: f16 -> f32 rows equal HalfBitsToFloat for every half", "[convert]") {
  std::vector<uint16_t> halves(65536);
  for (uint32_t i = 0; i < halves.size(); ++i) halves[i] = static_cast<uint16_t>(i);
  std::vector<float> out(halves.size());
  LoadRow<DType::kF16>(halves.data(), static_cast<int64_t>(halves.size()), out.data());
  int64_t mismatches = 0;
  for (uint32_t i = 0; i < halves.size(); ++i) {
    const uint32_t want = FloatBits(HalfBitsToFloat(halves[i]));
    if (FloatBits(out[i]) != want) {
      if (++mismatches < 5) INFO("half 0x" << std::hex << i);
    }
  }
  REQUIRE(mismatches == 0);
  // bf16 -> f32 is a shift.
  std::vector<float> bf(halves.size());
  LoadRow<DType::kBF16>(halves.data(), static_cast<int64_t>(halves.size()), bf.data());
  for (uint32_t i = 0; i < halves.size(); ++i) {
    REQUIRE(FloatBits(bf[i]) == FloatBits(BF16BitsToFloat(halves[i])));
  }
}

// Floats that exercise every rounding case: each representable half and bf16 value, the
// midpoints between neighbours (ties) and one f32 ulp either side of them, the edges of the
// subnormal / overflow / inf / NaN ranges, and a strided sweep of all 2^32 bit patterns.
std::vector<float> RoundingProbes() {
  std::vector<uint32_t> bits;
  auto around = [&](uint32_t u, uint32_t radius) {
    for (uint32_t d = 0; d <= radius; ++d) {
      bits.push_back(u + d);
      bits.push_back(u - d);
    }
  };
  for (uint32_t h = 0; h < 0x7C00; ++h) {
    const uint32_t lo = FloatBits(HalfBitsToFloat(static_cast<uint16_t>(h)));
    const uint32_t hi = FloatBits(HalfBitsToFloat(static_cast<uint16_t>(h + 1)));
    around(lo, 1);
    around(lo + (hi - lo) / 2, 1);  // the midpoint: exact in f32 (13 extra mantissa bits)
  }
  for (uint32_t b = 0; b < 0x7F80; ++b) around((b << 16) | 0x8000u, 1);  // bf16 ties
  for (uint32_t edge : {0u, 0x33000000u, 0x38800000u, 0x477FF000u, 0x7F800000u, 0x7F800001u,
                        0x7FC00000u, 0x7FFFFFFFu, 0x00800000u}) {
    around(edge, 4096);
  }
  for (uint64_t u = 0; u < (uint64_t{1} << 32); u += 4099) bits.push_back(static_cast<uint32_t>(u));
  std::vector<float> out;
  out.reserve(bits.size() * 2);
  for (uint32_t u : bits) {
    out.push_back(std::bit_cast<float>(u & 0x7FFFFFFFu));
    out.push_back(std::bit_cast<float>(u | 0x80000000u));
  }
  return out;
}

TEST_CASE("convert: f32 -> f16 / bf16 rows equal FloatToHalfBits / FloatToBF16Bits",
          "[convert]") {
  const std::vector<float> probes = RoundingProbes();
  const auto n = static_cast<int64_t>(probes.size());
  std::vector<uint16_t> half(probes.size()), bf16(probes.size());
  StoreRow<DType::kF16>(probes.data(), n, half.data());
  StoreRow<DType::kBF16>(probes.data(), n, bf16.data());
  int64_t half_bad = 0, bf16_bad = 0;
  uint32_t first_half_bad = 0, first_bf16_bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (half[i] != FloatToHalfBits(probes[i]) && half_bad++ == 0) first_half_bad = FloatBits(probes[i]);
    if (bf16[i] != FloatToBF16Bits(probes[i]) && bf16_bad++ == 0) first_bf16_bad = FloatBits(probes[i]);
  }
  INFO("probes " << n << ", first f16 mismatch at bits 0x" << std::hex << first_half_bad
                 << ", first bf16 mismatch at bits 0x" << first_bf16_bad);
  REQUIRE(half_bad == 0);
  REQUIRE(bf16_bad == 0);
  // Odd lengths (vector body plus scalar tail) convert the same as element by element.
  for (int64_t len : {1, 7, 13, 80, 129}) {
    std::vector<uint16_t> row(static_cast<size_t>(len));
    StoreRow<DType::kF16>(probes.data() + 1000, len, row.data());
    for (int64_t i = 0; i < len; ++i) REQUIRE(row[i] == FloatToHalfBits(probes[1000 + i]));
  }
}

// ---- Backend equivalence -----------------------------------------------------------------------

// Values that stress conversion and the gather arithmetic: normals, values that round, overflow
// f16, f16 subnormals, signed zeros, infinities and NaNs with payloads.
float Tricky(std::mt19937& rng) {
  static const float kSpecial[] = {
      0.0f, -0.0f, INFINITY, -INFINITY, std::bit_cast<float>(0x7FC01234u),
      std::bit_cast<float>(0xFF812345u) /* signalling, negative */, 70000.0f, -65519.0f,
      65520.0f, 3.0e-6f, -5.9604644775390625e-8f, 2.98e-8f, 1.0e-40f};
  std::uniform_int_distribution<int> pick(0, 19);
  const int p = pick(rng);
  if (p < static_cast<int>(std::size(kSpecial))) return kSpecial[p];
  std::normal_distribution<float> nd(0.0f, 4.0f);
  return nd(rng);
}

// Two pools (one per flavour) with identical contents and a simple page allocator.
struct Pools {
  std::unique_ptr<Backend> fast, ref;
  PoolView fast_pool, ref_pool;
  int32_t next_page = 0;

  Pools(DType dtype, int32_t num_pages, int64_t page_bytes) {
    fast = std::move(*CreateBackend("cpu"));
    ref = std::move(*CreateBackend("cpu-reference"));
    for (auto [b, pool] : {std::pair{fast.get(), &fast_pool}, std::pair{ref.get(), &ref_pool}}) {
      pool->base = static_cast<uint8_t*>(*b->AllocateArena(num_pages * page_bytes));
      pool->page_bytes = page_bytes;
      pool->num_pages = num_pages;
      pool->dtype = dtype;
      std::memset(pool->base, 0, static_cast<size_t>(num_pages * page_bytes));
    }
  }
  ~Pools() {
    fast->FreeArena(fast_pool.base);
    ref->FreeArena(ref_pool.base);
  }
  // Byte offset of the first element that differs between the pools, -1 when none. With
  // nan_equal, two NaNs count as equal whatever their sign and payload: which NaN an addition
  // of two NaNs returns depends on the operand order the compiler picked (IEEE leaves it open;
  // the reference flavour itself differs between -O0 and -O3 there), so merged rows whose terms
  // hold several NaNs / infinities agree only up to that.
  int64_t FirstDifference(bool nan_equal) const {
    const int64_t size = fast_pool.num_pages * fast_pool.page_bytes;
    const DType t = fast_pool.dtype;
    const int esize = DTypeSize(t);
    for (int64_t i = 0; i < size / esize; ++i) {
      if (std::memcmp(fast_pool.base + i * esize, ref_pool.base + i * esize, esize) == 0) continue;
      if (nan_equal && std::isnan(LoadAsFloat(fast_pool.base, t, i)) &&
          std::isnan(LoadAsFloat(ref_pool.base, t, i))) {
        continue;
      }
      return i * esize;
    }
    return -1;
  }
  bool Same(bool nan_equal = false) const {
    const int64_t at = FirstDifference(nan_equal);
    if (at >= 0) {
      UNSCOPED_INFO("pools differ at byte " << at << " (page " << at / fast_pool.page_bytes
                    << "): fast " << LoadAsFloat(fast_pool.base + at, fast_pool.dtype, 0)
                    << ", reference " << LoadAsFloat(ref_pool.base + at, ref_pool.dtype, 0));
    }
    return at < 0;
  }
};

// A segment and the storage its view points at.
struct TestSegment {
  std::vector<int32_t> pages, channels;
  SegmentView view;
  TestSegment(Pools& pools, int32_t length, int32_t head_dim, std::vector<int32_t> key_channels) {
    channels = std::move(key_channels);
    view.key_width = channels.empty() ? head_dim : static_cast<int32_t>(channels.size());
    view.value_width = head_dim;
    view.tokens_per_page = TokensPerPage(pools.fast_pool.page_bytes, view.key_width,
                                         view.value_width, pools.fast_pool.dtype);
    pages.resize((length + view.tokens_per_page - 1) / view.tokens_per_page);
    for (int32_t& p : pages) p = pools.next_page++;
    REQUIRE(pools.next_page <= pools.fast_pool.num_pages);
    view.pages = pages.data();
    view.key_channels = channels.empty() ? nullptr : channels.data();
    view.length = length;
  }
};

std::vector<int32_t> EveryOther(int32_t head_dim, int32_t offset) {
  std::vector<int32_t> c;
  for (int32_t i = offset; i < head_dim; i += 2) c.push_back(i);
  return c;
}

void FillHost(std::mt19937& rng, DType t, int64_t n, std::vector<uint8_t>& out) {
  out.resize(static_cast<size_t>(n) * DTypeSize(t));
  for (int64_t i = 0; i < n; ++i) StoreFromFloat(out.data(), t, i, Tricky(rng));
}

TEST_CASE("cpu backend: fast WriteRows / GatherRows / ReadRows equal the reference bit for bit",
          "[cpu_backend]") {
  const DType dtype = GENERATE(DType::kF32, DType::kF16, DType::kBF16);
  const int32_t head_dim = GENERATE(128, 80);
  INFO("dtype " << DTypeName(dtype) << ", head_dim " << head_dim);
  std::mt19937 rng(static_cast<uint32_t>(head_dim) * 7 + static_cast<uint32_t>(dtype));
  const int64_t page_bytes = int64_t{16} * 2 * head_dim * DTypeSize(dtype);  // 16 full rows
  Pools pools(dtype, 4096, page_bytes);

  // Sources: a full-width segment and a pruned one, written from host rows of every dtype (a
  // strided buffer: 3 heads per token, head 1 written).
  const int32_t n_full = 700, n_pruned = 300;
  TestSegment full(pools, n_full, head_dim, {});
  TestSegment pruned(pools, n_pruned, head_dim, EveryOther(head_dim, 1));
  std::vector<RowWrite> writes;
  std::vector<std::vector<uint8_t>> host;
  int32_t row = 0;
  for (DType src : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (TestSegment* seg : {&full, &pruned}) {
      const int32_t count = seg == &full ? 230 : 100;
      const int32_t first = seg == &full ? row : (row / 230) * 100;
      host.emplace_back();
      FillHost(rng, src, int64_t{count} * 3 * head_dim, host.back());
      host.emplace_back();
      FillHost(rng, src, int64_t{count} * 3 * head_dim, host.back());
      RowWrite w;
      w.dst = seg->view;
      w.first_row = first;
      w.num_tokens = count;
      w.head_dim = head_dim;
      w.keys = host[host.size() - 2].data() + static_cast<size_t>(head_dim) * DTypeSize(src);
      w.values = host.back().data() + static_cast<size_t>(head_dim) * DTypeSize(src);
      w.src_dtype = src;
      w.src_stride = 3 * head_dim;
      writes.push_back(w);
    }
    row += 230;
  }
  // The last 10 full-width rows stay zero (row 690..699); fine for the gathers.
  REQUIRE(pools.fast->WriteRows(pools.fast_pool, writes).ok());
  REQUIRE(pools.ref->WriteRows(pools.ref_pool, writes).ok());
  REQUIRE(pools.Same());

  // Gathers: plain copies, weighted single terms, merges of 1-4 rows from both sources, into a
  // full-width and two pruned destinations (one with the source's channels, one different).
  const SegmentView sources[] = {full.view, pruned.view};
  const int32_t n_dst = 400;
  std::vector<std::unique_ptr<TestSegment>> dsts;
  dsts.push_back(std::make_unique<TestSegment>(pools, n_dst, head_dim, std::vector<int32_t>{}));
  dsts.push_back(std::make_unique<TestSegment>(pools, n_dst, head_dim, EveryOther(head_dim, 1)));
  dsts.push_back(std::make_unique<TestSegment>(pools, n_dst, head_dim,
                                               std::vector<int32_t>{0, 3, 5, head_dim - 1}));
  std::vector<std::vector<int32_t>> offsets(dsts.size());
  std::vector<std::vector<GatherTerm>> terms(dsts.size());
  std::uniform_int_distribution<int> kind(0, 5), nterms(2, 4), full_row(0, n_full - 1),
      pruned_row(0, n_pruned - 1), which(0, 1);
  std::uniform_real_distribution<float> weight(-1.5f, 1.5f);
  std::vector<RowGather> gathers;
  for (size_t d = 0; d < dsts.size(); ++d) {
    offsets[d].push_back(0);
    for (int32_t r = 0; r < n_dst; ++r) {
      const int k = kind(rng);
      const int count = k < 4 ? 1 : nterms(rng);
      for (int i = 0; i < count; ++i) {
        GatherTerm t;
        t.src_segment = k == 0 ? 0 : (k == 1 ? 1 : which(rng));
        t.src_row = t.src_segment == 0 ? full_row(rng) : pruned_row(rng);
        if (k >= 2) {  // weighted (k == 3 keeps weight 1 on one side only)
          t.key_weight = weight(rng);
          t.value_weight = k == 3 ? 1.0f : weight(rng);
        }
        terms[d].push_back(t);
      }
      offsets[d].push_back(static_cast<int32_t>(terms[d].size()));
    }
    RowGather g;
    g.sources = sources;
    g.dst = dsts[d]->view;
    g.term_offsets = offsets[d];
    g.terms = terms[d];
    g.head_dim = head_dim;
    gathers.push_back(g);
  }
  REQUIRE(pools.fast->GatherRows(pools.fast_pool, gathers).ok());
  REQUIRE(pools.ref->GatherRows(pools.ref_pool, gathers).ok());
  // Bit for bit, except NaN sign / payload where a merge combined several NaNs or infinities.
  REQUIRE(pools.Same(/*nan_equal=*/true));
  // Rows of one term (copies, weighted copies, channel selection) are bit-identical, NaNs
  // included: sign, payload and quieting.
  for (size_t d = 0; d < dsts.size(); ++d) {
    const SegmentView& v = dsts[d]->view;
    const int esize = DTypeSize(dtype);
    for (int32_t r = 0; r < n_dst; ++r) {
      if (offsets[d][r + 1] - offsets[d][r] != 1) continue;
      const int64_t k = SegmentRowKeyOffset(pools.fast_pool, v, r);
      const int64_t val = SegmentRowValueOffset(pools.fast_pool, v, r);
      REQUIRE(std::memcmp(pools.fast_pool.base + k, pools.ref_pool.base + k,
                          static_cast<size_t>(v.key_width) * esize) == 0);
      REQUIRE(std::memcmp(pools.fast_pool.base + val, pools.ref_pool.base + val,
                          static_cast<size_t>(v.value_width) * esize) == 0);
    }
  }

  // Reads: every segment, keys and/or values, from an offset; the 700-row segment at head_dim 128
  // is long enough to be split across tasks.
  std::vector<SegmentView> all = {full.view, pruned.view};
  for (const auto& d : dsts) all.push_back(d->view);
  for (const SegmentView& s : all) {
    for (int32_t first : {0, 17}) {
      const int32_t count = s.length - first;
      for (int mode = 0; mode < 3; ++mode) {
        const bool want_keys = mode != 2, want_values = mode != 1;
        std::vector<float> kf(static_cast<size_t>(count) * head_dim, 7.0f), vf(kf.size(), 7.0f);
        std::vector<float> kr(kf), vr(vf);
        REQUIRE(pools.fast->ReadRows(pools.fast_pool, s, head_dim, first, count,
                                     want_keys ? kf.data() : nullptr,
                                     want_values ? vf.data() : nullptr).ok());
        REQUIRE(pools.ref->ReadRows(pools.ref_pool, s, head_dim, first, count,
                                    want_keys ? kr.data() : nullptr,
                                    want_values ? vr.data() : nullptr).ok());
        auto same = [](float a, float b) {  // NaN-equal, as the pools (see Same)
          return FloatBits(a) == FloatBits(b) || (std::isnan(a) && std::isnan(b));
        };
        int64_t bad = 0;
        for (size_t i = 0; i < kf.size(); ++i) bad += !same(kf[i], kr[i]) + !same(vf[i], vr[i]);
        REQUIRE(bad == 0);
      }
    }
  }
}

TEST_CASE("cpu backend: ReadRows of a long segment (parallel path) equals the scalar conversion",
          "[cpu_backend]") {
  // Independent of the reference flavour: the expected floats come from dtype.h directly.
  const DType dtype = GENERATE(DType::kF16, DType::kBF16);
  const int32_t head_dim = 80;
  std::mt19937 rng(11);
  const int64_t page_bytes = int64_t{16} * 2 * head_dim * DTypeSize(dtype);
  Pools pools(dtype, 200, page_bytes);
  TestSegment seg(pools, 3000, head_dim, EveryOther(head_dim, 0));
  std::vector<uint8_t> keys, values;
  FillHost(rng, DType::kF32, int64_t{3000} * head_dim, keys);
  FillHost(rng, DType::kF32, int64_t{3000} * head_dim, values);
  RowWrite w{seg.view, 0, 3000, head_dim, keys.data(), values.data(), DType::kF32, head_dim};
  REQUIRE(pools.fast->WriteRows(pools.fast_pool, std::span(&w, 1)).ok());
  std::vector<float> k(static_cast<size_t>(3000) * head_dim), v(k.size());
  REQUIRE(pools.fast->ReadRows(pools.fast_pool, seg.view, head_dim, 0, 3000, k.data(), v.data()).ok());
  const auto* kin = reinterpret_cast<const float*>(keys.data());
  const auto* vin = reinterpret_cast<const float*>(values.data());
  auto round = [&](float x) {
    uint8_t b[4];
    StoreFromFloat(b, dtype, 0, x);
    return LoadAsFloat(b, dtype, 0);
  };
  int64_t bad = 0;
  for (int64_t t = 0; t < 3000; ++t) {
    for (int32_t c = 0; c < head_dim; ++c) {
      const int64_t i = t * head_dim + c;
      const float stored_k = c % 2 == 0 ? kin[i] : 0.0f;  // odd channels are not stored
      bad += FloatBits(k[i]) != FloatBits(round(stored_k));
      bad += FloatBits(v[i]) != FloatBits(round(vin[i]));
    }
  }
  REQUIRE(bad == 0);
}

}  // namespace
}  // namespace kvcache
