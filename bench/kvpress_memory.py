#!/usr/bin/env python3
"""KV memory of kvpress's SnapKV and AdaKV presses on the same tiny Llama-style model, prompt
and decode length as bench/python_generate.py, for the freed-vs-masked comparison in
docs/BENCHMARKS.md. kvpress 0.5.5 needs transformers < 5.3, so this runs in its own environment
(bench/requirements-kvpress.txt), not beside python/requirements.txt's transformers:

  python3 -m venv ~/.cache/kvcache/bench-kvpress
  ~/.cache/kvcache/bench-kvpress/bin/pip install -r bench/requirements-kvpress.txt
  ~/.cache/kvcache/bench-kvpress/bin/python bench/kvpress_memory.py

KV bytes = the bytes of the DynamicCache's key/value tensors; "after prefill" is measured after
a forward of the prompt under the press, "end" after generate() of --new tokens under it, "peak"
is the largest total seen after any decoder layer's attention during the prefill.
"""

import argparse

import torch
from kvpress import AdaKVPress, SnapKVPress, StreamingLLMPress
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM


def kv_bytes(cache):
    return sum(layer.keys.numel() * layer.keys.element_size() +
               layer.values.numel() * layer.values.element_size()
               for layer in cache.layers if layer.keys is not None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 1000, (1, args.prompt))
    presses = {
        "none (DynamicCache)": None,
        "SnapKVPress(0.9, window 32)": lambda: SnapKVPress(compression_ratio=0.9, window_size=32),
        "AdaKVPress(SnapKV 0.9, window 32)":
            lambda: AdaKVPress(SnapKVPress(compression_ratio=0.9, window_size=32)),
        "StreamingLLMPress(0.9)": lambda: StreamingLLMPress(compression_ratio=0.9),
    }
    print(f"prompt {args.prompt}, new tokens {args.new}, same model as bench/python_generate.py")
    print(f"{'press':36s} {'after prefill':>14s} {'peak (prefill)':>15s} {'end':>10s}")
    for name, make in presses.items():
        peak = [0]
        cache = DynamicCache(config=cfg)
        hooks = [layer.self_attn.register_forward_hook(
            lambda *a: peak.__setitem__(0, max(peak[0], kv_bytes(cache))))
            for layer in model.model.layers]
        with torch.no_grad():
            if make is None:
                model(ids, past_key_values=cache)
            else:
                with make()(model):
                    model(ids, past_key_values=cache)
        for h in hooks:
            h.remove()
        after_prefill = kv_bytes(cache)
        gen_cache = DynamicCache(config=cfg)
        with torch.no_grad():
            if make is None:
                model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new,
                               do_sample=False, past_key_values=gen_cache)
            else:
                with make()(model):
                    model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new,
                                   do_sample=False, past_key_values=gen_cache)
        print(f"{name:36s} {after_prefill:14d} {peak[0]:15d} {kv_bytes(gen_cache):10d}")


if __name__ == "__main__":
    main()
