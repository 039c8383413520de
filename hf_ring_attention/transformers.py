"""transformers integration: ``patch_model``, ``unpatch_model`` and the attention function.

The attention function is registered in transformers' ``AttentionInterface`` (and a mask function
in ``AttentionMaskInterface``) as ``"hf_ring_attention"``; ``patch_model`` switches one model's
config to it. The model is then fed this rank's shard of each batch, made by
:func:`hf_ring_attention.shard_batch`, whose :class:`~hf_ring_attention.RingBatch` reaches the
attention function through the model's keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.utils import logging

from . import _compat
from .batch import RingBatch, batch_structure, check_edge_padding, document_starts
from .agreement import check_ranks_agree
from .distributed import group_rank, group_size
from .families import ROUTER_AUX_LOSS, attention_modules, check_model
from .layout import check_layout
from .loss import resolve_chunked_loss, set_chunked_loss
from .mlp import resolve_tiled_mlp, set_tiled_mlp
from .ring import ring_attention_with_plan

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

logger = logging.get_logger(__name__)

ATTN_NAME = "hf_ring_attention"
"""The name under which the ring is registered in transformers' attention and mask interfaces.
It must not contain "flash": transformers treats such names as flash-attention kernels to load."""


# ------------------------------------------------------------------------ the attention
class _ForwardScope:
    """Structures of plain (unsharded) batches at world size 1, built once per forward pass of the
    patched model and reused by every layer. Hooks on the model's decoder open the scope before
    its forward and close it after (also when it raises); outside a scope (for instance when
    activation checkpointing recomputes a layer in the backward pass) nothing is cached. Entries
    hold the mask and position tensors they were built from and match by identity, so a tensor
    that is freed cannot pass its id on to a stale entry."""

    def __init__(self):
        self.depth = 0
        self.entries: list[tuple[object, object, RingBatch]] | None = None

    def open(self, module, args, kwargs) -> None:
        if self.depth == 0:
            self.entries = []
        self.depth += 1

    def close(self, module, args, kwargs, output) -> None:
        self.depth = max(self.depth - 1, 0)
        if self.depth == 0:
            self.entries = None

    def batch(self, mask, positions, build) -> RingBatch:
        if self.entries is None:
            return build()
        for m, p, ring_batch in self.entries:
            if m is mask and p is positions:
                return ring_batch
        ring_batch = build()
        self.entries.append((mask, positions, ring_batch))
        return ring_batch


@dataclass(frozen=True)
class _Settings:
    group: ProcessGroup | None
    layout: str
    backend: str | None
    scope: _ForwardScope
    windows: set  # the patch state's: every window the layers attend with


def ring_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           sliding_window=None, softcap=None, s_aux=None, ring_batch: RingBatch | None = None,
                           **kwargs):
    """The transformers attention function (registered as ``"hf_ring_attention"``).

    query ``[B, Hq, S, D]``, key/value ``[B, Hkv, S, D]`` -> ``([B, S, Hq, D], None)``. Gemma 2's
    logit softcap arrives as ``softcap``, GPT-OSS's per-head attention sinks (the module's
    ``sinks``) as ``s_aux``; both go to the ring.

    Under ``torch.autocast``, q, k and v are cast to the autocast dtype (the rotary embedding
    returns float32 q and k while v is in the autocast dtype), as transformers' SDPA and
    flash-attention paths do; the ring then runs outside autocast, so that its float32
    accumulation stays float32.
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
        positions = kwargs.get("position_ids")
        ring_batch = settings.scope.batch(
            attention_mask, positions, lambda: _single_rank_batch(query, attention_mask, positions, settings))
        unpack = True
    else:
        try:
            _check_shard(ring_batch, attention_mask, query, settings)
        except ValueError as error:
            plan = ring_batch.plan(sliding_window)
            if ring_batch.world_size > 1 and not plan.agreed:
                # the other ranks are about to compare their inputs with this one: tell them
                check_ranks_agree(plan, query, key, settings.group, ring_batch.world_size, error)
            raise
        unpack = False
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):  # the ring itself then runs with autocast off
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    b, hq, s, d = query.shape
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
    if unpack:
        rows = ring_batch.real_flat.to(q.device)
        q, k, v = (t.index_select(0, rows) for t in (q, k, v))
    settings.windows.add(sliding_window)
    out = ring_attention_with_plan(
        q, k, v, ring_batch.plan(sliding_window), group=settings.group, softmax_scale=scaling,
        backend=settings.backend, softcap=softcap, sinks=s_aux,
    )
    if unpack:
        out = out.new_zeros(b * s, hq, d).index_copy(0, rows, out)
    return out.view(b, s, hq, d), None


def _check_shard(ring_batch: RingBatch, attention_mask, query, settings: _Settings) -> None:
    """A sharded batch: the settings and the padding mask must match it (the ranks compare the
    batch itself before the first ring: see ``RingBatch.plan``)."""
    if ring_batch.layout != settings.layout:
        raise ValueError(
            f"the batch was sharded with layout={ring_batch.layout!r} but the model was patched with "
            f"layout={settings.layout!r}"
        )
    if query.shape[0] != 1:
        raise ValueError(f"a sharded batch is one packed row, got query batch size {query.shape[0]}")
    if attention_mask is not None and not _is_shard_mask(ring_batch, attention_mask):
        raise ValueError(
            "shard_batch already encodes padding and documents: pass the attention_mask it returns "
            "unchanged (it marks this rank's layout padding), or none"
        )


def _is_shard_mask(ring_batch: RingBatch, mask: torch.Tensor) -> bool:
    """Whether ``mask`` is the ``[1, tokens]`` mask of this shard's real tokens. Compared by value
    once per mask object (a host sync; transformers makes one or two per forward pass, shared by
    the layers); the last masks that passed are remembered on the batch."""
    seen = ring_batch._masks
    if any(m is mask for m in seen):
        return True
    expected = ring_batch.local_mask
    ok = (expected is not None and mask.dim() == 2 and tuple(mask.shape) == (1, expected.numel())
          and torch.equal(mask[0].bool().cpu(), expected))
    if ok:
        seen[:] = seen[-3:] + [mask]
    return ok


def _refuse_unsupported(module, query, key, dropout, kwargs) -> None:
    if dropout and module.training:
        raise NotImplementedError(
            f"attention dropout ({dropout}) is not supported by ring attention (its backward would need "
            f"the random state of every block); set config.attention_dropout = 0.0"
        )
    if kwargs.get("sinks") is not None:
        raise NotImplementedError(
            "per-token attention sinks (the sinks= keyword) are not supported by ring attention; per-head "
            "sinks (s_aux=) are")
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("additive position bias is not supported by ring attention")
    if kwargs.get("output_router_logits") and group_size(module._ring_attention.group) > 1:
        raise NotImplementedError(ROUTER_AUX_LOSS)
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
    padding (2-D mask from transformers' flash mask function) and where ``position_ids`` restart
    (packed documents stay separate, with or without an attention mask). Padding between the
    tokens of a row is refused, as in :func:`shard_batch`."""
    b, _, s, _ = query.shape
    mask = torch.ones(b, s, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    if mask.shape != (b, s):
        raise ValueError(f"expected a [B, S] padding mask, got shape {tuple(mask.shape)}")
    check_edge_padding(mask)
    positions = None
    if position_ids is not None:
        positions = position_ids.cpu().expand(b, s)
    bounds, lengths, real_flat, real_packed = batch_structure(mask, document_starts(mask, positions), 1)
    return RingBatch(bounds, lengths, (b, s), real_packed, real_flat, None, settings.layout, 1, 0)


AttentionInterface.register(ATTN_NAME, ring_attention_forward)
# Registering a mask function makes transformers hand the attention function the 2-D padding
# mask (None without padding); without it the padding would be silently dropped.
AttentionMaskInterface.register(ATTN_NAME, _compat.padding_mask_function())


# ------------------------------------------------------------------------------ patching
@dataclass
class _PatchState:
    """Kept on the patched transformers model: what to restore, the settings its attention
    modules share, and the hooks that open and close the forward scope on its decoder."""

    previous: str | None
    scope: _ForwardScope
    hooks: list
    settings: _Settings | None = None
    # the sliding windows (None: full attention) the model's layers have attended with; batches
    # sharded by the plugin or the callback get these plans built before the forward
    windows: set = field(default_factory=set)


def inner_model(model):
    """The transformers model that patching acts on: ``model``, or the base model of a PEFT model
    (so the patch lives on the model that ``merge_and_unload`` returns)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def patch_model(model, *, group: ProcessGroup | None = None, layout: str = "zigzag", backend: str | None = None,
                chunked_loss: bool | int = False, tiled_mlp: bool | int = False):
    """Make a transformers causal LM use ring attention. Idempotent; see :func:`unpatch_model`.

    Args:
        model (`PreTrainedModel` or `PeftModel`): a transformers causal LM (or base model) whose
            attention ring attention can compute exactly: causal self-attention through
            transformers' attention interface, rotary or no positions, optional sliding windows
            (see :mod:`hf_ring_attention.families` and the README's support table); or a PEFT
            model around one (its base model is patched, before or after ``get_peft_model``;
            ``merge_and_unload()`` then returns the patched model).
        group (`ProcessGroup`, *optional*): the context-parallel group (None: default group).
        layout (`str`): ``"zigzag"`` (default), ``"contiguous"`` or ``"striped"``; shard batches
            with the same layout (:func:`shard_batch`).
        backend (`str`, *optional*): kernel backend (``"flash_attn_4"``, ``"flash_attn"``, ``"torch_flash"``, ``"cpu"``);
            default: automatic, or the ``HF_RING_ATTENTION_BACKEND`` environment variable.
        chunked_loss (`bool` or `int`): compute the training loss over chunks of tokens without
            materialising the ``[tokens, vocab]`` logits (:mod:`hf_ring_attention.loss`); an int
            is the chunk size in tokens. Training forwards given ``labels`` then return
            ``logits=None``; evaluation and forwards without labels return logits as usual.
        tiled_mlp (`bool` or `int`): run every decoder layer's MLP over chunks of tokens (1024,
            or this many) and recompute it in the backward, so that it keeps only its input for
            the backward pass (:mod:`hf_ring_attention.mlp`).

    Returns:
        The same ``model``, switched to the ``"hf_ring_attention"`` attention implementation. Only
        this model's config changes (models built from one shared config object share it).

    Raises:
        NotImplementedError: for models or features ring attention cannot compute exactly
            (every reason is named: other heads, cross-attention, recurrent or other layer types,
            sequence-length dependent rotary types, softcaps or sinks the attention does not pass on, ...).
    """
    check_layout(layout)
    group_rank(group)  # raises if this process is not in the group
    target = inner_model(model)
    check_model(target, world_size=group_size(group))  # refuses what the ring cannot compute exactly
    chunk, tile = resolve_chunked_loss(target, chunked_loss), resolve_tiled_mlp(target, tiled_mlp)
    state = getattr(target, "_hf_ring_attention", None)
    if state is None:
        scope = _ForwardScope()
        decoder = target.base_model
        hooks = [decoder.register_forward_pre_hook(scope.open, with_kwargs=True),
                 decoder.register_forward_hook(scope.close, with_kwargs=True, always_call=True)]
        state = _PatchState(_compat.requested_attn_implementation(target.config), scope, hooks)
        target._hf_ring_attention = state
    elif target.config._attn_implementation != ATTN_NAME:
        # switched to another implementation since: that is the one to restore now
        state.previous = _compat.requested_attn_implementation(target.config)
    if target.config._attn_implementation != ATTN_NAME:
        target.set_attn_implementation(ATTN_NAME)
    state.settings = _Settings(group, layout, backend, state.scope, state.windows)
    for m in attention_modules(target):
        m._ring_attention = state.settings
    set_chunked_loss(target, chunk)
    set_tiled_mlp(target, tile)
    return model


def unpatch_model(model):
    """Undo :func:`patch_model`: restore the previous attention implementation exactly.

    ``model`` may be the patched model or a PEFT model around it, whichever was passed to
    :func:`patch_model`. Returns ``model``."""
    target = inner_model(model)
    state = getattr(target, "_hf_ring_attention", None)
    if state is None:
        return model
    _compat.restore_attn_implementation(target.config, state.previous)
    set_chunked_loss(target, None)
    set_tiled_mlp(target, None)
    for hook in state.hooks:
        hook.remove()
    for m in attention_modules(target):
        if hasattr(m, "_ring_attention"):
            del m._ring_attention
    del target._hf_ring_attention
    return model


def attention_windows(model) -> tuple[int | None, ...]:
    """The sliding windows (None: full attention) the layers of a model patched by
    :func:`patch_model` have attended with so far: the plans worth building for a batch before
    its forward (:meth:`RingBatch.prepare`). Empty before the first forward pass."""
    state = getattr(inner_model(model), "_hf_ring_attention", None)
    return () if state is None else tuple(state.windows)


def is_patched(model) -> bool:
    """Whether ``model`` (or the base model of a PEFT model) runs ring attention: patched by
    :func:`patch_model` and still set to its attention implementation."""
    target = inner_model(model)
    config = getattr(target, "config", None)
    return (getattr(target, "_hf_ring_attention", None) is not None
            and getattr(config, "_attn_implementation", None) == ATTN_NAME)
