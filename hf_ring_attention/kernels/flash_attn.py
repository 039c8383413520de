"""Adapter for the flash-attn package's varlen kernels (used when it is installed, on CUDA).

flash-attn is source-only on PyPI and cannot be built on our CI machines, so this adapter is kept
thin and is tested against a stand-in that follows the package's documented signature
(``tests/test_kernels.py``). Differences between 2.x releases absorbed here:

* ``_flash_attn_varlen_forward`` returns ``(out, softmax_lse, S_dmask, rng_state)`` from 2.7 on
  and an 8-tuple ``(out, q, k, v, out_padded, softmax_lse, S_dmask, rng_state)`` before;
* the window is ``window_size_left=, window_size_right=`` from 2.7 on and ``window_size=(l, r)``
  before; both are found by inspecting the signature, never by comparing version strings.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from functools import lru_cache

import torch

name = "flash_attn"
DTYPES = (torch.float16, torch.bfloat16)


def is_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None


@lru_cache(maxsize=None)
def _interface():
    return importlib.import_module("flash_attn.flash_attn_interface")


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


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, softmax_scale):
    fn = _interface()._flash_attn_varlen_forward
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    result = fn(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, softmax_scale, causal,
        **_window_kwargs(fn, window),
        **_present(fn, softcap=0.0, alibi_slopes=None, return_softmax=False),
    )
    out, lse = (result[0], result[1]) if len(result) == 4 else (result[0], result[5])
    return out, lse


def backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, softmax_scale):
    fn = _interface()._flash_attn_varlen_backward
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    fn(
        dout.contiguous(), q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, 0.0, softmax_scale, causal,
        **_window_kwargs(fn, window),
        **_present(fn, softcap=0.0, alibi_slopes=None, deterministic=False),
    )
    return dq, dk, dv
