// Quest page-summary upkeep: see page_summaries.h.
#include "src/page_summaries.h"

#include <algorithm>
#include <cmath>

namespace kvcache::internal {

void ResizeSummaries(Segment& s) {
  const size_t size = s.pages.size() * static_cast<size_t>(s.key_width);
  s.key_min.resize(size, INFINITY);
  s.key_max.resize(size, -INFINITY);
}

void FoldKeys(Segment& s, int32_t first_row, int32_t count, const float* keys) {
  for (int32_t i = 0; i < count; ++i) {
    const size_t page = static_cast<size_t>((first_row + i) / s.tokens_per_page);
    const float* key = keys + static_cast<size_t>(i) * s.key_width;
    float* mn = s.key_min.data() + page * s.key_width;
    float* mx = s.key_max.data() + page * s.key_width;
    for (int32_t c = 0; c < s.key_width; ++c) {
      mn[c] = key[c] < mn[c] ? key[c] : mn[c];
      mx[c] = key[c] > mx[c] ? key[c] : mx[c];
    }
  }
}

absl::Status RebuildSummaries(Backend& backend, const PoolView& pool, Segment& s,
                              int32_t head_dim) {
  const int32_t n = s.length();
  std::vector<float> keys(static_cast<size_t>(n) * head_dim);    // [length, head_dim]
  std::vector<float> values(static_cast<size_t>(n) * head_dim);  // [length, head_dim]
  if (absl::Status st =
          backend.ReadRows(pool, s.View(), head_dim, 0, n, keys.data(), values.data());
      !st.ok()) {
    return st;
  }
  // The read-back is expanded to head_dim channels; summaries cover the stored ones only.
  std::vector<float> stored(static_cast<size_t>(n) * s.key_width);  // [length, key_width]
  for (int32_t t = 0; t < n; ++t) {
    const float* k = keys.data() + static_cast<size_t>(t) * head_dim;
    for (int32_t i = 0; i < s.key_width; ++i) {
      stored[static_cast<size_t>(t) * s.key_width + i] =
          k[s.key_channels.empty() ? i : s.key_channels[i]];
    }
  }
  s.key_min.clear();
  s.key_max.clear();
  ResizeSummaries(s);
  FoldKeys(s, 0, n, stored.data());
  return absl::OkStatus();
}

std::vector<PageSummary> CollectSummaries(const Stream& stream) {
  std::vector<PageSummary> out;
  int32_t start = 0;
  for (const Segment& s : stream.segments) {
    for (size_t p = 0; p < s.pages.size(); ++p) {
      PageSummary ps;
      const int32_t first = static_cast<int32_t>(p) * s.tokens_per_page;
      ps.first_token = start + first;
      ps.num_tokens = std::min(s.tokens_per_page, s.length() - first);
      ps.key_channels = s.key_channels;
      ps.key_min.assign(s.key_min.begin() + p * s.key_width,
                        s.key_min.begin() + (p + 1) * s.key_width);
      ps.key_max.assign(s.key_max.begin() + p * s.key_width,
                        s.key_max.begin() + (p + 1) * s.key_width);
      out.push_back(std::move(ps));
    }
    start += s.length();
  }
  return out;
}

}  // namespace kvcache::internal
