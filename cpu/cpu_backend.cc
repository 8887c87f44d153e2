// The CPU backend: a host arena, row writes, compaction with channel selection and merges, and
// dispatch to the reference or fast attention kernels.
//
// Data movement has two implementations with bit-identical results: the scalar one (per-element
// LoadAsFloat / StoreFromFloat, the "cpu-reference" flavour and the oracle of
// tests/test_cpu_backend.cc) and the fast one (the "cpu" flavour): the dtype a compile-time
// constant per call, rows converted by the vectorisable loops of cpu/convert.h, scratch rows
// allocated once per task, and reads of long segments split across oneTBB tasks.
#include "cpu/cpu_backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cpu/attention.h"
#include "cpu/convert.h"
#include "cpu/sparse_decode.h"
#include "oneapi/tbb/blocked_range.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvcache::cpu {
namespace {

// Expands a stored key row (key_width channels listed by key_channels) to head_dim floats.
void LoadKeyExpanded(const PoolView& pool, const SegmentView& s, int32_t row, int32_t head_dim,
                     float* out) {
  const uint8_t* k = SegmentKeyRow(pool, s, row);
  if (s.key_channels == nullptr) {
    for (int32_t c = 0; c < head_dim; ++c) out[c] = LoadAsFloat(k, pool.dtype, c);
    return;
  }
  for (int32_t c = 0; c < head_dim; ++c) out[c] = 0.0f;
  for (int32_t i = 0; i < s.key_width; ++i) out[s.key_channels[i]] = LoadAsFloat(k, pool.dtype, i);
}

void LoadValue(const PoolView& pool, const SegmentView& s, int32_t row, float* out) {
  const uint8_t* v = SegmentValueRow(pool, s, row);
  for (int32_t c = 0; c < s.value_width; ++c) out[c] = LoadAsFloat(v, pool.dtype, c);
}

// Stores head_dim floats into a row, keeping only the segment's channels.
void StoreKey(const PoolView& pool, const SegmentView& s, int32_t row, const float* in) {
  uint8_t* k = SegmentKeyRow(pool, s, row);
  if (s.key_channels == nullptr) {
    for (int32_t c = 0; c < s.key_width; ++c) StoreFromFloat(k, pool.dtype, c, in[c]);
  } else {
    for (int32_t i = 0; i < s.key_width; ++i) StoreFromFloat(k, pool.dtype, i, in[s.key_channels[i]]);
  }
}

void StoreValue(const PoolView& pool, const SegmentView& s, int32_t row, const float* in) {
  uint8_t* v = SegmentValueRow(pool, s, row);
  for (int32_t c = 0; c < s.value_width; ++c) StoreFromFloat(v, pool.dtype, c, in[c]);
}

// Writes of a source already in the pool dtype into full-width rows are plain copies (both
// flavours). Returns false when the write needs a conversion or channel selection.
bool WriteCopy(const PoolView& pool, const RowWrite& w) {
  const int esize = DTypeSize(pool.dtype);
  const bool same_type = w.src_dtype == pool.dtype && w.dst.key_channels == nullptr &&
                         w.dst.key_width == w.head_dim;
  if (!same_type) return false;
  // Page by page: the destination rows of one page are contiguous, so the address math runs
  // once per page and the row copies are plain strided memcpys.
  const size_t row_bytes = static_cast<size_t>(w.head_dim) * esize;
  const int64_t src_stride_bytes = w.src_stride * esize;
  const auto* ksrc = static_cast<const uint8_t*>(w.keys);
  const auto* vsrc = static_cast<const uint8_t*>(w.values);
  int32_t t = 0;
  while (t < w.num_tokens) {
    const int32_t row = w.first_row + t;
    const int32_t in_page = std::min(w.num_tokens - t, w.dst.tokens_per_page - row % w.dst.tokens_per_page);
    uint8_t* kdst = SegmentKeyRow(pool, w.dst, row);
    uint8_t* vdst = SegmentValueRow(pool, w.dst, row);
    for (int32_t i = 0; i < in_page; ++i) {
      std::memcpy(kdst + i * row_bytes, ksrc + (t + i) * src_stride_bytes, row_bytes);
      std::memcpy(vdst + i * row_bytes, vsrc + (t + i) * src_stride_bytes, row_bytes);
    }
    t += in_page;
  }
  return true;
}

void WriteOneReference(const PoolView& pool, const RowWrite& w) {
  if (WriteCopy(pool, w)) return;
  std::vector<float> scratch(w.head_dim);
  for (int32_t t = 0; t < w.num_tokens; ++t) {  // scalar conversion
    const int32_t row = w.first_row + t;
    const int64_t src_offset = static_cast<int64_t>(t) * w.src_stride;
    for (int32_t c = 0; c < w.head_dim; ++c) scratch[c] = LoadAsFloat(w.keys, w.src_dtype, src_offset + c);
    StoreKey(pool, w.dst, row, scratch.data());
    for (int32_t c = 0; c < w.head_dim; ++c) {
      scratch[c] = LoadAsFloat(w.values, w.src_dtype, src_offset + c);
    }
    StoreValue(pool, w.dst, row, scratch.data());
  }
}

void GatherOneReference(const PoolView& pool, const RowGather& g) {
  const int32_t d = g.head_dim;
  const int esize = DTypeSize(pool.dtype);
  std::vector<float> key(d), value(d), acc_k(d), acc_v(d);
  for (int32_t r = 0; r < g.dst.length; ++r) {
    const int32_t begin = g.term_offsets[r], end = g.term_offsets[r + 1];
    // Fast path: a plain copy of one full-width row into a full-width row.
    if (end - begin == 1) {
      const GatherTerm& t = g.terms[begin];
      const SegmentView& src = g.sources[t.src_segment];
      if (t.key_weight == 1.0f && t.value_weight == 1.0f && src.key_channels == nullptr &&
          g.dst.key_channels == nullptr && src.key_width == g.dst.key_width) {
        std::memcpy(SegmentKeyRow(pool, g.dst, r), SegmentKeyRow(pool, src, t.src_row),
                    static_cast<size_t>(src.key_width) * esize);
        std::memcpy(SegmentValueRow(pool, g.dst, r), SegmentValueRow(pool, src, t.src_row),
                    static_cast<size_t>(src.value_width) * esize);
        continue;
      }
    }
    std::fill(acc_k.begin(), acc_k.end(), 0.0f);
    std::fill(acc_v.begin(), acc_v.end(), 0.0f);
    for (int32_t i = begin; i < end; ++i) {
      const GatherTerm& t = g.terms[i];
      const SegmentView& src = g.sources[t.src_segment];
      LoadKeyExpanded(pool, src, t.src_row, d, key.data());
      LoadValue(pool, src, t.src_row, value.data());
      for (int32_t c = 0; c < d; ++c) acc_k[c] += t.key_weight * key[c];
      for (int32_t c = 0; c < d; ++c) acc_v[c] += t.value_weight * value[c];
    }
    StoreKey(pool, g.dst, r, acc_k.data());
    StoreValue(pool, g.dst, r, acc_v.data());
  }
}

void ReadRowsReference(const PoolView& pool, const SegmentView& segment, int32_t head_dim,
                       int32_t first_row, int32_t count, float* keys, float* values) {
  for (int32_t t = 0; t < count; ++t) {
    if (keys != nullptr) {
      LoadKeyExpanded(pool, segment, first_row + t, head_dim,
                      keys + static_cast<int64_t>(t) * head_dim);
    }
    if (values != nullptr) {
      LoadValue(pool, segment, first_row + t, values + static_cast<int64_t>(t) * head_dim);
    }
  }
}

// ---- Fast data movement: the same arithmetic as above, per-dtype row loops ------------------

// Scratch rows of one task (no allocation per row).
struct RowScratch {
  explicit RowScratch(int32_t head_dim)
      : key(head_dim), value(head_dim), acc_k(head_dim), acc_v(head_dim), narrow(head_dim) {}
  std::vector<float> key, value, acc_k, acc_v;  // [head_dim] each
  std::vector<float> narrow;                    // [key_width] a pruned row's stored channels
};

// As LoadKeyExpanded: a stored key row expanded to head_dim floats (missing channels 0).
template <DType T>
void LoadKeyExpandedT(const PoolView& pool, const SegmentView& s, int32_t row, int32_t head_dim,
                      float* out, float* narrow) {
  const uint8_t* k = SegmentKeyRow(pool, s, row);
  if (s.key_channels == nullptr) {
    LoadRow<T>(k, head_dim, out);
    return;
  }
  LoadRow<T>(k, s.key_width, narrow);
  std::fill(out, out + head_dim, 0.0f);
  for (int32_t i = 0; i < s.key_width; ++i) out[s.key_channels[i]] = narrow[i];
}

// As StoreKey: head_dim floats into a row, keeping the segment's channels.
template <DType T>
void StoreKeyT(const PoolView& pool, const SegmentView& s, int32_t row, const float* in,
               float* narrow) {
  uint8_t* k = SegmentKeyRow(pool, s, row);
  if (s.key_channels == nullptr) {
    StoreRow<T>(in, s.key_width, k);
    return;
  }
  for (int32_t i = 0; i < s.key_width; ++i) narrow[i] = in[s.key_channels[i]];
  StoreRow<T>(narrow, s.key_width, k);
}

template <DType S, DType T>
void WriteOneT(const PoolView& pool, const RowWrite& w) {
  RowScratch scratch(w.head_dim);
  const auto* keys = static_cast<const uint8_t*>(w.keys);
  const auto* values = static_cast<const uint8_t*>(w.values);
  for (int32_t t = 0; t < w.num_tokens; ++t) {
    const int32_t row = w.first_row + t;
    const int64_t src_offset = static_cast<int64_t>(t) * w.src_stride * DTypeSize(S);  // bytes
    LoadRow<S>(keys + src_offset, w.head_dim, scratch.key.data());
    StoreKeyT<T>(pool, w.dst, row, scratch.key.data(), scratch.narrow.data());
    LoadRow<S>(values + src_offset, w.head_dim, scratch.value.data());
    StoreRow<T>(scratch.value.data(), w.dst.value_width, SegmentValueRow(pool, w.dst, row));
  }
}

void WriteOneFast(const PoolView& pool, const RowWrite& w) {
  if (WriteCopy(pool, w)) return;
  DispatchDType(w.src_dtype, [&](auto src) {
    DispatchDType(pool.dtype, [&](auto dst) { WriteOneT<src.value, dst.value>(pool, w); });
  });
}

// What the reference's `0 + 1 * x` followed by a store does to a stored element, on its bits:
// the identity except that -0 becomes +0 and a NaN comes back quiet (f16: the canonical quiet
// NaN with its sign, as FloatToHalfBits; bf16 / f32: the quiet bit set, payload kept). Plain
// integer selects, so a loop of it vectorises.
template <DType T>
struct StoredBits {
  using Type = std::conditional_t<T == DType::kF32, uint32_t, uint16_t>;
  static Type Unit(Type x) {
    if constexpr (T == DType::kF32) {
      const bool nan = (x & 0x7FFFFFFFu) > 0x7F800000u;
      const uint32_t y = nan ? (x | 0x00400000u) : x;
      return y == 0x80000000u ? 0u : y;
    } else if constexpr (T == DType::kF16) {
      const bool nan = (x & 0x7FFFu) > 0x7C00u;
      const uint16_t y = nan ? static_cast<uint16_t>((x & 0x8000u) | 0x7E00u) : x;
      return y == 0x8000u ? uint16_t{0} : y;
    } else {
      const bool nan = (x & 0x7FFFu) > 0x7F80u;
      const uint16_t y = nan ? static_cast<uint16_t>(x | 0x40u) : x;
      return y == 0x8000u ? uint16_t{0} : y;
    }
  }
};

// Row r of g.dst from one source row with weights 1 (compaction with channel selection, a
// pruned source into a full row): element moves with StoredBits::Unit instead of the convert /
// accumulate / round trip, with the same result.
template <DType T>
void GatherUnitRow(const PoolView& pool, const RowGather& g, int32_t r, const GatherTerm& t,
                   typename StoredBits<T>::Type* expanded) {
  using Bits = typename StoredBits<T>::Type;
  const SegmentView& src = g.sources[t.src_segment];
  const SegmentView& dst = g.dst;
  const auto* ks = reinterpret_cast<const Bits*>(SegmentKeyRow(pool, src, t.src_row));
  auto* kd = reinterpret_cast<Bits*>(SegmentKeyRow(pool, dst, r));
  const Bits* key = ks;  // the source key over all head_dim channels
  if (src.key_channels != nullptr) {
    std::fill(expanded, expanded + g.head_dim, Bits{0});  // channels not stored read as +0
    for (int32_t i = 0; i < src.key_width; ++i) expanded[src.key_channels[i]] = ks[i];
    key = expanded;
  }
  if (dst.key_channels == nullptr) {
    for (int32_t c = 0; c < dst.key_width; ++c) kd[c] = StoredBits<T>::Unit(key[c]);
  } else {
    for (int32_t i = 0; i < dst.key_width; ++i) kd[i] = StoredBits<T>::Unit(key[dst.key_channels[i]]);
  }
  const auto* vs = reinterpret_cast<const Bits*>(SegmentValueRow(pool, src, t.src_row));
  auto* vd = reinterpret_cast<Bits*>(SegmentValueRow(pool, dst, r));
  for (int32_t c = 0; c < dst.value_width; ++c) vd[c] = StoredBits<T>::Unit(vs[c]);
}

// Starts loading a term's key and value rows into cache (the rows of a merge are scattered over
// the stream, so the hardware prefetcher cannot guess them).
inline void PrefetchRows(const PoolView& pool, const RowGather& g, const GatherTerm& t) {
  const SegmentView& src = g.sources[t.src_segment];
  const int esize = DTypeSize(pool.dtype);
  const uint8_t* k = SegmentKeyRow(pool, src, t.src_row);
  const uint8_t* v = SegmentValueRow(pool, src, t.src_row);
  for (int64_t b = 0; b < int64_t{src.key_width} * esize; b += 64) __builtin_prefetch(k + b);
  for (int64_t b = 0; b < int64_t{src.value_width} * esize; b += 64) __builtin_prefetch(v + b);
}

template <DType T>
void GatherOneT(const PoolView& pool, const RowGather& g) {
  const int32_t d = g.head_dim;
  constexpr int esize = DTypeSize(T);
  RowScratch scratch(d);
  float* key = scratch.key.data();
  float* value = scratch.value.data();
  float* acc_k = scratch.acc_k.data();
  float* acc_v = scratch.acc_v.data();
  std::vector<typename StoredBits<T>::Type> expanded(d);  // [head_dim]
  for (int32_t r = 0; r < g.dst.length; ++r) {
    const int32_t begin = g.term_offsets[r], end = g.term_offsets[r + 1];
    // A plain copy of one full-width row into a full-width row (as GatherOneReference).
    if (end - begin == 1) {
      const GatherTerm& t = g.terms[begin];
      const SegmentView& src = g.sources[t.src_segment];
      if (t.key_weight == 1.0f && t.value_weight == 1.0f) {
        if (src.key_channels == nullptr && g.dst.key_channels == nullptr &&
            src.key_width == g.dst.key_width) {
          std::memcpy(SegmentKeyRow(pool, g.dst, r), SegmentKeyRow(pool, src, t.src_row),
                      static_cast<size_t>(src.key_width) * esize);
          std::memcpy(SegmentValueRow(pool, g.dst, r), SegmentValueRow(pool, src, t.src_row),
                      static_cast<size_t>(src.value_width) * esize);
        } else {
          GatherUnitRow<T>(pool, g, r, t, expanded.data());
        }
        continue;
      }
    }
    // The reference's arithmetic in the same order (0 + w * x per term), so -0 and NaN payloads
    // come out the same.
    std::fill(acc_k, acc_k + d, 0.0f);
    std::fill(acc_v, acc_v + d, 0.0f);
    for (int32_t i = begin; i < end; ++i) {
      const GatherTerm& t = g.terms[i];
      const SegmentView& src = g.sources[t.src_segment];
      if (i + 1 < end) PrefetchRows(pool, g, g.terms[i + 1]);  // merge sources are scattered
      LoadKeyExpandedT<T>(pool, src, t.src_row, d, key, scratch.narrow.data());
      LoadRow<T>(SegmentValueRow(pool, src, t.src_row), src.value_width, value);
      const float kw = t.key_weight, vw = t.value_weight;
      for (int32_t c = 0; c < d; ++c) acc_k[c] += kw * key[c];
      for (int32_t c = 0; c < d; ++c) acc_v[c] += vw * value[c];
    }
    StoreKeyT<T>(pool, g.dst, r, acc_k, scratch.narrow.data());
    StoreRow<T>(acc_v, g.dst.value_width, SegmentValueRow(pool, g.dst, r));
  }
}

void GatherOneFast(const PoolView& pool, const RowGather& g) {
  DispatchDType(pool.dtype, [&](auto t) { GatherOneT<t.value>(pool, g); });
}

template <DType T>
void ReadRowsT(const PoolView& pool, const SegmentView& segment, int32_t head_dim,
               int32_t first_row, int32_t begin, int32_t end, float* keys, float* values) {
  std::vector<float> narrow(segment.key_width);
  for (int32_t t = begin; t < end; ++t) {
    const int32_t row = first_row + t;
    if (keys != nullptr) {
      LoadKeyExpandedT<T>(pool, segment, row, head_dim, keys + static_cast<int64_t>(t) * head_dim,
                          narrow.data());
    }
    if (values != nullptr) {
      LoadRow<T>(SegmentValueRow(pool, segment, row), segment.value_width,
                 values + static_cast<int64_t>(t) * head_dim);
    }
  }
}

void ReadRowsFast(const PoolView& pool, const SegmentView& segment, int32_t head_dim,
                  int32_t first_row, int32_t count, float* keys, float* values) {
  // Below ~64K elements a task costs more than the conversion it would take over.
  constexpr int64_t kSerialElements = int64_t{1} << 16;
  constexpr int32_t kRowsPerTask = 256;
  DispatchDType(pool.dtype, [&](auto t) {
    if (static_cast<int64_t>(count) * head_dim < kSerialElements) {
      ReadRowsT<t.value>(pool, segment, head_dim, first_row, 0, count, keys, values);
      return;
    }
    oneapi::tbb::parallel_for(
        oneapi::tbb::blocked_range<int32_t>(0, count, kRowsPerTask),
        [&](const oneapi::tbb::blocked_range<int32_t>& r) {
          ReadRowsT<t.value>(pool, segment, head_dim, first_row, r.begin(), r.end(), keys, values);
        });
  });
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(KernelFlavor flavor) : flavor_(flavor) {}

  std::string_view Name() const override {
    return flavor_ == KernelFlavor::kFast ? "cpu" : "cpu-reference";
  }
  bool HostAccessible() const override { return true; }

  absl::StatusOr<void*> AllocateArena(int64_t bytes) override {
    if (bytes <= 0) return absl::InvalidArgumentError(absl::StrCat("arena of ", bytes, " bytes"));
    constexpr int64_t kAlign = 4096;
    const int64_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, static_cast<size_t>(rounded));
    if (p == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("cpu backend: cannot allocate an arena of ",
                                                       bytes, " bytes"));
    }
    return p;
  }
  void FreeArena(void* arena) override { std::free(arena); }

  absl::Status CopyPages(const PoolView& pool, std::span<const PageCopy> copies) override {
    for (const PageCopy& c : copies) {
      std::memcpy(pool.base + c.dst * pool.page_bytes, pool.base + c.src * pool.page_bytes,
                  static_cast<size_t>(pool.page_bytes));
    }
    return absl::OkStatus();
  }

  absl::Status WriteRows(const PoolView& pool, std::span<const RowWrite> writes) override {
    int64_t rows = 0;
    for (const RowWrite& w : writes) {
      // The Cache refuses device K/V before this; a direct caller gets the same answer.
      if (w.src_space != MemorySpace::kHost) {
        return absl::InvalidArgumentError(
            "WriteRows: the cpu backend reads host rows only (src_space is device)");
      }
      rows += w.num_tokens;
    }
    // Below a few hundred rows the task dispatch costs more than the copies.
    auto write = flavor_ == KernelFlavor::kFast ? WriteOneFast : WriteOneReference;
    if (writes.size() == 1 || rows < 512) {
      for (const RowWrite& w : writes) write(pool, w);
    } else {
      oneapi::tbb::parallel_for(size_t{0}, writes.size(),
                                [&](size_t i) { write(pool, writes[i]); });
    }
    return absl::OkStatus();
  }

  absl::Status GatherRows(const PoolView& pool, std::span<const RowGather> gathers) override {
    auto gather = flavor_ == KernelFlavor::kFast ? GatherOneFast : GatherOneReference;
    oneapi::tbb::parallel_for(size_t{0}, gathers.size(),
                              [&](size_t i) { gather(pool, gathers[i]); });
    return absl::OkStatus();
  }

  absl::Status ReadRows(const PoolView& pool, const SegmentView& segment, int32_t head_dim,
                        int32_t first_row, int32_t count, float* keys, float* values) override {
    if (flavor_ == KernelFlavor::kFast) {
      ReadRowsFast(pool, segment, head_dim, first_row, count, keys, values);
    } else {
      ReadRowsReference(pool, segment, head_dim, first_row, count, keys, values);
    }
    return absl::OkStatus();
  }

  // Both flavours implement every optional operation.
  // Every kernel, on host memory only.
  bool Supports(BackendOp op) const override { return op != BackendOp::kDeviceTensors; }

  absl::Status DecodeAttention(const PagedKVView& kv, const DecodeParams& params, const float* q,
                               float* out, float* lse) override {
    return flavor_ == KernelFlavor::kFast ? DecodeAttentionFast(kv, params, q, out, lse)
                                          : DecodeAttentionReference(kv, params, q, out, lse);
  }

  // Quest and retrieval: both flavours; Quest's page attention runs this flavour's dense kernel.
  absl::Status SparseDecodeAttention(const PagedKVView& kv, const DecodeParams& params,
                                     const float* q, float* out, float* lse) override {
    return cpu::SparseDecodeAttention(
        kv, params, q, out, lse,
        flavor_ == KernelFlavor::kFast ? DecodeAttentionFast : DecodeAttentionReference);
  }

  absl::StatusOr<std::unique_ptr<KeyIndex>> CreateKeyIndex(const KeyIndexParams& params) override {
    return CreateHnswKeyIndex(params);
  }

  absl::Status ScoreRows(const PagedKVView& kv, const ScoreRowsParams& params,
                         const float* queries, const int32_t* query_positions,
                         float* token_scores, int64_t* below_threshold,
                         int64_t* causal_entries) override {
    return flavor_ == KernelFlavor::kFast
               ? ScoreRowsFast(kv, params, queries, query_positions, token_scores,
                               below_threshold, causal_entries)
               : ScoreRowsReference(kv, params, queries, query_positions, token_scores,
                                    below_threshold, causal_entries);
  }

 private:
  KernelFlavor flavor_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(KernelFlavor flavor) {
  return std::unique_ptr<Backend>(new CpuBackend(flavor));
}

}  // namespace kvcache::cpu
