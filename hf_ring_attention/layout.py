"""Which global token lives on which rank.

Every layout works per document: a packed buffer of documents (global ``cu_seqlens``) is split
document by document, and rank ``r`` holds the concatenation, in document order, of its pieces of
every document. With ``P`` ranks and a document of length ``L``:

``contiguous``  rank r holds chunk r of P equal chunks (L must be a multiple of P).
``zigzag``      the document is cut into 2P chunks; rank r holds chunks r and 2P-1-r
                (L must be a multiple of 2P). Causal work is then the same on every rank.
``striped``     rank r holds tokens r, r+P, r+2P, ... (L must be a multiple of P).

A piece is an arithmetic progression of global positions (``start + stride * i``), so the
planner can reason about masks without materialising indices. Documents whose length is not a
multiple of what the layout needs are padded with :func:`pad_for_layout`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

LAYOUTS = ("contiguous", "zigzag", "striped")


@dataclass(frozen=True)
class Piece:
    """A run of one document's tokens held by one rank.

    Global position of the piece's i-th token: ``start + stride * i``; it sits at
    ``local_start + i`` in the rank's local buffer.
    """

    start: int
    length: int
    stride: int
    local_start: int


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; choose one of {LAYOUTS}.")


def layout_multiple(layout: str, world_size: int) -> int:
    """The multiple that every document length must be for ``layout`` on ``world_size`` ranks
    (1 on a single rank, where every layout is the identity)."""
    check_layout(layout)
    return 2 * world_size if layout == "zigzag" and world_size > 1 else world_size


def as_boundaries(cu_seqlens, total: int | None = None) -> list[int]:
    """Global document boundaries as a list of ints (one host read; never inside the ring loop)."""
    if cu_seqlens is None:
        if total is None:
            raise ValueError("cu_seqlens=None needs the total length")
        return [0, total]
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"cu_seqlens must be a 1-D integer (int32) tensor, got dtype={cu_seqlens.dtype}, "
                f"shape={tuple(cu_seqlens.shape)}"
            )
        bounds = cu_seqlens.tolist()
    else:
        bounds = [int(b) for b in cu_seqlens]
    if len(bounds) < 2 or bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise ValueError(
            f"cu_seqlens must start at 0 and be non-decreasing with at least one document, "
            f"got {short(bounds)}"
        )
    return bounds


def check_divisible(bounds: Sequence[int], layout: str, world_size: int) -> None:
    """Raise a ValueError naming the offending documents if the layout cannot split them."""
    multiple = layout_multiple(layout, world_size)
    bad = [
        (i, b - a) for i, (a, b) in enumerate(zip(bounds, bounds[1:])) if (b - a) % multiple
    ]
    if bad:
        shown = ", ".join(f"document {i} has length {n}" for i, n in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(
            f"layout={layout!r} on {world_size} ranks needs every document length to be a "
            f"multiple of {multiple}, but {shown}{more}. Pad the documents first with "
            f"hf_ring_attention.pad_for_layout(x, cu_seqlens, world_size={world_size}, "
            f"layout={layout!r})."
        )


def rank_pieces(bounds: Sequence[int], layout: str, world_size: int, rank: int) -> list[list[Piece]]:
    """The pieces of every document that ``rank`` holds, in local-buffer order."""
    check_divisible(bounds, layout, world_size)
    pieces, local = [], 0
    for a, b in zip(bounds, bounds[1:]):
        length = b - a
        if layout == "contiguous" or world_size == 1:
            n = length // world_size
            doc = [Piece(a + rank * n, n, 1, local)]
        elif layout == "striped":
            doc = [Piece(a + rank, length // world_size, world_size, local)]
        else:
            n = length // (2 * world_size)
            doc = [
                Piece(a + rank * n, n, 1, local),
                Piece(a + (2 * world_size - 1 - rank) * n, n, 1, local + n),
            ]
        pieces.append(doc)
        local += length // world_size
    return pieces


class PieceArrays(NamedTuple):
    """One piece of every document (and, if ``rank`` is a tensor, of every rank), as int64
    tensors that broadcast together: the vectorised form of :class:`Piece` used by the planner."""

    start: torch.Tensor
    length: torch.Tensor
    local: torch.Tensor
    stride: int


def piece_arrays(starts: torch.Tensor, lengths: torch.Tensor, layout: str, world_size: int,
                 rank) -> list[PieceArrays]:
    """The pieces that ``rank`` (an int, or an int64 tensor that broadcasts against the documents)
    holds of every document given by int64 ``starts`` and ``lengths`` (multiples of what the
    layout needs; see :func:`check_divisible`). Same positions as :func:`rank_pieces`."""
    local = starts // world_size  # every document gives length / world_size tokens to every rank
    if layout == "contiguous" or world_size == 1:
        n = lengths // world_size
        return [PieceArrays(starts + rank * n, n, local, 1)]
    if layout == "striped":
        return [PieceArrays(starts + rank, lengths // world_size, local, world_size)]
    n = lengths // (2 * world_size)
    return [PieceArrays(starts + rank * n, n, local, 1),
            PieceArrays(starts + (2 * world_size - 1 - rank) * n, n, local + n, 1)]


def local_indices(bounds: Sequence[int], layout: str, world_size: int, rank: int) -> torch.Tensor:
    """Global positions of ``rank``'s tokens, in local-buffer order (int64)."""
    parts = [
        torch.arange(p.start, p.start + p.stride * p.length, p.stride)
        for doc in rank_pieces(bounds, layout, world_size, rank)
        for p in doc
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


class Padded(NamedTuple):
    """What :func:`pad_for_layout` returns: everything needed to use and undo the padding."""

    x: torch.Tensor
    """The input with every document padded at its end."""
    cu_seqlens: torch.Tensor
    """int32 boundaries of the padded documents: pass these to shard and ring_attention."""
    seqused: torch.Tensor
    """int32 number of real tokens of each document: pass to ring_attention so that padding
    never attends and is never attended to."""


def pad_for_layout(
    x: torch.Tensor,
    cu_seqlens=None,
    *,
    world_size: int | None = None,
    group: ProcessGroup | None = None,
    layout: str = "zigzag",
    dim: int = 0,
    value: float = 0,
) -> Padded:
    """Pad every document of a packed tensor to the length multiple that ``layout`` needs.

    Args:
        x (`torch.Tensor`): packed tokens along ``dim`` (all documents of the full sequence).
        cu_seqlens (`torch.Tensor`, *optional*): int32 global document boundaries; None means
            one document.
        world_size (`int`, *optional*): number of ranks; defaults to the size of ``group``.
        group (`ProcessGroup`, *optional*): the context-parallel group (default group if None).
        layout (`str`): ``"zigzag"``, ``"contiguous"`` or ``"striped"``.
        dim (`int`): the token dimension of ``x``.
        value (`float`): fill value of the padding tokens.

    Returns:
        :class:`Padded` ``(x, cu_seqlens, seqused)``. Padding goes at the end of each document;
        :func:`unpad` removes it again.
    """
    from .distributed import group_size

    world_size = group_size(group) if world_size is None else world_size
    multiple = layout_multiple(layout, world_size)
    bounds = as_boundaries(cu_seqlens, x.shape[dim])
    check_total(bounds, x.shape[dim])
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    padded = [math.ceil(n / multiple) * multiple if n else 0 for n in lengths]
    pieces = []
    for a, n, m in zip(bounds, lengths, padded):
        pieces.append(x.narrow(dim, a, n))
        if m > n:
            shape = list(x.shape)
            shape[dim] = m - n
            pieces.append(x.new_full(shape, value))
    out = torch.cat(pieces, dim=dim) if pieces else x
    device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else x.device
    cu = torch.tensor([0] + list(_cumsum(padded)), dtype=torch.int32, device=device)
    used = torch.tensor(lengths, dtype=torch.int32, device=device)
    return Padded(out, cu, used)


def unpad(x: torch.Tensor, cu_seqlens, seqused, *, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pad_for_layout`: keep the first ``seqused[i]`` tokens of each document."""
    bounds = as_boundaries(cu_seqlens, x.shape[dim])
    used = seqused.tolist() if isinstance(seqused, torch.Tensor) else list(seqused)
    return torch.cat([x.narrow(dim, a, n) for a, n in zip(bounds, used)], dim=dim)


def check_total(bounds: Sequence[int], total: int) -> None:
    if bounds[-1] != total:
        raise ValueError(
            f"cu_seqlens ends at {bounds[-1]} but the sequence has {total} tokens; "
            f"cu_seqlens[-1] must equal the total (unsharded) number of tokens."
        )


def _cumsum(values):
    total = 0
    for v in values:
        total += v
        yield total


def short(values, limit: int = 12) -> str:
    """A list for an error message: whole when short, else its first ``limit`` values and its
    length (values that are not a list are shown as they are)."""
    if not isinstance(values, (list, tuple)) or len(values) <= limit:
        return str(values)
    return f"[{', '.join(map(str, values[:limit]))}, ... ({len(values)} values)]"
