"""transformers integration: ``patch_model``, ``unpatch_model`` and the attention function.

The attention function is registered in transformers' ``AttentionInterface`` (and a mask function
in ``AttentionMaskInterface``) as ``"hf_ring_attention"``; ``patch_model`` switches one model's
config to it. The model is then fed this rank's shard of each batch, made by
:func:`hf_ring_attention.shard_batch`, whose :class:`~hf_ring_attention.RingBatch` reaches the
attention function through the model's keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.utils import logging

from . import _compat
from .batch import RingBatch, batch_structure, document_starts
from .distributed import group_rank, group_size
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

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# ------------------------------------------------------------------------ the attention
@dataclass(frozen=True)
class _Settings:
    group: ProcessGroup | None
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
    bounds, lengths, real_flat, real_packed = batch_structure(mask, document_starts(mask, positions), 1)
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


def patch_model(model, *, group: ProcessGroup | None = None, layout: str = "zigzag", backend: str | None = None,
                chunked_loss: bool | int = False, tiled_mlp: bool | int = False):
    """Make a transformers causal LM use ring attention. Idempotent; see :func:`unpatch_model`.

    Args:
        model (`PreTrainedModel`): a Llama, Mistral, Qwen2 or Qwen3 causal LM (or base model).
        group (`ProcessGroup`, *optional*): the context-parallel group (None: default group).
        layout (`str`): ``"zigzag"`` (default), ``"contiguous"`` or ``"striped"``; shard batches
            with the same layout (:func:`shard_batch`).
        backend (`str`, *optional*): kernel backend (``"flash_attn"``, ``"torch"``, ``"cpu"``);
            default: automatic, or the ``HF_RING_ATTENTION_BACKEND`` environment variable.
        chunked_loss (`bool` or `int`): compute the training loss over chunks of tokens without
            materialising the ``[tokens, vocab]`` logits (:mod:`hf_ring_attention.loss`); an int
            is the chunk size in tokens. Training forwards given ``labels`` then return
            ``logits=None``; evaluation and forwards without labels return logits as usual.
        tiled_mlp (`bool` or `int`): run every decoder layer's MLP over chunks of tokens (1024,
            or this many) and recompute it in the backward, so that it keeps only its input for
            the backward pass (:mod:`hf_ring_attention.mlp`).

    Returns:
        The same model, switched to the ``"hf_ring_attention"`` attention implementation. Only
        this model's config changes (models built from one shared config object share it).

    Raises:
        NotImplementedError: for models or features ring attention cannot compute exactly
            (other model types, softcapping, attention sinks, non-causal attention), and a
            ``chunked_loss`` or ``tiled_mlp`` the model does not allow (see the message).
    """
    check_layout(layout)
    group_rank(group)  # raises if this process is not in the group
    _check_supported(model)
    chunk, tile = resolve_chunked_loss(model, chunked_loss), resolve_tiled_mlp(model, tiled_mlp)
    settings = _Settings(group, layout, backend)
    state = getattr(model, "_hf_ring_attention", None)
    if state is None:
        state = _PatchState(_compat.requested_attn_implementation(model.config), settings)
        model.set_attn_implementation(ATTN_NAME)
        model._hf_ring_attention = state
    state.settings = settings
    for m in _attention_modules(model):
        m._ring_attention = settings
    set_chunked_loss(model, chunk)
    set_tiled_mlp(model, tile)
    return model


def unpatch_model(model):
    """Undo :func:`patch_model`: restore the previous attention implementation exactly."""
    state = getattr(model, "_hf_ring_attention", None)
    if state is None:
        return model
    _compat.restore_attn_implementation(model.config, state.previous)
    set_chunked_loss(model, None)
    set_tiled_mlp(model, None)
    for m in _attention_modules(model):
        if hasattr(m, "_ring_attention"):
            del m._ring_attention
    del model._hf_ring_attention
    return model


def is_patched(model) -> bool:
    """Whether :func:`patch_model` is in effect on ``model``."""
    return getattr(model, "_hf_ring_attention", None) is not None
