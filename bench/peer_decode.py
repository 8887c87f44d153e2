#!/usr/bin/env python3
"""kvcache's CPU decode beside PyTorch's, on the same shapes, in one process.

Per shape (8 kv heads, G = 4 query heads per kv head, head_dim 128, one decode query per
sequence; dtype f16 / bf16 / f32; context x batch), the same random K/V and queries go to:

  kvcache        kvc_decode_attention through the C API (libkvcache_c.so, ctypes), the cache
                 filled by kvc_append (16-token pages)
  sdpa-folded    torch SDPA with the G query heads of a kv head folded into the query length:
                 q [B, H, G, D] against K/V [B, H, n, D] (each kv head read once)
  sdpa-gqa       torch SDPA with enable_gqa=True: q [B, H*G, 1, D]
  paged-gather   a paged torch cache (pool [pages, 16, H, D] per K and V + page table) that
                 gathers each sequence's pages (index_select) and then runs sdpa-folded

Methods run in alternating rounds (round r times every method once, in a rotated order), so a
burst of load on a shared machine falls on all of them; the table gives the median of the rounds.
Every output is checked against a float64 reference computed from the same stored values
(max |error| column; the torch forms also round q to the K/V dtype, kvcache keeps q in f32).

Usage: peer_decode.py --lib build/release/capi/libkvcache_c.so [--rounds 7] [--threads 2]
                      [--shapes 1024x1,1024x8,8192x1,8192x8,32768x1] [--dtypes f16,bf16,f32]
                      [--json out.json]
Exit 4 = skipped (torch or numpy missing).
"""
import argparse
import ctypes as C
import json
import platform
import statistics
import sys
import time

try:
    import numpy as np
    import torch
    import torch.nn.functional as F
except ImportError as e:  # pragma: no cover
    print(f"SKIPPED: {e}")
    sys.exit(4)

KV_HEADS, GROUP, HEAD_DIM, PAGE_TOKENS = 8, 4, 128, 16
KVC_DTYPE = {"f32": 0, "f16": 1, "bf16": 2}
TORCH_DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


class Config(C.Structure):
    _fields_ = [("num_layers", C.c_int32), ("num_kv_heads", C.c_int32),
                ("num_q_heads", C.c_int32), ("head_dim", C.c_int32), ("dtype", C.c_int32),
                ("page_tokens", C.c_int32), ("page_bytes", C.c_int64),
                ("num_pages", C.c_int32), ("flags", C.c_int32)]


def load_lib(path):
    lib = C.CDLL(path)
    lib.kvc_last_error.restype = C.c_char_p
    lib.kvc_version_string.restype = C.c_char_p
    lib.kvc_config_init.argtypes = [C.POINTER(Config)]
    lib.kvc_cache_create.argtypes = [C.POINTER(Config), C.c_char_p, C.POINTER(C.c_void_p)]
    lib.kvc_cache_destroy.argtypes = [C.c_void_p]
    lib.kvc_sequence_add.argtypes = [C.c_void_p, C.POINTER(C.c_int64)]
    lib.kvc_append.argtypes = [C.c_void_p, C.c_int64, C.c_int32, C.c_int32, C.c_int32,
                               C.c_void_p, C.c_void_p, C.POINTER(C.c_int32),
                               C.POINTER(C.c_uint8), C.POINTER(C.c_uint8)]
    lib.kvc_decode_attention.argtypes = [C.c_void_p, C.POINTER(C.c_int64), C.c_int32, C.c_int32,
                                         C.POINTER(C.c_float), C.POINTER(C.c_float),
                                         C.POINTER(C.c_float), C.c_float, C.c_int32, C.c_int32]
    return lib


def check(lib, status, what):
    if status != 0:
        raise RuntimeError(f"{what}: {lib.kvc_last_error().decode()}")


class KvcacheDecode:
    """One cache holding the batch's sequences; decode = one kvc_decode_attention call."""

    def __init__(self, lib, dtype, k, v):  # k, v: torch [B, H, n, D] in `dtype`
        self.lib = lib
        batch, heads, n, d = k.shape
        cfg = Config()
        lib.kvc_config_init(C.byref(cfg))
        cfg.num_layers, cfg.num_kv_heads, cfg.num_q_heads, cfg.head_dim = 1, heads, heads * GROUP, d
        cfg.dtype, cfg.page_tokens = KVC_DTYPE[dtype], PAGE_TOKENS
        cfg.num_pages = batch * heads * (n // PAGE_TOKENS + 2)
        self.cache = C.c_void_p()
        check(lib, lib.kvc_cache_create(C.byref(cfg), b"cpu", C.byref(self.cache)), "create")
        self.seqs = (C.c_int64 * batch)()
        positions = np.arange(n, dtype=np.int32)
        for b in range(batch):
            seq = C.c_int64()
            check(lib, lib.kvc_sequence_add(self.cache, C.byref(seq)), "add")
            self.seqs[b] = seq.value
            # [n, H, D] in the stored dtype (f16/bf16 as their 16-bit patterns).
            kb = k[b].transpose(0, 1).contiguous()
            vb = v[b].transpose(0, 1).contiguous()
            if dtype != "f32":
                kb, vb = kb.view(torch.int16), vb.view(torch.int16)
            kn, vn = kb.numpy(), vb.numpy()
            check(lib, lib.kvc_append(self.cache, self.seqs[b], 0, n, KVC_DTYPE[dtype],
                                      kn.ctypes.data, vn.ctypes.data,
                                      positions.ctypes.data_as(C.POINTER(C.c_int32)), None, None),
                  "append")
        self.batch = batch
        self.out = np.zeros((batch, heads * GROUP, d), dtype=np.float32)

    def __call__(self, q):  # q: np.float32 [B, H*G, D]
        check(self.lib, self.lib.kvc_decode_attention(
            self.cache, self.seqs, self.batch, 0, q.ctypes.data_as(C.POINTER(C.c_float)),
            self.out.ctypes.data_as(C.POINTER(C.c_float)), None, 0.0, 0, 0), "decode")
        return self.out

    def close(self):
        self.lib.kvc_cache_destroy(self.cache)


def reference(q, k, v):
    """float64 attention: q [B, H*G, D] f32, k/v torch [B, H, n, D] -> [B, H*G, D]."""
    batch, heads, n, d = k.shape
    out = np.zeros((batch, heads * GROUP, d))
    for b in range(batch):
        for h in range(heads):
            kk = k[b, h].to(torch.float64).numpy()
            vv = v[b, h].to(torch.float64).numpy()
            qq = q[b, h * GROUP:(h + 1) * GROUP].astype(np.float64)  # [G, D]
            logits = qq @ kk.T / np.sqrt(d)
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            p /= p.sum(axis=1, keepdims=True)
            out[b, h * GROUP:(h + 1) * GROUP] = p @ vv
    return out


def run_shape(lib, dtype, context, batch, rounds, rng):
    td = TORCH_DTYPE[dtype]
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, generator=gen).to(td)
    v = torch.randn(batch, KV_HEADS, context, HEAD_DIM, generator=gen).to(td)
    q = rng.standard_normal((batch, KV_HEADS * GROUP, HEAD_DIM)).astype(np.float32)
    qt = torch.from_numpy(q).to(td)
    q_folded = qt.view(batch, KV_HEADS, GROUP, HEAD_DIM)
    q_gqa = qt.view(batch, KV_HEADS * GROUP, 1, HEAD_DIM)

    # Paged torch cache: pages of 16 tokens x H x D, in a shuffled pool order like a real pool.
    pages_per_seq = context // PAGE_TOKENS
    perm = torch.randperm(batch * pages_per_seq, generator=gen)
    k_pool = torch.empty(batch * pages_per_seq, PAGE_TOKENS, KV_HEADS, HEAD_DIM, dtype=td)
    v_pool = torch.empty_like(k_pool)
    k_pages = k.permute(0, 2, 1, 3).reshape(batch * pages_per_seq, PAGE_TOKENS, KV_HEADS, HEAD_DIM)
    v_pages = v.permute(0, 2, 1, 3).reshape(batch * pages_per_seq, PAGE_TOKENS, KV_HEADS, HEAD_DIM)
    k_pool[perm] = k_pages
    v_pool[perm] = v_pages
    page_table = perm.view(batch, pages_per_seq)  # sequence b's pages, in order

    def paged_gather():
        idx = page_table.reshape(-1)
        kg = k_pool.index_select(0, idx).view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)
        vg = v_pool.index_select(0, idx).view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)
        return F.scaled_dot_product_attention(q_folded, kg, vg)

    kvc = KvcacheDecode(lib, dtype, k, v)
    methods = {
        "kvcache": lambda: kvc(q),
        "sdpa-folded": lambda: F.scaled_dot_product_attention(q_folded, k, v),
        "sdpa-gqa": lambda: F.scaled_dot_product_attention(q_gqa, k, v, enable_gqa=True),
        "paged-gather": paged_gather,
    }
    ref = reference(q, k, v)
    errors = {}
    with torch.inference_mode():
        for name, fn in methods.items():
            out = fn()
            got = out if isinstance(out, np.ndarray) else out.float().numpy()
            errors[name] = float(np.abs(got.reshape(ref.shape) - ref).max())
        times = {name: [] for name in methods}
        names = list(methods)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                methods[name]()
                times[name].append(time.perf_counter() - t0)
    kvc.close()
    kv_bytes = 2 * k.numel() * k.element_size()
    rows = []
    for name in methods:
        med = statistics.median(times[name])
        rows.append({"dtype": dtype, "context": context, "batch": batch, "method": name,
                     "median_ms": med * 1e3, "GBps": kv_bytes / med * 1e-9,
                     "max_abs_error": errors[name]})
    kv_med = rows[0]["median_ms"]
    for row in rows:
        row["kvcache_speedup"] = row["median_ms"] / kv_med
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", required=True, help="path to libkvcache_c.so")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--shapes", default="1024x1,1024x8,8192x1,8192x8,32768x1")
    parser.add_argument("--dtypes", default="f16,bf16,f32")
    parser.add_argument("--json")
    args = parser.parse_args()
    lib = load_lib(args.lib)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"kvcache {lib.kvc_version_string().decode()}; torch {torch.__version__}; "
          f"numpy {np.__version__}; python {platform.python_version()}; "
          f"torch threads {torch.get_num_threads()}; cpu: {platform.processor() or platform.machine()}")
    rng = np.random.default_rng(0)
    results = []
    header = (f"{'dtype':5} {'context':>7} {'batch':>5} {'method':13} {'median ms':>10} "
              f"{'GB/s':>7} {'x kvcache':>9} {'max|err|':>9}")
    print(header)
    for dtype in args.dtypes.split(","):
        for shape in args.shapes.split(","):
            context, batch = (int(x) for x in shape.split("x"))
            for row in run_shape(lib, dtype, context, batch, args.rounds, rng):
                results.append(row)
                print(f"{row['dtype']:5} {row['context']:7d} {row['batch']:5d} {row['method']:13} "
                      f"{row['median_ms']:10.3f} {row['GBps']:7.2f} {row['kvcache_speedup']:9.2f} "
                      f"{row['max_abs_error']:9.2e}", flush=True)
    bad = [r for r in results if r["max_abs_error"] > 5e-2]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if bad:
        print(f"FAILED: {len(bad)} outputs differ from the float64 reference by more than 5e-2")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
