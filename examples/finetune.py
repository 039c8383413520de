"""Long-context fine-tuning with ring attention (context parallelism) under 🤗 Accelerate.

With no arguments it trains a small Llama, built from a config, on a synthetic long-context task
that needs the whole context (passkey retrieval: five digits hidden at a random depth of the
filler must be recalled at the end; training rows pack documents of mixed lengths up to
--seq-len), evaluates retrieval on held-out documents of the full --seq-len, prints peak memory
per rank, and saves a checkpoint that ``from_pretrained`` loads:

    accelerate launch --multi_gpu --num_processes 2 examples/finetune.py          # CPU or 2 GPUs

(On a machine without GPUs the processes run on CPU with gloo. ``accelerate launch --cpu``
starts a single process whatever --num_processes says, so it is not the way to run several.)

For real runs, name a model and data:

    accelerate launch --multi_gpu --num_processes 8 examples/finetune.py \\
        --model meta-llama/Llama-3.2-1B --dataset my_corpus.jsonl --seq-len 65536 --cp-size 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, get_scheduler

from hf_ring_attention.accelerate import ContextParallelPlugin

# --------------------------------------------------------------------- passkey retrieval
# Token ids of the synthetic task. The five-digit key is hidden in random filler as five tokens
# "slot i holds digit d"; the question at the end reads "? K1 d1 K2 d2 ... K5 d5" and each d_i,
# predicted at K_i, must be fetched from wherever the key sits: a long-range lookup.
PAD, BOS, QUESTION = 0, 1, 2
SLOTS = list(range(3, 8))  # K1..K5
DIGITS = list(range(8, 18))  # 0..9
KEY_BASE = 18  # token KEY_BASE + 10 * i + d: "slot i holds digit d"
FILLER = list(range(68, 128))
VOCAB_SIZE = 128


def passkey_example(seq_len: int, seed: int) -> dict:
    """One example of ``seq_len`` tokens, with ``labels`` on the five answer digits only."""
    rng = random.Random(seed)
    digits = [rng.randrange(10) for _ in SLOTS]
    key = [KEY_BASE + 10 * i + d for i, d in enumerate(digits)]
    question = [QUESTION] + [t for slot, d in zip(SLOTS, digits) for t in (slot, DIGITS[d])]
    n_filler = seq_len - 1 - len(key) - len(question)
    if n_filler < 0:
        raise ValueError(f"--seq-len must be at least {seq_len - n_filler} for the passkey task")
    filler = [rng.choice(FILLER) for _ in range(n_filler)]
    depth = rng.randint(0, n_filler)
    ids = [BOS] + filler[:depth] + key + filler[depth:] + question
    labels = [-100] * (len(ids) - 10) + [t if i % 2 else -100 for i, t in enumerate(question[1:])]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def passkey_row(seq_len: int, seed: int, shortest: int = 32) -> dict:
    """``seq_len`` tokens packed with passkey documents of log-uniform lengths between
    ``shortest`` and ``seq_len`` (position_ids restart at each document): the short ones teach
    the lookup quickly, the long ones make it long-range."""
    rng = random.Random(seed)
    ids, labels, positions, left = [], [], [], seq_len
    while left:
        n = min(left, int(math.exp(rng.uniform(math.log(shortest), math.log(seq_len)))))
        if left - n < shortest:
            n = left
        doc = passkey_example(n, rng.randrange(1 << 30))
        ids.append(doc["input_ids"])
        labels.append(doc["labels"])
        positions.append(torch.arange(n))
        left -= n
    return {"input_ids": torch.cat(ids), "labels": torch.cat(labels), "position_ids": torch.cat(positions)}


class PasskeyDataset(torch.utils.data.Dataset):
    """Training rows of packed documents (``packed``), or single documents of ``seq_len``."""

    def __init__(self, size: int, seq_len: int, seed: int, packed: bool):
        self.size, self.seq_len, self.seed, self.packed = size, seq_len, seed, packed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        make = passkey_row if self.packed else passkey_example
        return make(self.seq_len, self.seed * 1_000_003 + i)


# ------------------------------------------------------------------------- real text
def load_documents(name: str, text_field: str) -> list[str]:
    """Documents from local .jsonl/.json (one object per line), .txt files (one document each),
    or a 🤗 datasets name (needs ``pip install datasets``)."""
    paths = [Path(p) for p in name.split(",")]
    if all(p.exists() for p in paths):
        docs = []
        for p in paths:
            if p.suffix in (".jsonl", ".json"):
                docs += [json.loads(line)[text_field] for line in p.read_text().splitlines() if line.strip()]
            else:
                docs.append(p.read_text())
        return docs
    try:
        import datasets
    except ImportError:
        sys.exit(f"--dataset {name!r} is not a local file; loading it from the Hub needs `pip install datasets`")
    return list(datasets.load_dataset(name, split="train")[text_field])


def packed_examples(docs: list[str], tokenizer, seq_len: int) -> list[dict]:
    """Tokenize and pack documents into rows of ``seq_len`` tokens; position_ids restart at each
    document, so attention never crosses documents (ring attention honours the packing)."""
    ids, pos = [], []
    for doc in docs:
        tokens = tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
        ids += tokens
        pos += list(range(len(tokens)))
    rows = []
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        # a row may start inside a document: its positions then continue the document's (rotary
        # embeddings only see differences) and the row start is a document start for attention
        row = torch.tensor(ids[start:start + seq_len])
        rows.append({"input_ids": row, "position_ids": torch.tensor(pos[start:start + seq_len]), "labels": row.clone()})
    if not rows:
        sys.exit(f"the dataset has {len(ids)} tokens, fewer than one row of --seq-len {seq_len}")
    return rows


def collate(features):
    return {k: torch.stack([f[k] for f in features]) for k in features[0]}


# ------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model name or path for from_pretrained (default: a small Llama built from a config, for the passkey task)")
    p.add_argument("--dataset", default=None, help="local .jsonl/.txt files (comma-separated) or a 🤗 datasets name (default: synthetic passkey retrieval)")
    p.add_argument("--text-field", default="text", help="text field of JSONL / datasets records (default: text)")
    p.add_argument("--seq-len", type=int, default=3072, help="tokens per sequence (default: 3072)")
    p.add_argument("--cp-size", type=int, default=None, help="ranks per context-parallel group (default: all processes, or HF_RING_ATTENTION_CP_SIZE)")
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous", "striped"], help="how sequences are split (default: zigzag)")
    p.add_argument("--backend", default=None, choices=["flash_attn", "torch", "cpu"], help="attention kernels (default: automatic)")
    p.add_argument("--chunked-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="compute the loss over chunks of tokens, never holding the [tokens, vocab] logits (default: on)")
    p.add_argument("--tiled-mlp", action="store_true", help="run each layer's MLP over chunks of tokens under recomputation")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per data-parallel replica per micro-step (default: 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: 1)")
    p.add_argument("--max-steps", type=int, default=300, help="optimizer steps (default: 300)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps (default: 10)")
    p.add_argument("--eval-examples", type=int, default=32, help="held-out examples to evaluate (default: 32)")
    p.add_argument("--output-dir", default="outputs/finetune", help="where the checkpoint and metrics.json go (default: outputs/finetune)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if GPUs are present")
    return p.parse_args(argv)


def refuse_single_process_cpu_launch():
    """`accelerate launch --cpu --num_processes N` sets MASTER_PORT but starts one process."""
    if os.environ.get("ACCELERATE_USE_CPU") and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        sys.exit(
            "accelerate launch --cpu starts a single process whatever --num_processes says. To run "
            "several CPU processes use: accelerate launch --multi_gpu --num_processes N examples/finetune.py "
            "(without GPUs the processes run on CPU with gloo)."
        )


def build_model(args):
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa")
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len,
                         rope_theta=100_000.0, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=QUESTION)
    return LlamaForCausalLM(config)


def datasets_for(args):
    if args.dataset is None:
        if args.model:
            sys.exit("the synthetic passkey task uses its own small model; drop --model or give --dataset")
        return (PasskeyDataset(100_000, args.seq_len, seed=1, packed=True),
                PasskeyDataset(args.eval_examples, args.seq_len, seed=2, packed=False))
    if not args.model:
        sys.exit("--dataset needs --model (for its tokenizer and weights)")
    from transformers import AutoTokenizer

    rows = packed_examples(load_documents(args.dataset, args.text_field), AutoTokenizer.from_pretrained(args.model), args.seq_len)
    n_eval = min(args.eval_examples, max(1, len(rows) // 10))
    return rows[n_eval:] or rows, rows[:n_eval]


@torch.no_grad()
def evaluate(model, loader, accelerator, cp_size):
    """Loss (mean over batches of each batch's token mean) and exact-match accuracy: the share
    of sequences whose labelled tokens are all predicted right."""
    model.eval()
    loss_sum, correct, total = 0.0, 0, 0
    for batch in loader:
        out = model(**batch)
        loss_sum += accelerator.reduce(out.loss.detach(), "mean").item()
        ring_batch = batch["ring_batch"]
        # gather predictions, not logits: [B, S] on every rank
        predicted = ring_batch.gather(out.logits.argmax(-1)[..., None])[..., 0]
        targets = ring_batch.gather(batch["shift_labels"][..., None], fill=-100)[..., 0]
        hit = (predicted == targets) | (targets == -100)
        correct += int(hit.all(-1).sum())
        total += hit.shape[0]
    model.train()
    # every rank of a context-parallel group counted its group's batch
    stats = accelerator.reduce(torch.tensor([correct, total], device=accelerator.device), "sum") // cp_size
    return loss_sum / max(len(loader), 1), int(stats[0]), int(stats[1])


def peak_memory_gib(accelerator) -> list[float]:
    if accelerator.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(accelerator.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    every = accelerator.gather(torch.tensor([float(peak)], device=accelerator.device))
    return [round(x / 2**30, 3) for x in every.tolist()]


def main(argv=None):
    args = parse_args(argv)
    refuse_single_process_cpu_launch()
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), gradient_accumulation_steps=args.grad_accum)
    set_seed(args.seed)  # the same data order on every rank of a context-parallel group
    cp = ContextParallelPlugin(cp_size=args.cp_size, layout=args.layout, backend=args.backend,
                               chunked_loss=args.chunked_loss, tiled_mlp=args.tiled_mlp)
    mesh = cp.setup(accelerator)
    train_set, eval_set = datasets_for(args)
    model = build_model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # accelerate advances a prepared scheduler once per data-parallel replica per optimizer step
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=args.warmup_steps * mesh.dp_size,
                              num_training_steps=args.max_steps * mesh.dp_size)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=args.batch_size, collate_fn=collate)
    model, optimizer, train_loader, eval_loader, scheduler = cp.prepare(
        accelerator, model, optimizer, train_loader, eval_loader, scheduler)
    accelerator.print(
        f"{accelerator.num_processes} processes on {accelerator.device.type}: {mesh.dp_size} data-parallel x "
        f"{mesh.cp_size} context-parallel, layout={args.layout}; {args.seq_len} tokens per sequence, "
        f"{args.seq_len // mesh.cp_size} per rank"
    )

    progress = tqdm(total=args.max_steps, desc="training", disable=not accelerator.is_main_process)
    step, running, last_loss, tokens, started = 0, 0.0, float("nan"), 0, time.perf_counter()
    model.train()
    while step < args.max_steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            # mean over processes, then over micro-steps: the exact token-mean loss of the step
            running += accelerator.reduce(loss.detach(), "mean").item() / args.grad_accum
            tokens += batch["ring_batch"].num_tokens * mesh.dp_size
            if accelerator.sync_gradients:
                step += 1
                rate = tokens / (time.perf_counter() - started)
                progress.set_postfix(loss=f"{running:.4f}", tok_s=f"{rate:,.0f}")
                progress.update()
                last_loss, running = running, 0.0
                if step >= args.max_steps:
                    break
    progress.close()
    train_time = time.perf_counter() - started

    eval_loss, correct, total = evaluate(model, eval_loader, accelerator, mesh.cp_size)
    memory = peak_memory_gib(accelerator)
    metrics = {"train_loss": last_loss, "eval_loss": eval_loss, "eval_accuracy": correct / max(total, 1),
               "eval_examples": total, "tokens_per_second": tokens / train_time, "train_seconds": train_time,
               "peak_memory_gib_per_rank": memory, "processes": accelerator.num_processes,
               "cp_size": mesh.cp_size, "seq_len": args.seq_len, "chunked_loss": args.chunked_loss,
               "tiled_mlp": args.tiled_mlp}
    accelerator.print(f"eval: loss {eval_loss:.4f}, exact-match accuracy {correct}/{total}")
    accelerator.print(f"peak memory per rank (GiB): {memory}")

    accelerator.wait_for_everyone()
    out_dir = Path(args.output_dir)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(out_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save, state_dict=accelerator.get_state_dict(model))
    if accelerator.is_main_process:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"saved {out_dir} (load with AutoModelForCausalLM.from_pretrained({str(out_dir)!r}))")
        print(json.dumps(metrics))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
