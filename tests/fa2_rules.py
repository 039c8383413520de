"""A CPU test kernel that computes like flash-attn 2 does on a GPU, quirks included: the ``cpu``
backend's exact arithmetic behind flash-attn 2's rewriting of the call's arguments (read in
``csrc/flash_attn/flash_api.cpp``, ``mha_varlen_fwd``/``mha_varlen_bwd`` and
``set_params_fprop``; PyTorch's built-in copy does the same):

1. ``max_seqlen_q == 1`` turns ``causal`` off (the one query of each sequence is the last one);
2. ``causal`` sets the right window side to 0;
3. a side ``>= max_seqlen_k`` becomes -1 (unbounded);
4. an unbounded side next to a bounded one becomes ``max_seqlen_k``;
5. a query row that sees no key gets lse = +inf (the non-split kernel's convention);
6. ``max_seqlen_q == 1`` with more query than key heads and no window runs the forward with the
   query heads of a group as the sequence (``seqlenq_ngroups_swapped``), which reshapes q as one
   query per sequence: a call with an empty sequence fails there.

Like flash-attn 2 it takes empty sequences (``empty_sequences = True``): rows without keys get
out 0 and lse +inf, keys without queries dk = dv = 0.

Rules 3 and 4 are exact only when ``max_seqlen_k >= Lq - 1``; a plan that relies on the
documented meaning of the window instead of these rules gives a wrong result here, on CPU, as it
would on the GPU. Pass the module as ``backend=`` (it follows the ``Kernel`` protocol).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from hf_ring_attention.kernels import cpu
from hf_ring_attention.kernels.contract import Varlen

name = "fa2_rules"
empty_sequences = True


def check(device: torch.device, dtype: torch.dtype, head_dim: int, softcap: float = 0.0) -> str | None:
    return cpu.check(device, dtype, head_dim, softcap)


def effective_window(varlen: Varlen) -> tuple[int, int]:
    """The window flash-attn 2 actually applies to every sequence of the call."""
    left, right = varlen.window
    causal = varlen.causal and varlen.max_seqlen_q != 1
    if causal:
        right = 0
    max_k = varlen.max_seqlen_k
    if left >= max_k:
        left = -1
    if right >= max_k:
        right = -1
    if left < 0 and right >= 0:
        left = max_k
    if left >= 0 and right < 0:
        right = max_k
    return left, right


def _as_applied(varlen: Varlen) -> Varlen:
    return replace(varlen, window=effective_window(varlen))


def forward(q, k, v, varlen: Varlen, softmax_scale: float, softcap: float = 0.0):
    if varlen.max_seqlen_q == 1 and q.shape[1] > k.shape[1] and effective_window(varlen) == (-1, -1):
        sequences = len(varlen.cu_seqlens_q) - 1
        if q.shape[0] != sequences:  # rule 6: q.reshape(batch_size, ...) in mha_varlen_fwd
            raise RuntimeError(f"shape '[{sequences}, ...]' is invalid for input of {q.shape[0]} query rows "
                               f"(flash-attn 2 with max_seqlen_q == 1 and grouped query heads)")
    out, lse = cpu.forward(q, k, v, _as_applied(varlen), softmax_scale, softcap)
    return out, lse.masked_fill(lse == float("-inf"), float("inf"))


def backward(dout, q, k, v, out, lse, varlen: Varlen, softmax_scale: float, softcap: float = 0.0):
    return cpu.backward(dout, q, k, v, out, lse, _as_applied(varlen), softmax_scale, softcap)
