"""Backend ``flash_attn``: the flash-attn 2 package's varlen kernels (CUDA sm80+, fp16/bf16; see
``contract.py``).

flash-attn is source-only on PyPI and cannot be built on our CI machines, so this adapter is kept
thin and is tested against a stand-in that follows the package's documented signature
(``tests/test_kernels.py``). It is available when ``flash_attn.flash_attn_interface`` imports and
has the two functions it calls (checked once): ``find_spec("flash_attn")`` alone is not enough,
since flash-attn 4 installs ``flash_attn/cute`` as a namespace package without it.

Releases from 2.6 on are supported: before 2.6 the varlen kernels returned the log-sum-exp
padded per sequence (``[B, H, max_seqlen_q]``) instead of ``[H, total_q]``, which the merge cannot
read, so :func:`check` refuses them (recognised by their kernels taking no ``softcap``, which
arrived in the same release). Differences between the supported releases absorbed here:

* ``_flash_attn_varlen_forward`` returns ``(out, softmax_lse, S_dmask, rng_state)`` from 2.7 on
  and an 8-tuple ``(out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state)`` before;
* the window is ``window_size_left=, window_size_right=`` from 2.7 on and ``window_size=(l, r)``
  before; both are found by inspecting the signature, never by comparing version strings.

flash-attn 2 treats a window side >= ``max_seqlen_k`` as unbounded and an unbounded side next to a
bounded one as ``max_seqlen_k``; the plan reports ``max_seqlen_k >= max_seqlen_q`` so that both
rules leave every window it plans exact.
"""

from __future__ import annotations

import importlib
import inspect
from functools import lru_cache

import torch

from .contract import Varlen, capability, cuda_reason, dtype_reason, head_dim_reason

name = "flash_attn"
# Empty sequences (contract.py), read in flash-attn 2's csrc: the forward's early exit when a
# query block has no key block writes out 0 and lse +inf; the backward zeroes dq through its
# cleared dq accumulator, and writes dk = dv = 0 for key blocks of a sequence without queries
# ("This also covers the case where actual_seqlen_q == 0"; varlen calls are never "even").
# Not on ROCm, whose build runs other (CK) kernels: their backward wrote NaN into dk/dv for a
# sequence without queries until flash-attention PR #2421 (2026-04).
empty_sequences = torch.version.hip is None


@lru_cache(maxsize=None)
def _interface():
    module = importlib.import_module("flash_attn.flash_attn_interface")
    for fn in ("_flash_attn_varlen_forward", "_flash_attn_varlen_backward"):
        if not hasattr(module, fn):
            raise ImportError(f"flash_attn.flash_attn_interface has no {fn}")
    return module


def import_error() -> str | None:
    """Why the flash-attn 2 interface does not import, or None (cached)."""
    try:
        _interface()
    except Exception as error:  # a broken build raises anything from ImportError to OSError
        return f"{type(error).__name__}: {error}"
    return None


def check(device: torch.device, dtype: torch.dtype, head_dim: int, softcap: float = 0.0) -> str | None:
    """CUDA sm80+ with an importable flash-attn 2 of release 2.6 or later, fp16/bf16, head_dim %
    8 == 0 and <= 256."""
    reason = cuda_reason(device)
    if reason is not None:
        return reason
    error = import_error()
    if error is not None:
        return f"needs the flash-attn 2 package (pip install flash-attn): importing flash_attn.flash_attn_interface failed ({error})"
    major, minor = capability(device.index)
    if major < 8:
        return f"needs an sm80 (Ampere) or newer GPU, this one is sm{major}{minor}"
    return dtype_reason(dtype) or head_dim_reason(head_dim) or _release_reason()


def _release_reason() -> str | None:
    interface = _interface()
    for fn in ("_flash_attn_varlen_forward", "_flash_attn_varlen_backward"):
        if "softcap" not in _parameters(getattr(interface, fn)):
            return (f"needs flash-attn >= 2.6 (pip install -U flash-attn): this release's {fn} takes no "
                    f"softcap, and its log-sum-exp layout is the older padded one")
    return None


@lru_cache(maxsize=None)
def _parameters(fn):
    """Parameter names of a flash-attn function (cached: it is read on every kernel call);
    releases that register it with ``torch.library.custom_op`` hide the Python signature behind
    ``_init_fn``."""
    return inspect.signature(getattr(fn, "_init_fn", fn)).parameters


def _window_kwargs(fn, window) -> dict:
    if "window_size_left" in _parameters(fn):
        return {"window_size_left": window[0], "window_size_right": window[1]}
    return {"window_size": tuple(window)}


def _present(fn, **candidates) -> dict:
    """The keyword arguments among ``candidates`` that this release's ``fn`` takes (some have
    no default in some releases, so they are always passed when they exist)."""
    params = _parameters(fn)
    return {name: value for name, value in candidates.items() if name in params}


def forward(q, k, v, varlen: Varlen, softmax_scale: float, softcap: float = 0.0):
    fn = _interface()._flash_attn_varlen_forward
    result = fn(
        q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, varlen.max_seqlen_q, varlen.max_seqlen_k,
        0.0, softmax_scale, varlen.causal,
        **_window_kwargs(fn, varlen.window), softcap=softcap,
        **_present(fn, alibi_slopes=None, return_softmax=False),
    )
    out, lse = (result[0], result[1]) if len(result) == 4 else (result[0], result[5])
    return out, lse


def backward(dout, q, k, v, out, lse, varlen: Varlen, softmax_scale: float, softcap: float = 0.0):
    fn = _interface()._flash_attn_varlen_backward
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    fn(
        dout.contiguous(), q, k, v, out, lse, dq, dk, dv, varlen.cu_seqlens_q, varlen.cu_seqlens_k,
        varlen.max_seqlen_q, varlen.max_seqlen_k, 0.0, softmax_scale, varlen.causal,
        **_window_kwargs(fn, varlen.window), softcap=softcap,
        **_present(fn, alibi_slopes=None, deterministic=False),
    )
    return dq, dk, dv
