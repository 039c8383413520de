"""Checking that the ranks of a ring agree before it starts.

Every rank validates its own inputs, but some mistakes are invisible to one rank: ranks that were
given different document boundaries, head sizes or layouts each look fine alone, and then either
compute a silently wrong result or leave one rank waiting for a message that never comes. So the
first time a plan is used, the ranks all-gather a short digest of everything the ring's messages
and masks depend on (one small collective per plan, so once per batch, not once per layer), and
compare; for a batch of ``shard_batch``, the same all-gather carries the batch's checksum. A rank whose own validation failed takes part in the same all-gather with its error
flagged, so every rank raises, none hangs.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .distributed import collective_device
from .layout import LAYOUTS

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from .plan import RingPlan

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# what each rank contributes, in order; a digest stands for a list too long to send
FIELDS = ("failed", "layout", "causal", "window_size", "total tokens", "documents", "cu_seqlens digest",
          "seqused digest", "query heads", "key/value heads", "head_dim", "dtype", "tokens on this rank",
          "softcap (x 1e6)", "sinks")
# with a plan made for a batch of shard_batch (RingBatch.plan): that batch's checksum, shape and
# real tokens, so that the same all-gather also tells whether the ranks were given the same batch
BATCH_FIELDS = ("batch checksum", "batch rows", "batch length", "real tokens")


def _digest(values) -> int:
    """A 62-bit digest of a list of ints (equal lists, equal digests; different ones, almost
    surely different)."""
    data = ",".join(map(str, values)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 2


def _facts(plan: RingPlan | None, q, k, failed: bool, softcap, sinks) -> list[int]:
    if plan is None:  # this rank could not even build its plan: only its failure counts
        return [1] + [-1] * (len(FIELDS) + len(BATCH_FIELDS) - 1)

    def shape(t, dim):
        return t.shape[dim] if isinstance(t, torch.Tensor) and t.dim() == 3 else -1

    dtype = q.dtype if isinstance(q, torch.Tensor) else None
    return [
        int(failed), LAYOUTS.index(plan.layout), int(plan.causal),
        -1 if plan.window_size is None else plan.window_size, plan.total, len(plan.bounds) - 1,
        _digest(plan.bounds), _digest(plan.seqused or []), shape(q, 1), shape(k, 1), shape(q, 2),
        _DTYPES.index(dtype) if dtype in _DTYPES else -1, shape(q, 0),
        round(softcap * 1e6) if isinstance(softcap, (int, float)) else -1, int(sinks is not None),
        *(plan.batch_facts or [-1] * len(BATCH_FIELDS)),
    ]


def _shown(field: str, value: int) -> str:
    if field == "layout":
        return repr(LAYOUTS[value])
    if field == "dtype":
        return str(_DTYPES[value]) if value >= 0 else "other"
    if field == "window_size":
        return "None" if value < 0 else str(value)
    if field == "sinks":
        return "given" if value else "none"
    return str(value)


def check_same_batches(batches: list[list[int]]) -> None:
    """Raise a ``ValueError`` naming every rank's batch unless the ranks' ``[checksum, rows,
    length, real tokens]`` (gathered, in rank order) are all the same."""
    if any(b != batches[0] for b in batches):
        described = "; ".join(
            f"rank {r}: batch [{rows}, {length}] with {tokens} real tokens, checksum {checksum}"
            for r, (checksum, rows, length, tokens) in enumerate(batches)
        )
        raise ValueError(
            f"the ranks of a context-parallel group were given different batches ({described}); "
            f"every rank of the group must load the same batch (use the same seed and data "
            f"order, e.g. accelerate.utils.set_seed before building the dataloader)"
        )


def check_ranks_agree(plan: RingPlan | None, q, k, group: ProcessGroup | None, world_size: int,
                      error: Exception | None = None, softcap=None, sinks=None) -> None:
    """All-gather this rank's digest of ``plan`` and the q/k shapes, and raise a ``ValueError``
    on every rank, naming the ranks and values that differ, if the ranks of ``group`` do not
    agree. ``error``: this rank's own validation failure (``plan`` may then be None), raised
    after the all-gather, so that the other ranks learn of it instead of waiting; they raise
    too."""
    device = q.device if isinstance(q, torch.Tensor) else collective_device(group)
    facts = _facts(plan, q, k, error is not None, softcap or 0.0, sinks)
    mine = torch.tensor(facts, dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).tolist()  # [rank][field]
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(table) if row[0]]
    if failed:
        raise ValueError(
            f"ring attention: rank(s) {failed} of the context-parallel group rejected their inputs "
            f"(see the error on those ranks); this rank's inputs were valid"
        )
    check_same_batches([row[len(FIELDS):] for row in table])
    differ = [i for i in range(1, len(FIELDS)) if len({row[i] for row in table}) > 1]
    if differ:
        lines = "; ".join(
            f"{FIELDS[i]}: " + ", ".join(f"rank {r}: {_shown(FIELDS[i], row[i])}" for r, row in enumerate(table))
            for i in differ
        )
        raise ValueError(
            f"ring attention: the ranks of the context-parallel group were given inconsistent "
            f"inputs ({lines}). Every rank must pass the same global cu_seqlens (and seqused), "
            f"layout, window, softcap and sinks, and q, k, v of the same heads, head_dim and dtype, "
            f"each holding its own shard of the same sequence."
        )
