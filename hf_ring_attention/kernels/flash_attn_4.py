"""Backend ``flash_attn_4``: flash-attn 4 (``pip install flash-attn-4``: ``flash_attn.cute``, kernels
written in the CuTe DSL) on SM90 or newer, fp16/bf16 (see ``contract.py``). It is the FA3-class
kernel for Hopper (H100, H200) and also runs on Blackwell.

It calls the private ``flash_attn.cute.interface._flash_attn_fwd`` and ``_flash_attn_bwd`` (read
in 4.0.0b36), because the ring needs what the public autograd function hides: the log-sum-exp,
and a backward from a given (merged) out and lse. Everything goes by keyword, and the adapter
is available only if both functions take every keyword it passes (checked once, with the
import). Differences from flash-attn 2 absorbed here:

* an unbounded window side is ``None``, not -1 (a single -1 is not normalised by flash-attn 4);
* ``_flash_attn_fwd`` returns a tuple that starts with ``(out, lse)``, lse float32 ``[Hq, Tq]``
  with -inf for rows that see no key; ``_flash_attn_bwd`` takes ``(q, k, v, out, dout, lse)`` and
  returns a tuple that starts with ``(dq, dk, dv)``;
* no window clamping at ``max_seqlen_k``; head_dim 8..256 in steps of 8 on SM90, at most 128 (or
  exactly 256) on SM100/SM110;
* the logit softcap is the keyword ``softcap`` of both functions (``None`` or 0.0 for none in the
  forward, 0.0 in the backward), passed only when one is asked for; its backward has no softcap
  on SM120 nor in the dedicated head_dim 256 kernel of SM100/SM110 (asserted there), so
  :func:`check` refuses those.

Kernels are compiled on first use of each configuration (dtype, head_dim, GQA ratio, causal or
windowed, ...), which takes seconds; window sizes are runtime values and do not recompile. Tests
run the adapter against a stand-in with these signatures (``tests/test_kernels.py``): flash-attn 4
needs a Hopper GPU and the CUDA DSL.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from functools import lru_cache

import torch
from packaging.version import Version

from .contract import Varlen, capability, cuda_reason, dtype_reason, head_dim_reason

name = "flash_attn_4"
# Empty sequences (contract.py), read in 4.0.0b36: a query row without keys finishes its softmax
# with row sum 0, giving out 0 and lse -inf; the backward preprocess zeroes the dq accumulator,
# and a key tile of a varlen sequence without query blocks writes dk = dv = 0
# (flash_bwd_sm90.py and flash_bwd_sm100.py, "KV tile with zero Q blocks"). Older betas crashed
# (head_dim 256 backward on SM100) or hung on such sequences (flash-attention #2562, #2568):
# check() refuses releases before OLDEST.
empty_sequences = True
OLDEST = "4.0.0b36"

FORWARD_KEYWORDS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                    "softmax_scale", "causal", "window_size_left", "window_size_right", "return_lse")
BACKWARD_KEYWORDS = ("q", "k", "v", "out", "dout", "lse", "softmax_scale", "causal", "window_size_left",
                     "window_size_right", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                     "deterministic")


@lru_cache(maxsize=None)
def _interface():
    module = importlib.import_module("flash_attn.cute.interface")
    for fn, keywords in (("_flash_attn_fwd", FORWARD_KEYWORDS), ("_flash_attn_bwd", BACKWARD_KEYWORDS)):
        if not hasattr(module, fn):
            raise ImportError(f"flash_attn.cute.interface has no {fn}")
        missing = [k for k in keywords if k not in inspect.signature(getattr(module, fn)).parameters]
        if missing:
            raise ImportError(f"flash_attn.cute.interface.{fn} takes no {missing} in this release")
    return module


def import_error() -> str | None:
    """Why flash-attn 4 does not import with the expected functions, or None (cached)."""
    try:
        _interface()
    except Exception as error:  # the CuTe DSL raises more than ImportError without its libraries
        return f"{type(error).__name__}: {error}"
    return None


def check(device: torch.device, dtype: torch.dtype, head_dim: int, softcap: float = 0.0) -> str | None:
    """CUDA SM90+ with an importable flash-attn 4, fp16/bf16, and a head_dim its kernels build;
    for a softcap, a release and an architecture whose backward takes one."""
    reason = cuda_reason(device)
    if reason is not None:
        return reason
    error = import_error()
    if error is not None:
        return f"needs flash-attn 4 (pip install flash-attn-4): importing flash_attn.cute.interface failed ({error})"
    release = _release_reason()
    if release is not None:
        return release
    major, minor = capability(device.index)
    if major < 9:
        return f"needs an SM90 (Hopper) or newer GPU for its backward, this one is sm{major}{minor}"
    reason = dtype_reason(dtype)
    if reason is None and not (major in (10, 11) and head_dim == 256):
        reason = head_dim_reason(head_dim, largest=128 if major in (10, 11) else 256)
    if reason is None and softcap:
        reason = _softcap_reason(major, head_dim)
    return reason


@lru_cache(maxsize=None)
def _release_reason() -> str | None:
    """Why the installed flash-attn 4 is too old for this adapter, or None (also when its release
    is unknown: an install from source, newer than any wheel)."""
    try:
        installed = importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return None
    if Version(installed) < Version(OLDEST):
        return (f"needs flash-attn-4 >= {OLDEST} (pip install -U flash-attn-4), found {installed}: older "
                f"betas take other arguments and crash or hang on the ring's empty sequences")
    return None


def _softcap_reason(major: int, head_dim: int) -> str | None:
    interface = _interface()
    for fn in ("_flash_attn_fwd", "_flash_attn_bwd"):
        if "softcap" not in inspect.signature(getattr(interface, fn)).parameters:
            return f"has no logit softcap in this release (flash_attn.cute.interface.{fn} takes no softcap)"
    if major == 12:
        return f"has no logit softcap in its backward on sm{major}x"
    if major in (10, 11) and head_dim == 256:
        return f"has no logit softcap in its head_dim 256 backward on sm{major}x"
    return None


def _window(varlen: Varlen) -> dict:
    if varlen.causal:
        return {"causal": True, "window_size_left": None, "window_size_right": None}
    left, right = varlen.window
    return {"causal": False, "window_size_left": None if left < 0 else left,
            "window_size_right": None if right < 0 else right}


def _softcap(softcap: float) -> dict:
    return {"softcap": softcap} if softcap else {}


def forward(q, k, v, varlen: Varlen, softmax_scale: float, softcap: float = 0.0):
    result = _interface()._flash_attn_fwd(
        q=q, k=k, v=v, cu_seqlens_q=varlen.cu_seqlens_q, cu_seqlens_k=varlen.cu_seqlens_k,
        max_seqlen_q=varlen.max_seqlen_q, max_seqlen_k=varlen.max_seqlen_k, softmax_scale=softmax_scale,
        return_lse=True, **_window(varlen), **_softcap(softcap),
    )
    return result[0], result[1]


def backward(dout, q, k, v, out, lse, varlen: Varlen, softmax_scale: float, softcap: float = 0.0):
    result = _interface()._flash_attn_bwd(
        q=q, k=k, v=v, out=out, dout=dout.contiguous(), lse=lse, softmax_scale=softmax_scale,
        cu_seqlens_q=varlen.cu_seqlens_q, cu_seqlens_k=varlen.cu_seqlens_k,
        max_seqlen_q=varlen.max_seqlen_q, max_seqlen_k=varlen.max_seqlen_k, deterministic=False,
        **_window(varlen), **_softcap(softcap),
    )
    return result[0], result[1], result[2]
