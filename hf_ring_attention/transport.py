"""Moving K/V blocks (forward) and their gradients (backward) between the ranks of a ring.

The ring loop never touches ``torch.distributed`` itself: it asks :class:`RingComm` to exchange
a list of tensors with two peers and gets back a handle whose ``wait()`` returns what arrived.
Posting the exchange before the current block's compute and waiting after it is the whole
double-buffering scheme.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import global_rank


class Pending:
    """An exchange in flight. Holds the sent tensors until it completes (NCCL may still read
    them) and returns the received ones from :meth:`wait`."""

    def __init__(self, works, sent: list[torch.Tensor], received: list[torch.Tensor]):
        self._works, self._sent, self._received = works, sent, received

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._works, self._sent = [], []
        return self._received


class RingComm:
    """Point-to-point exchanges inside one process group, with ``batch_isend_irecv``.

    Args:
        group (`ProcessGroup`, *optional*): the sequence-parallel group (None: default group).
        rank (`int`): this process's rank in ``group``.
        world_size (`int`): size of ``group``.
    """

    def __init__(self, group, rank: int, world_size: int):
        self.group, self.rank, self.world_size = group, rank, world_size

    def exchange(self, tensors: list[torch.Tensor], send_to: int, recv_from: int, tag: int = 0) -> Pending:
        """Send ``tensors`` to group rank ``send_to`` and receive tensors of the same shapes and
        dtypes from group rank ``recv_from``. Tensor i travels with tag ``tag + i`` (gloo matches
        messages by tag; NCCL by order)."""
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        to, frm = global_rank(self.group, send_to % self.world_size), global_rank(
            self.group, recv_from % self.world_size
        )
        ops = []
        for tag, (out, into) in enumerate(zip(tensors, received), start=tag):
            ops.append(dist.P2POp(dist.isend, out, to, self.group, tag))
            ops.append(dist.P2POp(dist.irecv, into, frm, self.group, tag))
        return Pending(dist.batch_isend_irecv(ops), tensors, received)

    def shift(self, tensors: list[torch.Tensor], tag: int = 0) -> Pending:
        """Pass ``tensors`` one hop around the ring: to rank + 1, from rank - 1."""
        return self.exchange(tensors, self.rank + 1, self.rank - 1, tag)
