// kvcache/policy/policy.h — the Policy interface and the composable token-eviction pipeline.
//
// A Policy is a pure function of a SequenceSnapshot: Plan(snapshot) -> EvictionPlan, applied by
// Cache::Apply. Needs() says what CollectSnapshot must gather. The token pipeline is built from
// stages, each a plain option below:
//   layer budget (uniform | PyramidKV | VL-Cache | H2O heavy+recent | full)
//   -> head budget (uniform | AdaKV)
//   -> scorer (scorers.h) [+ pooling, + one ranking shared by the heads of a layer]
//   -> selector with protections (sinks, recent window, text, visual-only, modality caps)
//   -> optional LOOK-M merge of the evicted tokens (merge.h)
//   -> optional ThinK key-channel pruning (think.h).
// The registry (registry.h) builds the named policies of the literature from these options.
// A stream whose plan would keep every token unchanged is left out of the plan, so Apply does no
// work for it; a "full" policy returns an empty plan.
//
// Example:
//   kvcache::policy::TokenPolicyOptions o;
//   o.name = "my-snapkv"; o.keep = 0.2; o.score = kvcache::policy::TokenScore::kWindow;
//   o.pooling = kvcache::policy::Pooling::kAvg; o.window = 32; o.window_within_budget = true;
//   auto policy = kvcache::policy::MakeTokenPolicy(o);
//   auto plan = (*policy)->Plan(snapshot);
#ifndef KVCACHE_POLICY_POLICY_H_
#define KVCACHE_POLICY_POLICY_H_

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "kvcache/plan.h"
#include "kvcache/policy/scorers.h"
#include "kvcache/policy/select.h"
#include "kvcache/policy/snapshot.h"

namespace kvcache::policy {

class Policy {
 public:
  virtual ~Policy() = default;
  virtual std::string_view name() const = 0;
  // Name and every parameter value, e.g. "snapkv keep=0.1 window=32 kernel=5 pool=avg".
  virtual std::string Describe() const = 0;
  virtual SnapshotRequest Needs() const = 0;
  // Pure: the same snapshot always gives the same plan. Errors name the offending value.
  [[nodiscard]] virtual absl::StatusOr<EvictionPlan> Plan(const SequenceSnapshot& snap) const = 0;
};

enum class LayerBudgetKind : uint8_t {
  kFull = 0,     // keep every token (channel pruning alone, or the no-op baseline)
  kUniform = 1,  // round(keep * n_l) (or `tokens`)
  kPyramid = 2,  // PyramidKV over the sequence length n (keep = capacity, window inside)
  kVlCache = 3,  // VL-Cache sparsity-aware ratios
  kH2O = 4,      // floor(heavy * n_l) + floor(recent * n_l), the recent part protected
};
enum class HeadBudgetKind : uint8_t { kUniform = 0, kAdaKv = 1 };
enum class MergeMode : uint8_t { kNone = 0, kPivot = 1, kAverage = 2 };

struct ThinkOptions {
  double lambda = 0.4;   // prune floor(lambda * D) key channels
  int32_t window = 32;   // observation rows (the last `window` query rows)
  int32_t recent = 32;   // the last kept tokens keep every channel
};

struct TokenPolicyOptions {
  std::string name = "token";
  // Layer budget. n_l = the longest stream of layer l; n = the longest stream of the sequence.
  LayerBudgetKind layer_budget = LayerBudgetKind::kUniform;
  double keep = 0.1;       // alpha, in (0, 1]
  int32_t tokens = 0;      // > 0: absolute per-stream budget (kUniform only), overrides keep
  int32_t pyramid_beta = 20;
  float sparsity_threshold = 0.01f;  // VL-Cache p (used when collecting)
  bool renormalize = true;           // VL-Cache: exact water-filling (false: literal clip)
  double h2o_heavy = 0.1;
  double h2o_recent = 0.1;
  // Head budget.
  HeadBudgetKind head_budget = HeadBudgetKind::kUniform;
  double adakv_floor = 0.2;
  // Scorer.
  TokenScore score = TokenScore::kAccumulated;
  Pooling pooling = Pooling::kNone;  // applied to the non-window scores
  int32_t pool_kernel = 5;
  bool shared_ranking = false;       // one ranking per layer (mean over heads by position)
  uint64_t seed = 0;
  // Protections.
  int32_t window = 0;                // the last `window` tokens are kept; kWindow scores these rows
  bool window_within_budget = false; // the window counts in the budget; budget < window = error
  double recent_fraction = 0.0;      // also protect floor(recent_fraction * budget) last tokens
  int32_t sinks = 0;
  bool protect_text = false;
  bool visual_only = false;
  std::array<float, kNumModalities> modality_keep = {-1.0f, -1.0f, -1.0f, -1.0f};
  // Post-selection stages.
  MergeMode merge = MergeMode::kNone;
  bool think = false;
  ThinkOptions think_options;
};

// Validates the options (InvalidArgument naming the field) and builds the pipeline.
[[nodiscard]] absl::StatusOr<std::unique_ptr<Policy>> MakeTokenPolicy(
    const TokenPolicyOptions& options);

// FastV: at layer K the last prompt row of layer K-1 (mean over all heads) ranks the image/video
// tokens; the lowest `ratio` fraction is dropped from every layer >= K (same tokens, by
// position); text tokens and layers < K are untouched. A sequence without image/video tokens
// gives an empty plan (documented no-op).
// keep > 0 replaces ratio by a share of the prompt KV, like every other token policy: with L
// layers, n prompt tokens of which n_img are image tokens, the image tokens kept in layers >= K
// are round((keep*L*n - K*n) / (L-K) - (n - n_img)), clamped to [1, n_img], so that (K*n + (L-K)
// * (n - n_img + kept)) / (L*n) = keep. Below keep = (K + (L-K)(n - n_img + 1)/n) / L that is out
// of reach (layers < K and the text are never dropped) and one image token is kept.
struct FastVOptions {
  int32_t layer = 2;   // K >= 1
  double ratio = 0.5;  // R in [0, 1)
  double keep = 0.0;   // share of the prompt KV in (0, 1]; 0 = use ratio
};
[[nodiscard]] absl::StatusOr<std::unique_ptr<Policy>> MakeFastVPolicy(const FastVOptions& options);

}  // namespace kvcache::policy

#endif  // KVCACHE_POLICY_POLICY_H_
