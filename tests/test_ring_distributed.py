"""Ring attention across real processes (gloo): exactness against float64 full attention, and
bad input raising the same error on every rank before any communication."""

import itertools

import pytest
import torch
import torch.distributed as dist

from hf_ring_attention import pad_for_layout, ring_attention, shard, unshard
from hf_ring_attention.layout import layout_multiple
from helpers import assert_close, attention_reference, random_bounds, spawn



def _exactness(rank, world_size):
    gen = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    cases = itertools.product(["zigzag", "contiguous", "striped"], [True, False], [None, 3],
                              [(8, 2), (4, 1)])
    for layout, causal, window, (hq, hkv) in cases:
        multiple = layout_multiple(layout, world_size)
        bounds = random_bounds(gen, multiple, docs=3, max_chunks=3)
        cu = torch.tensor(bounds, dtype=torch.int32)
        q, dout = (torch.randn(bounds[-1], hq, 8, generator=gen) for _ in range(2))
        k, v = (torch.randn(bounds[-1], hkv, 8, generator=gen) for _ in range(2))
        local = [shard(t, cu, layout=layout).requires_grad_() for t in (q, k, v)]
        out = ring_attention(*local, cu, layout=layout, causal=causal, window_size=window)
        out.backward(shard(dout, cu, layout=layout))
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
        ref = attention_reference(qd, kd, vd, bounds, causal, window)
        ref.backward(dout.double())
        what = f"rank {rank}/{world_size} {layout} causal={causal} window={window} heads={hq}/{hkv}"
        assert_close(unshard(out, cu, layout=layout), ref, torch.float32, f"out {what}")
        for name, t, full in zip("qkv", local, (qd, kd, vd)):
            assert_close(unshard(t.grad, cu, layout=layout), full.grad, torch.float32, f"d{name} {what}")


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_matches_float64_attention_on_every_rank(world_size):
    spawn(_exactness, world_size)


def _padded_bf16_and_window_skip(rank, world_size):
    gen = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 5, 6, 19], dtype=torch.int32)  # odd lengths, a one-token document
    x = torch.randn(19, 3, 4, 16, generator=gen).to(torch.bfloat16)
    padded = pad_for_layout(x, cu, layout="zigzag")
    q, k, v = (shard(padded.x[:, i], padded.cu_seqlens).requires_grad_() for i in range(3))
    out = ring_attention(q, k, v, padded.cu_seqlens, seqused=padded.seqused)
    ref = attention_reference(*(padded.x[:, i] for i in range(3)), padded.cu_seqlens.tolist(),
                              seqused=padded.seqused.tolist())
    assert_close(unshard(out, padded.cu_seqlens), ref, torch.bfloat16, f"rank {rank}")
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))
    # a window of 1 needs no K/V from any other rank: the ring stops after step 0
    out = ring_attention(q.float(), k.float(), v.float(), padded.cu_seqlens, window_size=1)
    assert_close(out, v.float(), torch.float32, "window 1")


@pytest.mark.distributed
def test_padded_documents_bfloat16_and_window_of_one():
    spawn(_padded_bf16_and_window_skip, 2)


def _sinks_and_softcap(rank, world_size):
    gen = torch.Generator().manual_seed(2)  # the same full tensors on every rank
    cu = torch.tensor([0, 5, 6, 19], dtype=torch.int32)  # odd lengths, a one-token document
    for layout, causal, window in [("zigzag", True, None), ("striped", True, 3), ("contiguous", False, 4)]:
        q, dout = torch.randn(19, 4, 8, generator=gen), torch.randn(19, 4, 8, generator=gen)
        k, v = torch.randn(19, 2, 8, generator=gen), torch.randn(19, 2, 8, generator=gen)  # GQA
        sinks = (1.5 * torch.randn(4, generator=gen) + 1).requires_grad_()
        padded = [pad_for_layout(t, cu, world_size=world_size, layout=layout) for t in (q, k, v, dout)]
        bounds, used = padded[0].cu_seqlens, padded[0].seqused
        local = [shard(p.x, bounds, layout=layout).requires_grad_() for p in padded[:3]]
        out = ring_attention(*local, bounds, layout=layout, causal=causal, window_size=window, seqused=used,
                             softcap=1.5, sinks=sinks)
        out.backward(shard(padded[3].x, bounds, layout=layout))
        dsinks = sinks.grad.clone()
        dist.all_reduce(dsinks)  # each rank holds its own queries' share of the sinks' gradient
        full = [p.x.double().requires_grad_() for p in padded[:3]]
        sinks_d = sinks.detach().double().requires_grad_()
        ref = attention_reference(*full, bounds.tolist(), causal, window, used.tolist(), softcap=1.5, sinks=sinks_d)
        ref.backward(padded[3].x.double())
        what = f"rank {rank}/{world_size} {layout} causal={causal} window={window}"
        assert_close(unshard(out, bounds, layout=layout), ref, torch.float32, f"out {what}")
        for name, t, f in zip("qkv", local, full):
            assert_close(unshard(t.grad, bounds, layout=layout), f.grad, torch.float32, f"d{name} {what}")
        assert_close(dsinks, sinks_d.grad, torch.float32, f"dsinks {what}")


@pytest.mark.distributed
def test_sinks_and_softcap_match_float64_attention_on_every_rank():
    spawn(_sinks_and_softcap, 2)


# --------------------------------------------------------------------------- bad input
def _bad_inputs(rank, world_size):
    q = torch.randn(8, 4, 8)
    kv = torch.randn(8, 2, 8)
    cu = torch.tensor([0, 8 * world_size], dtype=torch.int32)
    bad = {
        "not divisible": (lambda: ring_attention(q[:3], kv[:3], kv[:3], torch.tensor([0, 3 * world_size], dtype=torch.int32)),
                          ValueError, f"multiple of {2 * world_size}.*pad_for_layout"),
        "heads": (lambda: ring_attention(q[:, :3], kv, kv, cu), ValueError, r"query heads \(3\).*key/value heads \(2\)"),
        "dtype": (lambda: ring_attention(q, kv.double(), kv.double(), cu), TypeError, "share one dtype"),
        "cu_seqlens sum": (lambda: ring_attention(q, kv, kv, torch.tensor([0, 8, 24], dtype=torch.int32)),
                           ValueError, f"holds 8 tokens but cu_seqlens describe 24 tokens over {world_size} ranks"),
        "cu_seqlens dtype": (lambda: ring_attention(q, kv, kv, cu.float()), TypeError, "int32"),
        "window": (lambda: ring_attention(q, kv, kv, cu, window_size=0), ValueError, "window_size"),
        "layout": (lambda: ring_attention(q, kv, kv, cu, layout="spiral"), ValueError, "layout='spiral'"),
        "dropout": (lambda: ring_attention(q, kv, kv, cu, dropout_p=0.1), ValueError, "dropout_p=0.1.*not supported"),
        "device": (lambda: ring_attention(q, kv.to("meta"), kv.to("meta"), cu), ValueError, "one device"),
        "seqused": (lambda: ring_attention(q, kv, kv, cu, seqused=torch.tensor([8 * world_size + 1], dtype=torch.int32)),
                    ValueError, "seqused"),
        # the kernel (device, dtype, head_dim) is settled before the first K/V block moves
        "backend": (lambda: ring_attention(q, kv, kv, cu, backend="flash_attn_4"), ValueError,
                    "backend 'flash_attn_4' cannot run on cpu"),
        "unknown backend": (lambda: ring_attention(q, kv, kv, cu, backend="fa5"), ValueError, "unknown backend 'fa5'"),
        "softcap backend": (lambda: ring_attention(q, kv, kv, cu, backend="torch_flash", softcap=50.0), ValueError,
                            "backend 'torch_flash' cannot run.*Backends with a logit softcap"),
        "softcap": (lambda: ring_attention(q, kv, kv, cu, softcap=-5.0), ValueError, "softcap=-5.0"),
        "sinks": (lambda: ring_attention(q, kv, kv, cu, sinks=torch.zeros(2)), ValueError,
                  r"sinks must be .* one logit per query head, shape \(4,\), got shape \(2,\)"),
    }
    if world_size > 2:  # a group this rank is not in: ranks 0 and 1 only
        group = dist.new_group([0, 1])
        if rank >= 2:
            bad["group"] = (lambda: ring_attention(q, kv, kv, cu, group=group), ValueError, "not a member")
    for name, (fn, exc, pattern) in bad.items():
        with pytest.raises(exc, match=pattern):
            fn()
            print(f"rank {rank}: {name} did not raise", flush=True)
    # after all that, every rank still communicates normally
    out = ring_attention(q, kv, kv, torch.tensor([0, 8 * world_size], dtype=torch.int32))
    assert out.shape == q.shape


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_bad_input_raises_on_every_rank_without_hanging(world_size):
    spawn(_bad_inputs, world_size)


# ------------------------------------------------------------------ ranks that disagree
def _disagreeing_ranks(rank, world_size):
    torch.manual_seed(rank)
    odd = rank % 2 == 1
    total = 8 * world_size

    def inputs(heads=4, kv_heads=2, head_dim=8, dtype=torch.float32):
        return (torch.randn(8, heads, head_dim, dtype=dtype), torch.randn(8, kv_heads, head_dim, dtype=dtype),
                torch.randn(8, kv_heads, head_dim, dtype=dtype))

    one_doc = torch.tensor([0, total], dtype=torch.int32)
    two_docs = torch.tensor([0, total // 2, total], dtype=torch.int32)  # lengths still multiples of 2P
    cases = {
        # every rank's inputs are valid alone; only together do they disagree
        "cu_seqlens": (lambda: ring_attention(*inputs(), two_docs if odd else one_doc),
                       r"inconsistent inputs \(documents: rank 0: 1, rank 1: 2.*cu_seqlens digest"),
        "head_dim": (lambda: ring_attention(*inputs(head_dim=16 if odd else 8), one_doc),
                     r"head_dim: rank 0: 8, rank 1: 16"),
        "layout": (lambda: ring_attention(*inputs(), one_doc, layout="striped" if odd else "zigzag"),
                   r"layout: rank 0: 'zigzag', rank 1: 'striped'"),
        "window": (lambda: ring_attention(*inputs(), one_doc, window_size=3 if odd else None),
                   r"window_size: rank 0: None, rank 1: 3"),
        "heads": (lambda: ring_attention(*inputs(heads=8 if odd else 4), one_doc),
                  r"query heads: rank 0: 4, rank 1: 8"),
        "seqused": (lambda: ring_attention(*inputs(), one_doc, seqused=torch.tensor([total - (1 if odd else 0)], dtype=torch.int32)),
                    r"seqused digest"),
        "softcap": (lambda: ring_attention(*inputs(), one_doc, softcap=5.0 if odd else None),
                    r"softcap \(x 1e6\): rank 0: 0, rank 1: 5000000"),
        "sinks": (lambda: ring_attention(*inputs(), one_doc, sinks=torch.zeros(4) if odd else None),
                  r"sinks: rank 0: none, rank 1: given"),
    }
    for name, (fn, pattern) in cases.items():
        with pytest.raises(ValueError, match=pattern):
            fn()
            print(f"rank {rank}: {name} did not raise", flush=True)
    # one rank's own inputs are invalid: it raises its error, the others learn of it, none hangs
    q, k, v = inputs()
    if rank == 0:
        with pytest.raises(TypeError, match="share one dtype"):
            ring_attention(q, k.double(), v.double(), one_doc)
    else:
        with pytest.raises(ValueError, match=r"rank\(s\) \[0\] of the context-parallel group rejected their inputs"):
            ring_attention(q, k, v, one_doc)
    # and the group still works
    assert ring_attention(q, k, v, one_doc).shape == q.shape


@pytest.mark.distributed
def test_ranks_given_different_inputs_raise_on_every_rank_naming_the_values():
    spawn(_disagreeing_ranks, 2)
