"""Kernel backends: one contract (varlen, returns lse, bottom-right masks), checked per backend."""

import sys
import types

import pytest
import torch

from hf_ring_attention import kernels
from hf_ring_attention.kernels import flash_attn as flash_adapter
from hf_ring_attention.kernels import reference
from helpers import assert_close


def band_reference(q, k, v, cu_q, cu_k, window, scale):
    """float64 (out, lse) of every sequence with a bottom-right aligned (left, right) window."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64)
    groups = q.shape[1] // k.shape[1]
    for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        lq, lk = q1 - q0, k1 - k0
        rel = torch.arange(lk)[None, :] - torch.arange(lq)[:, None] - (lk - lq)
        seen = torch.ones(lq, lk, dtype=torch.bool)
        if window[0] >= 0:
            seen &= rel >= -window[0]
        if window[1] >= 0:
            seen &= rel <= window[1]
        kk = k[k0:k1].double().repeat_interleave(groups, 1)
        vv = v[k0:k1].double().repeat_interleave(groups, 1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].double(), kk) * scale
        s = s.masked_fill(~seen, float("-inf"))
        lse[:, q0:q1] = torch.logsumexp(s, -1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1).nan_to_num(0), vv)
    return out, lse


CASES = [
    # (lq list, lk list, window) -- windows as the planner produces them
    ([5, 7], [5, 7], (-1, 0)),  # square causal -> fused CPU kernel
    ([4, 3], [9, 3], (-1, -1)),  # full -> fused CPU kernel
    ([3, 6], [8, 6], (-1, 0)),  # causal with Lq < Lk: bottom-right aligned
    ([6], [4], (-1, 2)),  # causal diagonal shifted right
    ([5, 7], [5, 9], (2, 0)),  # sliding window
    ([5], [5], (1, 3)),  # two-sided band (non-causal window)
    ([4], [6], (3, -1)),  # lower bound only
]


@pytest.mark.parametrize("lqs, lks, window", CASES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_matches_float64_band_attention(lqs, lks, window, heads, dtype):
    gen = torch.Generator().manual_seed(0)
    cu_q, cu_k = [0], [0]
    for a, b in zip(lqs, lks):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + b)
    hq, hkv = heads
    q = torch.randn(cu_q[-1], hq, 16, generator=gen).to(dtype)
    k = torch.randn(cu_k[-1], hkv, 16, generator=gen).to(dtype)
    v = torch.randn(cu_k[-1], hkv, 16, generator=gen).to(dtype)
    scale = 0.3
    causal = window == (-1, 0)
    cq, ck = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    args = (cq, ck, max(lqs), max(lks), causal, window, scale)
    out, lse = reference.forward(q, k, v, *args)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (hq, cu_q[-1])
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = band_reference(qd, kd, vd, cu_q, cu_k, window, scale)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    grads = reference.backward(dout, q, k, v, out, lse, *args)
    ref_grads = torch.autograd.grad(ref_out, (qd, kd, vd), dout.double())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape
        assert_close(g, r, dtype, f"d{name}")


def test_fused_and_explicit_cpu_paths_agree():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(9, 4, 8, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 9], dtype=torch.int32)
    fused = reference.forward(q, k, v, cu, cu, 9, 9, True, (-1, 0), None)
    # (-1, 0) with a no-op left bound 100 takes the explicit path, same mask
    explicit = reference.forward(q, k, v, cu, cu, 9, 9, False, (100, 0), None)
    torch.testing.assert_close(fused[0], explicit[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused[1], explicit[1], rtol=1e-6, atol=1e-6)


def test_automatic_selection_on_cpu_is_cpu_backend():
    assert kernels.get_kernel(None, torch.device("cpu"), torch.float32) is reference


def test_environment_variable_overrides_and_unknown_backends_fail(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "cpu")
    assert kernels.get_kernel(None, torch.device("cpu"), torch.bfloat16) is reference
    monkeypatch.setenv(kernels.ENV_VAR, "magic")
    with pytest.raises(ValueError, match="unknown backend 'magic'"):
        kernels.get_kernel(None, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "flash_attn"])
def test_unavailable_backend_is_a_clear_error(backend):
    with pytest.raises(ValueError, match=f"backend '{backend}' is not available on device cpu"):
        kernels.get_kernel(backend, torch.device("cpu"), torch.bfloat16)


# ------------------------------------------------------------------ flash-attn adapter
def _stand_in(new_api: bool, custom_op: bool = False):
    """A fake ``flash_attn.flash_attn_interface`` with the documented 2.x signatures, computing
    with the CPU reference, so the adapter's argument handling can be checked without CUDA."""
    calls = []

    def window_of(kw):
        return (kw["window_size_left"], kw["window_size_right"]) if new_api else kw["window_size"]

    def fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, **kw):
        assert dropout_p == 0.0
        window = window_of(kw)
        calls.append(("fwd", causal, window, softmax_scale))
        if causal:  # flash-attn: causal means window (-1, 0)
            window = (window[0], 0)
        out, lse = reference.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, causal, tuple(window), softmax_scale)
        if new_api:
            return out, lse, None, None
        return out, q, k, v, out, lse, None, None

    def bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, **kw):
        window = window_of(kw)
        calls.append(("bwd", causal, window, softmax_scale, kw.get("deterministic")))
        if causal:
            window = (window[0], 0)
        grads = reference.backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k,
                                   max_seqlen_q, max_seqlen_k, causal, tuple(window), softmax_scale)
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g)
        return dq, dk, dv

    if new_api:
        def forward_api(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                        softmax_scale, causal, window_size_left=-1, window_size_right=-1,
                        softcap=0.0, alibi_slopes=None, return_softmax=False):
            return fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                       softmax_scale, causal, window_size_left=window_size_left,
                       window_size_right=window_size_right)

        def backward_api(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                         window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                         rng_state=None):
            return bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                       max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                       window_size_left=window_size_left, window_size_right=window_size_right,
                       deterministic=deterministic)
    else:
        def forward_api(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                        softmax_scale, causal, window_size=(-1, -1), alibi_slopes=None,
                        return_softmax=False):
            return fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                       softmax_scale, causal, window_size=window_size)

        def backward_api(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                         alibi_slopes, deterministic, rng_state=None):
            return bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                       max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                       window_size=window_size, deterministic=deterministic)

    module = types.ModuleType("flash_attn.flash_attn_interface")
    module._flash_attn_varlen_forward = forward_api
    module._flash_attn_varlen_backward = backward_api
    if custom_op:
        module._flash_attn_varlen_forward = _CustomOp(forward_api)
        module._flash_attn_varlen_backward = _CustomOp(backward_api)
    return module, calls


class _CustomOp:
    """How ``torch.library.custom_op`` presents a function (flash-attn >= 2.7 registers its
    kernels that way): a ``(*args, **kwargs)`` callable, the Python function in ``_init_fn``."""

    def __init__(self, fn):
        self._init_fn = fn

    def __call__(self, *args, **kwargs):
        return self._init_fn(*args, **kwargs)


@pytest.mark.parametrize("new_api, custom_op", [(True, True), (True, False), (False, False)],
                         ids=["flash-attn>=2.7 custom op", "flash-attn>=2.7", "flash-attn<2.7"])
@pytest.mark.parametrize("causal, window", [(True, (-1, 0)), (False, (3, 0)), (False, (-1, -1))])
def test_flash_attn_adapter_follows_documented_signature(monkeypatch, new_api, custom_op, causal, window):
    module, calls = _stand_in(new_api, custom_op)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", module)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    flash_adapter._interface.cache_clear()
    try:
        gen = torch.Generator().manual_seed(2)
        q, k, v = (torch.randn(7, 4, 8, generator=gen) for _ in range(3))
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        args = (cu, cu, 4, 4, causal, window, None)
        out, lse = flash_adapter.forward(q, k, v, *args)
        ref_out, ref_lse = reference.forward(q, k, v, *args)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
        dout = torch.randn(q.shape, generator=gen)
        for got, want in zip(flash_adapter.backward(dout, q, k, v, out, lse, *args),
                             reference.backward(dout, q, k, v, out, lse, *args)):
            assert torch.equal(got, want)
        assert calls[0] == ("fwd", causal, window, 8 ** -0.5)
        assert calls[1] == ("bwd", causal, window, 8 ** -0.5, False)
    finally:
        flash_adapter._interface.cache_clear()
