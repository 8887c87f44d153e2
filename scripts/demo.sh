#!/usr/bin/env bash
# Quick start 1: install what is missing, build, and run the main demonstration.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
cmake -S . -B build/demo -DCMAKE_BUILD_TYPE=Release -DKVCACHE_BUILD_TESTS=OFF \
  -DKVCACHE_BUILD_BENCHMARKS=OFF -DKVCACHE_WITH_CUDA=OFF >/dev/null
cmake --build build/demo -j"$(nproc)" --target kvcache_demo
build/demo/examples/kvcache_demo "$@"
