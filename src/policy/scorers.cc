// Token scorers (ALGORITHMS.md "Token scores").
#include "kvcache/policy/scorers.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

#include "src/policy/similarity.h"

namespace kvcache::policy {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

absl::StatusOr<std::vector<float>> Copy(const std::vector<float>& v, const char* field,
                                        const StreamSnapshot& s, int32_t layer, int32_t head) {
  if (static_cast<int32_t>(v.size()) != s.length()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "stream (layer ", layer, ", kv_head ", head, ") has ", v.size(), " ", field, " for ",
        s.length(), " tokens; collect the snapshot with the policy's Needs()"));
  }
  return v;
}

}  // namespace

const char* TokenScoreName(TokenScore s) {
  switch (s) {
    case TokenScore::kAccumulated: return "accumulated";
    case TokenScore::kWindow: return "window";
    case TokenScore::kPostVision: return "post_vision";
    case TokenScore::kLastRow: return "last_row";
    case TokenScore::kKeyNorm: return "key_norm";
    case TokenScore::kRandom: return "random";
    case TokenScore::kRecency: return "recency";
  }
  return "?";
}

float SeededUniform(uint64_t seed, int32_t layer, int32_t kv_head, int32_t position) {
  uint64_t h = SplitMix64(seed);
  h = SplitMix64(h ^ static_cast<uint32_t>(layer));
  h = SplitMix64(h ^ (uint64_t{static_cast<uint32_t>(kv_head)} << 32));
  h = SplitMix64(h ^ static_cast<uint32_t>(position));
  return static_cast<float>(h >> 40) * (1.0f / 16777216.0f);  // 24 bits: exact in a float
}

absl::StatusOr<std::vector<float>> ScoreTokens(TokenScore kind, const SequenceSnapshot& snap,
                                               int32_t layer, int32_t kv_head, uint64_t seed) {
  if (layer < 0 || layer >= snap.num_layers || kv_head < 0 || kv_head >= snap.num_kv_heads) {
    return absl::OutOfRangeError(absl::StrCat("ScoreTokens: stream (layer ", layer, ", kv_head ",
                                              kv_head, ") is outside the snapshot"));
  }
  const StreamSnapshot& s = snap.stream(layer, kv_head);
  const int32_t n = s.length();
  switch (kind) {
    case TokenScore::kAccumulated: return Copy(s.accumulated, "accumulated scores", s, layer, kv_head);
    case TokenScore::kWindow: return Copy(s.window_scores, "window scores", s, layer, kv_head);
    case TokenScore::kPostVision:
      return Copy(s.post_vision_scores, "post-vision scores", s, layer, kv_head);
    case TokenScore::kLastRow: return Copy(s.last_row_scores, "last-row scores", s, layer, kv_head);
    case TokenScore::kKeyNorm: {
      const int32_t d = snap.head_dim;
      if (static_cast<int64_t>(s.keys.size()) != int64_t{n} * d) {
        return absl::FailedPreconditionError(absl::StrCat(
            "stream (layer ", layer, ", kv_head ", kv_head, ") has no keys (", s.keys.size(),
            " values for ", n, " tokens); collect the snapshot with keys"));
      }
      std::vector<double> squared(n);
      SquaredRowNorms(s.keys, static_cast<size_t>(d), squared);
      std::vector<float> out(n);
      for (int32_t j = 0; j < n; ++j) out[j] = -static_cast<float>(std::sqrt(squared[j]));
      return out;
    }
    case TokenScore::kRandom: {
      std::vector<float> out(n);
      for (int32_t j = 0; j < n; ++j) out[j] = SeededUniform(seed, layer, kv_head, s.positions[j]);
      return out;
    }
    case TokenScore::kRecency: {
      std::vector<float> out(n);
      for (int32_t j = 0; j < n; ++j) out[j] = static_cast<float>(j);
      return out;
    }
  }
  return absl::InvalidArgumentError("ScoreTokens: unknown scorer");
}

std::vector<std::vector<float>> ShareAcrossHeads(
    const std::vector<std::vector<float>>& per_head,
    const std::vector<std::span<const int32_t>>& positions) {
  // Gather (position, score), sort by position, average each run of equal positions.
  std::vector<std::pair<int32_t, float>> all;
  for (size_t h = 0; h < per_head.size(); ++h) {
    for (size_t i = 0; i < per_head[h].size(); ++i) all.emplace_back(positions[h][i], per_head[h][i]);
  }
  std::stable_sort(all.begin(), all.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<int32_t> unique_pos;
  std::vector<float> mean;
  for (size_t i = 0; i < all.size();) {
    size_t j = i;
    double sum = 0.0;
    while (j < all.size() && all[j].first == all[i].first) sum += all[j++].second;
    unique_pos.push_back(all[i].first);
    mean.push_back(static_cast<float>(sum / static_cast<double>(j - i)));
    i = j;
  }
  std::vector<std::vector<float>> out(per_head.size());
  for (size_t h = 0; h < per_head.size(); ++h) {
    out[h].resize(per_head[h].size());
    for (size_t i = 0; i < per_head[h].size(); ++i) {
      const auto it = std::lower_bound(unique_pos.begin(), unique_pos.end(), positions[h][i]);
      out[h][i] = mean[it - unique_pos.begin()];
    }
  }
  return out;
}

}  // namespace kvcache::policy
