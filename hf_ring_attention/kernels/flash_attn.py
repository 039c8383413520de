"""Backend ``flash_attn``: the flash-attn 2 package's varlen kernels (CUDA sm80+, fp16/bf16; see
``contract.py``).

flash-attn is source-only on PyPI and cannot be built on our CI machines, so this adapter is kept
thin and is tested against a stand-in that follows the package's documented signature
(``tests/test_kernels.py``). It is available when ``flash_attn.flash_attn_interface`` imports and
has the two functions it calls (checked once): ``find_spec("flash_attn")`` alone is not enough,
since flash-attn 4 installs ``flash_attn/cute`` as a namespace package without it.

Differences between 2.x releases absorbed here:

* ``_flash_attn_varlen_forward`` returns ``(out, softmax_lse, S_dmask, rng_state)`` from 2.7 on
  and an 8-tuple ``(out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state)`` before;
* the window is ``window_size_left=, window_size_right=`` from 2.7 on and ``window_size=(l, r)``
  before; both are found by inspecting the signature, never by comparing version strings;
* the logit softcap (``softcap``, forward and backward) exists from 2.6 on: a release whose
  functions take no ``softcap`` is refused for softcapped calls by :func:`check`.

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
    """CUDA sm80+ with an importable flash-attn 2, fp16/bf16, head_dim % 8 == 0 and <= 256; for
    a softcap, a release whose kernels take one (2.6 and later)."""
    reason = cuda_reason(device)
    if reason is not None:
        return reason
    error = import_error()
    if error is not None:
        return f"needs the flash-attn 2 package (pip install flash-attn): importing flash_attn.flash_attn_interface failed ({error})"
    major, minor = capability(device.index)
    if major < 8:
        return f"needs an sm80 (Ampere) or newer GPU, this one is sm{major}{minor}"
    return dtype_reason(dtype) or head_dim_reason(head_dim) or (_softcap_reason() if softcap else None)


def _softcap_reason() -> str | None:
    interface = _interface()
    for fn in ("_flash_attn_varlen_forward", "_flash_attn_varlen_backward"):
        if "softcap" not in _parameters(getattr(interface, fn)):
            return f"needs flash-attn >= 2.6 for a logit softcap: this release's {fn} takes no softcap"
    return None


def _parameters(fn):
    """Parameter names of a flash-attn function; releases that register it with
    ``torch.library.custom_op`` hide the Python signature behind ``_init_fn``."""
    return inspect.signature(getattr(fn, "_init_fn", fn)).parameters


def _window_kwargs(fn, window) -> dict:
    params = _parameters(fn)
    if "window_size_left" in params:
        return {"window_size_left": window[0], "window_size_right": window[1]}
    if "window_size" in params:
        return {"window_size": tuple(window)}
    if window != (-1, -1) and window != (-1, 0):
        raise NotImplementedError("this flash-attn release has no sliding-window support; upgrade to >= 2.3")
    return {}


def _present(fn, **candidates) -> dict:
    """The keyword arguments among ``candidates`` that this release's ``fn`` takes (some have
    no default in some releases, so they are always passed when they exist)."""
    params = _parameters(fn)
    return {name: value for name, value in candidates.items() if name in params}


def _softcap(fn, softcap: float) -> dict:
    """The ``softcap`` keyword for this release's ``fn`` (releases that have it take it without a
    default in the backward). Never dropped silently: :func:`check` refuses a softcap that the
    release cannot take, and this raises if it is asked anyway."""
    if "softcap" in _parameters(fn):
        return {"softcap": softcap}
    if softcap:
        raise NotImplementedError(_softcap_reason())
    return {}


def forward(q, k, v, varlen: Varlen, softmax_scale: float, softcap: float = 0.0):
    fn = _interface()._flash_attn_varlen_forward
    result = fn(
        q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, varlen.max_seqlen_q, varlen.max_seqlen_k,
        0.0, softmax_scale, varlen.causal,
        **_window_kwargs(fn, varlen.window),
        **_softcap(fn, softcap), **_present(fn, alibi_slopes=None, return_softmax=False),
    )
    out, lse = (result[0], result[1]) if len(result) == 4 else (result[0], result[5])
    return out, lse


def backward(dout, q, k, v, out, lse, varlen: Varlen, softmax_scale: float, softcap: float = 0.0):
    fn = _interface()._flash_attn_varlen_backward
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    fn(
        dout.contiguous(), q, k, v, out, lse, dq, dk, dv, varlen.cu_seqlens_q, varlen.cu_seqlens_k,
        varlen.max_seqlen_q, varlen.max_seqlen_k, 0.0, softmax_scale, varlen.causal,
        **_window_kwargs(fn, varlen.window),
        **_softcap(fn, softcap), **_present(fn, alibi_slopes=None, deterministic=False),
    )
    return dq, dk, dv
