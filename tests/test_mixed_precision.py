"""Mixed precision: under torch.autocast (what Trainer(bf16=True), TRL's SFTConfig and
Accelerator(mixed_precision="bf16") use) the rotary embedding hands the attention float32 q and k
and a bf16 v. The patched model casts them to the autocast dtype, as transformers' SDPA and
flash-attention paths do, and matches the unpatched model under the same autocast."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import hf_ring_attention as hra
from helpers import TOL, launch, rel_err, spawn
from models import BATCH, LR, batches, collate, examples, reference_kwargs, tiny_model

# Both sides round to bfloat16 (8 significant bits) at different points: the ring rounds each
# rank's attention output once after a float32 merge, SDPA rounds its own output. Logits and
# gradients then differ by a few bf16 roundoffs relative (measured at P = 2: logits up to 3.1e-3,
# gradients up to 7e-4), far below the 2e-2 used for bf16 throughout the tests (helpers.TOL).
BF16 = TOL[torch.bfloat16]
# The loss is computed in float32 from bf16 logits. These logits are below 0.5 in magnitude, where
# bf16 values are 2^-9 apart; they differ by one such step at most (measured: max 2^-9). Changing
# every logit by at most d changes each token's log-softmax by at most 2d, so two steps
# (2 x 2 x 2^-9 = 2^-7 = 7.8e-3) bound the loss difference (measured: up to 1.3e-4).
LOSS_TOL = 2 ** -7


def _compare_under_autocast(kind, batch, what):
    reference = tiny_model(kind)
    patched = hra.patch_model(copy.deepcopy(reference))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference(**reference_kwargs(batch))
        local = hra.shard_batch(batch)
        out = patched(**local)
    assert out.logits.dtype == ref.logits.dtype == torch.bfloat16, what
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    logits = local["ring_batch"].gather(out.logits.detach())
    assert rel_err(logits[mask], ref.logits.detach()[mask]) <= BF16, f"logits {what}"
    loss = out.loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(loss)
    assert abs(loss.item() - ref.loss.item()) <= LOSS_TOL, f"loss {what}: {loss.item()} vs {ref.loss.item()}"
    ref.loss.backward()
    out.loss.backward()
    for (name, p), q in zip(reference.named_parameters(), patched.parameters()):
        grad = q.grad.clone()
        if dist.is_initialized():
            dist.all_reduce(grad)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, f"grad {name} {what}: not finite or zero"
        assert rel_err(grad, p.grad) <= BF16, f"grad {name} {what}: {rel_err(grad, p.grad):.2e}"


def _autocast_parity(rank, world_size):
    for kind in ("llama", "mistral"):  # GQA; a sliding window narrower than the sequence
        for name, batch in batches().items():
            _compare_under_autocast(kind, batch, f"{kind} {name} P={world_size} rank {rank}")


@pytest.mark.distributed
def test_sharded_model_under_bf16_autocast_matches_unpatched_model():
    spawn(_autocast_parity, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plain_batch_under_autocast_matches_unpatched_model(dtype):
    """World size 1 without shard_batch; float16 (11 significant bits) rounds more finely than
    bfloat16, so the bfloat16 bounds hold for it too (measured: logits 2e-4 relative)."""
    reference = tiny_model("qwen2")
    patched = hra.patch_model(copy.deepcopy(reference))
    batch = batches()["right padding"]
    with torch.autocast("cpu", dtype=dtype):
        ref = reference(**reference_kwargs(batch))
        out = patched(**reference_kwargs(batch))  # world size 1, no shard_batch
    mask = batch["attention_mask"].bool()
    assert out.logits.dtype == ref.logits.dtype == dtype
    assert rel_err(out.logits[mask], ref.logits[mask]) <= BF16
    assert abs(out.loss.item() - ref.loss.item()) <= LOSS_TOL


# ---------------------------------------------------------------- Trainer(bf16=True)
STEPS = 2


def _reference_bf16():
    """One process, plain PyTorch under bf16 autocast: per step the token-mean loss of the batch."""
    model = tiny_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    data = examples(STEPS * BATCH, packed=True)
    losses = []
    for step in range(STEPS):
        chunk = data[step * BATCH:(step + 1) * BATCH]
        total = sum(int((ex["labels"][1:] != -100).sum()) for ex in chunk)
        loss_sum = 0.0
        for ex in chunk:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=ex["input_ids"][None], position_ids=ex["position_ids"][None],
                               use_cache=False).logits[0, :-1]
            loss = F.cross_entropy(logits.float(), ex["labels"][1:], reduction="sum") / total
            loss.backward()
            loss_sum += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(loss_sum)
    return losses


def _train_bf16(rank, world_size, out_dir):
    from transformers import Trainer, TrainingArguments

    from hf_ring_attention.trainer import RingAttentionCallback

    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=LR,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, bf16=True, seed=0, disable_tqdm=True,
    )

    class SequentialTrainer(Trainer):  # the reference reads the data in order
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    ring = RingAttentionCallback(cp_size=2)
    trainer = SequentialTrainer(model=tiny_model("llama"), args=args, train_dataset=examples(STEPS * BATCH, packed=True),
                      data_collator=collate, callbacks=[ring])
    trainer.train()
    if rank == 0:
        torch.save([log["loss"] for log in trainer.state.log_history if "loss" in log], f"{out_dir}/losses.pt")


@pytest.mark.distributed
def test_trainer_bf16_with_callback_matches_one_process_under_autocast(tmp_path):
    launch(_train_bf16, 2, str(tmp_path))
    got = torch.load(tmp_path / "losses.pt")
    expected = _reference_bf16()
    assert len(got) == STEPS
    for a, b in zip(got, expected):
        assert math.isfinite(a) and abs(a - b) <= LOSS_TOL, f"logged loss {a} vs {b}"
