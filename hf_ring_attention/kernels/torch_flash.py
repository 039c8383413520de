"""Backend ``torch_flash``: PyTorch's built-in FlashAttention-2 varlen kernels (CUDA sm80+,
fp16/bf16, no extra install; see ``contract.py``).

``torch.ops.aten._flash_attention_forward`` returns ``(out, logsumexp [Hq, Tq] float32, rng_state,
unused, debug_mask)`` for packed ``[T, H, D]`` input and handles GQA (fewer K/V heads) itself.
Newer torch releases append arguments, so everything after the positional core goes by keyword.
The causal diagonal and the window are aligned bottom-right. It is PyTorch's copy of flash-attn 2,
with the same window clamping at ``max_seqlen_k`` (handled by the plan), but without flash-attn
2's logit softcap: softcapped calls are refused (``check``), and automatic selection skips it.
"""

from __future__ import annotations

import torch

from .contract import Varlen, capability, cuda_reason, dtype_reason, head_dim_reason

name = "torch_flash"
empty_sequences = True  # the same kernels as flash-attn 2: see flash_attn.py


NO_SOFTCAP = "has no logit softcap (PyTorch's built-in FlashAttention-2 kernels take none)"


def check(device: torch.device, dtype: torch.dtype, head_dim: int, softcap: float = 0.0) -> str | None:
    """CUDA sm80 (Ampere) or newer with the aten flash op, fp16/bf16, head_dim % 8 == 0 and <= 256,
    no softcap."""
    if softcap:
        return NO_SOFTCAP
    reason = cuda_reason(device)
    if reason is not None:
        return reason
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return f"needs torch.ops.aten._flash_attention_forward, absent from torch {torch.__version__}"
    if torch.version.hip:
        # ROCm's build of the op returns the log-sum-exp in another layout (padded per
        # sequence), which the merge would misread; unchecked, so refused
        return f"is checked on CUDA only, not on ROCm (torch {torch.__version__}, HIP {torch.version.hip})"
    major, minor = capability(device.index)
    if major < 8:
        return f"needs an sm80 (Ampere) or newer GPU, this one is sm{major}{minor}"
    return dtype_reason(dtype) or head_dim_reason(head_dim)


def _window(varlen: Varlen) -> dict:
    left, right = varlen.window
    if varlen.causal:  # is_causal=True sets the window itself
        return {"window_size_left": None, "window_size_right": None}
    return {"window_size_left": left, "window_size_right": right}


def _no_softcap(softcap: float) -> None:
    if softcap:
        raise NotImplementedError(f"backend 'torch_flash' {NO_SOFTCAP}; softcap={softcap} was asked for")


def forward(q, k, v, varlen: Varlen, softmax_scale: float, softcap: float = 0.0):
    _no_softcap(softcap)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, varlen.max_seqlen_q, varlen.max_seqlen_k,
        0.0, varlen.causal, False, scale=softmax_scale, **_window(varlen),
    )
    return out, lse


def backward(dout, q, k, v, out, lse, varlen: Varlen, softmax_scale: float, softcap: float = 0.0):
    _no_softcap(softcap)
    # rng_state and its companion are read only when dropout_p > 0, which we never use.
    unused = torch.empty(2, dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse, varlen.cu_seqlens_q, varlen.cu_seqlens_k, varlen.max_seqlen_q,
        varlen.max_seqlen_k, 0.0, varlen.causal, unused, unused, scale=softmax_scale, **_window(varlen),
    )
    return dq, dk, dv
