"""kvcache as the KV cache of a Hugging Face transformers model (transformers >= 5).

Two pieces, registered under the attention-implementation name ``"kvcache"``:

* :class:`KVCache`, a ``transformers.Cache`` whose layers append each batch row's real (non-pad)
  tokens into a kvcache sequence, one stream per (layer, kv head), with their original positions
  and modalities (image tokens tagged from the model's image token id).
* an attention function (``AttentionInterface``): prefill runs the model's own SDPA attention
  over the prompt and appends; every decode step appends the new token and calls
  :meth:`kvcache.Cache.decode_attention` over the compressed per-(layer, kv head) streams, so
  streams of different lengths are read as they are (no padding to a dense tensor).

After the prefill of the last layer the policy plans once per batch row, from the observation
query rows recorded during prefill (the last ``window`` rows, the post-vision rows for VL-Cache,
the last row for TOVA / FastV) and the cache frees the evicted pages. H2O accumulates attention
scores during prefill (``score_rows``) and decode (``accumulate_scores``) and can compress every
``compress_every`` decode steps. A :class:`kvcache.Admission` applies Dynamic-LLaVA admission
to the generated tokens.

Example::

    import kvcache.transformers as kt
    with kt.compress(model, "snapkv:keep=0.1,window=8") as press:
        out = model.generate(input_ids, max_new_tokens=32, do_sample=False)
    print(press.cache.stats())

Limits: CPU tensors (the kvcache Python layer takes host arrays), greedy / sampling decoding
(no beam search: ``reorder_cache`` raises), decoder layers with full attention (no sliding
window layers), one generate() per KVCache.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache as _HFCache
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import kvcache

ATTN_IMPLEMENTATION = "kvcache"

_TORCH_TO_KV_DTYPE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

# The (cache, layer index, key tensor) of this thread's most recent KVCache.update: the
# attention call of the same layer receives exactly that key tensor, which is how the attention
# function finds its cache (transformers does not pass the cache to attention functions). Any
# other call (a vision tower sharing the implementation name, a forward without a KVCache) runs
# plain SDPA. Thread-local, so models generating on different threads do not mix.
_state = threading.local()


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class _KVCacheLayer(CacheLayerMixin):
    """One decoder layer's view of the KVCache: counts the tokens the model has processed (pads
    included: transformers derives cache positions and mask sizes from this count), while the
    K/V themselves live in the kvcache streams."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: "KVCache", layer_idx: int):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.processed = 0

    def lazy_initialization(self, key_states, value_states):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.processed += key_states.shape[-2]
        return self.owner._update(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.processed + query_length, 0

    def get_seq_length(self) -> int:
        return self.processed

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("KVCache cannot be reset; make a new one per generate()")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("KVCache does not support beam search (reorder_cache)")


class KVCache(_HFCache):
    """A transformers Cache backed by a :class:`kvcache.Cache`.

    Args:
        model: the transformers model (its text config gives layers, heads, head_dim).
        policy: registry spec (``kvcache.list_policies()``) or :class:`kvcache.Policy`;
            applied once after prefill. ``"full"`` keeps everything.
        compress_every: also re-apply the policy every N decode steps (0 = never). Only for
            policies that need no observation rows (h2o, streamingllm, knorm, random).
        admission: a :class:`kvcache.Admission` (Dynamic-LLaVA) deciding which generated
            tokens layers >= its start_layer store.
        image_token_id: the id whose tokens are tagged as image (default: the model config's
            ``image_token_id`` / ``image_token_index`` when it has one).
        num_pages, page_tokens: pool geometry (pages of ``page_tokens`` full-width rows).
        backend: kvcache backend name ("cpu").
        record: also keep, per layer, every real prompt query row and each decode step's
            query (post-RoPE, float32 numpy) in ``recorded`` (tools/capture_trace.py).
    """

    def __init__(self, model, policy: str | kvcache.Policy = "full", *, compress_every: int = 0,
                 admission: kvcache.Admission | None = None, image_token_id: int | None = None,
                 num_pages: int = 4096, page_tokens: int = 16, backend: str = "cpu",
                 record: bool = False):
        cfg = _text_config(model.config)
        self.num_layers = cfg.num_hidden_layers
        self.num_q_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_q_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_q_heads
        layers = [_KVCacheLayer(self, i) for i in range(self.num_layers)]
        super().__init__(layers=layers)
        dtype = _TORCH_TO_KV_DTYPE.get(getattr(model, "dtype", torch.float32))
        if dtype is None:
            raise ValueError(f"model dtype {model.dtype} is not float32, float16 or bfloat16")
        self.torch_dtype = model.dtype
        self.kv = kvcache.Cache(kvcache.Config(
            num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
            num_q_heads=self.num_q_heads, head_dim=self.head_dim, dtype=dtype,
            page_tokens=page_tokens, num_pages=num_pages), backend)
        self.policy = policy if isinstance(policy, kvcache.Policy) else kvcache.Policy(policy)
        self.needs = self.policy.needs()
        self.compress_every = compress_every
        if compress_every < 0:
            raise ValueError(f"compress_every is {compress_every}, expected >= 0")
        if compress_every and (self.needs["window_rows"] or self.needs["post_vision"] or
                               self.needs["last_row"] or self.needs["query_rows"]):
            raise ValueError(f"policy '{self.policy.name}' needs observation query rows, which "
                             "decode steps do not provide; compress_every needs a policy "
                             "without them (h2o, streamingllm, knorm, random)")
        self.accumulate = self.policy.name == "h2o"
        self.admission = admission
        if image_token_id is None:
            image_token_id = getattr(model.config, "image_token_id", None)
            if image_token_id is None:
                image_token_id = getattr(model.config, "image_token_index", None)
        self.image_token_id = image_token_id
        self.seqs: list[int] = []
        self.next_position: list[int] = []
        self.phase = "empty"  # -> "decode" after the prefill of the last layer
        self.decode_steps = 0
        self._prompt_modalities: torch.Tensor | None = None  # [batch, prompt_len] uint8
        self._observations: list[list] = []  # [batch][layer] (queries, positions) or None
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.plans: list[kvcache.Plan] = []
        self.prompt_tokens: list[int] = []
        self.record = record
        # recorded[layer] = {"prompt_queries": [n, Hq, D] per row, "decode_queries": [...]}
        self.recorded = [{"prompt_queries": [], "decode_queries": []}
                         for _ in range(self.num_layers)]
        self.peak_bytes = 0  # pool bytes at their highest (end of prefill, before compression)

    # ---- what the front object / user tells the cache ------------------------------------
    def prepare(self, input_ids: torch.Tensor | None) -> None:
        """Records the prompt's token ids so image tokens are tagged as image (call before the
        prefill; compress() does it). Without it every token is text."""
        if input_ids is None or self.image_token_id is None:
            self._prompt_modalities = None
            return
        self._prompt_modalities = (input_ids == self.image_token_id).to(torch.uint8).cpu()

    # ---- transformers Cache hooks ---------------------------------------------------------
    def _update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        if key_states.device.type != "cpu":
            raise ValueError(f"KVCache takes CPU tensors; key_states is on {key_states.device}")
        if not self.seqs:
            self.seqs = [self.kv.add_sequence() for _ in range(key_states.shape[0])]
            self.next_position = [0] * len(self.seqs)
            self._observations = [[None] * self.num_layers for _ in self.seqs]
        if self.phase == "decode":
            self._pending[layer_idx] = (key_states, value_states)
        _state.last_update = (self, layer_idx, key_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("KVCache does not support beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("KVCache cannot be cropped (assisted decoding is unsupported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("KVCache does not support num_return_sequences > 1")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("KVCache does not support batch selection")

    # ---- the two attention paths ----------------------------------------------------------
    def _real_rows(self, attention_mask: torch.Tensor | None, q_len: int, kv_len: int):
        """Per batch row, the indices of the real (non-pad) prompt tokens, from the 4-D mask the
        model built: the last query row attends exactly to the row's real keys."""
        if attention_mask is None:
            return [torch.arange(kv_len)] * len(self.seqs)
        last = attention_mask[:, 0, -1, :]
        if last.dtype != torch.bool:
            last = last > torch.finfo(last.dtype).min / 2
        return [torch.nonzero(last[b], as_tuple=False).flatten().cpu()
                for b in range(len(self.seqs))]

    def _observation_rows(self, modalities: np.ndarray, n: int) -> int:
        rows = max(self.needs["window_rows"], self.needs["query_rows"],
                   1 if self.needs["last_row"] else 0)
        if self.needs["post_vision"] or self.policy.name == "prumerge":
            image = np.nonzero(modalities != kvcache.TEXT)[0]
            rows = max(rows, n - (int(image[-1]) + 1) if image.size else n)
        return min(rows, n)

    def _prefill(self, module, query, key, value, attention_mask, **kwargs):
        out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        layer = module.layer_idx
        kv_len = key.shape[-2]
        if query.shape[-2] != kv_len:
            raise ValueError("KVCache's first forward must be the whole prompt (query rows "
                             f"{query.shape[-2]}, keys {kv_len})")
        if self._prompt_modalities is not None and self._prompt_modalities.shape[1] != kv_len:
            raise ValueError(f"prepare() saw {self._prompt_modalities.shape[1]} prompt tokens but "
                             f"the language model got {kv_len}: pass the input_ids the model "
                             "embeds (with the image placeholder already expanded)")
        real = self._real_rows(attention_mask, query.shape[-2], kv_len)
        for b, seq in enumerate(self.seqs):
            idx = real[b]
            n = int(idx.numel())
            k = key[b].index_select(1, idx).transpose(0, 1).contiguous()  # [n, H, D]
            v = value[b].index_select(1, idx).transpose(0, 1).contiguous()
            positions = np.arange(self.next_position[b], self.next_position[b] + n, dtype=np.int32)
            if self._prompt_modalities is not None:
                mods = self._prompt_modalities[b].index_select(0, idx).numpy()
            else:
                mods = np.zeros(n, dtype=np.uint8)
            self.kv.append(seq, layer, k, v, positions, modalities=mods)
            # Query rows of the real tokens (query rows and key columns coincide in prefill).
            q_rows = query[b].index_select(1, idx).transpose(0, 1)  # [n, Hq, D]
            if self.accumulate:
                q32 = q_rows.float().contiguous()
                self.kv.score_rows(seq, layer, q32, positions[-q32.shape[0]:], accumulate=True)
            if self.record:
                self.recorded[layer]["prompt_queries"].append(q_rows.float().numpy().copy())
            keep = self._observation_rows(mods, n)
            if keep:
                self._observations[b][layer] = (
                    q_rows[-keep:].float().contiguous().numpy(), positions[-keep:].copy())
        if layer == self.num_layers - 1:
            self._finish_prefill(real)
        return out

    def _finish_prefill(self, real) -> None:
        self.peak_bytes = max(self.peak_bytes, self.kv.stats()["bytes_used"])
        for b, seq in enumerate(self.seqs):
            n = int(real[b].numel())
            self.next_position[b] += n
            self.prompt_tokens.append(n)
            needs_obs = any(self._observations[b][l] is not None for l in range(self.num_layers))
            self.plans.append(self.kv.compress(
                seq, self.policy, self._observations[b] if needs_obs else None))
        self._observations = []  # the prompt's query rows are no longer needed
        self.phase = "decode"

    def _decode(self, module, query, attention_mask, scaling):
        layer = module.layer_idx
        key, value = self._pending.pop(layer)
        batch = len(self.seqs)
        q = query[:, :, 0, :]
        if q.dtype != torch.float32 or not q.is_contiguous():
            q = q.float().contiguous()
        out = torch.empty(batch, self.num_q_heads, self.head_dim, dtype=torch.float32)
        if self.record:
            self.recorded[layer]["decode_queries"].append(q.numpy().copy())  # [B, Hq, D]
        admit = self._admit_masks(layer) if self.admission is not None else None
        if admit is None:
            for b, seq in enumerate(self.seqs):
                pos = np.array([self.next_position[b]], dtype=np.int32)
                self.kv.append(seq, layer, key[b, :, 0:1, :].transpose(0, 1),
                               value[b, :, 0:1, :].transpose(0, 1), pos)
            self.kv.decode_attention(self.seqs, layer, q, out=out, scale=scaling,
                                     accumulate_scores=self.accumulate)
        else:
            out = self._decode_with_admission(layer, q, key, value, scaling, admit)
        if layer == self.num_layers - 1:
            self._finish_decode_step()
        return out.to(query.dtype).unsqueeze(1), None

    def _admit_masks(self, layer: int):
        if layer == 0:
            positions = np.array(self.next_position, dtype=np.int32)
            self._decisions = self.admission.decide(positions)
        return self.admission.mask_for_layer(layer, self._decisions)

    def _decode_with_admission(self, layer, q, key, value, scaling, admit):
        # The new token attends to its own K/V whether or not the layer stores it: attention over
        # the stored streams (with its log-sum-exp) merged with the token's own term.
        batch = len(self.seqs)
        out = torch.empty(batch, self.num_q_heads, self.head_dim, dtype=torch.float32)
        lse = torch.empty(batch, self.num_q_heads, dtype=torch.float32)
        self.kv.decode_attention(self.seqs, layer, q, out=out, lse=lse, scale=scaling,
                                 accumulate_scores=self.accumulate)
        group = self.num_q_heads // self.num_kv_heads
        k_new = key[:, :, 0, :].float().repeat_interleave(group, dim=1)    # [B, Hq, D]
        v_new = value[:, :, 0, :].float().repeat_interleave(group, dim=1)
        s = (q * k_new).sum(-1) * scaling                                   # [B, Hq]
        m = torch.maximum(lse, s)
        w_cache = torch.exp(lse - m)
        w_self = torch.exp(s - m)
        merged = (out * w_cache[..., None] + v_new * w_self[..., None]) / (w_cache + w_self)[..., None]
        for b, seq in enumerate(self.seqs):
            pos = np.array([self.next_position[b]], dtype=np.int32)
            self.kv.append(seq, layer, key[b, :, 0:1, :].transpose(0, 1),
                           value[b, :, 0:1, :].transpose(0, 1), pos, admit=admit[b:b + 1])
        return merged

    def _finish_decode_step(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.kv.stats()["bytes_used"])
        self.next_position = [p + 1 for p in self.next_position]
        self.decode_steps += 1
        if self.compress_every and self.decode_steps % self.compress_every == 0:
            for seq in self.seqs:
                self.plans.append(self.kv.compress(seq, self.policy))

    # ---- reporting ------------------------------------------------------------------------
    def stream_lengths(self) -> list[np.ndarray]:
        """Per batch row, the [num_layers, num_kv_heads] stream lengths."""
        return [self.kv.stream_lengths(seq) for seq in self.seqs]

    def stats(self) -> dict:
        """kvcache's pool statistics plus, for comparison, the bytes a dense cache (transformers'
        DynamicCache) would hold for the same processed tokens."""
        s = dict(self.kv.stats())
        processed = self.layers[0].processed
        elem = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}[self.torch_dtype]
        s["dense_bytes"] = (2 * len(self.seqs) * self.num_layers * self.num_kv_heads * processed *
                            self.head_dim * elem)
        s["peak_bytes"] = self.peak_bytes
        s["stream_lengths"] = self.stream_lengths()
        s["policy"] = self.policy.describe()
        return s


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The "kvcache" attention implementation (see the module docstring)."""
    upd = getattr(_state, "last_update", None)
    if upd is None or upd[2] is not key or getattr(module, "layer_idx", None) != upd[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    cache: KVCache = upd[0]
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    if cache.phase == "decode":
        if query.shape[-2] != 1:
            raise ValueError(f"KVCache decodes one token per step; got {query.shape[-2]} query rows")
        return cache._decode(module, query, attention_mask, scaling)
    return cache._prefill(module, query, key, value, attention_mask, dropout=dropout,
                          scaling=scaling, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _language_attn_target(model):
    """The attn_implementation argument that routes only the language model through kvcache
    (vision towers keep SDPA)."""
    sub = getattr(model.config, "sub_configs", {}) or {}
    if "text_config" in sub:
        return {"text_config": ATTN_IMPLEMENTATION, "": ATTN_IMPLEMENTATION}
    return ATTN_IMPLEMENTATION


class compress:  # noqa: N801 (a context manager used like a function, as kvpress's presses)
    """``with kvcache.transformers.compress(model, "snapkv:keep=0.1"): model.generate(...)``.

    Inside the block every ``model.generate`` call without its own ``past_key_values`` runs on a
    fresh :class:`KVCache` (``press.cache`` is the last one, for ``stats()``), and the language
    model's attention implementation is "kvcache". Keyword arguments go to :class:`KVCache`.
    """

    def __init__(self, model, policy: str | kvcache.Policy = "full", **cache_kwargs):
        self.model = model
        self.policy = policy
        self.cache_kwargs = cache_kwargs
        self.cache: KVCache | None = None

    def __enter__(self) -> "compress":
        model = self.model
        self._saved_impl = {}
        for name, cfg in self._configs():
            self._saved_impl[name] = cfg._attn_implementation
        model.set_attn_implementation(_language_attn_target(model))
        self._saved_generate = model.__dict__.get("generate")
        original = model.generate

        def generate(*args, **kwargs):
            if kwargs.get("past_key_values") is None:
                self.cache = KVCache(model, self.policy, **self.cache_kwargs)
                input_ids = kwargs.get("input_ids", args[0] if args else None)
                self.cache.prepare(input_ids)
                kwargs["past_key_values"] = self.cache
            return original(*args, **kwargs)

        model.generate = generate
        return self

    def _configs(self) -> Iterator[tuple[str, Any]]:
        yield "", self.model.config
        for name in getattr(self.model.config, "sub_configs", {}) or {}:
            sub = getattr(self.model.config, name, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                yield name, sub

    def __exit__(self, *exc) -> None:
        if self._saved_generate is None:
            del self.model.generate
        else:
            self.model.generate = self._saved_generate
        restore = {name: impl for name, impl in self._saved_impl.items() if name}
        restore[""] = self._saved_impl[""]
        with contextlib.suppress(Exception):
            self.model.set_attn_implementation(restore)
