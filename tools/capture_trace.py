#!/usr/bin/env python3
"""Records a kvcache-eval trace (docs/EVAL.md, "Trace format") from a Hugging Face transformers
LLaVA-style vision-language model.

Usage:
  tools/capture_trace.py --model llava-hf/llava-1.5-7b-hf --image cat.png \
      --prompt "USER: <image>\\nWhat is shown here? ASSISTANT:" --steps 32 --out traces/llava
  kvcache-eval --trace traces/llava

What is captured goes through the same code path as kvcache's transformers integration
(kvcache.transformers, docs/PYTHON.md): the model generates with a KVCache under policy "full"
and record=True, so
  * keys and values are read back from the kvcache streams the model's own attention layers
    appended to (post-RoPE keys, as the attention kernel sees them; values carry no RoPE);
    prompt tokens are the first n stream tokens, each decode step's token the following ones;
  * queries are what the "kvcache" attention function received: the last --query-rows prompt
    rows and each decode step's query (post-RoPE);
  * positions and modalities are the streams' own (image where the expanded input_ids equal the
    model's image token id, positions 0..n-1).
The model runs in float32 on the CPU; files are written as float32 .npy.
Requires torch, transformers (>= 5; LLaVA / LLaVA-NeXT with a LLaMA-family language model whose
processor expands the image placeholder into one token per image feature), numpy, pillow, and
the kvcache package (pip install ., or PYTHONPATH=build/release/python).
"""
import argparse
import json
import os
import sys

import numpy as np


def capture(model, inputs, image_token_id, steps, query_rows, out_dir, model_name="model"):
    """Runs the prompt `inputs` (dict of generate() inputs, batch 1) and `steps` greedy decode
    steps through kvcache.transformers and writes the trace to out_dir. Returns the manifest."""
    import kvcache.transformers as kt  # noqa: PLC0415

    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError("capture needs batch size 1")
    with kt.compress(model, "full", record=True, image_token_id=image_token_id) as press:
        model.generate(**inputs, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                       do_sample=False)
    cache = press.cache
    seq = cache.seqs[0]
    layers, heads = cache.num_layers, cache.num_kv_heads
    n = cache.prompt_tokens[0]
    if query_rows > n:
        raise ValueError(f"--query-rows {query_rows} exceeds the prompt length {n}")
    first = cache.kv.read_stream(seq, 0, 0, keys=False, values=False)
    if first["length"] != n + steps:
        raise RuntimeError(f"stream holds {first['length']} tokens, expected {n} + {steps}")

    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, "positions.npy"), first["positions"][:n].astype(np.int32))
    np.save(os.path.join(out_dir, "modalities.npy"), first["modalities"][:n].astype(np.uint8))
    np.save(os.path.join(out_dir, "decode_positions.npy"),
            first["positions"][n:].astype(np.int32))
    manifest_layers = []
    for layer in range(layers):
        streams = [cache.kv.read_stream(seq, layer, h) for h in range(heads)]
        keys = np.stack([st["keys"] for st in streams], axis=1)      # [n + steps, H, D]
        values = np.stack([st["values"] for st in streams], axis=1)
        rec = cache.recorded[layer]
        arrays = {
            "keys": keys[:n], "values": values[:n],
            "queries": rec["prompt_queries"][0][n - query_rows:],
            "decode_queries": np.concatenate(rec["decode_queries"], axis=0),
            "decode_keys": keys[n:], "decode_values": values[n:],
        }
        entry = {}
        for key, arr in arrays.items():
            name = f"layer_{layer:03d}_{key}.npy"
            np.save(os.path.join(out_dir, name), np.ascontiguousarray(arr, dtype=np.float32))
            entry[key] = name
        manifest_layers.append(entry)
    manifest = {
        "format": "kvcache-trace", "version": 1, "model": model_name,
        "num_layers": layers, "num_kv_heads": heads, "num_q_heads": cache.num_q_heads,
        "head_dim": cache.head_dim, "prompt_len": int(n), "decode_steps": int(steps),
        "query_rows": int(query_rows), "positions": "positions.npy",
        "modalities": "modalities.npy", "decode_positions": "decode_positions.npy",
        "layers": manifest_layers,
    }
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face id or local path of a LLaVA model")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", default="USER: <image>\nDescribe the image in detail. ASSISTANT:",
                   help="text with the processor's image placeholder")
    p.add_argument("--steps", type=int, default=32, help="greedy decode steps (default 32)")
    p.add_argument("--query-rows", type=int, default=64,
                   help="last prompt rows whose queries are stored (default 64)")
    p.add_argument("--out", required=True, help="output directory")
    a = p.parse_args(argv)
    if a.steps < 1 or a.query_rows < 1:
        p.error("--steps and --query-rows must be >= 1")
    try:
        import torch  # noqa: F401, PLC0415
        from PIL import Image  # noqa: PLC0415
        from transformers import AutoProcessor  # noqa: PLC0415
        from transformers import AutoModelForImageTextToText  # noqa: PLC0415

        import kvcache.transformers  # noqa: F401, PLC0415
    except ImportError as e:
        print(f"capture_trace.py: needs torch, transformers, pillow and kvcache: {e}",
              file=sys.stderr)
        return 1
    processor = AutoProcessor.from_pretrained(a.model)
    model = AutoModelForImageTextToText.from_pretrained(a.model, dtype=torch.float32).eval()
    inputs = processor(images=Image.open(a.image).convert("RGB"), text=a.prompt,
                       return_tensors="pt")
    image_token_id = getattr(model.config, "image_token_index", None)
    if image_token_id is None:
        image_token_id = model.config.image_token_id
    m = capture(model, dict(inputs), image_token_id, a.steps, a.query_rows, a.out, a.model)
    print(f"wrote {a.out}: {m['num_layers']} layers, prompt {m['prompt_len']} tokens "
          f"({int(np.load(os.path.join(a.out, 'modalities.npy')).sum())} image), "
          f"{m['decode_steps']} decode steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
