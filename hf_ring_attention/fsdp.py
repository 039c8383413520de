"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with context parallelism: the checks that make
the ring's loss scaling exact for FSDP2's gradient reduction.

The ring's rule (see the README, "Exactness"): if the gradient reduction sums the gradients of
all W processes and divides by F, each rank must backpropagate
``F * (sum of its token losses) / (global number of target tokens)``. DDP divides by F = W.
FSDP2 reduce-scatters each gradient over the mesh it shards on (and, for HSDP, all-reduces over
the replicas); by default it divides by the number of ranks it reduces over
(``_get_gradient_divide_factors`` in ``torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py``,
torch 2.13), or by the factor set with ``FSDPModule.set_gradient_divide_factor``. The ring
therefore needs two things from a fully sharded model, checked by
:func:`check_gradient_reduction`:

- every trainable parameter is managed by FSDP on a mesh of all W processes: a parameter outside
  ``fully_shard`` is never reduced, and a mesh that leaves out the ranks of a context-parallel
  group never adds up the parts of one sequence's gradient;
- the divide factor F = W (FSDP2's default), the same as DDP's, so that the loss scaling and the
  loss averaged over processes stay those of DDP.

The ranks of a context-parallel group hold different shards of the same replica (accelerate's
``dp_shard_cp`` dimension): the model is sharded over every process, whatever ``cp_size``.
"""

from __future__ import annotations

import torch

from . import _compat


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` (itself included) that ``fully_shard`` was applied to."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fully_sharded(model: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``model`` or one of its submodules."""
    return bool(fsdp_modules(model))


def check_gradient_reduction(model: torch.nn.Module, world_size: int) -> bool:
    """Check that FSDP2's gradient reduction of ``model`` is exact for context parallelism: the
    gradient of every trainable parameter is reduced over all ``world_size`` processes and
    divided by ``world_size`` (FSDP2's default), as the loss scaling assumes. Returns whether
    ``model`` is fully sharded (False: nothing to check).

    Args:
        model (`torch.nn.Module`): the model, after ``fully_shard``.
        world_size (`int`): the number of processes (data-parallel x context-parallel).

    Raises:
        ValueError: a trainable parameter is not managed by FSDP, FSDP shards over a mesh that
            is not all ``world_size`` processes, or a divide factor other than ``world_size`` was
            set with ``set_gradient_divide_factor``.
    """
    from torch.distributed.tensor import DTensor

    modules = fsdp_modules(model)
    if not modules:
        return False
    outside, partial = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not isinstance(p, DTensor):
            outside.append(name)
        elif p.device_mesh.size() != world_size:
            partial.append(f"{name} (mesh {tuple(p.device_mesh.shape)})")
    if outside:
        raise ValueError(
            f"{len(outside)} trainable parameter(s) of the fully sharded model are not managed by FSDP "
            f"(e.g. {outside[:3]}); their gradients would never be reduced over the processes. Apply "
            f"fully_shard to the root module too (after any adapters are added), or freeze them."
        )
    if partial:
        raise ValueError(
            f"FSDP shards {len(partial)} parameter(s) over a mesh smaller than the {world_size} processes "
            f"(e.g. {partial[:3]}); context parallelism needs each gradient reduced over every process "
            f"(the ranks of a context-parallel group hold parts of the same sequence). Shard over a mesh "
            f"of all processes, e.g. init_device_mesh(device_type, ({world_size},)), or HSDP over all of them."
        )
    factors = {f for m in modules for f in _compat.fsdp_gradient_divide_factors(m)} - {None, world_size}
    if factors:
        raise ValueError(
            f"FSDP divides gradients by {sorted(factors)} (set_gradient_divide_factor); the ring's loss "
            f"scaling assumes the average over all {world_size} processes, FSDP's default (and the loss "
            f"reported by accelerator.reduce(loss, 'mean') would be off by that ratio). Leave the divide "
            f"factor unset or set it to {world_size}."
        )
    return True
