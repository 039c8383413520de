"""hf_ring_attention: exact ring attention (context parallelism) for Hugging Face models."""

from .batch import RingBatch, check_same_batch, count_targets, shard_batch
from .inprocess import InProcessRing
from .layout import LAYOUTS, Padded, pad_for_layout, unpad
from .module import RingAttention
from .plan import RingPlan
from .ring import ring_attention, ring_attention_with_plan
from .sharding import shard, unshard

# The transformers integration imports transformers (a couple of seconds): load it on first use,
# so that the ring itself stays cheap to import (spawned workers, benchmarks).
_LAZY = {name: ".transformers" for name in ("is_patched", "patch_model", "unpatch_model")}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "LAYOUTS",
    "InProcessRing",
    "Padded",
    "RingAttention",
    "RingBatch",
    "RingPlan",
    "check_same_batch",
    "count_targets",
    "is_patched",
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
