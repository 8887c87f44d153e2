// Tests for kvcache/config.h: validation names the offending field and value.
#include <catch2/catch.hpp>

#include <string>

#include "kvcache/config.h"

using kvcache::CacheConfig;
using kvcache::DType;

static std::string Message(const CacheConfig& c) { return std::string(c.Validate().message()); }

TEST_CASE("a typical config validates and resolves its page geometry", "[config]") {
  CacheConfig c;
  c.num_layers = 32;
  c.num_kv_heads = 8;
  c.num_q_heads = 32;
  c.head_dim = 128;
  c.dtype = DType::kF16;
  c.page_tokens = 16;
  REQUIRE(c.Validate().ok());
  REQUIRE(c.group_size() == 4);
  REQUIRE(c.FullRowBytes() == 512);
  REQUIRE(c.ResolvedPageBytes() == 16 * 512);
  REQUIRE(c.ResolvedPageTokens() == 16);
  c.page_tokens = 0;
  c.page_bytes = 4096;
  REQUIRE(c.Validate().ok());
  REQUIRE(c.ResolvedPageTokens() == 8);
}

TEST_CASE("every bad field is rejected with its name and value", "[config]") {
  CacheConfig c;
  c.num_layers = 0;
  REQUIRE(c.Validate().code() == absl::StatusCode::kInvalidArgument);
  REQUIRE(Message(c).find("num_layers") != std::string::npos);
  c = CacheConfig{};
  c.num_kv_heads = -2;
  REQUIRE(Message(c).find("num_kv_heads must be > 0, got -2") != std::string::npos);
  c = CacheConfig{};
  c.num_kv_heads = 3;
  c.num_q_heads = 4;
  REQUIRE(Message(c).find("num_q_heads") != std::string::npos);
  c = CacheConfig{};
  c.head_dim = 0;
  REQUIRE(Message(c).find("head_dim") != std::string::npos);
  c = CacheConfig{};
  c.page_tokens = 0;
  c.page_bytes = 0;
  REQUIRE(Message(c).find("page_tokens or page_bytes") != std::string::npos);
  c = CacheConfig{};
  c.page_tokens = 0;
  c.page_bytes = 100;  // smaller than a full row of 2*128*2 bytes
  REQUIRE(Message(c).find("page_bytes 100") != std::string::npos);
  c = CacheConfig{};
  c.page_tokens = 3;
  c.page_bytes = 4096;
  REQUIRE(Message(c).find("disagrees") != std::string::npos);
  c = CacheConfig{};
  c.head_dim = 8;
  c.page_tokens = 1;  // 32-byte pages are not 64-byte aligned
  REQUIRE(Message(c).find("multiple of 64") != std::string::npos);
  c = CacheConfig{};
  c.num_pages = 0;
  REQUIRE(Message(c).find("num_pages") != std::string::npos);
  c = CacheConfig{};
  c.dtype = static_cast<DType>(9);
  REQUIRE(Message(c).find("dtype") != std::string::npos);
}
