#!/usr/bin/env bash
# ThreadSanitizer: builds the concurrency-related tests and the soak program with
# -fsanitize=thread in build/tsan (CUDA, benchmarks and examples off) and runs them.
# Debian's Abseil is not built with TSan; tests/tsan/absl_mutex_annotations.cc makes its Mutex
# visible to TSan. tests/tsan.supp holds the only suppression (hnswlib's internal lock order,
# harmless under kvcache's serial index inserts; justified there). Any other report fails the run
# (halt_on_error).
# Usage: scripts/tsan.sh [soak operations, default 100000]
set -euo pipefail
cd "$(dirname "$0")/.."
soak_ops=${1:-100000}
scripts/install_deps.sh
dir=build/tsan
jobs=${KVCACHE_JOBS:-$(nproc)}
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
launcher=()
if command -v ccache >/dev/null; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
fi
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVCACHE_WERROR=ON "${launcher[@]}" \
  -DKVCACHE_SANITIZE=thread -DKVCACHE_WITH_CUDA=OFF -DKVCACHE_BUILD_BENCHMARKS=OFF \
  -DKVCACHE_BUILD_EXAMPLES=OFF >/dev/null
tests=(test_cache_concurrency test_page_pool test_fault_injection)
cmake --build "$dir" -j"$jobs" --target "${tests[@]}" kvcache_soak
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:history_size=4:suppressions=$PWD/tests/tsan.supp"
regex=$(IFS='|'; echo "^(${tests[*]}):")
ctest --test-dir "$dir" -R "$regex" -j"$jobs" --output-on-failure
"$dir/tests/kvcache_soak" --threads=4 --ops="$soak_ops" --check_every=16
