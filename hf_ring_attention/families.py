"""Which transformers models ring attention computes exactly: the capability check behind
:func:`~hf_ring_attention.patch_model`, and the registry of families that need special handling.

Support is decided by what a model does, not by its name. The ring is exact for a model whose
token mixing is causal self-attention called through transformers' attention interface, with the
model's keyword arguments passed through every layer to it (that is how the batch structure of
:func:`~hf_ring_attention.shard_batch` reaches it), positions that enter only through
``position_ids`` (rotary embeddings that depend on positions alone, learned absolute positions, or
none), an optional sliding window per layer passed to the attention function, no additive bias
(ALiBi), no cross-attention, and a causal-LM head (or none). :func:`refusals` checks these from the
config, the classes and the modules, so a new family that attends like Llama is accepted without
a code change. What they cannot show goes in :data:`REGISTRY`, keyed by ``model_type``.

``tests/test_families.py`` runs every causal-LM family of the installed transformers that the
check accepts against the unpatched model, and generates the README's support table from it.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

from . import _compat

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
"""Values of ``config.layer_types`` the ring computes: causal attention, with or without a window."""

POSITIONAL_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")
"""Rotary types whose frequencies depend on the positions only: exact with global ``position_ids``."""

LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")
"""Rotary types that recompute their frequencies from the largest position in the input: each rank
of a ring would see only its own largest position, so the ranks would disagree."""


@dataclass(frozen=True)
class Refusal:
    """One reason why ring attention cannot compute a model exactly.

    Args:
        summary (`str`): a few words (the README's support table).
        detail (`str`): the full sentence of the error: the offending value, why, and the way out.
    """

    summary: str
    detail: str

    def __str__(self) -> str:
        return self.detail


@dataclass(frozen=True)
class Family:
    """What the capability check cannot see from a family's config, classes and modules.

    Args:
        refused (`Refusal`, *optional*): why ring attention cannot compute this family exactly
            (refused at patch time).
    """

    refused: Refusal | None = None


_DRAFT = Family(Refusal(
    "draft model (reads the target's key/values)",
    "it is a draft model for speculative decoding whose attention reads the key/value states of its target "
    "model (shared_kv_states), which the ring does not shard",
))

REGISTRY: dict[str, Family] = {
    "gemma4_assistant": _DRAFT,
    "gemma4_unified_assistant": _DRAFT,
}
"""Families that need special handling, by ``config.model_type``. ``tests/test_families.py``
shows which family needs an entry: one the check accepts but that differs from the unpatched
model."""


# ------------------------------------------------------------------------------ the check
def attention_modules(model) -> list:
    """The attention modules of ``model``: transformers marks each with ``is_causal``."""
    return [m for m in model.modules() if hasattr(m, "is_causal")]


def refusals(model, world_size: int = 1) -> list[Refusal]:
    """Why ring attention cannot compute ``model`` exactly (empty: it can).

    Args:
        model (`PreTrainedModel`): a transformers model (on any device, meta included: nothing runs).
        world_size (`int`): ranks of the context-parallel group (some features are exact on one).

    Returns:
        `list[Refusal]`: every reason found, in the order of the checks.
    """
    config = getattr(model, "config", None)
    if config is None:
        return [Refusal("not a transformers model", f"{type(model).__name__} is not a transformers model (it has no config)")]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    modules = attention_modules(model)
    found = [
        _head(model),
        _cross_attention(config, text),
        _multimodal(config),
        _keyword_arguments(model, modules),
        _layer_types(text),
        *_attention_modules(model, modules),
        *_positions(model, text),
        *_attention_features(text, modules),
        _router_aux_loss(text, world_size),
    ]
    for model_type in dict.fromkeys((_get(config, "model_type", None), _get(text, "model_type", None))):
        family = REGISTRY.get(model_type)
        if family is not None:
            found.append(family.refused)
    return list({r.summary: r for r in found if r is not None}.values())


def check_model(model, world_size: int = 1) -> None:
    """Raise ``NotImplementedError`` naming every reason of :func:`refusals`, if there is one."""
    found = refusals(model, world_size)
    if found:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise NotImplementedError(
            f"ring attention cannot compute {type(model).__name__} (model_type={model_type!r}) exactly: "
            + "; ".join(str(r) for r in found)
            + ". The README's 'Supported models' table lists every transformers causal LM and why each "
              "refused one is refused."
        )


# ------------------------------------------------------------------------------- the checks
_HEADS = {
    "ForSequenceClassification": "it pools the last real token of each row, which lives on one rank of the group",
    "ForTokenClassification": "shard_batch shifts labels for next-token prediction, and the token-classification "
                              "loss does not take num_items_in_batch",
    "ForQuestionAnswering": "it predicts start and end positions over whole rows, which no rank holds",
}


def _head(model) -> Refusal | None:
    """A head other than a causal LM. transformers' ``loss_type`` is None for base models and
    ``...LMHeadModel`` classes, whose loss is the causal-LM loss."""
    loss_type = _compat.loss_type(model)
    if loss_type in (None, "ForCausalLM", "ForConditionalGeneration"):
        return None
    why = _HEADS.get(loss_type, f"its loss ({loss_type}) is not the causal-LM loss that shard_batch prepares")
    return Refusal(
        f"{loss_type} head",
        f"{type(model).__name__} is not a causal language model: {why}. Patch the causal LM (...ForCausalLM) or "
        f"the base model, and compute other heads on outputs gathered with ring_batch.gather(...)",
    )


def _cross_attention(config, text) -> Refusal | None:
    if _get(config, "is_encoder_decoder", False) or _get(text, "add_cross_attention", False):
        return Refusal("cross-attention", "it has cross-attention (an encoder-decoder model); ring attention "
                                          "computes causal self-attention only")
    return None


_ENCODERS = ("vision_config", "audio_config", "speech_config", "vq_config")


def _multimodal(config) -> Refusal | None:
    encoders = [name for name in _ENCODERS if _get(config, name) is not None]
    if not encoders:
        return None
    return Refusal(
        "multimodal (text batches only)",
        f"it has an encoder for another modality (config.{encoders[0]}); shard_batch shards text batches only "
        f"(no pixel or audio values), and the encoder's attention would also be switched to the ring. Fine-tune "
        f"the text model (the causal LM of its text config) instead",
    )


def _keyword_arguments(model, modules) -> Refusal | None:
    """The keyword arguments given to ``model(...)`` (``ring_batch`` among them) must reach every
    attention call. transformers declares it per model class (``_supports_attention_backend``);
    the last hop, a layer calling its attention module, is also read from the layer's source,
    because a layer that drops them is a silent bug of that family."""
    cls = type(model)
    if not _compat.can_switch_attention(cls):
        return Refusal(
            "attention implementation cannot be switched",
            f"transformers cannot switch {cls.__name__} to another attention implementation (its attention does not "
            f"look its function up in the attention interface), so the ring would never run",
        )
    if not _compat.passes_kwargs_to_attention(cls):
        return Refusal(
            "keyword arguments do not reach attention",
            f"{cls.__name__} does not pass keyword arguments through its layers to the attention function "
            f"(transformers' _supports_attention_backend is False), so shard_batch's ring_batch cannot reach it",
        )
    parents = {id(child): (parent, name) for parent in model.modules() for name, child in parent.named_children()}
    for m in modules:
        parent, name = parents.get(id(m), (None, None))
        calls = _calls(_forward_source(parent), f"self.{name}") if parent is not None else []
        if calls and not any("**" in arguments for arguments in calls):
            return Refusal(
                "keyword arguments do not reach attention",
                f"{type(parent).__name__} calls its {type(m).__name__} without passing on its keyword arguments, "
                f"so shard_batch's ring_batch never reaches the attention function",
            )
    return None


def _layer_types(text) -> Refusal | None:
    others = sorted(set(_get(text, "layer_types", None) or ()) - set(SUPPORTED_LAYER_TYPES))
    if not others:
        return None
    return Refusal(
        f"layer types {', '.join(others)}",
        f"it has layers of type {', '.join(others)}; ring attention computes {' and '.join(SUPPORTED_LAYER_TYPES)} "
        f"layers only (a recurrent, convolutional, chunked or sparse layer would see only this rank's tokens)",
    )


def _attention_modules(model, modules) -> list[Refusal]:
    if not modules:
        return [Refusal("no attention modules found",
                        f"found no attention modules in {type(model).__name__} (transformers marks them with is_causal)")]
    non_causal = sorted({type(m).__name__ for m in modules if not m.is_causal})
    if non_causal:
        return [Refusal(f"non-causal attention ({', '.join(non_causal)})",
                        f"{', '.join(non_causal)} is not causal; ring attention computes causal self-attention only")]
    return []


def rope_types(rope) -> list[str]:
    """Rotary types of a config's ``rope_parameters`` (one dict, or one per layer type)."""
    if not isinstance(rope, dict):
        return []
    if "rope_type" in rope or "type" in rope:
        return [str(rope.get("rope_type", rope.get("type")))]
    return [t for sub in rope.values() for t in rope_types(sub)]


def _positions(model, text) -> list[Refusal]:
    found = []
    rope = _get(text, "rope_parameters", None) or _get(text, "rope_scaling", None)
    for rope_type in dict.fromkeys(rope_types(rope)):
        if any(kind in rope_type for kind in LENGTH_DEPENDENT_ROPE_TYPES):
            found.append(Refusal(
                f"rope_type {rope_type!r}",
                f"rope_type={rope_type!r} computes its frequencies from the largest position in the input, which "
                f"differs between the ranks of the ring; use a rotary type that depends on positions only "
                f"({', '.join(POSITIONAL_ROPE_TYPES)})",
            ))
        elif rope_type not in POSITIONAL_ROPE_TYPES:
            found.append(Refusal(f"rope_type {rope_type!r}",
                                 f"rope_type={rope_type!r} is not known to depend on positions only "
                                 f"({', '.join(POSITIONAL_ROPE_TYPES)} are)"))
    alibi = _get(text, "alibi", False) or _get(_get(text, "attn_config", None), "alibi", False)
    if alibi or _get(text, "position_embedding_type", None) not in (None, "absolute", "rope", "rotary"):
        found.append(Refusal("position bias (ALiBi or relative)",
                             "it adds a position bias to the attention scores (ALiBi or relative positions), which "
                             "the ring's kernels do not take"))
    if any(hasattr(m, "create_position_ids_from_input_ids") for m in model.modules()):
        found.append(Refusal(
            "positions numbered from padding_idx + 1",
            "it numbers positions from padding_idx + 1 (RoBERTa style) while shard_batch passes position_ids "
            "that start at 0 for every document, which would shift every position",
        ))
    return found


def _attention_features(text, modules) -> list[Refusal]:
    found = []
    window = _sliding_window(text)
    if window:
        for cls in dict.fromkeys(type(m) for m in modules if m.is_causal):
            source = _forward_source_of_class(cls)
            if source is not None and "sliding_window" not in source:
                found.append(Refusal(
                    "sliding window only in the mask",
                    f"the config sets a sliding window ({window}) but {cls.__name__} does not pass it to the "
                    f"attention function (transformers applies it only through the attention mask, which ring "
                    f"attention does not use); if no document is longer than {window} tokens the window has no "
                    f"effect: set config.sliding_window = None",
                ))
    # A logit softcap and per-head attention sinks are exact in the ring when they reach it: as
    # the softcap= and s_aux= keywords of the attention call (Gemma 2; GPT-OSS). One that a module
    # holds but does not pass would be applied by transformers' eager attention, never by the ring.
    config_cap = _get(text, "attn_logit_softcapping", None)
    capped = {}
    for m in modules:
        cap = getattr(m, "attn_logit_softcapping", None)
        if (cap if cap is not None else config_cap) is not None:
            capped.setdefault(type(m), cap if cap is not None else config_cap)
    for cls, cap in capped.items():
        if "softcap=" not in (_forward_source_of_class(cls) or ""):
            found.append(Refusal(
                "logit softcapping not passed to the attention function",
                f"the model sets a logit softcap (attn_logit_softcapping={cap}) but {cls.__name__}.forward does not "
                f"pass it to the attention function (no softcap= in its source), so ring attention could not apply it",
            ))
    for cls in dict.fromkeys(type(m) for m in modules if getattr(m, "sinks", None) is not None):
        if "s_aux=" not in (_forward_source_of_class(cls) or ""):
            found.append(Refusal(
                "attention sinks not passed to the attention function",
                f"{cls.__name__} has attention sinks (.sinks) but its forward does not pass them to the attention "
                f"function (no s_aux= in its source), so ring attention could not apply them",
            ))
    v_dim = _get(text, "v_head_dim", None)
    qk_dim = _get(text, "qk_head_dim", None)
    if qk_dim is None and _get(text, "qk_nope_head_dim", None) is not None:
        qk_dim = _get(text, "qk_nope_head_dim") + (_get(text, "qk_rope_head_dim", None) or 0)
    latent = qk_dim is not None
    if qk_dim is None:  # MiMo-V2-Flash: head_dim for queries and keys, v_head_dim for values
        qk_dim = _get(text, "head_dim", None)
    if v_dim is not None and qk_dim is not None and v_dim != qk_dim:
        found.append(Refusal("value head dim differs" + (" (MLA)" if latent else ""),
                             f"its value head dim ({v_dim}) differs from its query/key head dim ({qk_dim}) "
                             f"(as in multi-head latent attention); the ring's kernels take one head dim"))
    return found


ROUTER_AUX_LOSS = (
    "output_router_logits=True adds the mixture-of-experts router's auxiliary load-balancing loss, a product "
    "of two means over all tokens of the batch, which each rank of the ring would compute over its own tokens "
    "only (and the loss scaling of the training loop would count it once per rank). The router logits "
    "themselves are exact: each token's routing depends on that token alone; only this loss term is not. "
    "Turn it off: model.config.output_router_logits = False, and do not pass output_router_logits=True"
)
"""Why the router's auxiliary loss is refused on more than one rank (at patch time and per call)."""


def _router_aux_loss(text, world_size: int) -> Refusal | None:
    if world_size > 1 and _get(text, "output_router_logits", False):
        return Refusal("router auxiliary loss (output_router_logits=True)", f"config.{ROUTER_AUX_LOSS}")
    return None


# ------------------------------------------------------------------------------- helpers
def _get(config, name: str, default=None):
    """``getattr`` that also survives configs whose per-layer fields refuse a global read
    (transformers' heterogeneous configs raise their own error, not ``AttributeError``)."""
    try:
        return getattr(config, name, default)
    except Exception:  # noqa: BLE001
        return default


def _sliding_window(text) -> int | None:
    """The sliding window some layer of the model uses (None: none)."""
    window = _get(text, "sliding_window", None)
    if not window or _get(text, "use_sliding_window", True) is False:
        return None
    layer_types = _get(text, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


def _forward_source(module) -> str | None:
    return None if module is None else _forward_source_of_class(type(module))


def _forward_source_of_class(cls) -> str | None:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError, AttributeError):
        return None  # no source (a class defined in a REPL): the check cannot read it


def _calls(source: str | None, callee: str) -> list[str]:
    """The argument text of every call ``callee(...)`` in ``source``."""
    if source is None:
        return []
    found = []
    for match in re.finditer(re.escape(callee) + r"\s*\(", source):
        depth, i = 1, match.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        found.append(source[match.end():i - 1])
    return found
