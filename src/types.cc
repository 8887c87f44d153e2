// Names of the small vocabulary types and CacheConfig validation.
#include <string>

#include "absl/strings/str_cat.h"
#include "kvcache/config.h"
#include "kvcache/dtype.h"
#include "kvcache/types.h"

namespace kvcache {

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "f32";
    case DType::kF16:
      return "f16";
    case DType::kBF16:
      return "bf16";
  }
  return "unknown";
}

const char* MemorySpaceName(MemorySpace s) {
  switch (s) {
    case MemorySpace::kHost:
      return "host";
    case MemorySpace::kDevice:
      return "device";
  }
  return "unknown";
}

const char* ModalityName(Modality m) {
  switch (m) {
    case Modality::kText:
      return "text";
    case Modality::kImage:
      return "image";
    case Modality::kVideo:
      return "video";
    case Modality::kAudio:
      return "audio";
  }
  return "unknown";
}

absl::Status CacheConfig::Validate() const {
  if (num_layers <= 0) return absl::InvalidArgumentError(absl::StrCat("num_layers must be > 0, got ", num_layers));
  if (num_kv_heads <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_kv_heads must be > 0, got ", num_kv_heads));
  }
  if (num_q_heads <= 0 || num_q_heads % num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_q_heads must be a positive multiple of num_kv_heads (",
                                                   num_kv_heads, "), got ", num_q_heads));
  }
  if (head_dim <= 0 || head_dim > 1024) {
    return absl::InvalidArgumentError(absl::StrCat("head_dim must be in [1, 1024], got ", head_dim));
  }
  if (dtype != DType::kF32 && dtype != DType::kF16 && dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat("dtype has unknown value ", static_cast<int>(dtype)));
  }
  if (page_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("page_tokens must be >= 0, got ", page_tokens));
  }
  if (page_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat("page_bytes must be >= 0, got ", page_bytes));
  }
  if (page_bytes == 0 && page_tokens == 0) {
    return absl::InvalidArgumentError("one of page_tokens or page_bytes must be set (both are 0)");
  }
  if (page_bytes > 0) {
    if (page_bytes < FullRowBytes()) {
      return absl::InvalidArgumentError(absl::StrCat("page_bytes ", page_bytes,
                                                     " is smaller than one full row (", FullRowBytes(),
                                                     " bytes = 2 * head_dim * dtype size)"));
    }
    if (page_tokens != 0 && page_tokens != page_bytes / FullRowBytes()) {
      return absl::InvalidArgumentError(absl::StrCat("page_tokens ", page_tokens, " disagrees with page_bytes ",
                                                     page_bytes, " (which holds ", page_bytes / FullRowBytes(),
                                                     " full rows)"));
    }
  } else if (int64_t{page_tokens} * FullRowBytes() > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("page_tokens ", page_tokens, " makes pages over 1 GiB"));
  }
  if (ResolvedPageBytes() % 64 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("page size ", ResolvedPageBytes(),
                                                   " bytes (page_tokens ", page_tokens, ", page_bytes ", page_bytes,
                                                   ") must be a multiple of 64 bytes"));
  }
  if (num_pages <= 0) return absl::InvalidArgumentError(absl::StrCat("num_pages must be > 0, got ", num_pages));
  if (ResolvedPageBytes() * num_pages > (int64_t{1} << 40)) {
    return absl::InvalidArgumentError(absl::StrCat("num_pages ", num_pages, " * page_bytes ", ResolvedPageBytes(),
                                                   " exceeds 1 TiB"));
  }
  return absl::OkStatus();
}

std::string CacheConfig::DebugString() const {
  return absl::StrCat("layers=", num_layers, " kv_heads=", num_kv_heads, " q_heads=", num_q_heads,
                      " head_dim=", head_dim, " dtype=", DTypeName(dtype), " page_tokens=", page_tokens,
                      " page_bytes=", page_bytes, " num_pages=", num_pages);
}

}  // namespace kvcache
