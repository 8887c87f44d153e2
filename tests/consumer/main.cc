// Built against the INSTALLED package: creates a cache, appends, forks, compacts, reads back.
#include <cstdio>
#include <vector>

#include "kvcache/kvcache.h"

int main() {
  kvcache::CacheConfig config;
  config.num_layers = 1;
  config.num_kv_heads = 1;
  config.num_q_heads = 2;
  config.head_dim = 8;
  config.dtype = kvcache::DType::kF32;
  config.page_tokens = 4;
  config.num_pages = 16;
  auto cache = kvcache::Cache::Create(config, "cpu");
  if (!cache.ok()) {
    std::fprintf(stderr, "create: %s\n", std::string(cache.status().message()).c_str());
    return 1;
  }
  auto seq = (*cache)->AddSequence();
  const int n = 10;
  std::vector<float> k(n * 8), v(n * 8);
  std::vector<int32_t> pos(n);
  for (int i = 0; i < n * 8; ++i) k[i] = 0.1f * i, v[i] = -0.1f * i;
  for (int i = 0; i < n; ++i) pos[i] = i;
  kvcache::AppendRequest req{.keys = kvcache::TensorRef::Of(k),
                             .values = kvcache::TensorRef::Of(v),
                             .positions = pos};
  if (!(*cache)->Append(*seq, 0, req).ok()) return 2;
  kvcache::EvictionPlan plan{.sequence = *seq};
  plan.streams.push_back({.layer = 0, .kv_head = 0, .kept = {0, 5, 9}});
  if (!(*cache)->Apply(plan).ok()) return 3;
  auto contents = (*cache)->ReadStream(*seq, 0, 0);
  if (!contents.ok() || contents->length != 3 || contents->positions[1] != 5 ||
      contents->values[8] != v[5 * 8]) {
    return 4;
  }
  if (!(*cache)->Validate().ok()) return 5;
  std::printf("consumer ok: %d tokens kept, %d pages used\n", contents->length,
              (*cache)->Stats().pages_used);
  return 0;
}
