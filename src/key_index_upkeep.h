// src/key_index_upkeep.h — retrieval key indexes kept in step with their streams (internal).
//
// One KeyIndex per stream (Cache::Sequence::key_indexes), created by the backend on the first
// retrieval decode of the stream (Cache::EnsureKeyIndex, key_index_upkeep.cc), extended by
// Append with the stored keys (ExtendKeyIndex), dropped by Apply (token indices change; rebuilt
// lazily) and never shared with forks.
//
// Example (Append's commit, keys as stored, full width):
//   ExtendKeyIndex(seq, stream_index, stored_keys, m);
#ifndef KVCACHE_SRC_KEY_INDEX_UPKEEP_H_
#define KVCACHE_SRC_KEY_INDEX_UPKEEP_H_

#include <cstdint>

#include "src/cache_internal.h"

namespace kvcache::internal {

// True when stream `index` has a live index (Append must then hand it the stored keys).
bool HasKeyIndex(const Cache::Sequence& seq, int32_t index);
// Adds m stored keys ([m, head_dim]) to the stream's index; a key beyond the index's norm bound
// cannot be added exactly, so the index is dropped and the next retrieval decode rebuilds it.
void ExtendKeyIndex(Cache::Sequence& seq, int32_t index, const float* stored_keys, int32_t m);
// Apply rebuilt the stream: its index (over the old token indices) is dropped.
void DropKeyIndex(Cache::Sequence& seq, int32_t index);

}  // namespace kvcache::internal

#endif  // KVCACHE_SRC_KEY_INDEX_UPKEEP_H_
