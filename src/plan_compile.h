// src/plan_compile.h — eviction-plan validation and compilation (internal to the Cache; pure).
//
// Cache::Apply turns an EvictionPlan into backend work in three steps, the first two of which
// live here and touch neither the pool nor the backend:
//   ValidatePlan   every index, channel and weight of the plan against the streams as they are;
//   CompilePlan    the new segments (row format, page count, side data) and, per new segment,
//                  the gather terms the backend runs (self term, then the merges of each slot);
//   (Cache)        allocate the pages, gather, commit through StreamTable::Replace.
// CheckStamp is the stale-plan check: a plan made from a snapshot is refused once a stream it
// names changed length (Append) or version (Apply).
//
// Example:
//   if (absl::Status s = ValidatePlan(config, plan, table); !s.ok()) return s;
//   CompiledPlan compiled = CompilePlan(config, page_bytes, plan, table);
//   // allocate compiled.total_pages, fill every fresh[i].segment.pages, run Gathers(...)
#ifndef KVCACHE_SRC_PLAN_COMPILE_H_
#define KVCACHE_SRC_PLAN_COMPILE_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "kvcache/backend.h"
#include "kvcache/cache.h"
#include "kvcache/config.h"
#include "kvcache/plan.h"
#include "src/stream_table.h"

namespace kvcache::internal {

// InvalidArgument / OutOfRange naming the first bad entry ("Apply: streams[p] (layer l,
// kv_head h): ...").
[[nodiscard]] absl::Status ValidatePlan(const CacheConfig& config, const EvictionPlan& plan,
                                        const StreamTable& table);

// FailedPrecondition naming the first stream of `plan` whose length or version differs from
// `stamp`; InvalidArgument when the stamp is of another sequence or shape.
[[nodiscard]] absl::Status CheckStamp(const EvictionPlan& plan, const StreamStamp& stamp,
                                      const StreamTable& table);

struct NewSegment {
  int32_t plan_index = 0;             // the StreamPlan it belongs to
  int32_t first_slot = 0, count = 0;  // kept slots [first_slot, first_slot + count)
  Segment segment;                    // format, side data, pages sized (ids not yet set)
};

struct CompiledPlan {
  std::vector<uint8_t> skip;                       // [plan streams] 1 = keeps the stream as is
  std::vector<NewSegment> fresh;                   // new segments in plan order
  int32_t total_pages = 0;                         // pages every new segment needs together
  std::vector<std::vector<SegmentView>> sources;   // [plan streams] views of the old segments
  std::vector<std::vector<int32_t>> term_offsets;  // [fresh][count + 1]
  std::vector<std::vector<GatherTerm>> terms;      // [fresh][term_offsets.back()]
};

// The plan (already validated) as new segments and gather terms. `table` is not changed; it is
// non-const only because kernel views carry writable score pointers.
CompiledPlan CompilePlan(const CacheConfig& config, int64_t page_bytes, const EvictionPlan& plan,
                         StreamTable& table);

// One RowGather per new segment (pages set), pointing into `compiled`.
std::vector<RowGather> Gathers(CompiledPlan& compiled, int32_t head_dim);

}  // namespace kvcache::internal

#endif  // KVCACHE_SRC_PLAN_COMPILE_H_
