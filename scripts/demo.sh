#!/usr/bin/env bash
# Quick start 1: install what is missing, build kvcache-eval, and run it on the default
# workload (a seeded, LLaVA-1.6-7B-shaped vision-language decode; docs/EVAL.md). Arguments are
# passed to kvcache-eval, e.g. scripts/demo.sh --report /tmp/kvcache-report
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh --plots
cmake -S . -B build/demo -DCMAKE_BUILD_TYPE=Release -DKVCACHE_BUILD_TESTS=OFF \
  -DKVCACHE_BUILD_BENCHMARKS=OFF -DKVCACHE_BUILD_EXAMPLES=OFF -DKVCACHE_WITH_CUDA=OFF >/dev/null
cmake --build build/demo -j"$(nproc)" --target kvcache_eval
build/demo/tools/eval/kvcache-eval "$@"
