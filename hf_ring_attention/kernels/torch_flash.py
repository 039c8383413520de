"""PyTorch's built-in FlashAttention-2 varlen kernels (CUDA, no extra install).

``torch.ops.aten._flash_attention_forward`` returns ``(out, logsumexp [Hq, Tq] float32, rng_state,
unused, debug_mask)`` for packed ``[T, H, D]`` input and handles GQA (fewer K/V heads) itself.
Newer torch releases append arguments, so everything after the positional core goes by keyword.
The causal diagonal and the window are aligned bottom-right, as in ``plan.py``.
"""

from __future__ import annotations

import torch

name = "torch"
DTYPES = (torch.float16, torch.bfloat16)


def is_available(device: torch.device) -> bool:
    """CUDA with FlashAttention-2 support: the op exists and the GPU is sm80 (Ampere) or newer."""
    if device.type != "cuda" or not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, softmax_scale):
    left, right = window
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, causal, False,
        scale=softmax_scale,
        window_size_left=None if causal else left,
        window_size_right=None if causal else right,
    )
    return out, lse


def backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, softmax_scale):
    left, right = window
    # rng_state and its companion are read only when dropout_p > 0, which we never use.
    unused = torch.empty(2, dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0,
        causal, unused, unused,
        scale=softmax_scale,
        window_size_left=None if causal else left,
        window_size_right=None if causal else right,
    )
    return dq, dk, dv
