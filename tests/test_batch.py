"""shard_batch with what padding-free collators emit: transformers' DataCollatorWithFlattening
and TRL's DataCollatorForLanguageModeling add cu_seq_lens_q/k, max_length_q/k and seq_idx beside
restarting position_ids. They are accepted when they describe the same documents, refused naming
the values otherwise."""

import pytest
import torch
from transformers import DataCollatorWithFlattening

import hf_ring_attention as hra
from models import VOCAB

PACKING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def features(lengths=(7, 1, 12, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (n,), generator=gen).tolist()} for n in lengths]


def flattened():
    return DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(features())


def assert_same_shard(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        if key == "ring_batch":
            assert (value.bounds, value.lengths, value.fingerprint, value.num_targets) == (
                b[key].bounds, b[key].lengths, b[key].fingerprint, b[key].num_targets)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def test_flattening_collator_keys_are_accepted_and_change_nothing():
    batch = flattened()
    assert set(PACKING_KEYS) <= set(batch)
    local = hra.shard_batch(batch)
    assert not set(PACKING_KEYS) & set(local)  # they describe the full batch: not passed on
    assert_same_shard(local, hra.shard_batch({k: v for k, v in batch.items() if k not in PACKING_KEYS}))
    assert local["ring_batch"].lengths == [7, 1, 12, 4]
    assert hra.count_targets(batch) == 6 + 0 + 11 + 3


def test_trl_padding_free_collator_keys_are_accepted():
    import trl
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=8)
    # as BFD packing leaves them: one example holding several documents, with their lengths
    examples = [{"input_ids": list(range(1, 12)), "seq_lengths": [4, 7]},
                {"input_ids": list(range(20, 29)), "seq_lengths": [9]}]
    batch = collator(examples)
    assert set(PACKING_KEYS) <= set(batch), trl.__version__
    local = hra.shard_batch(batch)
    # padded to 24 tokens with position 0: each padding token is a document of its own, as TRL's
    # cu_seq_lens say (and its labels are -100)
    assert local["ring_batch"].lengths == [4, 7, 9] + [1] * 4
    assert_same_shard(local, hra.shard_batch({k: v for k, v in batch.items() if k not in PACKING_KEYS}))


@pytest.mark.parametrize("key, value, message", [
    ("cu_seq_lens_q", torch.tensor([0, 7, 8, 19, 24], dtype=torch.int32),
     r"cu_seq_lens_q=\[0, 7, 8, 19, 24\] does not describe the documents of position_ids \(documents "
     r"restart at positions \[0, 7, 8, 20\] of the row, so cu_seq_lens_q should be \[0, 7, 8, 20, 24\]\)"),
    ("cu_seq_lens_k", torch.tensor([0, 24], dtype=torch.int32), r"cu_seq_lens_k=\[0, 24\] does not describe"),
    ("max_length_q", 11, r"max_length_q=11 does not describe .* should be 12\)"),
    ("seq_idx", torch.zeros(1, 24, dtype=torch.int32), r"seq_idx=\[0, 0, 0, .* \(24 values\)\] does not describe"),
])
def test_packing_keys_that_disagree_with_position_ids_are_refused_with_their_values(key, value, message):
    batch = flattened()
    batch[key] = value
    with pytest.raises(ValueError, match=message):
        hra.shard_batch(batch)


def test_packing_keys_without_position_ids_or_with_several_rows_are_refused():
    batch = flattened()
    del batch["position_ids"]
    with pytest.raises(ValueError, match="position_ids are missing"):
        hra.shard_batch(batch)
    batch = flattened()
    batch = {k: (v.expand(2, -1) if k in ("input_ids", "position_ids") else v) for k, v in batch.items()
             if k not in ("labels", "seq_idx")}
    with pytest.raises(ValueError, match=r"one flattened row without padding, but input_ids has shape \(2, 24\)"):
        hra.shard_batch(batch)
