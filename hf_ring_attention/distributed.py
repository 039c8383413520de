"""Small helpers around ``torch.distributed`` process groups (no communication here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def group_size(group: ProcessGroup | None = None) -> int:
    """World size of ``group`` (the default group if None); 1 when torch.distributed is not
    initialised, so the same code runs on a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup | None = None) -> int:
    """This process's rank inside ``group``; raises a ValueError if it is not a member."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised")
        return 0
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"global rank {dist.get_rank()} is not a member of the process group passed as "
            f"group= (ranks {dist.get_process_group_ranks(group)}); pass the context-parallel "
            f"group that contains this rank."
        )
    return rank


def collective_device(group: ProcessGroup | None = None) -> torch.device:
    """Where a small collective of ``group`` can run: the current CUDA device under NCCL (which
    takes CUDA tensors only), else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
