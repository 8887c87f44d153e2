// The CPU backend: a host arena, row writes, compaction with channel selection and merges, and
// dispatch to the reference or fast attention kernels.
#include "cpu/cpu_backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cpu/attention.h"
#include "cpu/sparse_decode.h"
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

void WriteOne(const PoolView& pool, const RowWrite& w) {
  const int esize = DTypeSize(pool.dtype);
  const bool same_type = w.src_dtype == pool.dtype && w.dst.key_channels == nullptr &&
                         w.dst.key_width == w.head_dim;
  if (same_type) {
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
    return;
  }
  std::vector<float> scratch(w.head_dim);
  for (int32_t t = 0; t < w.num_tokens; ++t) {
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

void GatherOne(const PoolView& pool, const RowGather& g) {
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
    for (const RowWrite& w : writes) rows += w.num_tokens;
    // Below a few hundred rows the task dispatch costs more than the copies.
    if (writes.size() == 1 || rows < 512) {
      for (const RowWrite& w : writes) WriteOne(pool, w);
    } else {
      oneapi::tbb::parallel_for(size_t{0}, writes.size(),
                                [&](size_t i) { WriteOne(pool, writes[i]); });
    }
    return absl::OkStatus();
  }

  absl::Status GatherRows(const PoolView& pool, std::span<const RowGather> gathers) override {
    oneapi::tbb::parallel_for(size_t{0}, gathers.size(),
                              [&](size_t i) { GatherOne(pool, gathers[i]); });
    return absl::OkStatus();
  }

  absl::Status ReadRows(const PoolView& pool, const SegmentView& segment, int32_t head_dim,
                        int32_t first_row, int32_t count, float* keys, float* values) override {
    for (int32_t t = 0; t < count; ++t) {
      if (keys != nullptr) {
        LoadKeyExpanded(pool, segment, first_row + t, head_dim,
                        keys + static_cast<int64_t>(t) * head_dim);
      }
      if (values != nullptr) {
        LoadValue(pool, segment, first_row + t, values + static_cast<int64_t>(t) * head_dim);
      }
    }
    return absl::OkStatus();
  }

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
