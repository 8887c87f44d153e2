// kvcache/policy/admission.h — Dynamic-LLaVA decode-time admission masks.
//
// For each generated token the engine asks a decider whether its K/V is worth storing; the
// decision applies to layers >= start_layer (default 2) through AppendRequest::admit, and layers
// < start_layer always admit. The token still attends to its own K/V in the step that produced
// it (the engine's job: it has them in registers) and keeps its true position. Deciders: one the
// engine supplies (a trained predictor), a fixed keep rate with deterministic seeding (hash of
// seed and position, independent of call order), and an attention-based heuristic: keep a token
// whose own query gives it at least `threshold` times the uniform share 1/(context + 1). The
// built-in ones are heuristic stand-ins for the trained predictor of the paper.
//
// Example:
//   auto adm = kvcache::policy::Admission::FixedRate(/*rate=*/0.5, /*seed=*/7);
//   auto decisions = adm->Decide({.positions = pos});       // once per step
//   for (int l = 0; l < layers; ++l) {
//     std::vector<uint8_t> mask = adm->MaskForLayer(l, *decisions);
//     req.admit = mask;  // then cache->Append(seq, l, req)
//   }
#ifndef KVCACHE_POLICY_ADMISSION_H_
#define KVCACHE_POLICY_ADMISSION_H_

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "kvcache/types.h"

namespace kvcache::policy {

struct AdmissionInput {
  std::span<const int32_t> positions = {};     // [tokens]
  std::span<const Modality> modalities = {};   // [tokens] or empty
  // Attention-based decider: the mean over q heads of the probability each token's own query
  // puts on its own key when attending [cache + itself] (see SelfAttentionWeight), and the number
  // of cached tokens it attended.
  std::span<const float> self_weight = {};     // [tokens] or empty
  std::span<const int32_t> context_length = {};  // [tokens] or empty
};

using AdmissionDecider = std::function<absl::StatusOr<std::vector<uint8_t>>(
    const AdmissionInput& input)>;

class Admission {
 public:
  [[nodiscard]] static absl::StatusOr<Admission> Engine(AdmissionDecider decider,
                                                        int32_t start_layer = 2);
  // rate in [0, 1]: P(admit); the decision for a position is the same on every call.
  [[nodiscard]] static absl::StatusOr<Admission> FixedRate(double rate, uint64_t seed,
                                                           int32_t start_layer = 2);
  // threshold >= 0; admit when self_weight * (context_length + 1) >= threshold.
  [[nodiscard]] static absl::StatusOr<Admission> AttentionBased(double threshold = 1.0,
                                                                int32_t start_layer = 2);

  int32_t start_layer() const { return start_layer_; }
  // One decision per token (1 = store in layers >= start_layer).
  [[nodiscard]] absl::StatusOr<std::vector<uint8_t>> Decide(const AdmissionInput& input) const;
  // The AppendRequest::admit mask of `layer`: all ones below start_layer, else the decisions.
  std::vector<uint8_t> MaskForLayer(int32_t layer, std::span<const uint8_t> decisions) const;

 private:
  Admission(AdmissionDecider decider, int32_t start_layer)
      : decider_(std::move(decider)), start_layer_(start_layer) {}
  AdmissionDecider decider_;
  int32_t start_layer_ = 2;
};

// Self-attention weight of one new token: q [num_q_heads, head_dim], k [num_kv_heads, head_dim],
// lse [num_q_heads] the log-sum-exp of the token's scaled logits over the cached keys (from
// Cache::DecodeAttention; -inf for an empty cache). Returns the mean over q heads of
// exp(s) / (exp(lse) + exp(s)) with s = scale * q . k. scale 0 = 1/sqrt(head_dim).
[[nodiscard]] absl::StatusOr<float> SelfAttentionWeight(std::span<const float> q,
                                                        std::span<const float> k,
                                                        std::span<const float> lse,
                                                        int32_t num_q_heads, int32_t num_kv_heads,
                                                        int32_t head_dim, float scale = 0.0f);

}  // namespace kvcache::policy

#endif  // KVCACHE_POLICY_ADMISSION_H_
