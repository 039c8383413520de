"""Tiled MLP: each decoder layer's MLP run over chunks of tokens under recomputation, so that its
intermediate activations never exist for the whole sequence.

Once the logits are chunked (:mod:`hf_ring_attention.loss`), the MLPs keep the most memory for
the backward pass: a gated MLP (Llama, Mistral, Qwen) keeps four ``[tokens, intermediate]``
tensors per layer (the gate and up projections, the activation, their product), more than half of
a layer's activations. With ``patch_model(model, tiled_mlp=True)`` every layer's MLP keeps only
its input instead: the forward runs the MLP chunk by chunk without recording a graph, and the
backward recomputes one chunk at a time and backpropagates through it. The price is one more
MLP forward per step; outputs and gradients equal those of the untiled MLP. An MLP acts on every
token separately, which is what makes the tiling exact (the model types are checked).
"""

from __future__ import annotations

import types

import torch

TILED_MLP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose decoder layers' ``mlp`` is a dense, per-token, deterministic MLP."""

DEFAULT_CHUNK_TOKENS = 1024


class _TiledMLP(torch.autograd.Function):
    """``forward(mlp, chunk, x, *params)``: the MLP over chunks of the tokens of ``x`` ``[...,
    hidden]``; ``params`` are the MLP's trainable parameters (inputs, so that autograd gives
    them their gradients)."""

    @staticmethod
    def forward(ctx, mlp, chunk, x, *params):
        flat = x.reshape(-1, x.shape[-1])
        device = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        forward, out = _original(mlp), None
        for s in range(0, flat.shape[0], chunk):
            piece = forward(flat[s:s + chunk])
            if out is None:
                out = piece.new_empty(flat.shape[0], piece.shape[-1])
            out[s:s + chunk] = piece
            del piece
        ctx.save_for_backward(x)
        ctx.mlp, ctx.chunk, ctx.params = mlp, chunk, params
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        flat = x.reshape(-1, x.shape[-1])
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        need_x = ctx.needs_input_grad[2]
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[3:]) if need]
        dx = torch.empty_like(flat) if need_x else None
        dparams = [None] * len(params)  # float32 sums over chunks (one product would accumulate so)
        enabled, dtype = ctx.autocast
        forward = _original(ctx.mlp)
        for s in range(0, flat.shape[0], ctx.chunk):
            piece = flat[s:s + ctx.chunk].detach().requires_grad_(need_x)
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
                out = forward(piece)
            inputs = ([piece] if need_x else []) + params
            grads = torch.autograd.grad(out, inputs, grad_flat[s:s + ctx.chunk], allow_unused=True)
            if need_x:
                dx[s:s + ctx.chunk] = grads[0]
            for i, g in enumerate(grads[int(need_x):]):
                if g is not None:
                    dparams[i] = g.float() if dparams[i] is None else dparams[i].add_(g)
            del out, grads  # this chunk's recomputed graph, before the next one is made
        result = iter(None if d is None else d.to(p.dtype) for d, p in zip(dparams, params))
        dparams_all = [next(result) if need else None for need in ctx.needs_input_grad[3:]]
        return (None, None, dx.view_as(x) if need_x else None, *dparams_all)


def _original(mlp):
    """The MLP's own forward (its class's), bound to it."""
    return types.MethodType(type(mlp).forward, mlp)


def _tiled_forward(self, x):
    chunk = getattr(self, "_hf_ring_attention_tile", None)
    if chunk is None or not torch.is_grad_enabled() or x.reshape(-1, x.shape[-1]).shape[0] <= chunk:
        return type(self).forward(self, x)  # nothing kept for a backward, or a single chunk
    params = [p for p in self.parameters() if p.requires_grad]
    return _TiledMLP.apply(self, chunk, x, *params)


_tiled_forward._hf_ring_attention_tiled = True


def _layer_mlps(model) -> list[torch.nn.Module]:
    return [m.mlp for m in model.modules()
            if isinstance(getattr(m, "mlp", None), torch.nn.Module) and hasattr(m, "self_attn")]


def _is_tiled(mlp) -> bool:
    return getattr(getattr(vars(mlp).get("forward"), "__func__", None), "_hf_ring_attention_tiled", False)


def resolve_tiled_mlp(model, tiled_mlp: bool | int) -> int | None:
    """Validate ``tiled_mlp`` (False, True, or a chunk size in tokens) for ``model``: the chunk
    size, or None when off."""
    if tiled_mlp is False or tiled_mlp is None:
        return None
    if tiled_mlp is True:
        size = DEFAULT_CHUNK_TOKENS
    elif isinstance(tiled_mlp, int) and tiled_mlp >= 1:
        size = tiled_mlp
    else:
        raise ValueError(f"tiled_mlp={tiled_mlp!r} must be True, False or a positive number of tokens")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in TILED_MLP_MODEL_TYPES:
        raise NotImplementedError(
            f"tiled_mlp supports model types {TILED_MLP_MODEL_TYPES}, got {model_type!r}; pass tiled_mlp=False"
        )
    mlps = _layer_mlps(model)
    if not mlps:
        raise NotImplementedError(f"tiled_mlp found no decoder-layer MLPs in {type(model).__name__}")
    for mlp in mlps:
        if "forward" in vars(mlp) and not _is_tiled(mlp):
            raise NotImplementedError(
                f"the forward of {type(mlp).__name__} was already replaced on this model; tiled_mlp "
                f"would bypass it. Pass tiled_mlp=False."
            )
        dropout = [m for m in mlp.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        if dropout:
            raise NotImplementedError(
                f"{type(mlp).__name__} has dropout (p={dropout[0].p}); tiled_mlp recomputes the MLP "
                f"in the backward and cannot replay it. Pass tiled_mlp=False."
            )
    return size


def set_tiled_mlp(model, chunk_size: int | None) -> None:
    """Tile every decoder layer's MLP over ``chunk_size`` tokens (from :func:`resolve_tiled_mlp`),
    or restore the MLPs' own forward (None)."""
    for mlp in _layer_mlps(model):
        if chunk_size is None:
            vars(mlp).pop("_hf_ring_attention_tile", None)  # (a wrapped tiled forward then runs plainly)
            if _is_tiled(mlp):
                del mlp.forward
            continue
        if not _is_tiled(mlp):
            mlp.forward = types.MethodType(_tiled_forward, mlp)
        mlp._hf_ring_attention_tile = chunk_size
