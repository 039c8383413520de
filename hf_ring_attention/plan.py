"""The step plan: for each ring step, which query rows meet which key rows, and how.

At ring step ``s`` rank ``r`` holds the K/V block of rank ``src = (r - s) mod P``. For every
document, the queries of ``r`` and the keys of ``src`` are a few pieces (see ``layout.py``);
between two pieces the true mask is always a *band* in local-buffer coordinates::

    row a sees column b   iff   d_lo <= a - b <= d_hi          (None = unbounded)

because a piece is an arithmetic progression of global positions with the layout's stride. Bands
of neighbouring pieces often agree (zigzag step 0 is one causal band over both chunks), so pieces
are merged into as few rectangles as possible, each cropped to the rows and columns it really
uses (no row of a kernel call ever sees zero keys) and turned into a flash-attention window,
whose causal diagonal is aligned bottom-right::

    Lq=3, Lk=5, causal (window (-1, 0))        query i sees key j iff
        k k k . .                              j - i - (Lk - Lq) in [-left, right]
        k k k k .                              (-1: unbounded)
        k k k k k

Rectangles that share a window become one varlen kernel call. The plan is integer work done once
per batch on the host and reused by every layer and by the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Sequence

import torch

from .layout import Piece, as_boundaries, check_layout, rank_pieces


@dataclass(frozen=True)
class Segment:
    """One sequence of a varlen kernel call: local rows [q0, q1) of the query rank against local
    rows [k0, k1) of the key block, with a bottom-right aligned window (left, right)."""

    q0: int
    q1: int
    k0: int
    k1: int
    left: int
    right: int


@dataclass
class Call:
    """One varlen kernel call of a ring step (host description)."""

    left: int
    right: int
    segments: list[Segment] = field(default_factory=list)

    @property
    def causal(self) -> bool:
        return self.left == -1 and self.right == 0

    def rows(self, which: str) -> slice | torch.Tensor:
        """Rows used from the query (``"q"``) or key (``"k"``) buffer: a slice when they are one
        contiguous run, else an int64 index tensor."""
        spans = [(s.q0, s.q1) if which == "q" else (s.k0, s.k1) for s in self.segments]
        if all(a == prev_b for (a, _), (_, prev_b) in zip(spans[1:], spans)):
            return slice(spans[0][0], spans[-1][1])
        return torch.cat([torch.arange(a, b) for a, b in spans])

    def cu_seqlens(self, which: str) -> list[int]:
        out = [0]
        for s in self.segments:
            out.append(out[-1] + ((s.q1 - s.q0) if which == "q" else (s.k1 - s.k0)))
        return out


@dataclass
class DeviceCall:
    """A :class:`Call` with its index and boundary tensors on the compute device."""

    q_rows: slice | torch.Tensor
    k_rows: slice | torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    window: tuple[int, int]


# ----------------------------------------------------------------------------------- bands
def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _piece_band(qp: Piece, kp: Piece, causal: bool, window: int | None):
    """Band (d_lo, d_hi) on a - b (local-buffer rows) equivalent to the global mask.

    Global mask on delta = i - j: causal -> delta >= 0; causal window w -> delta <= w - 1;
    non-causal window w -> |delta| <= w - 1. With i = qp.start + st*(a - qp.local_start) and
    j = kp.start + st*(b - kp.local_start): delta = st*e + g where e = (a - b) - shift.
    """
    st, g = qp.stride, qp.start - kp.start
    shift = qp.local_start - kp.local_start
    lo_delta = 0 if causal else (None if window is None else -(window - 1))
    hi_delta = None if window is None else window - 1
    d_lo = None if lo_delta is None else _ceil_div(lo_delta - g, st) + shift
    d_hi = None if hi_delta is None else (hi_delta - g) // st + shift
    return d_lo, d_hi


def _visible(rect, band):
    """The intersection of the band with the range of a - b over rect, or None if empty."""
    q0, q1, k0, k1 = rect
    lo, hi = q0 - (k1 - 1), (q1 - 1) - k0
    if band[0] is not None:
        lo = max(lo, band[0])
    if band[1] is not None:
        hi = min(hi, band[1])
    return (lo, hi) if lo <= hi else None


def _crop(rect, band):
    """Shrink rect to the rows and columns that see / are seen by something (None if empty)."""
    q0, q1, k0, k1 = rect
    d_lo, d_hi = band
    if d_lo is not None and d_hi is not None and d_lo > d_hi:
        return None
    r0 = q0 if d_lo is None else max(q0, k0 + d_lo)
    r1 = q1 - 1 if d_hi is None else min(q1 - 1, k1 - 1 + d_hi)
    c0 = k0 if d_hi is None else max(k0, q0 - d_hi)
    c1 = k1 - 1 if d_lo is None else min(k1 - 1, q1 - 1 - d_lo)
    if r0 > r1 or c0 > c1:
        return None
    return r0, r1 + 1, c0, c1 + 1


def _segment(rect, band) -> Segment | None:
    rect = _crop(rect, band)
    if rect is None:
        return None
    q0, q1, k0, k1 = rect
    d_lo, d_hi = band
    # bottom-right aligned window: q1 - k1 - right <= a - b <= q1 - k1 + left
    right = -1 if d_lo is None or q0 - (k1 - 1) >= d_lo else (q1 - k1) - d_lo
    left = -1 if d_hi is None or (q1 - 1) - k0 <= d_hi else d_hi - (q1 - k1)
    return Segment(q0, q1, k0, k1, left, right)


# ------------------------------------------------------------------------------ one document
def _real_rows(p: Piece, doc_start: int, used: int) -> tuple[int, int]:
    """Local rows of the piece that hold real (non-padding) tokens: a prefix of the piece."""
    n = max(0, min(p.length, _ceil_div(used - (p.start - doc_start), p.stride)))
    return p.local_start, p.local_start + n


def _doc_segments(q_pieces, k_pieces, doc_start, used, causal, window) -> list[Segment]:
    """Cover the visible part of one document's (query pieces x key pieces) with the fewest
    band rectangles: the whole grid, one per query piece, one per key piece, or one per pair."""
    qs = [(p, _real_rows(p, doc_start, used)) for p in q_pieces]
    ks = [(p, _real_rows(p, doc_start, used)) for p in k_pieces]
    qs = [(p, r) for p, r in qs if r[1] > r[0]]
    ks = [(p, r) for p, r in ks if r[1] > r[0]]
    if not qs or not ks:
        return []
    cells = {
        (i, j): ((qr[0], qr[1], kr[0], kr[1]), _piece_band(qp, kp, causal, window))
        for (i, (qp, qr)), (j, (kp, kr)) in product(enumerate(qs), enumerate(ks))
    }
    nq, nk = len(qs), len(ks)
    options = [
        [(range(nq), range(nk))],
        [(range(i, i + 1), range(nk)) for i in range(nq)],
        [(range(nq), range(j, j + 1)) for j in range(nk)],
        [(range(i, i + 1), range(j, j + 1)) for i in range(nq) for j in range(nk)],
    ]
    best = None
    for option in options:
        segs = []
        for rows, cols in option:
            merged = _merge_cells([[cells[i, j] for j in cols] for i in rows])
            if merged is False:
                break
            if merged is not None:
                segs.append(merged)
        else:
            if best is None or len(segs) < len(best):
                best = segs
    return best


def _merge_cells(grid):
    """One band rectangle equal to the union of the cells' masks; None if nothing is visible,
    False if no single band describes them (or their rows are not contiguous)."""
    if len(grid) == 1 and len(grid[0]) == 1:
        return _segment(*grid[0][0])
    rows = [row[0][0][:2] for row in grid]
    cols = [cell[0][2:] for cell in grid[0]]
    if any(a[1] != b[0] for a, b in zip(rows, rows[1:])) or any(
        a[1] != b[0] for a, b in zip(cols, cols[1:])
    ):
        return False
    seen = [v for row in grid for rect, band in row if (v := _visible(rect, band))]
    if not seen:
        return None
    band = (min(lo for lo, _ in seen), max(hi for _, hi in seen))
    if any(_visible(rect, band) != _visible(rect, b) for row in grid for rect, b in row):
        return False
    return _segment((rows[0][0], rows[-1][1], cols[0][0], cols[-1][1]), band)


# --------------------------------------------------------------------------------- the plan
def plan_rank(
    bounds: Sequence[int],
    seqused: Sequence[int] | None,
    layout: str,
    world_size: int,
    rank: int,
    causal: bool,
    window: int | None,
) -> list[list[Call]]:
    """Kernel calls of every ring step for one rank: ``steps[s]`` pairs ``rank``'s queries with
    the K/V block of rank ``(rank - s) % world_size``."""
    used = [b - a for a, b in zip(bounds, bounds[1:])] if seqused is None else list(seqused)
    q_docs = rank_pieces(bounds, layout, world_size, rank)
    steps = []
    for step in range(world_size):
        k_docs = rank_pieces(bounds, layout, world_size, (rank - step) % world_size)
        segments = []
        for start, n, q_pieces, k_pieces in zip(bounds, used, q_docs, k_docs):
            segments += _doc_segments(q_pieces, k_pieces, start, n, causal, window)
        steps.append(_group(segments))
    return steps


def _group(segments: list[Segment]) -> list[Call]:
    """Segments that share a window share a kernel call, unless their query rows overlap (each
    call's output rows are merged at once, so a row may appear only once per call)."""
    calls: list[Call] = []
    for seg in sorted(segments, key=lambda s: (s.q0, s.k0)):
        for call in calls:
            if (call.left, call.right) == (seg.left, seg.right) and call.segments[-1].q1 <= seg.q0:
                call.segments.append(seg)
                break
        else:
            calls.append(Call(seg.left, seg.right, [seg]))
    return calls


class RingPlan:
    """Everything the ring needs to know about one batch's mask, computed once and reused by
    every layer and by the backward pass.

    Args:
        cu_seqlens (`torch.Tensor`, *optional*): int32 global (unsharded) document boundaries,
            identical on every rank. None means one document of ``total`` tokens.
        world_size (`int`): ranks in the sequence-parallel group.
        rank (`int`): this rank in the group.
        layout (`str`): ``"zigzag"`` (default), ``"contiguous"`` or ``"striped"``.
        causal (`bool`): causal attention (query i sees keys j <= i of its document).
        window_size (`int`, *optional*): transformers sliding window: query i sees key j iff
            ``i - window_size < j <= i`` (non-causal: ``|i - j| < window_size``).
        seqused (`torch.Tensor`, *optional*): int32 real tokens per document (see
            :func:`pad_for_layout`); the rest of each document is padding that neither attends
            nor is attended to. None: no padding.
        total (`int`, *optional*): total tokens, needed only when ``cu_seqlens`` is None.
    """

    def __init__(
        self,
        cu_seqlens=None,
        *,
        world_size: int = 1,
        rank: int = 0,
        layout: str = "zigzag",
        causal: bool = True,
        window_size: int | None = None,
        seqused=None,
        total: int | None = None,
    ):
        check_layout(layout)
        if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if window_size is not None and (not isinstance(window_size, int) or window_size < 1):
            raise ValueError(f"window_size must be a positive int or None, got {window_size!r}")
        self.bounds = as_boundaries(cu_seqlens, total)
        self.seqused = self._check_seqused(seqused)
        longest = max(b - a for a, b in zip(self.bounds, self.bounds[1:]))
        if window_size is not None and window_size >= longest:
            window_size = None  # wider than every document: no effect, and cheaper to plan
        self.world_size, self.rank, self.layout = world_size, rank, layout
        self.causal, self.window_size = causal, window_size
        self.steps = plan_rank(self.bounds, self.seqused, layout, world_size, rank, causal, window_size)
        self.num_steps = self._count_steps()
        self._on_device: dict[torch.device, list[list[DeviceCall]]] = {}

    @property
    def total(self) -> int:
        return self.bounds[-1]

    @property
    def local_tokens(self) -> int:
        return self.total // self.world_size

    def _check_seqused(self, seqused):
        if seqused is None:
            return None
        used = seqused.tolist() if isinstance(seqused, torch.Tensor) else [int(u) for u in seqused]
        lengths = [b - a for a, b in zip(self.bounds, self.bounds[1:])]
        if len(used) != len(lengths) or any(not 0 <= u <= n for u, n in zip(used, lengths)):
            raise ValueError(
                f"seqused must hold one count per document with 0 <= seqused[i] <= length[i]; "
                f"got seqused={used[:12]} for document lengths {lengths[:12]}"
            )
        return used

    def _count_steps(self) -> int:
        """Steps the ring must run: 1 + the last step at which *any* rank has work. Every rank
        must agree, so with a sliding window (where late steps are often empty) it plans the
        other ranks too; otherwise every step is needed as soon as one rank can see another."""
        if self.world_size == 1:
            return 1
        if self.window_size is None and self.seqused is None:
            return self.world_size
        last = 0
        for r in range(self.world_size):
            steps = self.steps if r == self.rank else plan_rank(
                self.bounds, self.seqused, self.layout, self.world_size, r, self.causal,
                self.window_size,
            )
            last = max([last] + [s for s, calls in enumerate(steps) if calls])
        return last + 1

    def device_calls(self, device: torch.device) -> list[list[DeviceCall]]:
        """The calls of every step with their index tensors on ``device`` (cached)."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = [
                [_to_device(call, device) for call in calls] for calls in self.steps
            ]
        return self._on_device[device]


def _to_device(call: Call, device) -> DeviceCall:
    def rows(which):
        r = call.rows(which)
        return r if isinstance(r, slice) else r.to(device)

    def cu(which):
        return torch.tensor(call.cu_seqlens(which), dtype=torch.int32, device=device)

    return DeviceCall(
        q_rows=rows("q"),
        k_rows=rows("k"),
        cu_seqlens_q=cu("q"),
        cu_seqlens_k=cu("k"),
        max_seqlen_q=max(s.q1 - s.q0 for s in call.segments),
        max_seqlen_k=max(s.k1 - s.k0 for s in call.segments),
        causal=call.causal,
        window=(call.left, call.right),
    )
