"""Peak memory per rank of one training step (forward+backward) of a small Llama under ring
attention, at increasing sequence lengths for P = 1, 2, 4 ranks.

The model is a ``LlamaForCausalLM`` built from a ``LlamaConfig`` (no download; default hidden
256, 4 layers, 8 heads, 2 key/value heads, so head_dim 32). Two modes:

* default, attention only: one layer's ring attention. For T tokens on P ranks each rank holds
  q ``[T/P, 8, 32]`` and k, v ``[T/P, 2, 32]``; ``inputs`` is its q, k, v and the incoming
  gradient of the output, and ``peak`` the most memory used above them during
  ``ring_attention(q, k, v).backward(dout)`` (outputs, log-sum-exp, float32 accumulators,
  gradients, kernel work space, K/V in flight).
* ``--model``: a whole training step of the model patched with
  :func:`hf_ring_attention.patch_model`: a batch of one row of T random tokens sharded with
  :func:`hf_ring_attention.shard_batch`, ``model(**shard).loss.backward()``, an AdamW step
  (``foreach``, as on GPUs; ``--optimizer none`` leaves it out) and ``zero_grad()``. ``inputs``
  is then what is resident before the step (weights and AdamW's two states per weight, made by
  a warm-up step), and ``peak`` everything the step adds (activations of every layer, logits and
  loss, gradients, the optimizer's temporaries). ``--loss standard,chunked`` and ``--mlp
  standard,tiled`` measure every combination side by side (each point in fresh processes, the
  combinations of one point one after the other); ``--estimate`` prints
  :func:`hf_ring_attention.memory.estimate_memory` beside every measurement, and
  ``--time-steps K`` times K more steps per point (median tokens per second). CPU only.

How:

* CPU: every (P, T) point runs in P fresh processes joined by gloo (one for P = 1, the same code
  path with a world size of 1). After a tiny warm-up, the peak resident set size is reset
  (``/proc/self/clear_refs``) and ``peak`` = ``VmHWM`` after the step - ``VmRSS`` before it.
  glibc is told to mmap every allocation of 64 KiB or more (``mallopt``), so that freed tensors
  leave the resident set at once and the peak is that of the live tensors.
* CUDA: the P ranks run one after the other in one process (:class:`InProcessRing`; NCCL cannot
  put two ranks on one GPU) and ``peak`` = ``torch.cuda.max_memory_allocated()`` above the
  allocation before the rank's step. The buffers of K/V and dK/dV in flight between ranks do not
  exist there; they are added from their sizes (one K/V block, two float32 dK/dV blocks).

``fits`` is the longest measured T whose inputs + peak on the fullest rank stay within
``--budget-gib``; ``extrapolated`` extends the line through the two longest measured points.

    python benchmarks/memory.py --out results.json            # attention of one layer
    python benchmarks/memory.py --model --out results.json    # whole training step
    python benchmarks/memory.py --model --vocab-size 32768 --loss standard,chunked --estimate
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist

import statistics
import time

from common import (default_device, machine_info, parse_dtype, parse_names, parse_sizes, print_machine, print_table,
                    run_ranks, size_label, write_json)
from hf_ring_attention import LAYOUTS, InProcessRing, ring_attention
from hf_ring_attention.kernels import get_kernel, resolve_scale

MIB = 2**20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help=f"cpu (default; gloo processes) or cuda (in-process ring); "
                                                  f"this machine: {default_device()}")
    p.add_argument("--world-sizes", type=parse_sizes, default=[1, 2, 4], help="ranks P (default 1,2,4)")
    p.add_argument("--model", action="store_true",
                   help="measure a whole training step of the patched Llama (CPU) instead of one layer's attention")
    p.add_argument("--seq-lens", type=parse_sizes, default=None,
                   help="total sequence lengths, K = 1024 (default 4K,8K,16K,32K on CPU, 2K,4K,8K,16K with "
                        "--model, 16K,32K,64K,128K on CUDA)")
    p.add_argument("--hidden-size", type=int, default=256, help="Llama hidden size (default 256)")
    p.add_argument("--heads", type=int, default=8, help="Llama attention heads (default 8)")
    p.add_argument("--kv-heads", type=int, default=2, help="Llama key/value heads (default 2)")
    p.add_argument("--layers", type=int, default=4, help="Llama layers (default 4; used with --model)")
    p.add_argument("--intermediate-size", type=int, default=688, help="Llama MLP size (default 688; --model)")
    p.add_argument("--vocab-size", type=int, default=1024, help="Llama vocabulary (default 1024; --model)")
    p.add_argument("--loss", type=parse_names, default=["standard"],
                   help="--model: standard and/or chunked (patch_model(chunked_loss=True)), e.g. standard,chunked")
    p.add_argument("--mlp", type=parse_names, default=["standard"],
                   help="--model: standard and/or tiled (patch_model(tiled_mlp=True))")
    p.add_argument("--gradient-checkpointing", action="store_true", help="--model: checkpoint every layer")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "none"],
                   help="--model: AdamW step in the measured step (default) or none")
    p.add_argument("--estimate", action="store_true",
                   help="--model: print hf_ring_attention.memory's estimate beside every measurement")
    p.add_argument("--time-steps", type=int, default=0,
                   help="--model: time this many more steps per point (median tokens/s; default 0)")
    p.add_argument("--layout", default="zigzag", choices=LAYOUTS, help="default zigzag")
    p.add_argument("--dtype", type=parse_dtype, default=None, help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="memory budget per rank (default 0.125 GiB for one layer's attention, 1 GiB with --model)")
    p.add_argument("--out", default=None, help="write the results to this JSON file")
    return p


def llama_config(args) -> dict:
    """Keyword arguments of the ``LlamaConfig`` the arguments describe."""
    return {"hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
            "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
            "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab_size}


def llama_shapes(config_kwargs: dict) -> dict:
    """Attention shapes of that Llama (``LlamaConfig`` sets head_dim = hidden_size / heads)."""
    hidden, heads, kv_heads = (config_kwargs[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    if hidden % heads or heads % kv_heads:
        raise SystemExit(f"--hidden-size={hidden} must be a multiple of --heads={heads}, and --heads a multiple of "
                         f"--kv-heads={kv_heads}")
    return {"heads": heads, "kv_heads": kv_heads, "head_dim": hidden // heads,
            "layers": config_kwargs["num_hidden_layers"], "hidden_size": hidden,
            "intermediate_size": config_kwargs["intermediate_size"], "vocab_size": config_kwargs["vocab_size"]}


# ------------------------------------------------------------------------------------- CPU
def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{key} not found in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank_tensors(local: int, shapes: dict, dtype, gen) -> list[torch.Tensor]:
    """One rank's q, k, v (leaves that require grad) and the gradient of the output."""
    H, Hkv, D = shapes["heads"], shapes["kv_heads"], shapes["head_dim"]
    q = torch.randn(local, H, D, generator=gen, dtype=dtype).requires_grad_()
    k = torch.randn(local, Hkv, D, generator=gen, dtype=dtype).requires_grad_()
    v = torch.randn(local, Hkv, D, generator=gen, dtype=dtype).requires_grad_()
    dout = torch.randn(local, H, D, generator=gen, dtype=dtype)
    return [q, k, v, dout]


def _mmap_large_allocations() -> bool:
    """Ask glibc to serve every allocation of 64 KiB or more with its own mmap, returned to the
    system when freed, so that RSS follows the live tensors instead of growing with malloc's free
    lists (which otherwise keep freed ring buffers and make the peak depend on the step count)."""
    try:
        import ctypes

        M_MMAP_THRESHOLD = -3
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024))
    except (OSError, AttributeError):
        return False


def memory_worker(rank: int, world_size: int, cfg: dict) -> dict:
    """One rank of one (P, T) point: peak RSS above the inputs during forward+backward."""
    mmapped = _mmap_large_allocations()
    dtype, shapes, layout = getattr(torch, cfg["dtype"]), cfg["shapes"], cfg["layout"]
    gen = torch.Generator().manual_seed(rank)
    # warm-up at the smallest size: initialises gloo, the kernels and thread pools, allocates ~nothing
    q, k, v, dout = _rank_tensors(2, shapes, dtype, gen)
    ring_attention(q, k, v, layout=layout).backward(dout)
    del q, k, v, dout
    gc.collect()
    q, k, v, dout = _rank_tensors(cfg["tokens"] // world_size, shapes, dtype, gen)
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v, dout)) / MIB
    _barrier()
    before = _status_mib("VmRSS")
    reset = _reset_peak_rss()
    ring_attention(q, k, v, layout=layout).backward(dout)
    peak = (_status_mib("VmHWM") if reset else _ru_maxrss_mib()) - before
    _barrier()
    method = "VmHWM reset by clear_refs" if reset else "ru_maxrss (process lifetime peak)"
    return {"inputs_mib": inputs, "peak_mib": peak,
            "method": method + ("; allocations >= 64 KiB mmapped" if mmapped else "; default malloc")}


def model_worker(rank: int, world_size: int, cfg: dict) -> dict:
    """One rank of one (P, T) point of ``--model``: peak RSS above what is resident before (the
    weights and the optimizer state) during one training step, and the step's time."""
    mmapped = _mmap_large_allocations()
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_ring_attention import patch_model, shard_batch

    torch.manual_seed(0)  # the same weights on every rank
    model = patch_model(LlamaForCausalLM(LlamaConfig(**cfg["config"])), layout=cfg["layout"],
                        chunked_loss=cfg["loss"] == "chunked", tiled_mlp=cfg["mlp"] == "tiled").train()
    if cfg["gradient_checkpointing"]:
        # transformers 5.24 renamed it (the old name warns); 5.0 has only the old one
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True) if cfg["optimizer"] == "adamw" else None
    gen = torch.Generator().manual_seed(0)  # the same batch on every rank

    def sharded(tokens: int) -> dict:
        ids = torch.randint(0, cfg["config"]["vocab_size"], (1, tokens), generator=gen)
        return shard_batch({"input_ids": ids, "labels": ids}, layout=cfg["layout"])

    def step(batch: dict) -> None:
        model(**batch).loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    step(sharded(16 * world_size))  # warm-up at a tiny size: makes the optimizer state
    gc.collect()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    state = 0.0 if optimizer is None else sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)) / MIB
    batch = sharded(cfg["tokens"])
    _barrier()
    before = _status_mib("VmRSS")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    step(batch)
    seconds = [time.perf_counter() - start]
    peak = (_status_mib("VmHWM") if reset else _ru_maxrss_mib()) - before
    for _ in range(cfg["time_steps"]):
        _barrier()
        start = time.perf_counter()
        step(batch)
        seconds.append(time.perf_counter() - start)
    _barrier()
    method = "VmHWM reset by clear_refs" if reset else "ru_maxrss (process lifetime peak)"
    return {"inputs_mib": weights + state, "weights_mib": weights, "optimizer_mib": state, "peak_mib": peak,
            "step_s": seconds, "method": method + ("; allocations >= 64 KiB mmapped" if mmapped else "; default malloc")}


def _ru_maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def measure_cpu(P: int, T: int, shapes: dict, args, variant: dict | None = None) -> list[dict]:
    cfg = {"tokens": T, "shapes": shapes, "layout": args.layout, "dtype": str(args.dtype).replace("torch.", ""),
           "config": llama_config(args), "gradient_checkpointing": args.gradient_checkpointing,
           "optimizer": args.optimizer, "time_steps": args.time_steps, **(variant or {})}
    return run_ranks(model_worker if args.model else memory_worker, P, cfg, threads=1)


def estimate_mib(P: int, T: int, args, variant: dict) -> float:
    """The peak per rank that hf_ring_attention.memory predicts for this point (MiB)."""
    from transformers import LlamaConfig

    from hf_ring_attention.memory import estimate_memory

    est = estimate_memory(LlamaConfig(**llama_config(args)), T, P, dtype="float32",
                          chunked_loss=variant["loss"] == "chunked", tiled_mlp=variant["mlp"] == "tiled",
                          gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer)
    return est.peak / MIB


# ------------------------------------------------------------------------------------ CUDA
def measure_cuda(P: int, T: int, shapes: dict, args) -> list[dict]:
    device, dtype = torch.device(args.device), args.dtype
    H, Hkv, D, local = shapes["heads"], shapes["kv_heads"], shapes["head_dim"], T // P
    kernel = get_kernel(None, device, dtype, D)
    scale = resolve_scale(None, D)
    ring = InProcessRing(None, world_size=P, layout=args.layout, total=T)
    gen = torch.Generator(device).manual_seed(0)
    make = lambda *shape: torch.randn(shape, generator=gen, device=device, dtype=dtype)
    qs, douts = [make(local, H, D) for _ in range(P)], [make(local, H, D) for _ in range(P)]
    kvs = [make(2, local, Hkv, D) for _ in range(P)]  # K and V in one buffer, as the ring holds them
    dkvs = [torch.zeros(2, local, Hkv, D, device=device) for _ in range(P)]
    block = 2 * local * Hkv * D  # elements of one K/V (or dK/dV) block
    in_flight = (block * qs[0].element_size() + 2 * block * 4) / MIB if P > 1 else 0.0
    inputs = sum(t.numel() * t.element_size() for t in (qs[0], kvs[0], douts[0])) / MIB
    results = []
    for r in range(P):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out, lse = ring.forward_rank(r, qs, kvs, kernel, scale)
        dq = ring.backward_rank(r, douts, qs, kvs, [out] * P, [lse] * P, dkvs, kernel, scale)
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - before) / MIB + in_flight
        del out, lse, dq
        results.append({"inputs_mib": inputs, "peak_mib": peak,
                        "method": "max_memory_allocated + K/V and dK/dV in flight from their sizes"})
    del qs, kvs, douts, dkvs
    torch.cuda.empty_cache()
    return results


# -------------------------------------------------------------------------------- summary
def longest_fitting(points: list[dict], budget_mib: float) -> tuple[int | None, int | None]:
    """(longest measured T within budget, T where the line through the two longest points meets
    the budget; None when it cannot be drawn)."""
    points = sorted(points, key=lambda p: p["seq_len"])
    fits = [p["seq_len"] for p in points if p["total_mib"] <= budget_mib]
    measured = max(fits) if fits else None
    if len(points) < 2:
        return measured, None
    a, b = points[-2], points[-1]
    slope = (b["total_mib"] - a["total_mib"]) / (b["seq_len"] - a["seq_len"])
    if slope <= 0:
        return measured, None
    return measured, int(b["seq_len"] + (budget_mib - b["total_mib"]) / slope)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; use --device cpu")
    if args.model and device.type != "cpu":
        raise SystemExit("--model runs P gloo processes on CPU; on GPUs launch one process per GPU "
                         "(examples/finetune.py prints the peak memory of every rank)")
    if args.model:
        bad = [n for n in args.loss if n not in ("standard", "chunked")] + [n for n in args.mlp if n not in ("standard", "tiled")]
        if bad:
            raise SystemExit(f"--loss takes standard,chunked and --mlp standard,tiled; got {bad}")
    if args.model and args.dtype not in (None, torch.float32):
        raise SystemExit("--model trains the Llama in float32; leave --dtype unset")
    if args.dtype is None:
        args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.seq_lens is None:
        args.seq_lens = parse_sizes("16K,32K,64K,128K" if device.type == "cuda"
                                    else "2K,4K,8K,16K" if args.model else "4K,8K,16K,32K")
    if args.budget_gib is None:
        args.budget_gib = 1.0 if args.model else 0.125
    multiple = 2 * max(args.world_sizes)
    bad = [T for T in args.seq_lens if T % multiple]
    if bad:
        raise SystemExit(f"--seq-lens {bad} must be multiples of {multiple} (2 x the largest world size)")
    shapes = llama_shapes(llama_config(args))
    backend = get_kernel(None, device, args.dtype, shapes["head_dim"]).name
    machine = machine_info(device, backend, threads=1 if device.type == "cpu" else None)
    print_machine(machine)
    what = (f"a training step of the whole model patched with patch_model (vocabulary {shapes['vocab_size']}, "
            f"MLP {shapes['intermediate_size']}, optimizer {args.optimizer}"
            f"{', gradient checkpointing' if args.gradient_checkpointing else ''})" if args.model else "one layer's attention")
    inputs = "weights + optimizer" if args.model else "inputs"
    print(f"Llama: hidden {shapes['hidden_size']}, {shapes['layers']} layers, {shapes['heads']} heads, "
          f"{shapes['kv_heads']} key/value heads, head_dim {shapes['head_dim']}; {what}, "
          f"{str(args.dtype).replace('torch.', '')}, layout {args.layout}"
          + ("; gloo processes, torch.set_num_threads(1) each" if device.type == "cpu" else ""), flush=True)
    measure = measure_cpu if device.type == "cpu" else measure_cuda
    variants = [{}]
    if args.model:
        variants = [{"loss": loss, "mlp": mlp} for loss in args.loss for mlp in args.mlp]
    rows = []
    for P in args.world_sizes:
        for T in args.seq_lens:
            for variant in variants:
                ranks = measure(P, T, shapes, args, variant) if variant else measure(P, T, shapes, args)
                rows.append(_row(P, T, ranks, variant, args))
                _print_row(rows[-1], inputs)
    budget_mib = args.budget_gib * 1024
    fits = []
    for P in args.world_sizes:
        for variant in variants:
            points = [r for r in rows if r["world_size"] == P and all(r[k] == v for k, v in variant.items())]
            measured, extrapolated = longest_fitting(points, budget_mib)
            fits.append({"world_size": P, **variant, "budget_gib": args.budget_gib,
                         "longest_measured_fitting": measured, "extrapolated": extrapolated})
    comparisons = _comparisons(rows) if args.model else []

    print()
    print_machine(machine)
    columns = [("world_size", "P", ""), ("seq_len", "tokens", ""), ("tokens_per_rank", "tokens/rank", "")]
    if args.model:
        columns += [("loss", "loss", ""), ("mlp", "MLP", "")]
    columns += [("inputs_mib", f"{inputs} MiB", ".1f"), ("peak_mib", "peak MiB", ".1f"),
                ("total_mib", f"{inputs} + peak MiB", ".1f")]
    if args.estimate:
        columns += [("estimate_mib", "estimate MiB", ".1f"), ("estimate_error", "estimate / measured - 1", "+.3f")]
    if args.time_steps:
        columns += [("tokens_per_s", "tokens/s", ".0f")]
    print_table(rows, columns)
    if comparisons:
        print("\nside by side (same P and tokens): peak total and tokens/s relative to the standard loss and MLP")
        print_table(comparisons, [("world_size", "P", ""), ("seq_len", "tokens", ""), ("loss", "loss", ""),
                                  ("mlp", "MLP", ""), ("memory_ratio", "memory ratio", ".3f"),
                                  ("throughput_ratio", "throughput ratio", ".3f")])
    print(f"\nlongest sequence within {args.budget_gib} GiB per rank ({inputs} + peak)")
    print_table(fits, [("world_size", "P", "")] + ([("loss", "loss", ""), ("mlp", "MLP", "")] if args.model else [])
                + [("longest_measured_fitting", "longest measured", ""), ("extrapolated", "linear extrapolation", "")])
    settings = {k: v for k, v in vars(args).items() if k != "dtype"}
    settings["dtype"] = str(args.dtype).replace("torch.", "")
    payload = {"benchmark": "memory", "mode": "model" if args.model else "attention", "machine": machine,
               "settings": settings, "model": shapes,
               "results": rows, "fits": fits, "comparisons": comparisons}
    if args.model:
        payload["machine"]["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    write_json(args.out, payload)
    return payload


def _row(P: int, T: int, ranks: list[dict], variant: dict, args) -> dict:
    worst = max(ranks, key=lambda r: r["inputs_mib"] + r["peak_mib"])
    row = {"world_size": P, "seq_len": T, "tokens_per_rank": T // P, **variant, "inputs_mib": worst["inputs_mib"],
           "peak_mib": worst["peak_mib"], "total_mib": worst["inputs_mib"] + worst["peak_mib"],
           "peak_mib_per_rank": [r["peak_mib"] for r in ranks], "method": worst["method"]}
    if args.model:
        row["weights_mib"], row["optimizer_mib"] = worst["weights_mib"], worst["optimizer_mib"]
        # a step ends when its slowest rank does; the median over the timed steps
        steps = [max(r["step_s"][i] for r in ranks) for i in range(len(ranks[0]["step_s"]))]
        row["step_s"] = steps
        if args.time_steps:
            row["tokens_per_s"] = T / statistics.median(steps[1:])
    if args.estimate and args.model:
        row["estimate_mib"] = estimate_mib(P, T, args, variant)
        row["estimate_error"] = row["estimate_mib"] / row["total_mib"] - 1
    return row


def _print_row(row: dict, inputs: str) -> None:
    variant = f" loss {row['loss']:<8} MLP {row['mlp']:<8}" if "loss" in row else ""
    extra = ""
    if "estimate_mib" in row:
        extra += f"; estimate {row['estimate_mib']:.1f} MiB ({row['estimate_error']:+.1%})"
    if "tokens_per_s" in row:
        extra += f"; {row['tokens_per_s']:.0f} tokens/s"
    print(f"P={row['world_size']} T={size_label(row['seq_len']):>5}{variant}: {inputs} {row['inputs_mib']:.1f} MiB + "
          f"peak {row['peak_mib']:.1f} MiB = {row['total_mib']:.1f} MiB on the fullest rank{extra}", flush=True)


def _comparisons(rows: list[dict]) -> list[dict]:
    """Every non-standard variant against the standard one at the same (P, T)."""
    out = []
    for r in rows:
        if r["loss"] == "standard" and r["mlp"] == "standard":
            continue
        base = next((b for b in rows if (b["world_size"], b["seq_len"], b["loss"], b["mlp"])
                     == (r["world_size"], r["seq_len"], "standard", "standard")), None)
        if base is None:
            continue
        cmp = {"world_size": r["world_size"], "seq_len": r["seq_len"], "loss": r["loss"], "mlp": r["mlp"],
               "memory_ratio": r["total_mib"] / base["total_mib"], "throughput_ratio": None}
        if "tokens_per_s" in r and "tokens_per_s" in base:
            cmp["throughput_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
        out.append(cmp)
    return out


if __name__ == "__main__":
    main()
