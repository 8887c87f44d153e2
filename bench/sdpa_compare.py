#!/usr/bin/env python3
"""Times torch.nn.functional.scaled_dot_product_attention on the dense K/V shapes of
bench_cuda_attention (one decode query per sequence, 8 kv heads, G = 4, head_dim 128), so the
paged kernel's figures can be put next to PyTorch's on the same GPU.

Usage: python3 bench/sdpa_compare.py [--json out.json]

Prints one line per (dtype, context, batch) with the mean time of a step (CUDA events) and the
K/V bytes read per second, the same quantity bench_cuda_attention reports as bytes_per_second.
Exits 0 with a "SKIPPED:" line when torch or a CUDA device is missing.
"""
import argparse
import json
import sys

KV_HEADS = 8
GROUP = 4
HEAD_DIM = 128
CONTEXTS = (4096, 16384, 65536)
BATCHES = (1, 16, 64)
WARMUP = 5
ITERATIONS = 50


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("SKIPPED: torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print("SKIPPED: torch sees no CUDA device")
        return 0

    # enable_gqa (torch >= 2.5) reads each kv head once for its G query heads, as the paged
    # kernel does; older torch needs K/V repeated per query head, which reads G times the bytes.
    try:
        q = torch.zeros(1, GROUP, 1, 8, device="cuda", dtype=torch.float16)
        kv = torch.zeros(1, 1, 4, 8, device="cuda", dtype=torch.float16)
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        native_gqa = True
    except TypeError:
        native_gqa = False

    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; native GQA: {native_gqa}")
    results = []
    for dtype in (torch.float16, torch.bfloat16):
        for context in CONTEXTS:
            for batch in BATCHES:
                name = f"sdpa/{str(dtype).replace('torch.', '')}/context:{context}/batch:{batch}"
                try:
                    q = torch.randn(batch, KV_HEADS * GROUP, 1, HEAD_DIM, device="cuda",
                                    dtype=dtype)
                    k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, device="cuda", dtype=dtype)
                    v = torch.randn_like(k)
                    if native_gqa:
                        step = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    else:
                        k = k.repeat_interleave(GROUP, dim=1)
                        v = v.repeat_interleave(GROUP, dim=1)
                        step = lambda: F.scaled_dot_product_attention(q, k, v)
                    for _ in range(WARMUP):
                        step()
                    start = torch.cuda.Event(enable_timing=True)
                    stop = torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(ITERATIONS):
                        step()
                    stop.record()
                    torch.cuda.synchronize()
                    ms = start.elapsed_time(stop) / ITERATIONS
                except torch.cuda.OutOfMemoryError:
                    print(f"{name}: out of memory, skipped")
                    torch.cuda.empty_cache()
                    continue
                # Bytes of the distinct K/V (what the paged kernel reads), whatever torch reads.
                kv_bytes = 2 * batch * KV_HEADS * context * HEAD_DIM * q.element_size()
                gbps = kv_bytes / (ms * 1e-3) / 1e9
                print(f"{name}: {ms * 1e3:9.1f} us  {gbps:8.1f} GB/s")
                results.append({"name": name, "dtype": str(dtype), "context": context,
                                "batch": batch, "time_us": ms * 1e3, "kv_bytes": kv_bytes,
                                "bytes_per_second": kv_bytes / (ms * 1e-3)})
                del q, k, v
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "native_gqa": native_gqa,
                       "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
