#!/usr/bin/env bash
# GPU check: the one script to run whenever a machine with an NVIDIA GPU is at hand (written for
# an H200, sm_90, 16 cores; budget 8 minutes). It
#   1. installs the Debian packages of scripts/install_deps.sh that are missing (apt), or, where
#      the machine cannot fetch, unpacks the .deb files of $KVCACHE_GPU_DEBS (default .gpu-debs/,
#      made on a networked machine with `scripts/gpu_check.sh --fetch-debs .gpu-debs`);
#   2. builds the native CUDA backend (-DCMAKE_CUDA_ARCHITECTURES=90, emulation off) and only the
#      targets it runs: test_cuda_backend, test_cuda_device_tensors, test_cuda_view_mirror,
#      test_cuda_step and bench_cuda_attention;
#   3. runs every [cuda] test case on the device (the four test binaries: the backend against
#      cpu-reference, device-tensor decode / device K/V Append / caller streams, the view
#      mirror against full staging, step reservations and capturable plans; the graph-replay
#      cases run on the emulator only);
#   4. runs compute-sanitizer memcheck, racecheck and synccheck over the CUDA test binary (with
#      KVCACHE_CUDA_TEST_SHORT=1: the emulator's shorter streams, so each tool fits its slot);
#   5. runs bench_cuda_attention (decode vs a device-to-device copy of the same bytes, pages of 16
#      vs 64 tokens, 10% kept vs full) and bench/sdpa_compare.py when torch is importable;
#   6. writes OUT_DIR/gpu_check_summary.md: machine, pass/fail counts, sanitizer findings,
#      benchmark table, and each step's status and time. Logs go next to it.
# A failing step is recorded in the summary and the next steps still run; the exit status is 0
# only when every step passed.
#
# Usage: scripts/gpu_check.sh OUT_DIR
#        scripts/gpu_check.sh --fetch-debs DIR   (on a machine with apt access: download the
#                                                 packages for step 1 into DIR)
# Knobs: KVCACHE_GPU_CHECK_BUDGET_S (default 470: whole-run deadline in seconds),
#        KVCACHE_CUDA_ARCH (default 90), KVCACHE_JOBS (default nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

packages=(libabsl-dev libtbb-dev catch2 libbenchmark-dev)
if [ "${1:-}" = "--fetch-debs" ]; then
  dir=${2:?usage: scripts/gpu_check.sh --fetch-debs DIR}
  mkdir -p "$dir"
  # The -dev packages and the shared libraries they link against (Debian 12 names).
  (cd "$dir" && apt-get download "${packages[@]}" libabsl20220623 libtbb12 libtbbmalloc2 \
    libtbbbind-2-5 libbenchmark1debian)
  ls -l "$dir"
  exit 0
fi

out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
summary=$out/gpu_check_summary.md
start=$(date +%s)
deadline=$((start + ${KVCACHE_GPU_CHECK_BUDGET_S:-470}))
arch=${KVCACHE_CUDA_ARCH:-90}
jobs=${KVCACHE_JOBS:-$(nproc)}
build=build/gpu-check
export PATH=$PATH:/usr/local/cuda/bin

steps=()    # "name|status|seconds" per step
failed=0

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with a timeout of min(CAP, time left - 20 s),
# its output in $out/NAME.log; records the status instead of exiting.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((deadline - $(date +%s) - 20))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -le 5 ]; then
    steps+=("$name|not run: budget spent|0")
    failed=1
    return 0
  fi
  local t0 rc status
  t0=$(date +%s)
  set +e
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  set -e
  case $rc in
    0) status=passed ;;
    124 | 137) status="timed out after ${limit} s"; failed=1 ;;
    *) status="failed (exit $rc)"; failed=1 ;;
  esac
  steps+=("$name|$status|$(($(date +%s) - t0))")
  echo "gpu_check: $name: $status" >&2
  return 0
}

# ---- 1. dependencies ----------------------------------------------------------------------------
# apt first; else the carried .deb files, unpacked (not installed) into /tmp/kvcache-gpu-deps.
install_deps='
  scripts/install_deps.sh --extra $KVCACHE_GPU_PACKAGES && exit 0
  debs=${KVCACHE_GPU_DEBS:-$PWD/.gpu-debs}
  ls "$debs"/*.deb >/dev/null 2>&1 || { echo "apt failed and $debs holds no .deb files"; exit 1; }
  mkdir -p /tmp/kvcache-gpu-deps
  for d in "$debs"/*.deb; do dpkg -x "$d" /tmp/kvcache-gpu-deps || exit 1; done
  echo "unpacked $(ls "$debs"/*.deb | wc -l) packages into /tmp/kvcache-gpu-deps"'
export KVCACHE_GPU_PACKAGES="${packages[*]}"
step deps 120 bash -c "$install_deps"
prefix_path=""
if [ -d /tmp/kvcache-gpu-deps/usr ]; then
  prefix_path=/tmp/kvcache-gpu-deps/usr
  export LD_LIBRARY_PATH=/tmp/kvcache-gpu-deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
fi

# ---- 2. build -----------------------------------------------------------------------------------
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache
  -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
step configure 90 cmake -S . -B "$build" "${generator[@]}" "${launcher[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DKVCACHE_WITH_CUDA=ON -DKVCACHE_CUDA_EMULATED=OFF \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" -DCMAKE_PREFIX_PATH="$prefix_path" \
  -DKVCACHE_BUILD_TOOLS=OFF -DKVCACHE_BUILD_EXAMPLES=OFF -DKVCACHE_BUILD_C_API=OFF \
  -DKVCACHE_INSTALL_TEST=OFF
step build 300 cmake --build "$build" -j"$jobs" --target test_cuda_backend \
  test_cuda_device_tensors test_cuda_view_mirror test_cuda_step bench_cuda_attention
test_bin=$build/tests/test_cuda_backend
bench_bin=$build/bench/bench_cuda_attention

# ---- 3. tests -----------------------------------------------------------------------------------
if [ -x "$test_bin" ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi -L >"$out/device.log" 2>&1 || true
  # One process for all cases: the reporter's totals are the pass/fail counts.
  step tests 150 "$test_bin" "[cuda]" --reporter compact
  for pair in device-tensors:test_cuda_device_tensors view-mirror:test_cuda_view_mirror \
    step:test_cuda_step; do
    bin=$build/tests/${pair#*:}
    if [ -x "$bin" ]; then
      step "tests-${pair%%:*}" 60 "$bin" "[cuda]" --reporter compact
    else
      steps+=("tests-${pair%%:*}|not run: no test binary (build failed)|0")
      failed=1
    fi
  done
else
  steps+=("tests|not run: no test binary (build failed)|0")
  failed=1
fi

# ---- 4. compute-sanitizer -----------------------------------------------------------------------
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$test_bin" ] && [ -x "$sanitizer" ]; then
  for tool in memcheck racecheck synccheck; do
    step "sanitizer-$tool" 60 env KVCACHE_CUDA_TEST_SHORT=1 "$sanitizer" --tool "$tool" \
      --error-exitcode 1 --print-limit 20 "$test_bin" "[cuda]" --reporter compact
  done
else
  steps+=("sanitizers|not run: no test binary or no compute-sanitizer|0")
  failed=1
fi

# ---- 5. benchmarks ------------------------------------------------------------------------------
if [ -x "$bench_bin" ]; then
  step bench 120 "$bench_bin" --benchmark_min_time=0.05 --benchmark_out="$out/bench.json" \
    --benchmark_out_format=json
else
  steps+=("bench|not run: no benchmark binary (build failed)|0")
  failed=1
fi
if python3 -c "import torch" >/dev/null 2>&1; then
  step sdpa 90 python3 bench/sdpa_compare.py --json "$out/sdpa.json"
else
  steps+=("sdpa|not run: torch is not importable|0")
fi

# ---- 6. summary ---------------------------------------------------------------------------------
{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); arch sm_$arch;" \
    "total $(($(date +%s) - start)) s"
  echo
  echo '```'
  cat "$out/device.log" 2>/dev/null || echo "nvidia-smi: not available"
  echo '```'
  echo
  echo "## Steps"
  echo
  echo "| step | status | seconds |"
  echo "| --- | --- | --- |"
  for s in "${steps[@]}"; do
    IFS='|' read -r name status seconds <<<"$s"
    echo "| $name | $status | $seconds |"
  done
  echo
  echo "## Tests"
  echo
  if [ -f "$out/tests.log" ]; then
    grep -m1 "CUDA backend under test" "$out/tests.log" || echo "(no backend line)"
    grep -E "^(Passed|Failed|All tests passed|test cases:)" "$out/tests.log" | tail -n 3 || true
    grep -E "SKIPPED" "$out/tests.log" | head -n 3 || true
  else
    echo "not run"
  fi
  echo
  echo "## compute-sanitizer"
  echo
  for tool in memcheck racecheck synccheck; do
    f=$out/sanitizer-$tool.log
    if [ -f "$f" ]; then
      echo "- $tool: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$f" | tail -n 1 || true)" \
        "$(grep -cE "^========= (Invalid|Race|Barrier|Error)" "$f" || true) findings listed"
      grep -E "^========= (Invalid|Race|Barrier|Error)" "$f" | sort | uniq -c | head -n 10 |
        sed 's/^/    /' || true
    else
      echo "- $tool: not run"
    fi
  done
  echo
  echo "## bench_cuda_attention"
  echo
  if [ -f "$out/bench.json" ]; then
    python3 - "$out/bench.json" <<'EOF' || echo "(could not parse bench.json)"
import json, sys
data = json.load(open(sys.argv[1]))
print("| benchmark | time (us) | GB/s | speedup_vs_full |")
print("| --- | --- | --- | --- |")
for b in data.get("benchmarks", []):
    if b.get("run_type") == "aggregate":
        continue
    unit = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}[b.get("time_unit", "ns")]
    gbs = b.get("bytes_per_second", 0.0) / 1e9
    speedup = b.get("speedup_vs_full", "")
    speedup = f"{speedup:.2f}" if isinstance(speedup, float) else ""
    error = " (error: %s)" % b["error_message"] if b.get("error_occurred") else ""
    print(f"| {b['name']}{error} | {b['real_time'] * unit:.1f} | {gbs:.0f} | {speedup} |")
EOF
  else
    echo "not run"
  fi
  echo
  echo "## sdpa_compare.py"
  echo
  if [ -f "$out/sdpa.log" ]; then
    echo '```'
    cat "$out/sdpa.log"
    echo '```'
  else
    echo "not run"
  fi
} >"$summary"
echo "gpu_check: summary in $summary" >&2
exit "$failed"
