// kvcache/internal/attention_math.h — the online-softmax arithmetic every attention kernel shares.
//
// Attention over a stream is computed piecewise (per segment, per key split, per thread block)
// and the pieces are merged. A piece is a SoftmaxState {m, l} plus an unnormalised accumulator
// acc[d] = sum_t exp(s_t - m) * v_t[d], where m is the largest scaled logit s_t seen and
// l = sum_t exp(s_t - m). Two pieces merge exactly by rescaling both to the larger m (the
// log-sum-exp merge); the final output is acc / l and the log of the softmax denominator is
// m + log(l). Written once here as KVC_HOST_DEVICE inline functions so the CPU backend and the
// CUDA kernels cannot drift apart. Internal header: users of the library do not include it.
//
// Example (two keys with values v0, v1 of width d, processed as two pieces then merged):
//   kvcache::SoftmaxState a, b;                       // both empty: m = -inf, l = 0
//   float acc_a[d] = {}, acc_b[d] = {};
//   kvcache::OnlineSoftmaxAccumulate(a, acc_a, /*logit=*/s0, v0, d);
//   kvcache::OnlineSoftmaxAccumulate(b, acc_b, /*logit=*/s1, v1, d);
//   kvcache::MergeSoftmaxStates(a, acc_a, b, acc_b, d);   // a now covers both keys
//   kvcache::FinalizeSoftmax(a, acc_a, out, d);           // out = softmax-weighted v0, v1
//   float lse = kvcache::SoftmaxLse(a);                   // log(exp(s0) + exp(s1))
#ifndef KVCACHE_INTERNAL_ATTENTION_MATH_H_
#define KVCACHE_INTERNAL_ATTENTION_MATH_H_

#include <cmath>

#include "kvcache/macros.h"

namespace kvcache {

// Running maximum logit m and denominator l = sum exp(s - m). Empty: m = -inf, l = 0.
struct SoftmaxState {
  float m = -INFINITY;
  float l = 0.0f;
};

// exp(a - b) where b is a running maximum that may still be -inf (empty state): then the term
// it rescales is empty too, so any finite factor is correct; 0 avoids the NaN of -inf - -inf.
KVC_HOST_DEVICE inline float RescaleFactor(float old_max, float new_max) {
  return old_max == -INFINITY ? 0.0f : expf(old_max - new_max);
}

// Adds one key with scaled logit `logit`. Returns the factor the caller must multiply its
// accumulator by (*old_scale) and the weight of the new value (*weight), so kernels that keep
// the accumulator in their own layout (registers, shared memory) use the same arithmetic.
KVC_HOST_DEVICE inline void OnlineSoftmaxStep(SoftmaxState& state, float logit, float* old_scale,
                                              float* weight) {
  const float new_max = logit > state.m ? logit : state.m;
  if (new_max == -INFINITY) {  // still nothing but -inf logits: they carry no mass
    *old_scale = 1.0f;
    *weight = 0.0f;
    return;
  }
  *old_scale = RescaleFactor(state.m, new_max);
  *weight = expf(logit - new_max);
  state.l = state.l * *old_scale + *weight;
  state.m = new_max;
}

// acc[0, width) tracks `state`; adds value row v[0, width) with scaled logit `logit`.
KVC_HOST_DEVICE inline void OnlineSoftmaxAccumulate(SoftmaxState& state, float* acc, float logit,
                                                    const float* v, int width) {
  float old_scale, weight;
  OnlineSoftmaxStep(state, logit, &old_scale, &weight);
  for (int i = 0; i < width; ++i) acc[i] = acc[i] * old_scale + weight * v[i];
}

// Merges piece b into piece a. Returns the factors acc_a and acc_b must be multiplied by before
// they are added (*scale_a, *scale_b); a empty or b empty are handled (factor 0 for the empty
// side, 1 for the other).
KVC_HOST_DEVICE inline void MergeSoftmaxStep(SoftmaxState& a, const SoftmaxState& b, float* scale_a,
                                             float* scale_b) {
  const float new_max = a.m > b.m ? a.m : b.m;
  if (new_max == -INFINITY) {
    *scale_a = 1.0f;
    *scale_b = 0.0f;
    return;
  }
  *scale_a = RescaleFactor(a.m, new_max);
  *scale_b = RescaleFactor(b.m, new_max);
  a.l = a.l * *scale_a + b.l * *scale_b;
  a.m = new_max;
}

// a, acc_a <- merge of (a, acc_a) and (b, acc_b); accumulators are `width` floats.
KVC_HOST_DEVICE inline void MergeSoftmaxStates(SoftmaxState& a, float* acc_a, const SoftmaxState& b,
                                               const float* acc_b, int width) {
  float scale_a, scale_b;
  MergeSoftmaxStep(a, b, &scale_a, &scale_b);
  for (int i = 0; i < width; ++i) acc_a[i] = acc_a[i] * scale_a + acc_b[i] * scale_b;
}

// 1 / l, or 0 for an empty state (so an empty stream yields a zero output, not NaN).
KVC_HOST_DEVICE inline float SoftmaxInverseDenominator(const SoftmaxState& s) {
  return s.l > 0.0f ? 1.0f / s.l : 0.0f;
}

// out[i] = acc[i] / l (0 when empty).
KVC_HOST_DEVICE inline void FinalizeSoftmax(const SoftmaxState& s, const float* acc, float* out,
                                            int width) {
  const float inv = SoftmaxInverseDenominator(s);
  for (int i = 0; i < width; ++i) out[i] = acc[i] * inv;
}

// Natural log of the softmax denominator over the scaled logits: m + log(l); -inf when empty.
KVC_HOST_DEVICE inline float SoftmaxLse(const SoftmaxState& s) {
  return s.l > 0.0f ? s.m + logf(s.l) : -INFINITY;
}

// The softmax scale a decode or scoring call uses: `scale`, or 1/sqrt(head_dim) when it is 0 (the
// API's "default scale" value). Every backend resolves it here so they agree bit for bit.
KVC_HOST_DEVICE inline float ResolveScale(float scale, int head_dim) {
  return scale != 0.0f ? scale : 1.0f / sqrtf(static_cast<float>(head_dim));
}

// Probability of a key with scaled logit `logit` once the whole state is known.
KVC_HOST_DEVICE inline float SoftmaxProbability(const SoftmaxState& s, float logit) {
  return s.l > 0.0f ? expf(logit - s.m) / s.l : 0.0f;
}

}  // namespace kvcache

#endif  // KVCACHE_INTERNAL_ATTENTION_MATH_H_
