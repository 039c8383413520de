"""Helpers shared by the benchmark scripts: machine description, timing, tables, JSON output,
packed test documents and a gloo process launcher.

Nothing here keeps state between calls; every script imports what it needs::

    from common import machine_info, print_table, time_call, write_json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import types
from datetime import timedelta
from typing import Callable, Sequence

import torch


# ------------------------------------------------------------------------------ arguments
def parse_sizes(text: str) -> list[int]:
    """``"2K,4K,8192"`` -> ``[2048, 4096, 8192]`` (``K`` = 1024). For argparse ``type=``."""
    sizes = []
    for item in text.split(","):
        item = item.strip().upper()
        if not item:
            continue
        scale = 1024 if item.endswith("K") else 1
        try:
            value = int(item.rstrip("K")) * scale
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 2K,4096, got {text!r}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
        sizes.append(value)
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected at least one size, got {text!r}")
    return sizes


def parse_names(text: str) -> list[str]:
    """``"zigzag, striped"`` -> ``["zigzag", "striped"]``. For argparse ``type=``."""
    return [name.strip() for name in text.split(",") if name.strip()]


def size_label(n: int) -> str:
    """2048 -> "2K", 3000 -> "3000"."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be one of {sorted(DTYPES)}, got {text!r}")
    return DTYPES[text]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(device, backend: str | None = None, threads: int | None = None) -> dict:
    """What the numbers were measured on: device name, CPU, torch version, backend, date and
    the command line that produced them."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_model()
    return {
        "device": str(device),
        "device_name": name,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "backend": backend,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", *sys.argv]),
    }


def print_machine(info: dict) -> None:
    cores = f", {info['cpu_cores']} cores" if info["device"] == "cpu" else ""
    print(
        f"machine: {info['device_name']} ({info['device']}{cores}), torch {info['torch']}, "
        f"backend {info['backend']}, {info['torch_threads']} torch thread(s), {info['date']}",
        flush=True,
    )


# -------------------------------------------------------------------------------- timing
def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_samples(fn: Callable[[], object], device, *, warmup: int = 1, repeats: int = 3,
                 before: Callable[[], object] | None = None) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn()`` in seconds: CUDA events on a GPU,
    ``time.perf_counter`` on CPU, after ``warmup`` untimed calls. ``before()`` (untimed) runs
    ahead of every call, e.g. a barrier that starts all ranks together."""
    device = torch.device(device)
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        if device.type == "cuda":
            synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def time_call(fn: Callable[[], object], device, *, warmup: int = 1, repeats: int = 3,
              before: Callable[[], object] | None = None) -> float:
    """Median of :func:`time_samples`, in seconds."""
    return statistics.median(time_samples(fn, device, warmup=warmup, repeats=repeats, before=before))


def balance(times: Sequence[float]) -> float:
    """Slowest / mean: 1.0 when every rank has the same work."""
    return max(times) / (sum(times) / len(times))


# ----------------------------------------------------------------------------- documents
def packed_lengths(total: int, multiple: int, seed: int = 0) -> list[int]:
    """Document lengths of mixed sizes (log-uniform, from ``total / 64`` up to ``total / 2``),
    each a multiple of ``multiple``, adding up to ``total`` (itself a multiple of ``multiple``)."""
    if total % multiple:
        raise ValueError(f"total={total} must be a multiple of {multiple}")
    gen = torch.Generator().manual_seed(seed)
    units, lengths = total // multiple, []
    lo, hi = max(1, units // 64), max(1, units // 2)
    while units > 0:
        u = torch.empty(()).uniform_(0.0, 1.0, generator=gen).item()
        n = max(1, round(lo * (hi / lo) ** u))
        n = min(n, units)
        lengths.append(n * multiple)
        units -= n
    return lengths


def gathering(kernel):
    """``kernel`` without its ``empty_sequences`` declaration: the ring then gathers the rows of
    every call that are not one range, instead of reading ranges with the gaps as empty sequences
    (``RingPlan.device_calls``). For timing and checking the two forms side by side."""
    return types.SimpleNamespace(name=kernel.name, check=kernel.check, forward=kernel.forward,
                                 backward=kernel.backward, empty_sequences=False)


def cu_seqlens(lengths: Sequence[int], device=None) -> torch.Tensor:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device)


def attention_flops(lengths: Sequence[int], heads: int, head_dim: int, causal: bool = True) -> float:
    """Forward FLOPs of attention over documents: 4 * L^2 * H * D each, halved when causal."""
    per_doc = 2.0 if causal else 4.0
    return sum(per_doc * n * n * heads * head_dim for n in lengths)


# ---------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_entry(rank: int, world_size: int, port: int, fn, args, out_dir: str, threads: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    if world_size > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(minutes=10),
        )
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, threads: int = 1) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes joined by gloo (none
    for a world size of 1) with ``threads`` torch threads each, and return every rank's result
    (which must be JSON-serialisable). Fails if any rank fails. ``fn`` must be a module-level
    function."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_gloo_entry, args=(world_size, free_port(), fn, args, out_dir, threads),
                 nprocs=world_size, join=True)
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                results.append(json.load(f))
    return results


# -------------------------------------------------------------------------------- output
def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """Print ``rows`` as a Markdown table; ``columns`` are (key, header, format spec)."""
    cells = [[_cell(row.get(key), spec) for key, _, spec in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(x.rjust(w) for x, w in zip(c, widths)) + " |")
    sys.stdout.flush()


def _cell(value, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return " ".join(_cell(v, spec) for v in value)
    return format(value, spec) if spec else str(value)


def write_json(path: str | None, payload: dict) -> None:
    """Write ``payload`` to ``path`` as indented JSON (nothing if ``path`` is None)."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}", flush=True)
