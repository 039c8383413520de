"""All P ranks of a ring in one process, without communication.

Rank r's step s reads the K/V block of rank ``(r - s) % P`` straight from the list of blocks, and
its dK/dV for that block are added to the owner's gradient. The per-step compute is the very code
the distributed ring runs (``forward_step`` / ``backward_step``), so this serves fast unit tests
with many ranks and per-rank timing on a single GPU (NCCL cannot put two ranks on one device).
"""

from __future__ import annotations

import torch

from .kernels import Kernel, accumulate_dtype, get_kernel, resolve_scale, resolve_softcap, takes_empty_sequences
from .layout import local_indices
from .merge import prepare
from .plan import RingPlan
from .ring import (add_sinks, without_autocast, backward_step, check_qkv, check_sinks, check_tokens, forward_step, new_result,
                   sink_grad)


class InProcessRing:
    """The plans of every rank of a ring, and the means to run them in one process.

    Args:
        cu_seqlens, layout, causal, window_size, seqused, total: as for :class:`RingPlan`.
        world_size (`int`): number of simulated ranks.

    Example::

        ring = InProcessRing(cu_seqlens, world_size=4)
        qs, ks, vs = ring.shard(q), ring.shard(k), ring.shard(v)
        out = ring.unshard(ring.attention(qs, ks, vs))   # == attention over the whole sequence
    """

    def __init__(self, cu_seqlens=None, *, world_size: int, layout: str = "zigzag", causal: bool = True,
                 window_size: int | None = None, seqused=None, total: int | None = None):
        self.plans = [
            RingPlan(cu_seqlens, world_size=world_size, rank=r, layout=layout, causal=causal,
                     window_size=window_size, seqused=seqused, total=total)
            for r in range(world_size)
        ]
        self.world_size = world_size
        self.num_steps = max(p.num_steps for p in self.plans)
        plan = self.plans[0]
        self._index = [local_indices(plan.bounds, layout, world_size, r) for r in range(world_size)]

    def shard(self, x: torch.Tensor, dim: int = 0) -> list[torch.Tensor]:
        """Every rank's part of the full tensor ``x``."""
        return [x.index_select(dim, i.to(x.device)) for i in self._index]

    def unshard(self, parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
        """The full tensor from every rank's part (differentiable)."""
        index = torch.cat(self._index).to(parts[0].device)
        return torch.cat(parts, dim=dim).index_select(dim, torch.argsort(index))

    def forward_rank(self, rank: int, qs, kvs, kernel: Kernel, softmax_scale: float, softcap: float = 0.0,
                     sinks: torch.Tensor | None = None):
        """Rank ``rank``'s (out, lse), reading the other ranks' K/V blocks (``kvs[r]`` is rank
        r's ``[2, T, Hkv, D]`` buffer, K then V) directly; with ``sinks``, merged with them."""
        q, P = qs[rank], self.world_size
        out, lse = new_result(q)
        calls = self.plans[rank].device_calls(q.device, empty_sequences=takes_empty_sequences(kernel))
        for step in range(self.num_steps):
            forward_step(q, kvs[(rank - step) % P], calls[step], out, lse, kernel, softmax_scale, softcap)
        if sinks is not None:
            add_sinks(out, lse, sinks)
        return out.to(q.dtype), lse

    def backward_rank(self, rank: int, douts, qs, kvs, outs, lses, dkvs, kernel: Kernel, softmax_scale: float,
                      softcap: float = 0.0):
        """Rank ``rank``'s dq; its dK/dV contributions are added to ``dkvs[src]``."""
        q, P = qs[rank], self.world_size
        dq = torch.zeros(q.shape, dtype=accumulate_dtype(q.dtype), device=q.device)
        calls = self.plans[rank].device_calls(q.device, empty_sequences=takes_empty_sequences(kernel))
        for step in range(self.num_steps):
            src = (rank - step) % P
            grads = backward_step(douts[rank], q, kvs[src], outs[rank], lses[rank], calls[step], dq,
                                  kernel, softmax_scale, softcap)
            if grads is not None:
                dkvs[src] += grads
        return dq.to(q.dtype)

    def attention(self, qs, ks, vs, *, softmax_scale: float | None = None, backend: str | Kernel | None = None,
                  softcap: float | None = None, sinks: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every rank's ring attention output, differentiable with respect to all inputs
        (``softcap`` and ``sinks`` as for :func:`~hf_ring_attention.ring_attention`; the sinks'
        gradient is the sum over the ranks)."""
        if not len(qs) == len(ks) == len(vs) == self.world_size:
            raise ValueError(f"expected {self.world_size} shards of q, k and v, got {len(qs)}, {len(ks)}, {len(vs)}")
        for plan, q, k, v in zip(self.plans, qs, ks, vs):
            check_qkv(q, k, v)
            check_tokens(q, plan.local_tokens, self.world_size)
        check_sinks(sinks, qs[0])
        softcap = resolve_softcap(softcap)
        kernel = get_kernel(backend, qs[0].device, qs[0].dtype, qs[0].shape[-1], softcap)
        prepare(qs[0].device, qs[0].shape[-1], qs[0].dtype)
        scale = resolve_scale(softmax_scale, qs[0].shape[-1])
        tensors = [t.contiguous() for t in (*qs, *ks, *vs)]
        return list(_InProcessFunction.apply(self, kernel, scale, softcap, sinks, *tensors))


class _InProcessFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ring: InProcessRing, kernel, scale, softcap, sinks, *tensors):
        P = ring.world_size
        qs, ks, vs = tensors[:P], tensors[P:2 * P], tensors[2 * P:]
        kvs = [torch.stack([k, v]) for k, v in zip(ks, vs)]
        with without_autocast(qs[0].device):
            results = [ring.forward_rank(r, qs, kvs, kernel, scale, softcap, sinks) for r in range(P)]
        outs = [o for o, _ in results]
        ctx.save_for_backward(*tensors, *outs, *(l for _, l in results), sinks)
        ctx.ring, ctx.kernel, ctx.scale, ctx.softcap = ring, kernel, scale, softcap
        return tuple(outs)

    @staticmethod
    def backward(ctx, *douts):
        ring, P = ctx.ring, ctx.ring.world_size
        saved = ctx.saved_tensors
        qs, ks, vs, outs, lses = (saved[i * P:(i + 1) * P] for i in range(5))
        sinks = saved[-1]
        douts = [d.contiguous() if d is not None else torch.zeros_like(o) for d, o in zip(douts, outs)]
        kvs = [torch.stack([k, v]) for k, v in zip(ks, vs)]
        acc = accumulate_dtype(qs[0].dtype)
        dkvs = [torch.zeros(kv.shape, dtype=acc, device=kv.device) for kv in kvs]
        with without_autocast(qs[0].device):
            dqs = [ring.backward_rank(r, douts, qs, kvs, outs, lses, dkvs, ctx.kernel, ctx.scale, ctx.softcap)
                   for r in range(P)]
            dsinks = None
            if ctx.needs_input_grad[4]:
                dsinks = sum(sink_grad(d, o, l, sinks) for d, o, l in zip(douts, outs, lses)).to(sinks.dtype)
        dks = [d[0].to(k.dtype) for d, k in zip(dkvs, ks)]
        dvs = [d[1].to(v.dtype) for d, v in zip(dkvs, vs)]
        return (None, None, None, None, dsinks, *dqs, *dks, *dvs)
