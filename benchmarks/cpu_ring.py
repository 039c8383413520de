"""Ring attention on CPU processes (gloo): how much of the K/V transfer hides behind compute.

Every rank times, at the same moment as the others and with one torch thread per process:

* ``compute``: its share of the ring without communication (``InProcessRing.forward_rank`` /
  ``backward_rank`` on the same shards: exactly the kernel calls and merges of the ring);
* ``ring``: :func:`hf_ring_attention.ring_attention` on its shard (made by :func:`shard`),
  forward and forward+backward, K/V (and dK/dV) travelling by ``batch_isend_irecv``;
* ``transfer``: one bare ring step, a K/V block (K and V in one buffer) sent to the next rank
  (``RingComm.shift``).

The ring's forward sends P-1 K/V blocks; its backward P-1 K/V blocks and P dK/dV blocks (the last
one goes straight home). Times are those of the slowest rank in the best of the repeats (every
repeat starts on a barrier; other load on the machine only adds time). ``ring - compute`` is an
upper bound on the transfer time that is not hidden (it also holds autograd, planning and
per-step synchronisation costs); ``hidden`` = 1 - (ring - compute) / (number of transfers x one
step's transfer time), clipped to [0, 1], and reported only when the transfer estimate exceeds
the timing noise (median - best repeat); otherwise read the milliseconds.

    python benchmarks/cpu_ring.py --out results.json
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist

from common import balance, machine_info, parse_names, parse_sizes, print_machine, print_table, run_ranks, time_samples, write_json
from hf_ring_attention import LAYOUTS, InProcessRing, ring_attention, shard
from hf_ring_attention.kernels import get_kernel, resolve_scale
from hf_ring_attention.transport import RingComm


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2, help="gloo processes (default 2, one per core here)")
    p.add_argument("--tokens", type=lambda s: parse_sizes(s)[0], default=8192,
                   help="total tokens of the one causal sequence, K = 1024 (default 8K)")
    p.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default 2)")
    p.add_argument("--head-dim", type=int, default=64, help="default 64")
    p.add_argument("--layouts", type=parse_names, default=list(LAYOUTS), help="comma-separated (default: all)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats, the best is reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    p.add_argument("--exchange-repeats", type=int, default=20, help="timed bare K/V exchanges (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results to this JSON file")
    return p


def ring_worker(rank: int, world_size: int, cfg: dict) -> dict:
    """One rank: compute-only, ring and bare-exchange timings for every layout (float32, CPU)."""
    T, H, Hkv, D = cfg["tokens"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    gen = torch.Generator().manual_seed(cfg["seed"])  # the same full tensors on every rank
    q, dout = torch.randn(T, H, D, generator=gen), torch.randn(T, H, D, generator=gen)
    k, v = torch.randn(T, Hkv, D, generator=gen), torch.randn(T, Hkv, D, generator=gen)
    kernel = get_kernel(None, q.device, q.dtype, D)
    scale = resolve_scale(None, D)
    timing = dict(warmup=cfg["warmup"], repeats=cfg["repeats"], before=dist.barrier)
    result = {"layouts": {}}
    for layout in cfg["layouts"]:
        ring = InProcessRing(None, world_size=world_size, layout=layout, total=T)
        qs, ks, vs, douts = (ring.shard(t) for t in (q, k, v, dout))
        kvs = [torch.stack([a, b]) for a, b in zip(ks, vs)]  # K/V as the ring holds them
        dkvs = [torch.zeros_like(t) for t in kvs]

        def compute_fwd_bwd():
            out, lse = ring.forward_rank(rank, qs, kvs, kernel, scale)
            outs, lses = [out] * world_size, [lse] * world_size  # only entry `rank` is read
            ring.backward_rank(rank, douts, qs, kvs, outs, lses, dkvs, kernel, scale)

        local = [shard(t, layout=layout) for t in (q, k, v, dout)]
        assert all(torch.equal(a, b[rank]) for a, b in zip(local, (qs, ks, vs, douts)))
        leaves = [t.clone().requires_grad_() for t in local[:3]]

        def ring_fwd():
            with torch.no_grad():
                ring_attention(*local[:3], layout=layout)

        def ring_fwd_bwd():
            for t in leaves:
                t.grad = None
            ring_attention(*leaves, layout=layout).backward(local[3])

        result["layouts"][layout] = {
            "compute_fwd": time_samples(lambda: ring.forward_rank(rank, qs, kvs, kernel, scale), "cpu", **timing),
            "compute_fwd_bwd": time_samples(compute_fwd_bwd, "cpu", **timing),
            "ring_fwd": time_samples(ring_fwd, "cpu", **timing),
            "ring_fwd_bwd": time_samples(ring_fwd_bwd, "cpu", **timing),
        }
    comm = RingComm(None, rank, world_size)
    block = torch.stack([k[: T // world_size], v[: T // world_size]])  # one K/V message, as in the ring
    result["transfer"] = time_samples(lambda: comm.shift(block).wait(), "cpu", warmup=2,
                                      repeats=cfg["exchange_repeats"], before=dist.barrier)
    result["transfer_bytes"] = block.numel() * block.element_size()
    return result


def best(samples_per_rank: list[list[float]]) -> float:
    """Best repeat of the slowest rank. Every repeat starts on a barrier, so a repeat lasts as long
    as its slowest rank; other work on the machine only ever adds time, hence the minimum."""
    return min(max(repeat) for repeat in zip(*samples_per_rank))


def spread(samples_per_rank: list[list[float]]) -> float:
    """Median - best repeat of the slowest rank: the timing noise of this measurement."""
    return statistics.median(max(repeat) for repeat in zip(*samples_per_rank)) - best(samples_per_rank)


def summarise(per_rank: list[dict], P: int) -> tuple[list[dict], dict]:
    """Rows per layout (slowest rank, balance, hidden share of the transfers) and the transfer."""
    transfer = best([r["transfer"] for r in per_rank])
    nbytes = per_rank[0]["transfer_bytes"]
    moves = {"fwd": P - 1, "fwd_bwd": (P - 1) + (P - 1) + P}
    rows = []
    for layout in per_rank[0]["layouts"]:
        ranks = [r["layouts"][layout] for r in per_rank]
        row = {"layout": layout}
        for phase in ("fwd", "fwd_bwd"):
            compute = best([x[f"compute_{phase}"] for x in ranks])
            ring = best([x[f"ring_{phase}"] for x in ranks])
            noise = max(spread([x[f"compute_{phase}"] for x in ranks]), spread([x[f"ring_{phase}"] for x in ranks]))
            exposed = ring - compute
            transfers = moves[phase] * transfer
            # a share of the transfers is only measurable when they exceed the timing noise
            hidden = min(1.0, max(0.0, 1.0 - exposed / transfers)) if transfers > noise else None
            row.update({
                f"compute_{phase}_samples_s": [x[f"compute_{phase}"] for x in ranks],
                f"ring_{phase}_samples_s": [x[f"ring_{phase}"] for x in ranks],
                f"compute_{phase}_ms": compute * 1e3, f"ring_{phase}_ms": ring * 1e3,
                f"balance_{phase}": balance([min(x[f"compute_{phase}"]) for x in ranks]),
                f"not_hidden_{phase}_ms": exposed * 1e3,
                f"transfers_{phase}": moves[phase],
                f"transfer_estimate_{phase}_ms": transfers * 1e3,
                f"noise_{phase}_ms": noise * 1e3,
                f"hidden_{phase}": hidden,
            })
        rows.append(row)
    return rows, {"step_s": transfer, "step_ms": transfer * 1e3, "bytes": nbytes,
                  "gbytes_per_s": nbytes / transfer / 1e9}


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    bad = [name for name in args.layouts if name not in LAYOUTS]
    if bad:
        raise SystemExit(f"--layouts: unknown {bad}; choose from {list(LAYOUTS)}")
    if args.world_size < 2:
        raise SystemExit(f"--world-size={args.world_size}: a ring needs at least 2 processes")
    if args.tokens % (2 * args.world_size):
        raise SystemExit(f"--tokens={args.tokens} must be a multiple of 2 x world size = {2 * args.world_size}")
    if args.heads % args.kv_heads:
        raise SystemExit(f"--heads={args.heads} must be a multiple of --kv-heads={args.kv_heads}")
    machine = machine_info("cpu", get_kernel(None, torch.device("cpu"), torch.float32, args.head_dim).name, threads=1)
    print_machine(machine)
    print(f"{args.world_size} gloo processes, torch.set_num_threads(1) in each; one causal sequence of "
          f"{args.tokens} tokens ({args.tokens // args.world_size} per rank), {args.heads} query / "
          f"{args.kv_heads} key-value heads, head_dim {args.head_dim}, float32; best of {args.repeats} repeats",
          flush=True)
    cfg = {k: getattr(args, k) for k in ("tokens", "heads", "kv_heads", "head_dim", "layouts", "repeats",
                                         "warmup", "exchange_repeats", "seed")}
    per_rank = run_ranks(ring_worker, args.world_size, cfg, threads=1)
    rows, transfer = summarise(per_rank, args.world_size)

    print(f"\none ring step's transfer (K/V block, {transfer['bytes'] / 2**20:.2f} MiB, bare "
          f"batch_isend_irecv): {transfer['step_ms']:.2f} ms ({transfer['gbytes_per_s']:.2f} GB/s)")
    for phase, title in (("fwd", "forward"), ("fwd_bwd", "forward+backward")):
        print(f"\n{title} (ms, slowest rank, best repeat; compute = the same work without communication)")
        print_table(rows, [("layout", "layout", ""), (f"compute_{phase}_ms", "compute", ".1f"),
                           (f"ring_{phase}_ms", "ring", ".1f"), (f"not_hidden_{phase}_ms", "ring - compute", ".1f"),
                           (f"transfers_{phase}", "transfers", ""),
                           (f"transfer_estimate_{phase}_ms", "transfer estimate", ".1f"),
                           (f"noise_{phase}_ms", "noise", ".1f"), (f"hidden_{phase}", "hidden", ".0%"),
                           (f"balance_{phase}", "balance", ".3f")])
    print("noise = median - best repeat; hidden = 1 - (ring - compute) / transfer estimate, shown only "
          "where the transfer estimate exceeds the noise")
    payload = {"benchmark": "cpu_ring", "machine": machine, "settings": vars(args), "transfer": transfer,
               "results": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
