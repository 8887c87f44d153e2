"""The kvcache Python API over numpy and torch: values, zero-copy inputs, errors."""

import numpy as np
import pytest
import torch

import kvcache
from fake_device import FakeCudaArray

L, H, HQ, D = 2, 2, 4, 16


def make_cache(dtype="f32", num_pages=256, page_tokens=8):
    return kvcache.Cache(kvcache.Config(num_layers=L, num_kv_heads=H, num_q_heads=HQ, head_dim=D,
                                        dtype=dtype, page_tokens=page_tokens,
                                        num_pages=num_pages))


def filled(n=20, seed=0):
    rng = np.random.default_rng(seed)
    cache = make_cache()
    seq = cache.add_sequence()
    k = rng.standard_normal((n, H, D), dtype=np.float32)
    v = rng.standard_normal((n, H, D), dtype=np.float32)
    for layer in range(L):
        cache.append(seq, layer, k, v, np.arange(n), modalities=np.array([0, 1] * (n // 2)))
    return cache, seq, k, v


def snapshot(cache):
    """Everything a failed call must leave unchanged."""
    state = [cache.stats()]
    for seq in cache.sequences():
        for layer in range(L):
            for h in range(H):
                r = cache.read_stream(seq, layer, h)
                state.append((seq, layer, h, r["positions"].tolist(), r["keys"].tobytes(),
                              r["values"].tobytes(), r["scores"].tobytes()))
    return state


def test_append_read_roundtrip_all_dtypes():
    for dtype, tdtype, tol in [("f32", torch.float32, 0), ("f16", torch.float16, 1e-3),
                               ("bf16", torch.bfloat16, 1e-2)]:
        cache = make_cache(dtype)
        seq = cache.add_sequence()
        k = torch.randn(5, H, D, dtype=tdtype)
        v = torch.randn(5, H, D, dtype=tdtype)
        cache.append(seq, 1, k, v, np.arange(3, 8), modalities=np.array([1, 1, 0, 0, 2]))
        r = cache.read_stream(seq, 1, 1)
        assert r["positions"].tolist() == [3, 4, 5, 6, 7]
        assert r["modalities"].tolist() == [1, 1, 0, 0, 2]
        np.testing.assert_allclose(r["keys"], k[:, 1].float().numpy(), atol=tol, rtol=tol)
        np.testing.assert_allclose(r["values"], v[:, 1].float().numpy(), atol=tol, rtol=tol)
        assert cache.stream_length(seq, 0, 0) == 0


def test_inputs_are_read_in_place_when_contiguous():
    a = np.zeros((4, H, D), np.float32)
    assert kvcache._input_view(a) == {"data_ptr": a.ctypes.data, "copied": False}
    t = torch.zeros(4, H, D, dtype=torch.bfloat16)
    assert kvcache._input_view(t) == {"data_ptr": t.data_ptr(), "copied": False}
    sliced = torch.zeros(4, H, 2 * D)[:, :, :D]  # strided: must be gathered
    view = kvcache._input_view(sliced)
    assert view["copied"] and view["data_ptr"] != sliced.data_ptr()
    # The gathered copy carries the right values.
    cache = make_cache()
    seq = cache.add_sequence()
    src = torch.randn(4, H, 2 * D)
    cache.append(seq, 0, src[:, :, :D], src[:, :, D:], np.arange(4))
    np.testing.assert_array_equal(cache.read_stream(seq, 0, 1)["keys"], src[:, 1, :D].numpy())
    np.testing.assert_array_equal(cache.read_stream(seq, 0, 1)["values"], src[:, 1, D:].numpy())


def reference_decode(k, v, q, scale):
    """Dense softmax attention of q [HQ, D] over k, v [n, H, D] (GQA groups)."""
    g = HQ // H
    out = np.zeros((HQ, D), np.float64)
    for qh in range(HQ):
        s = k[:, qh // g].astype(np.float64) @ q[qh].astype(np.float64) * scale
        p = np.exp(s - s.max())
        p /= p.sum()
        out[qh] = p @ v[:, qh // g]
    return out


def test_decode_attention_matches_reference_and_writes_out_in_place():
    cache, seq, k, v = filled()
    q = torch.randn(1, HQ, D)
    out = torch.zeros(1, HQ, D)
    lse = torch.zeros(1, HQ)
    ret = cache.decode_attention([seq], 1, q, out=out, lse=lse)
    assert ret is out  # the caller's tensor, written in place
    np.testing.assert_allclose(out[0].numpy(), reference_decode(k, v, q[0].numpy(), D ** -0.5),
                               atol=1e-5)
    assert torch.isfinite(lse).all() and (lse != 0).all()
    fresh = cache.decode_attention([seq], 1, q.numpy())
    np.testing.assert_allclose(fresh, out.numpy(), atol=1e-6)


def test_accumulated_scores_and_score_rows():
    cache, seq, k, v = filled()
    q = np.random.default_rng(1).standard_normal((1, HQ, D), dtype=np.float32)
    cache.decode_attention([seq], 0, q, accumulate_scores=True)
    scores = cache.read_stream(seq, 0, 0, keys=False, values=False)["scores"]
    assert scores.sum() == pytest.approx(1.0, abs=1e-4)  # mean over the group of probabilities
    r = cache.score_rows(seq, 0, np.repeat(q, 3, axis=0), np.array([17, 18, 19]))
    assert len(r["token_scores"]) == H and r["token_scores"][0].shape == (20,)
    assert r["below_threshold"].shape == (HQ,)


def test_policy_compress_frees_pages_and_page_table_export():
    cache, seq, _, _ = filled(n=64)
    before = cache.stats()["pages_used"]
    plan = cache.compress(seq, "streamingllm:keep=0.25,sinks=2")
    assert plan.kept_tokens() == L * H * 16
    assert cache.stream_lengths(seq).tolist() == [[16, 16], [16, 16]]
    assert cache.stats()["pages_used"] == L * H * 2 < before
    segs = cache.stream_pages(seq, 0, 0)
    assert sum(s["length"] for s in segs) == 16
    assert all(len(s["pages"]) == -(-s["length"] // s["tokens_per_page"]) for s in segs)
    kept = cache.read_stream(seq, 0, 0, keys=False, values=False)["positions"].tolist()
    assert kept == [0, 1] + list(range(50, 64))
    cache.validate()


def test_plan_then_apply_and_stale_plan_refused():
    cache, seq, k, v = filled(n=32)
    policy = kvcache.Policy("knorm:keep=0.5")
    plan = cache.plan(seq, policy)
    assert cache.stream_lengths(seq).tolist() == [[32, 32], [32, 32]]  # plan changes nothing
    cache.append(seq, 0, k[:1], v[:1], np.array([100]))
    state = snapshot(cache)
    with pytest.raises(RuntimeError, match="plan again"):
        cache.apply(plan)
    assert snapshot(cache) == state
    cache.apply(cache.plan(seq, policy))
    assert cache.stream_lengths(seq).tolist() == [[17, 17], [16, 16]]  # round(0.5 * 33) = 17


def test_window_policy_with_observations_and_fork_free():
    cache, seq, _, _ = filled(n=40)
    rows = np.random.default_rng(2).standard_normal((8, HQ, D), dtype=np.float32)
    obs = [(rows, np.arange(32, 40))] * L
    child = cache.fork(seq)
    cache.compress(child, "snapkv:keep=0.5,window=8", obs)
    assert cache.stream_lengths(child).tolist() == [[20, 20], [20, 20]]
    assert cache.stream_lengths(seq).tolist() == [[40, 40], [40, 40]]
    cache.free(child)
    assert child not in cache and seq in cache
    cache.validate()


def test_admission_masks():
    adm = kvcache.Admission.fixed_rate(0.5, seed=3, start_layer=1)
    d = adm.decide(np.arange(200))
    assert 50 < int(d.sum()) < 150
    assert adm.mask_for_layer(0, d).tolist() == [1] * 200
    assert adm.mask_for_layer(1, d).tolist() == d.tolist()
    cache = make_cache()
    seq = cache.add_sequence()
    k = np.zeros((4, H, D), np.float32)
    cache.append(seq, 1, k, k, np.arange(4), admit=np.array([1, 0, 1, 0]))
    assert cache.read_stream(seq, 1, 0)["positions"].tolist() == [0, 2]


BAD_APPENDS = [
    ("int32 keys", ValueError, "dtype int32",
     lambda c, s, k: c.append(s, 0, k.astype(np.int32), k, np.arange(4))),
    ("mixed dtypes", ValueError, "same dtype",
     lambda c, s, k: c.append(s, 0, k, k.astype(np.float16), np.arange(4))),
    ("wrong head count", ValueError, "shape",
     lambda c, s, k: c.append(s, 0, k[:, :1], k[:, :1], np.arange(4))),
    ("wrong positions length", ValueError, "positions has shape",
     lambda c, s, k: c.append(s, 0, k, k, np.arange(3))),
    ("device", ValueError, "keys is on device cuda",
     lambda c, s, k: c.append(s, 0, FakeCudaArray(k.shape), k, np.arange(4))),
    ("unknown sequence", KeyError, "unknown sequence",
     lambda c, s, k: c.append(s + 99, 0, k, k, np.arange(4))),
    ("layer out of range", IndexError, "layer 7",
     lambda c, s, k: c.append(s, 7, k, k, np.arange(4))),
    ("positions not past the stream", ValueError, "position",
     lambda c, s, k: c.append(s, 0, k, k, np.arange(4))),
    ("bad modality", ValueError, "modalities",
     lambda c, s, k: c.append(s, 0, k, k, np.arange(30, 34), modalities=np.array([0, 9, 0, 0]))),
    ("pool exhausted", MemoryError, "exhausted",
     lambda c, s, k: c.append(s, 0, np.zeros((5000, H, D), np.float32),
                              np.zeros((5000, H, D), np.float32), np.arange(30, 5030))),
]


@pytest.mark.parametrize("what,exc,message,call", BAD_APPENDS, ids=[b[0] for b in BAD_APPENDS])
def test_bad_append_raises_and_leaves_cache_unchanged(what, exc, message, call):
    cache, seq, _, _ = filled()
    k = np.ones((4, H, D), np.float32)
    state = snapshot(cache)
    with pytest.raises(exc, match=message):
        call(cache, seq, k)
    assert snapshot(cache) == state
    cache.validate()


BAD_CALLS = [
    ("unknown policy", ValueError, "unknown policy",
     lambda c, s: c.compress(s, "nosuchpolicy:keep=0.1")),
    ("bad policy value", ValueError, "keep", lambda c, s: c.compress(s, "snapkv:keep=7")),
    ("missing observations", ValueError, "observation",
     lambda c, s: c.compress(s, "snapkv:keep=0.5,window=4")),
    ("unknown sequence compress", KeyError, "unknown sequence", lambda c, s: c.compress(s + 5, "knorm")),
    ("unknown sequence free", KeyError, "unknown sequence", lambda c, s: c.free(s + 5)),
    ("f64 query", ValueError, "q has dtype float64",
     lambda c, s: c.decode_attention([s], 0, np.zeros((1, HQ, D), np.float64))),
    ("query shape", ValueError, "q has shape",
     lambda c, s: c.decode_attention([s], 0, np.zeros((1, H, D), np.float32))),
    ("float64 out", ValueError, "out has dtype float64",
     lambda c, s: c.decode_attention([s], 0, np.zeros((1, HQ, D), np.float32),
                                     out=np.zeros((1, HQ, D), np.float64))),
    ("query device", ValueError, "q is on device cuda",
     lambda c, s: c.decode_attention([s], 0, FakeCudaArray((1, HQ, D)))),
    ("kv head out of range", IndexError, "kv_head",
     lambda c, s: c.read_stream(s, 0, 9)),
]


@pytest.mark.parametrize("what,exc,message,call", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_calls_raise_and_leave_cache_unchanged(what, exc, message, call):
    cache, seq, _, _ = filled()
    state = snapshot(cache)
    with pytest.raises(exc, match=message):
        call(cache, seq)
    assert snapshot(cache) == state


def test_cuda_tensor_refused_when_a_gpu_exists():
    """On a machine with a GPU, a real CUDA tensor is refused like the fake one above."""
    if not torch.cuda.is_available():
        assert FakeCudaArray((1,)).__dlpack_device__() == (2, 0)
        return
    cache, seq, _, _ = filled()
    with pytest.raises(ValueError, match="device"):
        cache.append(seq, 0, torch.zeros(4, H, D, device="cuda"), torch.zeros(4, H, D),
                     np.arange(30, 34))


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="num_q_heads"):
        kvcache.Cache(kvcache.Config(num_layers=1, num_kv_heads=3, num_q_heads=4, head_dim=8))
    with pytest.raises(ValueError, match="dtype"):
        kvcache.Config(dtype="f64")


def test_quest_read_policy_and_page_summaries():
    cache = kvcache.Cache(kvcache.Config(num_layers=L, num_kv_heads=H, num_q_heads=HQ, head_dim=D,
                                         dtype="f32", page_tokens=8, page_summaries=True))
    seq = cache.add_sequence()
    rng = np.random.default_rng(4)
    k = rng.standard_normal((64, H, D), dtype=np.float32)
    for layer in range(L):
        cache.append(seq, layer, k, k, np.arange(64))
    pages = cache.read_page_summaries(seq, 1, 0)
    assert len(pages) == 8 and pages[1]["first_token"] == 8
    np.testing.assert_array_equal(pages[0]["key_min"], k[:8, 0].min(axis=0))
    q = rng.standard_normal((1, HQ, D), dtype=np.float32)
    dense = cache.decode_attention([seq], 1, q)
    every = cache.decode_attention([seq], 1, q, read_policy=kvcache.ReadPolicy(
        kind="quest", token_budget=64, dense_first_layers=0))
    np.testing.assert_allclose(every, dense, atol=1e-5)  # a budget covering every page
    some = cache.decode_attention([seq], 1, q, read_policy=kvcache.ReadPolicy(
        kind="quest", token_budget=24, dense_first_layers=0))
    assert not np.allclose(some, dense, atol=1e-6)  # fewer pages read: a different result
    plain = make_cache()
    with pytest.raises(RuntimeError, match="page_summaries"):
        plain.read_page_summaries(plain.add_sequence(), 0, 0)


def test_type_stubs_match_the_module(tmp_path):
    """python/kvcache/_kvcache.pyi is what nanobind.stubgen writes for the built module
    (regenerate: python -m nanobind.stubgen -m kvcache._kvcache -o python/kvcache/_kvcache.pyi)."""
    import pathlib
    import subprocess
    import sys
    out = tmp_path / "_kvcache.pyi"
    subprocess.run([sys.executable, "-m", "nanobind.stubgen", "-q", "-m", "kvcache._kvcache",
                    "-o", str(out)], check=True)
    committed = pathlib.Path(__file__).parent.parent / "kvcache" / "_kvcache.pyi"
    assert out.read_text() == committed.read_text()
