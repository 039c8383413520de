"""Will it fit? Per-rank memory of one training step under ring attention, from a model config.

    python -m hf_ring_attention.memory --model meta-llama/Llama-3.2-1B --seq-len 131072 --cp-size 8 \\
        --chunked-loss --gpu-memory 80

or, in code, :func:`estimate_memory` (one setting) and :func:`longest_sequence` (the longest
sequence within a memory budget). Nothing is downloaded but the config; a local ``config.json``
(or a directory holding one) works offline.

What is counted, per rank of a context-parallel group of P ranks, for a micro-batch of
``batch_size x seq_len`` tokens, i.e. T = ``batch_size x seq_len / P`` tokens per rank:

* **weights**, **gradients** (one per trainable weight, in the weights' dtype) and the
  **optimizer state** (AdamW: two float32 states per weight; ``optimizer="sgd"``: one; "none").
* **activations**: every tensor the model keeps for its backward pass, counted from the decoder
  layer's structure (Llama, Mistral, Qwen2, Qwen3; checked against the tensors autograd saves,
  see ``tests/test_memory.py``). With activation dtype ``a`` bytes, per token and layer: each of
  the two RMSNorms keeps its input in float32, its normalised input (``a``) and a float32 scale;
  the attention keeps the projections' input, rotated q and k, v, its output (``a`` each) and a
  float32 log-sum-exp per head; the gated MLP keeps its input and four ``[intermediate]``
  tensors (gate, up, activation, product; only the input with ``tiled_mlp``). Plus, once per
  token, the final norm, the rotary tables and the input ids. With gradient checkpointing each
  layer keeps only its input, and one layer's activations are recomputed at a time.
* **attention**: the ring's working memory in one layer (float32 output accumulator and merge
  temporaries in the forward; float32 dq, dk, dv and the kernel's block gradients in the
  backward; the K/V block and the dK/dV blocks in flight when P > 1).
* **recomputation**: with gradient checkpointing, one layer's activations recomputed in its
  backward (with the ring's working memory); with the tiled MLP, one chunk's recomputed MLP and
  its weight gradients.
* **logits and loss**: the standard loss holds the ``[T, vocab]`` logits (dtype ``a``, returned
  to the caller), their float32 log-softmax, its gradient and the logits' gradient at once; the
  chunked loss (``chunked_loss``) one chunk of logits, the float32 gradient of the head's weight
  and the gradient of the hidden states.

The peak is the largest of three moments of the step: the start of the backward pass (all
activations, the loss's memory and the head's gradient), the backward of the last layer (all
activations, the ring's working memory, or with checkpointing one recomputed layer), and the
optimizer step (all gradients and AdamW's one temporary per weight); weights and optimizer state
are always there. Not counted: the CUDA context and library work spaces (about 0.5-1 GiB per
GPU), allocator fragmentation, and data-parallel buffers (DDP's gradient buckets). Keep the
``headroom`` (10% by default) free for them. Mixed precision by autocast with float32 weights is
not modelled: use the dtype of the activations as ``dtype`` and count float32 master weights
yourself.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field

GIB = 2**30
F32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "none": 0}
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Families whose decoder layers the activation count describes (attention + gated MLP)."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a config (and the parameter count of the model it builds)."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_parameters: int
    head_parameters: int
    qk_norm: bool
    max_positions: int | None = None  # config.max_position_embeddings: the context it was built for
    rope_scaled: bool = False  # the config's rotary scaling may stretch its positions beyond max_positions

    def past_positions(self, seq_len: int) -> bool:
        """Whether ``seq_len`` passes the positions the model was built for (unknown, or a scaled
        rotary embedding: False)."""
        return bool(self.max_positions) and seq_len > self.max_positions and not self.rope_scaled

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """Read a transformers config; the parameters are counted on a model built on the meta
        device (no memory, no weights)."""
        import torch
        from transformers import AutoModelForCausalLM

        model_type = getattr(config, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise NotImplementedError(
                f"the memory estimate counts the layers of model types {MODEL_TYPES}, got {model_type!r}"
            )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = list(model.parameters())  # tied weights once...
        head = model.get_output_embeddings().weight
        embed = model.get_input_embeddings().weight
        if getattr(config, "tie_word_embeddings", False) and head is not embed:
            params = [p for p in params if p is not head]  # ...which transformers 5.0 leaves untied on meta
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            model_type=model_type, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
            vocab_size=config.vocab_size, num_parameters=sum(p.numel() for p in params),
            head_parameters=head.numel(),
            qk_norm=model_type == "qwen3", max_positions=getattr(config, "max_position_embeddings", None),
            rope_scaled=_rope_scaled(config),
        )


def _rope_scaled(config) -> bool:
    """Whether the config's rotary embedding is scaled (YaRN, linear, ...): then its
    max_position_embeddings need not be the longest context the model handles."""
    from .families import rope_types

    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return any(kind != "default" for kind in rope_types(rope))


@dataclass
class MemoryEstimate:
    """Per-rank memory of one training step, in bytes (see the module docstring for what each
    part holds). ``peak`` is the most memory in use at any moment of the step."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    attention: int
    recomputation: int
    logits_and_loss: int
    peak: int
    moments: dict = field(default_factory=dict)
    """The three candidate peaks: ``"backward start"``, ``"last layer"``, ``"optimizer step"``."""
    tokens_per_rank: int = 0
    settings: dict = field(default_factory=dict)

    def parts(self) -> dict[str, int]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer state": self.optimizer_state,
                "activations": self.activations, "attention": self.attention,
                "recomputation": self.recomputation, "logits and loss": self.logits_and_loss}

    def fits(self, gpu_memory_gib: float, headroom: float = 0.1) -> bool:
        """Whether the peak stays within ``(1 - headroom) x gpu_memory_gib``."""
        return self.peak <= (1 - headroom) * gpu_memory_gib * GIB


def _dtype_bytes(dtype) -> int:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} must be one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def activation_bytes_per_token(shape: ModelShape, dtype="bfloat16", *, tiled_mlp: bool = False) -> dict[str, float]:
    """Bytes the model keeps for the backward pass per token: ``layer`` (one decoder layer),
    ``model`` (once per token: final norm, rotary tables, input ids) and ``checkpointed_layer``
    (a layer's input, all a layer keeps under gradient checkpointing)."""
    a = _dtype_bytes(dtype)
    H, I, D = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_heads * D, shape.num_kv_heads * D
    norm = F32 * H + a * H + F32  # float32 input, normalised input, float32 1/rms
    attention = (a * H  # the q/k/v projections' input (the norm's output)
                 + a * (q + 2 * kv)  # rotated q and k, v
                 + a * q  # attention output (the o projection's input)
                 + F32 * shape.num_heads)  # log-sum-exp
    if shape.qk_norm:  # RMSNorm per head on q and k (its output is rotated, not kept)
        attention += (F32 + a) * (q + kv) + F32 * (shape.num_heads + shape.num_kv_heads)
    mlp = a * H + (0 if tiled_mlp else 4 * a * I)  # input; gate, up, activation, product
    return {"layer": 2 * norm + attention + mlp, "model": norm + 2 * a * D + 8, "checkpointed_layer": a * H}


def estimate_memory(
    config,
    seq_len: int,
    cp_size: int = 1,
    *,
    batch_size: int = 1,
    dtype: str = "bfloat16",
    chunked_loss: bool | int = False,
    tiled_mlp: bool | int = False,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """Per-rank memory of one training step (forward, backward, optimizer step).

    Args:
        config (`PretrainedConfig`, `ModelShape`, `str` or `dict`): a transformers config, a
            local ``config.json`` or directory, a hub name (only the config is fetched), or a
            config dict; model types llama, mistral, qwen2, qwen3.
        seq_len (`int`): tokens per sequence (all ranks together).
        cp_size (`int`): ranks of the context-parallel group sharing each sequence.
        batch_size (`int`): sequences per micro-batch.
        dtype (`str`): dtype of weights, gradients and activations: ``"bfloat16"`` (default),
            ``"float16"`` or ``"float32"``.
        chunked_loss (`bool` or `int`): the chunked loss (an int: its chunk in tokens).
        tiled_mlp (`bool` or `int`): the tiled MLP (an int: its chunk in tokens).
        gradient_checkpointing (`bool`): transformers' activation checkpointing of every layer.
        optimizer (`str`): ``"adamw"`` (two float32 states per weight, default), ``"sgd"`` (one)
            or ``"none"``.

    Returns:
        :class:`MemoryEstimate`, in bytes.
    """
    from .loss import default_chunk_size
    from .mlp import DEFAULT_CHUNK_TOKENS

    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(load_config(config))
    if cp_size < 1 or batch_size < 1 or seq_len < 1:
        raise ValueError(f"seq_len={seq_len}, cp_size={cp_size} and batch_size={batch_size} must be positive")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer={optimizer!r} must be one of {sorted(OPTIMIZER_STATES)}")
    a = w = _dtype_bytes(dtype)
    T = -(-batch_size * seq_len // cp_size)
    H, V, L = shape.hidden_size, shape.vocab_size, shape.num_layers
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    P = shape.num_parameters

    weights, gradients = w * P, w * P
    optimizer_state = F32 * OPTIMIZER_STATES[optimizer] * P
    step_temporary = F32 * P if optimizer in ("adamw", "adam") else 0  # AdamW's sqrt(v) per weight

    mlp_chunk = (DEFAULT_CHUNK_TOKENS if tiled_mlp is True else int(tiled_mlp)) if tiled_mlp else None
    tiled = mlp_chunk is not None and T > mlp_chunk  # a single chunk runs untiled
    per_token = activation_bytes_per_token(shape, dtype, tiled_mlp=tiled)
    # the ring in one layer: forward = block output + three float32 merge temporaries (+ the
    # float32 accumulator when it is not the output); backward = float32 dq, dk, dv + the
    # kernel's block gradients; K/V (and float32 dK/dV) blocks in flight when P > 1
    forward = a * q + 3 * F32 * q + (F32 * q if a != F32 else 0) + (2 * a * kv if cp_size > 1 else 0)
    backward = F32 * (q + 2 * kv) + a * (q + 2 * kv) + ((2 * F32 + a) * 2 * kv if cp_size > 1 else 0)
    attention = T * max(forward, backward)

    if gradient_checkpointing:
        activations = T * (L * per_token["checkpointed_layer"] + per_token["model"])
        recomputed = T * per_token["layer"] + attention  # one layer at a time, in its backward
    else:
        activations = T * (L * per_token["layer"] + per_token["model"])
        recomputed = 0
    if tiled:  # one chunk's recomputed MLP, its weight gradients and their float32 sums
        I = shape.intermediate_size
        recomputed += 4 * a * mlp_chunk * I + (w + F32) * 3 * H * I

    head_grad = w * shape.head_parameters
    if chunked_loss:
        chunk = default_chunk_size(V) if chunked_loss is True else int(chunked_loss)
        chunk = min(chunk, T)
        # one chunk of float32 logits (+ its dtype-a product, then its dtype-a gradient), dh, the
        # float32 gradient of the head's weight (+ one dtype-a product of it when a != float32)
        loss = (F32 + (a if a != F32 else 0)) * chunk * V + a * T * H
        loss += (F32 + a if a != F32 else 0) * shape.head_parameters
        head_during_loss = F32 * shape.head_parameters if a == F32 else 0
    else:
        # float32 log-softmax, its gradient and the logits' gradient (the logits themselves, in
        # the model's output, are dropped before the backward by the usual `model(**b).loss`)
        loss = 3 * F32 * T * V
        head_during_loss = 0
    moments = {
        "backward start": activations + loss + head_during_loss,
        "last layer": activations + max(recomputed, attention) + head_grad,
        "optimizer step": gradients + step_temporary,
    }
    peak = weights + optimizer_state + max(moments.values())
    settings = {"seq_len": seq_len, "cp_size": cp_size, "batch_size": batch_size, "dtype": str(dtype),
                "chunked_loss": chunked_loss, "tiled_mlp": tiled_mlp,
                "gradient_checkpointing": gradient_checkpointing, "optimizer": optimizer}
    return MemoryEstimate(weights, gradients, optimizer_state, activations, attention, recomputed, loss, peak,
                          moments, T, settings)


def longest_sequence(config, cp_size: int, gpu_memory_gib: float, *, headroom: float = 0.1, **kwargs) -> int:
    """The longest ``seq_len`` (a multiple of ``2 x cp_size``, as the zigzag layout needs) whose
    :func:`estimate_memory` peak stays within ``(1 - headroom) x gpu_memory_gib``; 0 if none."""
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(load_config(config))
    step = 2 * cp_size
    fits = lambda n: estimate_memory(shape, n * step, cp_size, **kwargs).fits(gpu_memory_gib, headroom)
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 2**34:
            break
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


def load_config(config):
    """A transformers config from a config object, a dict, a local ``config.json`` or directory,
    or a hub name (the config only)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, dict):
        values = dict(config)
        if "model_type" not in values:
            raise ValueError("a config dict needs a model_type")
        return AutoConfig.for_model(values.pop("model_type"), **values)
    if isinstance(config, str) and os.path.isfile(config):
        with open(config) as f:
            return load_config(json.load(f))
    if isinstance(config, str):
        return AutoConfig.from_pretrained(config)  # a directory, or a hub name
    raise TypeError(f"expected a config, a dict, a path or a hub name, got {type(config).__name__}")


# ---------------------------------------------------------------------------------- CLI
def _gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def _count(n: int) -> str:
    """1.236 B, 12.4 M, 35.2 K parameters."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= 0.99995 * size:  # 999,999,999 is 1.000 B, not 1000.0 M
            return f"{n / size:.{3 if unit == 'B' else 1}f} {unit}"
    return str(n)


def format_estimate(est: MemoryEstimate, shape: ModelShape, gpu_memory_gib: float | None = None,
                    longest: int | None = None, headroom: float = 0.1) -> str:
    s = est.settings
    lines = [
        f"model: {shape.model_type}, {shape.num_layers} layers, hidden {shape.hidden_size}, MLP "
        f"{shape.intermediate_size}, {shape.num_heads}/{shape.num_kv_heads} heads x {shape.head_dim}, "
        f"vocabulary {shape.vocab_size}, {_count(shape.num_parameters)} parameters",
        f"setting: {s['batch_size']} x {s['seq_len']} tokens over cp_size={s['cp_size']} -> "
        f"{est.tokens_per_rank} tokens per rank; {s['dtype']}; loss "
        f"{'chunked' if s['chunked_loss'] else 'standard'}; MLP {'tiled' if s['tiled_mlp'] else 'standard'}; "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}; optimizer {s['optimizer']}",
        "",
        "per rank                   GiB",
    ]
    if shape.past_positions(s["seq_len"]):
        lines.insert(2, f"note: seq_len {s['seq_len']} exceeds the model's max_position_embeddings "
                        f"({shape.max_positions}); the estimate counts memory only")
    for name, value in est.parts().items():
        lines.append(f"  {name:<20} {_gib(value)}")
    moments = ", ".join(f"{name} {value / GIB:.2f}" for name, value in est.moments.items())
    lines.append(f"  {'peak':<20} {_gib(est.peak)}   = weights + optimizer state + the largest moment")
    lines.append(f"  {'':<20} {'':>8}     ({moments})")
    if gpu_memory_gib is not None:
        budget = (1 - headroom) * gpu_memory_gib
        verdict = "fits" if est.fits(gpu_memory_gib, headroom) else "does NOT fit"
        lines += ["", f"{verdict} in {budget:.1f} GiB ({gpu_memory_gib} GiB less {headroom:.0%} headroom)"]
        if longest:
            lines.append(f"longest sequence that fits with cp_size={s['cp_size']}: {longest} tokens "
                         f"({longest // s['cp_size']} per rank)")
            if shape.past_positions(longest):
                lines.append(f"  (memory only: the model's max_position_embeddings is {shape.max_positions}; "
                             f"beyond it its positions are untrained unless you extend its rotary scaling)")
        elif longest is not None:
            fixed = (est.weights + est.gradients + est.optimizer_state) / GIB
            lines.append(f"no sequence fits with cp_size={s['cp_size']}: weights, gradients and optimizer "
                         f"state alone take {fixed:.1f} GiB per rank (every rank holds all of them; "
                         f"sharding them with FSDP or ZeRO is not modelled)")
    lines += ["", "assumptions: weights, gradients and activations in the dtype above; AdamW states in "
              "float32; no CUDA context, library work spaces, fragmentation or DDP buckets "
              "(keep headroom); see `python -m hf_ring_attention.memory --help`"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hf_ring_attention.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="config.json, a directory holding one, or a hub name")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence (all ranks together)")
    p.add_argument("--cp-size", type=int, default=1, help="ranks per context-parallel group (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES), help="default bfloat16")
    p.add_argument("--chunked-loss", action="store_true", help="patch_model(..., chunked_loss=True)")
    p.add_argument("--tiled-mlp", action="store_true", help="patch_model(..., tiled_mlp=True)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing of every layer")
    p.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZER_STATES), help="default adamw")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU: say whether it fits, and the longest sequence that does")
    p.add_argument("--headroom", type=float, default=0.1, help="share of --gpu-memory kept free (default 0.1)")
    return p


def main(argv=None) -> MemoryEstimate:
    args = build_parser().parse_args(argv)
    shape = ModelShape.from_config(load_config(args.model))
    kwargs = {"batch_size": args.batch_size, "dtype": args.dtype, "chunked_loss": args.chunked_loss,
              "tiled_mlp": args.tiled_mlp, "gradient_checkpointing": args.gradient_checkpointing,
              "optimizer": args.optimizer}
    est = estimate_memory(shape, args.seq_len, args.cp_size, **kwargs)
    longest = None
    if args.gpu_memory is not None:
        longest = longest_sequence(shape, args.cp_size, args.gpu_memory, headroom=args.headroom, **kwargs)
    print(format_estimate(est, shape, args.gpu_memory, longest, args.headroom))
    return est


if __name__ == "__main__":
    main()
