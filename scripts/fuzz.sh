#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, ASan + UBSan + libFuzzer, CUDA/tests/benchmarks off) in
# build/fuzz and runs each for a bounded time, starting from its seed corpus in fuzz/corpus/<name>.
# Fails on any finding (crash, sanitizer report, leak, timeout, out-of-memory); prints the
# executions per target. Usage: scripts/fuzz.sh [seconds per target, default 30]
# Findings are written to build/fuzz/findings/<name>/ (crash-*, leak-*, timeout-*); reproduce with
#   build/fuzz/fuzz/<name> build/fuzz/findings/<name>/crash-...
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
scripts/install_deps.sh --extra clang libclang-rt-14-dev   # clang 14 + libFuzzer (Debian 12)
dir=build/fuzz
jobs=${KVCACHE_JOBS:-$(nproc)}
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
fi
cc=${KVCACHE_FUZZ_CC:-clang}
cxx=${KVCACHE_FUZZ_CXX:-clang++}
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVCACHE_WERROR=ON \
  -DCMAKE_C_COMPILER="$cc" -DCMAKE_CXX_COMPILER="$cxx" "${launcher[@]}" \
  -DKVCACHE_FUZZ=ON -DKVCACHE_SANITIZE=address,undefined -DKVCACHE_WITH_CUDA=OFF \
  -DKVCACHE_BUILD_TESTS=OFF -DKVCACHE_BUILD_BENCHMARKS=OFF -DKVCACHE_BUILD_EXAMPLES=OFF >/dev/null
mapfile -t targets < <(grep -v '^$' "$dir/fuzz/fuzzers.txt")
cmake --build "$dir" -j"$jobs" --target "${targets[@]}"

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:symbolize=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
status=0
summary=()
for t in "${targets[@]}"; do
  seeds=fuzz/corpus/$t
  work=$dir/corpus/$t          # grows across runs; the seeds in the repository stay untouched
  findings=$dir/findings/$t
  mkdir -p "$work" "$findings"
  log=$dir/$t.log
  echo "== $t: ${seconds}s"
  # -rss_limit_mb: far above what one input needs, below what the 2-core CI box has.
  if "$dir/fuzz/$t" "$work" "$seeds" -max_total_time="$seconds" -timeout=20 \
      -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 \
      -artifact_prefix="$findings/" >"$log" 2>&1; then
    result=ok
  else
    result=FAILED
    status=1
    tail -n 60 "$log"
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  summary+=("$t: $result, ${execs:-?} executions in ${seconds}s")
done
echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
exit $status
