"""Checkpoints and progress of examples/finetune.py: a job that runs for hours saves its state
every --save-steps steps, resumes bit for bit, and reports progress readably on a terminal or in
a log file."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

from tqdm.auto import tqdm

from finetune_data import InputError


# ------------------------------------------------------------------------ checkpoints
JOB_FILE = "job.json"  # in every checkpoint: where the run stands and the arguments that define it
# Arguments a resumed run must share with its checkpoint: they fix the model, the data order, the
# batches and the learning-rate schedule.
RUN_ARGS = ("model", "dataset", "text_field", "seq_len", "batch_size", "grad_accum", "max_steps",
            "lr", "warmup_steps", "seed")


def checkpoints(out_dir: Path) -> list[Path]:
    """The complete checkpoints in ``out_dir``, oldest first."""
    found = [(int(m[1]), p) for p in out_dir.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / JOB_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(args) -> Path | None:
    """The checkpoint ``--resume`` names (None without it)."""
    if args.resume is None:
        return None
    out = Path(args.output_dir)
    if args.resume == "latest":
        found = checkpoints(out) if out.is_dir() else []
        if not found:
            raise InputError(f"--resume latest: no checkpoint in {str(out)!r} (they are saved as "
                             f"checkpoint-STEP every --save-steps steps)")
        return found[-1]
    path = Path(args.resume).expanduser()
    if not (path / JOB_FILE).is_file():
        what = "no such folder" if not path.exists() else f"not a checkpoint of this script (no {JOB_FILE})"
        raise InputError(f"--resume {args.resume!r}: {what}; give a checkpoint-STEP folder or 'latest'")
    return path


def check_resume(args, checkpoint: Path, processes: int, cp_size: int) -> dict:
    """The checkpoint's job state, after checking that this run is the one it saved."""
    job = json.loads((checkpoint / JOB_FILE).read_text())
    differ = [f"--{k.replace('_', '-')} {job['args'][k]!r} (now {getattr(args, k)!r})"
              for k in RUN_ARGS if job["args"][k] != getattr(args, k)]
    if (job["processes"], job["cp_size"]) != (processes, cp_size):
        # the processes fix how batches are dealt, and each restores its own random states
        differ.append(f"{job['processes']} processes with --cp-size {job['cp_size']} "
                      f"(now {processes} with {cp_size})")
    if differ:
        raise InputError(f"--resume {str(checkpoint)!r} was saved by a run with " + "; ".join(differ)
                         + ". Resume with the same values, or start a new run.")
    return job


def check_output_dir(args, checkpoint: Path | None) -> None:
    """Refuse to write into a non-empty --output-dir without --overwrite, unless resuming a run
    saved there."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output-dir {str(out)!r} is a file")
    inside = checkpoint is not None and checkpoint.resolve().parent == out.resolve()
    if args.overwrite and inside:
        raise InputError(f"--overwrite would delete the checkpoint {str(checkpoint)!r} that --resume "
                         f"continues from; drop one of them")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not args.overwrite and not inside:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise InputError(f"--output-dir {str(out)!r} is not empty ({shown}); pass --overwrite to "
                         f"train there anyway (its checkpoints and logs are deleted first), "
                         f"--resume latest to continue the run saved there, or another --output-dir")


def clear_output_dir(out: Path) -> None:
    """What an earlier run left that this one would mix with: checkpoints and logs."""
    for path in out.glob("checkpoint-*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in ("train_log.jsonl", "metrics.json"):
        (out / name).unlink(missing_ok=True)


def save_checkpoint(accelerator, out: Path, job: dict, keep: int | None) -> Path:
    """``accelerator.save_state`` (model, optimizer, scheduler, every process's random states)
    plus ``job.json``, written as ``checkpoint-STEP.partial`` and renamed when complete, so that
    a crash while saving never leaves a checkpoint that --resume would pick."""
    final = out / f"checkpoint-{job['position']['step']}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / JOB_FILE).write_text(json.dumps(job, indent=2))
        if final.exists():  # saved before by the run this one resumes
            shutil.rmtree(final)
        partial.rename(final)
        if keep is not None:
            prune_checkpoints(out, keep)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(out: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints in ``out``."""
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old)


# --------------------------------------------------------------------------- progress
class Progress:
    """Training progress on the main process: a tqdm bar when stderr is a terminal; otherwise
    (a log file, a pipe) a plain line on stdout every ``every`` steps and at the last, with the
    mean loss since the previous line, since a bar's carriage returns would make one endless line."""

    def __init__(self, total: int, initial: int, every: int, enabled: bool, terminal: bool | None = None):
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.total, self.every, self.enabled, self.initial = total, every, enabled, initial
        self.bar = tqdm(total=total, initial=initial, desc="training") if enabled and terminal else None
        self.losses, self.started = [], time.perf_counter()

    def step(self, step: int, loss: float, tokens_per_second: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:,.0f}")
            self.bar.update()
            return
        self.losses.append(loss)
        if self.enabled and (step % self.every == 0 or step == self.total):
            elapsed = time.perf_counter() - self.started
            left = elapsed / max(step - self.initial, 1) * (self.total - step)
            print(f"step {step}/{self.total}  loss {sum(self.losses) / len(self.losses):.4f}  "
                  f"{tokens_per_second:,.0f} tokens/s  elapsed {_clock(elapsed)}  left {_clock(left)}", flush=True)
            self.losses = []

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        elif self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))
