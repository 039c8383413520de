"""Tiny randomly initialised transformers models, built from configs (no downloads), and the
batches and training examples the integration tests feed them."""

import torch
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    Qwen3Config, Qwen3ForCausalLM,
)

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def tiny_model(kind: str, seed: int = 0, attn: str = "sdpa"):
    """A float32 causal LM: ``llama`` (GQA 4/2), ``mistral`` (sliding window 7),
    ``qwen2`` (second layer with a sliding window of 6), ``qwen3``."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(**COMMON)
    elif kind == "mistral":
        config = MistralConfig(**COMMON, sliding_window=7)
    elif kind == "qwen2":
        config = Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    elif kind == "qwen3":
        config = Qwen3Config(**COMMON, head_dim=8)
    else:
        raise ValueError(kind)
    config._attn_implementation = attn
    cls = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM,
           "qwen3": Qwen3ForCausalLM}[kind]
    return cls(config)


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer: transformers 5.24 renamed
    ``gradient_checkpointing_enable`` (the old name warns); 5.0 has only the old one."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_checkpointing(model) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def batches(seed: int = 0):
    """Named full batches (identical on every rank): one long sequence of awkward length, two
    rows with right padding, and packed documents described by position_ids."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    ids = torch.randint(0, VOCAB, (1, 45), generator=gen)
    out["one sequence"] = {"input_ids": ids, "labels": ids.clone()}
    ids = torch.randint(0, VOCAB, (2, 29), generator=gen)
    mask = torch.ones(2, 29, dtype=torch.long)
    mask[1, 17:] = 0
    out["right padding"] = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    lengths = [13, 1, 22, 3]  # includes a one-token document
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=gen)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[pos == 0] = -100  # as DataCollatorWithFlattening: no target across documents
    out["packed"] = {"input_ids": ids, "position_ids": pos, "labels": labels}
    return out


def reference_kwargs(batch):
    """Arguments for the unpatched model on the full batch (packing needs use_cache=False to be
    detected from position_ids by transformers)."""
    return {**batch, "use_cache": False}


# ------------------------------------------------------------------- training examples
BATCH, SEQ = 2, 26  # rows per micro-batch, tokens per row
LR = 0.05


def examples(n, packed, seed=0):
    """Causal-LM examples of SEQ tokens; packed ones hold documents with restarting positions
    and no target across a document start (labels -100 there, as DataCollatorWithFlattening)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=gen)
        ex = {"input_ids": ids, "labels": ids.clone()}
        if packed:
            cut = [0, 5 + i % 7, 17, SEQ]
            pos = torch.cat([torch.arange(b - a) for a, b in zip(cut, cut[1:])])
            ex["position_ids"] = pos
            ex["labels"][pos == 0] = -100
        out.append(ex)
    return out


def collate(features):
    return {k: torch.stack([f[k] for f in features]) for k in features[0]}
