// kvcache/version.h — the library version.
//
// Example:
//   std::printf("kvcache %s\n", kvcache::VersionString());
#ifndef KVCACHE_VERSION_H_
#define KVCACHE_VERSION_H_

#define KVCACHE_VERSION_MAJOR 0
#define KVCACHE_VERSION_MINOR 1
#define KVCACHE_VERSION_PATCH 0

namespace kvcache {
inline constexpr const char* VersionString() { return "0.1.0"; }
}  // namespace kvcache

#endif  // KVCACHE_VERSION_H_
