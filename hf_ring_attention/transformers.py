"""transformers integration: ``patch_model``, ``shard_batch`` and the attention function.

A batch of B rows becomes one packed buffer of documents (rows split at padding and at restarts of
``position_ids``; user padding is dropped and every document is padded to the layout's multiple).
Each rank feeds the model its shard as a single row ``[1, tokens]`` with global ``position_ids``
(exact rotary embeddings), ``shift_labels`` computed on the whole sequence (no target lost at a
shard boundary), the global target count ``num_items_in_batch``, and a :class:`RingBatch` that
the attention function reads: the global document boundaries and, per sliding window, a plan made
once per batch and shared by every layer and by the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.utils import logging

from .distributed import group_rank, group_size
from .layout import check_layout, layout_multiple, local_indices
from .plan import RingPlan
from .ring import ring_attention_with_plan
from .sharding import unshard

logger = logging.get_logger(__name__)

ATTN_NAME = "hf_ring_attention"
"""The name under which the ring is registered in transformers' attention and mask interfaces.
It must not contain "flash": transformers treats such names as flash-attention kernels to load."""

IGNORE_INDEX = -100
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
BATCH_KEYS = ("input_ids", "attention_mask", "position_ids", "labels", "shift_labels")


# ----------------------------------------------------------------------------- the batch
@dataclass
class RingBatch:
    """The global structure of one sharded batch, shared by every layer (built by
    :func:`shard_batch`; pass it to the model as the ``ring_batch`` keyword).

    Attributes:
        cu_seqlens (`list[int]`): boundaries of the padded documents in the packed buffer.
        seqused (`list[int]`): real tokens of each document (the rest is layout padding).
        batch_shape (`tuple[int, int]`): (B, S) of the original batch.
        real_packed (`torch.Tensor`): packed position of every real token of the batch.
        real_flat (`torch.Tensor`): its position ``b * S + s`` in the original batch.
        group, layout, world_size, rank: the sequence-parallel setting.
        fingerprint (`int`): a checksum of the full batch, to check that every rank of the group
            was given the same one (:func:`check_same_batch`).
        num_targets (`int`): target tokens of the full batch (0 without labels).
    """

    cu_seqlens: list[int]
    seqused: list[int]
    batch_shape: tuple[int, int]
    real_packed: torch.Tensor
    real_flat: torch.Tensor
    group: object
    layout: str
    world_size: int
    rank: int
    fingerprint: int = 0
    num_targets: int = 0
    _plans: dict = field(default_factory=dict, repr=False)

    def plan(self, window_size: int | None) -> RingPlan:
        """The (cached) causal plan of this batch for one sliding window (None: no window)."""
        if window_size not in self._plans:
            self._plans[window_size] = RingPlan(
                self.cu_seqlens, world_size=self.world_size, rank=self.rank, layout=self.layout,
                causal=True, window_size=window_size, seqused=self.seqused,
            )
        return self._plans[window_size]

    def gather(self, x_local: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """This rank's per-token outputs (``[1, tokens, ...]``, e.g. logits or hidden states)
        gathered from every rank into the original batch order ``[B, S, ...]``. Positions that
        were padding in the input get ``fill``. One all-gather; differentiable."""
        if x_local.dim() < 2 or x_local.shape[0] != 1:
            raise ValueError(f"expected [1, tokens, ...] outputs of a sharded batch, got shape {tuple(x_local.shape)}")
        full = unshard(x_local[0], self.cu_seqlens, group=self.group, layout=self.layout)
        b, s = self.batch_shape
        out = full.new_full((b * s, *full.shape[1:]), fill)
        out = out.index_copy(0, self.real_flat.to(full.device), full.index_select(0, self.real_packed.to(full.device)))
        return out.view(b, s, *full.shape[1:])


def _document_starts(mask: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """[B, S] flags of the tokens that start a document: the first real token of a row, the first
    after padding, and where positions restart."""
    start = mask.clone()
    start[:, 1:] &= ~mask[:, :-1]
    if positions is not None:
        start[:, 1:] |= mask[:, 1:] & (positions[:, 1:] != positions[:, :-1] + 1)
    return start


def _batch_structure(mask: torch.Tensor, start: torch.Tensor, multiple: int):
    """Padded document boundaries and the packed position of every real token, from the [B, S]
    padding mask and document starts."""
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
    group=None,
    layout: str = "zigzag",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> dict:
    """This rank's part of a full causal-LM batch, as keyword arguments for ``model(**...)``.

    Args:
        batch (`dict`): the full batch, identical on every rank of ``group``: ``input_ids``
            ``[B, S]``, and optionally ``attention_mask`` ``[B, S]`` (1 = token, 0 = left or
            right padding), ``position_ids`` ``[B, S]`` (packed documents restart their
            positions; default ``arange(S)`` per row, as in transformers), ``labels`` ``[B, S]``
            (unshifted, -100 = ignore) or ``shift_labels`` ``[B, S]`` (already shifted).
        group (`ProcessGroup`, *optional*): the sequence-parallel group (None: default group).
        layout (`str`): ``"zigzag"`` (default), ``"contiguous"`` or ``"striped"``; must match
            :func:`patch_model`.
        num_items_in_batch (`int` or `float`, *optional*): what the sum of the token losses is
            divided by; default: the number of targets of this batch (at least 1). Pass the count
            over all micro-batches when accumulating gradients, or over all data-parallel replicas.

    Returns:
        `dict` with ``input_ids`` and ``position_ids`` ``[1, tokens]`` (this rank's tokens with
        their global positions), ``ring_batch`` (:class:`RingBatch`), ``use_cache=False``, and when
        labels are given ``labels`` and ``shift_labels`` (both the shifted targets of this rank's
        tokens, -100 at document ends and on padding) and ``num_items_in_batch``.

    Summed over the ranks of the group, the model's losses are the token-mean loss of the whole
    batch on one device, and so are the summed gradients.
    """
    world_size, rank = group_size(group), group_rank(group)
    check_layout(layout)
    input_ids, mask, positions, targets, start = _check_batch(batch)
    b, s = input_ids.shape
    multiple = layout_multiple(layout, world_size)
    if world_size > 1 and s < multiple:
        raise ValueError(
            f"sequence length {s} is shorter than the {multiple} tokens that layout={layout!r} needs "
            f"to give every one of {world_size} ranks a piece; use fewer sequence-parallel ranks"
        )
    bounds, lengths, real_flat, real_packed = _batch_structure(mask, start, multiple)
    total = bounds[-1]
    pos = positions if positions is not None else torch.arange(s).expand(b, s)

    def packed(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((total,), fill, dtype=values.dtype)
        out[real_packed] = values.flatten()[real_flat]
        return out

    local = local_indices(bounds, layout, world_size, rank)
    device = batch["input_ids"].device
    out = {
        "input_ids": packed(input_ids, 0)[local][None].to(device),
        "position_ids": packed(pos, 0)[local][None].to(device),
        "use_cache": False,
    }
    num_targets = 0 if targets is None else int((targets != IGNORE_INDEX).sum())
    if targets is not None:
        shifted = packed(targets, IGNORE_INDEX)[local][None].to(device)
        out["labels"] = shifted  # the loss is computed only when labels are given; it reads shift_labels
        out["shift_labels"] = shifted
        out["num_items_in_batch"] = max(num_targets, 1) if num_items_in_batch is None else num_items_in_batch
    out["ring_batch"] = RingBatch(
        cu_seqlens=bounds, seqused=lengths, batch_shape=(b, s), real_packed=real_packed,
        real_flat=real_flat, group=group, layout=layout, world_size=world_size, rank=rank,
        fingerprint=_fingerprint(input_ids, mask, positions, targets), num_targets=num_targets,
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


def check_same_batch(ring_batch: RingBatch, device=None) -> None:
    """Raise on every rank of the sequence-parallel group if its ranks were not all given the
    same full batch (one all-gather of a checksum)."""
    import torch.distributed as dist

    if ring_batch.world_size == 1:
        return
    mine = torch.tensor([ring_batch.fingerprint], dtype=torch.long, device=device)
    every = [torch.empty_like(mine) for _ in range(ring_batch.world_size)]
    dist.all_gather(every, mine, group=ring_batch.group)
    values = [int(t) for t in every]
    if len(set(values)) > 1:
        raise ValueError(
            f"the ranks of a sequence-parallel group were given different batches (checksums by "
            f"rank: {values}); every rank of the group must load the same batch (use the same seed "
            f"and data order, e.g. accelerate.utils.set_seed before building the dataloader)"
        )


def _check_batch(batch: dict):
    """Validate a full batch (host copies); returns input_ids, mask, positions, shifted targets."""
    unknown = sorted(set(batch) - set(BATCH_KEYS))
    if unknown:
        raise ValueError(f"shard_batch does not know how to shard {unknown}; it takes {list(BATCH_KEYS)}")
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
    runs = mask[:, 0].long() + (mask[:, 1:] & ~mask[:, :-1]).sum(1)
    if (runs > 1).any():
        row = int((runs > 1).nonzero()[0])
        raise ValueError(
            f"row {row} of attention_mask has padding between its tokens; only left or right "
            f"padding is supported (pack documents with position_ids instead)"
        )
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
    start = _document_starts(mask, positions)
    if targets is not None:
        # no target across a document end or into padding
        nxt_starts = torch.ones(shape, dtype=torch.bool)
        nxt_starts[:, :-1] = start[:, 1:] | ~mask[:, 1:]
        targets = targets.masked_fill(nxt_starts | ~mask, IGNORE_INDEX)
    return input_ids, mask, positions, targets, start


def count_targets(batch: dict) -> int:
    """Number of target tokens of a full (unsharded) batch, as :func:`shard_batch` counts them:
    the ``num_items_in_batch`` that makes the summed loss a token mean. Sum it over the
    micro-batches of a gradient-accumulation step and over data-parallel replicas."""
    targets = _check_batch(batch)[3]
    return 0 if targets is None else int((targets != IGNORE_INDEX).sum())


# ------------------------------------------------------------------------ the attention
@dataclass(frozen=True)
class _Settings:
    group: object
    layout: str
    backend: str | None


def ring_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           sliding_window=None, ring_batch: RingBatch | None = None, **kwargs):
    """The transformers attention function (registered as ``"hf_ring_attention"``).

    query ``[B, Hq, S, D]``, key/value ``[B, Hkv, S, D]`` -> ``([B, S, Hq, D], None)``.
    """
    settings: _Settings | None = getattr(module, "_ring_attention", None)
    if settings is None:
        raise RuntimeError("this attention module was not patched: call hf_ring_attention.patch_model(model)")
    _refuse_unsupported(module, query, key, dropout, kwargs)
    if ring_batch is None:
        if group_size(settings.group) > 1:
            raise ValueError(
                "ring attention on more than one rank needs each rank's shard of the batch: call "
                "model(**hf_ring_attention.shard_batch(batch, group=..., layout=...))"
            )
        ring_batch = _single_rank_batch(query, attention_mask, kwargs.get("position_ids"), settings)
        unpack = True
    else:
        if attention_mask is not None:
            raise ValueError("shard_batch already encodes padding and documents; do not also pass attention_mask")
        if ring_batch.layout != settings.layout:
            raise ValueError(
                f"the batch was sharded with layout={ring_batch.layout!r} but the model was patched with "
                f"layout={settings.layout!r}"
            )
        if query.shape[0] != 1:
            raise ValueError(f"a sharded batch is one packed row, got query batch size {query.shape[0]}")
        unpack = False
    b, hq, s, d = query.shape
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
    if unpack:
        rows = ring_batch.real_flat.to(q.device)
        q, k, v = (t.index_select(0, rows) for t in (q, k, v))
    out = ring_attention_with_plan(
        q, k, v, ring_batch.plan(sliding_window), group=settings.group, softmax_scale=scaling,
        backend=settings.backend,
    )
    if unpack:
        out = out.new_zeros(b * s, hq, d).index_copy(0, rows, out)
    return out.view(b, s, hq, d), None


def _refuse_unsupported(module, query, key, dropout, kwargs) -> None:
    if dropout and module.training:
        raise NotImplementedError(
            f"attention dropout ({dropout}) is not supported by ring attention (its backward would need "
            f"the random state of every block); set config.attention_dropout = 0.0"
        )
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit softcapping is not supported by ring attention")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks are not supported by ring attention")
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("additive position bias is not supported by ring attention")
    if kwargs.get("output_attentions"):
        raise NotImplementedError("ring attention never materialises attention weights: output_attentions=True is not supported")
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise NotImplementedError("ring attention supports causal self-attention only (this call is not causal)")
    if key.shape[2] != query.shape[2]:
        raise NotImplementedError(
            f"a KV cache is not supported by ring attention (queries: {query.shape[2]} tokens, keys: "
            f"{key.shape[2]}); generate with the original attention: hf_ring_attention.unpatch_model(model)"
        )


def _single_rank_batch(query, attention_mask, position_ids, settings: _Settings) -> RingBatch:
    """Structure of a plain (unsharded) batch on a single rank: rows are split into documents at
    padding (2-D mask from transformers' flash mask function) and at position restarts."""
    b, _, s, _ = query.shape
    mask = torch.ones(b, s, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    if mask.shape != (b, s):
        raise ValueError(f"expected a [B, S] padding mask, got shape {tuple(mask.shape)}")
    positions = None
    if position_ids is not None:
        positions = position_ids.cpu().expand(b, s)
    bounds, lengths, real_flat, real_packed = _batch_structure(mask, _document_starts(mask, positions), 1)
    return RingBatch(bounds, lengths, (b, s), real_packed, real_flat, None, settings.layout, 1, 0)


AttentionInterface.register(ATTN_NAME, ring_attention_forward)
# Registering a mask function makes transformers hand the attention function the 2-D padding
# mask (None without padding); without it the padding would be silently dropped.
AttentionMaskInterface.register(ATTN_NAME, flash_attention_mask)


# ------------------------------------------------------------------------------ patching
@dataclass
class _PatchState:
    previous: str | None
    settings: _Settings


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "is_causal")]


def _check_supported(model) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"patch_model supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r} "
            f"({type(model).__name__})"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError(
            f"attention logit softcapping (attn_logit_softcapping={config.attn_logit_softcapping}) is not "
            f"supported by ring attention"
        )
    modules = _attention_modules(model)
    if not modules:
        raise NotImplementedError(f"found no attention modules in {type(model).__name__}")
    for m in modules:
        if getattr(m, "sinks", None) is not None:
            raise NotImplementedError("attention sinks are not supported by ring attention")
        if not m.is_causal:
            raise NotImplementedError(f"{type(m).__name__} is not causal; ring attention supports causal self-attention only")


def patch_model(model, *, group=None, layout: str = "zigzag", backend: str | None = None):
    """Make a transformers causal LM use ring attention. Idempotent; see :func:`unpatch_model`.

    Args:
        model (`PreTrainedModel`): a Llama, Mistral, Qwen2 or Qwen3 causal LM (or base model).
        group (`ProcessGroup`, *optional*): the sequence-parallel group (None: default group).
        layout (`str`): ``"zigzag"`` (default), ``"contiguous"`` or ``"striped"``; shard batches
            with the same layout (:func:`shard_batch`).
        backend (`str`, *optional*): kernel backend (``"flash_attn"``, ``"torch"``, ``"cpu"``);
            default: automatic, or the ``HF_RING_ATTENTION_BACKEND`` environment variable.

    Returns:
        The same model, switched to the ``"hf_ring_attention"`` attention implementation. Only
        this model's config changes (models built from one shared config object share it).

    Raises:
        NotImplementedError: for models or features ring attention cannot compute exactly
            (other model types, softcapping, attention sinks, non-causal attention).
    """
    check_layout(layout)
    group_rank(group)  # raises if this process is not in the group
    _check_supported(model)
    settings = _Settings(group, layout, backend)
    state = getattr(model, "_hf_ring_attention", None)
    if state is None:
        state = _PatchState(model.config._attn_implementation_internal, settings)
        model.set_attn_implementation(ATTN_NAME)
        model._hf_ring_attention = state
    state.settings = settings
    for m in _attention_modules(model):
        m._ring_attention = settings
    return model


def unpatch_model(model):
    """Undo :func:`patch_model`: restore the previous attention implementation exactly."""
    state = getattr(model, "_hf_ring_attention", None)
    if state is None:
        return model
    model.config._attn_implementation_internal = state.previous
    for m in _attention_modules(model):
        if hasattr(m, "_ring_attention"):
            del m._ring_attention
    del model._hf_ring_attention
    return model


def is_patched(model) -> bool:
    """Whether :func:`patch_model` is in effect on ``model``."""
    return getattr(model, "_hf_ring_attention", None) is not None
