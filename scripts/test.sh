#!/usr/bin/env bash
# Quick start 2: install what is missing, build everything with warnings as errors, run the
# whole test suite with CTest. Set KVCACHE_SANITIZE=address,undefined for a sanitizer build.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh --plots
jobs=$(nproc)
if [ -n "${KVCACHE_SANITIZE:-}" ]; then
  dir=build/sanitize
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVCACHE_WERROR=ON \
    -DKVCACHE_SANITIZE="$KVCACHE_SANITIZE" -DKVCACHE_BUILD_BENCHMARKS=OFF \
    -DKVCACHE_BUILD_EXAMPLES=OFF -DKVCACHE_WITH_CUDA=OFF >/dev/null
  cmake --build "$dir" -j"$jobs"
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
else
  dir=build/release
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DKVCACHE_WERROR=ON >/dev/null
  cmake --build "$dir" -j"$jobs"
fi
ctest --test-dir "$dir" -j"$jobs" --output-on-failure
