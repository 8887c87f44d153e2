"""Decode from Python: DecodePlan (Cache.prepare_decode, then decode_attention(plan, layer, ...))
and float16 / bfloat16 q and out. The oracle is the batch call on float32 arrays: a planned call
must equal it bit for bit, and an f16 / bf16 out must equal its f32 result rounded to nearest
even (numpy's astype(float16) and torch's .to(bfloat16) both round to nearest even)."""

import numpy as np
import pytest
import torch

import kvcache
from fake_device import FakeCudaArray

L, H, HQ, D = 4, 2, 4, 16
LENGTHS = (5, 13, 21)


def make_batch(seed=0, dtype="f32"):
    rng = np.random.default_rng(seed)
    cache = kvcache.Cache(kvcache.Config(num_layers=L, num_kv_heads=H, num_q_heads=HQ, head_dim=D,
                                         dtype=dtype, page_tokens=4, num_pages=512))
    seqs = [cache.add_sequence() for _ in LENGTHS]
    for s, n in zip(seqs, LENGTHS):
        append(cache, s, 0, n, rng)
    return cache, seqs, rng


def append(cache, seq, first_pos, n, rng):
    for layer in range(L):
        k = rng.standard_normal((n, H, D), dtype=np.float32)
        v = rng.standard_normal((n, H, D), dtype=np.float32)
        cache.append(seq, layer, k, v, np.arange(first_pos, first_pos + n))


def test_plan_properties_and_lifetime():
    cache, seqs, _ = make_batch()
    plan = cache.prepare_decode(seqs[::-1])
    assert isinstance(plan, kvcache.DecodePlan)
    assert plan.batch == seqs[::-1]
    assert (plan.first_layer, plan.num_layers) == (0, L)
    del cache  # the plan keeps its cache alive
    assert plan.batch == seqs[::-1]


def test_planned_equals_batch_decode_bit_for_bit_across_layers_and_appends():
    cache, seqs, rng = make_batch(1)
    plan = cache.prepare_decode(seqs)
    next_pos = list(LENGTHS)
    for step in range(3):
        for layer in range(L):
            q = rng.standard_normal((len(seqs), HQ, D), dtype=np.float32)
            want_lse = np.empty((len(seqs), HQ), np.float32)
            want = cache.decode_attention(seqs, layer, q, lse=want_lse)
            got_lse = np.full((len(seqs), HQ), np.nan, np.float32)
            got = np.full((len(seqs), HQ, D), np.nan, np.float32)
            assert cache.decode_attention(plan, layer, q, out=got, lse=got_lse) is not None
            assert got.tobytes() == want.tobytes()
            assert got_lse.tobytes() == want_lse.tobytes()
            assert cache.decode_attention(plan, layer, q).tobytes() == want.tobytes()
        # Appends after prepare_decode are seen by the same plan (the engine's step order).
        for i, s in enumerate(seqs):
            append(cache, s, next_pos[i], 1 + 4 * step, rng)
            next_pos[i] += 1 + 4 * step
    cache.validate()


def f16_bits(x):
    return x.astype(np.float16).view(np.uint16)


def bf16_bits(x):
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy()


@pytest.mark.parametrize("planned", [False, True], ids=["batch", "plan"])
def test_f16_bf16_q_and_out_equal_the_rounded_f32_result(planned):
    cache, seqs, rng = make_batch(2)
    plan = cache.prepare_decode(seqs)
    target = plan if planned else seqs
    q32 = rng.standard_normal((len(seqs), HQ, D), dtype=np.float32)
    inputs = {
        "f32": (q32, q32),
        "numpy f16": (q32.astype(np.float16), q32.astype(np.float16).astype(np.float32)),
        "torch f16": (torch.from_numpy(q32).to(torch.float16),
                      torch.from_numpy(q32).to(torch.float16).float().numpy()),
        "torch bf16": (torch.from_numpy(q32).to(torch.bfloat16),
                       torch.from_numpy(q32).to(torch.bfloat16).float().numpy()),
    }
    for layer in (0, L - 1):
        for name, (q, widened) in inputs.items():
            # The f32 result of the exactly widened q: the reference for every out dtype.
            want = cache.decode_attention(seqs, layer, widened)
            assert cache.decode_attention(target, layer, q).tobytes() == want.tobytes(), name
            out16 = np.zeros((len(seqs), HQ, D), np.float16)
            cache.decode_attention(target, layer, q, out=out16)
            np.testing.assert_array_equal(out16.view(np.uint16), f16_bits(want), err_msg=name)
            out_bf = torch.zeros((len(seqs), HQ, D), dtype=torch.bfloat16)
            assert cache.decode_attention(target, layer, q, out=out_bf) is not None
            np.testing.assert_array_equal(out_bf.view(torch.int16).numpy(), bf16_bits(want),
                                          err_msg=name)
            out_t16 = torch.zeros((len(seqs), HQ, D), dtype=torch.float16)
            cache.decode_attention(target, layer, q, out=out_t16)
            np.testing.assert_array_equal(out_t16.numpy().view(np.uint16), f16_bits(want),
                                          err_msg=name)


def test_stale_plan_and_freed_sequence_raise_runtime_error_and_write_nothing():
    cache, seqs, rng = make_batch(3)
    plan = cache.prepare_decode(seqs)
    q = rng.standard_normal((len(seqs), HQ, D), dtype=np.float32)
    cache.decode_attention(plan, 0, q)
    cache.compress(seqs[2], "streamingllm:keep=0.5,sinks=1")  # Apply after prepare_decode
    out = np.full((len(seqs), HQ, D), 7.0, np.float32)
    with pytest.raises(RuntimeError, match="prepare again"):
        cache.decode_attention(plan, 1, q, out=out)
    assert (out == 7.0).all()
    plan = cache.prepare_decode(seqs)  # prepared again, it decodes
    assert cache.decode_attention(plan, 1, q).tobytes() == \
        cache.decode_attention(seqs, 1, q).tobytes()
    cache.free(seqs[0])
    with pytest.raises(RuntimeError, match="freed"):
        cache.decode_attention(plan, 1, q, out=out)
    assert (out == 7.0).all()
    cache.validate()


def other_plan():
    other, seqs, _ = make_batch(9)
    return other.prepare_decode(seqs)


def bad_calls():
    b = len(LENGTHS)
    q = np.zeros((b, HQ, D), np.float32)
    return [
        ("q shape", ValueError, "q has shape",
         lambda c, p, o: c.decode_attention(p, 0, np.zeros((b, H, D), np.float32), out=o)),
        ("q batch", ValueError, "q has shape",
         lambda c, p, o: c.decode_attention(p, 0, np.zeros((b - 1, HQ, D), np.float32), out=o)),
        ("q float64", ValueError, "q has dtype float64",
         lambda c, p, o: c.decode_attention(p, 0, q.astype(np.float64), out=o)),
        ("q int", ValueError, "q has dtype int32",
         lambda c, p, o: c.decode_attention(p, 0, q.astype(np.int32), out=o)),
        ("out float64", ValueError, "out has dtype float64",
         lambda c, p, o: c.decode_attention(p, 0, q, out=np.zeros((b, HQ, D), np.float64))),
        ("out shape", ValueError, "out has shape",
         lambda c, p, o: c.decode_attention(p, 0, q, out=np.zeros((b, HQ, D + 1), np.float32))),
        ("out strided", ValueError, "out must be C-contiguous",
         lambda c, p, o: c.decode_attention(p, 0, q,
                                            out=np.zeros((b, HQ, 2 * D), np.float32)[:, :, ::2])),
        ("lse f16", ValueError, "lse has dtype float16",
         lambda c, p, o: c.decode_attention(p, 0, q, out=o, lse=np.zeros((b, HQ), np.float16))),
        ("lse shape", ValueError, "lse has shape",
         lambda c, p, o: c.decode_attention(p, 0, q, out=o, lse=np.zeros((b, H), np.float32))),
        ("q device", ValueError, "q is on device cuda",
         lambda c, p, o: c.decode_attention(p, 0, FakeCudaArray((b, HQ, D)), out=o)),
        ("out device", ValueError, "out is on device cuda",
         lambda c, p, o: c.decode_attention(p, 0, q, out=FakeCudaArray((b, HQ, D)))),
        ("layer", IndexError, "layer 4",
         lambda c, p, o: c.decode_attention(p, L, q, out=o)),
        ("aggregation", ValueError, "aggregation",
         lambda c, p, o: c.decode_attention(p, 0, q, out=o, accumulate_scores=True,
                                            aggregation="median")),
        ("other cache's plan", ValueError, "another Cache",
         lambda c, p, o: c.decode_attention(other_plan(), 0, q, out=o)),
    ]


BAD = bad_calls()


@pytest.mark.parametrize("what,exc,message,call", BAD, ids=[b[0] for b in BAD])
def test_bad_planned_calls_raise_and_write_nothing(what, exc, message, call):
    cache, seqs, _ = make_batch(4)
    plan = cache.prepare_decode(seqs)
    out = np.full((len(seqs), HQ, D), 7.0, np.float32)
    before = cache.stats()
    with pytest.raises(exc, match=message):
        call(cache, plan, out)
    assert (out == 7.0).all()
    assert cache.stats() == before


def test_prepare_decode_refusals():
    cache, seqs, _ = make_batch(5)
    with pytest.raises(ValueError, match="empty batch"):
        cache.prepare_decode([])
    with pytest.raises(ValueError, match="twice"):
        cache.prepare_decode([seqs[0], seqs[0]])
    with pytest.raises(KeyError, match="unknown sequence"):
        cache.prepare_decode([seqs[0], 999])


def test_cuda_tensors_refused_when_a_gpu_exists():
    """On a machine with a GPU, real CUDA q / out are refused like the fake ones above (the
    Python layer passes host memory only)."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU: covered by FakeCudaArray in test_bad_planned_calls_raise_and_write_nothing")
    cache, seqs, _ = make_batch(6)
    plan = cache.prepare_decode(seqs)
    with pytest.raises(ValueError, match="device"):
        cache.decode_attention(plan, 0, torch.zeros(len(seqs), HQ, D, device="cuda"))
