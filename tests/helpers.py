"""Shared test helpers: a float64 attention reference, error metrics and a gloo spawner."""

from __future__ import annotations

import math
import os
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Tolerances on the relative error ||x - ref|| / ||ref|| against a float64 reference computed
# from the same (rounded) inputs. float32: the kernels accumulate in float32 and the ring merges
# in float32, so a few ulps (1e-7) times a modest growth stays far below 1e-5. bfloat16: outputs
# of every block are rounded to 8 mantissa bits (4e-3) before the float32 merge.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, with ||ref|| floored at an RMS of 0.1 (the test inputs are N(0, 1)):
    references that are exactly zero (dq and dk for a window of 1, where every softmax row has
    one entry) then compare absolutely, at a scale far below that of the inputs."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(0.1 * ref.numel() ** 0.5)).item()


def assert_close(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    err = rel_err(x, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3e} > {TOL[dtype]:.0e} ({dtype})"


def true_mask(bounds, causal=True, window=None, seqused=None) -> torch.Tensor:
    """[T, T] bool: may global query i attend to global key j (the specification)."""
    total = bounds[-1]
    doc = torch.empty(total, dtype=torch.long)
    pos = torch.empty(total, dtype=torch.long)
    real = torch.ones(total, dtype=torch.bool)
    for d, (a, b) in enumerate(zip(bounds, bounds[1:])):
        doc[a:b] = d
        pos[a:b] = torch.arange(b - a)
        if seqused is not None:
            real[a + int(seqused[d]):b] = False
    i, j = pos[:, None], pos[None, :]
    mask = (doc[:, None] == doc[None, :]) & real[:, None] & real[None, :]
    if causal:
        mask &= j <= i
    if window is not None:
        mask &= i - j < window
        if not causal:
            mask &= j - i < window
    return mask


def attention_reference(q, k, v, bounds, causal=True, window=None, seqused=None, scale=None, softcap=None,
                        sinks=None):
    """Full attention in float64 on unsharded packed tensors ``[T, H, D]`` (GQA by repeat).
    Rows that see no key (padding) give 0. ``softcap``: scores ``softcap * tanh(s / softcap)``
    (transformers' Gemma 2). ``sinks [H]``: one more logit per head in every row's softmax, with
    no value (transformers' GPT-OSS), differentiable."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~true_mask(bounds, causal, window, seqused), -math.inf)
    if sinks is None:
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    else:
        sink = sinks.double()[:, None, None].expand(-1, s.shape[1], 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("hqk,khd->qhd", p, v)


def random_bounds(gen: torch.Generator, multiple: int, docs: int, max_chunks: int = 4) -> list[int]:
    """Document boundaries with lengths that are random multiples of ``multiple`` (>= 1 chunk)."""
    lengths = torch.randint(1, max_chunks + 1, (docs,), generator=gen) * multiple
    return [0] + torch.cumsum(lengths, 0).tolist()


# --------------------------------------------------------------------------- multi-process
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a short timeout turns a hang (one rank raising, the others waiting) into a failure
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # nobody tears the group down while a peer still talks to it
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
    _exit_cleanly()


def spawn(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; fails if any rank
    fails. ``fn`` must be a module-level function."""
    mp.spawn(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def _launched(rank, world_size, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
        if dist.is_initialized():
            dist.barrier()  # nobody tears the group down while a peer still talks to it
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():  # exiting with a live gloo group can abort the process
            dist.destroy_process_group()
    _exit_cleanly()


def _exit_cleanly():
    """End a worker that succeeded without interpreter teardown: a thread left behind by gloo
    or accelerate, destroyed at exit, occasionally aborts the process ("terminate called
    without an active exception") after all of its work passed."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn, world_size: int, *args) -> None:
    """Like ``accelerate launch``/``torchrun``: ``world_size`` processes with the rank variables
    set and no process group yet (``Accelerator(cpu=True)`` creates it)."""
    mp.spawn(_launched, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
