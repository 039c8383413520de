"""RingAttentionCallback with the transformers Trainer on 2 processes (cp=2): logged training
losses, evaluation loss and final weights equal one process training on the same batches;
checkpoints resume exactly and load with from_pretrained."""

import pytest
import torch
import torch.nn.functional as F

from helpers import launch
from models import BATCH, LR, collate, examples, tiny_model

pytestmark = pytest.mark.distributed

STEPS, ACCUMULATE = 3, 2


def reference():
    model = tiny_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    data = examples(STEPS * ACCUMULATE * BATCH, packed=True)
    per_step, losses = ACCUMULATE * BATCH, []
    for step in range(STEPS):
        chunk = data[step * per_step:(step + 1) * per_step]
        total = sum(int((ex["labels"][1:] != -100).sum()) for ex in chunk)
        loss_sum = 0.0
        for ex in chunk:
            logits = model(input_ids=ex["input_ids"][None], position_ids=ex["position_ids"][None],
                           use_cache=False).logits[0, :-1]
            loss = F.cross_entropy(logits, ex["labels"][1:], reduction="sum") / total
            loss.backward()
            loss_sum += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(loss_sum)
    model.eval()
    eval_losses = []
    with torch.no_grad():
        data = examples(4, packed=True, seed=1)
        for i in range(0, 4, BATCH):
            chunk = data[i:i + BATCH]
            total = sum(int((ex["labels"][1:] != -100).sum()) for ex in chunk)
            eval_losses.append(sum(
                F.cross_entropy(model(input_ids=ex["input_ids"][None], position_ids=ex["position_ids"][None],
                                      use_cache=False).logits[0, :-1], ex["labels"][1:], reduction="sum").item()
                for ex in chunk) / total)
    return losses, sum(eval_losses) / len(eval_losses), model.state_dict()


def _train(rank, world_size, out_dir, memory_options):
    from transformers import Trainer, TrainingArguments

    from hf_ring_attention.trainer import RingAttentionCallback

    class SequentialTrainer(Trainer):  # the reference reads the data in order
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    def make_trainer(max_steps):
        args = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
            gradient_accumulation_steps=ACCUMULATE, max_steps=max_steps, learning_rate=LR, optim="sgd",
            lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=2,
            save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, seed=0,
            prediction_loss_only=True, disable_tqdm=True,
        )
        ring = RingAttentionCallback(cp_size=2, chunked_loss=3 if memory_options else False,
                                     tiled_mlp=5 if memory_options else False)
        return SequentialTrainer(model=tiny_model("llama"), args=args,
                       train_dataset=examples(STEPS * ACCUMULATE * BATCH, packed=True),
                       eval_dataset=examples(4, packed=True, seed=1),
                       data_collator=ring.data_collator(collate), callbacks=[ring])

    trainer = make_trainer(STEPS)
    train_loss = trainer.train().training_loss
    metrics = trainer.evaluate()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    resumed = make_trainer(STEPS)
    resumed.train(resume_from_checkpoint=f"{out_dir}/checkpoint-2")
    if rank == 0:
        torch.save({"losses": losses, "train_loss": train_loss, "eval_loss": metrics["eval_loss"], "state": state,
                    "resumed": {k: v.detach().clone() for k, v in resumed.model.state_dict().items()}},
                   f"{out_dir}/result.pt")


@pytest.mark.parametrize("memory_options", [False, True], ids=["standard-loss", "chunked-loss-tiled-mlp"])
def test_trainer_with_callback_matches_one_process(tmp_path, memory_options):
    from transformers import LlamaForCausalLM

    launch(_train, 2, str(tmp_path), memory_options)
    got = torch.load(tmp_path / "result.pt")
    ref_losses, ref_eval, ref_state = reference()
    # logged every 2 steps, and at the last step (forced by the callback so that the Trainer's
    # final train_loss is averaged over processes)
    expected = [(ref_losses[0] + ref_losses[1]) / 2, ref_losses[2]]
    assert len(got["losses"]) == len(expected)
    for a, b in zip(got["losses"] + [got["train_loss"]], expected + [sum(ref_losses) / STEPS]):
        assert abs(a - b) <= 1e-5 * b, f"logged loss {a} vs {b}"
    assert abs(got["eval_loss"] - ref_eval) <= 1e-5 * ref_eval, (got["eval_loss"], ref_eval)
    for name, ref in ref_state.items():
        err = ((got["state"][name] - ref).norm() / ref.norm()).item()
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"
        assert torch.equal(got["resumed"][name], got["state"][name]), f"resumed {name}"
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "checkpoint-2")
    assert loaded.config._attn_implementation != "hf_ring_attention"
    loaded(input_ids=torch.zeros(1, 5, dtype=torch.long))
