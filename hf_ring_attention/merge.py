"""Merging one block's partial attention into the running result, in place.

Legend: T local tokens, n rows of the block, H query heads, D head dim. The running result is
``out [T, H, D]`` and ``lse [H, T]`` in the accumulation dtype (float32, float64 in tests); the
block's ``block_out [n, H, D]`` (any float dtype) and ``block_lse [H, n]`` (float32) belong to the
rows ``rows`` of the running result (:class:`hf_ring_attention.plan.Rows`: a range, or an index).

    naive:  lse = log(exp(a) + exp(b));   out = exp(a - lse) * out_a + exp(b - lse) * out_b
    here:   m = max(a, b);  s = exp(a - m) + exp(b - m);  lse = m + log(s)
            out = (exp(a - m) * out_a + exp(b - m) * out_b) / s

A row whose running lse is still -inf (no key seen yet) takes the block as it is; a row that
sees no key in either (both -inf) is left unchanged (out 0, lse -inf), never NaN. A block row
that saw no key adds nothing whatever the kernel wrote there: its lse may be -inf or +inf
(flash-attn 2 writes +inf), and its output is not read.

Two implementations with one interface: on CUDA a Triton kernel that reads the rows of (out, lse)
through the index and the block once, and writes once (about 16 bytes per element instead of the
~42 of float32 temporaries of eight elementwise kernels); elsewhere, or without Triton, PyTorch.
The ring calls :func:`prepare` before any communication: the first time on a device it runs a
tiny merge through Triton and compares it with PyTorch, and if Triton fails (an incompatible
release, say) it warns once and PyTorch merges on that device. Tests run the Triton kernel on CPU
through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch

NEG_INF = float("-inf")


def merge_(out: torch.Tensor, lse: torch.Tensor, rows, block_out: torch.Tensor, block_lse: torch.Tensor,
           *, use_triton: bool | None = None) -> None:
    """Merge ``(block_out, block_lse)`` into rows ``rows`` of ``(out, lse)``, in place.

    Args:
        out (`torch.Tensor`): ``[T, H, D]`` running output (float32 or float64), contiguous.
        lse (`torch.Tensor`): ``[H, T]`` running log-sum-exp, same dtype, contiguous.
        rows (`Rows`): the block's rows in ``out`` (``start``/``stop``, or ``index``).
        block_out (`torch.Tensor`): ``[n, H, D]``.
        block_lse (`torch.Tensor`): ``[H, n]``.
        use_triton (`bool`, *optional*): force the Triton kernel (True) or PyTorch (False);
            default: Triton for float32 results on a device where :func:`prepare` found it working.
    """
    if use_triton is None:
        use_triton = out.dtype == torch.float32 and prepare(out.device, block_out.shape[-1], block_out.dtype)
    if use_triton:
        _merge_triton(out, lse, rows, block_out, block_lse)
    else:
        _merge_torch(out, lse, rows, block_out, block_lse)


@lru_cache(maxsize=None)
def prepare(device: torch.device, head_dim: int = 24, dtype: torch.dtype = torch.float32) -> bool:
    """Whether merges on ``device`` of blocks with this head_dim and dtype go through Triton: a
    CUDA device, Triton imports, and a tiny merge through it matches PyTorch's (checked once per
    device, head_dim and dtype, which fix the kernel's compiled variant; a failure warns and
    returns False). Call it before communication starts: the check compiles the kernel."""
    device = torch.device(device)
    if device.type != "cuda" or _triton() is None:
        return False
    return self_test(device, head_dim, dtype)


def self_test(device: torch.device, head_dim: int = 24, dtype: torch.dtype = torch.float32) -> bool:
    """Merge a few random rows (by index and by range, with -inf rows) of blocks of ``head_dim``
    and ``dtype`` through Triton and PyTorch on ``device``; True if they agree, else a warning
    naming what went wrong and False."""
    from .plan import Rows

    gen = torch.Generator().manual_seed(0)
    out = torch.randn(9, 2, head_dim, generator=gen)
    lse = torch.randn(2, 9, generator=gen)
    lse[0, :3] = NEG_INF
    out[:3, 0] = 0.0
    block_out = torch.randn(4, 2, head_dim, generator=gen).to(dtype)
    block_lse = torch.randn(2, 4, generator=gen)
    block_lse[1, 0] = NEG_INF
    block_lse[0, 1] = float("inf")  # rows without keys, as flash-attn 2 returns them
    block_out[1, 0] = float("nan")
    index = torch.tensor([0, 2, 5, 8], dtype=torch.int32)
    try:
        for rows in (Rows(0, 9, index.to(device)), Rows(3, 7)):
            results = []
            for use_triton in (True, False):
                o, l = out.to(device), lse.to(device)
                merge_(o, l, rows, block_out.to(device), block_lse.to(device), use_triton=use_triton)
                results.append((o.cpu(), l.cpu()))
            (ot, lt), (of, lf) = results
            if not (torch.allclose(ot, of, rtol=1e-5, atol=1e-5) and torch.equal(lt.isinf(), lf.isinf())
                    and torch.allclose(lt[lf.isfinite()], lf[lf.isfinite()], rtol=1e-5, atol=1e-5)):
                raise AssertionError("its result differs from PyTorch's")
    except Exception as error:  # any failure of the fast path: keep the exact one
        warnings.warn(f"the Triton merge does not work on {device} ({type(error).__name__}: {error}); "
                      f"merging with PyTorch instead", RuntimeWarning, stacklevel=2)
        return False
    return True


def _merge_torch(out, lse, rows, block_out, block_lse) -> None:
    if rows.index is None:
        old_out, old_lse = out[rows.start:rows.stop], lse[:, rows.start:rows.stop]
    else:
        old_out, old_lse = out.index_select(0, rows.index), lse.index_select(1, rows.index)
    block_lse = block_lse.to(lse.dtype)
    block_lse = block_lse.masked_fill(block_lse == float("inf"), NEG_INF)  # a row without keys
    new_lse = torch.logaddexp(old_lse, block_lse)
    safe = new_lse.masked_fill(new_lse == NEG_INF, 0.0)
    w_old = torch.exp(old_lse - safe).transpose(0, 1).unsqueeze(-1)
    w_new = torch.exp(block_lse - safe).transpose(0, 1).unsqueeze(-1)
    new_out = old_out * w_old + torch.where(w_new > 0, block_out.to(out.dtype) * w_new, 0.0)
    if rows.index is None:
        old_out.copy_(new_out)
        old_lse.copy_(new_lse)
    else:
        out.index_copy_(0, rows.index.long(), new_out)
        lse.index_copy_(1, rows.index.long(), new_lse)


@lru_cache(maxsize=None)
def _triton():
    """The compiled merge kernel, or None when Triton does not import (decorated on first use, so
    that ``TRITON_INTERPRET`` set before it is honoured)."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or a broken install: PyTorch does the merge
        return None

    @triton.jit
    def merge_kernel(out_ptr, lse_ptr, index_ptr, bout_ptr, blse_ptr, n, row0, head_dim,
                     s_out_t, s_out_h, s_lse_h, s_bout_t, s_bout_h, s_blse_h,
                     HAS_INDEX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # one program: BLOCK_M rows of the block, one head, the whole head dim
        head = tl.program_id(1)
        i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        live = i < n
        if HAS_INDEX:
            row = tl.load(index_ptr + i, mask=live, other=0).to(tl.int64)
        else:
            row = (row0 + i).to(tl.int64)
        a = tl.load(lse_ptr + head * s_lse_h + row, mask=live, other=float("-inf"))
        b = tl.load(blse_ptr + head * s_blse_h + i, mask=live, other=float("-inf")).to(tl.float32)
        b = tl.where(b == float("inf"), float("-inf"), b)  # a row without keys
        m = tl.maximum(a, b)
        m = tl.where(m == float("-inf"), 0.0, m)
        wa = tl.exp(a - m)
        wb = tl.exp(b - m)
        s = wa + wb
        seen = s > 0.0
        d = tl.arange(0, BLOCK_D)
        tile = live[:, None] & (d < head_dim)[None, :]
        out_ptrs = out_ptr + row[:, None] * s_out_t + head * s_out_h + d[None, :]
        bout_ptrs = bout_ptr + i.to(tl.int64)[:, None] * s_bout_t + head * s_bout_h + d[None, :]
        o = tl.load(out_ptrs, mask=tile, other=0.0)
        bo = tl.load(bout_ptrs, mask=tile, other=0.0).to(tl.float32)
        scale = tl.where(seen, 1.0 / tl.where(seen, s, 1.0), 0.0)
        block = tl.where(wb[:, None] > 0.0, bo * wb[:, None], 0.0)  # never reads a keyless row's output
        tl.store(out_ptrs, (o * wa[:, None] + block) * scale[:, None], mask=tile & seen[:, None])
        new = tl.where(seen, m + tl.log(tl.where(seen, s, 1.0)), float("-inf"))
        tl.store(lse_ptr + head * s_lse_h + row, new, mask=live)

    return triton, merge_kernel


def _merge_triton(out, lse, rows, block_out, block_lse) -> None:
    found = _triton()
    if found is None:
        raise RuntimeError("use_triton=True but triton does not import")
    triton, kernel = found
    n, heads, head_dim = block_out.shape
    if n == 0:
        return
    if out.dtype != torch.float32 or lse.dtype != torch.float32:
        raise TypeError(f"the Triton merge accumulates in float32, got out {out.dtype}, lse {lse.dtype}")
    if out.stride(-1) != 1 or lse.stride(-1) != 1:
        raise ValueError("the Triton merge needs the running out and lse contiguous in their last dimension")
    block_out = block_out if block_out.stride(-1) == 1 else block_out.contiguous()
    block_lse = block_lse if block_lse.stride(-1) == 1 else block_lse.contiguous()
    block_d = triton.next_power_of_2(head_dim)
    block_m = max(1, min(64, 4096 // block_d))
    index = rows.index if rows.index is not None else block_lse  # any pointer: unused without an index
    kernel[(triton.cdiv(n, block_m), heads)](
        out, lse, index, block_out, block_lse, n, rows.start, head_dim,
        out.stride(0), out.stride(1), lse.stride(0), block_out.stride(0), block_out.stride(1), block_lse.stride(0),
        HAS_INDEX=rows.index is not None, BLOCK_M=block_m, BLOCK_D=block_d,
    )
