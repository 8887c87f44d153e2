"""Real transformers model code (Llama with GQA, LLaVA) generating through kvcache."""

import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import kvcache
import kvcache.transformers as kt
import tiny_models as tm

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def models():
    return {"llama": (tm.llama(), tm.text_inputs), "llava": (tm.llava(), tm.vision_inputs),
            "llava_next": (tm.llava_next(), tm.next_inputs)}


def generate(model, inputs, max_new_tokens, **kw):
    # min_new_tokens: random weights may emit EOS early; every test wants the full length.
    return model.generate(**inputs, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, max_new_tokens=max_new_tokens,
                          min_new_tokens=max_new_tokens, **kw)


def dynamic(model, inputs, new_tokens):
    cfg = model.config.get_text_config()
    return generate(model, inputs, new_tokens, past_key_values=DynamicCache(config=cfg))


@pytest.mark.parametrize("name", ["llama", "llava", "llava_next"])
@pytest.mark.parametrize("batch", [1, 2])
def test_full_policy_equals_dynamic_cache(models, name, batch):
    model, make_inputs = models[name]
    inputs = make_inputs(batch)
    ref = dynamic(model, inputs, NEW_TOKENS)
    with kt.compress(model, "full") as press:
        got = generate(model, inputs, max_new_tokens=NEW_TOKENS)
    assert torch.equal(got.sequences, ref.sequences)
    assert len(got.logits) == NEW_TOKENS
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # The decode steps really read kvcache: every real token is in every stream.
    real = inputs["attention_mask"].sum(1).tolist()
    for row, lengths in enumerate(press.cache.stream_lengths()):
        assert (lengths == real[row] + NEW_TOKENS - 1).all()
    assert model.config.get_text_config()._attn_implementation == "sdpa"  # restored


def test_image_tokens_are_tagged(models):
    model, make_inputs = models["llava"]
    inputs = make_inputs(2)
    with kt.compress(model, "full") as press:
        generate(model, inputs, max_new_tokens=2)
    cache = press.cache
    for row, first_image in [(0, 4), (1, 4)]:  # row 1: 5 pads dropped, image at 9 - 5
        mods = cache.kv.read_stream(cache.seqs[row], 2, 1, keys=False, values=False)["modalities"]
        expected = np.zeros(mods.shape[0], np.uint8)
        expected[first_image:first_image + tm.IMAGE_TOKENS] = kvcache.IMAGE
        np.testing.assert_array_equal(mods, expected)


def policy_spec(name, defaults):
    """The registry policy with parameters that fit a 40-token prompt."""
    keys = {kv.split("=")[0] for kv in defaults.split(",") if kv}
    params = []
    if "keep" in keys:
        params.append("keep=0.3")
    if "window" in keys:
        params.append("window=4")
    if "think_window" in keys:
        params += ["think_window=4", "think_recent=4"]
    if name == "think":
        params += ["recent=4", "lambda=0.6"]
    if "heavy" in keys:
        params += ["heavy=0.15", "recent=0.15"]
    if name == "fastv":
        params.append("layer=1")
    if name == "prumerge":
        params.append("knn=4")
    return name + (":" + ",".join(params) if params else "")


def pages_of(cache, seq):
    cfg = cache.config
    total = 0
    for layer in range(cfg.num_layers):
        for h in range(cfg.num_kv_heads):
            total += sum(len(s["pages"]) for s in cache.stream_pages(seq, layer, h))
    return total


@pytest.mark.parametrize("name,summary,defaults", kvcache.list_policies(),
                         ids=[p[0] for p in kvcache.list_policies()])
def test_every_policy_runs_through_generate(models, name, summary, defaults):
    model, make_inputs = models["llava"]
    inputs = make_inputs(2)
    new_tokens = 4
    with kt.compress(model, policy_spec(name, defaults), page_tokens=4) as press:
        out = generate(model, inputs, max_new_tokens=new_tokens)
    assert out.sequences.shape[1] == 40 + new_tokens
    cache = press.cache
    real = inputs["attention_mask"].sum(1).tolist()
    stats = cache.stats()
    for row, seq in enumerate(cache.seqs):
        plan = cache.plans[row]
        expected = np.full((cache.num_layers, cache.num_kv_heads), real[row])
        for sp in plan.streams:
            expected[sp.layer, sp.kv_head] = len(sp.kept)
        # Every stream holds what the plan kept plus the decoded tokens, nothing else.
        np.testing.assert_array_equal(cache.stream_lengths()[row], expected + new_tokens - 1)
        if name != "full":
            assert plan.streams, f"{name} planned nothing"
    # The pool holds exactly the pages of the streams' segments, fewer than a full cache's.
    assert stats["pages_used"] == sum(pages_of(cache.kv, s) for s in cache.seqs)
    full_pages = sum(2 * cache.num_layers * cache.num_kv_heads *
                     math.ceil((r + new_tokens - 1) / 4) for r in real) // 2
    if name == "full":
        assert stats["pages_used"] == full_pages
    elif name == "think":  # keeps every token; pruned keys pack more tokens per page
        segs = cache.kv.stream_pages(cache.seqs[0], 0, 0)
        assert segs[0]["key_width"] < cache.head_dim
        assert segs[0]["tokens_per_page"] > 4
        assert stats["pages_used"] <= full_pages
    else:
        assert stats["pages_used"] < full_pages, (name, stats["pages_used"], full_pages)
    cache.kv.validate()


def test_adakv_gives_different_head_lengths(models):
    model, make_inputs = models["llama"]
    with kt.compress(model, "adakv:keep=0.3,window=4") as press:
        generate(model, make_inputs(1), max_new_tokens=4)
    lengths = press.cache.stream_lengths()[0]
    assert len(set(lengths.flatten().tolist())) > 1, lengths
    # The per-layer budget is still respected: heads share round(0.3 * 40) * heads tokens.
    assert (lengths.sum(axis=1) <= (12 + 3) * 2 + 2).all()


@pytest.mark.parametrize("spec", ["snapkv:keep=1,window=4", "streamingllm:keep=1"])
def test_keep_one_equals_full(models, spec):
    model, make_inputs = models["llama"]
    inputs = make_inputs(2)
    with kt.compress(model, "full"):
        full = generate(model, inputs, max_new_tokens=16)
    with kt.compress(model, spec) as press:
        got = generate(model, inputs, max_new_tokens=16)
    assert torch.equal(got.sequences, full.sequences)
    for a, b in zip(got.logits, full.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(not p.streams for p in press.cache.plans)


def test_h2o_accumulates_and_compresses_during_decode(models):
    model, make_inputs = models["llama"]
    inputs = make_inputs(1)
    with kt.compress(model, "h2o:heavy=0.2,recent=0.2", compress_every=4) as press:
        generate(model, inputs, max_new_tokens=13)
    cache = press.cache
    assert len(cache.plans) == 1 + 3  # after prefill, then at decode steps 4, 8, 12
    lengths = cache.stream_lengths()[0]
    # 40 -> 16 after prefill; +4 -> 20 -> 8 (0.4 * 20); +4 -> 12 -> 4; +4 -> 8 -> 2 (+0)
    assert (lengths < 20).all(), lengths
    scores = cache.kv.read_stream(cache.seqs[0], 1, 0, keys=False, values=False)["scores"]
    assert (scores > 0).any()


def test_dynamic_llava_admission(models):
    model, make_inputs = models["llava"]
    inputs = make_inputs(1)
    with kt.compress(model, "full"):
        full = generate(model, inputs, max_new_tokens=12)
    # Admitting every token stores everything: the merge of the token's own K/V with the
    # cached attention must give the plain result.
    with kt.compress(model, "full", admission=kvcache.Admission.fixed_rate(1.0)):
        all_in = generate(model, inputs, max_new_tokens=12)
    assert torch.equal(all_in.sequences, full.sequences)
    for a, b in zip(all_in.logits, full.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with kt.compress(model, "full", admission=kvcache.Admission.fixed_rate(0.3, seed=1)) as p:
        generate(model, inputs, max_new_tokens=12)
    lengths = p.cache.stream_lengths()[0]
    assert (lengths[:2] == 40 + 11).all()       # layers below start_layer store every token
    assert (lengths[2:] < 40 + 11).all() and (lengths[2:] >= 40).all()


def test_savings_reported(models):
    model, make_inputs = models["llama"]
    with kt.compress(model, "snapkv:keep=0.2,window=4") as press:
        generate(model, make_inputs(2), max_new_tokens=4)
    s = press.cache.stats()
    assert s["bytes_used"] < s["dense_bytes"] / 2
    assert s["bytes_used"] == s["pages_used"] * s["page_bytes"]


def test_bad_inputs_raise(models):
    model, make_inputs = models["llama"]
    with pytest.raises(ValueError, match="unknown policy"):
        kt.KVCache(model, "nosuch")
    with pytest.raises(ValueError, match="observation"):
        kt.KVCache(model, "snapkv:keep=0.1", compress_every=4)
    cache = kt.KVCache(model, "full")
    with pytest.raises(NotImplementedError):
        cache.reorder_cache(torch.tensor([0]))


def test_bfloat16_model_stores_bfloat16(models):
    _, make_inputs = models["llama"]
    model16 = tm.llama().to(torch.bfloat16)
    inputs = make_inputs(2)
    ref = dynamic(model16, inputs, 8)
    with kt.compress(model16, "full") as press:
        got = generate(model16, inputs, 8)
    assert press.cache.kv.config.dtype == "bf16"
    # bf16 rounding differs between the two attention paths; the logits stay close.
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.05)
    s = press.cache.stats()
    assert s["bytes_used"] == s["pages_used"] * s["page_bytes"]
    assert s["page_bytes"] == 16 * 2 * press.cache.head_dim * 2  # 16 rows of bf16 K+V


def test_kvcache_attention_without_a_kvcache_is_plain_sdpa(models):
    """The "kvcache" implementation only takes over calls whose keys came from a KVCache; a
    forward with a DynamicCache (or none) under it is the model's own SDPA attention."""
    model, make_inputs = models["llama"]
    inputs = make_inputs(2)
    with torch.no_grad():
        ref = model(**inputs).logits
        with kt.compress(model, "full"):
            assert model.config._attn_implementation == "kvcache"
            got = model(**inputs, past_key_values=DynamicCache(config=model.config)).logits
    torch.testing.assert_close(got, ref)


def test_prepare_with_other_token_ids_is_refused(models):
    model, make_inputs = models["llava"]
    inputs = make_inputs(1)
    cache = kt.KVCache(model, "full")
    cache.prepare(inputs["input_ids"][:, :30])  # not what the model embeds
    with kt.compress(model, "full"):
        with pytest.raises(ValueError, match="prepare\\(\\) saw 30 prompt tokens"):
            model.generate(**inputs, max_new_tokens=2, past_key_values=cache)
