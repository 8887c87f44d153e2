// ThreadSanitizer builds only: run oneTBB's parallel loops on the calling thread.
//
// libtbb.so is not built with TSan, so the hand-off of a parallel_for's work between TBB threads
// (its task queues) is invisible to TSan, and every kernel writing through a task would be
// reported as racing with the thread that started it: false positives with no suppression short
// of hiding our own kernels. Limiting TBB to one thread keeps TSan's reports meaningful for what
// these builds check: the Cache's thread-safety contract between the CALLER's threads (each
// still runs its kernels, serially). The CPU kernels' internal parallelism writes disjoint
// outputs and is checked by the fast-vs-reference equivalence tests instead (docs/RELIABILITY.md).
#include "oneapi/tbb/global_control.h"

namespace {

const oneapi::tbb::global_control kSerialTbb(oneapi::tbb::global_control::max_allowed_parallelism,
                                             1);

}  // namespace
