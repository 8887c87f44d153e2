// The SIMT engine of the CUDA emulator: fibers, scheduling rounds and their checks.
//
// Context switches: on x86-64 a fiber switch is a few instructions of assembly (callee-saved
// registers and the stack pointer; the floating-point control state is left alone, as nothing
// in a kernel changes it); swapcontext() would add a sigprocmask system call per switch (about
// 1 us here, measured), and a decode step switches millions of times. Other architectures use
// ucontext (makecontext/swapcontext) throughout.
//
// AddressSanitizer is told about every switch (__sanitizer_start_switch_fiber /
// __sanitizer_finish_switch_fiber), so it checks fiber stacks like thread stacks and its
// no-return and stack-bound logic sees the right stack.
#include "cuda/emulation/simt.h"

#include <pthread.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define KVCACHE_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KVCACHE_EMU_ASAN 1
#endif
#endif
#if KVCACHE_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if defined(__x86_64__)
#define KVCACHE_EMU_ASM_SWITCH 1
// kvcache_emu_switch(save, load): pushes the callee-saved registers, stores the stack pointer in
// *save, loads `load` as the stack pointer and pops the registers saved there.
extern "C" void kvcache_emu_switch(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .globl kvcache_emu_switch
  .hidden kvcache_emu_switch
  .type kvcache_emu_switch, @function
kvcache_emu_switch:
  .cfi_startproc
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size kvcache_emu_switch, .-kvcache_emu_switch
)");
#endif

namespace kvcache::cuda_emu {
namespace {

// Fiber stacks: generous because sanitizer builds grow frames (redzones); only touched pages
// become resident. One guard page below each stack turns an overflow into a fault.
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;

enum class State { kRunnable, kAtBarrier, kAtWarp, kDone };

struct Fiber {
  State state = State::kRunnable;
  Index3 thread_idx;
  int linear = 0;
  // Where the fiber waits (kAtBarrier / kAtWarp).
  std::source_location where;
  WarpOp op = WarpOp::kSyncWarp;
  unsigned mask = 0;
  uint64_t bits = 0;
  int arg = 0;
  int width = kWarpSize;
  uint64_t result = 0;
  // Context.
  char* stack = nullptr;  // lowest usable address
#if KVCACHE_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
  void* asan_fake_stack = nullptr;
};

struct Engine {
  std::mutex launch_mu;  // one grid at a time, process-wide (statics back __shared__)
  std::atomic<ThreadOrder> order{ThreadOrder::kForward};
  // State of the running grid; only touched by the thread holding launch_mu.
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  size_t stacks_count = 0;
  Fiber* current = nullptr;
  const char* kernel = nullptr;
  Index3 grid, block, block_idx;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
#if KVCACHE_EMU_ASM_SWITCH
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_context;
#endif
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;  // the launching thread's stack (for ASan)
  size_t scheduler_stack_size = 0;
  // The running block's pass: position in the thread order, and what the fibers reached.
  bool reverse = false;
  int cursor = -1;
  int num_done = 0;
  int num_at_barrier = 0;
  int warp_arrived[kMaxThreadsPerBlock / kWarpSize] = {};
};

// Constant-initialised (no guard on the hot path); never used before main or after exit.
constinit Engine g_engine;
Engine& GetEngine() { return g_engine; }

std::string Where(const std::source_location& w) {
  const char* file = w.file_name();
  // Shorten absolute paths to the repository-relative part.
  if (const char* cuda = std::strstr(file, "/cuda/")) file = cuda + 1;
  return std::string(file) + ":" + std::to_string(w.line()) + ":" + std::to_string(w.column());
}

const char* OpName(State state, WarpOp op) {
  if (state == State::kAtBarrier) return "__syncthreads()";
  if (state == State::kDone) return "the kernel's end (exited)";
  if (state == State::kRunnable) return "running";
  switch (op) {
    case WarpOp::kShflIdx:
      return "__shfl_sync()";
    case WarpOp::kShflUp:
      return "__shfl_up_sync()";
    case WarpOp::kShflDown:
      return "__shfl_down_sync()";
    case WarpOp::kShflXor:
      return "__shfl_xor_sync()";
    case WarpOp::kSyncWarp:
      return "__syncwarp()";
  }
  return "?";
}

std::string BlockName(const Engine& e) {
  return std::string(e.kernel) + " block (" + std::to_string(e.block_idx.x) + "," +
         std::to_string(e.block_idx.y) + "," + std::to_string(e.block_idx.z) + ")";
}

// Every thread's state, consecutive threads with the same state and call site in one line.
std::string DescribeThreads(const Engine& e, int first, int last) {
  std::string out;
  int i = first;
  while (i < last) {
    const Fiber& f = e.fibers[static_cast<size_t>(i)];
    std::string what = OpName(f.state, f.op);
    if (f.state == State::kAtBarrier || f.state == State::kAtWarp) what += " at " + Where(f.where);
    int j = i + 1;
    while (j < last) {
      const Fiber& g = e.fibers[static_cast<size_t>(j)];
      std::string other = OpName(g.state, g.op);
      if (g.state == State::kAtBarrier || g.state == State::kAtWarp) {
        other += " at " + Where(g.where);
      }
      if (other != what) break;
      ++j;
    }
    out += "    threads " + std::to_string(i) + "-" + std::to_string(j - 1) + ": " + what + "\n";
    i = j;
  }
  return out;
}

[[noreturn]] void Abort(const std::string& message) {
  std::fprintf(stderr, "kvcache CUDA emulator: %s\n", message.c_str());
  std::fflush(stderr);
  std::abort();
}

// ---- Context switches ---------------------------------------------------------------------------

void StartSwitch(void** fake_stack_save, const void* bottom, size_t size) {
#if KVCACHE_EMU_ASAN
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
  (void)fake_stack_save, (void)bottom, (void)size;
#endif
}
void FinishSwitch(void* fake_stack_save, const void** bottom_old, size_t* size_old) {
#if KVCACHE_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack_save, bottom_old, size_old);
#else
  (void)fake_stack_save, (void)bottom_old, (void)size_old;
#endif
}

void FiberMain();

#if KVCACHE_EMU_ASM_SWITCH
void InitContext(Fiber& f) {
  // Top of stack, 16-byte aligned: [top - 8] a zero "return address" of FiberMain, [top - 16]
  // FiberMain itself (kvcache_emu_switch's ret jumps there), below it rbp, rbx, r12-r15 that
  // kvcache_emu_switch pops. The top is staggered by 192 bytes per thread: stacks a power of
  // two apart would put every fiber's hot frames in the same L1 cache sets.
  auto* top = reinterpret_cast<uint64_t*>(f.stack + kStackBytes - (f.linear * 192) % 4096);
  top[-1] = 0;
  top[-2] = reinterpret_cast<uint64_t>(&FiberMain);
  for (int r = 3; r <= 8; ++r) top[-r] = 0;  // rbp, rbx, r12, r13, r14, r15
  f.sp = top - 8;
}
#else
void InitContext(Fiber& f) {
  if (getcontext(&f.context) != 0) Abort("getcontext failed");
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, &FiberMain, 0);
}
#endif

// The next fiber of the current pass that may run (in the block's thread order), or nullptr at
// the end of the pass.
Fiber* NextRunnable(Engine& e) {
  const int n = static_cast<int>(e.block.x * e.block.y * e.block.z);
  while (++e.cursor < n) {
    Fiber& f = e.fibers[static_cast<size_t>(e.reverse ? n - 1 - e.cursor : e.cursor)];
    if (f.state == State::kRunnable) return &f;
  }
  return nullptr;
}

// Scheduler -> the pass's first runnable fiber. Fibers hand over to the next runnable fiber
// directly (half the switches of going through the scheduler); the last one of the pass
// returns here. False when no fiber could run.
bool RunPass(Engine& e) {
  e.cursor = -1;
  Fiber* first = NextRunnable(e);
  if (first == nullptr) return false;
  e.current = first;
  StartSwitch(&e.scheduler_fake_stack, first->stack, kStackBytes);
#if KVCACHE_EMU_ASM_SWITCH
  kvcache_emu_switch(&e.scheduler_sp, first->sp);
#else
  swapcontext(&e.scheduler_context, &first->context);
#endif
  FinishSwitch(e.scheduler_fake_stack, nullptr, nullptr);
  e.current = nullptr;
  return true;
}

// Fiber f (blocked or finished) -> the next runnable fiber of the pass, or the scheduler;
// returns when f is resumed.
void Yield(Engine& e, Fiber& f) {
  Fiber* next = NextRunnable(e);
  void** fake_stack = f.state == State::kDone ? nullptr : &f.asan_fake_stack;
  if (next != nullptr) {
    e.current = next;
    StartSwitch(fake_stack, next->stack, kStackBytes);
#if KVCACHE_EMU_ASM_SWITCH
    kvcache_emu_switch(&f.sp, next->sp);
#else
    swapcontext(&f.context, &next->context);
#endif
  } else {
    e.current = nullptr;
    StartSwitch(fake_stack, e.scheduler_stack_bottom, e.scheduler_stack_size);
#if KVCACHE_EMU_ASM_SWITCH
    kvcache_emu_switch(&f.sp, e.scheduler_sp);
#else
    swapcontext(&f.context, &e.scheduler_context);
#endif
  }
  FinishSwitch(f.asan_fake_stack, nullptr, nullptr);
}

void FiberMain() {
  Engine& e = GetEngine();
  FinishSwitch(nullptr, nullptr, nullptr);
  e.body(e.ctx);
  Fiber& f = *e.current;
  f.state = State::kDone;
  ++e.num_done;
  Yield(e, f);
  Abort("a finished fiber was resumed");
}

void EnsureStacks(Engine& e, size_t count) {
  if (e.stacks_count >= count) return;
  if (e.stacks != nullptr) munmap(e.stacks, e.stacks_count * (kStackBytes + kGuardBytes));
  const size_t bytes = count * (kStackBytes + kGuardBytes);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) Abort("cannot map fiber stacks");
  e.stacks = static_cast<char*>(p);
  e.stacks_count = count;
  for (size_t i = 0; i < count; ++i) {
    mprotect(e.stacks + i * (kStackBytes + kGuardBytes), kGuardBytes, PROT_NONE);
  }
}

// ---- Rounds -------------------------------------------------------------------------------------

bool SameSite(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

// The lane a warp op reads for `lane` (itself when the source lies outside its segment).
int SourceLane(const Fiber& f, int lane) {
  const int width = f.width;
  const int base = lane & ~(width - 1);
  switch (f.op) {
    case WarpOp::kShflIdx:
      return base + (f.arg & (width - 1));
    case WarpOp::kShflUp:
      return lane - base - f.arg >= 0 ? lane - f.arg : lane;
    case WarpOp::kShflDown:
      return lane - base + f.arg < width ? lane + f.arg : lane;
    case WarpOp::kShflXor: {
      const int src = lane ^ f.arg;
      return src < base + width ? src : lane;
    }
    case WarpOp::kSyncWarp:
      return lane;
  }
  return lane;
}

// Completes the warp round of warp w if all its lanes arrived; true when it did.
bool TryReleaseWarp(Engine& e, int w, int num_threads) {
  const int first = w * kWarpSize;
  const int last = std::min(first + kWarpSize, num_threads);
  for (int i = first; i < last; ++i) {
    if (e.fibers[static_cast<size_t>(i)].state != State::kAtWarp) return false;
  }
  const Fiber& lead = e.fibers[static_cast<size_t>(first)];
  for (int i = first; i < last; ++i) {
    const Fiber& f = e.fibers[static_cast<size_t>(i)];
    if (f.op != lead.op || !SameSite(f.where, lead.where)) {
      Abort("warp divergence in " + BlockName(e) + ": the lanes of warp " + std::to_string(w) +
            " reached different warp primitives:\n" + DescribeThreads(e, first, last));
    }
    if (f.mask != 0xFFFFFFFFu || last - first != kWarpSize) {
      char mask[16];
      std::snprintf(mask, sizeof(mask), "0x%08x", f.mask);
      Abort(std::string("partial warp masks are not supported by the emulator: ") +
            OpName(f.state, f.op) + " at " + Where(f.where) + " with mask " + mask + " in " +
            BlockName(e) + " (warp " + std::to_string(w) + " has " +
            std::to_string(last - first) + " threads)");
    }
    if (f.width <= 0 || f.width > kWarpSize || (f.width & (f.width - 1)) != 0) {
      Abort(std::string(OpName(f.state, f.op)) + " at " + Where(f.where) + ": width " +
            std::to_string(f.width) + " is not a power of two <= 32");
    }
  }
  for (int i = first; i < last; ++i) {
    Fiber& f = e.fibers[static_cast<size_t>(i)];
    f.result = e.fibers[static_cast<size_t>(first + SourceLane(f, i - first))].bits;
  }
  for (int i = first; i < last; ++i) e.fibers[static_cast<size_t>(i)].state = State::kRunnable;
  e.warp_arrived[w] = 0;
  return true;
}

// Completes the block barrier if every thread arrived; true when it did.
bool TryReleaseBarrier(Engine& e, int num_threads) {
  int at_barrier = 0, done = 0;
  for (int i = 0; i < num_threads; ++i) {
    const State s = e.fibers[static_cast<size_t>(i)].state;
    if (s == State::kAtBarrier) ++at_barrier;
    if (s == State::kDone) ++done;
  }
  if (at_barrier == 0) return false;
  if (at_barrier + done < num_threads) return false;  // others still on the way (or diverged)
  const Fiber* lead = nullptr;
  for (int i = 0; i < num_threads; ++i) {
    const Fiber& f = e.fibers[static_cast<size_t>(i)];
    if (f.state != State::kAtBarrier) continue;
    if (lead == nullptr) lead = &f;
    if (!SameSite(f.where, lead->where)) {
      Abort("barrier divergence in " + BlockName(e) +
            ": threads reached different __syncthreads() calls:\n" +
            DescribeThreads(e, 0, num_threads));
    }
  }
  if (done > 0) {
    Abort("barrier divergence in " + BlockName(e) +
          ": some threads exited while others wait at __syncthreads():\n" +
          DescribeThreads(e, 0, num_threads));
  }
  for (int i = 0; i < num_threads; ++i) e.fibers[static_cast<size_t>(i)].state = State::kRunnable;
  e.num_at_barrier = 0;
  return true;
}

void RunBlock(Engine& e, int num_threads) {
  for (int i = 0; i < num_threads; ++i) {
    Fiber& f = e.fibers[static_cast<size_t>(i)];
    f.state = State::kRunnable;
    f.asan_fake_stack = nullptr;
    f.stack = e.stacks + static_cast<size_t>(i) * (kStackBytes + kGuardBytes) + kGuardBytes;
#if KVCACHE_EMU_ASAN
    // A finished fiber's outermost frames never returned; drop their redzones before reuse.
    ASAN_UNPOISON_MEMORY_REGION(f.stack, kStackBytes);
#endif
    InitContext(f);
  }
  const int num_warps = (num_threads + kWarpSize - 1) / kWarpSize;
  e.num_done = 0;
  e.num_at_barrier = 0;
  for (int w = 0; w < num_warps; ++w) e.warp_arrived[w] = 0;
  for (;;) {
    const bool ran = RunPass(e);
    if (e.num_done == num_threads) return;
    bool released = false;
    for (int w = 0; w < num_warps; ++w) {
      const int lanes = std::min(kWarpSize, num_threads - w * kWarpSize);
      if (e.warp_arrived[w] == lanes) released |= TryReleaseWarp(e, w, num_threads);
    }
    if (e.num_at_barrier > 0 && e.num_at_barrier + e.num_done == num_threads) {
      released |= TryReleaseBarrier(e, num_threads);
    }
    if (!released && !ran) {
      Abort("deadlock (divergence) in " + BlockName(e) +
            ": no barrier or warp round can complete:\n" + DescribeThreads(e, 0, num_threads));
    }
  }
}

}  // namespace

void SetThreadOrder(ThreadOrder order) { GetEngine().order.store(order); }
ThreadOrder GetThreadOrder() { return GetEngine().order.load(); }

LaunchStatus RunGrid(Index3 grid, Index3 block, const char* kernel_name, void (*body)(void*),
                     void* ctx) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.z > 64 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535) {
    return LaunchStatus::kInvalidConfiguration;
  }
  Engine& e = GetEngine();
  if (e.current != nullptr) Abort("a kernel launched another kernel (not supported)");
  std::lock_guard<std::mutex> lock(e.launch_mu);
  const int n = static_cast<int>(threads);
  EnsureStacks(e, static_cast<size_t>(n));
  e.fibers.resize(static_cast<size_t>(n));
  e.kernel = kernel_name;
  e.grid = grid;
  e.block = block;
  e.body = body;
  e.ctx = ctx;
  for (int i = 0; i < n; ++i) {
    Fiber& f = e.fibers[static_cast<size_t>(i)];
    f.linear = i;
    f.thread_idx.x = static_cast<unsigned>(i) % block.x;
    f.thread_idx.y = static_cast<unsigned>(i) / block.x % block.y;
    f.thread_idx.z = static_cast<unsigned>(i) / (block.x * block.y);
  }
  const bool reverse = e.order.load() == ThreadOrder::kReverse;
  e.reverse = reverse;
#if KVCACHE_EMU_ASAN
  {
    // The launching thread's stack, which ASan must be told about when a fiber switches back.
    thread_local void* bottom = nullptr;
    thread_local size_t size = 0;
    if (bottom == nullptr) {
      pthread_attr_t attr;
      if (pthread_getattr_np(pthread_self(), &attr) == 0) {
        pthread_attr_getstack(&attr, &bottom, &size);
        pthread_attr_destroy(&attr);
      }
    }
    e.scheduler_stack_bottom = bottom;
    e.scheduler_stack_size = size;
  }
#endif
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  for (uint64_t k = 0; k < blocks; ++k) {
    const uint64_t b = reverse ? blocks - 1 - k : k;
    e.block_idx.x = static_cast<unsigned>(b % grid.x);
    e.block_idx.y = static_cast<unsigned>(b / grid.x % grid.y);
    e.block_idx.z = static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y));
    RunBlock(e, n);
  }
  e.kernel = nullptr;
  return LaunchStatus::kOk;
}

const Index3& CurrentThreadIdx() {
  Engine& e = GetEngine();
  if (e.current == nullptr) Fail("threadIdx read outside a kernel");
  return e.current->thread_idx;
}
const Index3& CurrentBlockIdx() { return GetEngine().block_idx; }
const Index3& CurrentBlockDim() { return GetEngine().block; }
const Index3& CurrentGridDim() { return GetEngine().grid; }

void SyncThreads(std::source_location where) {
  Engine& e = GetEngine();
  Fiber* f = e.current;
  if (f == nullptr) Fail("__syncthreads() outside a kernel");
  f->state = State::kAtBarrier;
  f->where = where;
  ++e.num_at_barrier;
  Yield(e, *f);
}

uint64_t WarpExchange(WarpOp op, unsigned mask, uint64_t bits, int arg, int width,
                      std::source_location where) {
  Engine& e = GetEngine();
  Fiber* f = e.current;
  if (f == nullptr) Fail("warp primitive outside a kernel");
  f->state = State::kAtWarp;
  f->op = op;
  f->mask = mask;
  f->bits = bits;
  f->arg = arg;
  f->width = width;
  f->where = where;
  ++e.warp_arrived[f->linear / kWarpSize];
  Yield(e, *f);
  return f->result;
}

void Fail(const char* message) {
  Engine& e = GetEngine();
  if (e.kernel == nullptr || e.current == nullptr) Abort(message);
  Abort(std::string(message) + " in " + BlockName(e) + ", thread " +
        std::to_string(e.current->linear));
}

}  // namespace kvcache::cuda_emu
