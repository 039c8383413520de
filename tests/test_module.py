"""RingAttention, the nn.Module: outputs and gradients against a float64 reference of the same
module (same weights) on one process, at 1 process without torch.distributed and on 1, 2 and 4
gloo processes, with auto_shard_seq on and off; and bad arguments refused before communication."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from hf_ring_attention import RingAttention, pad_for_layout, shard
from hf_ring_attention.layout import layout_multiple
from helpers import assert_close, attention_reference, spawn

F32 = torch.float32
DIM, DIM_HEAD = 24, 8
NAMES = ("x", "to_q", "to_k", "to_v", "to_out")


# --------------------------------------------------------------------------- the reference
def rope64(t: torch.Tensor) -> torch.Tensor:
    """Rotary embeddings of ``t [n, H, D]`` at positions 0..n-1 in float64, written as a complex
    rotation of the feature pairs (i, i + D/2) by ``position * 10000 ** (-2i / D)``."""
    n, _, d = t.shape
    half = d // 2
    freq = 10000.0 ** (-2 * torch.arange(half, dtype=torch.float64) / d)
    angle = torch.arange(n, dtype=torch.float64)[:, None] * freq
    turn = torch.polar(torch.ones_like(angle), angle)[:, None, :]
    z = torch.complex(t[..., :half], t[..., half:]) * turn
    return torch.cat((z.real, z.imag), dim=-1)


def reference(module: RingAttention, x, mask=None, cu_seqlens=None):
    """The module's function in float64 on one process: every row (or packed document of a row)
    is a document of its real tokens, positions count its real tokens, padding outputs 0.

    Returns ``(out, leaves)``: leaves are the float64 x and weights, in the order of NAMES."""
    weights = [getattr(module, name).weight.detach().double().requires_grad_() for name in NAMES[1:]]
    wq, wk, wv, wo = weights
    xd = x.detach().double().requires_grad_()
    B, S, _ = x.shape
    H, Hkv, D = module.heads, module.kv_heads, module.dim_head
    bounds = [0, S] if cu_seqlens is None else cu_seqlens.tolist()
    rows, cols, outs = [], [], []
    for b, (start, end) in itertools.product(range(B), zip(bounds, bounds[1:])):
        idx = [t for t in range(start, end) if mask is None or bool(mask[b, t])]
        if not idx:
            continue
        n, xs = len(idx), xd[b, idx]
        q, k, v = (xs @ wq.T).view(n, H, D), (xs @ wk.T).view(n, Hkv, D), (xs @ wv.T).view(n, Hkv, D)
        if module.rotary:
            q, k = rope64(q), rope64(k)
        o = attention_reference(q, k, v, [0, n], module.causal, module.window_size)
        outs.append(o.reshape(n, H * D) @ wo.T)
        rows += [b] * n
        cols += idx
    out = xd.new_zeros(B, S, module.dim)
    out = out.index_put((torch.tensor(rows), torch.tensor(cols)), torch.cat(outs))
    return out, [xd, *weights]


def make_module(seed=0, **kwargs) -> RingAttention:
    torch.manual_seed(seed)  # the same weights on every rank
    return RingAttention(DIM, dim_head=DIM_HEAD, **kwargs)


def _group_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# --------------------------------------------------------------------------- the three checks
def check_full(module, gen, x, mask=None, cu_seqlens=None, what=""):
    """auto_shard_seq=True: the full output on every rank; the mean of the ranks' gradients is
    the single-process gradient (the documented rule)."""
    x = x.clone().requires_grad_()
    out = module(x, mask, cu_seqlens)
    ref, leaves = reference(module, x, mask, cu_seqlens)
    assert out.shape == x.shape
    assert_close(out, ref, F32, f"out {what}")
    if mask is not None:
        assert out.detach()[~mask.bool()].eq(0).all(), f"padding output is not 0 {what}"
    g = torch.randn(out.shape, generator=gen)
    (out * g).sum().backward()
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), leaves)
    mine = [x.grad] + [getattr(module, name).weight.grad for name in NAMES[1:]]
    for name, grad, ref_grad in zip(NAMES, mine, ref_grads):
        assert_close(_group_sum(grad) / _world(), ref_grad, F32, f"d{name} {what}")
    module.zero_grad()


def check_packed_shard(module, gen, lengths, what=""):
    """auto_shard_seq=False with cu_seqlens: this rank's shard of a packed buffer padded by
    pad_for_layout (seqused); the sum of the ranks' parameter gradients is the single-process
    gradient, and every rank's x gradient is exact for its own tokens."""
    P, layout = _world(), module.layout
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    x = torch.randn(cu[-1].item(), DIM, generator=gen)
    padded = pad_for_layout(x, cu, world_size=P, layout=layout)
    x_full, cu_p = padded.x[None], padded.cu_seqlens
    real = torch.zeros(cu_p[-1].item(), dtype=torch.bool)
    for start, used in zip(cu_p.tolist(), padded.seqused.tolist()):
        real[start:start + used] = True
    x_local = shard(x_full, cu_p, dim=1, layout=layout).requires_grad_()
    out = module(x_local, cu_seqlens=cu_p, seqused=padded.seqused)
    ref, leaves = reference(module, x_full, real[None], cu_p)
    assert out.shape == x_local.shape
    assert_close(out, shard(ref, cu_p, dim=1, layout=layout), F32, f"out {what}")
    g = torch.randn(ref.shape, generator=gen)
    (out * shard(g, cu_p, dim=1, layout=layout)).sum().backward()
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), leaves)
    assert_close(x_local.grad, shard(ref_grads[0], cu_p, dim=1, layout=layout), F32, f"dx {what}")
    for name, ref_grad in zip(NAMES[1:], ref_grads[1:]):
        assert_close(_group_sum(getattr(module, name).weight.grad), ref_grad, F32, f"d{name} {what}")
    module.zero_grad()


def check_row_shards(module, gen, batch, chunks, what=""):
    """auto_shard_seq=False without cu_seqlens: every row of [B, tokens, dim] is the shard of one
    sequence of tokens x P."""
    P, layout = _world(), module.layout
    S = chunks * layout_multiple(layout, P)
    x_full = torch.randn(batch, S, DIM, generator=gen)
    x_local = shard(x_full, dim=1, layout=layout).requires_grad_()
    out = module(x_local)
    ref, leaves = reference(module, x_full)
    assert_close(out, shard(ref, dim=1, layout=layout), F32, f"out {what}")
    g = torch.randn(ref.shape, generator=gen)
    (out * shard(g, dim=1, layout=layout)).sum().backward()
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), leaves)
    assert_close(x_local.grad, shard(ref_grads[0], dim=1, layout=layout), F32, f"dx {what}")
    for name, ref_grad in zip(NAMES[1:], ref_grads[1:]):
        assert_close(_group_sum(getattr(module, name).weight.grad), ref_grad, F32, f"d{name} {what}")
    module.zero_grad()


def awkward_mask() -> torch.Tensor:
    """[5, 13]: a full row, left padding, holes, a row of padding only, a single real token."""
    mask = torch.ones(5, 13, dtype=torch.bool)
    mask[1, :4] = False
    mask[2] = torch.tensor([0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    mask[3] = False
    mask[4] = False
    mask[4, 7] = True
    return mask


# heads, kv_heads, causal, window, layout: MHA, GQA, MQA; windows narrower than a shard, between,
# and wider than every document
CASES = [
    (4, 4, True, None, "zigzag"),
    (4, 2, False, None, "zigzag"),
    (4, 1, True, 3, "zigzag"),
    (6, 2, False, 5, "striped"),
    (4, 2, True, 40, "contiguous"),
    (2, 1, False, 2, "contiguous"),
]


def run_cases(cases, seed):
    gen = torch.Generator().manual_seed(seed)  # the same inputs on every rank
    P = _world()
    for heads, kv_heads, causal, window, layout in cases:
        kw = dict(heads=heads, kv_heads=kv_heads, causal=causal, window_size=window, layout=layout)
        what = f"P={P} heads={heads}/{kv_heads} causal={causal} window={window} {layout}"
        full = make_module(auto_shard_seq=True, **kw)
        check_full(full, gen, torch.randn(5, 13, DIM, generator=gen), awkward_mask(), what=f"mask {what}")
        check_full(full, gen, torch.randn(2, 7, DIM, generator=gen), what=f"no mask {what}")
        cu = torch.tensor([0, 5, 6, 17], dtype=torch.int32)  # packed documents, one of one token
        check_full(full, gen, torch.randn(1, 17, DIM, generator=gen), cu_seqlens=cu, what=f"packed {what}")
        shards = make_module(**kw)
        check_packed_shard(shards, gen, [9, 1, 4], what=f"packed shard {what}")
        check_row_shards(shards, gen, batch=2, chunks=3, what=f"row shards {what}")


# --------------------------------------------------------------------------- one process
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-causal{c[2]}-w{c[3]}-{c[4]}")
def test_single_process_module_equals_float64_reference(case):
    assert not dist.is_initialized()
    run_cases([case], seed=1)


def test_without_rotary_and_float64_input():
    gen = torch.Generator().manual_seed(2)
    module = make_module(heads=3, kv_heads=1, rotary=False, auto_shard_seq=True)
    check_full(module, gen, torch.randn(5, 13, DIM, generator=gen), awkward_mask(), what="no rotary")
    module = make_module(heads=2, auto_shard_seq=True).double()
    x = torch.randn(2, 9, DIM, dtype=torch.float64, generator=gen)
    ref, _ = reference(module, x)
    assert (module(x) - ref).abs().max() < 1e-12  # rotary angles in float64 for float64 input


def test_readme_example_shape_and_all_padding_batch():
    attn = RingAttention(dim=512, dim_head=64, heads=8, causal=True, auto_shard_seq=True)
    tokens = torch.randn(1, 1024, 512)
    attended = attn(tokens)
    assert attended.shape == tokens.shape
    out = make_module(heads=2, auto_shard_seq=True)(torch.randn(2, 5, DIM), torch.zeros(2, 5, dtype=torch.bool))
    assert out.shape == (2, 5, DIM) and out.eq(0).all()


# --------------------------------------------------------------------------- 1, 2, 4 processes
def _matches_reference(rank, world_size):
    run_cases(CASES, seed=3)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_module_on_ranks_equals_single_process_float64_reference(world_size):
    spawn(_matches_reference, world_size)


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(heads=6, kv_heads=4), ValueError, r"kv_heads=4 must divide heads=6"),
    (dict(heads=4, dim_head=7), ValueError, r"dim_head must be even, got dim_head=7"),
    (dict(heads=0), ValueError, r"heads must be a positive int, got 0"),
    (dict(heads=2, window_size=0), ValueError, r"window_size must be a positive int"),
    (dict(heads=2, layout="spiral"), ValueError, r"layout='spiral'"),
])
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        RingAttention(DIM, **kwargs)


def test_odd_dim_head_is_fine_without_rotary():
    gen = torch.Generator().manual_seed(4)
    module = RingAttention(DIM, heads=2, dim_head=5, rotary=False, auto_shard_seq=True)
    x = torch.randn(1, 6, DIM, generator=gen)
    assert_close(module(x), reference(module, x)[0], F32, "dim_head 5")


def _forward_errors(world_size):
    """(call, error, match) triples that must raise on every rank before any communication."""
    full = make_module(heads=4, kv_heads=2, auto_shard_seq=True)
    shards = make_module(heads=4, kv_heads=2)
    x = torch.randn(2, 8, DIM)
    cu = torch.tensor([0, 8 * world_size], dtype=torch.int32)
    return {
        "x 2-D": (lambda: full(x[0]), ValueError, rf"x must be a \[batch, tokens, dim={DIM}\] tensor, got shape \(8, {DIM}\)"),
        "x dim": (lambda: shards(x[..., :5]), ValueError, r"dim=24\] tensor, got shape \(2, 8, 5\)"),
        "x dtype": (lambda: full(x.long()), TypeError, "floating point"),
        "mask shape": (lambda: full(x, torch.ones(2, 7, dtype=torch.bool)), ValueError, r"\[2, 8\] tensor like x, got shape \(2, 7\)"),
        "mask dtype": (lambda: full(x, torch.ones(2, 8)), TypeError, "mask must be bool"),
        "mask on shards": (lambda: shards(x, torch.ones(2, 8, dtype=torch.bool)), ValueError, "mask is only taken with auto_shard_seq=True"),
        "seqused with auto": (lambda: full(x, seqused=torch.tensor([8], dtype=torch.int32)), ValueError, "seqused is for shards"),
        "cu with batch (full)": (lambda: full(x, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "x has batch 2"),
        "cu with batch (shard)": (lambda: shards(x, cu_seqlens=cu), ValueError, "got batch 2"),
        "cu total (full)": (lambda: full(x[:1], cu_seqlens=torch.tensor([0, 9], dtype=torch.int32)), ValueError, "cu_seqlens ends at 9"),
        "cu total (shard)": (lambda: shards(x[:1], cu_seqlens=cu * 2), ValueError,
                             rf"holds 8 tokens but cu_seqlens describe {16 * world_size} tokens"),
    }


@pytest.mark.parametrize("name", list(_forward_errors(1)))
def test_forward_rejects_bad_input(name):
    call, error, match = _forward_errors(1)[name]
    with pytest.raises(error, match=match):
        call()


def _errors_on_every_rank(rank, world_size):
    for name, (call, error, match) in _forward_errors(world_size).items():
        with pytest.raises(error, match=match):
            call()
    # documents whose lengths the layout cannot split, on shards
    shards = make_module(heads=2)
    with pytest.raises(ValueError, match=f"multiple of {2 * world_size}.*document 0 has length 6"):
        shards(torch.randn(1, 3, DIM), cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    # no rank is stuck in a collective: the group still works
    gen = torch.Generator().manual_seed(5)
    check_full(make_module(heads=2, auto_shard_seq=True), gen, torch.randn(1, 5, DIM, generator=gen), what="after errors")


@pytest.mark.distributed
def test_bad_input_raises_on_every_rank_before_communication():
    spawn(_errors_on_every_rank, 2)


def _replica_mismatch(rank, world_size):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 6, DIM, generator=gen)
    unseeded = make_module(seed=rank, heads=2, auto_shard_seq=True)  # every rank initialised differently
    with pytest.raises(ValueError, match=r"hold different weights \(ranks \[1\] differ from rank 0\)"):
        unseeded(x)
    full = make_module(heads=2, auto_shard_seq=True)
    with pytest.raises(ValueError, match=r"inconsistent inputs \(ranks \[1\].*the same full input x"):
        full(x + rank)  # a DistributedSampler would give every rank another batch
    with pytest.raises(ValueError, match=r"inconsistent inputs \(ranks \[1\]"):
        mask = torch.ones(2, 6, dtype=torch.bool)
        mask[1, rank] = False  # the same number of real tokens, in other places
        full(x, mask)
    shards = make_module(heads=2)
    cu = torch.tensor([0, 4 * world_size, 8 * world_size], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"inconsistent inputs.*the same cu_seqlens and seqused"):
        shards(torch.randn(1, 8, DIM), cu_seqlens=cu, seqused=torch.tensor([3 + rank, 4 * world_size], dtype=torch.int32))
    # once the check passed, the module runs
    check_full(full, gen, x, what="after a refused call")
    check_packed_shard(shards, gen, [5, 3], what="after a refused call")


@pytest.mark.distributed
def test_ranks_with_different_weights_or_inputs_are_refused_on_every_rank():
    spawn(_replica_mismatch, 2)


def _under_ddp(rank, world_size):
    """The documented recipe: DistributedDataParallel over the group averages the gradients, and
    every rank then holds the single-process gradient (auto_shard_seq=True)."""
    from torch.nn.parallel import DistributedDataParallel

    gen = torch.Generator().manual_seed(7)
    module = make_module(heads=4, kv_heads=2, auto_shard_seq=True)
    ddp = DistributedDataParallel(module)
    x, mask = torch.randn(5, 13, DIM, generator=gen), awkward_mask()
    out = ddp(x, mask)
    ref, leaves = reference(module, x, mask)
    assert_close(out, ref, F32, "out under DDP")
    g = torch.randn(out.shape, generator=gen)
    (out * g).sum().backward()
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), leaves)
    for name, ref_grad in zip(NAMES[1:], ref_grads[1:]):
        assert_close(getattr(module, name).weight.grad, ref_grad, F32, f"d{name} under DDP, rank {rank}")


@pytest.mark.distributed
def test_ddp_over_the_group_gives_the_single_process_gradient_on_every_rank():
    spawn(_under_ddp, 2)


def test_example_script_runs_on_one_process(monkeypatch, capsys):
    import runpy
    from pathlib import Path

    monkeypatch.delenv("RANK", raising=False)
    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "ring_attention_module.py"), run_name="__main__")
    assert "1 process(es): output (1, 1024, 512)" in capsys.readouterr().out
