"""Chunked causal-LM loss: the cross-entropy of a transformers causal LM without ever holding the
``[tokens, vocab]`` logits.

At long context the language-model head decides what fits: its float32 logits, their
log-softmax and their gradient take ``3 x 4 x tokens x vocab`` bytes (12 GiB per rank at 8K tokens
and a 128K vocabulary), more than the whole model's other activations. :func:`chunked_causal_lm_loss`
computes the loss over chunks of tokens instead: each chunk's logits are made, reduced to the
chunk's summed loss in float32, turned into that chunk's contribution to the gradients of the
hidden states and of the head's weight (and bias), and freed, so that at most one chunk of logits
exists at a time. The gradients are computed in the forward pass, while the chunk's logits exist,
instead of recomputing the logits in the backward pass: the loss is a scalar, so its backward
only multiplies them by the incoming gradient. That saves one ``[tokens, hidden] x [hidden,
vocab]`` product per step (a quarter of the head's work) at the same peak memory; the price is
that a training forward whose loss is never backpropagated does the gradient work anyway.

``patch_model(model, chunked_loss=True)`` switches a causal LM to it (:func:`set_chunked_loss`):
its training forwards that are given ``labels`` compute the hidden states with the base model and
the loss here, and return **no logits** (``logits=None``). Evaluation (``model.eval()``) and
forwards without labels run the model's own forward and return the logits.

Semantics are those of transformers' ``ForCausalLMLoss``: targets are ``shift_labels`` when given,
else ``labels`` shifted left by one; ``ignore_index`` (-100) targets count for nothing; the summed
token losses are divided by ``num_items_in_batch`` when given, else by the number of targets (a
mean; NaN without targets, as ``cross_entropy``). Logits are reduced in float32 whatever the
compute dtype; under ``torch.autocast`` the head's product runs in the autocast dtype, as
``nn.Linear`` would.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
import torch.nn.functional as F

from . import _compat

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**25
"""Default chunk: this many logits (128 MiB in float32), e.g. 1024 tokens of a 32K vocabulary."""

CHUNKED_LOSS_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose ``ForCausalLM.forward`` was read (transformers 5.0 and 5.24): base model,
then ``lm_head`` on the last hidden state, then ``ForCausalLMLoss`` on the logits, nothing else."""

# Config attributes by which other families transform the final logits (Gemma's soft-capping,
# Cohere's and Granite's scaling) or add to the loss (routers' auxiliary loss): the chunked loss
# computes none of them, so a model that sets one is refused.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_router_logits")


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk such that one chunk holds about :data:`CHUNK_ELEMENTS` logits."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


# ----------------------------------------------------------------------------- the loss
class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum over tokens of ``-log softmax(hidden @ weight.T + bias)[target]``, times ``scale``;
    the gradients are computed in the forward, chunk by chunk, and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, chunk_size, dtype, needs):
        need_h, need_w, need_b = needs
        n = hidden.shape[0]
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        product = None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end].to(dtype)
            t = targets[start:end]
            valid = t != IGNORE_INDEX
            index = t.masked_fill(~valid, 0)[:, None]
            z = F.linear(h, w, b).float()               # [chunk, vocab] logits in float32
            picked = z.gather(1, index)[:, 0]
            top = z.amax(1, keepdim=True)
            z.sub_(top).exp_()
            norm = z.sum(1, keepdim=True)
            lse = (top + norm.log())[:, 0]
            total += torch.where(valid, lse - picked, 0.0).sum()
            if not (need_h or need_w or need_b):
                del z
                continue
            # d(loss)/d(logits) = scale * (softmax - onehot(target)), 0 on ignored rows
            z.div_(norm).scatter_add_(1, index, -valid[:, None].float())
            z.mul_(valid[:, None] * scale)
            g = z.to(dtype)
            del z
            if need_h:
                dh[start:end] = (g @ w).to(dh.dtype)
            if need_w and dtype == torch.float32:
                dw.addmm_(g.T, h)
            elif need_w:  # the product in the compute dtype, summed over chunks in float32
                product = torch.mm(g.T, h, out=product) if product is not None else g.T @ h
                dw += product
            if need_b:
                db += g.float().sum(0)
            del g  # before the next chunk's logits exist
        ctx.grads = (dh, dw, db)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.grads is None:
            raise RuntimeError(
                "the chunked loss was backpropagated twice; it computes its gradients once (no "
                "retain_graph). Compute the loss again, or patch_model(..., chunked_loss=False)."
            )
        dh, dw, db = ctx.grads
        ctx.grads = None  # the buffers are scaled in place and handed over
        if dh is not None:
            dh.mul_(grad.to(dh.dtype))
        if dw is not None:
            dw = dw.mul_(grad).to(ctx.dtypes[0])
        if db is not None:
            db = db.mul_(grad).to(ctx.dtypes[1])
        return dh, dw, db, None, None, None, None, None


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The causal-LM loss of ``logits = hidden_states @ weight.T + bias``, computed over chunks of
    tokens: the result and its gradients equal those of transformers' ``ForCausalLMLoss`` on the
    full logits, which are never materialised.

    Args:
        hidden_states (`torch.Tensor`): ``[..., hidden]``, the input of the language-model head.
        weight (`torch.Tensor`): ``[vocab, hidden]``, the head's weight.
        labels (`torch.Tensor`, *optional*): ``[...]`` unshifted targets (shifted left by one here,
            per row); ignored when ``shift_labels`` is given.
        bias (`torch.Tensor`, *optional*): ``[vocab]``, the head's bias.
        shift_labels (`torch.Tensor`, *optional*): ``[...]`` targets already aligned with
            ``hidden_states``.
        num_items_in_batch (`int`, `float` or `torch.Tensor`, *optional*): the sum of the token
            losses is divided by it; default: by the number of targets (the token mean).
        ignore_index (`int`): targets with this value count for nothing (default -100).
        chunk_size (`int`, *optional*): tokens per chunk; default: :func:`default_chunk_size`.

    Returns:
        `torch.Tensor`: the float32 scalar loss. It can be backpropagated once.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("chunked_causal_lm_loss needs labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    if targets.numel() != hidden.shape[0]:
        raise ValueError(
            f"labels have {targets.numel()} targets but hidden_states have {hidden.shape[0]} tokens"
        )
    if ignore_index != IGNORE_INDEX:
        targets = targets.masked_fill(targets == ignore_index, IGNORE_INDEX)
    chunk = default_chunk_size(weight.shape[0]) if chunk_size is None else _check_chunk_size(chunk_size)
    if num_items_in_batch is None:
        denominator = (targets != IGNORE_INDEX).sum().float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device).float()
    scale = 1.0 / denominator
    device = hidden.device.type
    dtype = hidden.dtype
    if torch.is_autocast_enabled(device) and dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device)
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    with torch.autocast(device, enabled=False):
        return _ChunkedCrossEntropy.apply(hidden, weight, bias, targets, scale, chunk, dtype, needs)


def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunked loss: chunk_size={chunk_size!r} must be a positive number of tokens")
    return chunk_size


# --------------------------------------------------------------------- the model's forward
def resolve_chunked_loss(model, chunked_loss: bool | int) -> int | None:
    """Validate ``chunked_loss`` (False, True, or a chunk size in tokens) for ``model``: the chunk
    size to use (0: the default for the vocabulary), or None when off. Raises if the model's
    loss cannot be computed in chunks exactly."""
    if chunked_loss is False or chunked_loss is None:
        return None
    size = 0 if chunked_loss is True else _check_chunk_size(chunked_loss)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in CHUNKED_LOSS_MODEL_TYPES:
        raise NotImplementedError(
            f"chunked_loss supports model types {CHUNKED_LOSS_MODEL_TYPES}, got {model_type!r} "
            f"({type(model).__name__}); pass chunked_loss=False"
        )
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, False, 1, 1.0):
            raise NotImplementedError(
                f"chunked_loss does not apply {name}={value!r} of this config to the logits; pass chunked_loss=False"
            )
    head = model.get_output_embeddings() if model.base_model is not model else None
    if head is None:
        raise NotImplementedError(
            f"chunked_loss needs a causal LM with a language-model head, got {type(model).__name__}"
        )
    if type(head) is not torch.nn.Linear:
        raise NotImplementedError(
            f"chunked_loss reads the language-model head's weight, so the head must be a plain "
            f"torch.nn.Linear; this one is {type(head).__name__} (an adapter or quantized layer "
            f"would be bypassed). Pass chunked_loss=False."
        )
    if _compat.module_has_hooks(head):
        raise NotImplementedError(
            "the language-model head has forward hooks, which the chunked loss would bypass (it "
            "reads the weight instead of calling the head); pass chunked_loss=False"
        )
    if "forward" in vars(model) and not _is_chunked_forward(vars(model)["forward"]):
        raise NotImplementedError(
            f"{type(model).__name__}.forward was already replaced on this model (e.g. by "
            f"accelerator.prepare's mixed precision); patch the model before wrapping it"
        )
    return size


def set_chunked_loss(model, chunk_size: int | None) -> None:
    """Switch ``model`` to the chunked loss (``chunk_size`` from :func:`resolve_chunked_loss`)
    or back to its own forward (None)."""
    installed = vars(model).get("forward")
    if chunk_size is None:
        # without the setting, the forward (even if wrapped by someone since) is the model's own
        vars(model).pop("_hf_ring_attention_chunk", None)
        if _is_chunked_forward(installed):
            del model.forward
        return
    if not _is_chunked_forward(installed):
        model.forward = types.MethodType(_chunked_forward(type(model).forward), model)
    model._hf_ring_attention_chunk = chunk_size


def _is_chunked_forward(forward) -> bool:
    return getattr(getattr(forward, "__func__", None), "_hf_ring_attention_chunked", False)


def _chunked_forward(original):
    """The model's forward, computing training losses with :func:`chunked_causal_lm_loss`."""
    signature = inspect.signature(original)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        arguments = signature.bind_partial(self, *args, **kwargs).arguments
        arguments.pop("self")
        arguments.update(arguments.pop(var_keyword, {}))
        labels = arguments.pop("labels", None)
        keep = arguments.pop("logits_to_keep", 0)
        chunk = getattr(self, "_hf_ring_attention_chunk", None)
        if chunk is None or not self.training or labels is None or not (isinstance(keep, int) and keep == 0):
            return original(self, *args, **kwargs)
        return_dict = arguments.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        from transformers.loss.loss_utils import ForCausalLMLoss
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if self.loss_function is not ForCausalLMLoss:
            raise NotImplementedError(
                f"this model's loss_function is {getattr(self.loss_function, '__name__', self.loss_function)}, "
                f"not transformers' ForCausalLMLoss; the chunked loss computes only the latter "
                f"(patch_model(..., chunked_loss=False))"
            )
        head = self.get_output_embeddings()
        if type(head) is not torch.nn.Linear or _compat.module_has_hooks(head):
            raise NotImplementedError(
                f"the language-model head is now {type(head).__name__}"
                f"{' with forward hooks' if _compat.module_has_hooks(head) else ''}; the chunked loss reads "
                f"the weight of a plain torch.nn.Linear and would bypass it (was the model wrapped after "
                f"patch_model?). Patch after wrapping, or pass chunked_loss=False."
            )
        outputs = self.base_model(**arguments)
        loss = chunked_causal_lm_loss(
            outputs.last_hidden_state, head.weight, labels, bias=head.bias,
            shift_labels=arguments.get("shift_labels"), num_items_in_batch=arguments.get("num_items_in_batch"),
            ignore_index=arguments.get("ignore_index", IGNORE_INDEX), chunk_size=chunk or None,
        )
        rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
        output = CausalLMOutputWithPast(loss=loss, logits=None, **rest)
        return output if return_dict else output.to_tuple()

    forward._hf_ring_attention_chunked = True
    return forward
