#!/usr/bin/env python3
"""Planted-bug check of the CUDA tests: applies one mutation at a time to cuda/kernels.cu,
rebuilds test_cuda_backend (on the emulated backend when there is no GPU), runs the [cuda] test
cases named for that mutation, records whether they failed, and restores the file.

Usage: python3 scripts/cuda_mutations.py BUILD_DIR [NAME...]
  BUILD_DIR  a configured build directory (e.g. build/emu: -DKVCACHE_WITH_CUDA=OFF)
  NAME       run only these mutations (default: all)
Prints one line per mutation: caught / NOT CAUGHT, with the first failing test case and the
test time. Results are recorded in docs/RELIABILITY.md ("CUDA kernels: planted bugs").
"""
import subprocess
import sys
import time

KERNELS = "cuda/kernels.cu"

# name: (description, old text, new text, Catch2 test-case filters to run)
MUTATIONS = {
    "merge-barrier": (
        "delete the __syncthreads() before DecodeKernel's row-group merge",
        "  __syncthreads();\n  const int num_splits = split.num_splits;",
        "  const int num_splits = split.num_splits;",
        ["cuda: a long stream*", "cuda: batched decode*"]),
    "query-barrier": (
        "delete the __syncthreads() after LoadQuery's shared-memory writes",
        "        g0 + g < group ? q[static_cast<int64_t>(g0 + g) * d + c] * scale : 0.0f;\n  }\n"
        "  __syncthreads();",
        "        g0 + g < group ? q[static_cast<int64_t>(g0 + g) * d + c] * scale : 0.0f;\n  }\n",
        ["cuda: a long stream*", "cuda: batched decode*"]),
    "shuffle-early-stop": (
        "stop the row-group shuffle reduction one step early (offset > 1)",
        "offset = kLanesPerRow / 2; offset > 0; offset /= 2",
        "offset = kLanesPerRow / 2; offset > 1; offset /= 2",
        ["cuda: a long stream*", "cuda: batched decode*"]),
    "row-past-end": (
        "read one row past the segment's last row (t <= hi) in DecodeKernel",
        "      const bool valid = t < hi;",
        "      const bool valid = t <= hi;",
        ["cuda: a long stream*", "cuda: pages of 1*", "cuda: batched decode*"]),
    "drop-score-atomics": (
        "drop the below-threshold atomicAdd of ScoreRowsAggregateKernel",
        "            atomicAdd(&sargs.below_threshold[static_cast<int64_t>(stream) * group + g0 + g],\n"
        "                      static_cast<unsigned long long>(below[g]));",
        "            (void)below[g];",
        ["cuda: pages of 1*", "cuda: ScoreRows*"]),
    "racy-score-add": (
        "replace that atomicAdd by a plain, racy += (a data race across blocks)",
        "            atomicAdd(&sargs.below_threshold[static_cast<int64_t>(stream) * group + g0 + g],\n"
        "                      static_cast<unsigned long long>(below[g]));",
        "            sargs.below_threshold[static_cast<int64_t>(stream) * group + g0 + g] +=\n"
        "                static_cast<unsigned long long>(below[g]);",
        ["cuda: pages of 1*", "cuda: ScoreRows*"]),
    "score-row-barrier": (
        "delete the __syncthreads() before ScoreRowsAggregateKernel folds s_row into s_scores",
        "    __syncthreads();\n    for (int i = threadIdx.x; i < chunk_end - chunk_begin; i += kThreads) {\n"
        "      const float row =",
        "    for (int i = threadIdx.x; i < chunk_end - chunk_begin; i += kThreads) {\n"
        "      const float row =",
        ["cuda: pages of 1*", "cuda: ScoreRows*"]),
    "merge-skips-last-split": (
        "MergeSplitsKernel ignores the last key split",
        "    for (int s = 0; s < split.num_splits; ++s) {",
        "    for (int s = 0; s < split.num_splits - 1; ++s) {",
        ["cuda: a long stream*", "cuda: batched decode*"]),
}


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def main():
    build = sys.argv[1]
    names = sys.argv[2:] or list(MUTATIONS)
    original = open(KERNELS).read()
    try:
        for name in names:
            what, old, new, filters = MUTATIONS[name]
            if original.count(old) != 1:
                print(f"{name}: pattern not found exactly once; kernels.cu changed?")
                continue
            open(KERNELS, "w").write(original.replace(old, new))
            b = run(["cmake", "--build", build, "-j2", "--target", "test_cuda_backend"])
            if b.returncode != 0:
                print(f"{name}: build failed\n{b.stdout[-2000:]}{b.stderr[-2000:]}")
                continue
            verdict, where = "NOT CAUGHT", ""
            t0 = time.time()
            for f in filters:
                r = run([f"{build}/tests/test_cuda_backend", f, "--abort"])
                if r.returncode not in (0, 4):
                    lines = [l.strip() for l in r.stdout.splitlines()
                             if "differ" in l or "thread order" in l or "emulator:" in l
                             or "CHECK(" in l or "REQUIRE(" in l]
                    lines += [l.strip() for l in r.stderr.splitlines() if "emulator:" in l]
                    verdict, where = "caught", f"{f}: " + " | ".join(lines[:4])
                    break
            print(f"{name}: {verdict} ({time.time() - t0:.0f} s) -- {what}\n    {where}",
                  flush=True)
    finally:
        open(KERNELS, "w").write(original)


if __name__ == "__main__":
    main()
