"""``RingAttention``: a multi-head attention layer for models written directly in PyTorch.

It is built from the public pieces only (``pad_for_layout``, ``shard``, ``RingPlan`` with
``ring_attention_with_plan``, ``unshard``, ``unpad``): no second ring.

Legend: B batch rows, S tokens per row, T packed tokens (of this rank), H query heads, Hkv key/value
heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .distributed import group_rank, group_size
from .layout import as_boundaries, check_layout, check_total, local_indices, pad_for_layout, unpad
from .plan import RingPlan
from .ring import ring_attention_with_plan
from .sharding import shard, unshard

ROPE_THETA = 10000.0


class RingAttention(nn.Module):
    """Multi-head attention (q/k/v/out projections, optional rotary embeddings) whose sequence
    is split across the ranks of a context-parallel group and attended with ring attention.

    The result, and its gradient, equal those of the same module on one process over the whole
    sequence (up to rounding). At world size 1, or without ``torch.distributed``, it is plain
    attention.

    Args:
        dim (`int`): model width: ``x`` is ``[B, S, dim]`` and so is the output.
        heads (`int`): query heads.
        dim_head (`int`, *optional*, defaults to 64): width of one head (even when ``rotary``).
        kv_heads (`int`, *optional*): key/value heads (grouped-query attention; 1 is multi-query
            attention); must divide ``heads``. Defaults to ``heads``.
        causal (`bool`, *optional*, defaults to `True`): token i attends to tokens j <= i of its
            document; otherwise to every token of its document.
        layout (`str`, *optional*, defaults to `"zigzag"`): token placement on the ranks,
            ``"zigzag"``, ``"contiguous"`` or ``"striped"`` (see :func:`shard`).
        window_size (`int`, *optional*): sliding window: token i attends to token j iff
            ``i - window_size < j <= i`` (non-causal: ``|i - j| < window_size``).
        rotary (`bool`, *optional*, defaults to `True`): rotary position embeddings on q and k
            (rotate-half form, base 10000, computed and applied in float32 or wider). The position
            of a token is its index in its document over the whole sequence, not on its shard,
            so every rank gets exactly the embeddings of the single-process module.
        auto_shard_seq (`bool`, *optional*, defaults to `False`): take the full input on every
            rank and shard it here (see below); otherwise take this rank's shard.
        group (`ProcessGroup`, *optional*): the context-parallel group; None is the default group,
            or a single process when ``torch.distributed`` is not initialised.
        backend (`str`, *optional*): attention kernel, ``"flash_attn_4"``, ``"flash_attn"``, ``"torch_flash"`` or ``"cpu"``
            (see :func:`ring_attention`); None chooses automatically.

    The projections have no bias (padding tokens then have exactly 0 output). The softmax scale
    is ``dim_head ** -0.5``.

    **With** ``auto_shard_seq=True``, ``forward(x, mask=None, cu_seqlens=None)`` takes the full
    ``x [B, S, dim]``, identical on every rank of the group (and ``mask``, ``cu_seqlens``
    identical too), and returns the full output ``[B, S, dim]`` on every rank. Every row is a
    document (with ``B == 1``, ``cu_seqlens`` may split the row into packed documents: int32
    boundaries ending at S). ``mask [B, S]`` (bool, True = real token; 0/1 integers also
    accepted) drops the padding wherever it is: a document is its real tokens in order, and
    rotary positions and windows count real tokens only (left padding does not shift them).
    Padding neither attends nor is attended to, and its output is 0. The documents are padded
    to the layout's multiple with :func:`pad_for_layout`, this rank keeps its shard, projects and
    attends it, and :func:`unshard` gathers the output (one all-gather).

    **Gradients with** ``auto_shard_seq=True``: every rank computes the same loss ``L`` from the
    same full output, and the gathered output sends the gradient of every rank's copy back to the
    token's owner (:func:`unshard`'s backward sums over the ranks), so the gradients that the P
    ranks hold add up to the gradient of ``P * L``: after ``L.backward()`` a rank holds P times
    the share of its own tokens in this module's parameter gradients (and in ``x.grad``). The
    **mean over the group** is exactly the single-process gradient. Average the gradients over
    the group: ``DistributedDataParallel`` over the context-parallel group does this, or
    ``dist.all_reduce(p.grad); p.grad /= P`` for every parameter. Layers that run on the full
    sequence on every rank (embeddings, heads) hold the full gradient on every rank already, and
    averaging keeps it, so the same rule serves a whole model.

    **Without** ``auto_shard_seq``, ``forward(x, cu_seqlens=None, seqused=None)`` takes and
    returns this rank's shard ``[B, tokens, dim]``:

    - ``cu_seqlens=None``: every row is one sequence of ``tokens * P`` tokens, sharded along the
      token dimension with the module's layout (``shard(x_full, dim=1, layout=...)``).
    - ``cu_seqlens`` given: ``x`` is one packed row ``[1, tokens, dim]``, the shard of a packed
      buffer (``shard(x_full, cu_seqlens, dim=1, layout=...)``) whose global int32 document
      boundaries, identical on every rank, are ``cu_seqlens``; every document length must be a
      multiple of what the layout needs (2 x P for zigzag, P otherwise): pad with
      :func:`pad_for_layout`, which also returns ``seqused``, the real tokens per document. Pass
      it so that the padding at the end of each document neither attends nor is attended to
      (needed for exact non-causal attention; its output is 0).
    - ``mask`` is refused: describe padding with ``cu_seqlens`` and ``seqused``.

    Each rank's loss is then the part of its own tokens, and the gradients of the ranks add up
    to the gradient of the total loss: sum them over the group (``dist.all_reduce``), or under
    ``DistributedDataParallel``, which averages, multiply each rank's loss by P.

    Bad shapes, dims and arguments raise a ``ValueError`` or ``TypeError`` naming the values,
    on every rank, before any communication. On its first call the module checks, with one
    all-gather of a few sums, that every rank holds the same weights (and, with
    ``auto_shard_seq=True``, the same input, mask and ``cu_seqlens``; without it, the same
    ``cu_seqlens``, ``seqused`` and shard size): ranks seeded differently or fed by a
    ``DistributedSampler`` would otherwise compute a wrong result silently. A mismatch raises a
    ``ValueError`` on every rank.

    Example::

        attn = RingAttention(dim=512, dim_head=64, heads=8, causal=True, auto_shard_seq=True)
        tokens = torch.randn(1, 1024, 512)
        attended = attn(tokens)        # same shape; equal to plain attention over the sequence
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int = 64,
        kv_heads: int | None = None,
        causal: bool = True,
        layout: str = "zigzag",
        window_size: int | None = None,
        rotary: bool = True,
        auto_shard_seq: bool = False,
        group=None,
        backend: str | None = None,
    ):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        for name, value in (("dim", dim), ("heads", heads), ("dim_head", dim_head), ("kv_heads", kv_heads)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if heads % kv_heads:
            raise ValueError(
                f"kv_heads={kv_heads} must divide heads={heads} (each key/value head serves "
                f"heads // kv_heads query heads); choose a divisor of {heads}"
            )
        if rotary and dim_head % 2:
            raise ValueError(
                f"rotary embeddings rotate pairs of features, so dim_head must be even, got "
                f"dim_head={dim_head}; use an even dim_head or rotary=False"
            )
        if window_size is not None and (not _is_int(window_size) or window_size < 1):
            raise ValueError(f"window_size must be a positive int or None, got {window_size!r}")
        check_layout(layout)
        self.dim, self.heads, self.dim_head, self.kv_heads = dim, heads, dim_head, kv_heads
        self.causal, self.layout, self.window_size = causal, layout, window_size
        self.rotary, self.auto_shard_seq = rotary, auto_shard_seq
        self.group, self.backend = group, backend
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_k = nn.Linear(dim, kv_heads * dim_head, bias=False)
        self.to_v = nn.Linear(dim, kv_heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self._replicas_checked = False  # set after the first call's cross-rank check
        self._last_plan: tuple | None = None  # (documents, RingPlan) of the last call

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, dim_head={self.dim_head}, "
            f"causal={self.causal}, layout={self.layout!r}, window_size={self.window_size}, "
            f"rotary={self.rotary}, auto_shard_seq={self.auto_shard_seq}"
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cu_seqlens=None, seqused=None) -> torch.Tensor:
        """Attend ``x``; see the class docstring for the two modes.

        Args:
            x (`torch.Tensor`): ``[B, S, dim]``: the full input on every rank with
                ``auto_shard_seq=True``, else this rank's shard ``[B, tokens, dim]``.
            mask (`torch.Tensor`, *optional*): ``[B, S]`` key padding mask, True (or 1) for real
                tokens; only with ``auto_shard_seq=True``.
            cu_seqlens (`torch.Tensor`, *optional*): int32 document boundaries of a packed row
                (``B == 1``): within the full row with ``auto_shard_seq=True``, else global
                (unsharded) boundaries whose lengths are multiples of the layout's need.
            seqused (`torch.Tensor`, *optional*): int32 real tokens per document of ``cu_seqlens``,
                as returned by :func:`pad_for_layout`; only without ``auto_shard_seq``.

        Returns:
            `torch.Tensor`: the output, shaped like ``x``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a [batch, tokens, dim={self.dim}] tensor, got {got}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got dtype {x.dtype}")
        world_size, rank = group_size(self.group), group_rank(self.group)
        if self.auto_shard_seq:
            if seqused is not None:
                raise ValueError(
                    "seqused is for shards (auto_shard_seq=False); with auto_shard_seq=True pass "
                    "the full input and a [batch, tokens] padding mask instead"
                )
            return self._forward_full(x, mask, cu_seqlens, world_size, rank)
        if mask is not None:
            raise ValueError(
                "mask is only taken with auto_shard_seq=True; on shards, pad every document with "
                "hf_ring_attention.pad_for_layout and pass its cu_seqlens and seqused instead"
            )
        return self._forward_shard(x, cu_seqlens, seqused, world_size, rank)

    # ----------------------------------------------------------------------------- the two modes
    def _forward_shard(self, x, cu_seqlens, seqused, world_size: int, rank: int) -> torch.Tensor:
        B, n, _ = x.shape
        if cu_seqlens is None:
            bounds = [row * n * world_size for row in range(B + 1)]
            cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=x.device)
        else:
            if B != 1:
                raise ValueError(
                    f"with cu_seqlens, x must be one packed row [1, tokens, {self.dim}], got "
                    f"batch {B}; concatenate the rows' shards along the tokens, or drop cu_seqlens "
                    f"to make every row one sequence"
                )
            bounds = as_boundaries(cu_seqlens)
        # first, with the other ranks: shard sizes that differ between ranks raise on every rank
        self._check_replicas(world_size, x.device, [B, n], [cu_seqlens, seqused])
        if bounds[-1] != B * n * world_size:
            raise ValueError(
                f"this rank holds {n} tokens but cu_seqlens describe {bounds[-1]} tokens over "
                f"{world_size} ranks; pass this rank's shard of the packed buffer "
                f"(hf_ring_attention.shard) and the global cu_seqlens"
            )
        positions = document_positions(bounds, self.layout, world_size, rank)
        out = self._attend(x.reshape(B * n, self.dim), positions, cu_seqlens, seqused)
        return out.reshape(B, n, self.dim)

    def _forward_full(self, x, mask, cu_seqlens, world_size: int, rank: int) -> torch.Tensor:
        B, S, _ = x.shape
        if cu_seqlens is not None:
            if B != 1:
                raise ValueError(
                    f"cu_seqlens splits one packed row into documents, but x has batch {B}; "
                    f"pass x as [1, tokens, {self.dim}] or drop cu_seqlens"
                )
            bounds = as_boundaries(cu_seqlens, S)
            check_total(bounds, S)
            lengths = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])])
            doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        else:
            doc = torch.arange(B).repeat_interleave(S)
        # the real tokens of the flattened batch, in order: rows (or packed documents) become
        # the documents of one packed buffer
        kept = None
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (B, S):
                got = f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"mask must be a [batch, tokens] = [{B}, {S}] tensor like x, got {got}")
            if mask.is_floating_point() or mask.is_complex():
                raise TypeError(f"mask must be bool (True = real token) or 0/1 integers, got dtype {mask.dtype}")
            kept = mask.reshape(-1).bool().nonzero().squeeze(1).cpu()
            doc = doc[kept]
        self._check_replicas(world_size, x.device, [B, S], [x, mask, cu_seqlens])
        lengths = torch.bincount(doc, minlength=1)
        lengths = lengths[lengths > 0].tolist()  # rows without real tokens: no document
        if not lengths:
            return x.new_zeros(B, S, self.dim)
        bounds = [0]
        for length in lengths:
            bounds.append(bounds[-1] + length)
        flat = x.reshape(B * S, self.dim)
        packed = flat if kept is None else flat.index_select(0, kept.to(x.device))
        cu = torch.tensor(bounds, dtype=torch.int32, device=x.device)
        padded = pad_for_layout(packed, cu, world_size=world_size, layout=self.layout)
        positions = document_positions(padded.cu_seqlens.tolist(), self.layout, world_size, rank)
        x_local = shard(padded.x, padded.cu_seqlens, group=self.group, layout=self.layout)
        y_local = self._attend(x_local, positions, padded.cu_seqlens, padded.seqused)
        y = unshard(y_local, padded.cu_seqlens, group=self.group, layout=self.layout)
        y = unpad(y, padded.cu_seqlens, padded.seqused)
        if kept is not None:  # padding positions get 0
            y = y.new_zeros(B * S, self.dim).index_copy(0, kept.to(y.device), y)
        return y.reshape(B, S, self.dim)

    def _check_replicas(self, world_size: int, device, sizes: list[int], inputs: list) -> None:
        """On the first call: raise on every rank unless all ranks hold the same weights, sizes
        and ``inputs`` (tensors or None). One small all-gather."""
        if self._replicas_checked or world_size == 1:
            return
        weights = [getattr(self, name).weight for name in ("to_q", "to_k", "to_v", "to_out")]
        sums = [_sums(t, device) for t in inputs + weights]
        mine = torch.cat([torch.tensor(sizes, dtype=torch.float64, device=device), *sums])
        facts = len(sizes) + 2 * len(inputs)
        every = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(every, mine, group=self.group)
        every = torch.stack(every).cpu()
        # identical tensors give bit-identical sums; the slack only covers reduction order
        differ = (every - every[0]).abs() > 1e-9 * every[0].abs() + 1e-12  # [rank, fact]
        ranks = [r for r in range(world_size) if differ[r].any()]
        if differ[:, facts:].any():
            raise ValueError(
                f"RingAttention: the ranks of the context-parallel group hold different weights "
                f"(ranks {ranks} differ from rank 0). Build the model after the same "
                f"torch.manual_seed on every rank, or load the same weights, or wrap it in "
                f"DistributedDataParallel (which copies rank 0's weights) before the first call."
            )
        if ranks:
            what = ("the same full input x, mask and cu_seqlens" if self.auto_shard_seq
                    else "the same cu_seqlens and seqused and equal shard sizes")
            raise ValueError(
                f"RingAttention: the ranks of the context-parallel group were given inconsistent "
                f"inputs (ranks {ranks} differ from rank 0); every rank must pass {what}. Give "
                f"every rank of the group the same batch (the same seed and data order, no "
                f"DistributedSampler over the ranks of one group)."
            )
        self._replicas_checked = True

    def _attend(self, x_local: torch.Tensor, positions: torch.Tensor, cu_seqlens, seqused) -> torch.Tensor:
        """Projections, rotary embeddings and the ring for this rank's packed tokens [T, dim]."""
        T = x_local.shape[0]
        q = self.to_q(x_local).view(T, self.heads, self.dim_head)
        k = self.to_k(x_local).view(T, self.kv_heads, self.dim_head)
        v = self.to_v(x_local).view(T, self.kv_heads, self.dim_head)
        if self.rotary:
            cos, sin = rotary_cos_sin(positions, self.dim_head, q.dtype, q.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = ring_attention_with_plan(q, k, v, self._plan(cu_seqlens, seqused), group=self.group,
                                       backend=self.backend)
        return self.to_out(out.reshape(T, self.heads * self.dim_head))

    def _plan(self, cu_seqlens: torch.Tensor, seqused) -> RingPlan:
        """The ring plan of these documents, kept while they stay the same (consecutive calls with
        the same structure, e.g. the layers of a model over one batch, plan once and compare the
        ranks' inputs once)."""
        key = (tuple(as_boundaries(cu_seqlens)), None if seqused is None else tuple(torch.as_tensor(seqused).tolist()))
        if self._last_plan is None or self._last_plan[0] != key:
            plan = RingPlan(cu_seqlens, world_size=group_size(self.group), rank=group_rank(self.group),
                            layout=self.layout, causal=self.causal, window_size=self.window_size,
                            seqused=seqused)
            self._last_plan = (key, plan)
        return self._last_plan[1]


# --------------------------------------------------------------------------------- helpers
def document_positions(bounds, layout: str, world_size: int, rank: int) -> torch.Tensor:
    """Position within its document of each of ``rank``'s tokens, in local order (int64).

    Raises the layout's ValueError when a document length is not a multiple of its need."""
    index = local_indices(bounds, layout, world_size, rank)
    starts = torch.tensor(bounds[:-1], dtype=torch.long)
    doc = torch.searchsorted(torch.tensor(bounds[1:], dtype=torch.long), index, right=True)
    return index - starts[doc]


def rotary_cos_sin(positions: torch.Tensor, dim_head: int, dtype: torch.dtype, device):
    """cos and sin ``[T, 1, D]`` of the rotary angles ``position * 10000 ** (-2i / D)``, each
    frequency used for feature i and i + D/2, in float32 (or ``dtype`` if wider)."""
    work = torch.promote_types(dtype, torch.float32)
    inv_freq = ROPE_THETA ** (-torch.arange(0, dim_head, 2, dtype=work, device=device) / dim_head)
    angles = positions.to(device=device, dtype=work)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)[:, None, :]
    return angles.cos(), angles.sin()


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``t [T, heads, D]`` by the angles of :func:`rotary_cos_sin` (rotate-half form:
    feature i pairs with feature i + D/2), in the dtype of ``cos``; returns ``t``'s dtype."""
    work = t.to(cos.dtype)
    first, second = work.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (work * cos + rotated * sin).to(t.dtype)


def _sums(t, device) -> torch.Tensor:
    """A sum and a position-weighted sum of a tensor, float64 on ``device`` (zeros for None):
    equal tensors give equal sums, different or permuted ones almost surely not. Floating point
    tensors (activations, weights) are summed over their last dimension first, so that no
    float64 copy of a large tensor is made; masks and boundaries element by element."""
    if t is None:
        return torch.zeros(2, dtype=torch.float64, device=device)
    t = torch.as_tensor(t).detach().to(device)
    if t.is_floating_point() and t.dim() > 1:
        rows = t.flatten(0, -2).sum(dim=-1, dtype=torch.float64)
    else:
        rows = t.reshape(-1).to(torch.float64)
    weights = torch.arange(rows.numel(), dtype=torch.float64, device=device).remainder_(1009).add_(1)
    return torch.stack([rows.sum(), (rows * weights).sum()])


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
