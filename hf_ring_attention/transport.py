"""Moving K/V blocks (forward) and their gradients (backward) between the ranks of a ring.

The ring loop never touches ``torch.distributed`` itself: it asks :class:`RingComm` to exchange a
tensor with two peers and gets back a handle whose ``wait()`` returns what arrived. Posting the
exchange before the current block's compute and waiting after it is the whole double-buffering
scheme. K and V travel as one ``[2, T, Hkv, D]`` buffer, dK and dV as one float32 buffer: one
message per hop each way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class Pending:
    """An exchange in flight. Holds the sent tensor until it completes (NCCL may still read it)
    and returns the received one from :meth:`wait`."""

    def __init__(self, works, sent: torch.Tensor, received: torch.Tensor):
        self._works, self._sent, self._received = works, sent, received

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        self._works, self._sent = [], None
        return self._received


class RingComm:
    """Point-to-point exchanges inside one process group, with ``batch_isend_irecv``.

    Args:
        group (`ProcessGroup`, *optional*): the context-parallel group (None: default group).
        rank (`int`): this process's rank in ``group``.
        world_size (`int`): size of ``group``.
    """

    def __init__(self, group: ProcessGroup | None, rank: int, world_size: int):
        self.group, self.rank, self.world_size = group, rank, world_size

    def exchange(self, tensor: torch.Tensor, send_to: int, recv_from: int, tag: int = 0) -> Pending:
        """Send ``tensor`` to group rank ``send_to`` and receive a tensor of the same shape and
        dtype from group rank ``recv_from`` (ranks are taken modulo the group size). Messages
        are matched by ``tag`` (gloo) or by order (NCCL)."""
        tensor = tensor.contiguous()
        received = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor, group=self.group, tag=tag, group_peer=send_to % self.world_size),
            dist.P2POp(dist.irecv, received, group=self.group, tag=tag, group_peer=recv_from % self.world_size),
        ]
        return Pending(dist.batch_isend_irecv(ops), tensor, received)

    def shift(self, tensor: torch.Tensor, tag: int = 0) -> Pending:
        """Pass ``tensor`` one hop around the ring: to rank + 1, from rank - 1."""
        return self.exchange(tensor, self.rank + 1, self.rank - 1, tag)
