"""Ring attention: the forward and backward loops over ring steps, and the float32 merge.

Legend: T local tokens, Hq query heads, Hkv key/value heads, D head dim; ``out_THD``, ``lse_HT``.

Forward, on rank r (P ranks, plan from ``plan.py``)::

    kv = own K/V block
    for step in range(num_steps):
        post: send kv to r+1, receive the next block from r-1      (overlaps the compute below)
        for each kernel call of the step: merge its (out, lse) into the running result
        kv = received block

Backward recomputes every block from the merged out and lse (flash-attention style). dQ stays
home; dK/dV of a block are accumulated in float32 while they travel around the ring with it, and
the last hop sends them straight back to their owner.

Attention sinks (GPT-OSS: one logit per query head that takes part in the softmax but has no
value) join the merged result once, after the last step (:func:`add_sinks`); the backward then
recomputes from the sink-merged out and lse, which is exactly the gradient of attention with a
sink, and the sinks' own gradient comes from the same out and lse (:func:`sink_grad`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .agreement import check_ranks_agree
from .distributed import group_rank, group_size
from .kernels import Kernel, accumulate_dtype, get_kernel, resolve_scale, resolve_softcap, takes_empty_sequences
from .merge import merge_, prepare
from .plan import DeviceCall, RingPlan, Rows
from .transport import RingComm

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

NEG_INF = float("-inf")
KV_TAG, GRAD_TAG = 0, 1  # gloo matches messages by tag: K/V blocks and dK/dV blocks never mix


def _take(x: torch.Tensor, rows: Rows, dim: int = 0) -> torch.Tensor:
    """The rows ``rows`` of ``x`` along ``dim``: a view for a range, a gather for an index."""
    if rows.index is None:
        return x.narrow(dim, rows.start, rows.stop - rows.start)
    return x.index_select(dim, rows.index)


def _add_rows_(acc: torch.Tensor, rows: Rows, value: torch.Tensor) -> None:
    if rows.index is None:
        acc[rows.start:rows.stop] += value
    else:
        acc.index_add_(0, rows.index, value.to(acc.dtype))


def forward_step(q: torch.Tensor, kv: torch.Tensor, calls: list[DeviceCall], out_THD: torch.Tensor,
                 lse_HT: torch.Tensor, kernel: Kernel, scale: float, softcap: float = 0.0) -> None:
    """Attend ``q`` to one K/V block ``kv [2, T, Hkv, D]``, merging every kernel call of the step
    into the running (out, lse)."""
    for c in calls:
        k, v = _take(kv, c.k_rows, dim=1).unbind(0)
        block_out, block_lse = kernel.forward(_take(q, c.q_rows), k, v, c.varlen, scale, softcap=softcap)
        merge_(out_THD, lse_HT, c.q_rows, block_out, block_lse)


def backward_step(dout, q, kv, out, lse_HT, calls: list[DeviceCall], dq_THD, kernel: Kernel, scale: float,
                  softcap: float = 0.0):
    """Gradients for one K/V block: adds into ``dq_THD`` and returns this rank's dK/dV for the
    block as one ``[2, T, Hkv, D]`` buffer in the accumulation dtype (None when the step has no
    call)."""
    if not calls:
        return None
    dkv = torch.zeros(kv.shape, dtype=dq_THD.dtype, device=kv.device)
    for c in calls:
        k, v = _take(kv, c.k_rows, dim=1).unbind(0)
        dq_c, dk_c, dv_c = kernel.backward(
            _take(dout, c.q_rows), _take(q, c.q_rows), k, v, _take(out, c.q_rows),
            _take(lse_HT, c.q_rows, dim=1).contiguous(), c.varlen, scale, softcap=softcap,
        )
        _add_rows_(dq_THD, c.q_rows, dq_c)
        _add_rows_(dkv[0], c.k_rows, dk_c)
        _add_rows_(dkv[1], c.k_rows, dv_c)
    return dkv


def add_sinks(out_THD: torch.Tensor, lse_HT: torch.Tensor, sinks_H: torch.Tensor) -> None:
    """Join one sink logit per query head into the merged ``(out, lse)`` (accumulation dtype), in
    place: the sink takes part in the softmax but has no value, so

        lse' = log(exp(lse) + exp(sink))        out' = out * exp(lse - lse')

    Rows that saw no key (padding) stay out: out 0, lse -inf."""
    seen = lse_HT > NEG_INF
    merged = torch.logaddexp(lse_HT, sinks_H.to(lse_HT.dtype)[:, None])
    out_THD *= torch.where(seen, torch.exp(lse_HT - merged), 0.0).T[..., None]
    lse_HT.copy_(torch.where(seen, merged, lse_HT))


def sink_grad(dout_THD: torch.Tensor, out_THD: torch.Tensor, lse_HT: torch.Tensor,
              sinks_H: torch.Tensor) -> torch.Tensor:
    """This rank's gradient of the sinks ``[Hq]`` in the accumulation dtype, from the sink-merged
    out and lse: ``d sink_h = -sum_i exp(sink_h - lse_hi) * rowsum(dout_i * out_i)_h`` over the rows
    that saw a key (the sink's probability times the row's delta). The ranks' gradients add up to
    the sinks' gradient."""
    acc = lse_HT.dtype
    delta = (dout_THD.to(acc) * out_THD.to(acc)).sum(-1).T  # [Hq, T]
    p_sink = torch.where(lse_HT > NEG_INF, torch.exp(sinks_H.to(acc)[:, None] - lse_HT), 0.0)
    return -(p_sink * delta).sum(1)


def new_result(q: torch.Tensor):
    """Empty running result for ``q``: out zeros [T, Hq, D] and lse -inf [Hq, T]."""
    acc = accumulate_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), NEG_INF, dtype=acc, device=q.device)
    return out, lse


@dataclass
class _Ring:
    """One rank's ring: the plan's calls on this device, the communicator and the kernel."""

    calls: list[list[DeviceCall]]
    num_steps: int
    comm: RingComm
    kernel: Kernel
    scale: float
    softcap: float = 0.0

    def forward(self, q, k, v, sinks=None):
        out, lse = new_result(q)
        kv = torch.stack([k, v])  # one buffer: one message per hop
        for step in range(self.num_steps):
            incoming = self.comm.shift(kv, tag=KV_TAG) if step + 1 < self.num_steps else None
            forward_step(q, kv, self.calls[step], out, lse, self.kernel, self.scale, self.softcap)
            if incoming is not None:
                kv = incoming.wait()
        if sinks is not None:
            add_sinks(out, lse, sinks)
        return out.to(q.dtype), lse

    def backward(self, dout, q, k, v, out, lse):
        dq = torch.zeros(q.shape, dtype=accumulate_dtype(q.dtype), device=q.device)
        kv, dkv_in, last = torch.stack([k, v]), None, self.num_steps - 1
        rank = self.comm.rank
        for step in range(self.num_steps):
            kv_in = self.comm.shift(kv, tag=KV_TAG) if step < last else None
            dkv = backward_step(dout, q, kv, out, lse, self.calls[step], dq, self.kernel, self.scale, self.softcap)
            if dkv is None:
                dkv = torch.zeros(kv.shape, dtype=dq.dtype, device=kv.device)
            if dkv_in is not None:
                dkv += dkv_in.wait()
            if last == 0:
                return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)
            # the block of rank (rank - step) moves on; after the last step it goes home
            if step < last:
                dkv_in = self.comm.shift(dkv, tag=GRAD_TAG)
            else:
                dkv_in = self.comm.exchange(dkv, rank - step, rank + step, tag=GRAD_TAG)
            if kv_in is not None:
                kv = kv_in.wait()
        dkv = dkv_in.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def without_autocast(device: torch.device):
    """A context in which ``torch.autocast`` is off for ``device``: the kernels and the merge keep
    their own dtypes (float32 accumulation), whatever autocast region the caller is in."""
    return torch.autocast(device.type, enabled=False)


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, ring: _Ring):
        with without_autocast(q.device):
            out, lse = ring.forward(q, k, v, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.ring = ring
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dout = dout.contiguous()
        with without_autocast(q.device):  # a backward called inside an autocast region too
            dq, dk, dv = ctx.ring.backward(dout, q, k, v, out, lse)
            dsinks = sink_grad(dout, out, lse, sinks).to(sinks.dtype) if ctx.needs_input_grad[3] else None
        return dq, dk, dv, dsinks, None


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Validate q, k, v against each other. Only facts that every rank of a correctly used group
    shares, so all ranks raise together, before any communication."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise TypeError(f"{name} must be a [tokens, heads, head_dim] tensor, got {_describe(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got dtype {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"expected q [T, Hq, D] and k, v [T, Hkv, D] with the same T and D, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"the number of query heads ({q.shape[1]}) must be a multiple of the number of "
            f"key/value heads ({k.shape[1]})"
        )


def check_sinks(sinks: torch.Tensor | None, q: torch.Tensor) -> None:
    """Validate attention sinks against q (every rank holds the same sinks)."""
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point() or tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(
            f"sinks must be a floating point tensor of one logit per query head, shape ({q.shape[1]},), got "
            f"{_describe(sinks)}{f' {sinks.dtype}' if isinstance(sinks, torch.Tensor) else ''}"
        )
    if sinks.device != q.device:
        raise ValueError(f"sinks must be on q's device ({q.device}), got {sinks.device}")


def check_tokens(q: torch.Tensor, local_tokens: int, world_size: int) -> None:
    if q.shape[0] != local_tokens:
        raise ValueError(
            f"this rank holds {q.shape[0]} tokens but cu_seqlens describe "
            f"{local_tokens * world_size} tokens over {world_size} ranks, i.e. {local_tokens} per "
            f"rank; pass this rank's shard (see hf_ring_attention.shard)"
        )


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def ring_attention_with_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan, *,
                             group: ProcessGroup | None = None, softmax_scale: float | None = None,
                             backend: str | Kernel | None = None, softcap: float | None = None,
                             sinks: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`ring_attention` with a precomputed :class:`RingPlan` (reuse one plan for every
    layer of a model: the plan is the only host work of the ring; build and
    :meth:`~RingPlan.upload` it before the forward). The other arguments are those of
    :func:`ring_attention`."""
    world_size, rank = group_size(group), group_rank(group)
    if (plan.world_size, plan.rank) != (world_size, rank):
        raise ValueError(
            f"the plan was built for rank {plan.rank} of {plan.world_size}, but this is rank "
            f"{rank} of {world_size} in the given group"
        )
    error = None
    try:
        check_qkv(q, k, v)
        check_tokens(q, plan.local_tokens, world_size)
        check_sinks(sinks, q)
        softcap = resolve_softcap(softcap)
        # dtype, device, head_dim and softcap decide the kernel, or raise here, before any communication
        kernel = get_kernel(backend, q.device, q.dtype, q.shape[-1], softcap)
    except (TypeError, ValueError) as exc:
        error = exc
    if world_size > 1 and not plan.agreed:
        # once per plan: the ranks compare what they were given (and learn of each other's
        # errors), so that none computes a wrong result or waits for a message that never comes
        check_ranks_agree(plan, q, k, group, world_size, error, softcap, sinks)
        plan.agreed = True
    if error is not None:
        raise error
    prepare(q.device, q.shape[-1], q.dtype)  # compiles and checks the merge's variant: not mid-ring
    scale = resolve_scale(softmax_scale, q.shape[-1])
    calls = plan.device_calls(q.device, empty_sequences=takes_empty_sequences(kernel))
    ring = _Ring(calls, plan.num_steps, RingComm(group, rank, world_size), kernel, scale, softcap)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    inputs = (q, k, v) if sinks is None else (q, k, v, sinks)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _RingFunction.apply(q, k, v, sinks, ring)
    with without_autocast(q.device):
        return ring.forward(q, k, v, sinks)[0]


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    *,
    group: ProcessGroup | None = None,
    layout: str = "zigzag",
    causal: bool = True,
    window_size: int | None = None,
    softmax_scale: float | None = None,
    backend: str | Kernel | None = None,
    seqused: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention over a sequence split across the ranks of ``group``.

    Each rank passes its own shard (as made by :func:`shard`); K/V blocks travel around the ring
    while every rank attends its queries to them, and partial results merge by log-sum-exp. The
    result equals attention over the whole sequence on one device, up to rounding.

    Args:
        q (`torch.Tensor`): ``[tokens, Hq, head_dim]``, this rank's queries.
        k (`torch.Tensor`): ``[tokens, Hkv, head_dim]``, this rank's keys (Hq a multiple of Hkv;
            never repeat them for GQA).
        v (`torch.Tensor`): ``[tokens, Hkv, head_dim]``, this rank's values.
        cu_seqlens (`torch.Tensor`, *optional*): int32 global (unsharded) document boundaries,
            identical on every rank; no token attends across them. None: one document.
        group (`ProcessGroup`, *optional*): the context-parallel group; None is the default
            group, or a single process when torch.distributed is not initialised.
        layout (`str`): how the sequence was sharded: ``"zigzag"`` (default, balanced for causal
            attention), ``"contiguous"`` or ``"striped"``.
        causal (`bool`): query i sees keys j <= i of its document.
        window_size (`int`, *optional*): transformers sliding window, query i sees key j iff
            ``i - window_size < j <= i`` (symmetric ``|i - j| < window_size`` if not causal).
        softmax_scale (`float`, *optional*): defaults to ``head_dim ** -0.5``.
        backend (`str`, *optional*): ``"flash_attn_4"``, ``"flash_attn"``, ``"torch_flash"`` or
            ``"cpu"`` (see ``hf_ring_attention.kernels``); default from the
            ``HF_RING_ATTENTION_BACKEND`` environment variable, else the fastest that can run.
            On CUDA the inputs must then be float16 or bfloat16 with a head_dim that is a
            multiple of 8 and at most 256; ``"cpu"`` runs anything, anywhere, slowly.
        seqused (`torch.Tensor`, *optional*): int32 real tokens per document, as returned by
            :func:`pad_for_layout`; padding neither attends nor is attended to (its output is 0).
        dropout_p (`float`): must be 0: attention dropout is not supported (an exact backward
            would need the random state of every block on every rank).
        softcap (`float`, *optional*): logit softcapping (Gemma 2's ``attn_logit_softcapping``):
            the scores ``s = softmax_scale * q.k`` become ``softcap * tanh(s / softcap)`` before
            the softmax. None or 0: none. Backends ``flash_attn_4``, ``flash_attn`` and ``cpu``
            compute it; ``torch_flash`` has none (automatic selection skips it).
        sinks (`torch.Tensor`, *optional*): ``[Hq]`` attention sinks (GPT-OSS): one logit per
            query head that takes part in every query's softmax but has no value (it is not
            multiplied by ``softmax_scale``), identical on every rank. Differentiable: each rank
            gets the gradient of its own queries' share, so sum the sinks' gradient over the
            context-parallel group (as for any parameter every rank holds).

    Returns:
        `torch.Tensor`: ``[tokens, Hq, head_dim]``, this rank's attention output, differentiable
        with respect to q, k, v and ``sinks``.

    The mask is planned on the host from ``cu_seqlens`` on every call; to reuse one plan across
    layers build a :class:`RingPlan` once and call :func:`ring_attention_with_plan`.
    """
    world_size, rank = group_size(group), group_rank(group)
    try:
        if dropout_p:
            raise ValueError(f"dropout_p={dropout_p}: attention dropout is not supported by ring attention; use 0.0")
        check_qkv(q, k, v)
        plan = RingPlan(
            cu_seqlens, world_size=world_size, rank=rank, layout=layout, causal=causal,
            window_size=window_size, seqused=seqused, total=q.shape[0] * world_size,
        )
    except (TypeError, ValueError) as error:
        if world_size > 1:  # the other ranks learn of it instead of waiting for this rank's blocks
            check_ranks_agree(None, q, k, group, world_size, error)
        raise
    return ring_attention_with_plan(q, k, v, plan, group=group, softmax_scale=softmax_scale, backend=backend,
                                    softcap=softcap, sinks=sinks)
