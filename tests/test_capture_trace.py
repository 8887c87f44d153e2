#!/usr/bin/env python3
"""tools/capture_trace.py on a tiny randomly initialised LLaVA model (CTest `capture_trace`).

Usage: test_capture_trace.py KVCACHE_EVAL_EXE CAPTURE_TRACE_PY WORK_DIR

Builds a 2-layer LLaMA language model (4 query heads, 2 kv heads, head dim 16) with a tiny CLIP
vision tower, captures a trace of a prompt with 16 image tokens and 3 decode steps, checks that
the captured post-RoPE keys and the values (read back from the kvcache streams the model's
attention appended to through kvcache.transformers) equal what the model itself cached with a
DynamicCache, and runs `kvcache-eval --trace` on it. Exits 4 (CTest skip) when torch,
transformers or the kvcache package is missing (the Python build registers it without the skip).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

SKIP = 4


def main():
    exe, script, work = sys.argv[1], sys.argv[2], sys.argv[3]
    try:
        import numpy as np
        import torch
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
        from transformers import LlavaForConditionalGeneration

        import kvcache.transformers  # noqa: F401
    except ImportError as e:
        print(f"skipping: {e}")
        return SKIP
    spec = importlib.util.spec_from_file_location("capture_trace", script)
    ct = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ct)

    torch.manual_seed(0)
    image_token = 100
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=8,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, rope_theta=10000.0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                      vision_feature_select_strategy="default", vision_feature_layer=-1,
                      image_seq_length=(32 // 8) ** 2)
    model = LlavaForConditionalGeneration(cfg).eval()
    n_image = (32 // 8) ** 2  # 16 patches; "default" drops the CLS token
    ids = [1, 5, 6, 7] + [image_token] * n_image + [8, 9, 10, 11, 12, 13, 14, 15]
    inputs = {"input_ids": torch.tensor([ids]),
              "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              "pixel_values": torch.randn(1, 3, 32, 32)}
    shutil.rmtree(work, ignore_errors=True)
    trace = os.path.join(work, "trace")
    manifest = ct.capture(model, inputs, image_token, steps=3, query_rows=6, out_dir=trace,
                          model_name="tiny-llava")
    failures = []

    def check(cond, what):
        if not cond:
            failures.append(what)
            print("FAILED:", what, file=sys.stderr)

    n = len(ids)
    check(manifest["prompt_len"] == n and manifest["num_layers"] == 2, "manifest shape")
    check(manifest["num_kv_heads"] == 2 and manifest["num_q_heads"] == 4 and
          manifest["head_dim"] == 16, "manifest heads")
    mods = np.load(os.path.join(trace, "modalities.npy"))
    check(int(mods.sum()) == n_image and mods[4] == 1 and mods[0] == 0, "image modality")

    # The captured keys (post-RoPE) and values equal the model's own KV cache.
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    past = out.past_key_values
    for layer in range(2):
        if hasattr(past, "layers"):  # transformers >= 5
            k_ref, v_ref = past.layers[layer].keys, past.layers[layer].values
        elif hasattr(past, "key_cache"):
            k_ref, v_ref = past.key_cache[layer], past.value_cache[layer]
        else:
            k_ref, v_ref = past[layer][0], past[layer][1]
        k_ref = k_ref[0].transpose(0, 1).numpy()  # [T, H, D]
        v_ref = v_ref[0].transpose(0, 1).numpy()
        k = np.load(os.path.join(trace, f"layer_{layer:03d}_keys.npy"))
        v = np.load(os.path.join(trace, f"layer_{layer:03d}_values.npy"))
        check(k.shape == (n, 2, 16) and v.shape == (n, 2, 16), f"layer {layer} shapes")
        check(np.allclose(k, k_ref, atol=1e-5), f"layer {layer} keys equal the model's cache")
        check(np.allclose(v, v_ref, atol=1e-5), f"layer {layer} values equal the model's cache")
        dq = np.load(os.path.join(trace, f"layer_{layer:03d}_decode_queries.npy"))
        check(dq.shape == (3, 4, 16), f"layer {layer} decode queries shape")

    out_json = os.path.join(work, "eval.json")
    r = subprocess.run([exe, "--trace", trace, "--policy", "snapkv:window=4,h2o,streamingllm",
                        "--keep", "0.5", "--quiet", "--json", out_json],
                       capture_output=True, text=True, timeout=300)
    print(r.stdout)
    print(r.stderr, file=sys.stderr)
    check(r.returncode == 0, f"kvcache-eval --trace exit status {r.returncode}")
    if r.returncode == 0:
        with open(out_json, encoding="utf-8") as f:
            res = json.load(f)
        check(res["workload"]["model"] == "tiny-llava", "model name travels")
        check(res["workload"]["prompt_len"] == n, "prompt length")
        check(res["full"]["cosine"] == 1.0, "reference fidelity")
        check(len(res["runs"]) == 3, "three runs")
    if failures:
        return 1
    print("capture_trace: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
