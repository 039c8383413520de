"""shard / unshard: move between a full packed tensor and this rank's part of it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.distributed as dist

from .distributed import group_rank, group_size
from .layout import as_boundaries, check_total, local_indices

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def _bounds(cu_seqlens: torch.Tensor | None, total: int) -> list[int]:
    bounds = as_boundaries(cu_seqlens, total)
    check_total(bounds, total)
    return bounds


def shard(x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *, dim: int = 0,
          group: ProcessGroup | None = None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's part of the full tensor ``x`` (no communication).

    Args:
        x (`torch.Tensor`): the full (unsharded) packed tensor, identical on every rank.
        cu_seqlens (`torch.Tensor`, *optional*): int32 global document boundaries along ``dim``;
            None means one document. Every document length must be a multiple of the layout's
            need (2 x world size for zigzag, world size otherwise): see :func:`pad_for_layout`.
        dim (`int`): the token dimension.
        group (`ProcessGroup`, *optional*): the context-parallel group (None: default group).
        layout (`str`): ``"zigzag"`` (default), ``"contiguous"`` or ``"striped"``.

    Returns:
        `torch.Tensor`: the tokens this rank holds, in local order, along ``dim``.
    """
    world_size, rank = group_size(group), group_rank(group)
    bounds = _bounds(cu_seqlens, x.shape[dim])
    index = local_indices(bounds, layout, world_size, rank).to(x.device)
    return x.index_select(dim, index)


def unshard(x_local: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *, dim: int = 0,
            group: ProcessGroup | None = None, layout: str = "zigzag") -> torch.Tensor:
    """The full tensor, on every rank, from every rank's part (one all-gather).

    Inverse of :func:`shard`: ``unshard(shard(x)) == x``. Differentiable when ``x_local``
    requires grad (the gradient of the gathered tensor is summed back to the owning ranks).
    """
    world_size = group_size(group)
    group_rank(group)  # raises if this process is not in the group
    return unshard_bounds(x_local, _bounds(cu_seqlens, x_local.shape[dim] * world_size), dim=dim,
                          group=group, layout=layout)


def unshard_bounds(x_local: torch.Tensor, bounds: Sequence[int], *, dim: int = 0,
                   group: ProcessGroup | None = None, layout: str = "zigzag") -> torch.Tensor:
    """:func:`unshard` with the document boundaries as a checked list of ints (``bounds``)."""
    world_size = group_size(group)
    index = torch.cat([local_indices(bounds, layout, world_size, r) for r in range(world_size)])
    if world_size == 1:
        gathered = x_local
    else:
        gathered = _AllGather.apply(x_local, dim, group)
    return gathered.index_select(dim, torch.argsort(index).to(x_local.device))


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's ``x`` along ``dim``. Backward: each rank's gathered tensor fed
    its own loss, so the gradient of a part is the sum over ranks of that part's gradient."""

    @staticmethod
    def forward(ctx, x, dim, group):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.dim, ctx.group, ctx.size = dim, group, x.shape[dim]
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad.narrow(ctx.dim, rank * ctx.size, ctx.size), None, None
