"""The planner as it was first written: scalar, one document and one step at a time. Kept as the
slow reference that the vectorised planner in ``hf_ring_attention/plan.py`` must reproduce
segment for segment (``tests/test_plan.py``)."""

from __future__ import annotations

from itertools import product

from hf_ring_attention.layout import Piece, rank_pieces
from hf_ring_attention.plan import Segment


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
def reference_plan(bounds, seqused, layout: str, world_size: int, rank: int, causal: bool, window):
    """Per step, the kernel calls as (window, segments) pairs."""
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


def _group(segments):
    """Segments that share a window share a call, unless their query rows overlap (first fit)."""
    calls = []
    for seg in sorted(segments, key=lambda s: (s.q0, s.k0)):
        for window, members in calls:
            if window == (seg.left, seg.right) and members[-1].q1 <= seg.q0:
                members.append(seg)
                break
        else:
            calls.append(((seg.left, seg.right), [seg]))
    return calls
