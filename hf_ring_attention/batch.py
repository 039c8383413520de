"""Causal-LM batches <-> this rank's packed shard: ``shard_batch``, ``RingBatch``, ``count_targets``.

A batch of B rows becomes one packed buffer of documents (rows split at padding and at restarts of
``position_ids``; user padding is dropped and every document is padded to the layout's multiple).
Each rank feeds the model its shard as a single row ``[1, tokens]`` with global ``position_ids``
(exact rotary embeddings), ``shift_labels`` computed on the whole sequence (no target lost at a
shard boundary), the global target count ``num_items_in_batch``, an ``attention_mask`` that marks
the layout padding among its tokens, and a :class:`RingBatch` that the attention function reads:
the global document boundaries and, per sliding window, a plan made once per batch and shared by
every layer and by the backward pass.

Nothing here imports transformers: the batch is plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .agreement import check_same_batches
from .distributed import collective_device, group_rank, group_size
from .layout import check_layout, layout_multiple, local_indices, short
from .plan import RingPlan
from .sharding import unshard_bounds

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

IGNORE_INDEX = -100
BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "labels", "shift_labels")
# What padding-free collators (TRL's, transformers' DataCollatorWithFlattening) add beside
# restarting position_ids: the same documents, checked against them, then dropped.
PACKING_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


@dataclass
class RingBatch:
    """The global structure of one sharded batch, shared by every layer (built by
    :func:`shard_batch`; the model receives it as the ``ring_batch`` keyword).

    Attributes:
        bounds (`list[int]`): boundaries of the padded documents in the packed buffer (the list
            form of ``cu_seqlens``).
        lengths (`list[int]`): real tokens of each document (the rest is layout padding).
        batch_shape (`tuple[int, int]`): (B, S) of the original batch.
        real_packed (`torch.Tensor`): packed position of every real token of the batch.
        real_flat (`torch.Tensor`): its position ``b * S + s`` in the original batch.
        group, layout, world_size, rank: the context-parallel setting.
        fingerprint (`int`): a checksum of the full batch, to check that every rank of the group
            was given the same one (:func:`check_same_batch`).
        num_targets (`int`): target tokens of the full batch (0 without labels).
        local_mask (`torch.Tensor`, *optional*): ``[tokens]`` bool, True on this rank's real tokens
            (False on layout padding).
        check (`bool`): whether the ranks compare this batch's checksum before its first ring
            (in the ring's check of its inputs, once per plan; False: no all-gather at all).
    """

    bounds: list[int]
    lengths: list[int]
    batch_shape: tuple[int, int]
    real_packed: torch.Tensor
    real_flat: torch.Tensor
    group: ProcessGroup | None
    layout: str
    world_size: int
    rank: int
    fingerprint: int = 0
    num_targets: int = 0
    local_mask: torch.Tensor | None = field(default=None, repr=False)
    check: bool = False
    _plans: dict = field(default_factory=dict, repr=False)
    _masks: list = field(default_factory=list, repr=False)  # attention masks checked against local_mask

    @property
    def num_tokens(self) -> int:
        """Real tokens of the full batch (layout padding excluded)."""
        return sum(self.lengths)

    def plan(self, window_size: int | None) -> RingPlan:
        """The (cached) causal plan of this batch for one sliding window (None: no window)."""
        if window_size not in self._plans:
            plan = RingPlan(
                bounds=self.bounds, world_size=self.world_size, rank=self.rank, layout=self.layout,
                causal=True, window_size=window_size, seqused=self.lengths,
            )
            if self.check:  # the ranks compare this batch when they compare the plan (ring.py)
                plan.batch_facts = [self.fingerprint, *self.batch_shape, self.num_tokens]
            else:  # trusted: no all-gather at all
                plan.agreed = True
            self._plans[window_size] = plan
        return self._plans[window_size]

    def prepare(self, window_sizes=(None,), device: torch.device | str | None = None) -> RingBatch:
        """Build the plans of these sliding windows now (None: full attention), and with
        ``device`` put their index tensors there (one non-blocking copy each, see
        :meth:`RingPlan.upload`), so that no layer of the forward waits for planning. Plans of
        other windows are still built on first use. The plugin and the callback call this with
        the windows the patched model uses; returns ``self``."""
        for window in window_sizes:
            plan = self.plan(window)
            if device is not None:
                plan.upload(device)
        return self

    def gather(self, x_local: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """This rank's per-token outputs (``[1, tokens, ...]``, e.g. logits or hidden states)
        gathered from every rank into the original batch order ``[B, S, ...]``. Positions that
        were padding in the input get ``fill``. One all-gather; differentiable."""
        if x_local.dim() < 2 or x_local.shape[0] != 1:
            raise ValueError(f"expected [1, tokens, ...] outputs of a sharded batch, got shape {tuple(x_local.shape)}")
        full = unshard_bounds(x_local[0], self.bounds, group=self.group, layout=self.layout)
        return self.unpack(full, fill)

    def unpack(self, packed: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """A full packed tensor ``[total, ...]`` back in the original batch order ``[B, S, ...]``
        (``fill`` where the input was padding)."""
        b, s = self.batch_shape
        out = packed.new_full((b * s, *packed.shape[1:]), fill)
        out = out.index_copy(0, self.real_flat.to(packed.device), packed.index_select(0, self.real_packed.to(packed.device)))
        return out.view(b, s, *packed.shape[1:])


def document_starts(mask: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """[B, S] flags of the tokens that start a document: the first real token of a row, the first
    after padding, and where positions restart."""
    start = mask.clone()
    start[:, 1:] &= ~mask[:, :-1]
    if positions is not None:
        start[:, 1:] |= mask[:, 1:] & (positions[:, 1:] != positions[:, :-1] + 1)
    return start


def batch_structure(mask: torch.Tensor, start: torch.Tensor, multiple: int):
    """Padded document boundaries (``bounds``), real lengths, and the flat and packed position of
    every real token, from the [B, S] padding mask and document starts."""
    real_flat = mask.flatten().nonzero().flatten()
    start = start.flatten()
    doc = torch.cumsum(start.long(), 0)[real_flat] - 1
    lengths = torch.bincount(doc, minlength=int(doc[-1]) + 1 if len(doc) else 0)
    padded = (lengths + multiple - 1) // multiple * multiple
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(padded, 0)])
    doc_first = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)[:-1]])
    offset = torch.arange(len(real_flat)) - doc_first[doc]
    real_packed = bounds[doc] + offset
    return bounds.tolist(), lengths.tolist(), real_flat, real_packed


def shard_batch(
    batch: dict,
    *,
    group: ProcessGroup | None = None,
    layout: str = "zigzag",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    check: bool = True,
) -> dict:
    """This rank's part of a full causal-LM batch, as keyword arguments for ``model(**...)``.

    Args:
        batch (`dict`): the full batch, identical on every rank of ``group``: ``input_ids``
            ``[B, S]``, and optionally ``attention_mask`` ``[B, S]`` (1 = token, 0 = left or
            right padding), ``position_ids`` ``[B, S]`` (packed documents restart their
            positions; default ``arange(S)`` per row, as in transformers), ``labels`` ``[B, S]``
            (unshifted, -100 = ignore) or ``shift_labels`` ``[B, S]`` (already shifted). The
            keys that padding-free collators add beside restarting ``position_ids`` (TRL's, and
            transformers' ``DataCollatorWithFlattening``: ``cu_seq_lens_q``, ``cu_seq_lens_k``,
            ``max_length_q``, ``max_length_k``, ``seq_idx``) are accepted for a single row: they
            must describe the documents that ``position_ids`` describe.
        group (`ProcessGroup`, *optional*): the context-parallel group (None: default group).
        layout (`str`): ``"zigzag"`` (default), ``"contiguous"`` or ``"striped"``; must match
            :func:`~hf_ring_attention.patch_model`.
        num_items_in_batch (`int` or `float`, *optional*): what the sum of the token losses is
            divided by; default: the number of targets of this batch (at least 1). Pass the count
            over all micro-batches when accumulating gradients, or over all data-parallel replicas.
        check (`bool`): whether the patched model, before its first ring, checks that every rank
            of the group was given the same full batch: the checksum and shape of the batch join
            the all-gather in which the ranks compare the ring's inputs (once per plan, so once
            per batch and sliding window, before any other communication of the forward pass).
            Ranks that were given different batches then all raise a ``ValueError`` naming each
            rank's batch shape and checksum, instead of training on mixed data or aborting in the
            ring. False trusts the ranks: no all-gather at all. ``shard_batch`` itself never
            communicates; :func:`check_same_batch` runs the batch check explicitly.

    Returns:
        `dict` with ``input_ids`` and ``position_ids`` ``[1, tokens]`` (this rank's tokens with
        their global positions), ``attention_mask`` ``[1, tokens]`` (bool, False on the layout's
        padding: the real tokens, which Trainer and TRL token counts read), ``ring_batch``
        (:class:`RingBatch`), ``use_cache=False``, and when labels are given ``labels`` and
        ``shift_labels`` (both the shifted targets of this rank's tokens, -100 at document ends
        and on padding) and ``num_items_in_batch``.

    Summed over the ranks of the group, the model's losses are the token-mean loss of the whole
    batch on one device, and so are the summed gradients.
    """
    world_size, rank = group_size(group), group_rank(group)
    check_layout(layout)
    input_ids, mask, positions, targets, start = _check_batch(batch)
    b, s = input_ids.shape
    # every document is padded to the layout's multiple, so a batch shorter than it is exact too
    # (some ranks then hold only layout padding: no attention, no loss), e.g. the last, partly
    # filled batch of packed data
    multiple = layout_multiple(layout, world_size)
    bounds, lengths, real_flat, real_packed = batch_structure(mask, start, multiple)
    total = bounds[-1]
    pos = positions if positions is not None else torch.arange(s).expand(b, s)

    def packed(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((total,), fill, dtype=values.dtype)
        out[real_packed] = values.flatten()[real_flat]
        return out

    # Layout padding repeats its document's last real token: it never attends nor is attended to,
    # but a padding id whose embedding is zero (padding_idx) makes degenerate activations whose
    # backward is 0 * inf = NaN in some models (Gemma 3n's AltUp magnitudes).
    last_real = torch.full((total,), -1, dtype=torch.long)
    last_real[real_packed] = real_packed
    last_real = torch.cummax(last_real, 0).values
    local = local_indices(bounds, layout, world_size, rank)
    device = batch["input_ids"].device
    real = torch.zeros(total, dtype=torch.bool)
    real[real_packed] = True
    local_mask = real[local]
    out = {
        "input_ids": packed(input_ids, 0)[last_real][local][None].to(device),
        "position_ids": packed(pos, 0)[local][None].to(device),
        "attention_mask": local_mask[None].to(device),
        "use_cache": False,
    }
    num_targets = 0 if targets is None else int((targets != IGNORE_INDEX).sum())
    if targets is not None:
        shifted = packed(targets, IGNORE_INDEX)[local][None].to(device)
        out["labels"] = shifted  # the loss is computed only when labels are given; it reads shift_labels
        out["shift_labels"] = shifted
        out["num_items_in_batch"] = max(num_targets, 1) if num_items_in_batch is None else num_items_in_batch
    out["ring_batch"] = RingBatch(
        bounds=bounds, lengths=lengths, batch_shape=(b, s), real_packed=real_packed,
        real_flat=real_flat, group=group, layout=layout, world_size=world_size, rank=rank,
        fingerprint=_fingerprint(input_ids, mask, positions, targets), num_targets=num_targets,
        local_mask=local_mask, check=check and world_size > 1,
    )
    return out


def _fingerprint(*tensors) -> int:
    """A cheap checksum of a batch (position-weighted sums, so permutations differ)."""
    total = 0
    for i, t in enumerate(tensors):
        if t is not None:
            flat = t.flatten().long()
            weights = torch.arange(1, flat.numel() + 1, dtype=torch.long) % 1000003
            total = (total * 31 + int((flat * weights).sum()) + 7 * (i + 1) * flat.numel()) % (1 << 61)
    return total


def check_same_batch(ring_batch: RingBatch, device: torch.device | None = None) -> None:
    """Raise on every rank of the context-parallel group if its ranks were not all given the
    same full batch: one all-gather of a few integers (checksum, batch shape, real tokens),
    whose size does not depend on the batch, so ranks with batches of different shapes raise
    too instead of failing in a later collective. A collective: call it on every rank of the
    group. The patched model makes the same check by itself when ``shard_batch(..., check=True)``
    (in the all-gather that precedes its first ring).

    Args:
        ring_batch (:class:`RingBatch`): the ``ring_batch`` of this rank's :func:`shard_batch`.
        device (`torch.device`, *optional*): where the all-gather runs; default: the current CUDA
            device for an NCCL group, else the CPU.

    Raises:
        ValueError: naming every rank's batch shape, real tokens and checksum.
    """
    if ring_batch.world_size > 1:
        device = collective_device(ring_batch.group) if device is None else device
        mine = torch.tensor([ring_batch.fingerprint, *ring_batch.batch_shape, ring_batch.num_tokens],
                            dtype=torch.long, device=device)
        every = [torch.empty_like(mine) for _ in range(ring_batch.world_size)]
        dist.all_gather(every, mine, group=ring_batch.group)
        check_same_batches([t.tolist() for t in every])


def _check_batch(batch: dict):
    """Validate a full batch (host copies); returns input_ids, mask, positions, shifted targets
    and document starts."""
    unknown = sorted(set(batch) - set(BATCH_KEYS) - set(PACKING_KEYS))
    if unknown:
        raise ValueError(
            f"shard_batch does not know how to shard {unknown}; it takes {list(BATCH_KEYS)} (and "
            f"{list(PACKING_KEYS)} beside restarting position_ids)"
        )
    if "input_ids" not in batch:
        raise ValueError("shard_batch needs input_ids [B, S]")
    input_ids = batch["input_ids"].cpu()
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be [B, S] with B, S > 0, got shape {tuple(input_ids.shape)}")
    shape = tuple(input_ids.shape)

    def matching(name):
        t = batch.get(name)
        if t is None:
            return None
        t = t.cpu()
        if name == "position_ids" and t.dim() == 2 and t.shape[0] == 1:
            t = t.expand(shape)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has shape {shape}")
        return t

    mask = matching("attention_mask")
    mask = torch.ones(shape, dtype=torch.bool) if mask is None else mask.bool()
    if not mask.any():
        raise ValueError("attention_mask masks every token of the batch")
    check_edge_padding(mask)
    positions = matching("position_ids")
    labels, shift_labels = matching("labels"), matching("shift_labels")
    if labels is not None and shift_labels is not None:
        raise ValueError("pass either labels (shifted here) or shift_labels (already shifted), not both")
    targets = None
    if labels is not None:
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
    elif shift_labels is not None:
        targets = shift_labels.clone()
    start = document_starts(mask, positions)
    _check_packing_keys(batch, mask, positions, start)
    if targets is not None:
        # no target across a document end or into padding
        nxt_starts = torch.ones(shape, dtype=torch.bool)
        nxt_starts[:, :-1] = start[:, 1:] | ~mask[:, 1:]
        targets = targets.masked_fill(nxt_starts | ~mask, IGNORE_INDEX)
    return input_ids, mask, positions, targets, start


def _check_packing_keys(batch: dict, mask: torch.Tensor, positions: torch.Tensor | None, start: torch.Tensor) -> None:
    """The keys of padding-free collators must describe the documents of ``position_ids``."""
    given = [k for k in PACKING_KEYS if batch.get(k) is not None]
    if not given:
        return
    if positions is None:
        raise ValueError(
            f"{given} describe packed documents, but position_ids are missing; pass the position_ids "
            f"that restart at 0 at each document (as TRL's and transformers' padding-free collators do)"
        )
    if mask.shape[0] != 1 or not mask.all():
        raise ValueError(
            f"{given} describe the documents of one flattened row without padding, but input_ids has "
            f"shape {tuple(mask.shape)} with {int((~mask).sum())} padding tokens"
        )
    starts = start[0].nonzero().flatten().tolist()
    bounds = starts + [mask.shape[1]]
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    for key in given:
        value = batch[key]
        if key.startswith("cu_seq_lens"):
            got = value.flatten().tolist() if isinstance(value, torch.Tensor) else list(value)
            expected = bounds
        elif key.startswith("max_length"):
            got = int(value)
            expected = longest
        else:  # seq_idx: the document of every token
            got = value.flatten().tolist() if isinstance(value, torch.Tensor) else list(value)
            expected = (torch.cumsum(start[0].long(), 0) - 1).tolist()
        if got != expected:
            raise ValueError(
                f"{key}={short(got)} does not describe the documents of position_ids (documents "
                f"restart at positions {short(starts)} of the row, so {key} should be "
                f"{short(expected)}); build position_ids and {key} from the same documents"
            )


def check_edge_padding(mask: torch.Tensor) -> None:
    """Refuse a [B, S] padding mask with padding between the tokens of a row: only left or right
    padding describes documents (packed documents restart their ``position_ids`` instead)."""
    runs = mask[:, 0].long() + (mask[:, 1:] & ~mask[:, :-1]).sum(1)
    if (runs > 1).any():
        row = int((runs > 1).nonzero()[0])
        raise ValueError(
            f"row {row} of attention_mask has padding between its tokens; only left or right "
            f"padding is supported (pack documents with position_ids instead)"
        )


def count_targets(batch: dict) -> int:
    """Number of target tokens of a full (unsharded) batch, as :func:`shard_batch` counts them:
    the ``num_items_in_batch`` that makes the summed loss a token mean. Sum it over the
    micro-batches of a gradient-accumulation step and over data-parallel replicas."""
    targets = _check_batch(batch)[3]
    return 0 if targets is None else int((targets != IGNORE_INDEX).sum())
