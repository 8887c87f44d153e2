// Cache: read-side queries of one stream or one layer (lengths, contents, page layouts, page
// summaries, versions), the plan stamps behind the stale-plan check, and the FlashInfer-style
// page-table export. Each takes the sequence lock through Cache::Lock / LockStream.
#include <algorithm>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "kvcache/cache.h"
#include "src/cache_internal.h"
#include "src/page_summaries.h"
#include "src/plan_compile.h"

namespace kvcache {

using internal::Segment;
using internal::Stream;

absl::StatusOr<int32_t> Cache::StreamLength(SequenceId seq_id, int32_t layer,
                                            int32_t kv_head) const {
  absl::StatusOr<LockedSequence> locked = LockStream("StreamLength", seq_id, layer, kv_head);
  if (!locked.ok()) return locked.status();
  return (*locked)->table.stream(layer, kv_head).length();
}

absl::StatusOr<uint64_t> Cache::StreamVersion(SequenceId seq_id, int32_t layer,
                                              int32_t kv_head) const {
  absl::StatusOr<LockedSequence> locked = LockStream("StreamVersion", seq_id, layer, kv_head);
  if (!locked.ok()) return locked.status();
  return (*locked)->table.stream(layer, kv_head).version;
}

absl::StatusOr<StreamContents> Cache::ReadStream(SequenceId seq_id, int32_t layer, int32_t kv_head,
                                                 bool with_kv) const {
  return ReadStream(seq_id, layer, kv_head, StreamReadOptions{.keys = with_kv, .values = with_kv});
}

absl::StatusOr<StreamContents> Cache::ReadStream(SequenceId seq_id, int32_t layer, int32_t kv_head,
                                                 const StreamReadOptions& options) const {
  absl::StatusOr<LockedSequence> locked = LockStream("ReadStream", seq_id, layer, kv_head);
  if (!locked.ok()) return locked.status();
  internal::StreamTable& table = (*locked)->table;
  const int32_t index = table.Index(layer, kv_head);
  const Stream& st = table.stream(index);
  std::vector<SegmentView> views;
  table.AppendViews(index, views);
  const int32_t d = config_.head_dim;
  StreamContents out;
  out.length = st.length();
  out.num_segments = static_cast<int32_t>(st.segments.size());
  if (options.keys) out.keys.resize(static_cast<size_t>(out.length) * d);
  if (options.values) out.values.resize(static_cast<size_t>(out.length) * d);
  int32_t at = 0;
  for (size_t i = 0; i < st.segments.size(); ++i) {
    const Segment& s = st.segments[i];
    out.positions.insert(out.positions.end(), s.positions.begin(), s.positions.end());
    for (uint8_t m : s.modalities) out.modalities.push_back(static_cast<Modality>(m));
    out.scores.insert(out.scores.end(), s.scores.begin(), s.scores.end());
    out.key_width.insert(out.key_width.end(), s.length(), s.key_width);
    if ((options.keys || options.values) && s.length() > 0) {
      // Both backends skip a null destination (keys or values not requested).
      float* keys = options.keys ? out.keys.data() + static_cast<size_t>(at) * d : nullptr;
      float* values = options.values ? out.values.data() + static_cast<size_t>(at) * d : nullptr;
      if (absl::Status status =
              backend_->ReadRows(pool_->view(), views[i], d, 0, s.length(), keys, values);
          !status.ok()) {
        return status;
      }
    }
    at += s.length();
  }
  return out;
}

absl::StatusOr<std::vector<SegmentLayout>> Cache::StreamPages(SequenceId seq_id, int32_t layer,
                                                              int32_t kv_head) const {
  absl::StatusOr<LockedSequence> locked = LockStream("StreamPages", seq_id, layer, kv_head);
  if (!locked.ok()) return locked.status();
  const Stream& st = (*locked)->table.stream(layer, kv_head);
  std::vector<SegmentLayout> out;
  out.reserve(st.segments.size());
  for (const Segment& s : st.segments) {
    out.push_back({.length = s.length(),
                   .tokens_per_page = s.tokens_per_page,
                   .key_width = s.key_width,
                   .value_width = s.value_width,
                   .pages = s.pages});
  }
  return out;
}

absl::StatusOr<std::vector<PageSummary>> Cache::ReadPageSummaries(SequenceId seq_id, int32_t layer,
                                                                  int32_t kv_head) const {
  if (!config_.page_summaries) {
    return absl::FailedPreconditionError("ReadPageSummaries: CacheConfig::page_summaries is off");
  }
  absl::StatusOr<LockedSequence> locked = LockStream("ReadPageSummaries", seq_id, layer, kv_head);
  if (!locked.ok()) return locked.status();
  return internal::CollectSummaries((*locked)->table.stream(layer, kv_head));
}

absl::Status Cache::AddScores(SequenceId seq_id, int32_t layer, int32_t kv_head,
                              std::span<const float> delta) {
  absl::StatusOr<LockedSequence> locked = LockStream("AddScores", seq_id, layer, kv_head);
  if (!locked.ok()) return locked.status();
  internal::StreamTable& table = (*locked)->table;
  const int32_t length = table.stream(layer, kv_head).length();
  if (static_cast<int64_t>(delta.size()) != length) {
    return absl::InvalidArgumentError(absl::StrCat("AddScores: delta has ", delta.size(),
                                                   " entries for a stream of ", length, " tokens"));
  }
  table.AddScores(table.Index(layer, kv_head), delta);
  return absl::OkStatus();
}

// ---- Plan stamps (the stale-plan check) -------------------------------------------------------

absl::StatusOr<StreamStamp> Cache::Stamp(SequenceId seq_id) const {
  absl::StatusOr<LockedSequence> locked = Lock("Stamp", seq_id);
  if (!locked.ok()) return locked.status();
  const internal::StreamTable& table = (*locked)->table;
  StreamStamp stamp;
  stamp.sequence = seq_id;
  stamp.lengths.reserve(table.num_streams());
  stamp.versions.reserve(table.num_streams());
  for (int32_t i = 0; i < table.num_streams(); ++i) {
    stamp.lengths.push_back(table.stream(i).length());
    stamp.versions.push_back(table.stream(i).version);
  }
  return stamp;
}

absl::Status Cache::CheckPlanCurrent(const EvictionPlan& plan, const StreamStamp& stamp) const {
  absl::StatusOr<LockedSequence> locked = Lock("CheckPlanCurrent", plan.sequence);
  if (!locked.ok()) return locked.status();
  if (absl::Status s = internal::CheckStamp(plan, stamp, (*locked)->table); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("CheckPlanCurrent: ", s.message()));
  }
  return absl::OkStatus();
}

// ---- Page-table export ------------------------------------------------------------------------

absl::StatusOr<PageTable> Cache::ExportPageTable(int32_t layer,
                                                 std::span<const SequenceId> batch) const {
  const CacheConfig& c = config_;
  if (layer < 0 || layer >= c.num_layers) {
    return absl::OutOfRangeError(
        absl::StrCat("ExportPageTable: layer ", layer, " is out of range [0, ", c.num_layers, ")"));
  }
  if (batch.empty()) return absl::InvalidArgumentError("ExportPageTable: empty batch");
  const int32_t heads = c.num_kv_heads;
  const int32_t tpp = c.ResolvedPageTokens();
  PageTable table;
  table.indptr.reserve(batch.size() * heads + 1);
  table.indptr.push_back(0);
  table.last_page_len.reserve(batch.size() * heads);
  // One sequence locked at a time: the export is a per-stream snapshot, as StreamPages was.
  for (size_t b = 0; b < batch.size(); ++b) {
    absl::StatusOr<LockedSequence> locked =
        Lock(absl::StrCat("ExportPageTable: batch[", b, "]"), batch[b]);
    if (!locked.ok()) return locked.status();
    for (int32_t h = 0; h < heads; ++h) {
      const std::vector<Segment>& segs = (*locked)->table.stream(layer, h).segments;
      int last_nonempty = -1;
      for (size_t i = 0; i < segs.size(); ++i) {
        if (segs[i].length() > 0) last_nonempty = static_cast<int>(i);
      }
      int32_t last = 0;
      for (int i = 0; i <= last_nonempty; ++i) {
        const Segment& s = segs[i];
        if (s.length() == 0) continue;
        const std::string stream =
            absl::StrCat("ExportPageTable: stream (sequence ", batch[b], ", layer ", layer,
                         ", kv head ", h, ") segment ", i);
        if (s.key_width != c.head_dim || s.value_width != c.head_dim || s.tokens_per_page != tpp) {
          return absl::FailedPreconditionError(absl::StrCat(
              stream, " stores key_width ", s.key_width, ", value_width ", s.value_width, " at ",
              s.tokens_per_page, " tokens per page; only full-width rows (", c.head_dim, ", ", tpp,
              " tokens per page) can be exported (channel-pruned by a ThinK-style policy?)"));
        }
        if (i != last_nonempty && s.length() % tpp != 0) {
          return absl::FailedPreconditionError(absl::StrCat(
              stream, " holds ", s.length(), " tokens, not a multiple of ", tpp,
              ": its partly filled last page is followed by another segment, so the stream is "
              "not one page list"));
        }
        const int32_t used = static_cast<int32_t>(CeilDiv(s.length(), tpp));
        if (static_cast<int32_t>(s.pages.size()) < used) {
          return absl::InternalError(
              absl::StrCat(stream, " has ", s.pages.size(), " pages for ", s.length(), " tokens"));
        }
        table.indices.insert(table.indices.end(), s.pages.begin(), s.pages.begin() + used);
        last = s.length() - (used - 1) * tpp;
        if (table.indices.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
          return absl::OutOfRangeError("ExportPageTable: more than 2^31-1 pages in the table");
        }
      }
      table.indptr.push_back(static_cast<int32_t>(table.indices.size()));
      table.last_page_len.push_back(last);
    }
  }
  const PoolView pool = pool_->view();
  const int64_t esize = DTypeSize(c.dtype);
  PageTableLayout& layout = table.layout;
  layout.pool_base = pool.base;
  layout.page_bytes = pool.page_bytes;
  layout.key_offset_bytes = 0;
  layout.value_offset_bytes = int64_t{tpp} * c.head_dim * esize;
  layout.row_stride_bytes = c.head_dim * esize;
  layout.num_pages = pool.num_pages;
  layout.tokens_per_page = tpp;
  layout.head_dim = c.head_dim;
  layout.dtype = c.dtype;
  layout.is_device = !backend_->HostAccessible();
  return table;
}

}  // namespace kvcache
