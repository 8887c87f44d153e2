// Dynamic-LLaVA decode-time admission.
#include "kvcache/policy/admission.h"

#include <cmath>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kvcache/policy/scorers.h"

namespace kvcache::policy {
namespace {

absl::Status CheckStart(int32_t start_layer) {
  if (start_layer < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("admission: start_layer=", start_layer, " is negative"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Admission> Admission::Engine(AdmissionDecider decider, int32_t start_layer) {
  if (absl::Status s = CheckStart(start_layer); !s.ok()) return s;
  if (!decider) return absl::InvalidArgumentError("admission: the engine decider is empty");
  return Admission(std::move(decider), start_layer);
}

absl::StatusOr<Admission> Admission::FixedRate(double rate, uint64_t seed, int32_t start_layer) {
  if (absl::Status s = CheckStart(start_layer); !s.ok()) return s;
  if (!(rate >= 0.0 && rate <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("admission: rate=", rate, " is outside [0, 1]"));
  }
  return Admission(
      [rate, seed](const AdmissionInput& in) -> absl::StatusOr<std::vector<uint8_t>> {
        std::vector<uint8_t> out(in.positions.size());
        for (size_t i = 0; i < out.size(); ++i) {
          // A hash of (seed, position): the same token gets the same decision on every call.
          out[i] = SeededUniform(seed, -1, -1, in.positions[i]) < rate ? 1 : 0;
        }
        return out;
      },
      start_layer);
}

absl::StatusOr<Admission> Admission::AttentionBased(double threshold, int32_t start_layer) {
  if (absl::Status s = CheckStart(start_layer); !s.ok()) return s;
  if (!(threshold >= 0.0) || !std::isfinite(threshold)) {
    return absl::InvalidArgumentError(
        absl::StrCat("admission: threshold=", threshold, " must be finite and >= 0"));
  }
  return Admission(
      [threshold](const AdmissionInput& in) -> absl::StatusOr<std::vector<uint8_t>> {
        const size_t n = in.positions.size();
        if (in.self_weight.size() != n || in.context_length.size() != n) {
          return absl::InvalidArgumentError(absl::StrCat(
              "admission (attention): ", in.self_weight.size(), " self weights and ",
              in.context_length.size(), " context lengths for ", n, " tokens"));
        }
        std::vector<uint8_t> out(n);
        for (size_t i = 0; i < n; ++i) {
          // NaN compares false: a token with an undefined weight is not admitted.
          out[i] = double{in.self_weight[i]} * (in.context_length[i] + 1.0) >= threshold ? 1 : 0;
        }
        return out;
      },
      start_layer);
}

absl::StatusOr<std::vector<uint8_t>> Admission::Decide(const AdmissionInput& in) const {
  if (!in.modalities.empty() && in.modalities.size() != in.positions.size()) {
    return absl::InvalidArgumentError(absl::StrCat("admission: ", in.modalities.size(),
                                                   " modalities for ", in.positions.size(),
                                                   " tokens"));
  }
  absl::StatusOr<std::vector<uint8_t>> d = decider_(in);
  if (!d.ok()) return d.status();
  if (d->size() != in.positions.size()) {
    return absl::InvalidArgumentError(absl::StrCat("admission: the decider returned ", d->size(),
                                                   " decisions for ", in.positions.size(),
                                                   " tokens"));
  }
  return d;
}

std::vector<uint8_t> Admission::MaskForLayer(int32_t layer,
                                             std::span<const uint8_t> decisions) const {
  if (layer < start_layer_) return std::vector<uint8_t>(decisions.size(), 1);
  std::vector<uint8_t> mask(decisions.size());
  for (size_t i = 0; i < mask.size(); ++i) mask[i] = decisions[i] ? 1 : 0;
  return mask;
}

absl::StatusOr<float> SelfAttentionWeight(std::span<const float> q, std::span<const float> k,
                                          std::span<const float> lse, int32_t num_q_heads,
                                          int32_t num_kv_heads, int32_t head_dim, float scale) {
  if (num_kv_heads < 1 || num_q_heads % num_kv_heads != 0 || head_dim < 1 ||
      q.size() != static_cast<size_t>(num_q_heads) * head_dim ||
      k.size() != static_cast<size_t>(num_kv_heads) * head_dim ||
      lse.size() != static_cast<size_t>(num_q_heads)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SelfAttentionWeight: q ", q.size(), ", k ", k.size(), ", lse ", lse.size(),
        " values for ", num_q_heads, " q heads, ", num_kv_heads, " kv heads, head_dim ", head_dim));
  }
  if (scale == 0.0f) scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const int32_t group = num_q_heads / num_kv_heads;
  double sum = 0.0;
  for (int32_t qh = 0; qh < num_q_heads; ++qh) {
    const float* qv = &q[static_cast<size_t>(qh) * head_dim];
    const float* kv = &k[static_cast<size_t>(qh / group) * head_dim];
    double dot = 0.0;
    for (int32_t c = 0; c < head_dim; ++c) dot += double{qv[c]} * kv[c];
    const double s = scale * dot;
    // exp(s) / (exp(lse) + exp(s)) = 1 / (1 + exp(lse - s)), stable for any magnitude.
    sum += 1.0 / (1.0 + std::exp(double{lse[qh]} - s));
  }
  return static_cast<float>(sum / num_q_heads);
}

}  // namespace kvcache::policy
