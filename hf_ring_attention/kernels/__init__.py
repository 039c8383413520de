"""Varlen attention kernels that return the log-sum-exp: one contract (``contract.py``), four
backends. Each backend is the module of the same name.

Backends, in the order of automatic selection:

``flash_attn_4``  flash-attn 4 (``flash_attn.cute``, the CuTe DSL kernels; ``pip install
                  flash-attn-4``) on SM90 or newer (H100, H200, Blackwell), fp16/bf16;
``flash_attn``    the flash-attn 2 package (CUDA sm80+, fp16/bf16), when it imports;
``torch_flash``   PyTorch's built-in FlashAttention-2 kernels (CUDA sm80+, fp16/bf16);
``cpu``           pure PyTorch with float32 accumulation (any device and dtype; it uses PyTorch's
                  fused CPU flash kernel where it fits).

A backend is available when what it calls imports (checked once): an installed but broken
flash-attn, or flash-attn 4 alone (which installs ``flash_attn/cute`` without
``flash_attn/__init__.py``), is skipped, not picked. The flash backends need ``head_dim`` to be a
multiple of 8 and at most 256.

A logit softcap (Gemma 2) is computed by ``flash_attn_4``, ``flash_attn`` (2.6 and later) and
``cpu``; ``torch_flash`` has none, so automatic selection skips it for softcapped attention and
asking for it explicitly raises.

On a CUDA device the automatic choice never falls back to ``cpu``: that kernel materialises the
``[Lq, Lk, H]`` scores of every block (8.6 GB at 8K x 8K x 32 heads), so float32 input, an older
GPU or an unsupported head_dim raise instead, naming the fix; ``backend="cpu"`` asks for it
explicitly. Override the choice with ``backend=`` or the environment variable
``HF_RING_ATTENTION_BACKEND``.
"""

from __future__ import annotations

import os

import torch

from . import cpu, flash_attn, flash_attn_4, torch_flash
from .contract import Kernel, Varlen, accumulate_dtype, resolve_scale, resolve_softcap, takes_empty_sequences

BACKENDS: dict[str, Kernel] = {m.name: m for m in (flash_attn_4, flash_attn, torch_flash, cpu)}
ENV_VAR = "HF_RING_ATTENTION_BACKEND"
SOFTCAP_BACKENDS = {
    "flash_attn_4": "flash_attn_4 (pip install flash-attn-4; SM90 or newer)",
    "flash_attn": "flash_attn (flash-attn >= 2.6; sm80 or newer)",
    "cpu": "cpu (any device, slow on a GPU)",
}
"""The backends whose kernels take a logit softcap, as error messages name them."""

__all__ = ["BACKENDS", "ENV_VAR", "SOFTCAP_BACKENDS", "Kernel", "Varlen", "accumulate_dtype", "get_kernel",
           "resolve_scale", "resolve_softcap", "takes_empty_sequences"]


def get_kernel(backend: str | Kernel | None, device, dtype: torch.dtype, head_dim: int,
               softcap: float = 0.0) -> Kernel:
    """The kernel backend for ``device``, ``dtype`` and ``head_dim``.

    Args:
        backend (`str` or `Kernel`, *optional*): a name from :data:`BACKENDS`, or an object that
            follows :class:`Kernel` (tests). None: the ``HF_RING_ATTENTION_BACKEND`` environment
            variable, else the first backend of :data:`BACKENDS` that can run here (on CUDA, never
            ``cpu``).
        device (`torch.device`): where q, k, v live.
        dtype (`torch.dtype`): their dtype.
        head_dim (`int`): their last dimension.
        softcap (`float`): the logit softcap of the attention (0.0: none; see
            :func:`~hf_ring_attention.kernels.contract.resolve_softcap`).

    Raises:
        ValueError: for an unknown name, a backend that cannot run here (``torch_flash`` with a
            softcap among them: the message names the backends that have one), or (automatic
            choice on CUDA) no flash backend that can; the message gives every backend's reason
            and the fix.
    """
    device = torch.device(device)
    requested = backend if backend is not None else (os.environ.get(ENV_VAR) or None)
    if requested is None:
        return _automatic(device, dtype, head_dim, softcap)
    if isinstance(requested, str):
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}; choose one of {list(BACKENDS)}")
        module = BACKENDS[requested]
    elif isinstance(requested, Kernel):
        module = requested
    else:
        raise TypeError(f"backend must be a name from {list(BACKENDS)} or a Kernel, got {type(requested).__name__}")
    reason = module.check(device, dtype, head_dim, softcap)
    if reason is not None:
        with_softcap = f", softcap {softcap}" if softcap else ""
        raise ValueError(f"backend {module.name!r} cannot run on {device} with {_dt(dtype)}, head_dim "
                         f"{head_dim}{with_softcap}: it {reason}{_softcap_hint(softcap)}")
    return module


def _softcap_hint(softcap: float) -> str:
    if not softcap:
        return ""
    return f". Backends with a logit softcap: {'; '.join(SOFTCAP_BACKENDS.values())}"


def _automatic(device: torch.device, dtype: torch.dtype, head_dim: int, softcap: float) -> Kernel:
    reasons = {}
    for name, module in BACKENDS.items():
        if module is cpu and device.type == "cuda":
            break
        reason = module.check(device, dtype, head_dim, softcap)
        if reason is None:
            return module
        reasons[name] = reason
    listed = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
    fixes = []
    if dtype not in (torch.float16, torch.bfloat16):
        fixes.append("cast q, k, v to bfloat16 or float16 (or run the model under torch.autocast)")
    if head_dim % 8 or head_dim > 256:
        fixes.append("use a head_dim that is a multiple of 8 and at most 256")
    if softcap:
        fixes.append(f"for the logit softcap ({softcap}) install flash-attn 4 (pip install flash-attn-4, SM90 or "
                     f"newer) or flash-attn >= 2.6: PyTorch's built-in kernels (torch_flash) have no softcap")
    if not fixes:
        fixes.append("see the reasons above: PyTorch's built-in kernels (torch_flash) need no install on an "
                     "sm80 or newer GPU")
    fix = "; ".join(fixes)
    with_softcap = f", softcap {softcap}" if softcap else ""
    raise ValueError(
        f"no flash attention kernel can run on {device} with {_dt(dtype)} and head_dim {head_dim}{with_softcap} "
        f"({listed}). "
        f"Fix: {fix}. backend='cpu' runs the reference kernel on the GPU instead, which materialises the "
        f"[Lq, Lk, heads] scores of every block (8.6 GB at 8K x 8K x 32 heads); ask for it explicitly if "
        f"that is what you want."
    )


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
