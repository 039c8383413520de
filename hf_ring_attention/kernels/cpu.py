"""Backend ``cpu``: pure PyTorch varlen attention returning the log-sum-exp (any device, any
float dtype; see ``contract.py``).

Legend: T tokens (packed), H heads (Hq query, Hkv key/value heads, G = Hq / Hkv), D head dim.
Tensors are ``q_THD [Tq, Hq, D]``, ``k_THD, v_THD [Tk, Hkv, D]``, ``lse_HT [Hq, Tq]``.

Each sequence of the varlen batch is computed on its own, in float32 (float64 for float64 input).
On CPU, sequences whose mask is full or square-causal go through PyTorch's fused CPU flash kernel
(``_scaled_dot_product_flash_attention_for_cpu``, which also returns the log-sum-exp; its causal
mask is aligned top-left, which equals bottom-right only when Lq == Lk). Everything else uses an
explicit bottom-right aligned band mask, and so does every call with a logit softcap (the fused
kernel takes none): scores ``c * tanh(s / c)``, whose backward multiplies by ``1 - tanh^2``. Automatic selection uses it on CPU only: on a GPU it
materialises the scores of every block (``backend="cpu"`` asks for it there explicitly).
"""

from __future__ import annotations

import torch
from einops import rearrange

from .contract import Varlen, accumulate_dtype

name = "cpu"
empty_sequences = True  # skipped: a row without keys keeps out 0, lse -inf; gradients stay 0


def check(device: torch.device, dtype: torch.dtype, head_dim: int, softcap: float = 0.0) -> str | None:
    """Runs anywhere, in any floating point dtype, with or without a logit softcap."""
    return None if dtype.is_floating_point else f"needs a floating point dtype, got {dtype}"


def _fused_ok(q: torch.Tensor, lq: int, lk: int, window, softcap: float) -> bool:
    if q.device.type != "cpu" or softcap:
        return False
    return window == (-1, -1) or (window == (-1, 0) and lq == lk)


def _band_mask(lq: int, lk: int, window, device) -> torch.Tensor:
    """[Lq, Lk] bool: key j visible for query i iff -left <= j - i - (lk - lq) <= right."""
    left, right = window
    rel = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None] - (lk - lq)
    mask = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= rel >= -left
    if right >= 0:
        mask &= rel <= right
    return mask


def _sequences(cu_q: torch.Tensor, cu_k: torch.Tensor):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return zip(cq, cq[1:], ck, ck[1:])


def _grouped(x_THD: torch.Tensor, hkv: int) -> torch.Tensor:
    return rearrange(x_THD, "t (h g) d -> t h g d", h=hkv)


def forward(q, k, v, varlen: Varlen, softmax_scale: float, softcap: float = 0.0):
    """Varlen attention forward. Returns ``(out [Tq, Hq, D] in q.dtype, lse [Hq, Tq] float32)``
    (float64 lse for float64 input). Rows that see no key get out = 0 and lse = -inf. A positive
    ``softcap`` caps the scores at ``softcap * tanh(scores / softcap)``."""
    window = varlen.window
    cdt = accumulate_dtype(q.dtype)
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=cdt, device=q.device)
    hkv = k.shape[1]
    for q0, q1, k0, k1 in _sequences(varlen.cu_seqlens_q, varlen.cu_seqlens_k):
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        qs, ks, vs = q[q0:q1], k[k0:k1], v[k0:k1]
        if _fused_ok(q, lq, lk, window, softcap):
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],
                0.0, window == (-1, 0), scale=softmax_scale,
            )
            out[q0:q1] = o[0].transpose(0, 1)
            lse[:, q0:q1] = l[0]
            continue
        s, _ = _scores(qs, ks, hkv, softmax_scale, softcap, cdt)
        s = s.masked_fill(~_band_mask(lq, lk, window, q.device), float("-inf"))
        l = torch.logsumexp(s, dim=-1)  # [Hkv, G, Lq]
        p = torch.exp(s - l.masked_fill(l == float("-inf"), 0)[..., None])
        o = torch.einsum("hgqk,khd->qhgd", p, vs.to(cdt))
        out[q0:q1] = o.reshape(lq, -1, q.shape[-1]).to(q.dtype)
        lse[:, q0:q1] = l.reshape(-1, lq)
    return out, lse


def backward(dout, q, k, v, out, lse, varlen: Varlen, softmax_scale: float, softcap: float = 0.0):
    """Gradients of a forward call, recomputed from ``out`` and ``lse`` (which may be the merged
    results of several calls: only the probabilities ``exp(s - lse)`` are recomputed).
    Returns ``(dq, dk, dv)`` in the input dtypes; dk and dv have Hkv heads."""
    window = varlen.window
    cdt = accumulate_dtype(q.dtype)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    hkv = k.shape[1]
    for q0, q1, k0, k1 in _sequences(varlen.cu_seqlens_q, varlen.cu_seqlens_k):
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        qs, ks, vs, dos, os_ = q[q0:q1], k[k0:k1], v[k0:k1], dout[q0:q1], out[q0:q1]
        ls = lse[:, q0:q1]
        if _fused_ok(q, lq, lk, window, softcap):
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                dos.transpose(0, 1)[None], qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                vs.transpose(0, 1)[None], os_.transpose(0, 1)[None],
                ls.to(cdt)[None].contiguous(), 0.0, window == (-1, 0), scale=softmax_scale,
            )
            dq[q0:q1], dk[k0:k1], dv[k0:k1] = (g[0].transpose(0, 1) for g in grads)
            continue
        s, tanh = _scores(qs, ks, hkv, softmax_scale, softcap, cdt)
        s = s.masked_fill(~_band_mask(lq, lk, window, q.device), float("-inf"))
        l = ls.to(cdt).reshape(hkv, -1, lq)
        p = torch.exp(s - l.masked_fill(l == float("-inf"), 0)[..., None])
        do = _grouped(dos, hkv).to(cdt)
        dv[k0:k1] = torch.einsum("hgqk,qhgd->khd", p, do).to(v.dtype)
        dp = torch.einsum("qhgd,khd->hgqk", do, vs.to(cdt))
        delta = (do * _grouped(os_, hkv).to(cdt)).sum(-1).permute(1, 2, 0)  # [Hkv, G, Lq]
        ds = p * (dp - delta[..., None])
        if tanh is not None:  # d/dx of c * tanh(x / c)
            ds = ds * (1 - tanh * tanh)
        scale = softmax_scale
        dq[q0:q1] = (torch.einsum("hgqk,khd->qhgd", ds, ks.to(cdt)) * scale).reshape(lq, -1, q.shape[-1]).to(q.dtype)
        dk[k0:k1] = (torch.einsum("hgqk,qhgd->khd", ds, _grouped(qs, hkv).to(cdt)) * scale).to(k.dtype)
    return dq, dk, dv


def _scores(qs, ks, hkv, softmax_scale, softcap, cdt):
    """``(scores [Hkv, G, Lq, Lk], tanh)``: the (capped) scores in ``cdt``, and with a softcap the
    ``tanh(raw / softcap)`` the backward needs (None without)."""
    s = torch.einsum("qhgd,khd->hgqk", _grouped(qs, hkv).to(cdt), ks.to(cdt)) * softmax_scale
    if not softcap:
        return s, None
    tanh = torch.tanh(s / softcap)
    return softcap * tanh, tanh
