"""Kernel backends: one contract (varlen, returns lse, bottom-right masks), checked per backend;
selection by what imports, never the cpu kernel on CUDA by accident; adapters against stand-ins
that follow the real signatures."""

import importlib.metadata
import inspect
import sys
import types

import pytest
import torch

import fa2_rules
from hf_ring_attention import kernels
from hf_ring_attention.kernels import Varlen, cpu
from hf_ring_attention.kernels import flash_attn as flash_adapter
from hf_ring_attention.kernels import flash_attn_4 as fa4_adapter
from hf_ring_attention.kernels import torch_flash
from helpers import assert_close


def varlen(lqs, lks, window, max_seqlen_k=None) -> Varlen:
    cu_q, cu_k = [0], [0]
    for a, b in zip(lqs, lks):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + b)
    return Varlen(torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32), max(lqs),
                  max(lks) if max_seqlen_k is None else max_seqlen_k, window)


def band_reference(q, k, v, cu_q, cu_k, window, scale, softcap=0.0):
    """float64 (out, lse) of every sequence with a bottom-right aligned (left, right) window, the
    scores capped at ``softcap * tanh(s / softcap)`` when ``softcap`` is positive."""
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
        if softcap:
            s = softcap * torch.tanh(s / softcap)
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
# softcap 1.0 against scores of standard deviation 1.2 (N(0, 1) inputs, head_dim 16, scale 0.3):
# far from linear, so a cap ignored in the forward or in the backward (1 - tanh^2) shows
@pytest.mark.parametrize("softcap", [0.0, 1.0], ids=["no-softcap", "softcap"])
def test_cpu_kernel_matches_float64_band_attention(lqs, lks, window, heads, dtype, softcap):
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
    call = varlen(lqs, lks, window)
    out, lse = cpu.forward(q, k, v, call, scale, softcap)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (hq, cu_q[-1])
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = band_reference(qd, kd, vd, cu_q, cu_k, window, scale, softcap)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    grads = cpu.backward(dout, q, k, v, out, lse, call, scale, softcap)
    ref_grads = torch.autograd.grad(ref_out, (qd, kd, vd), dout.double())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape
        assert_close(g, r, dtype, f"d{name}")


def test_fused_and_explicit_cpu_paths_agree():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(9, 4, 8, generator=gen) for _ in range(3))
    fused = cpu.forward(q, k, v, varlen([9], [9], (-1, 0)), 8 ** -0.5)
    # (-1, 0) with a no-op left bound 100 takes the explicit path, same mask
    explicit = cpu.forward(q, k, v, varlen([9], [9], (100, 0)), 8 ** -0.5)
    torch.testing.assert_close(fused[0], explicit[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused[1], explicit[1], rtol=1e-6, atol=1e-6)



# ------------------------------------------------------------------------------ selection
def test_automatic_selection_on_cpu_is_cpu_backend():
    assert kernels.get_kernel(None, torch.device("cpu"), torch.float32, 64) is cpu


def test_backend_names_are_module_names():
    for name, module in kernels.BACKENDS.items():
        assert module.__name__ == f"hf_ring_attention.kernels.{name}"
        assert isinstance(module, kernels.Kernel)


def test_environment_variable_overrides_and_unknown_backends_fail(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "cpu")
    assert kernels.get_kernel(None, torch.device("cpu"), torch.bfloat16, 64) is cpu
    monkeypatch.setenv(kernels.ENV_VAR, "magic")
    with pytest.raises(ValueError, match="unknown backend 'magic'"):
        kernels.get_kernel(None, torch.device("cpu"), torch.float32, 64)


@pytest.mark.parametrize("backend", ["torch_flash", "flash_attn", "flash_attn_4"])
def test_unavailable_backend_is_a_clear_error(backend):
    with pytest.raises(ValueError, match=f"backend '{backend}' cannot run on cpu.*needs a CUDA device"):
        kernels.get_kernel(backend, torch.device("cpu"), torch.bfloat16, 64)


def test_a_kernel_object_is_accepted_as_backend():
    assert kernels.get_kernel(fa2_rules, torch.device("cpu"), torch.float32, 8) is fa2_rules
    with pytest.raises(TypeError, match="backend must be a name"):
        kernels.get_kernel(3, torch.device("cpu"), torch.float32, 8)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend this process has a CUDA GPU of a chosen compute capability (set ``.capability``),
    with flash-attn 2 and 4 importable or not (set ``.fa2`` / ``.fa4`` to a stand-in or None)."""
    state = types.SimpleNamespace(capability=(9, 0), fa2=None, fa4=None)
    for module in (fa4_adapter, flash_adapter, torch_flash):
        monkeypatch.setattr(module, "cuda_reason", lambda device: None if device.type == "cuda" else "needs CUDA")
        monkeypatch.setattr(module, "capability", lambda index: state.capability)

    def install():
        # None in sys.modules makes the import raise ImportError, like a missing package
        monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", state.fa2)
        monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", state.fa4)
        flash_adapter._interface.cache_clear()
        fa4_adapter._interface.cache_clear()

    state.install = install
    yield state
    flash_adapter._interface.cache_clear()
    fa4_adapter._interface.cache_clear()


def test_automatic_order_is_fa4_on_sm90_then_fa2_then_torch(fake_gpu):
    cuda, bf16 = torch.device("cuda", 0), torch.bfloat16
    fake_gpu.fa2, fake_gpu.fa4 = _fa2_stand_in("2.7")[0], _fa4_stand_in()[0]
    fake_gpu.install()
    assert kernels.get_kernel(None, cuda, bf16, 128) is fa4_adapter
    fake_gpu.capability = (8, 0)  # A100: flash-attn 4 has no backward there
    assert kernels.get_kernel(None, cuda, bf16, 128) is flash_adapter
    with pytest.raises(ValueError, match="'flash_attn_4' cannot run.*SM90"):
        kernels.get_kernel("flash_attn_4", cuda, bf16, 128)
    fake_gpu.fa2 = None
    fake_gpu.install()
    assert kernels.get_kernel(None, cuda, bf16, 128) is torch_flash


def test_flash_attn_4_alone_is_not_taken_for_flash_attn_2(fake_gpu):
    # the flash-attn-4 wheel installs flash_attn/cute without flash_attn/__init__.py: the package
    # is found, flash_attn.flash_attn_interface is not; selection must skip flash_attn, not fail
    # at the first kernel call
    fake_gpu.fa4, fake_gpu.capability = _fa4_stand_in()[0], (8, 0)
    fake_gpu.install()
    assert kernels.get_kernel(None, torch.device("cuda", 0), torch.float16, 64) is torch_flash
    with pytest.raises(ValueError, match="'flash_attn' cannot run.*importing flash_attn.flash_attn_interface failed"):
        kernels.get_kernel("flash_attn", torch.device("cuda", 0), torch.float16, 64)


def test_broken_flash_attn_2_is_skipped(fake_gpu, monkeypatch):
    fake_gpu.capability = (8, 6)
    fake_gpu.install()
    broken = types.ModuleType("flash_attn.flash_attn_interface")  # imports, but lacks the kernels
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", broken)
    flash_adapter._interface.cache_clear()
    assert kernels.get_kernel(None, torch.device("cuda", 0), torch.bfloat16, 64) is torch_flash


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_on_cuda_is_refused_unless_cpu_is_asked_for(fake_gpu, dtype):
    fake_gpu.fa4 = _fa4_stand_in()[0]
    fake_gpu.install()
    cuda = torch.device("cuda", 0)
    with pytest.raises(ValueError, match=rf"no flash attention kernel can run on cuda:0 with {str(dtype)[6:]}.*"
                                         r"cast q, k, v to bfloat16 or float16.*backend='cpu'"):
        kernels.get_kernel(None, cuda, dtype, 64)
    assert kernels.get_kernel("cpu", cuda, dtype, 64) is cpu


@pytest.mark.parametrize("head_dim, capability", [(100, (9, 0)), (264, (9, 0)), (4, (8, 0))])
def test_head_dim_the_flash_kernels_cannot_run_is_refused_on_cuda(fake_gpu, head_dim, capability):
    fake_gpu.fa4, fake_gpu.fa2, fake_gpu.capability = _fa4_stand_in()[0], _fa2_stand_in("2.7")[0], capability
    fake_gpu.install()
    with pytest.raises(ValueError, match=rf"head_dim {head_dim}.*multiple of 8 and at most"):
        kernels.get_kernel(None, torch.device("cuda", 0), torch.bfloat16, head_dim)


def test_flash_attn_4_head_dims_follow_the_architecture(fake_gpu):
    fake_gpu.fa4, fake_gpu.fa2 = _fa4_stand_in()[0], _fa2_stand_in("2.7")[0]
    fake_gpu.install()
    cuda = torch.device("cuda", 0)
    for capability in ((9, 0), (10, 0)):
        fake_gpu.capability = capability
        assert kernels.get_kernel(None, cuda, torch.bfloat16, 256) is fa4_adapter
    # SM100 builds head_dim <= 128 or 256: 192 falls through to flash-attn 2
    assert kernels.get_kernel(None, cuda, torch.bfloat16, 192) is flash_adapter
    fake_gpu.capability = (9, 0)
    assert kernels.get_kernel(None, cuda, torch.bfloat16, 192) is fa4_adapter


# ------------------------------------------------------------------ flash-attn 2 adapter
def _fa2_stand_in(release: str, custom_op: bool = False):
    """A fake ``flash_attn.flash_attn_interface`` with the documented signatures of a 2.x release
    (``"2.7"``: 4-tuple and ``window_size_left/right``; ``"2.6"``: 8-tuple and ``window_size``, with
    ``softcap``; ``"2.5"``: the same without ``softcap``), computing with the cpu kernel, so the
    adapter's argument handling can be checked without CUDA."""
    calls = []
    new_api = release == "2.7"

    def window_of(kw):
        return (kw["window_size_left"], kw["window_size_right"]) if new_api else kw["window_size"]

    def as_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window):
        if causal:  # flash-attn: causal means window (-1, 0)
            window = (window[0], 0)
        return Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, tuple(window))

    def fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, softcap=None, **kw):
        assert dropout_p == 0.0
        window = window_of(kw)
        calls.append(("fwd", causal, window, softmax_scale, softcap))
        out, lse = cpu.forward(q, k, v, as_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                  causal, window), softmax_scale, softcap or 0.0)
        if new_api:
            return out, lse, None, None
        return out, q, k, v, out, lse, None, None

    def bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, softcap=None, **kw):
        window = window_of(kw)
        calls.append(("bwd", causal, window, softmax_scale, kw.get("deterministic"), softcap))
        grads = cpu.backward(dout, q, k, v, out, softmax_lse,
                             as_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window),
                             softmax_scale, softcap or 0.0)
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g)
        return dq, dk, dv

    if new_api:
        def forward_api(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                        softmax_scale, causal, window_size_left=-1, window_size_right=-1,
                        softcap=0.0, alibi_slopes=None, return_softmax=False):
            return fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                       softmax_scale, causal, softcap, window_size_left=window_size_left,
                       window_size_right=window_size_right)

        def backward_api(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                         window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                         rng_state=None):
            return bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                       max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, softcap,
                       window_size_left=window_size_left, window_size_right=window_size_right,
                       deterministic=deterministic)
    elif release == "2.6":
        def forward_api(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                        softmax_scale, causal, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                        return_softmax=False):
            return fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                       softmax_scale, causal, softcap, window_size=window_size)

        def backward_api(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                         softcap, alibi_slopes, deterministic, rng_state=None):
            return bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                       max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, softcap,
                       window_size=window_size, deterministic=deterministic)
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


def _check_adapter_against_cpu(adapter, window, gen, softcap=0.0):
    q, k, v = (torch.randn(7, 4, 8, generator=gen) for _ in range(3))
    call = varlen([3, 4], [3, 4], window)
    scale = 8 ** -0.5
    out, lse = adapter.forward(q, k, v, call, scale, softcap)
    ref_out, ref_lse = cpu.forward(q, k, v, call, scale, softcap)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    dout = torch.randn(q.shape, generator=gen)
    for got, want in zip(adapter.backward(dout, q, k, v, out, lse, call, scale, softcap),
                         cpu.backward(dout, q, k, v, out, lse, call, scale, softcap)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("release, custom_op", [("2.7", True), ("2.7", False), ("2.6", False)],
                         ids=["flash-attn>=2.7 custom op", "flash-attn>=2.7", "flash-attn 2.6"])
@pytest.mark.parametrize("window", [(-1, 0), (3, 0), (-1, -1), (1, 2)])
def test_flash_attn_adapter_follows_documented_signature(monkeypatch, release, custom_op, window):
    module, calls = _fa2_stand_in(release, custom_op)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", module)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    flash_adapter._interface.cache_clear()
    try:
        _check_adapter_against_cpu(flash_adapter, window, torch.Generator().manual_seed(2))
        causal = window == (-1, 0)
        # the softcap is always passed (no default in the backward)
        assert calls[0] == ("fwd", causal, window, 8 ** -0.5, 0.0)
        assert calls[1] == ("bwd", causal, window, 8 ** -0.5, False, 0.0)
    finally:
        flash_adapter._interface.cache_clear()


# ------------------------------------------------------------------ flash-attn 4 adapter
def _fa4_stand_in(drop_keyword: str | None = None):
    """A fake ``flash_attn.cute.interface`` whose ``_flash_attn_fwd`` / ``_flash_attn_bwd`` have the
    signatures of flash-attn-4 4.0.0b36 (trimmed to the arguments that matter here, keyword
    defaults as there) and its conventions: None = unbounded window side (a negative side is an
    error here: flash-attn 4 would not normalise it), ``causal`` forces the right side to 0, lse
    -inf on rows with no key, a 5-tuple from the forward."""
    calls = []

    def to_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, left, right):
        for side in (left, right):
            assert side is None or side >= 0, f"flash-attn 4 got window side {side}: unbounded is None"
        if causal:
            right = 0
        window = (-1 if left is None else left, -1 if right is None else right)
        return Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window)

    def _flash_attn_fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None,
                        seqused_k=None, max_seqlen_q=None, max_seqlen_k=None, min_seqlen_k=None,
                        page_table=None, softmax_scale=None, causal=False, softcap=None,
                        window_size_left=None, window_size_right=None, learnable_sink=None,
                        return_lse=False, out=None, lse=None):
        assert seqused_q is None and seqused_k is None and qv is None
        calls.append(("fwd", causal, (window_size_left, window_size_right), softmax_scale, return_lse, softcap))
        o, l = cpu.forward(q, k, v, to_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                              window_size_left, window_size_right), softmax_scale, softcap or 0.0)
        return o, (l if return_lse else None), None, None, None

    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0,
                        window_size_left=None, window_size_right=None, m_block_size=64, n_block_size=128,
                        cu_seqlens_q=None, cu_seqlens_k=None, seqused_q=None, seqused_k=None,
                        max_seqlen_q=None, max_seqlen_k=None, deterministic=False, dq=None, dk=None, dv=None):
        calls.append(("bwd", causal, (window_size_left, window_size_right), softmax_scale, deterministic, softcap))
        return cpu.backward(dout, q, k, v, out, lse, to_varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                               max_seqlen_k, causal, window_size_left,
                                                               window_size_right), softmax_scale, softcap)

    module = types.ModuleType("flash_attn.cute.interface")
    module._flash_attn_fwd, module._flash_attn_bwd = _flash_attn_fwd, _flash_attn_bwd
    if drop_keyword is not None:  # a release whose forward lost a keyword the adapter passes
        def older_fwd(q, k, v, **kw):
            raise AssertionError("never called")

        params = inspect.signature(_flash_attn_fwd).parameters.values()
        older_fwd.__signature__ = inspect.Signature([p for p in params if p.name != drop_keyword])
        module._flash_attn_fwd = older_fwd
    return module, calls


@pytest.mark.parametrize("window, sent", [((-1, 0), (True, (None, None))), ((3, 0), (False, (3, 0))),
                                          ((-1, -1), (False, (None, None))), ((-1, 2), (False, (None, 2))),
                                          ((2, -1), (False, (2, None)))])
def test_flash_attn_4_adapter_follows_its_signature(monkeypatch, window, sent):
    module, calls = _fa4_stand_in()
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", module)
    fa4_adapter._interface.cache_clear()
    try:
        _check_adapter_against_cpu(fa4_adapter, window, torch.Generator().manual_seed(3))
        causal, sides = sent
        assert calls[0] == ("fwd", causal, sides, 8 ** -0.5, True, None)  # no softcap: the defaults
        assert calls[1] == ("bwd", causal, sides, 8 ** -0.5, False, 0.0)
    finally:
        fa4_adapter._interface.cache_clear()


def test_flash_attn_4_release_without_a_needed_keyword_is_unavailable(fake_gpu):
    fake_gpu.fa4 = _fa4_stand_in(drop_keyword="return_lse")[0]
    fake_gpu.install()
    reason = fa4_adapter.check(torch.device("cuda", 0), torch.bfloat16, 128)
    assert "_flash_attn_fwd takes no ['return_lse']" in reason
    assert kernels.get_kernel(None, torch.device("cuda", 0), torch.bfloat16, 128) is torch_flash


@pytest.mark.parametrize("installed, usable", [("4.0.0b20", False), ("4.0.0b36", True), ("4.0.0", True), (None, True)])
def test_flash_attn_4_releases_before_the_one_read_are_refused(fake_gpu, monkeypatch, installed, usable):
    """Older betas take other arguments and crash or hang on sequences without queries or keys;
    an install without a release (from source) is taken."""
    def version(name):
        assert name == "flash-attn-4"
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    fa4_adapter._release_reason.cache_clear()
    fake_gpu.fa4 = _fa4_stand_in()[0]
    fake_gpu.install()
    try:
        reason = fa4_adapter.check(torch.device("cuda", 0), torch.bfloat16, 128)
    finally:
        fa4_adapter._release_reason.cache_clear()
    if usable:
        assert reason is None
    else:
        assert "needs flash-attn-4 >= 4.0.0b36" in reason and "found 4.0.0b20" in reason


def test_every_built_in_backend_takes_empty_sequences():
    # what RingPlan.device_calls hands them (the GPU check confirms it on a device); a kernel that
    # does not say gets gathered rows
    assert all(kernels.takes_empty_sequences(module) for module in kernels.BACKENDS.values())
    assert not kernels.takes_empty_sequences(types.SimpleNamespace(name="mine"))


# ------------------------------------------------------------- flash-attn 2's window rules
@pytest.mark.parametrize("window, max_k, applied", [
    ((-1, 2), 2, (-1, -1)),   # right >= max_seqlen_k: unbounded
    ((-1, 2), 4, (4, 2)),     # unbounded left next to a bounded right: max_seqlen_k
    ((3, -1), 4, (3, 4)),
    ((5, 0), 4, (4, 0)),      # left >= max_seqlen_k: unbounded, then max_seqlen_k again
    ((-1, 0), 4, (4, 0)),     # causal: the same rewrite (no effect: every key is left of 4)
])
def test_fa2_rules_kernel_applies_flash_attn_2_window_rewrites(window, max_k, applied):
    assert fa2_rules.effective_window(varlen([4], [2], window, max_seqlen_k=max_k)) == applied


def test_fa2_right_clamp_is_wrong_when_max_seqlen_k_is_below_lq_minus_1():
    # the case of issue 11: Lq = 4, Lk = 2, window (-1, 2): query 0 sees key 0 only
    gen = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(4, 2, 8, generator=gen), torch.randn(2, 2, 8, generator=gen), torch.randn(2, 2, 8, generator=gen)
    exact = cpu.forward(q, k, v, varlen([4], [2], (-1, 2)), 0.3)
    clamped = fa2_rules.forward(q, k, v, varlen([4], [2], (-1, 2)), 0.3)
    assert not torch.allclose(clamped[0], exact[0], atol=1e-3)
    reported = fa2_rules.forward(q, k, v, varlen([4], [2], (-1, 2), max_seqlen_k=4), 0.3)
    torch.testing.assert_close(reported, exact, rtol=0, atol=0)


# ------------------------------------------------------------------------- logit softcap
def test_resolve_softcap_means_none_for_none_and_zero_and_refuses_negative_values():
    assert kernels.resolve_softcap(None) == 0.0 and kernels.resolve_softcap(0) == 0.0
    assert kernels.resolve_softcap(50) == 50.0
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"softcap={bad}: a logit softcap must be a positive number"):
            kernels.resolve_softcap(bad)


@pytest.mark.parametrize("custom_op", [True, False], ids=["custom op", "plain"])
def test_flash_attn_adapter_passes_the_softcap(monkeypatch, custom_op):
    module, calls = _fa2_stand_in("2.7", custom_op)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", module)
    flash_adapter._interface.cache_clear()
    try:
        _check_adapter_against_cpu(flash_adapter, (3, 0), torch.Generator().manual_seed(5), softcap=1.0)
        assert calls[0][-1] == 1.0 and calls[1][-1] == 1.0
    finally:
        flash_adapter._interface.cache_clear()


def test_flash_attn_releases_before_2_6_are_refused(fake_gpu):
    # their varlen log-sum-exp is padded per sequence ([B, H, max_seqlen_q]), which the merge
    # would misread: refused for every call, softcapped or not, and selection passes them by
    fake_gpu.fa2, fake_gpu.capability = _fa2_stand_in("2.5")[0], (8, 0)
    fake_gpu.install()
    cuda = torch.device("cuda", 0)
    expected = ("needs flash-attn >= 2.6 (pip install -U flash-attn): this release's _flash_attn_varlen_forward "
                "takes no softcap, and its log-sum-exp layout is the older padded one")
    assert flash_adapter.check(cuda, torch.bfloat16, 64) == expected
    assert flash_adapter.check(cuda, torch.bfloat16, 64, softcap=50.0) == expected
    with pytest.raises(ValueError, match=r"softcap 50.0 .*flash_attn: needs flash-attn >= 2.6.*torch_flash: has no "
                                         r"logit softcap.*Fix: for the logit softcap \(50.0\) install flash-attn 4"):
        kernels.get_kernel(None, cuda, torch.bfloat16, 64, softcap=50.0)
    assert kernels.get_kernel(None, cuda, torch.bfloat16, 64) is not flash_adapter


def test_flash_attn_4_adapter_passes_the_softcap(monkeypatch):
    module, calls = _fa4_stand_in()
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", module)
    fa4_adapter._interface.cache_clear()
    try:
        _check_adapter_against_cpu(fa4_adapter, (-1, 0), torch.Generator().manual_seed(6), softcap=1.0)
        assert calls[0][-1] == 1.0 and calls[1][-1] == 1.0
    finally:
        fa4_adapter._interface.cache_clear()


def test_flash_attn_4_softcap_follows_its_release_and_architecture(fake_gpu):
    cuda = torch.device("cuda", 0)
    fake_gpu.fa4 = _fa4_stand_in()[0]
    fake_gpu.install()
    assert fa4_adapter.check(cuda, torch.bfloat16, 128, softcap=50.0) is None
    fake_gpu.capability = (10, 0)
    assert fa4_adapter.check(cuda, torch.bfloat16, 128, softcap=50.0) is None
    # 4.0.0b36 asserts in its dedicated SM100 head_dim 256 backward and in its SM120 backward
    assert "head_dim 256 backward" in fa4_adapter.check(cuda, torch.bfloat16, 256, softcap=50.0)
    assert fa4_adapter.check(cuda, torch.bfloat16, 256) is None
    fake_gpu.capability = (12, 0)
    assert "backward on sm12x" in fa4_adapter.check(cuda, torch.bfloat16, 128, softcap=50.0)
    fake_gpu.capability = (9, 0)
    fake_gpu.fa4 = _fa4_stand_in(drop_keyword="softcap")[0]  # a release without it
    fake_gpu.install()
    assert "_flash_attn_fwd takes no softcap" in fa4_adapter.check(cuda, torch.bfloat16, 128, softcap=50.0)
    assert fa4_adapter.check(cuda, torch.bfloat16, 128) is None


def test_torch_flash_is_skipped_for_softcap_and_refused_when_asked_for(fake_gpu):
    cuda, bf16 = torch.device("cuda", 0), torch.bfloat16
    fake_gpu.fa2, fake_gpu.capability = _fa2_stand_in("2.7")[0], (8, 0)
    fake_gpu.install()
    assert kernels.get_kernel(None, cuda, bf16, 64, softcap=50.0) is flash_adapter
    fake_gpu.fa2 = None
    fake_gpu.install()
    assert kernels.get_kernel(None, cuda, bf16, 64) is torch_flash
    with pytest.raises(ValueError, match=r"no flash attention kernel .*softcap 50.0.*torch_flash: has no logit softcap"):
        kernels.get_kernel(None, cuda, bf16, 64, softcap=50.0)
    with pytest.raises(ValueError, match=r"backend 'torch_flash' cannot run on cuda:0 with bfloat16, head_dim 64, "
                                         r"softcap 50.0: it has no logit softcap.*Backends with a logit softcap: "
                                         r"flash_attn_4 .*; flash_attn .*; cpu"):
        kernels.get_kernel("torch_flash", cuda, bf16, 64, softcap=50.0)
    with pytest.raises(NotImplementedError, match="softcap=50.0"):  # its kernels never drop it silently
        torch_flash.forward(*(torch.zeros(4, 2, 8) for _ in range(3)), varlen([4], [4], (-1, 0)), 0.3, 50.0)


def test_softcap_backends_named_in_errors_are_those_whose_check_accepts_a_softcap(fake_gpu):
    fake_gpu.fa2, fake_gpu.fa4 = _fa2_stand_in("2.7")[0], _fa4_stand_in()[0]
    fake_gpu.install()
    cuda = torch.device("cuda", 0)
    for name, module in kernels.BACKENDS.items():
        assert module.check(cuda, torch.bfloat16, 128) is None, name
        accepts = module.check(cuda, torch.bfloat16, 128, softcap=50.0) is None
        assert accepts == (name in kernels.SOFTCAP_BACKENDS), name
