"""The step plan: for each ring step, which query rows meet which key rows, and how.

At ring step ``s`` rank ``r`` holds the K/V block of rank ``src = (r - s) mod P``. For every
document, the queries of ``r`` and the keys of ``src`` are a few pieces (see ``layout.py``);
between two pieces the true mask is always a *band* in local-buffer coordinates::

    row a sees column b   iff   d_lo <= a - b <= d_hi          (unbounded sides: +-INF)

because a piece is an arithmetic progression of global positions with the layout's stride. Bands
of neighbouring pieces often agree (zigzag step 0 is one causal band over both chunks), so the
cells of a document (query piece x key piece) are merged into as few rectangles as possible, each
cropped to the rows and columns it really uses (no row of a kernel call ever sees zero keys) and
turned into a flash-attention window, whose causal diagonal is aligned bottom-right::

    Lq=3, Lk=5, causal (window (-1, 0))        query i sees key j iff
        k k k . .                              j - i - (Lk - Lq) in [-left, right]
        k k k k .                              (-1: unbounded)
        k k k k k

Rectangles that share a window become one varlen kernel call. The plan is integer work done once
per batch on the host, vectorised over documents and steps (a few hundred tensor operations per
rank, whatever the number of documents), and reused by every layer and by the backward pass.

With packed documents a call's rows are rarely one range: layout padding ends every document,
causal crops cut pieces short, and zigzag interleaves two pieces per document. Rather than gather
them, a call reads one range of query rows and one of key rows, and every gap between two of its
sequences becomes a sequence of its own without keys (query rows of other documents, padding) or
without queries (key rows it must not see)::

    query rows   a a a . . b b       sequences (q rows, k rows):   (3, 2)  document a
    key rows     a a . b b b                                       (2, 0)  the query gap
                                                                   (0, 1)  the key gap
    (".": rows of the gaps)                                        (2, 3)  document b

Empty sequences add nothing to any result (``contract.py``). They are not free: a flash kernel
launches ``max_seqlen_q / block`` query blocks for every sequence (most of them exit at once) and
pads its backward's dq accumulator per sequence. So gaps are cut into pieces no longer than the
call's longest sequence rounded up to the kernels' 128-row blocks, and a call whose pieces would
more than triple its sequences keeps gathering its (few) rows. Kernels that do not declare that
they take empty sequences get gathered rows (:meth:`RingPlan.device_calls`).

flash-attn 2 (the package, and PyTorch's copy of it) rewrites windows against ``max_seqlen_k``:
a side >= ``max_seqlen_k`` becomes unbounded, and an unbounded side next to a bounded one becomes
``max_seqlen_k``. A cropped rectangle keeps a bounded right side only if it binds, i.e. right <
Lq - 1, and a bounded left side only if left < Lk - 1; so reporting ``max_seqlen_k >= max(Lq, Lk)``
makes both rewrites exact. Reporting the true ``max(Lk)`` is wrong whenever Lq > Lk + 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from .kernels.contract import Varlen
from .layout import PieceArrays, as_boundaries, check_divisible, check_layout, piece_arrays

INF = 1 << 40  # an unbounded side of a band (plain int64 arithmetic stays exact far beyond it)


class Segment(NamedTuple):
    """One sequence of a varlen kernel call: local rows [q0, q1) of the query rank against local
    rows [k0, k1) of the key block, with a bottom-right aligned window (left, right)."""

    q0: int
    q1: int
    k0: int
    k1: int
    left: int
    right: int


@dataclass(frozen=True, eq=False)
class Call:
    """One varlen kernel call of a ring step, on the host: sequence i pairs the query rows
    ``[q0[i], q1[i])`` with the key rows ``[k0[i], k1[i])`` (int64 tensors, rows sorted and
    disjoint on the query side), all with the bottom-right aligned window ``(left, right)``."""

    q0: torch.Tensor
    q1: torch.Tensor
    k0: torch.Tensor
    k1: torch.Tensor
    left: int
    right: int

    @property
    def causal(self) -> bool:
        return self.left == -1 and self.right == 0

    @property
    def window(self) -> tuple[int, int]:
        return self.left, self.right

    @property
    def segments(self) -> list[Segment]:
        rows = torch.stack([self.q0, self.q1, self.k0, self.k1], 1).tolist()
        return [Segment(*r, self.left, self.right) for r in rows]

    def __len__(self) -> int:
        return len(self.q0)

    @property
    def max_seqlen_q(self) -> int:
        return int((self.q1 - self.q0).max())

    @property
    def max_seqlen_k(self) -> int:
        """An upper bound of the key lengths that is at least ``max_seqlen_q``: flash-attn 2's
        window rewrites are then exact (module docstring)."""
        return max(int((self.k1 - self.k0).max()), self.max_seqlen_q)


@dataclass(frozen=True)
class Rows:
    """Rows ``[start, stop)`` of a buffer, or, when ``index`` is set, the rows it lists (int32, on
    the compute device; ``start`` and ``stop`` then span them)."""

    start: int
    stop: int
    index: torch.Tensor | None = None

    @property
    def contiguous(self) -> bool:
        return self.index is None

    def __len__(self) -> int:
        return self.stop - self.start if self.index is None else len(self.index)


@dataclass(frozen=True)
class DeviceCall:
    """A :class:`Call` ready to run: the rows it reads and its varlen arguments on the device."""

    q_rows: Rows
    k_rows: Rows
    varlen: Varlen

    @property
    def causal(self) -> bool:
        return self.varlen.causal


# ------------------------------------------------------------------------------ integer helpers
def _ceil_div(a, b: int):
    return a if b == 1 else -((-a) // b)


def _floor_div(a, b: int):
    return a if b == 1 else a // b


def _max(a, b):
    """Elementwise maximum of tensors or ints (at least one a tensor)."""
    if isinstance(b, int):
        return a.clamp(min=b)
    if isinstance(a, int):
        return b.clamp(min=a)
    return torch.maximum(a, b)


def _min(a, b):
    if isinstance(b, int):
        return a.clamp(max=b)
    if isinstance(a, int):
        return b.clamp(max=a)
    return torch.minimum(a, b)


class _Docs(NamedTuple):
    start: torch.Tensor  # [D] global start of each document
    length: torch.Tensor  # [D]
    used: torch.Tensor  # [D] real tokens (a prefix of the document)


class _Cell(NamedTuple):
    """A query piece against a key piece, for every (step, document): the rectangle of real rows,
    whether both pieces have real rows, the band, and the interval of a - b that is visible."""

    q0: torch.Tensor
    q1: torch.Tensor
    k0: torch.Tensor
    k1: torch.Tensor
    nonempty: torch.Tensor
    lo: torch.Tensor  # visible interval of a - b (only meaningful where visible)
    hi: torch.Tensor
    visible: torch.Tensor


def _real(p: PieceArrays, docs: _Docs) -> torch.Tensor:
    """Real (non-padding) rows of a piece: a prefix of it, since padding ends the document."""
    return (_ceil_div(docs.used - (p.start - docs.start), p.stride)).clamp(min=0).minimum(p.length)


def _cell(qp: PieceArrays, qn, kp: PieceArrays, kn, causal: bool, window: int | None) -> _Cell:
    """The band of ``qp`` x ``kp``: global mask on delta = i - j (causal: delta >= 0; window w:
    delta <= w - 1, and delta >= -(w - 1) if not causal). With i = qp.start + st*(a - qp.local)
    and j = kp.start + st*(b - kp.local): delta = st*e + g, e = (a - b) - shift."""
    st, g, shift = qp.stride, qp.start - kp.start, qp.local - kp.local
    lo_delta = 0 if causal else (None if window is None else -(window - 1))
    hi_delta = None if window is None else window - 1
    d_lo = -INF if lo_delta is None else _ceil_div(lo_delta - g, st) + shift
    d_hi = INF if hi_delta is None else _floor_div(hi_delta - g, st) + shift
    q0, k0 = qp.local, kp.local
    q1, k1 = q0 + qn, k0 + kn
    nonempty = (qn > 0) & (kn > 0)
    lo = _max(q0 - (k1 - 1), d_lo)
    hi = _min((q1 - 1) - k0, d_hi)
    return _Cell(q0, q1, k0, k1, nonempty, lo, hi, nonempty & (lo <= hi))


class _Group(NamedTuple):
    """The merge of a group of cells into one rectangle: possible or not, and its segment."""

    ok: torch.Tensor
    exists: torch.Tensor
    seg: tuple  # q0, q1, k0, k1, left, right


def _adjacent(ranges) -> torch.Tensor:
    """Whether the non-empty ranges [start, stop) of consecutive pieces follow each other."""
    ok = torch.tensor(True)
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
        ok = ok & (~((a1 > a0) & (b1 > b0)) | (a1 == b0))
    return ok


def _bounding(ranges):
    """[min start, max stop) over the non-empty ranges."""
    start = stop = None
    for a, b in ranges:
        a, b = torch.where(b > a, a, INF), torch.where(b > a, b, -INF)
        start = a if start is None else torch.minimum(start, a)
        stop = b if stop is None else torch.maximum(stop, b)
    return start, stop


def _merge(grid: dict, rows: list[int], cols: list[int], q_ranges, k_ranges) -> _Group:
    """One band rectangle equal to the union of the cells ``grid[i, j]`` (i in rows, j in cols):
    ``ok`` where a single band describes them over adjacent rows and columns (pieces without real
    rows do not count), ``exists`` where something is visible, and the cropped segment."""
    members = [grid[i, j] for i in rows for j in cols]
    if len(members) == 1:  # one cell: always one rectangle, its band the visible interval
        (c,) = members
        return _Group(torch.ones_like(c.visible), c.visible, _segment(c.q0, c.q1, c.k0, c.k1, c.lo, c.hi))
    ok = _adjacent([q_ranges[i] for i in rows]) & _adjacent([k_ranges[j] for j in cols])
    ok = ok & torch.ones_like(members[0].visible)
    band_lo = torch.full_like(members[0].lo, INF)
    band_hi = torch.full_like(members[0].hi, -INF)
    for c in members:
        band_lo = torch.where(c.visible, torch.minimum(band_lo, c.lo), band_lo)
        band_hi = torch.where(c.visible, torch.maximum(band_hi, c.hi), band_hi)
    exists = torch.zeros_like(ok)
    for c in members:
        exists = exists | c.visible
        # the merged band must show each cell exactly what its own band shows
        lo = _max(c.q0 - (c.k1 - 1), band_lo)
        hi = _min((c.q1 - 1) - c.k0, band_hi)
        same = ((lo <= hi) == c.visible) & (~c.visible | ((lo == c.lo) & (hi == c.hi)))
        ok = ok & (~c.nonempty | same)
    q0, q1 = _bounding([q_ranges[i] for i in rows])
    k0, k1 = _bounding([k_ranges[j] for j in cols])
    return _Group(ok, exists, _segment(q0, q1, k0, k1, band_lo, band_hi))


def _segment(q0, q1, k0, k1, d_lo, d_hi):
    """Crop the rectangle to the rows and columns the band reaches, and express the band as a
    bottom-right aligned window: q1 - k1 - right <= a - b <= q1 - k1 + left (-1: unbounded)."""
    r0 = _max(q0, k0 + d_lo)
    r1 = _min(q1 - 1, k1 - 1 + d_hi) + 1
    c0 = _max(k0, q0 - d_hi)
    c1 = _min(k1 - 1, q1 - 1 - d_lo) + 1
    right = torch.where(r0 - (c1 - 1) >= d_lo, -1, (r1 - c1) - d_lo)
    left = torch.where((r1 - 1) - c0 <= d_hi, -1, d_hi - (r1 - c1))
    return r0, r1, c0, c1, left, right


def _options(n_q: int, n_k: int) -> list[list[tuple[list[int], list[int]]]]:
    """Ways to cover an n_q x n_k grid of cells with rectangles, fewest first: the whole grid,
    one per query piece, one per key piece, one per cell."""
    whole = [(list(range(n_q)), list(range(n_k)))]
    if n_q == n_k == 1:
        return [whole]
    return [
        whole,
        [([i], list(range(n_k))) for i in range(n_q)],
        [(list(range(n_q)), [j]) for j in range(n_k)],
        [([i], [j]) for i in range(n_q) for j in range(n_k)],
    ]


def _cells(docs: _Docs, layout: str, world_size: int, q_rank, k_rank, causal, window):
    """Every (query piece, key piece) cell, and the real rows of each piece."""
    q_pieces = piece_arrays(docs.start, docs.length, layout, world_size, q_rank)
    k_pieces = piece_arrays(docs.start, docs.length, layout, world_size, k_rank)
    q_real = [_real(p, docs) for p in q_pieces]
    k_real = [_real(p, docs) for p in k_pieces]
    grid = {(i, j): _cell(qp, qn, kp, kn, causal, window)
            for i, (qp, qn) in enumerate(zip(q_pieces, q_real))
            for j, (kp, kn) in enumerate(zip(k_pieces, k_real))}
    q_ranges = [(p.local, p.local + n) for p, n in zip(q_pieces, q_real)]
    k_ranges = [(p.local, p.local + n) for p, n in zip(k_pieces, k_real)]
    return grid, q_ranges, k_ranges


def _step_segments(docs: _Docs, layout: str, world_size: int, rank: int, causal, window):
    """Segments of every (step, document) of ``rank``: six tensors ``[S, D, slots]`` (q0, q1, k0,
    k1, left, right) and where a slot holds a segment; slots sorted by (q0, k0). Of the ways to
    cover a document's cells (``_options``), the one with the fewest segments wins, the coarser
    one on ties."""
    steps = torch.arange(world_size)
    src = ((rank - steps) % world_size)[:, None]
    grid, q_ranges, k_ranges = _cells(docs, layout, world_size, rank, src, causal, window)
    options = _options(len(q_ranges), len(k_ranges))
    slots = max(len(o) for o in options)
    best_count = best_fields = best_exists = None
    for option in options:
        groups = [_merge(grid, rows, cols, q_ranges, k_ranges) for rows, cols in option]
        ok = torch.stack([g.ok for g in groups]).all(0)
        count = torch.where(ok, torch.stack([g.exists for g in groups]).sum(0), INF)
        empty = [torch.zeros_like(count)] * (slots - len(groups))
        fields = [torch.stack([g.seg[f].expand_as(count) for g in groups] + empty, -1) for f in range(6)]
        exists = torch.stack([g.exists for g in groups] + [e.bool() for e in empty], -1)
        if best_count is None:
            best_count, best_fields, best_exists = count, fields, exists
            continue
        better = count < best_count
        best_count = torch.where(better, count, best_count)
        best_fields = [torch.where(better[..., None], f, b) for f, b in zip(fields, best_fields)]
        best_exists = torch.where(better[..., None], exists, best_exists)
    # sort the slots of each document by (q0, k0), empty ones last
    local_rows = int(docs.length.sum()) // world_size + 1
    key = torch.where(best_exists, best_fields[0] * local_rows + best_fields[2], torch.iinfo(torch.long).max)
    order = key.argsort(dim=-1, stable=True)
    return [f.gather(-1, order) for f in best_fields], best_exists.gather(-1, order)


def _colors(fields, exists) -> torch.Tensor:
    """Which call of its window each segment joins: the first (in order of creation) none of
    whose segments shares a query row with it, taking segments in (q0, k0) order. Query rows of
    different documents never overlap, so this is decided per document."""
    q0, q1, _, _, left, right = fields
    slots = exists.shape[-1]
    color = torch.zeros_like(q0)
    for t in range(1, slots):
        # earlier segments of this document with the same window whose rows reach into slot t
        conflict = (exists[..., :t] & (left[..., :t] == left[..., t:t + 1]) & (right[..., :t] == right[..., t:t + 1])
                    & (q1[..., :t] > q0[..., t:t + 1]))
        taken = (conflict[..., None] & (color[..., :t, None] == torch.arange(slots))).any(-2)
        color[..., t] = (~taken).to(torch.int8).argmax(-1)  # the first free call
    return torch.where(exists, color, -1)


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
    check_divisible(bounds, layout, world_size)
    docs = _docs(bounds, seqused)
    fields, exists = _step_segments(docs, layout, world_size, rank, causal, window)
    color = _colors(fields, exists)
    # one key per (step, window, color) = per call; calls of a step in order of first segment
    keep = exists.flatten()
    q0, q1, k0, k1, left, right = (f.flatten()[keep] for f in fields)
    step = torch.arange(world_size).repeat_interleave(exists[0].numel())[keep]
    span = int(docs.length.sum()) // world_size + 2  # windows lie in [-1, local rows]
    slots = exists.shape[-1]
    key = ((step * span + left + 1) * span + right + 1) * slots + color.flatten()[keep]
    unique, inverse = torch.unique(key, return_inverse=True)
    position = torch.arange(len(key))
    first = torch.full((len(unique),), len(key)).scatter_reduce(0, inverse, position, "amin")
    rank_of_call = torch.empty_like(first)
    rank_of_call[first.argsort()] = torch.arange(len(first))
    order = (rank_of_call[inverse] * len(key) + position).argsort()
    counts = torch.bincount(rank_of_call[inverse], minlength=len(unique)).tolist()
    call_step = step[first.sort().values].tolist()
    call_window = torch.stack([left, right], 1)[first.sort().values].tolist()
    pieces = [t[order].split(counts) for t in (q0, q1, k0, k1)]
    steps: list[list[Call]] = [[] for _ in range(world_size)]
    for c, (s, (l, r)) in enumerate(zip(call_step, call_window)):
        steps[s].append(Call(pieces[0][c], pieces[1][c], pieces[2][c], pieces[3][c], l, r))
    return steps


def _docs(bounds: Sequence[int], seqused: Sequence[int] | None) -> _Docs:
    b = torch.tensor(bounds, dtype=torch.long)
    length = b[1:] - b[:-1]
    used = length if seqused is None else torch.tensor(seqused, dtype=torch.long)
    return _Docs(b[:-1], length, used)


def count_steps(bounds, seqused, layout: str, world_size: int, causal: bool, window: int | None) -> int:
    """Steps the ring must run: 1 + the last step at which *any* rank has work (every rank must
    agree). Without a window and without padding every step is needed as soon as P > 1."""
    if world_size == 1:
        return 1
    if window is None and seqused is None:
        return world_size
    docs = _docs(bounds, seqused)
    ranks = torch.arange(world_size)[:, None, None]

    def work(steps: torch.Tensor) -> torch.Tensor:
        """[len(steps)] bool: does any rank have a visible pair at these steps."""
        grid, _, _ = _cells(docs, layout, world_size, ranks, (ranks - steps[None, :, None]) % world_size, causal, window)
        shape = (world_size, len(steps), len(docs.start))
        return torch.stack([c.visible.expand(shape) for c in grid.values()]).any(0).any(-1).any(0)

    if work(torch.tensor([world_size - 1])).any():  # the common case: the last step has work
        return world_size
    busy = work(torch.arange(world_size - 1)).nonzero().flatten()
    return int(busy.max()) + 1 if len(busy) else 1


class RingPlan:
    """Everything the ring needs to know about one batch's mask, computed once and reused by
    every layer and by the backward pass.

    Build it before the forward (``shard_batch`` does) and call :meth:`upload` there too: its
    index and boundary tensors then reach the device in one non-blocking copy while the host
    moves on, and no layer waits for planning.

    Args:
        cu_seqlens (`torch.Tensor`, *optional*): int32 global (unsharded) document boundaries,
            identical on every rank. None means one document of ``total`` tokens (or ``bounds``).
        world_size (`int`): ranks in the context-parallel group.
        rank (`int`): this rank in the group.
        layout (`str`): ``"zigzag"`` (default), ``"contiguous"`` or ``"striped"``.
        causal (`bool`): causal attention (query i sees keys j <= i of its document).
        window_size (`int`, *optional*): transformers sliding window: query i sees key j iff
            ``i - window_size < j <= i`` (non-causal: ``|i - j| < window_size``).
        seqused (`torch.Tensor` or `list[int]`, *optional*): int32 real tokens per document (see
            :func:`pad_for_layout`); the rest of each document is padding that neither attends
            nor is attended to. None: no padding.
        total (`int`, *optional*): total tokens, needed only when ``cu_seqlens`` is None.
        bounds (`list[int]`, *optional*): the same boundaries as a list of ints, instead of
            ``cu_seqlens`` (what :class:`~hf_ring_attention.RingBatch` holds; no tensor round trip).
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
        bounds: Sequence[int] | None = None,
    ):
        check_layout(layout)
        if bounds is not None and cu_seqlens is not None:
            raise ValueError("pass the document boundaries once: cu_seqlens (int32 tensor) or bounds (list)")
        if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if window_size is not None and (not isinstance(window_size, int) or window_size < 1):
            raise ValueError(f"window_size must be a positive int or None, got {window_size!r}")
        self.bounds = as_boundaries(cu_seqlens if bounds is None else bounds, total)
        self.seqused = self._check_seqused(seqused)
        longest = max(b - a for a, b in zip(self.bounds, self.bounds[1:]))
        if window_size is not None and window_size >= longest:
            window_size = None  # wider than every document: no effect, and cheaper to plan
        self.world_size, self.rank, self.layout = world_size, rank, layout
        self.causal, self.window_size = causal, window_size
        self.steps = plan_rank(self.bounds, self.seqused, layout, world_size, rank, causal, window_size)
        self.num_steps = count_steps(self.bounds, self.seqused, layout, world_size, causal, window_size)
        self._on_device: dict[tuple[torch.device, bool], list[list[DeviceCall]]] = {}
        self.agreed = False  # the ranks compared their plans and inputs (ring.py, first use)
        self.batch_facts: list[int] | None = None  # RingBatch.plan: the batch the ranks compare too
        self._host_buffers: list[torch.Tensor] = []  # pinned sources of copies that may be in flight

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

    def upload(self, device, *, non_blocking: bool = True, empty_sequences: bool = True) -> "RingPlan":
        """Put the row indices and ``cu_seqlens`` of every call on ``device`` (once per device and form).

        Everything travels as one int32 tensor, from pinned memory when ``device`` is a CUDA
        device, with one ``copy(non_blocking=...)``: on CUDA the copy runs on the current stream
        while the host continues, and later kernels on that stream see it finished. Call it right
        after building the plan, before the forward; :meth:`device_calls` calls it on first use.

        Args:
            device (`torch.device`): the compute device.
            non_blocking (`bool`): asynchronous copy (default True).
            empty_sequences (`bool`): the form of the calls (see :meth:`device_calls`); the
                default is the one every built-in backend runs.

        Returns:
            `RingPlan`: ``self``, for chaining.
        """
        device = _device(device)
        if (device, empty_sequences) in self._on_device:
            return self
        chunks: list[torch.Tensor] = []
        size = 0

        def put(values: torch.Tensor) -> tuple[int, int]:
            """Append ``values`` to the buffer; returns where they will be in it."""
            nonlocal size
            chunks.append(values)
            size += len(values)
            return size - len(values), size

        def rows(start: torch.Tensor, stop: torch.Tensor, span: tuple[int, int] | None):
            """``(first, stop, None)`` for a range, else the span of the rows and where their
            index will be in the buffer."""
            if span is not None:
                return *span, None
            return int(start.min()), int(stop.max()), put(_ranges(start, stop))

        def spec(call: Call):
            """Where the call's rows and boundaries will be in the buffer, and its max lengths."""
            max_q, max_k = call.max_seqlen_q, call.max_seqlen_k
            q_span, k_span = _rows(call.q0, call.q1), _rows(call.k0, call.k1)
            lengths = (call.q1 - call.q0, call.k1 - call.k0)
            if empty_sequences and (q_span is None or k_span is None):
                gaps = _with_gaps(call)
                if gaps is not None:
                    lengths = gaps
                    q_span = int(call.q0[0]), int(call.q1[-1])
                    k_span = int(call.k0[0]), int(call.k1[-1])
                    # the gaps too (within the same row blocks); >= 2: flash-attn 2 reads
                    # max_seqlen_q == 1 as one query in every sequence
                    max_q = max(int(gaps[0].max()), 2)
                    max_k = max(int(gaps[1].max()), max_q)
            return (call.window, max_q, max_k, put(_cumsum(lengths[0])), put(_cumsum(lengths[1])),
                    rows(call.q0, call.q1, q_span), rows(call.k0, call.k1, k_span))

        specs = [[spec(call) for call in calls] for calls in self.steps[: self.num_steps]]
        pin = device.type == "cuda" and torch.cuda.is_available()
        host = torch.empty(size, dtype=torch.int32, pin_memory=pin)
        if chunks:
            host.copy_(torch.cat(chunks))
        buffer = host.to(device, non_blocking=non_blocking and pin)
        if pin:
            self._host_buffers.append(host)  # must outlive the asynchronous copy

        def on_device(span) -> torch.Tensor:
            return buffer[span[0]:span[1]]

        def as_rows(rows_spec) -> Rows:
            start, stop, index = rows_spec
            return Rows(start, stop, None if index is None else on_device(index))

        self._on_device[device, empty_sequences] = [
            [DeviceCall(as_rows(q_rows), as_rows(k_rows),
                        Varlen(on_device(cu_q), on_device(cu_k), max_q, max_k, window))
             for window, max_q, max_k, cu_q, cu_k, q_rows, k_rows in step]
            for step in specs
        ]
        return self

    def device_calls(self, device, *, empty_sequences: bool = True) -> list[list[DeviceCall]]:
        """The calls of the first ``num_steps`` steps, ready to run on ``device`` (uploaded on
        first use; see :meth:`upload`).

        A call whose query or key rows are not one range of the buffer (packed documents, layout
        padding, cropped rectangles) reads them in one of two forms:

        * ``empty_sequences=True`` (for kernels with ``empty_sequences = True``, every built-in
          backend): the call reads one range on each side, a view, and every gap between its
          sequences becomes a sequence of its own, with no keys (a gap of query rows) or no
          queries (a gap of key rows). Such sequences add nothing to any result: their rows come
          back with lse +-inf (ignored by the merge) and zero gradients. Calls whose key rows do
          not follow the order of their query rows, or whose gaps are long next to their
          sequences (see ``_with_gaps``), keep the other form.
        * ``empty_sequences=False``: the rows are gathered through an index (and the results
          scattered back), and every sequence has queries and keys.
        """
        device = _device(device)
        self.upload(device, empty_sequences=empty_sequences)
        return self._on_device[device, empty_sequences]


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _rows(start: torch.Tensor, stop: torch.Tensor) -> tuple[int, int] | None:
    """``(first, stop)`` when the ranges ``[start[i], stop[i])`` follow each other, else None."""
    if bool((start[1:] == stop[:-1]).all()):
        return int(start[0]), int(stop[-1])
    return None


ROW_BLOCK = 128
"""Rows per block of the flash kernels' grids (queries in the forward, keys in the backward, for
head_dim <= 128 on SM80/SM90): gap pieces up to the call's longest sequence rounded up to it add
no block to any sequence."""


def _round_up(rows: int) -> int:
    return -(-rows // ROW_BLOCK) * ROW_BLOCK


def _with_gaps(call: Call) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The query and key lengths of the call's sequences once every gap between consecutive
    sequences (query rows, key rows, or both) is made of sequences of its own: the gap of query
    rows as sequences without keys, then the gap of key rows as sequences without queries, then
    the sequence itself.

    Flash kernels launch ``ceil(max_seqlen_q / 128)`` query blocks for *every* sequence (and tile
    keys the same way in the backward), so a gap is cut into pieces no longer than the call's
    longest sequence rounded up to :data:`ROW_BLOCK` rows: then no sequence gets more blocks than
    before. None (gather instead) when the key ranges do not follow each other in query order
    (overlapping or going back), or when the pieces would more than triple the call's sequences:
    a few short rows between long gaps (far steps of a sliding window) are cheaper to gather."""
    q0, q1, k0, k1 = call.q0, call.q1, call.k0, call.k1
    if bool((q0[1:] < q1[:-1]).any() or (k0[1:] < k1[:-1]).any()):
        return None
    none = torch.zeros_like(q0)
    q_gap = torch.cat([none[:1], q0[1:] - q1[:-1]])
    k_gap = torch.cat([none[:1], k0[1:] - k1[:-1]])
    q_block, k_block = _round_up(call.max_seqlen_q), _round_up(call.max_seqlen_k)
    q_pieces, k_pieces = _ceil_div(q_gap, q_block), _ceil_div(k_gap, k_block)
    if int(q_pieces.sum() + k_pieces.sum()) > 2 * len(q0):
        return None
    # every sequence, in order: (segment i, kind 0: query gap piece, 1: key gap piece, 2: itself)
    q_lengths = _pieces(q_gap, q_pieces, q_block)
    k_lengths = _pieces(k_gap, k_pieces, k_block)
    segment = torch.arange(len(q0))
    order = torch.cat([segment.repeat_interleave(q_pieces) * 3, segment.repeat_interleave(k_pieces) * 3 + 1,
                       segment * 3 + 2]).argsort(stable=True)
    lq = torch.cat([q_lengths, torch.zeros_like(k_lengths), q1 - q0])[order]
    lk = torch.cat([torch.zeros_like(q_lengths), k_lengths, k1 - k0])[order]
    return lq, lk


def _pieces(gaps: torch.Tensor, pieces: torch.Tensor, block: int) -> torch.Tensor:
    """The lengths of the pieces every gap is cut into, in order: ``pieces[i]`` pieces of
    ``block`` rows, the last one shorter when ``block`` does not divide ``gaps[i]``."""
    lengths = torch.full((int(pieces.sum()),), block, dtype=gaps.dtype)
    last = pieces.cumsum(0)[pieces > 0] - 1
    lengths[last] = gaps[pieces > 0] - (pieces[pieces > 0] - 1) * block
    return lengths


def _cumsum(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def _ranges(start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """Concatenation of arange(start[i], stop[i])."""
    lengths = stop - start
    offsets = torch.repeat_interleave(start - _cumsum(lengths)[:-1], lengths)
    return torch.arange(int(lengths.sum())) + offsets
