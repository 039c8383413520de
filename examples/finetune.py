"""Long-context fine-tuning with ring attention (context parallelism) under 🤗 Accelerate.

With no arguments it trains a small Llama, built from a config, on a synthetic long-context task
that needs the whole context (passkey retrieval: five digits hidden at a random depth of the
filler must be recalled at the end; training rows pack documents of mixed lengths up to
--seq-len), evaluates retrieval on held-out documents of the full --seq-len, prints peak memory
per rank, and saves a checkpoint that ``from_pretrained`` loads:

    accelerate launch --multi_gpu --num_processes 2 examples/finetune.py          # CPU or 2 GPUs

(On a machine without GPUs the processes run on CPU with gloo. ``accelerate launch --cpu``
starts a single process whatever --num_processes says, so it is not the way to run several.)

For real runs, name a model and data (evaluation then reports loss and perplexity on held-out
rows, and the tokenizer is saved beside the weights):

    accelerate launch --multi_gpu --num_processes 8 examples/finetune.py \\
        --model meta-llama/Llama-3.2-1B --dataset my_corpus.jsonl --seq-len 65536 --cp-size 4 \\
        --save-steps 200

A run that lasts hours: ``--save-steps N`` saves a checkpoint every N steps (accelerate's
``save_state``: model, optimizer, scheduler and every process's random states, plus job.json: the
data position and the arguments); after a failure, the same command with ``--resume latest``
continues bit for bit. A process that stops answering makes the others fail after ``--timeout``
seconds (default 600). Progress goes to a bar on a terminal and to a plain line every
``--log-steps`` steps otherwise; every step's loss goes to OUTPUT_DIR/train_log.jsonl.

For models whose weights, gradients and optimizer states do not fit on one device, add --fsdp
(FSDP2 over all processes), or launch with accelerate's FSDP2 config instead (GPUs only):

    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/finetune.py --model ... --cp-size 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, get_scheduler
from transformers.utils import logging as hf_logging

from finetune_data import (BOS, PAD, PASSKEY_MIN_LEN, QUESTION, VOCAB_SIZE, EpochSampler, InputError,
                           PasskeyDataset, collate, load_documents, packed_examples)
from finetune_job import (RUN_ARGS, Progress, check_output_dir, check_resume, checkpoints, clear_output_dir,
                          find_checkpoint, prune_checkpoints, save_checkpoint)
from hf_ring_attention.accelerate import ContextParallelPlugin
from hf_ring_attention.cp import resolve_cp_size

# the script's entry points, and the data and job helpers it re-exports for examples/trainer.py and tests
__all__ = ["main", "parse_args", "build_model", "refuse_single_process_cpu_launch", "InputError",
           "PasskeyDataset", "EpochSampler", "collate", "load_documents", "packed_examples", "RUN_ARGS",
           "Progress", "checkpoints", "check_output_dir", "check_resume", "find_checkpoint", "prune_checkpoints"]

# ------------------------------------------------------------------------------ errors
def reports_errors() -> bool:
    """Whether this process prints what every process finds alike: the first process of its
    machine (``LOCAL_RANK`` 0; a plain ``python`` run is one)."""
    return os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its messages (usage, errors, --help) printed by one process per machine:
    under ``accelerate launch`` every process parses the same arguments."""

    def _print_message(self, message, file=None):
        if reports_errors():
            super()._print_message(message, file)

    def fail(self, message: str):
        """Exit with status 2 and ``finetune.py: error: message`` (no usage: for data errors)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


# ------------------------------------------------------------------------- arguments
def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model name or path for from_pretrained (default: a small Llama built from a config, for the passkey task)")
    p.add_argument("--dataset", default=None, help="local .jsonl/.json/.txt files (comma-separated) or a 🤗 datasets name (default: synthetic passkey retrieval)")
    p.add_argument("--text-field", default="text", help="text field of JSON / datasets records (default: text)")
    p.add_argument("--seq-len", type=int, default=3072, help="tokens per sequence (default: 3072)")
    p.add_argument("--cp-size", type=int, default=None, help="ranks per context-parallel group (default: all processes, or HF_RING_ATTENTION_CP_SIZE)")
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous", "striped"], help="how sequences are split (default: zigzag)")
    p.add_argument("--backend", default=None, choices=["flash_attn_4", "flash_attn", "torch_flash", "cpu"], help="attention kernels (default: automatic)")
    p.add_argument("--chunked-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="compute the loss over chunks of tokens, never holding the [tokens, vocab] logits (default: on)")
    p.add_argument("--tiled-mlp", action="store_true", help="run each layer's MLP over chunks of tokens under recomputation")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per data-parallel replica per micro-step (default: 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: 1)")
    p.add_argument("--max-steps", type=int, default=300, help="optimizer steps (default: 300)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear warm-up steps (default: 10)")
    p.add_argument("--eval-examples", type=int, default=32, help="held-out examples to evaluate (default: 32)")
    p.add_argument("--output-dir", default="outputs/finetune", help="where the model, checkpoints, train_log.jsonl and metrics.json go (default: outputs/finetune)")
    p.add_argument("--overwrite", action="store_true", help="train in a non-empty --output-dir, deleting its checkpoints and logs first")
    p.add_argument("--save-steps", type=int, default=0, help="save a checkpoint (model, optimizer, scheduler, random states, data position) every N steps, as OUTPUT_DIR/checkpoint-STEP (default: 0, none)")
    p.add_argument("--save-total-limit", type=int, default=None, help="keep only the newest N checkpoints (default: keep all)")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT", help="continue the run saved in a checkpoint folder, or 'latest' (the newest in --output-dir); other arguments must match the run's")
    p.add_argument("--timeout", type=float, default=600, metavar="SECONDS", help="how long a process waits for the others in a collective before failing with an error (default: 600)")
    p.add_argument("--log-steps", type=int, default=10, help="when output is not a terminal, print a progress line every N steps (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if GPUs are present")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None,
                   help="autocast for the forward (default: bf16 on GPUs, whose flash-attention kernels take "
                        "16-bit inputs; no on CPU)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer states over all processes with FSDP2 (fully_shard per decoder layer and at the root); not with an accelerate FSDP config, which shards the model itself")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args, world_size: int) -> int:
    """Refuse arguments that cannot work, before any process waits for another. Returns the
    context-parallel size."""
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_examples", "log_steps"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.save_steps < 0 or args.warmup_steps < 0:
        raise InputError(f"--save-steps and --warmup-steps must be >= 0, got {args.save_steps} and {args.warmup_steps}")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        raise InputError(f"--save-total-limit must be at least 1, got {args.save_total_limit}")
    if not args.timeout > 0:
        raise InputError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.dataset is None and args.model:
        raise InputError("the synthetic passkey task uses its own small model; drop --model or give --dataset")
    if args.dataset is not None and not args.model:
        raise InputError("--dataset needs --model (for its tokenizer and weights)")
    if args.fsdp and (args.save_steps or args.resume):
        raise InputError("--save-steps and --resume are not supported with --fsdp yet (the checkpoint "
                         "of a model sharded with fully_shard is untested); drop one of them")
    if args.dataset is None and args.seq_len < PASSKEY_MIN_LEN:
        raise InputError(f"--seq-len must be at least {PASSKEY_MIN_LEN} for the passkey task, got {args.seq_len}")
    try:
        return resolve_cp_size(args.cp_size, world_size)
    except ValueError as exc:
        raise InputError(str(exc).replace("cp_size=", "--cp-size ")) from None


# ------------------------------------------------------------------------------ main
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
    """(training rows, evaluation rows, tokenizer or None)."""
    if args.dataset is None:
        return (PasskeyDataset(100_000, args.seq_len, seed=1, packed=True),
                PasskeyDataset(args.eval_examples, args.seq_len, seed=2, packed=False), None)
    from transformers import AutoTokenizer

    docs = load_documents(args.dataset, args.text_field)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except OSError as exc:
        raise InputError(f"--model {args.model!r}: no tokenizer could be loaded ({exc})") from None
    rows = packed_examples(docs, tokenizer, args.seq_len)
    n_eval = min(args.eval_examples, max(1, len(rows) // 10))
    return rows[n_eval:] or rows, rows[:n_eval], tokenizer


def fully_shard_model(model, accelerator):
    """FSDP2 over all processes: each decoder layer, then the root (embeddings, norm, lm_head).
    The ranks of a context-parallel group hold different shards of the same replica."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full_state_dict(model) -> dict:
    """The gathered (unsharded) weights of a fully sharded model, on the main process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@torch.no_grad()
def evaluate(model, loader, accelerator, cp_size, exact_match: bool) -> dict:
    """The token-mean loss over the evaluation rows (and its perplexity), and with
    ``exact_match`` the share of rows whose labelled tokens are all predicted right."""
    model.eval()
    loss_sum, targets_sum, correct, total = 0.0, 0.0, 0, 0
    for batch in loader:
        out = model(**batch)
        # the loss is the token mean over the targets of all replicas: num_items_in_batch (given
        # per process) times the number of processes is their count
        targets = batch["num_items_in_batch"] * accelerator.num_processes
        loss_sum += accelerator.reduce(out.loss.detach(), "mean").item() * targets
        targets_sum += targets
        if exact_match:
            ring_batch = batch["ring_batch"]
            # gather predictions, not logits: [B, S] on every rank
            predicted = ring_batch.gather(out.logits.argmax(-1)[..., None])[..., 0]
            labels = ring_batch.gather(batch["shift_labels"][..., None], fill=-100)[..., 0]
            hit = (predicted == labels) | (labels == -100)
            correct += int(hit.all(-1).sum())
            total += hit.shape[0]
    model.train()
    loss = loss_sum / max(targets_sum, 1.0)
    if not exact_match:
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)),
                "eval_tokens": int(targets_sum), "eval_examples": len(loader.dataset)}
    # every rank of a context-parallel group counted its group's batch
    stats = accelerator.reduce(torch.tensor([correct, total], device=accelerator.device), "sum") // cp_size
    return {"eval_loss": loss, "eval_accuracy": int(stats[0]) / max(int(stats[1]), 1), "eval_examples": int(stats[1])}


def peak_memory_gib(accelerator) -> list[float]:
    if accelerator.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(accelerator.device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    every = accelerator.gather(torch.tensor([float(peak)], device=accelerator.device))
    return [round(x / 2**30, 3) for x in every.tolist()]


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    refuse_single_process_cpu_launch()
    if not sys.stderr.isatty():  # transformers' loading and saving bars, as one line each
        hf_logging.disable_progress_bar()
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    # Everything that can be wrong with the arguments, the data files or the output folder is
    # found here, alike on every process, before any process waits for another
    try:
        cp_size = check_args(args, processes)
        checkpoint = find_checkpoint(args)
        job = check_resume(args, checkpoint, processes, cp_size) if checkpoint else None
        check_output_dir(args, checkpoint)
        set_seed(args.seed)
        train_set, eval_set, tokenizer = datasets_for(args)
        model = build_model(args)
    except InputError as exc:
        parser.fail(str(exc))

    on_cpu = args.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=on_cpu, gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision or ("no" if on_cpu else "bf16"),
        # a process that stops answering makes the others fail after this long, with an error
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.timeout))])
    say = accelerator.print
    out_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        if args.overwrite:
            clear_output_dir(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    cp = ContextParallelPlugin(cp_size=args.cp_size, layout=args.layout, backend=args.backend,
                               chunked_loss=args.chunked_loss, tiled_mlp=args.tiled_mlp)
    mesh = cp.setup(accelerator)
    if args.fsdp:
        model = fully_shard_model(model, accelerator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    # accelerate advances a prepared scheduler once per data-parallel replica per optimizer step
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=args.warmup_steps * mesh.dp_size,
                              num_training_steps=args.max_steps * mesh.dp_size)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, collate_fn=collate,
                                               sampler=EpochSampler(len(train_set), args.seed))
    eval_loader = torch.utils.data.DataLoader(eval_set, batch_size=args.batch_size, collate_fn=collate)
    model, optimizer, train_loader, eval_loader, scheduler = cp.prepare(
        accelerator, model, optimizer, train_loader, eval_loader, scheduler)
    say(f"{accelerator.num_processes} processes on {accelerator.device.type}: {mesh.dp_size} data-parallel x "
        f"{mesh.cp_size} context-parallel, layout={args.layout}; {args.seq_len} tokens per sequence, "
        f"{args.seq_len // mesh.cp_size} per rank", flush=True)

    # where the run stands: optimizer steps done, passes over the training rows, and micro-batches
    # of the current pass already used (on each process): exactly what resuming must skip
    position = {"step": 0, "epoch": 0, "batches": 0}
    log_path = out_dir / "train_log.jsonl"
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        position = dict(job["position"])
        if accelerator.is_main_process and log_path.exists():  # drop what the crashed run logged after it
            kept = [line for line in log_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= position["step"]]
            log_path.write_text("".join(line + "\n" for line in kept))
        say(f"resumed from {checkpoint} at step {position['step']}", flush=True)
    saved_args = {k: getattr(args, k) for k in RUN_ARGS}

    progress = Progress(args.max_steps, position["step"], args.log_steps, accelerator.is_main_process)
    steps_per_epoch_batches = len(train_loader)
    running, last_loss, lr, tokens, started = 0.0, float("nan"), float("nan"), 0, time.perf_counter()
    model.train()
    while position["step"] < args.max_steps:
        train_loader.set_epoch(position["epoch"])
        loader = train_loader.skip_first_batches(position["batches"]) if position["batches"] else train_loader
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            # mean over processes, then over micro-steps: the exact token-mean loss of the step
            running += accelerator.reduce(loss.detach(), "mean").item() / args.grad_accum
            tokens += batch["ring_batch"].num_tokens * mesh.dp_size
            position["batches"] += 1
            if position["batches"] == steps_per_epoch_batches:
                position["epoch"], position["batches"] = position["epoch"] + 1, 0
            if not accelerator.sync_gradients:
                continue
            position["step"] += 1
            last_loss, running = running, 0.0
            progress.step(position["step"], last_loss, tokens / (time.perf_counter() - started))
            if accelerator.is_main_process:
                with log_path.open("a") as log:
                    log.write(json.dumps({"step": position["step"], "loss": last_loss, "lr": lr}) + "\n")
            if args.save_steps and position["step"] % args.save_steps == 0:
                state = {"position": position, "args": saved_args, "processes": accelerator.num_processes,
                         "cp_size": mesh.cp_size}
                progress.write(f"saved {save_checkpoint(accelerator, out_dir, state, args.save_total_limit)}")
            if position["step"] >= args.max_steps:
                break
    progress.close()
    train_time = time.perf_counter() - started

    results = evaluate(model, eval_loader, accelerator, mesh.cp_size, exact_match=args.dataset is None)
    memory = peak_memory_gib(accelerator)
    metrics = {"train_loss": last_loss, **results, "tokens_per_second": tokens / train_time,
               "train_seconds": train_time, "peak_memory_gib_per_rank": memory,
               "processes": accelerator.num_processes, "cp_size": mesh.cp_size, "seq_len": args.seq_len,
               "chunked_loss": args.chunked_loss, "tiled_mlp": args.tiled_mlp}
    if args.dataset is None:
        say(f"eval: loss {results['eval_loss']:.4f}, exact-match accuracy "
            f"{round(results['eval_accuracy'] * results['eval_examples'])}/{results['eval_examples']}")
    else:
        say(f"eval: loss {results['eval_loss']:.4f}, perplexity {results['eval_perplexity']:.2f} "
            f"({results['eval_tokens']} tokens in {results['eval_examples']} held-out rows)")
    say(f"peak memory per rank (GiB): {memory}", flush=True)

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = full_state_dict(model) if args.fsdp else accelerator.get_state_dict(model)
    unwrapped.save_pretrained(out_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save, state_dict=state_dict)
    if accelerator.is_main_process:
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"saved {out_dir} (load with AutoModelForCausalLM.from_pretrained({str(out_dir)!r}))")
        print(json.dumps(metrics), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
