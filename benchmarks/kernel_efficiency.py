"""Kernel efficiency of the ring decomposition: every rank's share of a ring, run one rank after
the other on one device through :class:`hf_ring_attention.InProcessRing` (no communication).

For each layout x {one sequence, packed documents} x world size P x tokens per rank it times each
rank's forward and forward+backward, and reports

* efficiency = time of one kernel call over the whole sequence (all P x tokens, same documents,
  causal; forward+backward = kernel forward + kernel backward) / sum over ranks of the rank's time.
  1.0 means splitting the work into ring steps and merging costs nothing;
* balance = slowest rank / mean rank (1.0 = every rank has the same work).

With packed documents a call's rows are often not one range; ``--forms ranges,gathered`` times
both ways of reading them side by side (``RingPlan.device_calls``).

A reference row per sequence gives the single-call time and its TFLOP/s (4 L^2 H D per document,
halved for causal; forward+backward counted as 3.5 x forward).

    python benchmarks/kernel_efficiency.py --out results.json           # CUDA, bf16, full sweep
    python benchmarks/kernel_efficiency.py --device cpu                 # tiny CPU smoke run
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

from common import (
    attention_flops, balance, cu_seqlens, default_device, gathering, machine_info, packed_lengths,
    parse_dtype, parse_names, parse_sizes, print_machine, print_table, size_label, time_call,
    write_json,
)
from hf_ring_attention import LAYOUTS, InProcessRing
from hf_ring_attention.kernels import Varlen, get_kernel, resolve_scale, takes_empty_sequences

# Full-size sweep (CUDA) and the tiny one used automatically with --device cpu.
GPU_DEFAULTS = dict(dtype="bfloat16", heads=32, kv_heads=8, head_dim=128, world_sizes="2,4,8",
                    tokens_per_rank="2K,4K,8K,16K", repeats=5, warmup=1)
CPU_DEFAULTS = dict(dtype="float32", heads=4, kv_heads=2, head_dim=32, world_sizes="2,4",
                    tokens_per_rank="64,128,256", repeats=10, warmup=2)
FWD_BWD_FLOPS = 3.5  # forward+backward FLOPs per forward FLOP (DESIGN.md convention)
FORMS = ("ranges", "gathered")  # how a call reads its rows (RingPlan.device_calls)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=default_device(), help="cuda (default if available) or cpu")
    p.add_argument("--backend", default=None,
                   help="kernel backend: flash_attn_4, flash_attn, torch_flash or cpu (default: automatic)")
    p.add_argument("--layouts", type=parse_names, default=list(LAYOUTS), help="comma-separated (default: all)")
    p.add_argument("--world-sizes", type=parse_sizes, default=None,
                   help=f"ranks P (default {GPU_DEFAULTS['world_sizes']} on CUDA, {CPU_DEFAULTS['world_sizes']} on CPU)")
    p.add_argument("--tokens-per-rank", type=parse_sizes, default=None,
                   help=f"tokens per rank, K = 1024 (default {GPU_DEFAULTS['tokens_per_rank']} on CUDA, "
                        f"{CPU_DEFAULTS['tokens_per_rank']} on CPU)")
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=None,
                   help="--packed: packed documents only; --no-packed: one sequence only (default: both)")
    p.add_argument("--forms", type=parse_names, default=["ranges"],
                   help="how calls read rows that are not one range (packed documents), comma-separated: "
                        "'ranges' (one range per side, gaps as empty sequences; what the built-in backends get) "
                        "and/or 'gathered' (rows gathered through an index) (default: ranges)")
    p.add_argument("--window", type=int, default=None,
                   help="sliding window (query i sees keys i - window < j <= i) for the ring and the reference "
                        "(default: none, plain causal)")
    p.add_argument("--dtype", type=parse_dtype, default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 32 on CUDA, 4 on CPU)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default 8 on CUDA, 2 on CPU)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 on CUDA, 32 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 5 CUDA, 10 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 1 CUDA, 2 CPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: steadier timings on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results to this JSON file")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset sizes from the device's defaults and validate the sweep."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; use --device cpu for the smoke run")
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, parse_sizes(value) if key in ("world_sizes", "tokens_per_rank")
                    else parse_dtype(value) if key == "dtype" else value)
    bad_forms = [name for name in args.forms if name not in FORMS]
    if bad_forms:
        raise SystemExit(f"--forms: unknown {bad_forms}; choose from {list(FORMS)}")
    bad = [name for name in args.layouts if name not in LAYOUTS]
    if bad:
        raise SystemExit(f"--layouts: unknown {bad}; choose from {list(LAYOUTS)}")
    if args.heads % args.kv_heads:
        raise SystemExit(f"--heads={args.heads} must be a multiple of --kv-heads={args.kv_heads}")
    args.doc_multiple = 2 * math.lcm(*args.world_sizes)  # every layout can split every document
    for P in args.world_sizes:
        for t in args.tokens_per_rank:
            if (P * t) % args.doc_multiple:
                raise SystemExit(
                    f"P={P} x tokens_per_rank={t} = {P * t} tokens must be a multiple of "
                    f"{args.doc_multiple} (2 x lcm of --world-sizes) so that every layout can split it"
                )
    args.packings = [False, True] if args.packed is None else [args.packed]
    return args


def documents(total: int, packed: bool, args) -> list[int]:
    return packed_lengths(total, args.doc_multiple, args.seed) if packed else [total]


def random_qkv(total: int, args, gen: torch.Generator):
    shape_q, shape_kv = (total, args.heads, args.head_dim), (total, args.kv_heads, args.head_dim)
    make = lambda shape: torch.randn(shape, generator=gen, device=args.device, dtype=args.dtype)
    return make(shape_q), make(shape_kv), make(shape_kv), make(shape_q)


def time_full(lengths: list[int], kernel, args) -> dict:
    """One kernel call over the whole sequence (the reference the ring is compared with)."""
    total = sum(lengths)
    q, k, v, dout = random_qkv(total, args, torch.Generator(args.device).manual_seed(args.seed))
    cu = cu_seqlens(lengths, args.device)
    # causal; with a sliding window (transformers' convention: query i sees keys i - w < j <= i)
    call = Varlen(cu, cu, max(lengths), max(lengths), (-1, 0) if args.window is None else (args.window - 1, 0))
    scale = resolve_scale(None, args.head_dim)

    def fwd_bwd():
        o, l = kernel.forward(q, k, v, call, scale)
        kernel.backward(dout, q, k, v, o, l, call, scale)

    fwd = time_call(lambda: kernel.forward(q, k, v, call, scale), args.device, warmup=args.warmup, repeats=args.repeats)
    fb = time_call(fwd_bwd, args.device, warmup=args.warmup, repeats=args.repeats)
    flops = attention_flops(lengths, args.heads, args.head_dim)
    return {"fwd_s": fwd, "fwd_bwd_s": fb, "tflops_fwd": flops / fwd / 1e12,
            "tflops_fwd_bwd": FWD_BWD_FLOPS * flops / fb / 1e12}


def time_ranks(layout: str, lengths: list[int], P: int, kernel, args, form: str = "ranges") -> dict:
    """Forward and forward+backward time of every rank's share of the ring, one rank at a time,
    its calls reading their rows in ``form``."""
    total = sum(lengths)
    ring = InProcessRing(cu_seqlens(lengths), world_size=P, layout=layout, window_size=args.window)
    if form == "gathered":
        kernel = gathering(kernel)
    for plan in ring.plans:
        plan.upload(args.device, empty_sequences=takes_empty_sequences(kernel))
    q, k, v, dout = random_qkv(total, args, torch.Generator(args.device).manual_seed(args.seed))
    qs, douts = ring.shard(q), ring.shard(dout)
    kvs = [torch.stack([a, b]) for a, b in zip(ring.shard(k), ring.shard(v))]  # K/V as the ring holds them
    del q, k, v, dout
    dkvs = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in kvs]
    scale = resolve_scale(None, args.head_dim)

    def fwd_bwd(r):
        out, lse = ring.forward_rank(r, qs, kvs, kernel, scale)
        # backward_rank reads only entry r of the outputs and log-sum-exps
        ring.backward_rank(r, douts, qs, kvs, [out] * P, [lse] * P, dkvs, kernel, scale)

    fwd = [time_call(lambda: ring.forward_rank(r, qs, kvs, kernel, scale), args.device,
                     warmup=args.warmup, repeats=args.repeats) for r in range(P)]
    fb = [time_call(lambda: fwd_bwd(r), args.device, warmup=args.warmup, repeats=args.repeats)
          for r in range(P)]
    calls = [sum(len(c) for c in plan.steps[:ring.num_steps]) for plan in ring.plans]
    peaks = [peak_mib(lambda: fwd_bwd(r), args.device) for r in range(P)]
    return {"fwd_s": fwd, "fwd_bwd_s": fb, "kernel_calls": calls,
            "fwd_bwd_peak_mib": None if peaks[0] is None else max(peaks)}


def peak_mib(fn, device) -> float | None:
    """Memory ``fn`` allocates at its peak beyond what is allocated already, in MiB (CUDA only:
    the kernels' scratch buffers, e.g. flash-attn's dq accumulator, padded per sequence)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main(argv=None) -> dict:
    args = resolve(build_parser().parse_args(argv))
    torch.set_num_threads(args.threads)
    kernel = get_kernel(args.backend, torch.device(args.device), args.dtype, args.head_dim)
    machine = machine_info(args.device, kernel.name)
    print_machine(machine)
    mask = "causal" if args.window is None else f"causal, window {args.window}"
    print(f"shape: {args.heads} query / {args.kv_heads} key-value heads, head_dim {args.head_dim}, "
          f"{str(args.dtype).replace('torch.', '')}, {mask}; median of {args.repeats} after {args.warmup} warm-up",
          flush=True)
    references, rows = {}, []
    for packed in args.packings:
        for P in args.world_sizes:
            for t in args.tokens_per_rank:
                total = P * t
                lengths = documents(total, packed, args)
                if (packed, total) not in references:
                    ref = time_full(lengths, kernel, args)
                    references[packed, total] = dict(packed=packed, total_tokens=total, num_docs=len(lengths), **ref)
                    print(f"reference {'packed' if packed else 'one sequence'} {size_label(total)} tokens: "
                          f"fwd {ref['fwd_s'] * 1e3:.2f} ms ({ref['tflops_fwd']:.3g} TFLOP/s), "
                          f"fwd+bwd {ref['fwd_bwd_s'] * 1e3:.2f} ms ({ref['tflops_fwd_bwd']:.3g} TFLOP/s)", flush=True)
                ref = references[packed, total]
                # one sequence: every call reads one range in either form, so one form is enough
                for layout, form in itertools.product(args.layouts, args.forms if packed else args.forms[:1]):
                    timing = time_ranks(layout, lengths, P, kernel, args, form)
                    row = dict(
                        layout=layout, packed=packed, form=form, world_size=P, tokens_per_rank=t,
                        total_tokens=total, num_docs=len(lengths), window=args.window,
                        efficiency_fwd=ref["fwd_s"] / sum(timing["fwd_s"]),
                        efficiency_fwd_bwd=ref["fwd_bwd_s"] / sum(timing["fwd_bwd_s"]),
                        balance_fwd=balance(timing["fwd_s"]), balance_fwd_bwd=balance(timing["fwd_bwd_s"]),
                        **timing,
                    )
                    rows.append(row)
                    print(f"{layout:>10} {'packed' if packed else 'one seq':>7} {form:>8} P={P} {size_label(t):>5}/rank: "
                          f"efficiency fwd {row['efficiency_fwd']:.3f} fwd+bwd {row['efficiency_fwd_bwd']:.3f}, "
                          f"balance fwd {row['balance_fwd']:.3f} fwd+bwd {row['balance_fwd_bwd']:.3f}", flush=True)
    reference_rows = list(references.values())
    for r in rows:
        r["docs"] = "packed" if r["packed"] else "one"
        r["slowest_fwd_bwd_ms"] = max(r["fwd_bwd_s"]) * 1e3
    for r in reference_rows:
        r["docs"] = "packed" if r["packed"] else "one"
        r["fwd_ms"], r["fwd_bwd_ms"] = r["fwd_s"] * 1e3, r["fwd_bwd_s"] * 1e3

    print()
    print_machine(machine)
    print_table(rows, [("layout", "layout", ""), ("docs", "docs", ""), ("form", "rows", ""), ("world_size", "P", ""),
                       ("tokens_per_rank", "tokens/rank", ""), ("efficiency_fwd", "eff fwd", ".3f"),
                       ("efficiency_fwd_bwd", "eff fwd+bwd", ".3f"), ("balance_fwd", "bal fwd", ".3f"),
                       ("balance_fwd_bwd", "bal fwd+bwd", ".3f"), ("slowest_fwd_bwd_ms", "slowest rank fwd+bwd ms", ".2f")]
                + ([("fwd_bwd_peak_mib", "peak MiB fwd+bwd", ".0f")] if rows and rows[0]["fwd_bwd_peak_mib"] is not None else []))
    print("\nreference: one kernel call over the whole sequence (plain full attention)")
    print_table(reference_rows, [("docs", "docs", ""), ("total_tokens", "tokens", ""), ("num_docs", "documents", ""),
                                 ("fwd_ms", "fwd ms", ".2f"), ("fwd_bwd_ms", "fwd+bwd ms", ".2f"),
                                 ("tflops_fwd", "TFLOP/s fwd", ".3g"), ("tflops_fwd_bwd", "TFLOP/s fwd+bwd", ".3g")])
    settings = {k: v for k, v in vars(args).items() if k not in ("dtype", "packings")}
    settings["dtype"] = str(args.dtype).replace("torch.", "")
    payload = {"benchmark": "kernel_efficiency", "machine": machine, "settings": settings,
               "results": rows, "reference": reference_rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
