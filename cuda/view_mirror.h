// cuda/view_mirror.h — ViewMirror: which page tables of decode views the CUDA backend already
// holds in device memory, and what a call must upload to bring them up to date (internal).
//
// kvcache keeps one page list per (sequence, layer, kv head) stream, so a decode view of batch 64
// x 8 kv heads x 32k context (16-token pages) holds 4 MiB of page ids per layer call. Uploading
// them every call costs ~130 MiB per 32-layer step; but a stream's version (src/stream_table.h)
// says when its page lists may have changed other than by growing (PagedKVView::stream_versions):
//   - within one version, Append only extends the stream: the last segment gets more pages, or a
//     new segment opens after it; the earlier segments are frozen;
//   - copy-on-write: appending into a shared (forked) tail page replaces the id of the segment's
//     last page in place, without a version change (the parent keeps its version after Fork).
// So for segment k of a stream of version v, mirrored with n pages whose last id was p, the
// current page list differs from the mirror only at index n - 1 (when that id is no longer p)
// and at indices >= n. Nothing else rewrites a page list in place: Apply replaces the segments
// and changes the version, Free drops the stream (its versions are never reused: the counter is
// process-wide), Fork gives the child fresh versions.
//
// The mirror is host bookkeeping over a region of device memory of capacity() bytes that the
// backend owns: Update() assigns each segment of a view a region (a bump allocation, with spare
// room for pages to come) and lists the int32 values to copy into it; the backend stages those
// values with the rest of the call's upload and scatters them with one kernel
// (LaunchMirrorCopies). Entries are keyed by (version, segment index); entries of dead versions
// are garbage until the region is full, when Reset() forgets every entry and the call mirrors
// what it needs from scratch (the backend may then grow the device region: docs/ARCHITECTURE.md).
//
// The key channel map of a segment is fixed within a version (segments opened by Append are
// full width) and uploaded once, with the segment's first pages.
//
// Thread safety: none (the backend's mutex guards it).
//
// Example (one call, inside the backend):
//   ViewMirror::Update u;
//   if (!mirror.Plan(kv, u)) { mirror.Reset(kv); grow the device region to mirror.capacity();
//                              mirror.Plan(kv, u); }
//   stage u.values; enqueue LaunchMirrorCopies(u.copies relocated); kernels read
//   segment s's page ids at device_region + u.segments[s].pages_at.
#ifndef KVCACHE_CUDA_VIEW_MIRROR_H_
#define KVCACHE_CUDA_VIEW_MIRROR_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "kvcache/paged_view.h"

#ifndef KVCACHE_CUDA_NAMESPACE
#define KVCACHE_CUDA_NAMESPACE cuda
#endif

namespace kvcache::KVCACHE_CUDA_NAMESPACE {

class ViewMirror {
 public:
  // Where segment s of the view lives in the mirror region (byte offsets, -1 = none).
  struct Region {
    int64_t pages_at = -1;         // [ceil(length / tokens_per_page)] page ids
    int64_t key_channels_at = -1;  // [key_width] or -1 (all channels)
  };
  // `count` values of Update::values starting at `value` go to byte offset `at` of the region.
  struct Copy {
    int32_t value = 0;
    int32_t count = 0;
    int64_t at = 0;
  };
  // One call's result. Reused across calls (its vectors keep their capacity).
  struct Update {
    std::vector<Region> segments;  // [number of segments of the view]
    std::vector<int32_t> values;   // what to upload
    std::vector<Copy> copies;      // where each run of values goes
    int64_t page_values = 0;       // page ids among `values` (the rest are key channel maps)
  };

  // `min_bytes`: the smallest region Reset() asks for (test hook: a small value makes resets
  // happen early).
  explicit ViewMirror(int64_t min_bytes) : min_bytes_(min_bytes) {}

  // Bytes of device memory the mirror may use (0 before the first Reset).
  int64_t capacity() const { return capacity_; }
  // Number of Reset() calls so far.
  int64_t resets() const { return resets_; }

  // Brings the bookkeeping up to date for `kv` (stream_versions must be set) and fills `u`.
  // Returns false, with the mirror in an unknown state, when the regions do not fit in
  // capacity(): call Reset(kv) and Plan again (which then succeeds).
  [[nodiscard]] bool Plan(const PagedKVView& kv, Update& u);
  // Forgets every entry and sets capacity() to fit what `kv` needs from scratch, with room for
  // the entries recently used: at least min_bytes, twice the bytes of the entries used in the
  // last half of the calls since the previous reset plus what `kv` needs, and never less than
  // before. The caller must make its device region at least capacity() bytes before the next
  // Plan.
  void Reset(const PagedKVView& kv);
  // Forgets every entry, keeping capacity(): after a failure between Plan and the enqueueing of
  // its copies (the device does not hold what the entries say).
  void Forget();
  // Forgets every entry and sets capacity() to 0: the device region could not be grown to
  // capacity() (the next Plan fails and the next Reset asks again).
  void Drop() {
    Forget();
    capacity_ = 0;
  }

 private:
  struct Entry {
    int64_t at = 0;               // region start (key channels first, then page ids)
    int64_t bytes = 0;            // region size
    int32_t page_capacity = 0;    // page ids the region holds
    int32_t mirrored_pages = 0;   // page ids on the device
    int32_t last_page = -1;       // id at mirrored_pages - 1 when mirrored
    int32_t key_width = 0;        // format, checked on every use
    int32_t tokens_per_page = 0;
    bool has_channels = false;
    uint64_t last_use = 0;        // calls_ when last used
  };
  struct KeyHash {
    size_t operator()(const std::pair<uint64_t, int32_t>& k) const {
      return absl::HashOf(k.first, k.second);
    }
  };

  // Bytes of a fresh region for segment s: its key channels and its pages plus spare room.
  static int64_t RegionBytes(const SegmentView& s, int32_t* page_capacity);

  const int64_t min_bytes_;
  int64_t capacity_ = 0;
  int64_t used_ = 0;
  uint64_t calls_ = 0;
  uint64_t reset_call_ = 0;  // calls_ at the last reset
  int64_t resets_ = 0;
  absl::flat_hash_map<std::pair<uint64_t, int32_t>, Entry, KeyHash> entries_;
};

// Test hooks, process-wide. The min_bytes of the mirror of every CUDA backend created from now
// on (default kDefaultViewMirrorBytes), or 0 to create backends without a mirror (every decode
// stages its whole view, as before the mirror existed: the tests' oracle).
inline constexpr int64_t kDefaultViewMirrorBytes = int64_t{1} << 20;
void SetViewMirrorBytesForTesting(int64_t min_bytes);
int64_t ViewMirrorBytesForTesting();
// Resets made by the mirrors of every backend so far.
int64_t ViewMirrorResetsForTesting();
void CountViewMirrorReset();

}  // namespace kvcache::KVCACHE_CUDA_NAMESPACE

#endif  // KVCACHE_CUDA_VIEW_MIRROR_H_
