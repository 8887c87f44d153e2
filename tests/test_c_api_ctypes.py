#!/usr/bin/env python3
"""The C API from Python through ctypes only (libkvcache_c.so + numpy).

Appends random K/V (f32 and f16 caches, GQA), runs decode attention through the library, reads
the stored tokens back (K/V as f32, positions) and checks the output and log-sum-exp against
attention computed by numpy over exactly those tokens; then compresses with a policy and checks
again over the surviving tokens, including that their original positions are a subset of the
appended ones. Also checks the page table against the stream lengths and error reporting, and a
decode plan with f16 q / out through kvc_tensor / kvc_decode_options laid out by ctypes.

Usage: test_c_api_ctypes.py /path/to/libkvcache_c.so   (exit 4 = skipped: numpy missing)
"""
import ctypes as C
import sys

try:
    import numpy as np
except ImportError:  # pragma: no cover
    print("numpy is not installed; skipping")
    sys.exit(4)

KVC_OK, KVC_INVALID_ARGUMENT, KVC_NOT_FOUND, KVC_OUT_OF_RANGE = 0, 1, 2, 3
KVC_OUT_OF_MEMORY, KVC_BUFFER_TOO_SMALL = 4, 7
KVC_DTYPE_F32, KVC_DTYPE_F16 = 0, 1


class Config(C.Structure):
    _fields_ = [("num_layers", C.c_int32), ("num_kv_heads", C.c_int32),
                ("num_q_heads", C.c_int32), ("head_dim", C.c_int32), ("dtype", C.c_int32),
                ("page_tokens", C.c_int32), ("page_bytes", C.c_int64),
                ("num_pages", C.c_int32), ("flags", C.c_int32)]


class Stats(C.Structure):
    _fields_ = [("num_sequences", C.c_int32), ("pages_total", C.c_int32),
                ("pages_used", C.c_int32), ("pages_free", C.c_int32),
                ("bytes_used", C.c_int64), ("page_bytes", C.c_int64),
                ("tokens_stored", C.c_int64)]


class CompressResult(C.Structure):
    _fields_ = [("tokens_before", C.c_int64), ("tokens_after", C.c_int64),
                ("streams_changed", C.c_int32), ("reserved", C.c_int32)]


class Tensor(C.Structure):  # kvc_tensor
    _fields_ = [("data", C.c_void_p), ("num_elements", C.c_int64), ("dtype", C.c_int32),
                ("memory", C.c_int32)]

    @staticmethod
    def of(a):
        dtype = {np.float32: KVC_DTYPE_F32, np.float16: KVC_DTYPE_F16}[a.dtype.type]
        return Tensor(a.ctypes.data, a.size, dtype, 0)


class DecodeOptions(C.Structure):  # kvc_decode_options
    _fields_ = [("scale", C.c_float), ("aggregation", C.c_int32),
                ("accumulate_scores", C.c_int32), ("reserved", C.c_int32),
                ("read_policy", C.c_void_p), ("stream", C.c_void_p)]


class PageLayout(C.Structure):
    _fields_ = [("pool_base", C.c_void_p), ("page_bytes", C.c_int64),
                ("key_offset_bytes", C.c_int64), ("value_offset_bytes", C.c_int64),
                ("row_stride_bytes", C.c_int64), ("num_pages", C.c_int32),
                ("tokens_per_page", C.c_int32), ("head_dim", C.c_int32), ("dtype", C.c_int32),
                ("is_device", C.c_int32), ("reserved", C.c_int32)]


def ptr(a, ctype):
    return a.ctypes.data_as(C.POINTER(ctype)) if a is not None else None


class Lib:
    def __init__(self, path):
        self.lib = C.CDLL(path)
        L = self.lib
        L.kvc_last_error.restype = C.c_char_p
        L.kvc_version_string.restype = C.c_char_p
        L.kvc_status_name.restype = C.c_char_p
        L.kvc_cache_create.argtypes = [C.POINTER(Config), C.c_char_p, C.POINTER(C.c_void_p)]
        L.kvc_cache_destroy.argtypes = [C.c_void_p]
        L.kvc_sequence_add.argtypes = [C.c_void_p, C.POINTER(C.c_int64)]
        L.kvc_sequence_free.argtypes = [C.c_void_p, C.c_int64]
        L.kvc_append.argtypes = [C.c_void_p, C.c_int64, C.c_int32, C.c_int32, C.c_int32,
                                 C.c_void_p, C.c_void_p, C.POINTER(C.c_int32),
                                 C.POINTER(C.c_uint8), C.POINTER(C.c_uint8)]
        L.kvc_decode_attention.argtypes = [C.c_void_p, C.POINTER(C.c_int64), C.c_int32,
                                           C.c_int32, C.POINTER(C.c_float),
                                           C.POINTER(C.c_float), C.POINTER(C.c_float),
                                           C.c_float, C.c_int32, C.c_int32]
        L.kvc_stream_length.argtypes = [C.c_void_p, C.c_int64, C.c_int32, C.c_int32,
                                        C.POINTER(C.c_int32)]
        L.kvc_stream_read.argtypes = [C.c_void_p, C.c_int64, C.c_int32, C.c_int32, C.c_int32,
                                      C.POINTER(C.c_int32), C.POINTER(C.c_int32),
                                      C.POINTER(C.c_uint8), C.POINTER(C.c_float),
                                      C.POINTER(C.c_float), C.POINTER(C.c_float)]
        L.kvc_compress.argtypes = [C.c_void_p, C.c_int64, C.c_char_p, C.c_char_p, C.c_void_p,
                                   C.POINTER(CompressResult)]
        L.kvc_cache_stats.argtypes = [C.c_void_p, C.POINTER(Stats)]
        L.kvc_cache_validate.argtypes = [C.c_void_p]
        L.kvc_export_page_table.argtypes = [C.c_void_p, C.c_int32, C.POINTER(C.c_int64),
                                            C.c_int32, C.POINTER(C.c_int32),
                                            C.POINTER(C.c_int32), C.c_int64,
                                            C.POINTER(C.c_int64), C.POINTER(C.c_int32),
                                            C.POINTER(PageLayout)]

        L.kvc_prepare_decode.argtypes = [C.c_void_p, C.POINTER(C.c_int64), C.c_int32,
                                         C.POINTER(C.c_void_p)]
        L.kvc_decode_plan_info.argtypes = [C.c_void_p, C.POINTER(C.c_int32),
                                           C.POINTER(C.c_int32), C.POINTER(C.c_int32)]
        L.kvc_decode_attention_planned.argtypes = [C.c_void_p, C.c_void_p, C.c_int32,
                                                   C.POINTER(Tensor), C.POINTER(Tensor),
                                                   C.POINTER(Tensor), C.POINTER(DecodeOptions)]
        L.kvc_decode_plan_destroy.argtypes = [C.c_void_p]
        L.kvc_decode_options_init.argtypes = [C.POINTER(DecodeOptions)]

    def check(self, status, what):
        if status != KVC_OK:
            raise AssertionError("%s: %s: %s" % (what, self.lib.kvc_status_name(status).decode(),
                                                 self.lib.kvc_last_error().decode()))


class Cache:
    def __init__(self, lib, layers, kv_heads, q_heads, dim, dtype, page_tokens, num_pages):
        self.lib, self.L = lib, lib.lib
        self.layers, self.kv_heads, self.q_heads, self.dim = layers, kv_heads, q_heads, dim
        cfg = Config(layers, kv_heads, q_heads, dim, dtype, page_tokens, 0, num_pages, 0)
        h = C.c_void_p()
        lib.check(self.L.kvc_cache_create(C.byref(cfg), b"cpu", C.byref(h)), "create")
        self.h = h

    def add(self):
        s = C.c_int64()
        self.lib.check(self.L.kvc_sequence_add(self.h, C.byref(s)), "add")
        return s.value

    def append(self, seq, layer, k, v, positions, dtype=KVC_DTYPE_F32):
        positions = np.ascontiguousarray(positions, dtype=np.int32)
        n = len(positions)
        self.lib.check(self.L.kvc_append(self.h, seq, layer, n, dtype, k.ctypes.data_as(C.c_void_p),
                                         v.ctypes.data_as(C.c_void_p), ptr(positions, C.c_int32),
                                         None, None), "append")

    def read(self, seq, layer, head):
        n = C.c_int32()
        self.lib.check(self.L.kvc_stream_length(self.h, seq, layer, head, C.byref(n)), "length")
        n = n.value
        pos = np.zeros(n, np.int32)
        k = np.zeros((n, self.dim), np.float32)
        v = np.zeros((n, self.dim), np.float32)
        got = C.c_int32()
        self.lib.check(self.L.kvc_stream_read(self.h, seq, layer, head, n, C.byref(got),
                                              ptr(pos, C.c_int32), None, None,
                                              ptr(k, C.c_float), ptr(v, C.c_float)), "read")
        assert got.value == n
        return pos, k, v

    def decode(self, batch, layer, q):
        batch = np.ascontiguousarray(batch, dtype=np.int64)
        out = np.zeros_like(q)
        lse = np.zeros((len(batch), self.q_heads), np.float32)
        self.lib.check(self.L.kvc_decode_attention(self.h, ptr(batch, C.c_int64), len(batch), layer,
                                                   ptr(q, C.c_float), ptr(out, C.c_float),
                                                   ptr(lse, C.c_float), 0.0, 0, 1), "decode")
        return out, lse

    def destroy(self):
        self.lib.check(self.L.kvc_cache_destroy(self.h), "destroy")


def numpy_attention(q, k, v):
    """q [q_heads_of_group, D], k/v [n, D] -> out [q_heads_of_group, D], lse [q_heads_of_group]."""
    logits = (q.astype(np.float64) @ k.astype(np.float64).T) / np.sqrt(q.shape[-1])
    m = logits.max(axis=-1, keepdims=True)
    p = np.exp(logits - m)
    z = p.sum(axis=-1, keepdims=True)
    return (p @ v.astype(np.float64)) / z, (m + np.log(z))[:, 0]


def check_decode(cache, seqs, layer, rng, appended_positions):
    g = cache.q_heads // cache.kv_heads
    q = rng.standard_normal((len(seqs), cache.q_heads, cache.dim)).astype(np.float32)
    out, lse = cache.decode(seqs, layer, q)
    for b, s in enumerate(seqs):
        for h in range(cache.kv_heads):
            pos, k, v = cache.read(s, layer, h)
            assert np.all(np.diff(pos) > 0), "positions must ascend"
            assert set(pos.tolist()) <= set(appended_positions[s]), "unknown position read back"
            ref, ref_lse = numpy_attention(q[b, h * g:(h + 1) * g], k, v)
            np.testing.assert_allclose(out[b, h * g:(h + 1) * g], ref, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(lse[b, h * g:(h + 1) * g], ref_lse, rtol=1e-4, atol=1e-4)


def run_case(lib, dtype, rng):
    layers, kv_heads, q_heads, dim = 2, 2, 8, 32
    cache = Cache(lib, layers, kv_heads, q_heads, dim, dtype, page_tokens=8, num_pages=2048)
    seqs = [cache.add() for _ in range(3)]
    appended = {}
    for i, s in enumerate(seqs):
        n = 40 + 7 * i
        positions = np.arange(n, dtype=np.int32) * 2 + i  # gaps: positions are not indices
        appended[s] = positions.tolist()
        for layer in range(layers):
            k = rng.standard_normal((n, kv_heads, dim)).astype(np.float32)
            v = rng.standard_normal((n, kv_heads, dim)).astype(np.float32)
            if dtype == KVC_DTYPE_F16:
                cache.append(s, layer, k.astype(np.float16).view(np.uint16),
                             v.astype(np.float16).view(np.uint16), positions, KVC_DTYPE_F16)
            else:
                cache.append(s, layer, k, v, positions)
            if dtype == KVC_DTYPE_F32 and layer == 0:  # f32 storage reads back exactly
                pos, kr, vr = cache.read(s, 0, 1)
                np.testing.assert_array_equal(pos, positions)
                np.testing.assert_array_equal(kr, k[:, 1])
                np.testing.assert_array_equal(vr, v[:, 1])
    for layer in range(layers):
        check_decode(cache, seqs, layer, rng, appended)

    # Page table of layer 1 agrees with the stream lengths.
    batch = np.array(seqs, np.int64)
    rows = len(seqs) * kv_heads
    nnz = C.c_int64()
    layout = PageLayout()
    lib.check(lib.lib.kvc_export_page_table(cache.h, 1, ptr(batch, C.c_int64), len(seqs), None,
                                            None, 0, C.byref(nnz), None, C.byref(layout)),
              "export size")
    indptr = np.zeros(rows + 1, np.int32)
    indices = np.zeros(nnz.value, np.int32)
    last = np.zeros(rows, np.int32)
    lib.check(lib.lib.kvc_export_page_table(cache.h, 1, ptr(batch, C.c_int64), len(seqs),
                                            ptr(indptr, C.c_int32), ptr(indices, C.c_int32),
                                            nnz.value, C.byref(nnz), ptr(last, C.c_int32),
                                            C.byref(layout)), "export")
    tpp = layout.tokens_per_page
    for r in range(rows):
        pos, _, _ = cache.read(seqs[r // kv_heads], 1, r % kv_heads)
        pages = indptr[r + 1] - indptr[r]
        assert pages == -(-len(pos) // tpp), (pages, len(pos))
        assert last[r] == len(pos) - (pages - 1) * tpp
    assert len(set(indices.tolist())) == len(indices), "no page shared without a fork"

    # Compress every sequence with a policy, then decode again over the survivors.
    stats_before = Stats()
    lib.check(lib.lib.kvc_cache_stats(cache.h, C.byref(stats_before)), "stats")
    for s in seqs:
        res = CompressResult()
        lib.check(lib.lib.kvc_compress(cache.h, s, b"streamingllm", b"keep=0.25,sinks=2", None,
                                       C.byref(res)), "compress")
        assert res.tokens_after < res.tokens_before
        total = sum(len(cache.read(s, l, h)[0]) for l in range(layers) for h in range(kv_heads))
        assert total == res.tokens_after
        pos, _, _ = cache.read(s, 0, 0)
        assert pos[0] == appended[s][0] and pos[1] == appended[s][1], "sinks kept"
        assert pos[-1] == appended[s][-1], "most recent token kept"
    stats = Stats()
    lib.check(lib.lib.kvc_cache_stats(cache.h, C.byref(stats)), "stats")
    assert stats.pages_used < stats_before.pages_used, "compression frees pages"
    for layer in range(layers):
        check_decode(cache, seqs, layer, rng, appended)
    lib.check(lib.lib.kvc_cache_validate(cache.h), "validate")

    # Errors come back as codes with a message naming the bad value; nothing raises or aborts.
    bad = lib.lib.kvc_stream_length(cache.h, seqs[0], 5, 0, C.byref(C.c_int32()))
    assert bad == KVC_OUT_OF_RANGE and b"layer 5" in lib.lib.kvc_last_error()
    bad = lib.lib.kvc_sequence_free(cache.h, 123456)
    assert bad == KVC_NOT_FOUND and b"123456" in lib.lib.kvc_last_error()
    for s in seqs:
        lib.check(lib.lib.kvc_sequence_free(cache.h, s), "free")
    cache.destroy()
    bad = lib.lib.kvc_cache_validate(cache.h)
    assert bad == KVC_INVALID_ARGUMENT and b"destroyed" in lib.lib.kvc_last_error()


def check_decode_plan(lib, rng):
    """kvc_prepare_decode + kvc_decode_attention_planned with f16 q / out (kvc_tensor,
    kvc_decode_options laid out by ctypes): equal to the f32 call on the widened q, rounded to
    nearest even (numpy's astype(float16))."""
    layers, kv_heads, q_heads, dim = 3, 2, 4, 16
    cache = Cache(lib, layers, kv_heads, q_heads, dim, KVC_DTYPE_F32, 4, 256)
    seqs = [cache.add() for _ in range(3)]
    for s, n in zip(seqs, (3, 9, 17)):
        for layer in range(layers):
            k = rng.standard_normal((n, kv_heads, dim)).astype(np.float32)
            v = rng.standard_normal((n, kv_heads, dim)).astype(np.float32)
            cache.append(s, layer, k, v, np.arange(n))
    batch = np.array(seqs, np.int64)
    plan = C.c_void_p()
    L = lib.lib
    lib.check(L.kvc_prepare_decode(cache.h, ptr(batch, C.c_int64), len(seqs), C.byref(plan)),
              "prepare")
    info = [C.c_int32(), C.c_int32(), C.c_int32()]
    lib.check(L.kvc_decode_plan_info(plan, *[C.byref(x) for x in info]), "plan info")
    assert [x.value for x in info] == [3, 0, layers]
    options = DecodeOptions()
    L.kvc_decode_options_init(C.byref(options))
    for layer in range(layers):
        q16 = rng.standard_normal((3, q_heads, dim)).astype(np.float16)
        want, want_lse = cache.decode(seqs, layer, q16.astype(np.float32))
        out16 = np.zeros((3, q_heads, dim), np.float16)
        lse = np.zeros((3, q_heads), np.float32)
        qt, ot, lt = Tensor.of(q16), Tensor.of(out16), Tensor.of(lse)
        lib.check(L.kvc_decode_attention_planned(cache.h, plan, layer, C.byref(qt), C.byref(ot),
                                                 C.byref(lt), C.byref(options)), "planned")
        assert np.array_equal(out16.view(np.uint16), want.astype(np.float16).view(np.uint16))
        assert np.array_equal(lse, want_lse)
    options.reserved = 1  # a field the library checks: the struct reached it as laid out here
    bad = L.kvc_decode_attention_planned(cache.h, plan, 0, C.byref(qt), C.byref(ot), None,
                                         C.byref(options))
    assert bad == KVC_INVALID_ARGUMENT and b"options->reserved is 1" in L.kvc_last_error()
    lib.check(L.kvc_decode_plan_destroy(plan), "plan destroy")
    cache.destroy()


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    lib = Lib(sys.argv[1])
    print("kvcache C API", lib.lib.kvc_version_string().decode())
    rng = np.random.default_rng(7)
    run_case(lib, KVC_DTYPE_F32, rng)
    run_case(lib, KVC_DTYPE_F16, rng)
    check_decode_plan(lib, rng)
    print("test_c_api_ctypes: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
