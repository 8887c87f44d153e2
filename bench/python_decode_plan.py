#!/usr/bin/env python3
"""A decode step from Python: one decode_attention call per layer over a batch, per-call
(`decode_attention(batch, layer, q, out=out)`) against planned (`plan = prepare_decode(batch)`
once per step, then `decode_attention(plan, layer, q, out=out)`), in the same process.

Shape (default: the C++ bench_decode_plan's small-context case): 32 layers, batch 8, 256 tokens
per sequence, 8 kv heads x 4 query heads each, head_dim 128, f16 store, 16-token pages, cpu
backend. --context / --kv-heads / --group / --head-dim shrink the kernel's work so that the
per-call host cost (binding + Cache) becomes visible.
q / out are preallocated float32 numpy arrays (and float16 ones for the f16 rows), reused every
step, so the timings are the binding + Cache host work + the kernel. Each repetition times
--steps steps of every variant, the variants interleaved (ABAB...) so load drifts hit them alike;
reported: median over --repetitions of the wall and process CPU time per step (and per layer
call). The prepare_decode call is inside the planned step's time.

Usage: PYTHONPATH=build/release/python <venv>/bin/python bench/python_decode_plan.py
"""

import argparse
import statistics
import time

import numpy as np

import kvcache

LAYERS = 32


def build(batch, context):
    cache = kvcache.Cache(kvcache.Config(num_layers=LAYERS, num_kv_heads=KV_HEADS,
                                         num_q_heads=KV_HEADS * GROUP, head_dim=HEAD_DIM,
                                         dtype="f16", page_tokens=16,
                                         num_pages=LAYERS * KV_HEADS * batch * (context // 16 + 2)))
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(batch):
        s = cache.add_sequence()
        for layer in range(LAYERS):
            k = rng.standard_normal((context, KV_HEADS, HEAD_DIM), dtype=np.float32)
            cache.append(s, layer, k, k, np.arange(context))
        seqs.append(s)
    return cache, seqs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repetitions", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4, help="query heads per kv head")
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    global KV_HEADS, GROUP, HEAD_DIM
    KV_HEADS, GROUP, HEAD_DIM = args.kv_heads, args.group, args.head_dim
    cache, seqs = build(args.batch, args.context)
    shape = (args.batch, KV_HEADS * GROUP, HEAD_DIM)
    rng = np.random.default_rng(1)
    q32 = [rng.standard_normal(shape, dtype=np.float32) for _ in range(LAYERS)]
    q16 = [q.astype(np.float16) for q in q32]
    out32 = np.empty(shape, np.float32)
    out16 = np.empty(shape, np.float16)

    def per_call(qs, out):
        for layer in range(LAYERS):
            cache.decode_attention(seqs, layer, qs[layer], out=out)

    def planned(qs, out):
        plan = cache.prepare_decode(seqs)
        for layer in range(LAYERS):
            cache.decode_attention(plan, layer, qs[layer], out=out)

    variants = {
        "per-call f32": lambda: per_call(q32, out32),
        "planned f32": lambda: planned(q32, out32),
        "per-call f16": lambda: per_call(q16, out16),
        "planned f16": lambda: planned(q16, out16),
    }
    # Same results (bit for bit) before timing anything.
    a = np.empty(shape, np.float32)
    cache.decode_attention(seqs, 3, q32[3], out=a)
    b = cache.decode_attention(cache.prepare_decode(seqs), 3, q32[3])
    assert a.tobytes() == b.tobytes()
    for fn in variants.values():  # warm-up
        fn()
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for _ in range(args.repetitions):
        for name, fn in variants.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                fn()
            wall[name].append((time.perf_counter() - w0) / args.steps)
            cpu[name].append((time.process_time() - c0) / args.steps)
    print(f"{LAYERS} layers x batch {args.batch} x {args.context} tokens, {KV_HEADS} kv heads x "
          f"{GROUP}, head_dim {HEAD_DIM}, f16 store; medians of {args.repetitions} x "
          f"{args.steps} steps")
    print(f"{'variant':<14} {'wall/step':>10} {'cpu/step':>10} {'cpu/call':>9}")
    for name in variants:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"{name:<14} {w * 1e6:8.0f}us {c * 1e6:8.0f}us {c * 1e6 / LAYERS:7.1f}us")


if __name__ == "__main__":
    main()
