"""ContextParallelPlugin under Accelerate: cp=2 and dp=2 x cp=2 training equals one process
training on the same global batches, step by step (losses) and at the end (weights)."""

import pytest
import torch
import torch.nn.functional as F

from helpers import launch
from models import BATCH, LR, collate, examples, tiny_model

STEPS = 3

pytestmark = pytest.mark.distributed


def reference(dp, accumulate, packed):
    """One process, plain PyTorch: per optimizer step, the token-mean loss over the global batch
    (dp replicas x accumulate micro-batches), SGD with momentum, and a linear warm-up that
    advances once per data-parallel replica per step (accelerate's convention for schedulers:
    one step per batch of one process; the ranks of a context-parallel group share a batch)."""
    model = tiny_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / STEPS)
    data = examples(STEPS * dp * accumulate * BATCH, packed)
    losses = []
    per_step = dp * accumulate * BATCH
    for step in range(STEPS):
        chunk = data[step * per_step:(step + 1) * per_step]
        total = sum(int((ex["labels"][1:] != -100).sum()) for ex in chunk)
        loss_sum = 0.0
        for ex in chunk:
            kwargs = {"input_ids": ex["input_ids"][None], "use_cache": False}
            if packed:
                kwargs["position_ids"] = ex["position_ids"][None]
            logits = model(**kwargs).logits[0, :-1]
            loss = F.cross_entropy(logits, ex["labels"][1:], ignore_index=-100, reduction="sum") / total
            loss.backward()
            loss_sum += loss.item()
        opt.step()
        for _ in range(dp):
            sched.step()
        opt.zero_grad()
        losses.append(loss_sum)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(rank, world_size, cp_size, accumulate, packed, result_path, memory_options=False):
    from accelerate import Accelerator

    from hf_ring_attention.accelerate import ContextParallelPlugin

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    dp = world_size // cp_size
    model = tiny_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / STEPS)
    data = examples(STEPS * dp * accumulate * BATCH, packed)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False, collate_fn=collate)
    cp = ContextParallelPlugin(cp_size=cp_size, chunked_loss=3 if memory_options else False,
                               tiled_mlp=5 if memory_options else False)
    model, opt, loader, sched = cp.prepare(accelerator, model, opt, loader, sched)
    losses, running = [], 0.0
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            running += accelerator.reduce(loss.detach(), "mean").item() / accumulate
            opt.step()
            sched.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            losses.append(running)
            running = 0.0
    if rank == 0:
        state = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        torch.save({"losses": losses, "state": state}, result_path)


@pytest.mark.parametrize(
    "world_size, cp_size, accumulate, packed, memory_options",
    [(2, 2, 1, False, False), (2, 2, 2, True, False), (4, 2, 1, True, False), (4, 2, 2, False, False),
     (2, 2, 2, True, True)],
    ids=["cp2", "cp2-accum2-packed", "dp2xcp2-packed", "dp2xcp2-accum2", "cp2-accum2-packed-chunked-loss-tiled-mlp"],
)
def test_training_matches_one_process(tmp_path, world_size, cp_size, accumulate, packed, memory_options):
    path = tmp_path / "result.pt"
    launch(_train, world_size, cp_size, accumulate, packed, str(path), memory_options)
    got = torch.load(path)
    ref_losses, ref_state = reference(world_size // cp_size, accumulate, packed)
    assert len(got["losses"]) == STEPS
    for step, (a, b) in enumerate(zip(got["losses"], ref_losses)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: loss {a} vs {b}"
    for name, ref in ref_state.items():
        # after a few SGD steps the weights differ by lr x (gradient rounding): far below 1e-5
        err = ((got["state"][name] - ref).norm() / ref.norm()).item()
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


def _bad_setups(rank, world_size):
    from accelerate import Accelerator

    from hf_ring_attention.accelerate import ContextParallelPlugin
    from hf_ring_attention.batch import check_same_batch, shard_batch

    accelerator = Accelerator(cpu=True)
    with pytest.raises(ValueError, match=r"cp_size=3 must be a positive divisor of the number of processes \(2\)"):
        ContextParallelPlugin(cp_size=3).setup(accelerator)
    model = tiny_model("llama")
    model.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match=r"attention_dropout=0.1"):
        ContextParallelPlugin(cp_size=2).prepare(accelerator, model)
    cp = ContextParallelPlugin(cp_size=2)
    cp.setup(accelerator)
    # each rank loads a different batch: every rank raises, none hangs
    ids = torch.full((1, 8), rank, dtype=torch.long)
    with pytest.raises(ValueError, match="different batches"):
        check_same_batch(shard_batch({"input_ids": ids}, group=cp.group)["ring_batch"])
    check_same_batch(shard_batch({"input_ids": torch.zeros(1, 8, dtype=torch.long)}, group=cp.group)["ring_batch"])
    with pytest.raises(TypeError, match="got Linear"):
        ContextParallelPlugin(cp_size=2).prepare(accelerator, torch.nn.Linear(2, 2))
    loader = torch.utils.data.DataLoader(examples(2, packed=False), batch_size=1, collate_fn=collate)
    with pytest.raises(ValueError, match="prepare the model with"):
        ContextParallelPlugin(cp_size=2).prepare(accelerator, loader)
    # rank 0 holds a batch it cannot shard: both ranks raise, neither waits for the other
    bad = [{"input_ids": torch.zeros(8, dtype=torch.long),
            "attention_mask": torch.tensor([1, 0, 1, 1, 1, 1, 1, 1] if rank == 0 else [1] * 8)}]
    _, loader = ContextParallelPlugin(cp_size=2, check_batches=False).prepare(
        accelerator, tiny_model("llama"), torch.utils.data.DataLoader(bad, batch_size=1, collate_fn=collate))
    expected = "padding between its tokens" if rank == 0 else "1 rank.s. could not shard"
    with pytest.raises(ValueError, match=expected):
        next(iter(loader))


def test_bad_setups_are_refused_on_every_rank():
    launch(_bad_setups, 2)
