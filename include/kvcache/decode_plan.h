// kvcache/decode_plan.h — DecodePlan: the host half of a decode step, made once, run per layer.
//
// An engine decodes one token per sequence per step and calls attention once per layer. The
// batch-wide host work (finding the sequences, checking the batch, choosing the lock order,
// sizing the kernel views of every layer) does not change between the layers of a step, so
// Cache::PrepareDecode does it once and returns a DecodePlan; Cache::DecodeAttention(plan,
// layer, ...) then only locks, refreshes the layer's views into the plan's buffers and runs the
// kernel: no heap allocation on the "cpu" backend (dense reads), tested with a counting operator
// new (tests/test_decode_plan.cc). That includes f16 / bf16 host q and out: the plan owns f32
// scratch for them ([batch, num_q_heads, head_dim] each, allocated at PrepareDecode and never
// touched by f32 callers). Device tensors (types.h, on the CUDA backend) need no scratch.
//
// What a plan sees when the cache changes after PrepareDecode:
//   Append (to any layer, before or after its decode): seen. Appends only extend a stream's tail,
//     and each per-layer call reads the stream lengths at call time, so the engine's order
//     "append token t's K/V for layer l, then decode layer l" works with one plan per step.
//     One new segment per stream (an Append after channel pruning opens one) fits in the plan's
//     spare capacity; a second answers FailedPrecondition.
//   Apply (a stream's segments replaced, its version changes), Free of a sequence of the batch:
//     the per-layer call answers FailedPrecondition ("prepare again"); nothing is decoded.
//   Fork: the parent keeps its versions, so its plans stay valid; the child is not in them.
// A plan belongs to the Cache that made it, holds its sequences alive (not their pages: a freed
// sequence's pages are back in the pool), and must not be used by two threads at once.
//
// Example (one decode step of an engine):
//   absl::StatusOr<kvcache::DecodePlan> plan = cache->PrepareDecode(batch);
//   for (int32_t layer = 0; layer < num_layers; ++layer) {
//     // ... append this step's K/V for `layer`, compute q ...
//     absl::Status s = cache->DecodeAttention(*plan, layer, q, out);
//   }
//
// Step reservation (StepOptions::append_tokens = 1, every backend). PrepareDecode also does the
// host half of Append for the step's one token per sequence, for every layer and kv head at once:
// pages (one all-or-nothing allocation: ResourceExhausted reserves nothing), copy-on-write of
// shared tails, and the token's metadata (position = positions[b], text modality, score 0) is
// committed. The reserved rows' K/V are UNDEFINED until Cache::AppendStep(plan, layer, keys,
// values) writes them ([batch, num_kv_heads, head_dim], one write launch per layer): anything
// that reads a reserved row before (ReadStream, another decode, a policy) sees garbage. Call
// AppendStep exactly once per layer per step, before that layer's decode (a second call, or a
// decode of a layer whose AppendStep has not run, answers FailedPrecondition). Refused, the
// cache unchanged: page summaries (FailedPrecondition: they need the keys on the host), streams
// with a retrieval key index (same), positions not after every layer's last; there are no
// admission masks (a reserved token is admitted everywhere).
//
// Capturable plans (StepOptions::capturable, CUDA backend; InvalidArgument elsewhere before
// anything changes). The plan owns device memory at fixed addresses for everything its
// per-layer calls read (views, page ids, offsets, AppendStep's write jobs, q / out / lse
// scratch, the split-K workspace sized from max_context), filled at PrepareDecode on
// StepOptions::stream. Its per-layer calls (AppendStep with device K/V, DecodeAttention with
// device q / out / lse, dense, no score accumulation) only enqueue kernels on that memory and
// the caller's pointers: no upload, no allocation, no synchronisation, so they can be captured
// in a CUDA graph. Cache::PrepareDecode(plan, batch, options) re-prepares the plan in place for
// the next step (reserves its rows, rewrites the same device addresses), after which the graph
// replays that step; when the step no longer fits (a stream past max_context, more segments or
// page ids than sized) it answers FailedPrecondition: recapture with a new plan.
// The engine's contract: a replay does not call the Cache, so its locks and checks do not run;
// between a prepare and the replay of its step there must be no Apply, Free, Append or Fork of
// the batch's sequences, and the graph must run on StepOptions::stream (or the prepare is given
// no stream and waits for the whole device before it uploads). The per-layer calls themselves
// (at capture) still lock and check as usual. The capturable calls record no event, so the
// backend's other operations (Append without a stream, Apply, Free, a host read, which run on
// its own stream) are not ordered after a launched graph or a per-layer call: call
// Cache::Synchronize(stream) before them. docs/ARCHITECTURE.md, "Capturable decode steps".
//
// Example (an engine step with a graph; d_k / d_v / d_q / d_out fixed device buffers per layer):
//   kvcache::StepOptions opt{.append_tokens = 1, .positions = positions, .capturable = true,
//                            .max_context = 4096, .stream = stream};
//   absl::StatusOr<kvcache::DecodePlan> plan = cache->PrepareDecode(batch, opt);
//   cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal);
//   for (int32_t layer = 0; layer < num_layers; ++layer) {
//     // ... kernels computing d_k[layer], d_v[layer], d_q[layer] on `stream` ...
//     cache->AppendStep(*plan, layer, k_ref[layer], v_ref[layer], stream);
//     cache->DecodeAttention(*plan, layer, q_ref[layer], out_ref[layer], {}, {.stream = stream});
//   }
//   cudaStreamEndCapture(stream, &graph);
//   cudaGraphInstantiate(&exec, graph);
//   cudaGraphLaunch(exec, stream);                       // step 1
//   for (each later step) {                              // positions advanced by one
//     cache->PrepareDecode(*plan, batch, opt);           // host work, outside the graph
//     cudaGraphLaunch(exec, stream);
//   }
#ifndef KVCACHE_DECODE_PLAN_H_
#define KVCACHE_DECODE_PLAN_H_

#include <cstdint>
#include <memory>
#include <span>

#include "kvcache/types.h"

namespace kvcache {

// What PrepareDecode does for a step beyond planning the decode (see "Step reservation" and
// "Capturable plans" above).
struct StepOptions {
  // 0: no reservation. 1: reserve one row per stream of every layer for the step's token.
  int32_t append_tokens = 0;
  // [batch] with append_tokens = 1 (empty otherwise): the step token's position per sequence,
  // greater than every position already appended to any layer of that sequence.
  std::span<const int32_t> positions;
  // CUDA backend only: the plan owns device memory at fixed addresses and its per-layer calls
  // (AppendStep, DecodeAttention with device tensors) only enqueue kernels on it.
  bool capturable = false;
  // capturable: the longest stream a decode of the plan may read, reserved rows included; it
  // fixes the split-K workspace and the page-id capacity. Required (> 0) with capturable.
  int32_t max_context = 0;
  // capturable: the stream the plan's uploads are enqueued on, normally the stream the graph is
  // launched on (a cudaStream_t). nullptr: the backend waits for the whole device, then uploads.
  void* stream = nullptr;
};

class DecodePlan {
 public:
  DecodePlan();
  ~DecodePlan();
  DecodePlan(DecodePlan&& other) noexcept;
  DecodePlan& operator=(DecodePlan&& other) noexcept;
  DecodePlan(const DecodePlan&) = delete;
  DecodePlan& operator=(const DecodePlan&) = delete;

  // False for a default-constructed or moved-from plan.
  bool valid() const { return state_ != nullptr; }
  // The batch, in the order of the q / out rows.
  std::span<const SequenceId> batch() const;
  // Layers [first_layer, first_layer + num_layers) can be decoded with this plan.
  int32_t first_layer() const;
  int32_t num_layers() const;
  // Whether PrepareDecode reserved step rows (StepOptions::append_tokens = 1) / made the plan
  // capturable.
  bool reserved() const;
  bool capturable() const;

  struct State;  // internal (src/decode_plan_state.h)

 private:
  friend class Cache;
  std::unique_ptr<State> state_;
};

}  // namespace kvcache

#endif  // KVCACHE_DECODE_PLAN_H_
