// Cache: decode steps whose host work is done before the step (decode_plan.h, StepOptions).
//
// A step reservation is Append's host half for every layer and kv head of a batch at once, for
// the one token each sequence decodes: pages (all layers or none), copy-on-write of shared
// tails, the token's metadata committed (position, text modality, score 0). AppendStep later
// writes the K/V into the reserved rows with one write launch per layer. A capturable plan also
// owns device buffers at fixed addresses (backend_impl.h StepBuffers) that every prepare
// rewrites, so the per-layer calls enqueue kernels only, and a CUDA graph captured from them
// replays after each re-prepare.
#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kvcache/cache.h"
#include "src/cache_internal.h"
#include "src/key_index_upkeep.h"
#include "src/stream_table.h"

namespace kvcache {

using internal::PageGuard;
using internal::PlanLock;
using internal::Segment;
using internal::SegmentFormat;
using internal::Stream;
using internal::StreamTable;

namespace {

absl::Status CheckStepOptions(absl::string_view fn, const CacheConfig& c, const Backend& backend,
                              size_t batch, const StepOptions& o) {
  if (o.append_tokens != 0 && o.append_tokens != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": append_tokens = ", o.append_tokens, " (0 or 1 token per step)"));
  }
  const size_t expected = o.append_tokens == 1 ? batch : 0;
  if (o.positions.size() != expected) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": positions has ", o.positions.size(),
                                                   " entries, expected ", expected,
                                                   " (one per sequence with append_tokens = 1)"));
  }
  for (size_t b = 0; b < o.positions.size(); ++b) {
    if (o.positions[b] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(fn, ": positions[", b, "] = ", o.positions[b], " is negative"));
    }
  }
  if (o.append_tokens == 1 && c.page_summaries) {
    return absl::FailedPreconditionError(absl::StrCat(
        fn,
        ": a step reservation cannot keep page summaries (CacheConfig::page_summaries): the "
        "summaries need the step's keys on the host when the rows are reserved"));
  }
  if (o.capturable) {
    if (!backend.Supports(BackendOp::kDeviceTensors)) {
      return absl::InvalidArgumentError(
          absl::StrCat(fn, ": capturable plans need device tensors; the ",
                       std::string(backend.Name()), " backend has none"));
    }
    if (o.max_context <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(fn, ": max_context = ", o.max_context,
                                                     " must be > 0 for a capturable plan"));
    }
  } else if (o.stream != nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(fn, ": stream is set but the plan is not capturable (nothing to upload)"));
  }
  return absl::OkStatus();
}


}  // namespace

absl::StatusOr<DecodePlan> Cache::PrepareDecode(std::span<const SequenceId> batch,
                                                const StepOptions& options) {
  if (absl::Status s = CheckStepOptions("PrepareDecode", config_, *backend_, batch.size(), options);
      !s.ok()) {
    return s;
  }
  absl::StatusOr<DecodePlan> plan =
      PrepareLayers("PrepareDecode", batch, 0, config_.num_layers, /*one_shot=*/false);
  if (!plan.ok() || (options.append_tokens == 0 && !options.capturable)) return plan;
  if (absl::Status s = PrepareStep("PrepareDecode", *plan->state_, options, /*in_place=*/false);
      !s.ok()) {
    return s;
  }
  return plan;
}

absl::Status Cache::PrepareDecode(DecodePlan& plan, std::span<const SequenceId> batch,
                                  const StepOptions& options) {
  constexpr absl::string_view kFn = "PrepareDecode (in place)";
  if (!plan.valid()) {
    return absl::InvalidArgumentError(absl::StrCat(kFn, ": the plan is empty"));
  }
  DecodePlan::State& st = *plan.state_;
  if (st.cache != this) {
    return absl::InvalidArgumentError(absl::StrCat(kFn, ": the plan was made by another Cache"));
  }
  if (absl::Status s = CheckStepOptions(kFn, config_, *backend_, batch.size(), options); !s.ok()) {
    return s;
  }
  if (!std::equal(batch.begin(), batch.end(), st.batch.begin(), st.batch.end())) {
    return absl::InvalidArgumentError(
        absl::StrCat(kFn,
                     ": the batch differs from the plan's (a re-prepared plan keeps its "
                     "batch, in order; make a new plan for another batch)"));
  }
  if (options.capturable != st.capturable ||
      (st.capturable && options.max_context != st.max_context)) {
    return absl::InvalidArgumentError(
        absl::StrCat(kFn, ": capturable = ", options.capturable,
                     ", max_context = ", options.max_context, " but the plan was made with ",
                     st.capturable, ", ", st.max_context, " (recapture with a new plan)"));
  }
  return PrepareStep(kFn, st, options, /*in_place=*/true);
}

absl::Status Cache::PrepareStep(absl::string_view fn, DecodePlan::State& st,
                                const StepOptions& options, bool in_place) {
  const CacheConfig& c = config_;
  const int32_t heads = c.num_kv_heads;
  const int32_t num_layers = st.num_layers;
  const int32_t batch = static_cast<int32_t>(st.batch.size());
  const int32_t streams = st.num_streams();
  const bool reserve = options.append_tokens == 1;
  const SegmentFormat full{c.head_dim, c.head_dim, c.ResolvedPageTokens()};
  PlanLock lock(st);
  for (Cache::Sequence* s : st.lock_order) {
    if (s->freed) {
      return in_place ? absl::FailedPreconditionError(
                            absl::StrCat(fn, ": sequence ", s->id, " was freed; make a new plan"))
                      : absl::NotFoundError(absl::StrCat(fn, ": unknown sequence ", s->id));
    }
  }
  // Validate everything before anything changes.
  for (int32_t b = 0; b < batch && reserve; ++b) {
    Sequence& seq = *st.seqs[b];
    for (int32_t l = 0; l < num_layers; ++l) {
      const int32_t layer = st.first_layer + l;
      if (options.positions[b] <= seq.table.last_position(layer)) {
        return absl::InvalidArgumentError(
            absl::StrCat(fn, ": positions[", b, "] = ", options.positions[b],
                         " must exceed the last position ", "appended to layer ", layer,
                         " of sequence ", st.batch[b], " (", seq.table.last_position(layer), ")"));
      }
      for (int32_t h = 0; h < heads; ++h) {
        if (internal::HasKeyIndex(seq, seq.table.Index(layer, h))) {
          return absl::FailedPreconditionError(absl::StrCat(
              fn, ": stream (sequence ", st.batch[b], ", layer ", layer, ", kv head ", h,
              ") has a retrieval key index, which needs the step's keys on the host; reserve "
              "without retrieval decode, or Append"));
        }
      }
    }
  }
  // What the reservation does per stream (i = l * streams + b * heads + h): extend the tail
  // (a new page when it is full, a copy-on-write copy of a shared, partly filled last page) or
  // open a new full-width segment, as Append of one token does.
  struct StreamWork {
    bool new_segment = false;
    bool cow_tail = false;
    int32_t new_pages = 0;
    int32_t first_new_page = 0;
  };
  std::vector<StreamWork> work(reserve ? static_cast<size_t>(num_layers) * streams : 0);
  int32_t total_pages = 0;
  std::vector<int32_t> segments_needed(num_layers, 0), indices_needed(num_layers, 0);
  std::vector<int32_t> growth(num_layers, 0);  // page ids the streams may still add
  for (int32_t l = 0; l < num_layers; ++l) {
    for (int32_t b = 0; b < batch; ++b) {
      for (int32_t h = 0; h < heads; ++h) {
        const Stream& stream = st.seqs[b]->table.stream(st.first_layer + l, h);
        const Segment* tail = stream.segments.empty() ? nullptr : &stream.segments.back();
        StreamWork w;
        if (reserve) {
          if (tail == nullptr || !tail->full_width(c.head_dim) ||
              tail->tokens_per_page != full.tokens_per_page) {
            w.new_segment = true;
            w.new_pages = 1;
          } else {
            const int32_t free_slots = tail->free_slots();
            w.cow_tail = free_slots > 0 && pool_->RefCount(tail->pages.back()) > 1;
            w.new_pages = (free_slots == 0 ? 1 : 0) + (w.cow_tail ? 1 : 0);
          }
          w.first_new_page = total_pages;
          total_pages += w.new_pages;
          work[static_cast<size_t>(l) * streams + b * heads + h] = w;
        }
        if (!st.capturable && !options.capturable) continue;
        const int32_t length = stream.length() + options.append_tokens;
        if (length > options.max_context) {
          const std::string message = absl::StrCat(
              fn, ": stream (sequence ", st.batch[b], ", layer ", st.first_layer + l, ", kv head ",
              h, ") would hold ", length, " tokens, more than max_context ", options.max_context);
          return in_place ? absl::FailedPreconditionError(
                                absl::StrCat(message, " (recapture with a new plan)"))
                          : absl::InvalidArgumentError(message);
        }
        segments_needed[l] +=
            static_cast<int32_t>(stream.segments.size()) + (w.new_segment ? 1 : 0);
        for (const Segment& s : stream.segments) {
          indices_needed[l] += static_cast<int32_t>(s.pages.size() + s.key_channels.size());
        }
        // A copy-on-write page replaces the last one; only fresh pages add ids.
        indices_needed[l] += w.new_pages - (w.cow_tail ? 1 : 0);
        growth[l] +=
            static_cast<int32_t>(CeilDiv(options.max_context - length, full.tokens_per_page)) + 1;
      }
    }
  }
  if (in_place && st.capturable) {
    for (int32_t l = 0; l < num_layers; ++l) {
      if (segments_needed[l] > st.segment_capacity[l] || indices_needed[l] > st.index_capacity[l]) {
        return absl::FailedPreconditionError(absl::StrCat(
            fn, ": layer ", st.first_layer + l, " needs ", segments_needed[l], " segments and ",
            indices_needed[l], " page ids / key channels; the plan's device buffers hold ",
            st.segment_capacity[l], " and ", st.index_capacity[l],
            " (an Apply reshaped the streams: recapture with a new plan)"));
      }
    }
  }
  std::unique_ptr<StepBuffers> created;
  if (!in_place && options.capturable) {
    // Sized for the whole life of the plan: one more segment per stream than now (an Append
    // after channel pruning opens one), and page ids up to max_context.
    st.segment_capacity.resize(num_layers);
    st.index_capacity.resize(num_layers);
    for (int32_t l = 0; l < num_layers; ++l) {
      st.segment_capacity[l] = segments_needed[l] + streams;
      st.index_capacity[l] = indices_needed[l] + growth[l];
    }
    StepShape shape;
    shape.pool = pool_->view();
    shape.num_layers = num_layers;
    shape.num_streams = streams;
    shape.group_size = c.group_size();
    shape.head_dim = c.head_dim;
    shape.max_context = options.max_context;
    shape.segment_capacity = st.segment_capacity;
    shape.index_capacity = st.index_capacity;
    absl::StatusOr<std::unique_ptr<StepBuffers>> buffers = backend_->CreateStepBuffers(shape);
    if (!buffers.ok()) {
      if (absl::IsUnimplemented(buffers.status())) {
        return absl::InvalidArgumentError(
            absl::StrCat(fn, ": capturable plans: ", buffers.status().message()));
      }
      return buffers.status();
    }
    created = *std::move(buffers);
  }

  // Reserve: every page of every stream in one all-or-nothing allocation.
  if (reserve) {
    PageGuard guard{pool_.get(), std::vector<int32_t>(total_pages)};
    if (absl::Status s = pool_->Allocate(total_pages, guard.pages.data()); !s.ok()) {
      guard.pages.clear();
      return absl::ResourceExhaustedError(absl::StrCat(
          fn, ": reserving the step's rows (", total_pages, " pages for ", batch, " sequences x ",
          num_layers, " layers x ", heads, " kv heads): ", s.message()));
    }
    std::vector<std::vector<int32_t>> pages(work.size());
    std::vector<PageCopy> copies;
    std::vector<int32_t> replaced;
    for (int32_t l = 0; l < num_layers; ++l) {
      for (int32_t b = 0; b < batch; ++b) {
        for (int32_t h = 0; h < heads; ++h) {
          const size_t i = static_cast<size_t>(l) * streams + b * heads + h;
          const StreamWork& w = work[i];
          const Stream& stream = st.seqs[b]->table.stream(st.first_layer + l, h);
          if (!w.new_segment) pages[i] = stream.segments.back().pages;
          int32_t next = w.first_new_page;
          if (w.cow_tail) {
            const int32_t fresh = guard.pages[next++];
            copies.push_back({pages[i].back(), fresh});
            replaced.push_back(pages[i].back());
            pages[i].back() = fresh;
          }
          for (; next < w.first_new_page + w.new_pages; ++next) {
            pages[i].push_back(guard.pages[next]);
          }
        }
      }
    }
    if (!copies.empty()) {
      if (absl::Status s = backend_->CopyPages(pool_->view(), copies); !s.ok()) return s;
    }
    const uint8_t text = static_cast<uint8_t>(Modality::kText);
    for (int32_t b = 0; b < batch; ++b) {
      StreamTable& table = st.seqs[b]->table;
      const int32_t position = options.positions[b];
      for (int32_t l = 0; l < num_layers; ++l) {
        const int32_t layer = st.first_layer + l;
        for (int32_t h = 0; h < heads; ++h) {
          const size_t i = static_cast<size_t>(l) * streams + b * heads + h;
          table.ExtendTail(table.Index(layer, h), work[i].new_segment ? &full : nullptr,
                           std::move(pages[i]), std::span<const int32_t>(&position, 1),
                           std::span<const uint8_t>(&text, 1), nullptr);
        }
        table.AdvancePosition(layer, position);
      }
    }
    guard.committed = true;
    pool_->Release(replaced);
  }

  // The plan now describes the streams as they are (reserved rows included).
  internal::RecordPlanViews(st);
  st.reserved = reserve;
  st.step_positions.assign(options.positions.begin(), options.positions.end());
  st.appended.assign(num_layers, 0);
  st.step_writes.resize(streams);
  if (created != nullptr) {
    st.step = std::move(created);
    st.capturable = true;
    st.max_context = options.max_context;
  }
  if (!st.capturable) return absl::OkStatus();

  // Upload every layer's views and AppendStep's targets into the plan's device buffers.
  st.lengths.resize(static_cast<size_t>(num_layers) * streams);
  std::vector<int32_t> offsets(static_cast<size_t>(num_layers) * (streams + 1));
  std::vector<RowWrite> writes(reserve ? static_cast<size_t>(num_layers) * streams : 0);
  std::vector<StepLayer> layers(num_layers);
  for (int32_t l = 0; l < num_layers; ++l) {
    SegmentView* views = st.views.data() + st.view_begin[l];
    const int32_t capacity = st.view_begin[l + 1] - st.view_begin[l];
    int32_t* layer_offsets = offsets.data() + static_cast<size_t>(l) * (streams + 1);
    int32_t at = 0;
    layer_offsets[0] = 0;
    for (int32_t b = 0; b < batch; ++b) {
      StreamTable& table = st.seqs[b]->table;
      for (int32_t h = 0; h < heads; ++h) {
        const int32_t i = b * heads + h;
        const int32_t index = table.Index(st.first_layer + l, h);
        at += table.WriteViews(index, views + at, capacity - at);  // sized by RecordPlanViews
        layer_offsets[i + 1] = at;
        st.lengths[static_cast<size_t>(l) * streams + i] = table.stream(index).length();
        if (reserve) {
          RowWrite& w = writes[static_cast<size_t>(l) * streams + i];
          w.dst = views[at - 1];
          w.first_row = views[at - 1].length - 1;
          w.num_tokens = 1;
          w.head_dim = c.head_dim;
        }
      }
    }
    StepLayer& layer = layers[l];
    layer.kv.pool = pool_->view();
    layer.kv.head_dim = c.head_dim;
    layer.kv.num_streams = streams;
    layer.kv.stream_segment_offsets = layer_offsets;
    layer.kv.segments = views;
    layer.kv.stream_versions = st.versions.data() + static_cast<size_t>(l) * streams;
    if (reserve) {
      layer.writes =
          std::span<const RowWrite>(writes).subspan(static_cast<size_t>(l) * streams, streams);
    }
  }
  // A failure here (a device error; the capacities were checked above) leaves the reservation
  // committed: the rows are reserved but the plan's device buffers are stale.
  return backend_->UploadStep(*st.step, layers, options.stream);
}

absl::Status Cache::AppendStep(DecodePlan& plan, int32_t layer, TensorRef keys, TensorRef values,
                               void* stream) {
  if (!plan.valid()) {
    return absl::InvalidArgumentError(
        "AppendStep: the plan is empty (default-constructed or moved from)");
  }
  DecodePlan::State& st = *plan.state_;
  if (st.cache != this) {
    return absl::InvalidArgumentError("AppendStep: the plan was made by another Cache");
  }
  if (!st.reserved) {
    return absl::FailedPreconditionError(
        "AppendStep: the plan reserved no step rows (PrepareDecode with append_tokens = 1)");
  }
  if (layer < st.first_layer || layer >= st.first_layer + st.num_layers) {
    return absl::OutOfRangeError(absl::StrCat("AppendStep: layer ", layer,
                                              " is outside the plan's layers [", st.first_layer,
                                              ", ", st.first_layer + st.num_layers, ")"));
  }
  const CacheConfig& c = config_;
  const int32_t heads = c.num_kv_heads, d = c.head_dim;
  const int32_t streams = st.num_streams();
  const int64_t expected = int64_t{streams} * d;
  for (const auto& [name, t] : {std::pair<const char*, const TensorRef&>{"keys", keys},
                                std::pair<const char*, const TensorRef&>{"values", values}}) {
    if (t.dtype != DType::kF32 && t.dtype != DType::kF16 && t.dtype != DType::kBF16) {
      return absl::InvalidArgumentError(absl::StrCat("AppendStep: ", name, " has dtype ",
                                                     static_cast<int>(t.dtype),
                                                     "; f32, f16 and bf16 are supported"));
    }
    if (t.num_elements != expected) {
      return absl::InvalidArgumentError(absl::StrCat("AppendStep: ", name, " has ", t.num_elements,
                                                     " elements, expected ", expected,
                                                     " (batch * num_kv_heads * head_dim)"));
    }
    if (t.data == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("AppendStep: ", name, " is null"));
    }
    if (t.space != MemorySpace::kHost && t.space != MemorySpace::kDevice) {
      return absl::InvalidArgumentError(
          absl::StrCat("AppendStep: ", name, " has memory space ", static_cast<int>(t.space)));
    }
  }
  if (keys.dtype != values.dtype || keys.space != values.space) {
    return absl::InvalidArgumentError(
        absl::StrCat("AppendStep: keys are ", DTypeName(keys.dtype), " in ",
                     MemorySpaceName(keys.space), " memory but values are ",
                     DTypeName(values.dtype), " in ", MemorySpaceName(values.space), " memory"));
  }
  const bool device = keys.space == MemorySpace::kDevice;
  if (device && !backend_->Supports(BackendOp::kDeviceTensors)) {
    return absl::InvalidArgumentError(
        absl::StrCat("AppendStep: keys and values are device tensors but the ",
                     std::string(backend_->Name()), " backend has no device tensors"));
  }
  if (st.capturable && !device) {
    return absl::InvalidArgumentError(
        "AppendStep: a capturable plan takes device keys / values (host rows need a staging "
        "copy, which a graph cannot replay)");
  }
  if (!st.capturable && stream != nullptr) {
    return absl::InvalidArgumentError(
        "AppendStep: stream is set but the plan is not capturable (the write is synchronous)");
  }
  const int32_t slot = layer - st.first_layer;
  if (st.appended[slot] != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "AppendStep: layer ", layer, " was already written this step (once per layer per step)"));
  }
  PlanLock lock(st);
  const int esize = DTypeSize(keys.dtype);
  SegmentView* views = st.views.data() + st.view_begin[slot];
  const int32_t capacity = st.view_begin[slot + 1] - st.view_begin[slot];
  int32_t at = 0;
  for (int32_t b = 0; b < static_cast<int32_t>(st.batch.size()); ++b) {
    if (st.seqs[b]->freed) {
      return absl::FailedPreconditionError(
          absl::StrCat("AppendStep: sequence ", st.batch[b], " was freed after PrepareDecode"));
    }
    StreamTable& table = st.seqs[b]->table;
    for (int32_t h = 0; h < heads; ++h) {
      const int32_t i = b * heads + h;
      const int32_t index = table.Index(layer, h);
      const Stream& s = table.stream(index);
      const size_t planned = static_cast<size_t>(slot) * streams + i;
      if (s.version != st.versions[planned] || s.last_position() != st.step_positions[b] ||
          (st.capturable && s.length() != st.lengths[planned])) {
        return absl::FailedPreconditionError(absl::StrCat(
            "AppendStep: stream (sequence ", st.batch[b], ", layer ", layer, ", kv head ", h,
            ") changed after PrepareDecode (Apply, or an Append after the reserved row); "
            "prepare again"));
      }
      if (st.capturable) continue;
      const int32_t written = table.WriteViews(index, views + at, capacity - at);
      if (written <= 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "AppendStep: stream (sequence ", st.batch[b], ", layer ", layer, ", kv head ", h,
            ") has more segments than the plan has room for; prepare again"));
      }
      at += written;
      const SegmentView& tail = views[at - 1];
      RowWrite& w = st.step_writes[i];
      w.dst = tail;
      w.first_row = tail.length - 1;
      w.num_tokens = 1;
      w.head_dim = d;
      const int64_t offset = int64_t{i} * d * esize;
      w.keys = static_cast<const uint8_t*>(keys.data) + offset;
      w.values = static_cast<const uint8_t*>(values.data) + offset;
      w.src_dtype = keys.dtype;
      w.src_stride = int64_t{heads} * d;
      w.src_space = keys.space;
    }
  }
  absl::Status status = st.capturable ? backend_->StepWriteRows(*st.step, slot, keys.data,
                                                                values.data, keys.dtype, stream)
                                      : backend_->WriteRows(pool_->view(), st.step_writes);
  if (status.ok()) st.appended[slot] = 1;
  return status;
}

}  // namespace kvcache
