"""Planning cost: host time to build one rank's :class:`hf_ring_attention.RingPlan` for a packed
batch, over a sweep of ranks P and document counts.

A batch is ``--tokens`` real tokens cut into N documents of random lengths (uniform random cut
points, so lengths from 1 token to several times the mean), every document padded at its end to
the layout's multiple as :func:`hf_ring_attention.pad_for_layout` and ``shard_batch`` do (the
real lengths go in as ``seqused``). For each (layout, window, P, N) it times building the plan of
every rank (median of ``--repeats`` builds per rank, after one warm-up) and reports the slowest
rank; the plan is built once per batch, before the first layer, on every rank at the same time.
Wall time is what a rank waits; CPU time (``time.process_time``) is the work itself, and the
better figure on a shared machine, where wall time also counts the waits for a core.
It also reports the plan's size: kernel calls and segments per step on the slowest rank, and
the time to move the plan's index tensors to the device (``RingPlan.upload``; on CPU a copy).
Last, the share of query and key rows, over every call of every timed rank, that the ring
gathers (``index_select``) and scatters back instead of taking as a view of a contiguous range:
a call's rows are a range when its segments abut; layout padding and causal crops break them.
It is reported for both forms of the calls (``RingPlan.device_calls``): with the gaps as empty
sequences (the built-in backends) and without, with how many more sequences the first form has.

    python benchmarks/plan.py --out plan.json
    python benchmarks/plan.py --world-sizes 8 --docs 512        # the issue's target point
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import default_device, machine_info, parse_names, parse_sizes, print_machine, print_table, write_json
from hf_ring_attention import LAYOUTS, RingPlan
from hf_ring_attention.layout import layout_multiple

TARGET_MS = 50.0  # issue 11: <= 50 ms per rank for 512 documents, 64K tokens, P = 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-sizes", type=parse_sizes, default=[2, 4, 8, 16], help="ranks P (default 2,4,8,16)")
    p.add_argument("--docs", type=parse_sizes, default=[1, 64, 512], help="documents per batch (default 1,64,512)")
    p.add_argument("--tokens", type=lambda s: parse_sizes(s)[0], default=65536,
                   help="real tokens per batch before padding, K = 1024 (default 64K)")
    p.add_argument("--layouts", type=parse_names, default=["zigzag"], help="comma-separated (default zigzag)")
    p.add_argument("--windows", type=parse_names, default=["none", "4096"],
                   help="sliding windows, 'none' for full causal (default none,4096)")
    p.add_argument("--repeats", type=int, default=3, help="timed builds per rank, median reported (default 3)")
    p.add_argument("--max-ranks", type=int, default=None,
                   help="time at most this many ranks, evenly spaced (default: every rank)")
    p.add_argument("--device", default=default_device(), help="device for the upload timing (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results to this JSON file")
    return p


def random_documents(tokens: int, docs: int, multiple: int, seed: int) -> tuple[list[int], list[int]]:
    """(padded bounds, real lengths) of ``docs`` documents of random lengths adding up to
    ``tokens`` real tokens, each padded at its end to a multiple of ``multiple``."""
    if docs > tokens:
        raise SystemExit(f"--docs={docs} exceeds --tokens={tokens}")
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(tokens - 1, generator=gen)[: docs - 1] + 1
    edges = [0] + sorted(cuts.tolist()) + [tokens]
    lengths = [b - a for a, b in zip(edges, edges[1:])]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + -(-n // multiple) * multiple)
    return bounds, lengths


def time_plans(bounds, used, layout, P, window, repeats, device, max_ranks=None) -> dict:
    """Median build time of every rank's plan (or of ``max_ranks`` evenly spaced ranks), and the
    slowest rank's plan size and upload."""
    build_s, cpu_s, plans = [], [], []
    ranks = list(range(P)) if max_ranks is None or max_ranks >= P else sorted(
        {round(i * (P - 1) / max(max_ranks - 1, 1)) for i in range(max_ranks)})
    for rank in ranks:
        def build():
            return RingPlan(bounds, world_size=P, rank=rank, layout=layout, causal=True,
                            window_size=window, seqused=used)

        plan = build()  # warm-up (and the plan kept for its size)
        samples, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            build()
            samples.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        build_s.append(statistics.median(samples))
        cpu_s.append(statistics.median(cpu))
        plans.append(plan)
    slowest = max(range(len(ranks)), key=lambda i: build_s[i])
    plan = plans[slowest]
    steps = plan.steps[: plan.num_steps]
    row = {
        "ranks_timed": ranks,
        "plan_ms_per_rank": [t * 1e3 for t in build_s],
        "plan_ms_max": max(build_s) * 1e3,
        "plan_ms_mean": sum(build_s) / len(ranks) * 1e3,
        "plan_cpu_ms_per_rank": [t * 1e3 for t in cpu_s],
        "plan_cpu_ms_max": max(cpu_s) * 1e3,
        "num_steps": plan.num_steps,
        "calls_per_step_max": max(len(c) for c in steps),
        "segments_max": max(sum(len(call.segments) for call in c) for c in steps),
    }
    upload = getattr(plan, "upload", None)
    if upload is not None:
        t0 = time.perf_counter()
        upload(device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        row["upload_ms"] = (time.perf_counter() - t0) * 1e3
    row.update(_gathered_rows(plans))  # after the timing: it uploads every plan (to the CPU)
    return row


def _gathered_rows(plans) -> dict:
    """Share of the query and key rows of every call that are gathered rather than read as one
    range, in each form of the calls (``RingPlan.device_calls``): with the gaps as empty sequences
    (what the built-in backends get) and without; and how many more sequences the first form
    gives the kernels."""
    row = {}
    sequences = {}
    for empty_sequences, suffix in ((True, ""), (False, "_without_empty_sequences")):
        total = {"q": 0, "k": 0}
        gathered = {"q": 0, "k": 0}
        sequences[empty_sequences] = 0
        for plan in plans:
            for step in plan.device_calls("cpu", empty_sequences=empty_sequences):
                for call in step:
                    sequences[empty_sequences] += len(call.varlen.cu_seqlens_q) - 1
                    for side, rows in (("q", call.q_rows), ("k", call.k_rows)):
                        total[side] += len(rows)
                        gathered[side] += len(rows) if rows.index is not None else 0
        row.update({f"{side}_rows_gathered{suffix}": gathered[side] / max(total[side], 1) for side in ("q", "k")})
    row["sequences_ratio"] = sequences[True] / max(sequences[False], 1)
    return row


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    bad = [name for name in args.layouts if name not in LAYOUTS]
    if bad:
        raise SystemExit(f"--layouts: unknown {bad}; choose from {list(LAYOUTS)}")
    windows = []
    for w in args.windows:
        if w.lower() == "none":
            windows.append(None)
        elif w.isdigit() and int(w) > 0:
            windows.append(int(w))
        else:
            raise SystemExit(f"--windows: expected 'none' or positive integers, got {w!r}")
    torch.set_num_threads(1)
    machine = machine_info(args.device, None, threads=1)
    machine["backend"] = "none (host planning)"
    print_machine(machine)
    print(f"{args.tokens} real tokens per batch in N random-length documents, each padded to the layout's "
          f"multiple; median of {args.repeats} builds per rank, slowest rank reported; one thread; "
          f"load average {machine['load_average_1min']}", flush=True)
    rows = []
    for layout in args.layouts:
        for window in windows:
            for P in args.world_sizes:
                for docs in args.docs:
                    bounds, used = random_documents(args.tokens, docs, layout_multiple(layout, P), args.seed)
                    row = {"layout": layout, "window": window, "world_size": P, "docs": docs,
                           "padded_tokens": bounds[-1],
                           **time_plans(bounds, used, layout, P, window, args.repeats, args.device, args.max_ranks)}
                    rows.append(row)
                    print(f"{layout:>10} window={str(window):>5} P={P:>2} docs={docs:>4}: slowest rank "
                          f"{row['plan_ms_max']:.1f} ms (mean {row['plan_ms_mean']:.1f}, CPU {row['plan_cpu_ms_max']:.1f}), "
                          f"{row['num_steps']} steps, <= {row['calls_per_step_max']} calls per step, "
                          f"rows gathered q {row['q_rows_gathered']:.0%} k {row['k_rows_gathered']:.0%} "
                          f"(without empty sequences q {row['q_rows_gathered_without_empty_sequences']:.0%} "
                          f"k {row['k_rows_gathered_without_empty_sequences']:.0%}), "
                          f"{row['sequences_ratio']:.2f}x sequences", flush=True)
    print()
    print_machine(machine)
    print_table(rows, [("layout", "layout", ""), ("window", "window", ""), ("world_size", "P", ""),
                       ("docs", "documents", ""), ("plan_ms_max", "plan ms (slowest rank)", ".1f"),
                       ("plan_ms_mean", "plan ms (mean)", ".1f"), ("plan_cpu_ms_max", "CPU ms (slowest)", ".1f"),
                       ("num_steps", "steps", ""),
                       ("calls_per_step_max", "calls/step", ""), ("segments_max", "segments/step", ""),
                       ("upload_ms", "upload ms", ".2f"), ("q_rows_gathered", "q gathered", ".0%"),
                       ("k_rows_gathered", "k gathered", ".0%"),
                       ("q_rows_gathered_without_empty_sequences", "q gathered (no empty seq.)", ".0%"),
                       ("k_rows_gathered_without_empty_sequences", "k gathered (no empty seq.)", ".0%"),
                       ("sequences_ratio", "sequences x", ".2f")])
    payload = {"benchmark": "plan", "machine": machine, "settings": vars(args), "target_ms": TARGET_MS,
               "results": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
