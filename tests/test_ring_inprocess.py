"""Ring attention, all ranks in one process: outputs and gradients against float64 attention on
the whole sequence, across layouts, masks, packing, padding, GQA/MQA and up to 8 ranks."""

import itertools
import types

import pytest
import torch

import fa2_rules
from hf_ring_attention import InProcessRing, pad_for_layout, ring_attention
from hf_ring_attention.kernels import cpu, takes_empty_sequences
from hf_ring_attention.layout import layout_multiple
from hf_ring_attention.plan import Call
from helpers import TOL, assert_close, attention_reference, random_bounds, rel_err

LAYOUTS = ["zigzag", "contiguous", "striped"]
HEADS = {"MHA": (4, 4), "GQA": (8, 2), "MQA": (4, 1)}


def ring_errors(bounds, world_size, layout, causal, window, heads, dtype, seqused=None, seed=0, head_dim=16,
                backend=None, softcap=None, sinks=None) -> dict:
    """Relative errors of the in-process ring's output and input gradients against float64
    attention on the whole sequence. ``sinks``: the dtype of random attention sinks (None: none),
    whose gradient is then checked too."""
    gen = torch.Generator().manual_seed(seed)
    total, (hq, hkv) = bounds[-1], heads
    q = torch.randn(total, hq, head_dim, generator=gen).to(dtype)
    k = torch.randn(total, hkv, head_dim, generator=gen).to(dtype)
    v = torch.randn(total, hkv, head_dim, generator=gen).to(dtype)
    dout = torch.randn(total, hq, head_dim, generator=gen).to(dtype)
    # sinks around the rows' log-sum-exps (a few units), so they take a real share of every softmax
    sink = None if sinks is None else (1.5 * torch.randn(hq, generator=gen) + 1).to(sinks).requires_grad_()
    used = None if seqused is None else torch.tensor(seqused, dtype=torch.int32)
    ring = InProcessRing(torch.tensor(bounds, dtype=torch.int32), world_size=world_size,
                         layout=layout, causal=causal, window_size=window, seqused=used)
    shards = [[s.requires_grad_() for s in ring.shard(t)] for t in (q, k, v)]
    outs = ring.attention(*shards, backend=backend, softcap=softcap, sinks=sink)
    torch.autograd.backward(outs, ring.shard(dout))
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    sink_d = None if sink is None else sink.detach().double().requires_grad_()
    ref = attention_reference(qd, kd, vd, bounds, causal, window, seqused, softcap=softcap, sinks=sink_d)
    ref.backward(dout.double())
    out = ring.unshard(outs)
    assert out.dtype == dtype
    errors = {"out": rel_err(out, ref)}
    for name, parts, full in zip("qkv", shards, (qd, kd, vd)):
        errors[f"d{name}"] = rel_err(ring.unshard([p.grad for p in parts]), full.grad)
    if sink is not None:
        assert sink.grad.dtype == sink.dtype and sink.grad.isfinite().all()
        errors["dsinks"] = rel_err(sink.grad, sink_d.grad)
    return errors


def check_ring(bounds, world_size, layout, causal, window, heads, dtype, seqused=None, seed=0, head_dim=16,
               backend=None, softcap=None, sinks=None):
    errors = ring_errors(bounds, world_size, layout, causal, window, heads, dtype, seqused, seed, head_dim, backend,
                         softcap, sinks)
    what = (f"{layout} P={world_size} causal={causal} window={window} heads={heads} bounds={bounds} "
            f"seqused={seqused} softcap={softcap} sinks={sinks}")
    for name, err in errors.items():
        assert err <= TOL[dtype], f"{name} {what}: relative error {err:.3e} > {TOL[dtype]:.0e} ({dtype})"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_documents_float32(world_size, layout, causal):
    gen = torch.Generator().manual_seed(world_size)
    multiple = layout_multiple(layout, world_size)
    for heads, window in itertools.product(HEADS.values(), [None, 1, multiple // 2 + 1, 5 * multiple]):
        # random document lengths, including documents of the minimum length
        bounds = random_bounds(gen, multiple, docs=3)
        check_ring(bounds, world_size, layout, causal, window, heads, torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_bfloat16_within_2e_2(layout, heads):
    for world_size, window in [(2, None), (4, 3), (8, None)]:
        multiple = layout_multiple(layout, world_size)
        bounds = [0, 2 * multiple, 3 * multiple, 6 * multiple]
        check_ring(bounds, world_size, layout, True, window, heads, torch.bfloat16)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_long_single_sequence_window_narrower_and_wider_than_a_shard(world_size, layout):
    shard_len = 24
    bounds = [0, shard_len * world_size]
    for window in (shard_len // 3, 2 * shard_len + 5):
        check_ring(bounds, world_size, layout, True, window, HEADS["GQA"], torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_padding_neither_attends_nor_is_attended(layout, causal):
    world_size = 4
    lengths = [1, 13, 7, 2]  # odd and tiny documents, padded to the layout's multiple
    cu = torch.tensor([0, 1, 14, 21, 23], dtype=torch.int32)
    padded = pad_for_layout(torch.zeros(23), cu, world_size=world_size, layout=layout)
    bounds = padded.cu_seqlens.tolist()
    assert padded.seqused.tolist() == lengths
    for window in (None, 3):
        check_ring(bounds, world_size, layout, causal, window, HEADS["GQA"], torch.float32,
                   seqused=lengths)


def test_float64_is_exact_to_rounding():
    check_ring([0, 16, 48], 4, "zigzag", True, 5, HEADS["GQA"], torch.float64)
    check_ring([0, 16, 48], 4, "zigzag", True, 5, HEADS["GQA"], torch.float64, softcap=2.0, sinks=torch.float64)


# ------------------------------------------------ attention sinks and logit softcapping
# A softcap of 1.5 against scores of standard deviation 1 (N(0, 1) inputs, head_dim 16, scale 1/4):
# tanh is far from linear there, so a kernel that ignored the cap, or its backward factor, fails.
SOFTCAP = 1.5


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_sinks_and_softcap_float32(layout, causal):
    """Sinks (with their gradient), softcap, and both, against float64: packed documents, padding
    of every size, GQA and MQA, windows narrower and wider than a shard, up to 4 ranks."""
    gen = torch.Generator().manual_seed(11)
    features = [dict(sinks=torch.float32), dict(softcap=SOFTCAP), dict(softcap=SOFTCAP, sinks=torch.float32)]
    for world_size, (name, heads) in itertools.product((1, 2, 4), HEADS.items()):
        multiple = layout_multiple(layout, world_size)
        lengths = torch.randint(1, 3 * multiple, (3,), generator=gen).tolist()
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        padded = pad_for_layout(torch.zeros(cu[-1].item()), cu, world_size=world_size, layout=layout)
        for i, window in enumerate((None, multiple // 2 + 1, 3 * multiple)):
            check_ring(padded.cu_seqlens.tolist(), world_size, layout, causal, window, heads, torch.float32,
                       seqused=lengths, **features[(i + world_size) % 3])


def test_sinks_and_softcap_under_flash_attn_2_rules_and_in_bfloat16():
    multiple = layout_multiple("zigzag", 4)
    bounds = [0, 2 * multiple, 3 * multiple, 6 * multiple]
    check_ring(bounds, 4, "zigzag", True, 5, HEADS["GQA"], torch.float32, seqused=[5, 8, 17], backend=fa2_rules,
               head_dim=8, softcap=SOFTCAP, sinks=torch.float32)
    # bfloat16 q, k, v with float32 sinks (Flint keeps them in float32) and with bfloat16 sinks
    # (GPT-OSS loaded in bfloat16)
    for sinks in (torch.float32, torch.bfloat16):
        check_ring(bounds, 4, "zigzag", True, None, HEADS["GQA"], torch.bfloat16, softcap=SOFTCAP, sinks=sinks)


def test_sink_gradient_flows_alone_and_sinks_are_validated():
    ring = InProcessRing(torch.tensor([0, 8], dtype=torch.int32), world_size=2)
    q, k, v = (ring.shard(torch.randn(8, 2, 8)) for _ in range(3))
    sinks = torch.zeros(2, requires_grad=True)
    outs = ring.attention(q, k, v, sinks=sinks)  # only the sinks need a gradient
    sum(o.sum() for o in outs).backward()
    assert sinks.grad is not None and sinks.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"one logit per query head, shape \(2,\), got shape \(4,\)"):
        ring.attention(q, k, v, sinks=torch.zeros(4))
    with pytest.raises(ValueError, match="softcap=-1.0"):
        ring.attention(q, k, v, softcap=-1.0)


# ----------------------------------------------------- flash-attn 2's rules, seen on CPU
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_ring_is_exact_under_flash_attn_2_window_rules(layout, causal):
    """The same sweep through a CPU kernel that rewrites windows and lse as flash-attn 2 does on a
    GPU (tests/fa2_rules.py): padded documents of every size, windows narrower and wider than a
    shard, and one query per sequence (GQA, where flash-attn 2 swaps heads into the sequence)."""
    gen = torch.Generator().manual_seed(7)
    for world_size in (2, 4):
        multiple = layout_multiple(layout, world_size)
        for _ in range(2):
            lengths = torch.randint(1, 4 * multiple, (3,), generator=gen).tolist()
            cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
            padded = pad_for_layout(torch.zeros(cu[-1].item()), cu, world_size=world_size, layout=layout)
            for window in (None, 2, multiple // 2 + 1, 5):
                check_ring(padded.cu_seqlens.tolist(), world_size, layout, causal, window, HEADS["GQA"],
                           torch.float32, seqused=lengths, backend=fa2_rules, head_dim=8)


class Gathering:
    """``kernel`` without its ``empty_sequences`` declaration, checking that the ring then gives it
    only sequences with queries and keys (it gathers rows instead)."""

    def __init__(self, kernel):
        self.name, self.kernel = f"{kernel.name}, gathering", kernel
        self.check = kernel.check

    @staticmethod
    def _no_empty_sequence(varlen):
        lq = varlen.cu_seqlens_q.diff()
        lk = varlen.cu_seqlens_k.diff()
        assert bool((lq > 0).all() and (lk > 0).all()), "an empty sequence for a kernel that takes none"

    def forward(self, q, k, v, varlen, *args, **kwargs):
        self._no_empty_sequence(varlen)
        return self.kernel.forward(q, k, v, varlen, *args, **kwargs)

    def backward(self, dout, q, k, v, out, lse, varlen, *args, **kwargs):
        self._no_empty_sequence(varlen)
        return self.kernel.backward(dout, q, k, v, out, lse, varlen, *args, **kwargs)


class KeylessRowsNaN:
    """``kernel`` writing NaN into the output of every row without keys (flash-attn 4 on SM90 can
    leave there whatever a neighbouring tile held): the ring must never read such a row."""

    empty_sequences = True

    def __init__(self, kernel):
        self.name, self.kernel, self.check = f"{kernel.name}, NaN where no keys", kernel, kernel.check

    def forward(self, q, k, v, varlen, *args, **kwargs):
        out, lse = self.kernel.forward(q, k, v, varlen, *args, **kwargs)
        keyless = lse.isinf().any(0)
        return out.masked_fill(keyless[:, None, None], float("nan")), lse

    def backward(self, *args, **kwargs):
        return self.kernel.backward(*args, **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", [cpu, Gathering(cpu), fa2_rules, KeylessRowsNaN(fa2_rules), Gathering(fa2_rules)],
                         ids=["cpu", "cpu-gathering", "fa2_rules", "nan-where-no-keys", "fa2_rules-gathering"])
def test_both_forms_of_a_call_are_exact(layout, backend):
    """Packed documents with layout padding, tiny ones included (one row per piece, where every
    sequence of a call may hold one query): whether a call reads one range per side with its gaps
    as empty sequences (kernels that take them) or gathers its rows (kernels that do not), the
    ring is exact, also under flash-attn 2's rules (+inf lse for rows without keys, the swapped
    path for max_seqlen_q == 1 with GQA)."""
    gen = torch.Generator().manual_seed(11)
    for world_size in (2, 4):
        multiple = layout_multiple(layout, world_size)
        mixed = [1, multiple] + torch.randint(1, 3 * multiple, (3,), generator=gen).tolist()
        for lengths in (mixed, [multiple, 1, multiple, 2]):  # the second: every document tiny
            cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
            padded = pad_for_layout(torch.zeros(cu[-1].item()), cu, world_size=world_size, layout=layout)
            for causal, window, heads in ((True, None, HEADS["GQA"]), (False, None, HEADS["MQA"]),
                                          (True, 3, HEADS["MHA"]), (False, multiple + 1, HEADS["GQA"])):
                check_ring(padded.cu_seqlens.tolist(), world_size, layout, causal, window, heads, torch.float32,
                           seqused=lengths, backend=backend, head_dim=8)


@pytest.mark.parametrize("backend", [KeylessRowsNaN(fa2_rules), Gathering(fa2_rules)], ids=["ranges", "gathered"])
def test_ring_attention_gives_each_kernel_its_form(backend):
    """ring_attention itself (one process; padding breaks the ranges even there): a kernel that
    declares empty sequences reads ranges, one that does not gets gathered rows (Gathering
    asserts it), and both are exact."""
    gen = torch.Generator().manual_seed(5)
    cu, used = torch.tensor([0, 16, 40], dtype=torch.int32), torch.tensor([11, 20], dtype=torch.int32)
    q, k, v = (torch.randn(40, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    calls = []
    spy = types.SimpleNamespace(
        name=backend.name, check=backend.check, backward=backend.backward,
        forward=lambda q, k, v, varlen, *a, **kw: calls.append(varlen) or backend.forward(q, k, v, varlen, *a, **kw))
    if takes_empty_sequences(backend):
        spy.empty_sequences = True
    out = ring_attention(q, k, v, cu, seqused=used, backend=spy)
    ref = attention_reference(q, k, v, cu.tolist(), True, None, used.tolist())
    assert_close(out, ref, torch.float64)
    empty = [bool((vl.cu_seqlens_q.diff() == 0).any() or (vl.cu_seqlens_k.diff() == 0).any()) for vl in calls]
    assert empty == [takes_empty_sequences(backend)]


@pytest.mark.parametrize("backend", [fa2_rules, KeylessRowsNaN(fa2_rules), Gathering(fa2_rules)],
                         ids=["fa2_rules", "nan-where-no-keys", "gathered"])
def test_calls_with_a_long_gap_cut_it_or_gather(backend):
    """One padded document is all padding on rank 1: a 300-row gap, cut into 128-row empty
    sequences between ten short documents, gathered around between two."""
    alone = [0, 8, 608, 616], [8, 10, 8], [5, 10, 7]
    between = [0, 8, 16, 24, 624, 632, 640, 648], [8, 8, 8, 10, 8, 8, 8], [7, 8, 1, 10, 8, 3, 8]
    for (bounds, used, zigzag_used), (causal, window) in itertools.product((alone, between), ((True, None), (False, 3))):
        check_ring(bounds, 2, "contiguous", causal, window, HEADS["GQA"], torch.float32,
                   seqused=used, backend=backend, head_dim=8)
        check_ring(bounds, 2, "zigzag", causal, window, HEADS["MQA"], torch.float32,
                   seqused=zigzag_used, backend=backend, head_dim=8)


@pytest.mark.parametrize("case", [
    # issue 11: one document of 8 real tokens padded to 48, non-causal window 5: rank 0's step 3
    # pairs Lq = 4 queries with Lk = 2 keys under window (-1, 2); max_seqlen_k = 2 drops the bound
    dict(bounds=[0, 48], seqused=[8], causal=False),
    # causal, from the sweep above: an unbounded right side next to a bounded left one becomes
    # max_seqlen_k, which cuts rows off when it is below Lq - 1
    dict(bounds=[0, 8, 24, 32], seqused=[5, 13, 1], causal=True),
], ids=["issue-11-non-causal", "causal"])
def test_flash_attn_2_rules_catch_a_plan_that_reports_max_seqlen_k_below_lq(monkeypatch, case):
    case = dict(case, world_size=4, layout="zigzag", window=5, heads=HEADS["GQA"], dtype=torch.float32,
                backend=fa2_rules)
    check_ring(**case)  # the plan as it is: exact
    # the plan as it was: max_seqlen_k = the longest key sequence of the call
    monkeypatch.setattr(Call, "max_seqlen_k", property(lambda call: int((call.k1 - call.k0).max())))
    errors = ring_errors(**case)
    assert max(errors.values()) > 100 * TOL[torch.float32], errors


def test_autocast_around_the_ring_does_not_lower_its_accumulation():
    # float32 inputs inside a bf16 autocast region, forward and backward: the ring's kernels and
    # merge keep float32 (autocast would run the cpu kernel's einsums in bf16, errors ~1e-2; a
    # window makes the kernel take its explicit path rather than PyTorch's fused one)
    gen = torch.Generator().manual_seed(3)
    bounds = [0, 24, 40]
    q, k, v = (torch.randn(40, h, 16, generator=gen, requires_grad=True) for h in (4, 2, 2))
    ring = InProcessRing(torch.tensor(bounds, dtype=torch.int32), world_size=2, window_size=5)
    ref = attention_reference(q.detach(), k.detach(), v.detach(), bounds, window=5)
    dout = torch.randn(40, 4, 16, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ring.unshard(ring.attention(ring.shard(q), ring.shard(k), ring.shard(v)))
        assert out.dtype == torch.float32
        out.backward(dout)
    assert_close(out.detach(), ref, torch.float32, "out under autocast")
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    attention_reference(qd, kd, vd, bounds, window=5).backward(dout.double())
    for got, want, name in ((q.grad, qd.grad, "dq"), (k.grad, kd.grad, "dk"), (v.grad, vd.grad, "dv")):
        assert_close(got, want, torch.float32, f"{name} under autocast")
