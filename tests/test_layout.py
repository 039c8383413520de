"""Layouts: every token lives on exactly one rank, and unshard(shard(x)) == x."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_ring_attention import InProcessRing, pad_for_layout, shard, unpad, unshard
from hf_ring_attention.layout import layout_multiple, local_indices, rank_pieces

LAYOUTS = ["zigzag", "contiguous", "striped"]


@st.composite
def packings(draw):
    world_size = draw(st.integers(1, 8))
    layout = draw(st.sampled_from(LAYOUTS))
    multiple = layout_multiple(layout, world_size)
    lengths = draw(st.lists(st.integers(0, 5), min_size=1, max_size=5))
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n * multiple)
    return bounds, world_size, layout


@settings(max_examples=200, deadline=None)
@given(packings())
def test_ranks_partition_the_tokens_and_round_trip(case):
    bounds, world_size, layout = case
    index = [local_indices(bounds, layout, world_size, r) for r in range(world_size)]
    assert all(len(i) == bounds[-1] // world_size for i in index)
    assert torch.equal(torch.cat(index).sort().values, torch.arange(bounds[-1]))
    # a global-index tensor travels through the sharding and comes back in order
    x = torch.arange(bounds[-1] * 3).view(bounds[-1], 3)
    ring = InProcessRing(bounds, world_size=world_size, layout=layout) if bounds[-1] else None
    if ring is not None:
        assert torch.equal(ring.unshard(ring.shard(x)), x)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_zigzag_rank_holds_chunks_r_and_mirror(world_size):
    n = 2
    (doc,) = rank_pieces([0, 2 * world_size * n], "zigzag", world_size, 1)
    assert [p.start for p in doc] == [n, (2 * world_size - 2) * n]


def test_striped_rank_holds_every_pth_token():
    assert local_indices([0, 8, 12], "striped", 4, 1).tolist() == [1, 5, 9]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_indivisible_length_names_the_multiple_and_the_padding_helper(layout):
    x = torch.zeros(10, 2)
    with pytest.raises(ValueError, match=r"multiple of .*pad_for_layout") as err:
        InProcessRing(torch.tensor([0, 3, 10], dtype=torch.int32), world_size=4, layout=layout)
    assert "document 0 has length 3" in str(err.value)
    del x


def test_cu_seqlens_that_do_not_add_up_are_rejected():
    with pytest.raises(ValueError, match="cu_seqlens"):
        shard(torch.zeros(8, 2), torch.tensor([0, 4, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        shard(torch.zeros(8, 2), torch.tensor([0, 6, 4, 8], dtype=torch.int32))
    with pytest.raises(TypeError, match="int32"):
        shard(torch.zeros(8, 2), torch.tensor([0.0, 8.0]))


def test_unknown_layout_is_rejected():
    with pytest.raises(ValueError, match="layout='diagonal'"):
        shard(torch.zeros(8), layout="diagonal")


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(1, 13), min_size=1, max_size=5),
    st.integers(1, 8),
    st.sampled_from(LAYOUTS),
)
def test_pad_for_layout_pads_each_document_and_unpad_restores(lengths, world_size, layout):
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    x = torch.randn(bounds[-1], 2)
    padded = pad_for_layout(x, torch.tensor(bounds, dtype=torch.int32), world_size=world_size, layout=layout)
    multiple = layout_multiple(layout, world_size)
    new_lengths = padded.cu_seqlens.diff().tolist()
    assert all(m % multiple == 0 and 0 <= m - n < multiple for m, n in zip(new_lengths, lengths))
    assert padded.seqused.tolist() == lengths
    assert torch.equal(unpad(padded.x, padded.cu_seqlens, padded.seqused), x)


def test_world_size_one_shard_is_identity():
    x = torch.randn(6, 3)
    assert torch.equal(shard(x), x)
    assert torch.equal(unshard(x), x)
