"""hf_ring_attention: exact ring attention (context parallelism) for Hugging Face models."""

from .batch import RingBatch, check_same_batch, count_targets, shard_batch
from .inprocess import InProcessRing
from .layout import LAYOUTS, Padded, pad_for_layout, unpad
from .module import RingAttention
from .plan import RingPlan
from .ring import ring_attention, ring_attention_with_plan
from .sharding import shard, unshard

# The integrations import transformers or accelerate (a couple of seconds): load them on first
# use, so that the ring itself stays cheap to import (spawned workers, benchmarks).
_LAZY = {
    **{name: ".transformers" for name in ("attention_windows", "is_patched", "patch_model", "unpatch_model")},
    "ContextParallelPlugin": ".accelerate",
    "RingAttentionCallback": ".trainer",
    "chunked_causal_lm_loss": ".loss",
    **{name: ".memory" for name in ("estimate_memory", "longest_sequence")},
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LAYOUTS",
    "ContextParallelPlugin",
    "InProcessRing",
    "Padded",
    "RingAttention",
    "RingAttentionCallback",
    "RingBatch",
    "RingPlan",
    "attention_windows",
    "check_same_batch",
    "chunked_causal_lm_loss",
    "count_targets",
    "estimate_memory",
    "is_patched",
    "longest_sequence",
    "patch_model",
    "shard_batch",
    "unpatch_model",
    "pad_for_layout",
    "ring_attention",
    "ring_attention_with_plan",
    "shard",
    "unpad",
    "unshard",
]

__version__ = "0.1.0"
