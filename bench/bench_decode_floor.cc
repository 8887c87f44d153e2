// Instruction-throughput probes behind the CPU decode's compute floor (docs/BENCHMARKS.md, "What
// is attainable"). A decode row at G query heads x D channels is 2 G D multiply-adds; whether a
// kernel can reach the memory roofline depends on what one core retires per cycle, and on this
// project's Zen-1 machine that is not the textbook figure: a 256-bit FMA is two 128-bit halves,
// and the f16 -> f32 conversion (vcvtph2ps) runs on the same pipes as the FMAs. These loops
// measure it directly, each on registers only (no memory traffic except the conversions' and
// broadcasts' L1-resident sources), one thread:
//
//   BM_ClockChain        a serial chain of 1-cycle integer adds: counter ghz = the core clock
//   BM_Fma               8 independent 256-bit FMAs per iteration
//   BM_FmaCvtph          the same 8 FMAs + 4 vcvtph2ps (8 halves -> 8 floats each), as the f16
//                        decode interleaves them (one conversion per 2 FMAs of the logit tile)
//   BM_FmaBf16Widen      8 FMAs + 4 bf16 widenings (vpmovzxwd + vpslld), the bf16 path's
//   BM_FmaBroadcast      8 FMAs + 4 vbroadcastss from memory, the value pass's probabilities
//
// Counter `ns` = nanoseconds per iteration (process CPU time); cycles = ns x ghz. The FMA-only
// loop gives the cycles 8 FMAs take; each other loop's excess over it is what its 4 extra
// instructions cost the FMA pipes. x86-64 with AVX2/FMA/F16C only (skipped elsewhere).
//
// Example: ./bench/bench_decode_floor --benchmark_repetitions=5 --benchmark_report_aggregates_only

#include <benchmark/benchmark.h>

#include <cstdint>

namespace {

#if defined(__x86_64__) && defined(__GNUC__)

constexpr int64_t kInner = 1000;  // iterations of the asm body per benchmark iteration

bool HaveAvx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

void SetNs(benchmark::State& state) {
  state.counters["ns"] = benchmark::Counter(
      static_cast<double>(state.iterations() * kInner) * 1e-9,
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}

#define KVC_FMA8                                   \
  "vfmadd231ps %%ymm14, %%ymm15, %%ymm4\n\t"       \
  "vfmadd231ps %%ymm14, %%ymm15, %%ymm5\n\t"       \
  "vfmadd231ps %%ymm14, %%ymm15, %%ymm6\n\t"       \
  "vfmadd231ps %%ymm14, %%ymm15, %%ymm7\n\t"       \
  "vfmadd231ps %%ymm14, %%ymm15, %%ymm8\n\t"       \
  "vfmadd231ps %%ymm14, %%ymm15, %%ymm9\n\t"       \
  "vfmadd231ps %%ymm14, %%ymm15, %%ymm10\n\t"      \
  "vfmadd231ps %%ymm14, %%ymm15, %%ymm11\n\t"

#define KVC_CLOBBERS                                                                      \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", \
      "xmm11"

// Runs `body` kInner times per benchmark iteration; `src` is 64 bytes of L1-resident input.
#define KVC_PROBE(name, body)                                                      \
  __attribute__((target("avx2,fma,f16c"))) void name(benchmark::State& state) {    \
    if (!HaveAvx2()) {                                                             \
      state.SkipWithError("needs AVX2, FMA and F16C");                             \
      return;                                                                      \
    }                                                                              \
    alignas(64) static uint16_t src[32] = {};                                      \
    __asm__ volatile("vxorps %%ymm14, %%ymm14, %%ymm14\n\t"                        \
                     "vxorps %%ymm15, %%ymm15, %%ymm15" ::: "xmm14", "xmm15");     \
    for (auto _ : state) {                                                         \
      for (int64_t i = 0; i < kInner; ++i) {                                       \
        __asm__ volatile(body : : "r"(src) : KVC_CLOBBERS, "memory");              \
      }                                                                            \
    }                                                                              \
    SetNs(state);                                                                  \
  }

KVC_PROBE(BM_Fma, KVC_FMA8)
KVC_PROBE(BM_FmaCvtph, KVC_FMA8
          "vcvtph2ps (%0), %%ymm0\n\t"
          "vcvtph2ps 16(%0), %%ymm1\n\t"
          "vcvtph2ps 32(%0), %%ymm2\n\t"
          "vcvtph2ps 48(%0), %%ymm3\n\t")
KVC_PROBE(BM_FmaBf16Widen, KVC_FMA8
          "vpmovzxwd (%0), %%ymm0\n\t"
          "vpmovzxwd 16(%0), %%ymm1\n\t"
          "vpmovzxwd 32(%0), %%ymm2\n\t"
          "vpmovzxwd 48(%0), %%ymm3\n\t"
          "vpslld $16, %%ymm0, %%ymm0\n\t"
          "vpslld $16, %%ymm1, %%ymm1\n\t"
          "vpslld $16, %%ymm2, %%ymm2\n\t"
          "vpslld $16, %%ymm3, %%ymm3\n\t")
KVC_PROBE(BM_FmaBroadcast, KVC_FMA8
          "vbroadcastss (%0), %%ymm0\n\t"
          "vbroadcastss 4(%0), %%ymm1\n\t"
          "vbroadcastss 8(%0), %%ymm2\n\t"
          "vbroadcastss 12(%0), %%ymm3\n\t")

// 64 dependent 1-cycle adds per inner iteration: counter ghz = adds per ns.
void BM_ClockChain(benchmark::State& state) {
  uint64_t x = 0;
  for (auto _ : state) {
    for (int64_t i = 0; i < kInner; ++i) {
      __asm__ volatile(
          ".rept 64\n\t"
          "add $1, %0\n\t"
          ".endr"
          : "+r"(x));
    }
  }
  benchmark::DoNotOptimize(x);
  state.counters["ghz"] = benchmark::Counter(
      static_cast<double>(state.iterations() * kInner * 64) * 1e-9, benchmark::Counter::kIsRate);
}

BENCHMARK(BM_ClockChain)->MeasureProcessCPUTime();
BENCHMARK(BM_Fma)->MeasureProcessCPUTime();
BENCHMARK(BM_FmaCvtph)->MeasureProcessCPUTime();
BENCHMARK(BM_FmaBf16Widen)->MeasureProcessCPUTime();
BENCHMARK(BM_FmaBroadcast)->MeasureProcessCPUTime();

#endif  // x86-64

}  // namespace

BENCHMARK_MAIN();
