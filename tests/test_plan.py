"""The step planner: the union of planned block pairs is exactly the true mask."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_ring_attention import RingPlan
from hf_ring_attention.layout import layout_multiple, local_indices
from helpers import true_mask
from plan_reference import reference_plan
import fa2_rules


def covered(bounds, world_size, layout, causal, window, seqused=None):
    """How many times the plans of all ranks cover each (global query, global key) pair, and
    the smallest number of keys any planned query row sees."""
    total = bounds[-1]
    count = torch.zeros(total, total, dtype=torch.long)
    min_keys = None
    index = [local_indices(bounds, layout, world_size, r) for r in range(world_size)]
    for rank in range(world_size):
        plan = RingPlan(bounds, world_size=world_size, rank=rank, layout=layout, causal=causal,
                        window_size=window, seqused=seqused)
        for step, calls in enumerate(plan.steps):
            src = (rank - step) % world_size
            if calls:
                assert step < plan.num_steps, "a step with work lies beyond num_steps"
            for call in calls:
                for s in call.segments:
                    lq, lk = s.q1 - s.q0, s.k1 - s.k0
                    rel = torch.arange(lk)[None, :] - torch.arange(lq)[:, None] - (lk - lq)
                    seen = torch.ones(lq, lk, dtype=torch.bool)
                    if s.left >= 0:
                        seen &= rel >= -s.left
                    if s.right >= 0:
                        seen &= rel <= s.right
                    rows = seen.sum(1)
                    min_keys = int(rows.min()) if min_keys is None else min(min_keys, int(rows.min()))
                    qi = index[rank][s.q0:s.q1]
                    kj = index[src][s.k0:s.k1]
                    count[qi[:, None], kj[None, :]] += seen.long()
    return count, min_keys


@st.composite
def masks(draw):
    world_size = draw(st.integers(1, 8))
    layout = draw(st.sampled_from(["zigzag", "contiguous", "striped"]))
    multiple = layout_multiple(layout, world_size)
    lengths = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n * multiple)
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.integers(1, 3 * multiple)))
    seqused = None
    if draw(st.booleans()):
        seqused = [draw(st.integers(0, b - a)) for a, b in zip(bounds, bounds[1:])]
    return bounds, world_size, layout, causal, window, seqused


@settings(max_examples=150, deadline=None)
@given(masks())
def test_planned_pairs_cover_true_mask_exactly_once(case):
    bounds, world_size, layout, causal, window, seqused = case
    count, min_keys = covered(bounds, world_size, layout, causal, window, seqused)
    expected = true_mask(bounds, causal, window, seqused).long()
    assert torch.equal(count, expected)
    assert min_keys is None or min_keys >= 1, "a planned query row sees no key"


@settings(max_examples=150, deadline=None)
@given(masks())
def test_vectorised_plan_equals_the_scalar_reference(case):
    bounds, world_size, layout, causal, window, seqused = case
    last = 0
    for rank in range(world_size):
        plan = RingPlan(bounds, world_size=world_size, rank=rank, layout=layout, causal=causal,
                        window_size=window, seqused=seqused)
        expected = reference_plan(plan.bounds, plan.seqused, layout, world_size, rank, causal, plan.window_size)
        assert [[(c.window, c.segments) for c in calls] for calls in plan.steps] == expected
        last = max([last] + [s for s, calls in enumerate(expected) if calls])
    every_step = world_size > 1 and plan.window_size is None and seqused is None
    assert plan.num_steps == (world_size if every_step else last + 1)


@settings(max_examples=100, deadline=None)
@given(masks())
def test_windows_survive_flash_attn_2_clamping(case):
    """flash-attn 2 makes a side >= max_seqlen_k unbounded, and an unbounded side next to a bounded
    one max_seqlen_k: both are exact when max_seqlen_k >= Lq - 1 (right) and >= Lk - 1 (left)."""
    bounds, world_size, layout, causal, window, seqused = case
    for rank in range(world_size):
        plan = RingPlan(bounds, world_size=world_size, rank=rank, layout=layout, causal=causal,
                        window_size=window, seqused=seqused)
        for calls in plan.steps:
            for call in calls:
                assert call.max_seqlen_k >= call.max_seqlen_q
                for s in call.segments:
                    lq, lk = s.q1 - s.q0, s.k1 - s.k0
                    assert call.max_seqlen_k >= max(lq, lk)
                    # a bounded side binds (else it would have been planned as unbounded)
                    assert s.right < 0 or s.right < lq - 1
                    assert s.left < 0 or s.left < lk - 1


def _seen(lq: int, lk: int, window) -> torch.Tensor:
    """[lq, lk] bool: the keys each query of a sequence sees under a bottom-right aligned window."""
    left, right = window
    rel = torch.arange(lk)[None, :] - torch.arange(lq)[:, None] - (lk - lq)
    seen = torch.ones(lq, lk, dtype=torch.bool)
    if left >= 0:
        seen &= rel >= -left
    if right >= 0:
        seen &= rel <= right
    return seen


def device_covered(bounds, world_size, layout, causal, window, seqused, empty_sequences):
    """:func:`covered` for the uploaded calls, read the way flash-attn 2 reads them (its window
    rewrites at max_seqlen_k), and the number of calls that gather their rows."""
    total = bounds[-1]
    count = torch.zeros(total, total, dtype=torch.long)
    index = [local_indices(bounds, layout, world_size, r) for r in range(world_size)]
    gathering = 0
    for rank in range(world_size):
        plan = RingPlan(bounds, world_size=world_size, rank=rank, layout=layout, causal=causal,
                        window_size=window, seqused=seqused)
        for step, calls in enumerate(plan.device_calls("cpu", empty_sequences=empty_sequences)):
            src = (rank - step) % world_size
            for call in calls:
                v = call.varlen
                rows = [torch.arange(r.start, r.stop) if r.index is None else r.index.long()
                        for r in (call.q_rows, call.k_rows)]
                gathering += call.q_rows.index is not None or call.k_rows.index is not None
                cu_q, cu_k = v.cu_seqlens_q.tolist(), v.cu_seqlens_k.tolist()
                assert cu_q[-1] == len(call.q_rows) and cu_k[-1] == len(call.k_rows), "a row outside every sequence"
                for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
                    lq, lk = q1 - q0, k1 - k0
                    assert v.max_seqlen_q >= lq and v.max_seqlen_k >= max(lk, v.max_seqlen_q)
                    if lq == 0 or lk == 0:
                        assert empty_sequences, "an empty sequence in the gathering form"
                        assert v.max_seqlen_q >= 2, "flash-attn 2 would read max_seqlen_q == 1 as one query each"
                        continue
                    seen = _seen(lq, lk, fa2_rules.effective_window(v))
                    assert int(seen.sum(1).min()) >= 1, "a query row of a sequence with keys sees none"
                    qi = index[rank][rows[0][q0:q1]]
                    kj = index[src][rows[1][k0:k1]]
                    count[qi[:, None], kj[None, :]] += seen.long()
    return count, gathering


@settings(max_examples=100, deadline=None)
@given(masks(), st.booleans())
def test_uploaded_calls_cover_true_mask_exactly_once_in_both_forms(case, empty_sequences):
    """Gathered rows, or one range per side with the gaps as empty sequences: either way every
    visible pair is computed exactly once, under flash-attn 2's reading of the window."""
    bounds, world_size, layout, causal, window, seqused = case
    count, _ = device_covered(bounds, world_size, layout, causal, window, seqused, empty_sequences)
    assert torch.equal(count, true_mask(bounds, causal, window, seqused).long())


@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "striped"])
@pytest.mark.parametrize("window", [None, 3, 13])
def test_packed_padded_documents_read_their_rows_without_gathering(layout, window):
    """With empty sequences no call of these packed, padded batches gathers a row; without, some do."""
    world_size = 4
    multiple = layout_multiple(layout, world_size)
    gen = torch.Generator().manual_seed(7)
    used = torch.randint(1, 5 * multiple, (9,), generator=gen).tolist()
    lengths = [-(-n // multiple) * multiple for n in used]
    bounds = [0] + torch.tensor(lengths).cumsum(0).tolist()
    for causal in (True, False):
        _, gathering = device_covered(bounds, world_size, layout, causal, window, used, True)
        assert gathering == 0
        _, gathering = device_covered(bounds, world_size, layout, causal, window, used, False)
        assert gathering > 0


def _padded(lengths_used):
    """bounds and seqused of documents given as (length, real tokens)."""
    bounds = [0] + torch.tensor([n for n, _ in lengths_used]).cumsum(0).tolist()
    return bounds, [u for _, u in lengths_used]


def test_long_gaps_are_cut_into_row_blocks_or_gathered_around():
    """A document that is all padding on rank 1 leaves a 300-row gap between 4-row pieces. Cut
    into pieces of at most 128 rows (the longest sequence's row blocks), it adds 6 sequences: fine
    next to 10 sequences, more than tripling 2, where the call gathers its 8 rows instead. Exact
    either way."""
    between = _padded([(8, 8)] * 5 + [(600, 10)] + [(8, 8)] * 5)
    alone = _padded([(8, 8), (600, 10), (8, 8)])
    # alone: rank 1's two steps gather; rank 0's step 0 (three sequences, a 290-row gap) cuts it
    for (bounds, used), gathered in ((between, 0), (alone, 2)):
        count, gathering = device_covered(bounds, 2, "contiguous", True, None, used, True)
        assert gathering == gathered
        assert torch.equal(count, true_mask(bounds, True, None, used).long())
    plan = RingPlan(between[0], world_size=2, rank=1, layout="contiguous", seqused=between[1])
    calls = [c for step in plan.device_calls("cpu") for c in step]
    assert all(c.q_rows.index is None and (c.q_rows.start, c.q_rows.stop) == (0, 340) for c in calls)
    pieces = [4] * 5 + [128, 128, 44] + [0] * 3 + [4] * 5  # lq of every sequence
    assert [c.varlen.cu_seqlens_q.diff().tolist() for c in calls] == [pieces] * 2
    assert all((c.varlen.max_seqlen_q, c.varlen.max_seqlen_k) == (128, 128) for c in calls)
    plan = RingPlan(alone[0], world_size=2, rank=1, layout="contiguous", seqused=alone[1])
    calls = [c for step in plan.device_calls("cpu") for c in step]
    assert [c.q_rows.index.tolist() for c in calls] == [[0, 1, 2, 3, 304, 305, 306, 307]] * 2
    # a 100-row gap: one piece each side, a range
    bounds, used = _padded([(8, 8), (200, 10), (8, 8)])
    plan = RingPlan(bounds, world_size=2, rank=1, layout="contiguous", seqused=used)
    calls = [c for step in plan.device_calls("cpu") for c in step]
    assert all(c.q_rows.index is None and (c.q_rows.start, c.q_rows.stop) == (0, 108) for c in calls)
    assert [c.varlen.cu_seqlens_q.tolist() for c in calls] == [[0, 4, 104, 104, 108]] * 2


@pytest.mark.parametrize("empty_sequences", [True, False], ids=["empty-sequences", "gathered"])
def test_upload_packs_every_index_in_one_buffer(empty_sequences):
    bounds, seqused = [0, 16, 48, 56], [13, 32, 1]
    plan = RingPlan(bounds, world_size=4, rank=1, window_size=6, seqused=seqused)
    calls = plan.upload("cpu", empty_sequences=empty_sequences).device_calls("cpu", empty_sequences=empty_sequences)
    assert len(calls) == plan.num_steps
    storages = set()
    for host_calls, device_calls in zip(plan.steps, calls):
        assert len(host_calls) == len(device_calls)
        for host, dev in zip(host_calls, device_calls):
            segs = host.segments
            lq = [s.q1 - s.q0 for s in segs]
            lk = [s.k1 - s.k0 for s in segs]
            cu_q, cu_k = dev.varlen.cu_seqlens_q.tolist(), dev.varlen.cu_seqlens_k.tolist()
            assert dev.varlen.cu_seqlens_q.dtype == torch.int32
            assert dev.varlen.window == host.window
            if empty_sequences and len(segs) > 1:
                # one range per side; the host's sequences, with the gaps between them in between
                assert dev.q_rows.index is None and dev.k_rows.index is None
                assert (dev.q_rows.start, dev.q_rows.stop) == (segs[0].q0, segs[-1].q1)
                assert (dev.k_rows.start, dev.k_rows.stop) == (segs[0].k0, segs[-1].k1)
                pairs = [(b - a, d - c) for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:])]
                assert [p for p in pairs if 0 not in p] == list(zip(lq, lk))
                continue
            assert cu_q == [sum(lq[:i]) for i in range(len(lq) + 1)]
            assert cu_k == [sum(lk[:i]) for i in range(len(lk) + 1)]
            assert dev.varlen.max_seqlen_q == max(lq)
            for rows, spans in ((dev.q_rows, [(s.q0, s.q1) for s in segs]), (dev.k_rows, [(s.k0, s.k1) for s in segs])):
                wanted = [i for a, b in spans for i in range(a, b)]
                got = list(range(rows.start, rows.stop)) if rows.index is None else rows.index.tolist()
                assert got == wanted
                if rows.index is not None:
                    storages.add(rows.index.untyped_storage().data_ptr())
            storages.add(dev.varlen.cu_seqlens_q.untyped_storage().data_ptr())
            storages.add(dev.varlen.cu_seqlens_k.untyped_storage().data_ptr())
    assert len(storages) == 1, "every tensor of the plan is a view of one uploaded buffer"


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_zigzag_single_document_is_one_call_per_step(world_size):
    # step 0: one causal call over both chunks; later steps: one full call of n x 2n or 2n x n
    n = 3
    bounds = [0, 2 * world_size * n]
    for rank in range(world_size):
        plan = RingPlan(bounds, world_size=world_size, rank=rank)
        assert [len(calls) for calls in plan.steps] == [1] * world_size
        first = plan.steps[0][0]
        assert first.causal and len(first.segments) == 1
        assert (first.segments[0].q1 - first.segments[0].q0) == 2 * n
        for calls in plan.steps[1:]:
            (seg,) = calls[0].segments
            assert calls[0].left == calls[0].right == -1
            assert {seg.q1 - seg.q0, seg.k1 - seg.k0} == {n, 2 * n}


def test_zigzag_balances_causal_work():
    world_size, n = 4, 5
    bounds = [0, 2 * world_size * n, 2 * world_size * n + 2 * world_size * 2]
    work = []
    for rank in range(world_size):
        plan = RingPlan(bounds, world_size=world_size, rank=rank)
        pairs = 0
        for calls in plan.steps:
            for call in calls:
                for s in call.segments:
                    lq, lk = s.q1 - s.q0, s.k1 - s.k0
                    pairs += lq * lk if not call.causal else lq * (lq + 1) // 2 + lq * (lk - lq)
        work.append(pairs)
    assert len(set(work)) == 1, work


def test_window_narrower_than_shard_skips_far_steps():
    # window 2 on 4 ranks, contiguous 8-token shards: only the neighbour's block is ever needed
    plan = RingPlan([0, 32], world_size=4, rank=2, layout="contiguous", window_size=2)
    assert plan.num_steps == 2
    assert all(not calls for calls in plan.steps[2:])
