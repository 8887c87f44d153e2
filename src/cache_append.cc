// Cache::Append: new tokens' K/V at the end of a layer's streams (cache.cc's pattern: validate
// everything, allocate every page in one all-or-nothing pool call, write into the new pages
// only, commit the metadata last), with the request's checks.
#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvcache/cache.h"
#include "src/cache_internal.h"
#include "src/key_index_upkeep.h"
#include "src/page_summaries.h"
#include "src/stream_table.h"

namespace kvcache {

using internal::PageGuard;
using internal::Segment;
using internal::SegmentFormat;
using internal::Stream;
using internal::StreamTable;

namespace {

absl::Status CheckTensor(const char* name, const TensorRef& t, int64_t expected) {
  if (t.dtype != DType::kF32 && t.dtype != DType::kF16 && t.dtype != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " has unknown dtype ", static_cast<int>(t.dtype)));
  }
  if (t.num_elements != expected) {
    return absl::InvalidArgumentError(absl::StrCat(name, " has ", t.num_elements,
                                                   " elements, expected ", expected,
                                                   " (num_tokens * num_kv_heads * head_dim)"));
  }
  if (expected > 0 && t.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(name, ".data is null"));
  }
  return absl::OkStatus();
}

// Append's request checks that need no sequence (sizes, dtypes, positions, modalities).
absl::Status CheckAppendRequest(const CacheConfig& c, const Backend& backend, int32_t layer,
                                const AppendRequest& req) {
  const int64_t heads = c.num_kv_heads, d = c.head_dim;
  if (layer < 0 || layer >= c.num_layers) {
    return absl::OutOfRangeError(
        absl::StrCat("Append: layer ", layer, " is out of range [0, ", c.num_layers, ")"));
  }
  const int64_t n = static_cast<int64_t>(req.positions.size());
  if (n == 0) return absl::InvalidArgumentError("Append: positions is empty (0 tokens)");
  if (n > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("Append: ", n, " tokens"));
  }
  if (absl::Status s = CheckTensor("Append: keys", req.keys, n * heads * d); !s.ok()) return s;
  if (absl::Status s = CheckTensor("Append: values", req.values, n * heads * d); !s.ok()) {
    return s;
  }
  if (req.keys.space != req.values.space ||
      (req.keys.space != MemorySpace::kHost && req.keys.space != MemorySpace::kDevice)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Append: keys are in memory space ", static_cast<int>(req.keys.space), " (",
        MemorySpaceName(req.keys.space), ") but values in ", static_cast<int>(req.values.space),
        " (", MemorySpaceName(req.values.space), "); both host or both device"));
  }
  if (req.keys.space == MemorySpace::kDevice && !backend.Supports(BackendOp::kDeviceTensors)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Append: keys and values are device tensors but the ",
                     std::string(backend.Name()), " backend has no device tensors"));
  }
  if (req.stream != nullptr && !backend.Supports(BackendOp::kDeviceTensors)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Append: a stream was given but the ", std::string(backend.Name()),
                     " backend has no streams (no device tensors)"));
  }
  if (req.stream != nullptr && req.keys.space != MemorySpace::kDevice) {
    return absl::InvalidArgumentError(
        "Append: a stream was given but keys and values are host tensors (a stream orders "
        "device K/V; host K/V are read before Append returns)");
  }
  if (req.keys.dtype != req.values.dtype) {
    return absl::InvalidArgumentError(absl::StrCat("Append: keys are ", DTypeName(req.keys.dtype),
                                                   " but values are ",
                                                   DTypeName(req.values.dtype)));
  }
  if (!req.modalities.empty() && static_cast<int64_t>(req.modalities.size()) != n) {
    return absl::InvalidArgumentError(absl::StrCat("Append: modalities has ", req.modalities.size(),
                                                   " entries for ", n, " tokens"));
  }
  if (!req.admit.empty() && static_cast<int64_t>(req.admit.size()) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("Append: admit has ", req.admit.size(), " entries for ", n, " tokens"));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (req.positions[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("Append: positions[", i, "] = ", req.positions[i], " is negative"));
    }
    if (i > 0 && req.positions[i] <= req.positions[i - 1]) {
      return absl::InvalidArgumentError(
          absl::StrCat("Append: positions must strictly increase; positions[", i,
                       "] = ", req.positions[i], " after ", req.positions[i - 1]));
    }
    if (!req.modalities.empty() && static_cast<int>(req.modalities[i]) >= kNumModalities) {
      return absl::InvalidArgumentError(absl::StrCat(
          "Append: modalities[", i, "] has unknown value ", static_cast<int>(req.modalities[i])));
    }
  }
  return absl::OkStatus();
}

}  // namespace

// ---- Append -----------------------------------------------------------------------------------

absl::Status Cache::Append(SequenceId seq_id, int32_t layer, const AppendRequest& req) {
  const CacheConfig& c = config_;
  const int32_t heads = c.num_kv_heads, d = c.head_dim;
  if (absl::Status s = CheckAppendRequest(c, *backend_, layer, req); !s.ok()) return s;
  const int64_t n = static_cast<int64_t>(req.positions.size());
  absl::StatusOr<LockedSequence> locked = Lock("Append", seq_id);
  if (!locked.ok()) return locked.status();
  Sequence& seq = **locked;
  StreamTable& table = seq.table;
  if (req.positions[0] <= table.last_position(layer)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Append: positions[0] = ", req.positions[0],
                     " must exceed the last position appended to layer ", layer, " (",
                     table.last_position(layer), ")"));
  }

  // Admitted tokens (the same for every head of the layer), as runs of consecutive indices.
  std::vector<int32_t> admitted;
  admitted.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (req.admit.empty() || req.admit[i] != 0) admitted.push_back(static_cast<int32_t>(i));
  }
  const int32_t m = static_cast<int32_t>(admitted.size());
  if (m == 0) {
    table.AdvancePosition(layer, req.positions[n - 1]);
    return absl::OkStatus();
  }

  // Plan per stream: extend the tail segment (copy-on-write of a shared, partly filled tail
  // page) or open a new full-width segment.
  const SegmentFormat full{d, d, c.ResolvedPageTokens()};
  struct StreamWork {
    bool new_segment = false;
    bool cow_tail = false;
    int32_t new_pages = 0;
    int32_t first_new_page = 0;  // index into guard.pages
  };
  std::vector<StreamWork> work(heads);
  int32_t total_pages = 0;
  for (int32_t h = 0; h < heads; ++h) {
    const Stream& st = table.stream(layer, h);
    StreamWork& w = work[h];
    const Segment* tail = st.segments.empty() ? nullptr : &st.segments.back();
    if (tail == nullptr || !tail->full_width(d) || tail->tokens_per_page != full.tokens_per_page) {
      w.new_segment = true;
      w.new_pages = static_cast<int32_t>(CeilDiv(m, full.tokens_per_page));
    } else {
      const int32_t free_slots = tail->free_slots();
      w.cow_tail = free_slots > 0 && pool_->RefCount(tail->pages.back()) > 1;
      w.new_pages =
          static_cast<int32_t>(CeilDiv(std::max(0, m - free_slots), full.tokens_per_page)) +
          (w.cow_tail ? 1 : 0);
    }
    w.first_new_page = total_pages;
    total_pages += w.new_pages;
  }
  PageGuard guard{pool_.get(), std::vector<int32_t>(total_pages)};
  if (absl::Status s = pool_->Allocate(total_pages, guard.pages.data()); !s.ok()) {
    guard.pages.clear();
    return absl::ResourceExhaustedError(absl::StrCat("Append of ", m, " tokens to sequence ",
                                                     seq_id, " layer ", layer, ": ", s.message()));
  }

  // Build the new page lists without touching the committed segments.
  std::vector<Segment> staged(heads);
  std::vector<PageCopy> copies;
  std::vector<int32_t> replaced_pages;
  for (int32_t h = 0; h < heads; ++h) {
    const StreamWork& w = work[h];
    Segment& s = staged[h];
    const SegmentFormat format =
        w.new_segment ? full : table.stream(layer, h).segments.back().format();
    s.key_width = format.key_width;
    s.value_width = format.value_width;
    s.tokens_per_page = format.tokens_per_page;
    if (!w.new_segment) s.pages = table.stream(layer, h).segments.back().pages;
    int32_t next = w.first_new_page;
    if (w.cow_tail) {
      const int32_t fresh = guard.pages[next++];
      copies.push_back({s.pages.back(), fresh});
      replaced_pages.push_back(s.pages.back());
      s.pages.back() = fresh;
    }
    for (; next < w.first_new_page + w.new_pages; ++next) s.pages.push_back(guard.pages[next]);
  }
  if (!copies.empty() && req.stream == nullptr) {
    if (absl::Status s = backend_->CopyPages(pool_->view(), copies); !s.ok()) return s;
  }
  std::vector<RowWrite> writes;
  const int64_t token_stride = int64_t{heads} * d;
  const int esize = DTypeSize(req.keys.dtype);
  std::vector<int32_t> base_rows(heads);
  for (int32_t h = 0; h < heads; ++h) {
    // Rows continue after the committed tail's tokens (the staged copy holds only pages).
    const int32_t base_row =
        work[h].new_segment ? 0 : table.stream(layer, h).segments.back().length();
    base_rows[h] = base_row;
    const SegmentView view = staged[h].View();
    int32_t i = 0;
    while (i < m) {  // one write per run of consecutive admitted tokens
      int32_t j = i + 1;
      while (j < m && admitted[j] == admitted[j - 1] + 1) ++j;
      RowWrite w;
      w.dst = view;
      w.first_row = base_row + i;
      w.num_tokens = j - i;
      w.head_dim = d;
      const int64_t offset = (int64_t{admitted[i]} * heads + h) * d * esize;
      w.keys = static_cast<const uint8_t*>(req.keys.data) + offset;
      w.values = static_cast<const uint8_t*>(req.values.data) + offset;
      w.src_dtype = req.keys.dtype;
      w.src_stride = token_stride;
      w.src_space = req.keys.space;
      writes.push_back(w);
      i = j;
    }
  }
  if (req.stream != nullptr) {  // both enqueued on the caller's stream, copies first
    if (absl::Status s = backend_->EnqueueAppend(pool_->view(), copies, writes, req.stream);
        !s.ok()) {
      return s;
    }
  } else if (absl::Status s = backend_->WriteRows(pool_->view(), writes); !s.ok()) {
    return s;
  }

  // Device K/V: page summaries and key indexes need the stored keys on the host, and the host
  // cannot read the request's, so they are read back from the pool (f32, exactly the
  // dtype-rounded values the host path computes), before anything is committed. After an
  // Append on a caller's stream, ReadRows (on the backend's stream) waits for that stream's
  // write and synchronises: such an Append is synchronous.
  const bool device_kv = req.keys.space == MemorySpace::kDevice;
  std::vector<float> device_stored;  // [heads, m, head_dim] when device_kv and needed
  if (device_kv) {
    bool needed = c.page_summaries;
    for (int32_t h = 0; h < heads; ++h) {
      needed = needed || internal::HasKeyIndex(seq, table.Index(layer, h));
    }
    if (needed) {
      device_stored.resize(static_cast<size_t>(heads) * m * d);
      for (int32_t h = 0; h < heads; ++h) {
        SegmentView view = staged[h].View();
        view.length = base_rows[h] + m;  // the rows just written
        if (absl::Status s = backend_->ReadRows(pool_->view(), view, d, base_rows[h], m,
                                                device_stored.data() + int64_t{h} * m * d, nullptr);
            !s.ok()) {
          return s;
        }
      }
    }
  }

  // Commit.
  std::vector<int32_t> positions(m);
  std::vector<uint8_t> modalities(m, static_cast<uint8_t>(Modality::kText));
  for (int32_t i = 0; i < m; ++i) {
    positions[i] = req.positions[admitted[i]];
    if (!req.modalities.empty()) modalities[i] = static_cast<uint8_t>(req.modalities[admitted[i]]);
  }
  std::vector<float> stored;  // [m, head_dim] the keys as the pool stores them (dtype-rounded)
  for (int32_t h = 0; h < heads; ++h) {
    const int32_t index = table.Index(layer, h);
    const bool indexed = internal::HasKeyIndex(seq, index);
    if (c.page_summaries || indexed) {
      // Append always writes full-width rows, so the stored keys are full width too.
      stored.resize(static_cast<size_t>(m) * d);
      if (device_kv) {
        std::copy_n(device_stored.begin() + static_cast<int64_t>(h) * m * d,
                    static_cast<int64_t>(m) * d, stored.begin());
      }
      for (int32_t i = 0; i < m && !device_kv; ++i) {
        const int64_t src = (int64_t{admitted[i]} * heads + h) * d;
        for (int32_t ch = 0; ch < d; ++ch) {
          stored[static_cast<size_t>(i) * d + ch] =
              RoundToDType(LoadAsFloat(req.keys.data, req.keys.dtype, src + ch), c.dtype);
        }
      }
    }
    table.ExtendTail(index, work[h].new_segment ? &full : nullptr, std::move(staged[h].pages),
                     positions, modalities, c.page_summaries ? stored.data() : nullptr);
    if (indexed) internal::ExtendKeyIndex(seq, index, stored.data(), m);
  }
  table.AdvancePosition(layer, req.positions[n - 1]);
  guard.committed = true;
  pool_->Release(replaced_pages);
  return absl::OkStatus();
}

}  // namespace kvcache
