"""hf_ring_attention: exact ring attention (context parallelism) for Hugging Face models."""

from .inprocess import InProcessRing
from .layout import LAYOUTS, Padded, pad_for_layout, unpad
from .plan import RingPlan
from .ring import ring_attention, ring_attention_with_plan
from .sharding import shard, unshard

__all__ = [
    "LAYOUTS",
    "InProcessRing",
    "Padded",
    "RingPlan",
    "pad_for_layout",
    "ring_attention",
    "ring_attention_with_plan",
    "shard",
    "unpad",
    "unshard",
]

__version__ = "0.1.0"
