// kvcache/config.h — the shape of a cache: layers, heads, head dimension, dtype, page geometry.
//
// A page holds the rows of ONE stream (one sequence, layer and kv head): keys
// [tokens_per_page, key_width] followed by values [tokens_per_page, value_width]. A full-width
// row is 2 * head_dim elements; channel-pruned segments (ThinK) have narrower keys and so fit
// more tokens in the same page, which is where their memory saving comes from.
//
// Example:
//   kvcache::CacheConfig c;
//   c.num_layers = 32; c.num_kv_heads = 8; c.num_q_heads = 32; c.head_dim = 128;
//   c.dtype = kvcache::DType::kF16; c.page_tokens = 16; c.num_pages = 4096;
//   if (absl::Status s = c.Validate(); !s.ok()) { /* s.message() names the bad field */ }
#ifndef KVCACHE_CONFIG_H_
#define KVCACHE_CONFIG_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "kvcache/dtype.h"

namespace kvcache {

struct CacheConfig {
  int32_t num_layers = 1;
  int32_t num_kv_heads = 1;
  int32_t num_q_heads = 1;  // a multiple of num_kv_heads (GQA group G = q / kv)
  int32_t head_dim = 128;
  DType dtype = DType::kF16;
  // Page geometry: give page_tokens (tokens per page at full row width) or page_bytes. When
  // page_bytes is 0 it is derived as page_tokens * FullRowBytes(); when it is set, page_tokens
  // must be 0 or agree with it.
  int32_t page_tokens = 16;
  int64_t page_bytes = 0;
  // Pool capacity in pages.
  int32_t num_pages = 1024;
  // Keep per-page min/max key summaries (host memory, 2 * key_width floats per page) so that
  // DecodeOptions::read_policy can use Quest. Off by default: the store then pays nothing.
  bool page_summaries = false;

  // Checks every field; the error names the offending value. Does not modify the config.
  [[nodiscard]] absl::Status Validate() const;

  int32_t group_size() const { return num_q_heads / num_kv_heads; }
  int64_t FullRowBytes() const { return int64_t{2} * head_dim * DTypeSize(dtype); }
  // Page size after resolving page_tokens / page_bytes (call on a validated config).
  int64_t ResolvedPageBytes() const {
    return page_bytes > 0 ? page_bytes : int64_t{page_tokens} * FullRowBytes();
  }
  int32_t ResolvedPageTokens() const {
    return static_cast<int32_t>(ResolvedPageBytes() / FullRowBytes());
  }
  std::string DebugString() const;
};

}  // namespace kvcache

#endif  // KVCACHE_CONFIG_H_
