"""TRL's SFTTrainer with RingAttentionCallback on 2 processes (cp=2), without replacing TRL's
data collator, in the three ways TRL feeds data: packing (BFD) and padding_free (TRL's padding-free
collator, with cu_seq_lens_q/k, max_length_q/k and seq_idx beside restarting position_ids), and
padded batches. The logged losses, token counts, entropy and token accuracy equal those of one
process training without the ring, and so does the evaluation loss and metrics."""

import datasets  # noqa: F401  (the test extra installs it: a missing package fails, never skips)
import pytest
import torch
import trl  # noqa: F401  (likewise)

from helpers import launch
from models import VOCAB, tiny_model

pytestmark = pytest.mark.distributed

STEPS = 3
MODES = ("packing", "padding_free", "padded")


def tokenizer():
    """A word-level tokenizer built offline: words w0..w92 and three special tokens (VOCAB ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def dataset(seed=0):
    """Documents of 2 to 20 words (awkward lengths, some tiny)."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 21, (20,), generator=gen).tolist()
    texts = [" ".join(f"w{int(w)}" for w in torch.randint(0, VOCAB - 3, (n,), generator=gen)) for n in lengths]
    return Dataset.from_dict({"text": texts})


def _train(rank, world_size, out_dir, ring):
    from trl import SFTConfig, SFTTrainer

    from hf_ring_attention.trainer import RingAttentionCallback

    eval_losses = []

    class SequentialSFTTrainer(SFTTrainer):  # both runs read the data in order
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def prediction_step(self, *args, **kwargs):  # each evaluation batch's loss, as reported
            loss, *rest = super().prediction_step(*args, **kwargs)
            eval_losses.append(loss.item())
            return (loss, *rest)

    logs = {}
    for mode in MODES:
        args = SFTConfig(
            output_dir=f"{out_dir}/{mode}", packing=mode == "packing", padding_free=mode == "padding_free",
            max_length=None if mode == "padding_free" else 24,
            per_device_train_batch_size=2, per_device_eval_batch_size=3, max_steps=STEPS, learning_rate=0.05, optim="sgd",
            lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
        )
        callbacks = [RingAttentionCallback(cp_size=2)] if ring else []
        trainer = SequentialSFTTrainer(model=tiny_model("llama"), args=args, train_dataset=dataset(),
                                       eval_dataset=dataset(seed=1), processing_class=tokenizer(),
                                       callbacks=callbacks)
        trainer.train()
        logs[mode] = [log for log in trainer.state.log_history if "loss" in log]
        eval_losses.clear()
        metrics = trainer.evaluate()
        # TRL's evaluation metrics, and the loss of every evaluation batch (the last one partial)
        logs[mode].append({**{k.removeprefix("eval_"): v for k, v in metrics.items()}, "batch_losses": list(eval_losses)})
    if rank == 0:
        torch.save(logs, f"{out_dir}/logs.pt")


def test_sft_trainer_with_callback_matches_one_process(tmp_path):
    launch(_train, 2, str(tmp_path / "ring"), True)
    launch(_train, 1, str(tmp_path / "one"), False)
    got, expected = torch.load(tmp_path / "ring" / "logs.pt"), torch.load(tmp_path / "one" / "logs.pt")
    for mode in MODES:
        assert len(got[mode]) == len(expected[mode]) == STEPS + 1, mode
        for (a, b), what in zip(zip(got[mode], expected[mode]), [*(f"{mode} step {s}" for s in range(STEPS)), f"{mode} eval"]):
            # float32 on both sides; the ring's rounding differs from SDPA's by a few ulps
            keys = ("entropy", "mean_token_accuracy") if what.endswith("eval") else ("loss", "entropy", "mean_token_accuracy")
            for key in keys:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), f"{what} {key}: {a[key]} vs {b[key]}"
            if what.endswith("eval"):
                # every rank reports its group's token mean for every batch, the partial last one too
                # (the Trainer's average of the batches then weights that one by the rows it believes
                # remain over all processes, which differs with context parallelism: see the README)
                assert len(a["batch_losses"]) == len(b["batch_losses"]) >= 2, what
                for i, (x, y) in enumerate(zip(a["batch_losses"], b["batch_losses"])):
                    assert abs(x - y) <= 1e-5 * abs(y), f"{what} batch {i} loss: {x} vs {y}"
            # real tokens only: the layout padding the ring adds (to multiples of 4) is not counted
            assert a["num_tokens"] == b["num_tokens"], f"{what} num_tokens: {a['num_tokens']} vs {b['num_tokens']}"
