// cuda/emulation/simt.h — the SIMT engine of the CUDA emulator (internal): runs a kernel's grid on
// the calling CPU thread, one block after another, each CUDA thread of a block as a fiber.
//
// A fiber runs until it reaches a synchronisation point: __syncthreads() (a round over the
// block's fibers) or a warp primitive such as __shfl_xor_sync (a round over the 32 fibers of its
// warp). A round completes once every live fiber of the block (or warp) has arrived at the same
// call site; then the exchange is done and the fibers run on. Fibers that reach different
// barriers, a warp where some lanes shuffle while others wait at __syncthreads, a shuffle whose
// mask is not the full warp, or a barrier some threads of the block have already left abort the
// process with a message naming the kernel, the block and every waiting thread's call site.
//
// Launches are serialised process-wide (one mutex): __shared__ arrays are function-local statics
// (cuda/emulation/cuda_emulation.h), one instance shared by the fibers of the running block.
//
// Example (what KVCACHE_LAUNCH expands to, roughly):
//   kvcache::cuda_emu::RunGrid({4, 1, 1}, {128, 1, 1}, "MyKernel",
//                              [](void* ctx) { /* one thread's kernel body */ }, &ctx);
#ifndef KVCACHE_CUDA_EMULATION_SIMT_H_
#define KVCACHE_CUDA_EMULATION_SIMT_H_

#include <cstdint>
#include <source_location>

namespace kvcache::cuda_emu {

// threadIdx / blockIdx / blockDim / gridDim of the running fiber.
struct Index3 {
  unsigned x = 1, y = 1, z = 1;
};

// The order in which the fibers of a block (and the blocks of a grid) are started and resumed
// within each scheduling round. kReverse runs the highest thread index first, so a read of
// shared or global memory that lacks its barrier sees a different, stale value than under
// kForward: tests run every case under both.
enum class ThreadOrder { kForward, kReverse };
void SetThreadOrder(ThreadOrder order);
ThreadOrder GetThreadOrder();

inline constexpr int kWarpSize = 32;
inline constexpr unsigned kMaxThreadsPerBlock = 1024;

// Status of RunGrid's configuration check (cuda_emulation.h maps it to cudaError_t).
enum class LaunchStatus { kOk, kInvalidConfiguration };

// Runs body(ctx) once per thread of every block of the grid; returns when the grid finished.
LaunchStatus RunGrid(Index3 grid, Index3 block, const char* kernel_name, void (*body)(void*),
                     void* ctx);

// Built-in variables of the running fiber (only valid inside RunGrid's body).
const Index3& CurrentThreadIdx();
const Index3& CurrentBlockIdx();
const Index3& CurrentBlockDim();
const Index3& CurrentGridDim();

// __syncthreads(): waits until every thread of the block has arrived at this call site.
void SyncThreads(std::source_location where);

enum class WarpOp { kShflIdx, kShflUp, kShflDown, kShflXor, kSyncWarp };
// A warp round: every lane of the calling fiber's warp arrives with (mask, bits, arg, width);
// returns the bits of the lane the op selects (see the __shfl_*_sync documentation).
uint64_t WarpExchange(WarpOp op, unsigned mask, uint64_t bits, int arg, int width,
                      std::source_location where);

// Aborts with `message` and the running kernel, block and thread (misuse of the CUDA API that a
// GPU would report as an error or undefined behaviour).
[[noreturn]] void Fail(const char* message);

}  // namespace kvcache::cuda_emu

#endif  // KVCACHE_CUDA_EMULATION_SIMT_H_
