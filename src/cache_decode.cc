// Cache: decode attention. PrepareDecode does the batch-wide host work of a step once; the
// per-layer DecodeAttention(plan, ...) locks, refreshes one layer's views into the plan's
// buffers and runs the kernel without allocating (decode_plan.h). The batch overload of
// DecodeAttention is a one-layer plan made and run inside the call.
#include <algorithm>
#include <cmath>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
// The branch-free, vectorisable row conversions (exactly dtype.h's results): f16 / bf16 host q
// and out are converted here once per call, ~64k elements at batch 8 x 32 heads x 128 dims.
#include "cpu/convert.h"
#include "kvcache/cache.h"
#include "src/cache_internal.h"

namespace kvcache {

namespace {

absl::Status CheckReadPolicy(const ReadPolicy& rp) {
  const int kind = static_cast<int>(rp.kind);
  if (kind < 0 || kind > static_cast<int>(ReadPolicy::Kind::kRetrieval)) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeAttention: read_policy.kind ", kind,
                     " is not dense (0), quest (1) or retrieval (2)"));
  }
  if (rp.dense_first_layers < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeAttention: read_policy.dense_first_layers = ", rp.dense_first_layers,
                     " is negative"));
  }
  if (rp.kind == ReadPolicy::Kind::kQuest && rp.token_budget <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DecodeAttention: read_policy.token_budget = ", rp.token_budget, " must be > 0 for Quest"));
  }
  if (rp.kind == ReadPolicy::Kind::kRetrieval) {
    if (rp.top_k <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DecodeAttention: read_policy.top_k = ", rp.top_k, " must be > 0 for retrieval"));
    }
    if (rp.sink_tokens < 0 || rp.recent_tokens < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("DecodeAttention: read_policy.sink_tokens = ", rp.sink_tokens,
                       " and recent_tokens = ", rp.recent_tokens, " must be >= 0"));
    }
    if (rp.ef_search < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("DecodeAttention: read_policy.ef_search = ", rp.ef_search, " is negative"));
    }
    if (rp.index_m < 2 || rp.index_m > 256) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DecodeAttention: read_policy.index_m = ", rp.index_m, " is outside [2, 256]"));
    }
    if (rp.index_ef_construction < 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          "DecodeAttention: read_policy.index_ef_construction = ", rp.index_ef_construction,
          " must be >= 1"));
    }
  }
  return absl::OkStatus();
}

bool ValidDType(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }
bool ValidSpace(MemorySpace s) { return s == MemorySpace::kHost || s == MemorySpace::kDevice; }

// One tensor of a decode call: `expected` elements (lse: 0 = not requested is allowed), a known
// dtype (f32 only when `f32_only`) and memory space, a pointer when it has elements.
absl::Status CheckDecodeTensor(const char* name, const void* data, DType dtype, int64_t n,
                               MemorySpace space, int64_t expected, bool f32_only,
                               const char* shape) {
  if (n != expected) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DecodeAttention: ", name, " has ", n, " elements, expected ", expected, " (", shape, ")"));
  }
  if (!ValidDType(dtype) || (f32_only && dtype != DType::kF32)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "DecodeAttention: ", name, " has dtype ", static_cast<int>(dtype), " (", DTypeName(dtype),
        "); ", f32_only ? "f32 is" : "f32, f16 and bf16 are", " supported"));
  }
  if (!ValidSpace(space)) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeAttention: ", name, " has memory space ", static_cast<int>(space)));
  }
  if (n > 0 && data == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeAttention: ", name, " has ", n, " elements and a null pointer"));
  }
  return absl::OkStatus();
}

// The checks of a decode call that need no sequence: layer, tensor sizes / dtypes / memory
// spaces, options, and whether the backend implements the reads asked for (before anything is
// locked).
absl::Status CheckDecodeArgs(const CacheConfig& c, const Backend& backend, int64_t b, int32_t layer,
                             const TensorRef& q, const MutableTensorRef& out,
                             const MutableTensorRef& lse, const DecodeOptions& options) {
  if (layer < 0 || layer >= c.num_layers) {
    return absl::OutOfRangeError(
        absl::StrCat("DecodeAttention: layer ", layer, " is out of range [0, ", c.num_layers, ")"));
  }
  const int64_t per_seq = int64_t{c.num_q_heads} * c.head_dim;
  if (absl::Status s = CheckDecodeTensor("q", q.data, q.dtype, q.num_elements, q.space, b * per_seq,
                                         false, "batch * num_q_heads * head_dim");
      !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckDecodeTensor("out", out.data, out.dtype, out.num_elements, out.space,
                                         b * per_seq, false, "batch * num_q_heads * head_dim");
      !s.ok()) {
    return s;
  }
  const bool with_lse = lse.num_elements != 0;
  if (with_lse) {
    if (absl::Status s =
            CheckDecodeTensor("lse", lse.data, lse.dtype, lse.num_elements, lse.space,
                              b * c.num_q_heads, true, "batch * num_q_heads, or 0 elements");
        !s.ok()) {
      return s;
    }
  }
  const bool device = q.space == MemorySpace::kDevice;
  if (out.space != q.space || (with_lse && lse.space != q.space)) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeAttention: q is in ", MemorySpaceName(q.space), " memory but ",
                     out.space != q.space ? "out" : "lse", " is in ",
                     MemorySpaceName(out.space != q.space ? out.space : lse.space),
                     " memory; the tensors of one call share one memory space"));
  }
  const bool device_tensors = backend.Supports(BackendOp::kDeviceTensors);
  if (device && !device_tensors) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeAttention: q, out and lse are device tensors but the ",
                     std::string(backend.Name()), " backend has no device tensors"));
  }
  if (options.stream != nullptr && !device_tensors) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeAttention: options.stream is set but the ", std::string(backend.Name()),
                     " backend has no streams (no device tensors)"));
  }
  if (options.stream != nullptr && !device) {
    return absl::InvalidArgumentError(
        "DecodeAttention: options.stream is set but q, out and lse are host tensors (host-tensor "
        "calls are synchronous; a stream orders device-tensor calls)");
  }
  if (!(options.scale >= 0.0f) || !std::isfinite(options.scale)) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeAttention: scale ", options.scale,
                     " must be finite and >= 0 (0 = 1/sqrt(head_dim))"));
  }
  const ReadPolicy& rp = options.read_policy;
  if (rp.kind != ReadPolicy::Kind::kDense) {
    if (absl::Status s = CheckReadPolicy(rp); !s.ok()) return s;
  }
  const bool sparse = rp.kind != ReadPolicy::Kind::kDense && layer >= rp.dense_first_layers;
  if (sparse && device) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodeAttention: read_policy ", static_cast<int>(rp.kind),
                     " (sparse) with device tensors; sparse reads take host tensors"));
  }
  if (sparse && rp.kind == ReadPolicy::Kind::kQuest && !c.page_summaries) {
    return absl::FailedPreconditionError(
        "DecodeAttention: the Quest read policy needs CacheConfig::page_summaries = true");
  }
  if (!sparse && !backend.Supports(BackendOp::kDecodeAttention)) {
    return absl::UnimplementedError(
        absl::StrCat(std::string(backend.Name()), " backend has no DecodeAttention"));
  }
  if (sparse && !backend.Supports(BackendOp::kSparseDecodeAttention)) {
    return absl::UnimplementedError(
        absl::StrCat(std::string(backend.Name()),
                     " backend has no sparse decode (Quest / retrieval read policies)"));
  }
  if (sparse && rp.kind == ReadPolicy::Kind::kRetrieval && !rp.exact_search &&
      !backend.Supports(BackendOp::kKeyIndex)) {
    return absl::UnimplementedError(
        absl::StrCat(std::string(backend.Name()), " backend has no key index"));
  }
  return absl::OkStatus();
}

// The backend's view of a device-tensor decode's tensors.
DecodeIO DeviceIO(const TensorRef& q, const MutableTensorRef& out, float* lse, void* stream) {
  DecodeIO io;
  io.q = q.data;
  io.q_dtype = q.dtype;
  io.out = out.data;
  io.out_dtype = out.dtype;
  io.lse = lse;
  io.stream = stream;
  return io;
}

}  // namespace

// ---- DecodePlan -------------------------------------------------------------------------------

DecodePlan::DecodePlan() = default;
DecodePlan::~DecodePlan() = default;
DecodePlan::DecodePlan(DecodePlan&& other) noexcept = default;
DecodePlan& DecodePlan::operator=(DecodePlan&& other) noexcept = default;

std::span<const SequenceId> DecodePlan::batch() const {
  return state_ == nullptr ? std::span<const SequenceId>() : std::span(state_->batch);
}
int32_t DecodePlan::first_layer() const { return state_ == nullptr ? 0 : state_->first_layer; }
int32_t DecodePlan::num_layers() const { return state_ == nullptr ? 0 : state_->num_layers; }

bool DecodePlan::reserved() const { return state_ != nullptr && state_->reserved; }
bool DecodePlan::capturable() const { return state_ != nullptr && state_->capturable; }

// ---- Plan -------------------------------------------------------------------------------------

void internal::RecordPlanViews(DecodePlan::State& st) {
  // Every layer's view slots: the segments each stream has now, plus one spare per stream for
  // a segment an Append may open before the layer is decoded.
  const int32_t heads = st.num_kv_heads;
  const int32_t streams = st.num_streams();
  st.versions.resize(static_cast<size_t>(st.num_layers) * streams);
  st.view_begin.assign(st.num_layers + 1, 0);
  for (int32_t l = 0; l < st.num_layers; ++l) {
    int32_t slots = 0;
    for (int32_t b = 0; b < static_cast<int32_t>(st.batch.size()); ++b) {
      for (int32_t h = 0; h < heads; ++h) {
        const internal::Stream& stream = st.seqs[b]->table.stream(st.first_layer + l, h);
        st.versions[static_cast<size_t>(l) * streams + b * heads + h] = stream.version;
        slots += static_cast<int32_t>(stream.segments.size()) + 1;
      }
    }
    st.view_begin[l + 1] = st.view_begin[l] + slots;
  }
  st.views.resize(st.view_begin[st.num_layers]);
}

absl::StatusOr<DecodePlan> Cache::PrepareDecode(std::span<const SequenceId> batch) {
  return PrepareLayers("PrepareDecode", batch, 0, config_.num_layers, /*one_shot=*/false);
}

absl::StatusOr<DecodePlan> Cache::PrepareLayers(absl::string_view fn,
                                                std::span<const SequenceId> batch,
                                                int32_t first_layer, int32_t num_layers,
                                                bool one_shot) {
  if (batch.empty()) return absl::InvalidArgumentError(absl::StrCat(fn, ": empty batch"));
  auto st = std::make_unique<DecodePlan::State>();
  st->cache = this;
  st->batch.assign(batch.begin(), batch.end());
  st->first_layer = first_layer;
  st->num_layers = num_layers;
  st->num_kv_heads = config_.num_kv_heads;
  st->seqs.reserve(batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    absl::StatusOr<std::shared_ptr<Sequence>> s = Find(batch[i]);
    if (!s.ok()) {
      return absl::NotFoundError(absl::StrCat(fn, ": batch[", i, "]: ", s.status().message()));
    }
    st->seqs.push_back(*std::move(s));
  }
  // Lock in ascending id order (deadlock-free against other batches); reject duplicates.
  for (auto& s : st->seqs) st->lock_order.push_back(s.get());
  std::sort(st->lock_order.begin(), st->lock_order.end(),
            [](Sequence* a, Sequence* b) { return a->id < b->id; });
  for (size_t i = 1; i < st->lock_order.size(); ++i) {
    if (st->lock_order[i]->id == st->lock_order[i - 1]->id) {
      return absl::InvalidArgumentError(
          absl::StrCat(fn, ": sequence ", st->lock_order[i]->id, " appears twice in the batch"));
    }
  }
  const int32_t streams = st->num_streams();
  st->offsets.resize(static_cast<size_t>(streams) + 1);
  st->key_indexes.resize(streams);
  if (one_shot) {  // RunDecode sizes the views under the locks it takes anyway
    DecodePlan plan;
    plan.state_ = std::move(st);
    return plan;
  }
  absl::Status status = absl::OkStatus();
  internal::PlanLock lock(*st);
  for (Sequence* s : st->lock_order) {
    if (s->freed && status.ok()) {
      status = absl::NotFoundError(absl::StrCat(fn, ": unknown sequence ", s->id));
    }
  }
  if (status.ok()) internal::RecordPlanViews(*st);
  lock.Unlock();
  if (!status.ok()) return status;
  if (!one_shot) {
    // f16 / bf16 host q and out convert through this scratch, sized here so that a per-layer call
    // allocates nothing. A one-shot call allocates it in RunDecode, and only for those dtypes.
    const size_t elements = batch.size() * static_cast<size_t>(config_.num_q_heads) *
                            static_cast<size_t>(config_.head_dim);
    st->q_f32 = std::make_unique_for_overwrite<float[]>(elements);
    st->out_f32 = std::make_unique_for_overwrite<float[]>(elements);
  }
  DecodePlan plan;
  plan.state_ = std::move(st);
  return plan;
}

// ---- Run --------------------------------------------------------------------------------------

namespace {

MutableTensorRef OptionalOf(std::span<float> s) {
  return s.empty() ? MutableTensorRef{} : MutableTensorRef::Of(s);
}

}  // namespace

absl::Status Cache::DecodeAttention(DecodePlan& plan, int32_t layer, std::span<const float> q,
                                    std::span<float> out, std::span<float> lse,
                                    const DecodeOptions& options) {
  return DecodeAttention(plan, layer, TensorRef::Of(q), MutableTensorRef::Of(out), OptionalOf(lse),
                         options);
}

absl::Status Cache::DecodeAttention(std::span<const SequenceId> batch, int32_t layer,
                                    std::span<const float> q, std::span<float> out,
                                    std::span<float> lse, const DecodeOptions& options) {
  return DecodeAttention(batch, layer, TensorRef::Of(q), MutableTensorRef::Of(out), OptionalOf(lse),
                         options);
}

absl::Status Cache::DecodeAttention(DecodePlan& plan, int32_t layer, TensorRef q,
                                    MutableTensorRef out, MutableTensorRef lse,
                                    const DecodeOptions& options) {
  if (!plan.valid()) {
    return absl::InvalidArgumentError(
        "DecodeAttention: the plan is empty (default-constructed or moved from)");
  }
  DecodePlan::State& st = *plan.state_;
  if (st.cache != this) {
    return absl::InvalidArgumentError("DecodeAttention: the plan was made by another Cache");
  }
  if (absl::Status s = CheckDecodeArgs(config_, *backend_, static_cast<int64_t>(st.batch.size()),
                                       layer, q, out, lse, options);
      !s.ok()) {
    return s;
  }
  if (layer < st.first_layer || layer >= st.first_layer + st.num_layers) {
    return absl::OutOfRangeError(absl::StrCat("DecodeAttention: layer ", layer,
                                              " is outside the plan's layers [", st.first_layer,
                                              ", ", st.first_layer + st.num_layers, ")"));
  }
  if (st.reserved && st.appended[layer - st.first_layer] == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("DecodeAttention: layer ", layer,
                     " has a reserved step row AppendStep has not written "
                     "yet (call AppendStep for the layer first)"));
  }
  if (st.capturable) {
    if (q.space != MemorySpace::kDevice) {
      return absl::InvalidArgumentError(
          "DecodeAttention: a capturable plan takes device q / out / lse (host tensors need "
          "staging copies, which a graph cannot replay)");
    }
    if (options.read_policy.kind != ReadPolicy::Kind::kDense || options.accumulate_scores) {
      return absl::InvalidArgumentError(
          "DecodeAttention: a capturable plan runs dense reads without score accumulation "
          "(sparse reads and score accumulators are host work)");
    }
  }
  return RunDecode(st, layer, q, out, lse, options, /*one_shot=*/false);
}

absl::Status Cache::DecodeAttention(std::span<const SequenceId> batch, int32_t layer, TensorRef q,
                                    MutableTensorRef out, MutableTensorRef lse,
                                    const DecodeOptions& options) {
  if (batch.empty()) return absl::InvalidArgumentError("DecodeAttention: empty batch");
  if (absl::Status s = CheckDecodeArgs(config_, *backend_, static_cast<int64_t>(batch.size()),
                                       layer, q, out, lse, options);
      !s.ok()) {
    return s;
  }
  absl::StatusOr<DecodePlan> plan =
      PrepareLayers("DecodeAttention", batch, layer, 1, /*one_shot=*/true);
  if (!plan.ok()) return plan.status();
  return RunDecode(*plan->state_, layer, q, out, lse, options, /*one_shot=*/true);
}

absl::Status Cache::Synchronize(void* stream) {
  if (stream != nullptr && !backend_->Supports(BackendOp::kDeviceTensors)) {
    return absl::InvalidArgumentError(absl::StrCat("Synchronize: a stream was given but the ",
                                                   std::string(backend_->Name()),
                                                   " backend has no streams (no device tensors)"));
  }
  return backend_->Synchronize(stream);
}

absl::Status Cache::RunDecode(DecodePlan::State& st, int32_t layer, const TensorRef& q,
                              const MutableTensorRef& out, const MutableTensorRef& lse,
                              const DecodeOptions& options, bool one_shot) {
  const bool device = q.space == MemorySpace::kDevice;
  const int64_t elements =
      static_cast<int64_t>(st.batch.size()) * config_.num_q_heads * config_.head_dim;
  // Host tensors: the kernels take f32, so f16 / bf16 q is widened into the plan's scratch
  // (exact) and the f32 result is rounded into an f16 / bf16 out after the kernel.
  const float* q_f32 = nullptr;
  float* out_f32 = nullptr;
  if (!device) {
    if (q.dtype == DType::kF32) {
      q_f32 = static_cast<const float*>(q.data);
    } else {
      if (st.q_f32 == nullptr) st.q_f32 = std::make_unique_for_overwrite<float[]>(elements);
      cpu::DispatchDType(q.dtype, [&](auto t) {
        cpu::LoadRow<decltype(t)::value>(q.data, elements, st.q_f32.get());
      });
      q_f32 = st.q_f32.get();
    }
    if (out.dtype == DType::kF32) {
      out_f32 = static_cast<float*>(out.data);
    } else {
      if (st.out_f32 == nullptr) st.out_f32 = std::make_unique_for_overwrite<float[]>(elements);
      out_f32 = st.out_f32.get();
    }
  }
  float* lse_out = lse.num_elements == 0 ? nullptr : static_cast<float*>(lse.data);

  const int32_t heads = st.num_kv_heads;
  const int32_t streams = st.num_streams();
  const int32_t slot = layer - st.first_layer;
  const ReadPolicy& rp = options.read_policy;
  const bool sparse = rp.kind != ReadPolicy::Kind::kDense && layer >= rp.dense_first_layers;

  internal::PlanLock lock(st);
  absl::Status status = absl::OkStatus();
  for (Sequence* s : st.lock_order) {
    if (s->freed && status.ok()) {
      status = one_shot
                   ? absl::NotFoundError(absl::StrCat("DecodeAttention: unknown sequence ", s->id))
                   : absl::FailedPreconditionError(
                         absl::StrCat("DecodeAttention: sequence ", s->id,
                                      " was freed after PrepareDecode; prepare again"));
    }
  }
  if (st.capturable && status.ok()) {
    // The device views were uploaded at PrepareDecode: the streams must be exactly as then.
    for (int32_t b = 0; b < static_cast<int32_t>(st.batch.size()) && status.ok(); ++b) {
      const internal::StreamTable& table = st.seqs[b]->table;
      for (int32_t h = 0; h < heads; ++h) {
        const size_t i = static_cast<size_t>(slot) * streams + b * heads + h;
        const internal::Stream& stream = table.stream(layer, h);
        if (stream.version != st.versions[i] || stream.length() != st.lengths[i]) {
          status = absl::FailedPreconditionError(absl::StrCat(
              "DecodeAttention: stream (sequence ", st.batch[b], ", layer ", layer, ", kv head ", h,
              ") changed after PrepareDecode of a capturable plan (it decodes only what was "
              "prepared); prepare again"));
          break;
        }
      }
    }
    if (status.ok()) {
      DecodeParams params;
      params.group_size = config_.group_size();
      params.scale = options.scale;
      status = backend_->StepDecode(*st.step, slot, params,
                                    DeviceIO(q, out, lse_out, options.stream));
    }
    return status;
  }
  if (one_shot && status.ok()) {  // a plan made for this call only: views sized to the streams
    int32_t slots = 0;
    for (const auto& seq : st.seqs) {
      for (int32_t h = 0; h < heads; ++h) {
        slots += static_cast<int32_t>(seq->table.stream(layer, h).segments.size());
      }
    }
    st.views.resize(slots);
    st.view_begin = {0, slots};
    st.versions.resize(static_cast<size_t>(streams));
  }
  SegmentView* views = st.views.data() + (one_shot ? 0 : st.view_begin[slot]);
  const int32_t capacity = one_shot ? static_cast<int32_t>(st.views.size())
                                    : st.view_begin[slot + 1] - st.view_begin[slot];
  // Planned calls check the versions PrepareDecode recorded; a one-shot call records them here.
  // Either way they go to the backend with the view (PagedKVView::stream_versions).
  const uint64_t* versions =
      one_shot ? nullptr : st.versions.data() + static_cast<size_t>(slot) * streams;
  // Refresh the layer's views from the live streams: Append may have grown a tail (or opened a
  // segment) since PrepareDecode; Apply changes a version and is refused.
  int32_t at = 0;
  st.offsets[0] = 0;
  for (int32_t b = 0; b < static_cast<int32_t>(st.batch.size()) && status.ok(); ++b) {
    internal::StreamTable& table = st.seqs[b]->table;
    for (int32_t h = 0; h < heads && status.ok(); ++h) {
      const int32_t i = b * heads + h;
      const int32_t index = table.Index(layer, h);
      if (versions != nullptr && table.stream(index).version != versions[i]) {
        status = absl::FailedPreconditionError(absl::StrCat(
            "DecodeAttention: stream (sequence ", st.batch[b], ", layer ", layer, ", kv head ", h,
            ") was rebuilt by Apply after PrepareDecode; prepare again"));
        break;
      }
      if (one_shot) st.versions[i] = table.stream(index).version;
      const int32_t written = table.WriteViews(index, views + at, capacity - at);
      if (written < 0) {
        status = absl::FailedPreconditionError(absl::StrCat(
            "DecodeAttention: stream (sequence ", st.batch[b], ", layer ", layer, ", kv head ", h,
            ") has ", table.stream(index).segments.size(),
            " segments, more than the plan has room for (appends opened more than one segment "
            "since PrepareDecode); prepare again"));
        break;
      }
      at += written;
      st.offsets[i + 1] = at;
    }
  }
  if (status.ok()) {
    PagedKVView kv;
    kv.pool = pool_->view();
    kv.head_dim = config_.head_dim;
    kv.num_streams = streams;
    kv.stream_segment_offsets = st.offsets.data();
    kv.segments = views;
    kv.stream_versions =
        one_shot ? st.versions.data() : st.versions.data() + static_cast<size_t>(slot) * streams;
    DecodeParams params;
    params.group_size = config_.group_size();
    params.scale = options.scale;
    params.accumulate_scores = options.accumulate_scores;
    params.aggregation = options.aggregation;
    if (device) {  // dense (CheckDecodeArgs): asynchronous on options.stream
      status = backend_->DeviceDecodeAttention(kv, params,
                                               DeviceIO(q, out, lse_out, options.stream));
    } else if (!sparse) {
      status = backend_->DecodeAttention(kv, params, q_f32, out_f32, lse_out);
    } else {
      params.read_policy = rp;
      if (rp.kind == ReadPolicy::Kind::kRetrieval && !rp.exact_search) {
        // Index (re)builds allocate: retrieval decode is outside the no-allocation guarantee.
        for (int32_t b = 0; b < static_cast<int32_t>(st.batch.size()) && status.ok(); ++b) {
          for (int32_t h = 0; h < heads && status.ok(); ++h) {
            absl::StatusOr<const KeyIndex*> index = EnsureKeyIndex(*st.seqs[b], layer, h, rp);
            if (!index.ok()) {
              status = index.status();
            } else {
              st.key_indexes[b * heads + h] = *index;
            }
          }
        }
        params.key_indexes = st.key_indexes.data();
      }
      if (status.ok()) {
        status = backend_->SparseDecodeAttention(kv, params, q_f32, out_f32, lse_out);
      }
    }
  }
  lock.Unlock();
  if (status.ok() && !device && out.dtype != DType::kF32) {
    cpu::DispatchDType(out.dtype, [&](auto t) {
      cpu::StoreRow<decltype(t)::value>(out_f32, elements, out.data);
    });
  }
  return status;
}

}  // namespace kvcache
