"""Ranks of a context-parallel group that were given different batches raise, on every rank, at
the first attention layer of the forward pass: for every batch of the plugin and the callback, and
for direct shard_batch users; batches of different shapes too, before the ring communicates.
Batches shorter than the layout's multiple are exact; the local attention_mask counts real tokens."""

import pytest
import torch
import torch.distributed as dist

import hf_ring_attention as hra
from helpers import launch, rel_err
from models import collate, examples, reference_kwargs, tiny_model

pytestmark = pytest.mark.distributed


def _plugin_checks_every_batch(rank):
    from accelerate import Accelerator

    from hf_ring_attention.accelerate import ContextParallelPlugin

    accelerator = Accelerator(cpu=True)
    data = examples(3, packed=True)
    if rank == 1:  # the third batch differs on rank 1 (same shape)
        data[2] = {**data[2], "input_ids": data[2]["input_ids"].flip(0)}
    loader = torch.utils.data.DataLoader(data, batch_size=1, collate_fn=collate)
    model, loader = ContextParallelPlugin(cp_size=2).prepare(accelerator, tiny_model("llama"), loader)
    batches = iter(loader)
    for _ in range(2):
        model(**next(batches)).loss.backward()
    with pytest.raises(ValueError, match=r"different batches \(rank 0: batch \[1, 26\] with 26 real tokens, checksum"):
        model(**next(batches))


def _direct_users_check_shapes(rank):
    model = hra.patch_model(tiny_model("mistral"))
    ids = torch.arange(8 + 4 * rank)[None]  # [1, 8] on rank 0, [1, 12] on rank 1
    message = (r"rank 0: batch \[1, 8\] with 8 real tokens, checksum \d+; "
               r"rank 1: batch \[1, 12\] with 12 real tokens, checksum \d+")
    with pytest.raises(ValueError, match=message):
        model(**hra.shard_batch({"input_ids": ids, "labels": ids}))
    # same shape, different tokens
    ids = torch.full((2, 9), rank)
    with pytest.raises(ValueError, match="different batches"):
        model(**hra.shard_batch({"input_ids": ids}))
    # check=False: the ranks are trusted, nothing is gathered
    model(**hra.shard_batch({"input_ids": ids}, check=False))
    # the same batch passes, and is checked once (not in every layer)
    calls = []
    original = dist.all_gather
    dist.all_gather = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        model(**hra.shard_batch({"input_ids": torch.zeros(2, 9, dtype=torch.long)}))
    finally:
        dist.all_gather = original
    assert len(calls) == 1


def _callback_collator_checks(rank):
    from accelerate.state import AcceleratorState

    from hf_ring_attention.trainer import RingAttentionCallback

    ring = RingAttentionCallback(cp_size=2)
    ring.cp.install(AcceleratorState())
    model = ring.cp.prepare_model(tiny_model("llama"))
    features = examples(2, packed=False, seed=rank)  # every rank loads other data
    with pytest.raises(ValueError, match="different batches"):
        model(**ring.data_collator(collate)(features))


def _one_rank_passing_a_wrong_mask_raises_everywhere(rank):
    model = hra.patch_model(tiny_model("llama"))
    local = hra.shard_batch({"input_ids": torch.arange(16)[None]})
    if rank == 1:  # this rank alone changes the mask shard_batch returned
        local["attention_mask"] = torch.zeros_like(local["attention_mask"])
        with pytest.raises(ValueError, match="pass the attention_mask it returns unchanged"):
            model(**local)
    else:
        with pytest.raises(ValueError, match=r"rank\(s\) \[1\] of the context-parallel group rejected their inputs"):
            model(**local)


def _local_masks_count_real_tokens(rank):
    batch = {"input_ids": torch.arange(13)[None], "position_ids": torch.tensor([list(range(6)) + list(range(7))])}
    local = hra.shard_batch(batch)  # zigzag over 2 ranks: documents of 6 and 7 tokens padded to 8 each
    assert local["attention_mask"].dtype == torch.bool and local["attention_mask"].shape == (1, 8)
    real = local["attention_mask"].sum()
    dist.all_reduce(real)
    assert real.item() == 13 == local["ring_batch"].num_tokens


def _short_batches_are_exact(rank):
    """Fewer tokens than zigzag's 4 at P = 2 (the last batch of packed data can be that short):
    rank 1 holds only layout padding for the one-token batch, and everything stays exact."""
    reference = tiny_model("llama")
    patched = hra.patch_model(tiny_model("llama"))
    for s in (1, 3):
        ids = torch.arange(5, 5 + s)[None]
        batch = {"input_ids": ids, "labels": ids}
        ref = reference(**reference_kwargs(batch))
        local = hra.shard_batch(batch)
        out = patched(**local)
        assert rel_err(local["ring_batch"].gather(out.logits.detach()), ref.logits.detach()) <= 1e-5, s
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        expected = 0.0 if s == 1 else ref.loss.item()  # no target: shard_batch divides by max(0, 1)
        assert abs(loss.item() - expected) <= 1e-5 * abs(expected), (s, loss.item(), expected)


def _all(rank, world_size):
    _plugin_checks_every_batch(rank)
    _direct_users_check_shapes(rank)
    _callback_collator_checks(rank)
    _one_rank_passing_a_wrong_mask_raises_everywhere(rank)
    _local_masks_count_real_tokens(rank)
    _short_batches_are_exact(rank)


def test_different_batches_raise_on_every_rank():
    launch(_all, 2)
