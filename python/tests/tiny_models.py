"""Tiny transformers models built from configs with random weights (nothing is downloaded):
a Llama-style causal LM with GQA and a LLaVA-style vision-language model (CLIP tower + Llama)."""

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration)

IMAGE_TOKEN = 250
IMAGE_TOKENS = 16  # (32 / 8)^2 patches per image


def text_config(layers=3):
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, attn_implementation="sdpa")


def llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(text_config()).eval()


def llava(seed=0):
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8,
                              projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text_config(), image_token_index=IMAGE_TOKEN,
                      image_seq_length=IMAGE_TOKENS, vision_feature_select_strategy="default",
                      attn_implementation="sdpa")
    return LlavaForConditionalGeneration(cfg).eval()


def text_inputs(batch, length=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 240, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :9] = 0  # left padding of the shorter prompt, as generate() expects
    return {"input_ids": ids, "attention_mask": mask}


def vision_inputs(batch, seed=1):
    """<4 text> <16 image> <20 text> per row; row 1 left-padded by 5."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 240, (batch, 40), generator=g)
    ids[:, 4:4 + IMAGE_TOKENS] = IMAGE_TOKEN
    mask = torch.ones_like(ids)
    if batch > 1:
        row = torch.randint(0, 240, (40,), generator=g)
        row[9:9 + IMAGE_TOKENS] = IMAGE_TOKEN
        row[:5] = 0
        ids[1] = row
        mask[1, :5] = 0
    pixels = torch.randn(batch, 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def llava_next(seed=0):
    """LLaVA-NeXT (AnyRes): a 32x64 image becomes a base tile + 2 tiles + row newlines."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8,
                              projection_dim=32)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text_config(),
                          image_token_index=IMAGE_TOKEN, image_grid_pinpoints=[[32, 32], [32, 64]],
                          vision_feature_select_strategy="default", image_seq_length=16,
                          attn_implementation="sdpa")
    return LlavaNextForConditionalGeneration(cfg).eval()


NEXT_IMAGE_TOKENS = 52  # 16 (base) + 2 x 16 (tiles) + 4 newline tokens for a 32x64 image


def next_inputs(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 240, (batch, 70), generator=g)
    ids[:, 3:3 + NEXT_IMAGE_TOKENS] = IMAGE_TOKEN
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :2] = 0
        mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": torch.randn(batch, 3, 3, 32, 32, generator=g),
            "image_sizes": torch.tensor([[32, 64]] * batch)}
