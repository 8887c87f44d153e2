"""
kvcache: a paged, modality-aware KV cache with per-(layer, kv head) eviction.
"""

from collections.abc import Sequence
from typing import Annotated, overload

import numpy
from numpy.typing import NDArray


class Config:
    """
    Shape of a cache (include/kvcache/config.h). Every field is a keyword argument; dtype is 'f32', 'f16' or 'bf16'.
    """

    def __init__(self, num_layers: int = 1, num_kv_heads: int = 1, num_q_heads: int = 1, head_dim: int = 128, dtype: str = 'f16', page_tokens: int = 16, page_bytes: int = 0, num_pages: int = 1024, page_summaries: bool = False) -> None: ...

    @property
    def num_layers(self) -> int: ...

    @num_layers.setter
    def num_layers(self, arg: int, /) -> None: ...

    @property
    def num_kv_heads(self) -> int: ...

    @num_kv_heads.setter
    def num_kv_heads(self, arg: int, /) -> None: ...

    @property
    def num_q_heads(self) -> int: ...

    @num_q_heads.setter
    def num_q_heads(self, arg: int, /) -> None: ...

    @property
    def head_dim(self) -> int: ...

    @head_dim.setter
    def head_dim(self, arg: int, /) -> None: ...

    @property
    def dtype(self) -> str: ...

    @dtype.setter
    def dtype(self, arg: str, /) -> None: ...

    @property
    def page_tokens(self) -> int: ...

    @page_tokens.setter
    def page_tokens(self, arg: int, /) -> None: ...

    @property
    def page_bytes(self) -> int: ...

    @page_bytes.setter
    def page_bytes(self, arg: int, /) -> None: ...

    @property
    def num_pages(self) -> int: ...

    @num_pages.setter
    def num_pages(self, arg: int, /) -> None: ...

    @property
    def page_summaries(self) -> bool: ...

    @page_summaries.setter
    def page_summaries(self, arg: bool, /) -> None: ...

    def validate(self) -> None:
        """Raises ValueError naming the offending field."""

    @property
    def resolved_page_bytes(self) -> int: ...

    @property
    def resolved_page_tokens(self) -> int: ...

    def __repr__(self) -> str: ...

class ReadPolicy:
    """
    Which keys a decode step reads (include/kvcache/read_policy.h): kind 'dense' (default), 'quest' or 'retrieval'.
    """

    def __init__(self, kind: str = 'dense', dense_first_layers: int = 2, token_budget: int = 0, top_k: int = 32, exact_search: bool = False, ef_search: int = 0, sink_tokens: int = 0, recent_tokens: int = 0) -> None: ...

    @property
    def kind(self) -> str: ...

    @kind.setter
    def kind(self, arg: str, /) -> None: ...

    @property
    def dense_first_layers(self) -> int: ...

    @dense_first_layers.setter
    def dense_first_layers(self, arg: int, /) -> None: ...

    @property
    def token_budget(self) -> int: ...

    @token_budget.setter
    def token_budget(self, arg: int, /) -> None: ...

    @property
    def top_k(self) -> int: ...

    @top_k.setter
    def top_k(self, arg: int, /) -> None: ...

    @property
    def exact_search(self) -> bool: ...

    @exact_search.setter
    def exact_search(self, arg: bool, /) -> None: ...

    @property
    def ef_search(self) -> int: ...

    @ef_search.setter
    def ef_search(self, arg: int, /) -> None: ...

    @property
    def sink_tokens(self) -> int: ...

    @sink_tokens.setter
    def sink_tokens(self, arg: int, /) -> None: ...

    @property
    def recent_tokens(self) -> int: ...

    @recent_tokens.setter
    def recent_tokens(self, arg: int, /) -> None: ...

class Cache:
    """
    A paged, modality-aware KV cache (include/kvcache/cache.h): sequences, one stream per (layer, kv head) with its own length, policies applied by plan/apply/compress.
    """

    def __init__(self, config: Config, backend: str = 'cpu') -> None:
        """
        Creates the cache on a backend by registry name ('cpu', 'cpu-reference', 'cuda' when built with CUDA). Raises ValueError for a bad config, naming the field.
        """

    @property
    def config(self) -> Config: ...

    @property
    def backend(self) -> str: ...

    def add_sequence(self) -> int:
        """Adds an empty sequence and returns its id (ids are never reused)."""

    def fork(self, parent: int) -> int:
        """New sequence sharing every page of `parent` (copy-on-write)."""

    def free(self, seq: int) -> None:
        """Frees a sequence and returns its pages (KeyError when unknown)."""

    def sequences(self) -> list[int]: ...

    def __contains__(self, arg: int, /) -> bool: ...

    def append(self, seq: int, layer: int, keys: Annotated[NDArray, dict(writable=False)], values: Annotated[NDArray, dict(writable=False)], positions: Annotated[NDArray, dict(writable=False)], modalities: Annotated[NDArray, dict(writable=False)] | None = None, admit: Annotated[NDArray, dict(writable=False)] | None = None) -> None:
        """
        Appends num_tokens tokens to every kv head of one layer.

        keys, values: [num_tokens, num_kv_heads, head_dim] float32/float16/bfloat16 host arrays (numpy or torch; C-contiguous ones are read in place). positions: [num_tokens] integers, strictly increasing and past the layer's last position. modalities: [num_tokens] 0 text, 1 image, 2 video, 3 audio (default text). admit: [num_tokens] 0/1 (Dynamic-LLaVA; 0 = not stored in this layer).
        """

    def score_rows(self, seq: int, layer: int, queries: Annotated[NDArray, dict(writable=False)], positions: Annotated[NDArray, dict(writable=False)], scale: float = 0.0, aggregation: str = 'mean', sparsity_threshold: float = 0.009999999776482582, accumulate: bool = False) -> dict:
        """
        Scores every key of the layer's streams against query rows (causal by position).

        queries: [rows, num_q_heads, head_dim] float32; positions: [rows]. Returns a dict: token_scores (list over kv heads of [stream length] float32), below_threshold and causal_entries ([num_q_heads] int64, VL-Cache counts).
        """

    def stream_length(self, seq: int, layer: int, kv_head: int) -> int: ...

    def stream_lengths(self, seq: int) -> NDArray[numpy.int32]:
        """Every stream length of a sequence: [num_layers, num_kv_heads] int32."""

    def read_stream(self, seq: int, layer: int, kv_head: int, keys: bool = True, values: bool = True) -> dict:
        """
        Copies one stream back to host: a dict of length, num_segments, positions, modalities, scores, key_width and (when requested) keys / values [length, head_dim] float32 (channels a pruned segment does not store read as 0).
        """

    def stream_pages(self, seq: int, layer: int, kv_head: int) -> list:
        """
        The page table of a stream: one dict per segment (length, tokens_per_page, key_width, value_width, pages [int32 pool page ids]). Valid until the next append/apply/free of the sequence.
        """

    def read_page_summaries(self, seq: int, layer: int, kv_head: int) -> list:
        """
        Quest page summaries of a stream, page by page (RuntimeError unless the config has page_summaries=True): first_token, num_tokens, key_channels, key_min, key_max.
        """

    def add_scores(self, seq: int, layer: int, kv_head: int, delta: Annotated[NDArray, dict(writable=False)]) -> None:
        """
        Adds delta[t] ([stream length] float32) to each token's score accumulator.
        """

    def stats(self) -> dict:
        """
        Pool and store totals: num_sequences, pages_total, pages_used, bytes_used, tokens_stored, page_bytes.
        """

    def validate(self) -> None:
        """
        Checks every invariant of the store; raises (RuntimeError) naming the first broken one.
        """

    def prepare_decode(self, batch: Sequence[int]) -> DecodePlan:
        """
        Plans a decode step of `batch` for every layer (same checks as decode_attention: non-empty, known sequences (KeyError), no duplicate (ValueError)). Use the plan for each layer's decode_attention of this step.
        """

    @overload
    def decode_attention(self, batch: Sequence[int], layer: int, q: Annotated[NDArray, dict(writable=False)], out: NDArray | None = None, lse: NDArray | None = None, scale: float = 0.0, accumulate_scores: bool = False, aggregation: str = 'mean', read_policy: ReadPolicy | None = None) -> object: ...

    @overload
    def decode_attention(self, plan: DecodePlan, layer: int, q: Annotated[NDArray, dict(writable=False)], out: NDArray | None = None, lse: NDArray | None = None, scale: float = 0.0, accumulate_scores: bool = False, aggregation: str = 'mean', read_policy: ReadPolicy | None = None) -> object:
        """
        Attention of one new query token per sequence over `layer`'s compressed streams.

        batch: the sequence ids, or a DecodePlan from prepare_decode (plan once per step, then one call per layer: the batch-wide host work is done once; bit for bit the same result). q: [batch, num_q_heads, head_dim] float32, float16 or bfloat16 host array (numpy, or a torch CPU tensor). out (optional, written in place): the same shape, float32 / float16 / bfloat16, C-contiguous (rounded to nearest even from the f32 result); a new float32 numpy array is returned when omitted. lse (optional, written in place): [batch, num_q_heads] float32. accumulate_scores adds each token's attention probability (aggregated over the GQA group by `aggregation`) to its score accumulator (H2O). Returns out. With a plan: RuntimeError (FailedPrecondition, 'prepare again') when a sequence of the batch was compressed (apply) or freed since prepare_decode; appends are seen. Device arrays (torch CUDA tensors) are refused with ValueError.
        """

    def plan(self, seq: int, policy: object, observations: object | None = None, image_scores: object | None = None) -> Plan:
        """
        Collects what the policy needs and plans (the cache is not changed).

        policy: a registry spec ('snapkv:keep=0.1') or a kvcache.Policy. observations: None or one entry per layer, each None or (queries [rows, num_q_heads, head_dim] float32, positions [rows]) -- the post-RoPE query rows the engine observed (the last window rows for SnapKV & co, the rows after the last image token for VL-Cache). image_scores: None or (positions [k], scores [k] float32), PruMerge's CLS scores.
        """

    def apply(self, plan: Plan) -> None:
        """
        Applies a plan: compacts the kept tokens into fresh pages and frees the old ones.
        """

    def compress(self, seq: int, policy: object, observations: object | None = None, image_scores: object | None = None) -> Plan:
        """plan() then apply() in one call; returns the applied plan."""

class DecodePlan:
    """
    The host half of a decode step for a batch (Cache.prepare_decode), made once and run per layer by Cache.decode_attention(plan, layer, ...). Keeps its cache alive.
    """

    @property
    def batch(self) -> list[int]:
        """The sequence ids, in the order of the q / out rows."""

    @property
    def first_layer(self) -> int: ...

    @property
    def num_layers(self) -> int:
        """Layers [first_layer, first_layer + num_layers) can be decoded."""

def list_policies() -> list:
    """
    Every registry policy as (name, summary, defaults) tuples (docs/POLICIES.md).
    """

class Policy:
    """
    A policy built by registry spec, e.g. Policy('snapkv:keep=0.1,window=8'). Raises ValueError for an unknown name, key or value.
    """

    def __init__(self, spec: str) -> None: ...

    @property
    def name(self) -> str: ...

    def describe(self) -> str: ...

    def needs(self) -> dict:
        """
        What the policy needs collected: keys, window_rows (observation rows scored), post_vision, sparsity, last_row, query_rows, sparsity_threshold, scale.
        """

    def __repr__(self) -> str: ...

class MergeTerm:
    def __init__(self) -> None: ...

    @property
    def kept_slot(self) -> int: ...

    @kept_slot.setter
    def kept_slot(self, arg: int, /) -> None: ...

    @property
    def source(self) -> int: ...

    @source.setter
    def source(self, arg: int, /) -> None: ...

    @property
    def key_weight(self) -> float: ...

    @key_weight.setter
    def key_weight(self, arg: float, /) -> None: ...

    @property
    def value_weight(self) -> float: ...

    @value_weight.setter
    def value_weight(self, arg: float, /) -> None: ...

class StreamPlan:
    """
    Kept token indices (and optional kept key channels, merges) of one (layer, kv head) stream (include/kvcache/plan.h).
    """

    def __init__(self, layer: int = 0, kv_head: int = 0, kept: Sequence[int] = []) -> None: ...

    @property
    def layer(self) -> int: ...

    @layer.setter
    def layer(self, arg: int, /) -> None: ...

    @property
    def kv_head(self) -> int: ...

    @kv_head.setter
    def kv_head(self, arg: int, /) -> None: ...

    @property
    def kept(self) -> list[int]: ...

    @kept.setter
    def kept(self, arg: Sequence[int], /) -> None: ...

    @property
    def key_channels(self) -> list[int]: ...

    @key_channels.setter
    def key_channels(self, arg: Sequence[int], /) -> None: ...

    @property
    def full_width_recent(self) -> int: ...

    @full_width_recent.setter
    def full_width_recent(self, arg: int, /) -> None: ...

    @property
    def merges(self) -> list[MergeTerm]: ...

    @merges.setter
    def merges(self, arg: Sequence[MergeTerm], /) -> None: ...

    @property
    def kept_key_weight(self) -> list[float]: ...

    @kept_key_weight.setter
    def kept_key_weight(self, arg: Sequence[float], /) -> None: ...

    @property
    def kept_value_weight(self) -> list[float]: ...

    @kept_value_weight.setter
    def kept_value_weight(self, arg: Sequence[float], /) -> None: ...

class Plan:
    """
    An eviction plan: plain data, applied by Cache.apply. Plans made by Cache.plan are refused by apply once a stream changed length.
    """

    def __init__(self, sequence: int, streams: Sequence[StreamPlan] = [], policy: str = '') -> None: ...

    @property
    def sequence(self) -> int: ...

    @sequence.setter
    def sequence(self, arg: int, /) -> None: ...

    @property
    def streams(self) -> list[StreamPlan]: ...

    @streams.setter
    def streams(self, arg: Sequence[StreamPlan], /) -> None: ...

    @property
    def policy(self) -> str: ...

    def kept_tokens(self) -> int:
        """Kept tokens summed over the streams the plan names."""

    def __repr__(self) -> str: ...

class Admission:
    """
    Dynamic-LLaVA decode-time admission (include/kvcache/policy/admission.h): decides per new token whether layers >= start_layer store its K/V.
    """

    @staticmethod
    def fixed_rate(rate: float, seed: int = 0, start_layer: int = 2) -> Admission: ...

    @staticmethod
    def attention_based(threshold: float = 1.0, start_layer: int = 2) -> Admission: ...

    @property
    def start_layer(self) -> int: ...

    def decide(self, positions: Annotated[NDArray, dict(writable=False)], self_weight: Annotated[NDArray, dict(writable=False)] | None = None, context_length: Annotated[NDArray, dict(writable=False)] | None = None) -> NDArray[numpy.uint8]:
        """One decision per token (1 = store in layers >= start_layer), uint8."""

    def mask_for_layer(self, layer: int, decisions: Annotated[NDArray, dict(writable=False)]) -> NDArray[numpy.uint8]:
        """The append admit mask of `layer`."""
