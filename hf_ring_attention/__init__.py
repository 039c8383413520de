"""hf_ring_attention: exact ring attention (context parallelism) for Hugging Face models."""

from .inprocess import InProcessRing
from .layout import LAYOUTS, Padded, pad_for_layout, unpad
from .plan import RingPlan
from .ring import ring_attention, ring_attention_with_plan
from .sharding import shard, unshard
from .transformers import RingBatch, count_targets, is_patched, patch_model, shard_batch, unpatch_model

__all__ = [
    "LAYOUTS",
    "InProcessRing",
    "Padded",
    "RingBatch",
    "RingPlan",
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
