#!/usr/bin/env bash
# Quick start 2: install what is missing, build everything with warnings as errors, run the
# whole test suite with CTest (the Release build also builds the Python package and runs its
# pytest suite in a venv from scripts/python_env.sh). Set KVCACHE_SANITIZE=address,undefined for
# a sanitizer build.
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
  # The Python package and its pytest suite (CTest test python_tests) run in this stage only:
  # the sanitizer stage would need libasan preloaded into an uninstrumented CPython and torch
  # (docs/RELIABILITY.md). python_env.sh creates the pinned venv once, outside the clone.
  venv=$(scripts/python_env.sh)
  dir=build/release
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DKVCACHE_WERROR=ON \
    -DKVCACHE_BUILD_PYTHON=ON -DPython_EXECUTABLE="$venv/bin/python" >/dev/null
  cmake --build "$dir" -j"$jobs"
fi
ctest --test-dir "$dir" -j"$jobs" --output-on-failure
