#!/usr/bin/env python3
"""Records a kvcache-eval trace (docs/EVAL.md, "Trace format") from a Hugging Face transformers
LLaVA-style vision-language model.

Usage:
  tools/capture_trace.py --model llava-hf/llava-1.5-7b-hf --image cat.png \
      --prompt "USER: <image>\\nWhat is shown here? ASSISTANT:" --steps 32 --out traces/llava
  kvcache-eval --trace traces/llava

What is captured, per decoder layer of the language model (forward pre-hooks on every
`...self_attn` module outside the vision tower):
  * the hidden states entering the attention module; from them q = q_proj(h), k = k_proj(h),
    v = v_proj(h) are recomputed per head, and the rotary embedding the model hands to that
    attention module (its `position_embeddings` = (cos, sin), or the module's own rotary_emb on
    older transformers) is applied to q and k: keys and queries are POST-RoPE, as the attention
    kernel sees them. Values carry no RoPE.
  * prompt keys/values for every prompt token; the queries of the last --query-rows prompt rows;
    for each of --steps greedy decode steps the new token's query, key and value.
  * modalities: 1 (image) where the expanded input_ids equal the model's image token id, else 0
    (text); positions 0..n-1.
The model runs in float32 on the chosen device; files are written as float32 .npy.
Requires torch, transformers (>= 4.45; LLaVA / LLaVA-NeXT with a LLaMA-family language model
whose processor expands the image placeholder into one token per image feature), numpy, pillow.
"""
import argparse
import json
import os
import sys

import numpy as np


def _language_attention_modules(model):
    """The self-attention modules of the language model's decoder layers, in layer order."""
    found = []
    for name, module in model.named_modules():
        if not name.endswith("self_attn") or "vision" in name:
            continue
        if not all(hasattr(module, p) for p in ("q_proj", "k_proj", "v_proj")):
            continue
        parts = name.split(".")
        index = int(parts[-2]) if parts[-2].isdigit() else len(found)
        found.append((index, name, module))
    found.sort(key=lambda x: x[0])
    return [(name, module) for _, name, module in found]


def _rotate_half(x):
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis (LLaMA's RoPE layout)."""
    half = x.shape[-1] // 2
    return _torch().cat([-x[..., half:], x[..., :half]], dim=-1)


def _torch():
    import torch  # noqa: PLC0415
    return torch


def _text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


class _Recorder:
    """Forward pre-hook state: per layer, the post-RoPE q/k and v of the latest forward call."""

    def __init__(self, model):
        cfg = _text_config(model)
        self.num_q_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_q_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_q_heads
        self.modules = _language_attention_modules(model)
        if not self.modules:
            raise RuntimeError("no language-model self_attn modules with q_proj/k_proj/v_proj")
        self.latest = [None] * len(self.modules)
        self.handles = []
        for layer, (_, module) in enumerate(self.modules):
            self.handles.append(module.register_forward_pre_hook(self._hook(layer, module),
                                                                 with_kwargs=True))

    def _hook(self, layer, module):
        torch = _torch()

        def hook(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            b, t, _ = h.shape
            with torch.no_grad():
                q = mod.q_proj(h).view(b, t, self.num_q_heads, self.head_dim)
                k = mod.k_proj(h).view(b, t, self.num_kv_heads, self.head_dim)
                v = mod.v_proj(h).view(b, t, self.num_kv_heads, self.head_dim)
                pe = kwargs.get("position_embeddings")
                if pe is None:  # older transformers: the module owns its rotary embedding
                    pos = kwargs.get("position_ids")
                    pe = mod.rotary_emb(v, pos)
                cos, sin = pe  # [b, t, head_dim]
                cos = cos.unsqueeze(2).to(q.dtype)
                sin = sin.unsqueeze(2).to(q.dtype)
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
            self.latest[layer] = (q[0].float().cpu().numpy(), k[0].float().cpu().numpy(),
                                  v[0].float().cpu().numpy())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def capture(model, inputs, image_token_id, steps, query_rows, out_dir, model_name="model"):
    """Runs the prompt `inputs` (dict for model(**inputs), batch 1) and `steps` greedy decode
    steps, and writes the trace to out_dir. Returns the manifest dict."""
    torch = _torch()
    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError("capture needs batch size 1")
    rec = _Recorder(model)
    layers = len(rec.modules)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            prompt = list(rec.latest)
            n = prompt[0][1].shape[0]
            if n != input_ids.shape[1]:
                raise RuntimeError(
                    f"the language model saw {n} prompt tokens but input_ids has "
                    f"{input_ids.shape[1]}: this transformers version expands the image inside "
                    "the model; use one whose processor expands the image placeholder")
            if query_rows > n:
                raise ValueError(f"--query-rows {query_rows} exceeds the prompt length {n}")
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = inputs.get("attention_mask")
            decode = [[] for _ in range(layers)]
            for _ in range(steps):
                kwargs = {"input_ids": token, "past_key_values": past, "use_cache": True}
                if mask is not None:
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    kwargs["attention_mask"] = mask
                out = model(**kwargs)
                for layer in range(layers):
                    decode[layer].append(rec.latest[layer])
                past = out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)
    finally:
        rec.remove()

    os.makedirs(out_dir, exist_ok=True)
    ids = input_ids[0].cpu().numpy()
    modalities = (ids == image_token_id).astype(np.uint8)
    np.save(os.path.join(out_dir, "positions.npy"), np.arange(n, dtype=np.int32))
    np.save(os.path.join(out_dir, "modalities.npy"), modalities)
    np.save(os.path.join(out_dir, "decode_positions.npy"), np.arange(n, n + steps, dtype=np.int32))
    manifest_layers = []
    for layer in range(layers):
        q, k, v = prompt[layer]
        arrays = {
            "keys": k, "values": v, "queries": q[n - query_rows:],
            "decode_queries": np.concatenate([d[0] for d in decode[layer]], axis=0),
            "decode_keys": np.concatenate([d[1] for d in decode[layer]], axis=0),
            "decode_values": np.concatenate([d[2] for d in decode[layer]], axis=0),
        }
        entry = {}
        for key, arr in arrays.items():
            name = f"layer_{layer:03d}_{key}.npy"
            np.save(os.path.join(out_dir, name), np.ascontiguousarray(arr, dtype=np.float32))
            entry[key] = name
        manifest_layers.append(entry)
    manifest = {
        "format": "kvcache-trace", "version": 1, "model": model_name,
        "num_layers": layers, "num_kv_heads": rec.num_kv_heads, "num_q_heads": rec.num_q_heads,
        "head_dim": rec.head_dim, "prompt_len": int(n), "decode_steps": int(steps),
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
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output directory")
    a = p.parse_args(argv)
    if a.steps < 1 or a.query_rows < 1:
        p.error("--steps and --query-rows must be >= 1")
    try:
        import torch  # noqa: F401, PLC0415
        from PIL import Image  # noqa: PLC0415
        from transformers import AutoProcessor  # noqa: PLC0415
        from transformers import AutoModelForVision2Seq  # noqa: PLC0415
    except ImportError as e:
        print(f"capture_trace.py: needs torch, transformers and pillow: {e}", file=sys.stderr)
        return 1
    processor = AutoProcessor.from_pretrained(a.model)
    model = AutoModelForVision2Seq.from_pretrained(a.model, torch_dtype=torch.float32)
    model.to(a.device).eval()
    inputs = processor(images=Image.open(a.image).convert("RGB"), text=a.prompt,
                       return_tensors="pt").to(a.device)
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
