"""kvcache: a paged, modality-aware KV cache with per-(layer, kv head) eviction policies.

The classes mirror the C++ API (include/kvcache/cache.h): a :class:`Cache` holds sequences,
each with one stream per (layer, kv head) and its own length; policies from the registry
(:func:`list_policies`) plan evictions that :meth:`Cache.apply` carries out, freeing pages.
Arrays cross as numpy arrays or torch tensors (CPU), read in place when C-contiguous.

Example::

    import numpy as np, kvcache
    cache = kvcache.Cache(kvcache.Config(num_layers=2, num_kv_heads=2, num_q_heads=4,
                                         head_dim=64, dtype="f32"))
    seq = cache.add_sequence()
    k = np.random.randn(100, 2, 64).astype(np.float32)
    for layer in range(2):
        cache.append(seq, layer, k, k, np.arange(100))
    cache.compress(seq, "streamingllm:keep=0.25")
    print(cache.stats()["pages_used"])

Errors: ValueError (bad argument), KeyError (unknown sequence), IndexError (layer / head out of
range), MemoryError (pool exhausted), RuntimeError (wrong state); the cache is left unchanged.
"""

from kvcache._kvcache import (  # noqa: F401
    Admission,
    Cache,
    Config,
    DecodePlan,
    MergeTerm,
    Plan,
    Policy,
    ReadPolicy,
    StreamPlan,
    __version__,
    _input_view,
    list_policies,
)

TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3

__all__ = ["Admission", "Cache", "Config", "DecodePlan", "MergeTerm", "Plan", "Policy",
           "ReadPolicy", "StreamPlan", "list_policies", "TEXT", "IMAGE", "VIDEO", "AUDIO"]
