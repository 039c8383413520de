"""Ring attention on two CPU processes, checked against attention over the whole sequence.

    python examples/ring_attention_demo.py            # 2 processes, gloo, CPU
    python examples/ring_attention_demo.py --world-size 4 --layout striped
"""

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from hf_ring_attention import pad_for_layout, ring_attention, shard, unpad, unshard


def full_attention(q, k, v, lengths, window):
    """Plain attention, one document at a time, on one process (the answer to match)."""
    outs, start = [], 0
    for n in lengths:
        qd, kd, vd = (t[start:start + n].transpose(0, 1) for t in (q, k, v))
        i = torch.arange(n)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < (window or n + 1))
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True).transpose(0, 1))
        start += n
    return torch.cat(outs)


def worker(rank, args, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size)
    torch.manual_seed(0)  # every rank builds the same full batch
    lengths = [1000, 37, 3001]  # three packed documents of awkward lengths
    total = sum(lengths)
    q = torch.randn(total, 8, 64)  # 8 query heads
    k, v = torch.randn(total, 2, 64), torch.randn(total, 2, 64)  # 2 key/value heads (GQA)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

    # pad each document to the multiple the layout needs, then keep this rank's shard
    padded = [pad_for_layout(t, cu, layout=args.layout) for t in (q, k, v)]
    cu_p, used = padded[0].cu_seqlens, padded[0].seqused
    q_r, k_r, v_r = (shard(p.x, cu_p, layout=args.layout).requires_grad_() for p in padded)

    out = ring_attention(q_r, k_r, v_r, cu_p, layout=args.layout, window_size=args.window, seqused=used)
    out.sum().backward()

    full = unshard(out.detach(), cu_p, layout=args.layout)
    ref = full_attention(q, k, v, lengths, args.window)

    err = (unpad(full, cu_p, used) - ref).abs().max().item()
    if rank == 0:
        print(f"{args.world_size} ranks, layout={args.layout}, {total} tokens, {q_r.shape[0]} per rank; "
              f"max |ring - full attention| = {err:.2e}; dq finite: {bool(q_r.grad.isfinite().all())}")
    assert err < 1e-4, err
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2, help="number of CPU processes (default 2)")
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous", "striped"])
    parser.add_argument("--window", type=int, default=None, help="sliding window (default: none)")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.world_size)


if __name__ == "__main__":
    main()
