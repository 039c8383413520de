"""Varlen attention kernels that return the log-sum-exp: one contract, three implementations.

Every backend module provides::

    forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window,
            softmax_scale) -> (out [Tq, Hq, D] in q.dtype, lse [Hq, Tq] float32)
    backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             causal, window, softmax_scale) -> (dq, dk, dv)

q is ``[Tq, Hq, D]``, k and v ``[Tk, Hkv, D]`` with Hq a multiple of Hkv (K/V are never repeated),
cu_seqlens are int32 boundaries of the packed sequences, ``window = (left, right)`` with -1 for
unbounded, and masks are aligned bottom-right (see ``plan.py``); ``causal`` is the same as
``window == (-1, 0)``. ``backward`` may be given the merged out and lse of several calls.

Backends, in the order of automatic selection:

``flash_attn``  the flash-attn package (CUDA, fp16/bf16), when it is installed;
``torch``       PyTorch's built-in FlashAttention-2 kernels (CUDA, fp16/bf16);
``cpu``         pure PyTorch with float32 accumulation (any device and dtype; uses PyTorch's fused
                CPU flash kernel where it fits).

Override with ``backend=`` or the environment variable ``HF_RING_ATTENTION_BACKEND``.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import flash_attn, reference, torch_flash

BACKENDS: dict[str, ModuleType] = {m.name: m for m in (flash_attn, torch_flash, reference)}
ENV_VAR = "HF_RING_ATTENTION_BACKEND"


def _supports(module: ModuleType, device: torch.device, dtype: torch.dtype) -> bool:
    return module.is_available(device) and dtype in getattr(module, "DTYPES", (dtype,))


def get_kernel(backend: str | None, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The kernel module for ``backend`` (None: the ``HF_RING_ATTENTION_BACKEND`` environment
    variable, else the first backend that supports ``device`` and ``dtype``).

    Raises:
        ValueError: for an unknown backend name, or one that cannot run on this device and dtype.
    """
    device = torch.device(device)
    requested = backend or os.environ.get(ENV_VAR) or None
    if requested is None:
        return next(m for m in BACKENDS.values() if _supports(m, device, dtype))
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {sorted(BACKENDS)}")
    module = BACKENDS[requested]
    if not module.is_available(device):
        hint = " (pip install flash-attn)" if requested == "flash_attn" else ""
        raise ValueError(f"backend {requested!r} is not available on device {device}{hint}")
    if not _supports(module, device, dtype):
        raise ValueError(
            f"backend {requested!r} does not support dtype {dtype}; it supports "
            f"{[str(d) for d in module.DTYPES]} (use backend='cpu' for other dtypes)"
        )
    return module
