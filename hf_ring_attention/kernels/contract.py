"""The contract every kernel backend follows, and the small facts they share.

Legend: T tokens (packed), Hq query heads, Hkv key/value heads (Hq a multiple of Hkv), D head dim.
q is ``[Tq, Hq, D]``, k and v ``[Tk, Hkv, D]`` (K/V are never repeated for GQA), the output
``[Tq, Hq, D]`` in q's dtype and the log-sum-exp ``lse [Hq, Tq]`` in float32 (natural log).

A varlen call computes several independent sequences at once: sequence i is queries
``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`` against keys ``k[cu_seqlens_k[i]:cu_seqlens_k[i+1]]``,
with a window ``(left, right)`` aligned bottom-right (the last query sits on the last key; -1 is
an unbounded side)::

    Lq=3, Lk=5, window (-1, 0) = causal          query i sees key j iff
        k k k . .                                 -left <= j - i - (Lk - Lq) <= right
        k k k k .
        k k k k k

The scores are ``softmax_scale * q.k``; with a logit softcap ``c > 0`` (Gemma 2's
``attn_logit_softcapping``) they are ``c * tanh(softmax_scale * q.k / c)``, applied before the mask
and the softmax, and the lse is that of the capped scores. ``softcap = 0`` means none.

Empty sequences. A backend that sets ``empty_sequences = True`` (every built-in one) also takes
sequences with no queries or no keys, which the ring uses to read a call's rows as one range
instead of gathering them (``RingPlan.device_calls``). Such a sequence must add nothing: a query
row without keys comes back with lse -inf or +inf (flash-attn 2 writes +inf, flash-attn 4 -inf;
the merge treats both as "no key", and does not read that row's output) and dq 0, a key row
without queries with dk = dv = 0. A backend without the attribute is only ever given sequences
with queries and keys, every query row seeing at least one key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, runtime_checkable

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Varlen:
    """The sequences of one varlen kernel call.

    Attributes:
        cu_seqlens_q (`torch.Tensor`): int32 ``[B + 1]`` query boundaries, on the compute device.
        cu_seqlens_k (`torch.Tensor`): int32 ``[B + 1]`` key boundaries, on the compute device.
        max_seqlen_q (`int`): an upper bound of the query lengths.
        max_seqlen_k (`int`): an upper bound of the key lengths; the plan reports at least
            ``max_seqlen_q`` here, because flash-attn 2 clamps windows at ``max_seqlen_k`` (see
            ``plan.py``).
        window (`tuple[int, int]`): ``(left, right)``, bottom-right aligned, -1 = unbounded.
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    window: tuple[int, int] = (-1, -1)

    @property
    def causal(self) -> bool:
        """True for the window (-1, 0): query i sees keys up to its own diagonal."""
        return self.window == (-1, 0)


@runtime_checkable
class Kernel(Protocol):
    """What a backend provides; each backend is a module of ``hf_ring_attention.kernels`` whose
    name is the backend's name (modules satisfy this protocol structurally). A test may pass any
    object that follows it as ``backend=``."""

    name: str
    # optional: ``empty_sequences = True`` if the backend takes empty sequences (module docstring)

    def check(self, device: torch.device, dtype: torch.dtype, head_dim: int,
              softcap: float = 0.0) -> str | None:
        """Why this backend cannot run on ``device`` with ``dtype``, ``head_dim`` and (when it is
        positive) the logit softcap ``softcap``, or None if it can. Never raises; what it imports
        to find out is imported once."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen: Varlen,
                softmax_scale: float, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [Tq, Hq, D] in q.dtype, lse [Hq, Tq] float32)``."""

    def backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, varlen: Varlen, softmax_scale: float,
                 softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dq, dk, dv)`` in the input dtypes, recomputed from ``out`` and ``lse``, which may be
        the merged results of several calls (only ``exp(scores - lse)`` is recomputed)."""


def takes_empty_sequences(kernel) -> bool:
    """Whether ``kernel`` declares ``empty_sequences = True`` (see the module docstring); False
    for backends that do not say."""
    return getattr(kernel, "empty_sequences", False) is True


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype partial results are merged and gradients accumulated in: float32 for half
    precision and float32 inputs, float64 for float64 (tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    """The softmax scale every backend is given: ``head_dim ** -0.5`` unless one is set."""
    return head_dim ** -0.5 if softmax_scale is None else float(softmax_scale)


def resolve_softcap(softcap: float | None) -> float:
    """The logit softcap every backend is given: 0.0 for none (``None`` or 0), else the positive
    cap. Raises ``ValueError`` for a negative or non-finite value."""
    if softcap is None:
        return 0.0
    softcap = float(softcap)
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap={softcap}: a logit softcap must be a positive number (None or 0 for none)")
    return softcap


def cuda_reason(device: torch.device) -> str | None:
    """Why ``device`` is not a usable CUDA device, or None."""
    if device.type != "cuda":
        return f"needs a CUDA device, got {device}"
    if not torch.cuda.is_available():
        return "needs CUDA, but torch.cuda.is_available() is False"
    return None


@lru_cache(maxsize=None)
def capability(index: int | None) -> tuple[int, int]:
    """Compute capability (major, minor) of a CUDA device (cached per device)."""
    return torch.cuda.get_device_capability(index)


def dtype_reason(dtype: torch.dtype, supported=HALF_DTYPES) -> str | None:
    if dtype in supported:
        return None
    names = ", ".join(str(d).replace("torch.", "") for d in supported)
    return f"supports {names} only, got {str(dtype).replace('torch.', '')}"


def head_dim_reason(head_dim: int, multiple: int = 8, largest: int = 256) -> str | None:
    """The flash kernels' head_dim rule: a multiple of 8, at most 256."""
    if head_dim % multiple == 0 and 0 < head_dim <= largest:
        return None
    return f"needs head_dim to be a multiple of {multiple} and at most {largest}, got {head_dim}"
