#!/usr/bin/env python3
"""KV memory and per-token decode time of a tiny Llama-style model's generate() under kvcache
(kvcache.transformers) vs transformers' DynamicCache, same model, prompt and greedy settings.

Per-token decode time = (time of generate(N new tokens) - time of generate(1 new token)) / (N-1),
median over --repeats runs of each, all configurations measured in the same process. KV memory:
DynamicCache = bytes of its key/value tensors after generation (its peak); kvcache = pool bytes
in use after generation (steady state) and at their peak (end of prefill, before compression).

Usage: PYTHONPATH=build/release/python <venv>/bin/python bench/python_generate.py
"""

import argparse
import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvcache.transformers as kt


def dynamic_bytes(cache):
    return sum(layer.keys.numel() * layer.keys.element_size() +
               layer.values.numel() * layer.values.element_size() for layer in cache.layers)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policies", default="full,snapkv:keep=0.1,adakv:keep=0.1,"
                    "streamingllm:keep=0.1")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 1000, (1, args.prompt))
    common = dict(do_sample=False, attention_mask=torch.ones_like(ids))

    def run(new, policy):
        if policy is None:
            cache = DynamicCache(config=cfg)
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, past_key_values=cache,
                           **common)
            return time.perf_counter() - t, dynamic_bytes(cache), dynamic_bytes(cache)
        with kt.compress(model, policy) as press:
            t = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, **common)
            dt = time.perf_counter() - t
        s = press.cache.stats()
        return dt, s["bytes_used"], s["peak_bytes"]

    configs = [("DynamicCache", None)] + [(p, p) for p in args.policies.split(",")]
    run(2, None)  # warm-up
    print(f"prompt {args.prompt}, new tokens {args.new}, Llama 4 layers x 8 q / 2 kv heads x "
          f"head_dim 32, float32, batch 1, torch threads 1; median of {args.repeats}")
    print(f"{'cache':28s} {'ms/token':>9s} {'KV bytes (end)':>15s} {'KV bytes (peak)':>16s}")
    with torch.no_grad():
        for name, policy in configs:
            long_t, short_t = [], []
            for _ in range(args.repeats):
                dt, end_bytes, peak = run(args.new, policy)
                long_t.append(dt)
                short_t.append(run(1, policy)[0])
            per_token = (statistics.median(long_t) - statistics.median(short_t)) / (args.new - 1)
            print(f"{name:28s} {per_token * 1e3:9.3f} {end_bytes:15d} {peak:16d}")


if __name__ == "__main__":
    main()
