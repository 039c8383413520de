"""One-command check of the CUDA path on one GPU (H100/H200: about 3 minutes), for the first
session that has one:

1. ``backends``: every kernel backend that can run here (and the reasons of those that cannot)
   against float64 attention, forward and backward, bf16: causal and windowed masks with query
   and key lengths that differ, flash-attn 2's window clamping (issue 11's case: Lq = 4, Lk = 2,
   window (-1, 2), with the ``max_seqlen_k`` the plan reports; the same call with the true
   ``max(Lk)`` is recorded too, as information: flash-attn 2 class kernels get it wrong, which is
   why the plan never does it), and GQA with one query per sequence (where flash-attn 2 swaps the
   head groups into the sequence dimension), and calls with empty sequences (no queries, or no
   keys: the gaps that spare the ring its gathers).
2. ``ring``: the in-process ring in bf16 against float64 attention on the whole sequence, for
   every layout, with packed and padded documents (tiny ones included), causal, sliding and
   non-causal windows, per backend, in both forms of a call: one range per side with the gaps as
   empty sequences (what the built-in backends get), and gathered rows.
3. ``syncs``: host synchronisations (``torch.cuda.set_sync_debug_mode``) of a warm ring step,
   forward and backward (target 0).
4. ``plan``: host time to plan a packed batch (512 documents, 64K tokens, P = 8).
5. ``kernel_efficiency``: ``kernel_efficiency.py`` at P = 8, 8K tokens per rank, zigzag and
   contiguous, one sequence and packed documents, bf16, 32 query / 8 key-value heads, head_dim 128;
   packed documents in both forms of a call, side by side, with their peak memory, and again
   under a 4096-token sliding window.

Each section records its own failure (with the traceback) and the next one runs. Everything goes
to ``DIR/gpu_check.json`` and a one-screen ``DIR/summary.txt`` (also printed).

    python benchmarks/gpu_check.py --out gpu_check/             # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --out smoke/    # tiny CPU run of the same code
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
import warnings

import torch

from common import gathering, machine_info, write_json
from hf_ring_attention import LAYOUTS, InProcessRing, pad_for_layout
from hf_ring_attention.kernels import BACKENDS, Varlen, get_kernel, resolve_scale, takes_empty_sequences

TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-5}  # as tests/helpers.py
LSE_TOL = 1e-2  # lse is computed in float32 from the rounded inputs: a small relative error

# GPU sizes, and the tiny ones of the CPU smoke run (same code)
GPU = dict(heads=32, kv_heads=8, head_dim=128, ring_heads=8, ring_kv_heads=2, ring_head_dim=64,
           ring_tokens=3000, ring_world_sizes=(4, 8), windows=(None, 100, 5))
CPU = dict(heads=4, kv_heads=2, head_dim=16, ring_heads=4, ring_kv_heads=2, ring_head_dim=16,
           ring_tokens=60, ring_world_sizes=(2,), windows=(None, 5))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for gpu_check.json and summary.txt")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a tiny smoke run of the same code)")
    p.add_argument("--sections", default="backends,ring,syncs,plan,kernel_efficiency",
                   help="comma-separated subset of the sections (default: all)")
    p.add_argument("--seed", type=int, default=0)
    return p


# --------------------------------------------------------------------------------- helpers
def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, ||ref|| floored at an RMS of 0.1 (inputs are N(0, 1))."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(0.1 * max(ref.numel(), 1) ** 0.5)).item()


def band_attention(q, k, v, lqs, lks, window, scale):
    """float64 (out, lse) of packed sequences with a bottom-right aligned window (-1: unbounded)."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    outs, lses = [], []
    q0 = k0 = 0
    for lq, lk in zip(lqs, lks):
        rel = (torch.arange(lk, device=q.device)[None, :] - torch.arange(lq, device=q.device)[:, None]
               - (lk - lq))
        seen = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if window[0] >= 0:
            seen &= rel >= -window[0]
        if window[1] >= 0:
            seen &= rel <= window[1]
        assert lk == 0 or seen.any(1).all(), "every query row of a sequence with keys must see one"
        kk = k[k0:k0 + lk].repeat_interleave(groups, 1)
        vv = v[k0:k0 + lk].repeat_interleave(groups, 1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q0 + lq], kk) * scale
        s = s.masked_fill(~seen, -math.inf)
        lse = torch.logsumexp(s, -1)  # -inf for the rows of a sequence without keys
        lses.append(lse)
        p = torch.exp(s - lse.masked_fill(lse == -math.inf, 0)[..., None])  # 0 there: out 0, no gradient
        outs.append(torch.einsum("hqk,khd->qhd", p, vv))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs), torch.cat(lses, 1)


def true_mask(bounds, causal, window, seqused, device) -> torch.Tensor:
    """[T, T] bool: may global query i attend to global key j (documents, padding, mask)."""
    total = bounds[-1]
    doc = torch.empty(total, dtype=torch.long)
    pos = torch.empty(total, dtype=torch.long)
    real = torch.zeros(total, dtype=torch.bool)
    for d, (a, b) in enumerate(zip(bounds, bounds[1:])):
        doc[a:b], pos[a:b] = d, torch.arange(b - a)
        real[a:a + seqused[d]] = True
    i, j = pos[:, None], pos[None, :]
    mask = (doc[:, None] == doc[None, :]) & real[:, None] & real[None, :]
    if causal:
        mask &= j <= i
    if window is not None:
        mask &= i - j < window
        if not causal:
            mask &= j - i < window
    return mask.to(device)


def full_attention(q, k, v, mask, scale):
    """float64 attention of the whole packed sequence under ``mask`` (rows that see nothing: 0)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    p = torch.softmax(s.masked_fill(~mask, -math.inf), -1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, v)


def candidate_backends(device: torch.device, dtype, head_dim: int) -> tuple[list[str], dict]:
    """Backends that can run here (the cpu kernel only on a CPU device), and why the others cannot."""
    usable, reasons = [], {}
    for name, module in BACKENDS.items():
        reason = module.check(device, dtype, head_dim)
        if name == "cpu" and device.type == "cuda":
            reason = "not checked on CUDA (the flash backends are the subject)"
        if reason is None:
            usable.append(name)
        else:
            reasons[name] = reason
    return usable, reasons


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_section(name: str, fn, report: dict, *args) -> None:
    """Run one section, recording its result or its failure in ``report[name]``; never raises."""
    start = time.perf_counter()
    print(f"--- {name}", flush=True)
    try:
        result = fn(*args)
        report[name] = {"status": "ok", **result}
    except Exception as error:  # a failing section must not stop the others
        report[name] = {"status": "error", "error": f"{type(error).__name__}: {error}",
                        "traceback": traceback.format_exc()}
        print(f"{name} failed: {type(error).__name__}: {error}", flush=True)
    report[name]["seconds"] = round(time.perf_counter() - start, 1)


# -------------------------------------------------------------------------------- backends
def backend_cases(sizes: dict) -> list[dict]:
    """(name, query lengths, key lengths, window, max_seqlen_k the plan would report, heads)."""
    gen = torch.Generator().manual_seed(1)
    one_query_keys = torch.randint(1, 300, (48,), generator=gen).tolist()
    h = (sizes["heads"], sizes["kv_heads"])
    return [
        dict(name="causal, Lq == Lk", lqs=[128, 77], lks=[128, 77], window=(-1, 0), heads=h),
        dict(name="causal, Lq < Lk", lqs=[64, 10], lks=[200, 33], window=(-1, 0), heads=h),
        dict(name="full, Lq > Lk", lqs=[200, 31], lks=[64, 7], window=(-1, -1), heads=h),
        dict(name="sliding window (31, 0)", lqs=[150, 90], lks=[150, 120], window=(31, 0), heads=h),
        dict(name="band (7, 5)", lqs=[100, 40], lks=[120, 40], window=(7, 5), heads=h),
        dict(name="clamp: Lq 4, Lk 2, window (-1, 2) [issue 11]", lqs=[4], lks=[2], window=(-1, 2), heads=h,
             clamp=True),
        dict(name="clamp: Lq 6, Lk 2, window (1, -1)", lqs=[6], lks=[2], window=(1, -1), heads=h, clamp=True),
        dict(name="GQA, one query per sequence, full", lqs=[1] * 48, lks=one_query_keys, window=(-1, -1), heads=h),
        dict(name="GQA, one query per sequence, causal", lqs=[1] * 48, lks=one_query_keys, window=(-1, 0), heads=h),
        dict(name="MQA, one query per sequence", lqs=[1] * 48, lks=one_query_keys, window=(-1, -1),
             heads=(sizes["heads"], 1)),
        # what the ring sends kernels with empty_sequences = True: the gaps of a call as sequences
        # without keys (lse +-inf, dq 0) or without queries (dk = dv = 0)
        dict(name="empty sequences, causal", lqs=[0, 70, 33, 0, 20, 1], lks=[40, 90, 0, 25, 20, 0], window=(-1, 0),
             heads=h, empty=True),
        dict(name="empty sequences, band (9, 3)", lqs=[50, 0, 64, 17], lks=[0, 30, 64, 40], window=(9, 3), heads=h,
             empty=True),
        dict(name="empty sequences, GQA, at most 1 query", lqs=[1, 0, 1, 1, 0], lks=one_query_keys[:3] + [0, 7],
             window=(-1, -1), heads=h, empty=True),
    ]


def check_backend_case(kernel, case: dict, device, dtype, head_dim: int, gen, max_seqlen_k=None) -> dict:
    lqs, lks, window = case["lqs"], case["lks"], case["window"]
    hq, hkv = case["heads"]
    make = lambda n, h: torch.randn(n, h, head_dim, generator=gen, device=device).to(dtype)
    q, k, v, dout = make(sum(lqs), hq), make(sum(lks), hkv), make(sum(lks), hkv), make(sum(lqs), hq)
    cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), dtype=torch.int32, device=device)
    max_q = max(max(lqs), 2) if case.get("empty") else max(lqs)  # as the plan reports it (plan.py)
    reported = max(max_q, max(lks))  # what the plan reports: max_seqlen_k >= max_seqlen_q
    call = Varlen(cu(lqs), cu(lks), max_q, reported if max_seqlen_k is None else max_seqlen_k, window)
    scale = resolve_scale(None, head_dim)
    out, lse = kernel.forward(q, k, v, call, scale)
    dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, call, scale)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = band_attention(qd, kd, vd, lqs, lks, window, scale)
    ref_grads = torch.autograd.grad(ref_out, (qd, kd, vd), dout.double())
    # rows without keys: lse +-inf, output not read (the merge ignores both); their dq must be 0
    keyless = ref_lse.isinf()
    rows = ~keyless.all(0)
    errors = {"out": rel_err(out[rows], ref_out[rows]), "lse": rel_err(lse[~keyless], ref_lse[~keyless])}
    errors.update({f"d{n}": rel_err(g, r) for n, g, r in zip("qkv", (dq, dk, dv), ref_grads)})
    ok = all(e <= (LSE_TOL if n == "lse" else TOL[dtype]) for n, e in errors.items()) and all(
        t.isfinite().all() for t in (out[rows], lse[~keyless], dq, dk, dv)) and bool(lse[keyless].isinf().all())
    return {"case": case["name"], "ok": bool(ok), "errors": errors, "max_seqlen_k": call.max_seqlen_k}


def section_backends(device, dtype, sizes, seed) -> dict:
    usable, reasons = candidate_backends(device, dtype, sizes["head_dim"])
    results = {}
    for name in usable:
        kernel = get_kernel(name, device, dtype, sizes["head_dim"])
        gen = torch.Generator(device).manual_seed(seed)
        rows = []
        for case in backend_cases(sizes):
            try:
                rows.append(check_backend_case(kernel, case, device, dtype, sizes["head_dim"], gen))
            except Exception as error:
                rows.append({"case": case["name"], "ok": False, "error": f"{type(error).__name__}: {error}"})
            if case.get("clamp"):  # information: the same call with the true max(Lk)
                try:
                    info = check_backend_case(kernel, case, device, dtype, sizes["head_dim"], gen,
                                              max_seqlen_k=max(case["lks"]))
                    rows.append({**info, "case": case["name"] + " with max_seqlen_k = max(Lk)", "informative": True})
                except Exception as error:
                    rows.append({"case": case["name"] + " with max_seqlen_k = max(Lk)", "informative": True,
                                 "ok": False, "error": f"{type(error).__name__}: {error}"})
        results[name] = rows
    return {"dtype": str(dtype), "usable": usable, "unavailable": reasons, "results": results}


# ------------------------------------------------------------------------------------ ring
def ring_cases(sizes: dict, gen: torch.Generator) -> list[dict]:
    cases = []
    for P in sizes["ring_world_sizes"]:
        # packed documents: two tiny ones and random lengths, all padded to the layout's multiple
        lengths = [1, 3] + torch.randint(1, sizes["ring_tokens"] // 3, (5,), generator=gen).tolist()
        for layout in LAYOUTS:
            for causal, window in [(True, w) for w in sizes["windows"]] + [(False, sizes["windows"][-1])]:
                cases.append(dict(world_size=P, layout=layout, causal=causal, window=window, lengths=lengths))
    return cases


def check_ring_case(case: dict, backend, device, dtype, sizes, gen) -> dict:
    P, layout = case["world_size"], case["layout"]
    hq, hkv, d = sizes["ring_heads"], sizes["ring_kv_heads"], sizes["ring_head_dim"]
    lengths = case["lengths"]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    padded = pad_for_layout(torch.zeros(sum(lengths)), cu, world_size=P, layout=layout)
    bounds, total = padded.cu_seqlens.tolist(), int(padded.cu_seqlens[-1])
    ring = InProcessRing(padded.cu_seqlens, world_size=P, layout=layout, causal=case["causal"],
                         window_size=case["window"], seqused=padded.seqused)
    make = lambda h: torch.randn(total, h, d, generator=gen, device=device).to(dtype)
    q, k, v, dout = make(hq), make(hkv), make(hkv), make(hq)
    shards = [[s.requires_grad_() for s in ring.shard(t)] for t in (q, k, v)]
    outs = ring.attention(*shards, backend=backend)
    torch.autograd.backward(outs, ring.shard(dout))
    mask = true_mask(bounds, case["causal"], case["window"], lengths, device)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = full_attention(qd, kd, vd, mask, d ** -0.5)
    ref.backward(dout.double())
    errors = {"out": rel_err(ring.unshard(outs), ref)}
    for name, parts, full in zip("qkv", shards, (qd, kd, vd)):
        errors[f"d{name}"] = rel_err(ring.unshard([p.grad for p in parts]), full.grad)
    ok = all(e <= TOL[dtype] for e in errors.values())
    label = f"{layout} P={P} {'causal' if case['causal'] else 'full'} window={case['window']}"
    if not takes_empty_sequences(backend):
        label += ", gathered"
    return {"case": label, "ok": bool(ok), "errors": errors, "tokens": total, "documents": len(lengths)}


def section_ring(device, dtype, sizes, seed) -> dict:
    usable, reasons = candidate_backends(device, dtype, sizes["ring_head_dim"])
    gen = torch.Generator().manual_seed(seed)
    cases = ring_cases(sizes, gen)
    results = {}
    for backend in usable:
        tgen = torch.Generator(device).manual_seed(seed)
        rows = []
        kernel = get_kernel(backend, device, dtype, sizes["ring_head_dim"])
        for case in cases:
            # both forms of a call (plan.py, RingPlan.device_calls): ranges with empty sequences, gathered rows
            for form in (kernel, gathering(kernel)):
                try:
                    rows.append(check_ring_case(case, form, device, dtype, sizes, tgen))
                except Exception as error:
                    rows.append({"case": f"{case['layout']} P={case['world_size']}", "ok": False,
                                 "error": f"{type(error).__name__}: {error}"})
        results[backend] = rows
    return {"dtype": str(dtype), "usable": usable, "unavailable": reasons, "results": results}


# ----------------------------------------------------------------------------------- syncs
def count_syncs(fn) -> tuple[int, list[str]]:
    """Host synchronisations flagged by ``torch.cuda.set_sync_debug_mode`` while ``fn`` runs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return len(syncs), [f"{os.path.basename(w.filename)}:{w.lineno}: {str(w.message)[:120]}" for w in syncs[:10]]


def section_syncs(device, dtype, sizes, seed) -> dict:
    if device.type != "cuda":
        return {"skipped": "torch.cuda.set_sync_debug_mode needs CUDA"}
    kernel = get_kernel(None, device, dtype, sizes["ring_head_dim"])
    P, hq, hkv, d = 4, sizes["ring_heads"], sizes["ring_kv_heads"], sizes["ring_head_dim"]
    lengths = [1, 3, 700, 1300, 2000, 93]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    padded = pad_for_layout(torch.zeros(sum(lengths)), cu, world_size=P)
    ring = InProcessRing(padded.cu_seqlens, world_size=P, seqused=padded.seqused, window_size=500)
    gen = torch.Generator(device).manual_seed(seed)
    local = int(padded.cu_seqlens[-1]) // P
    make = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(dtype)
    qs, douts = [make(local, hq, d) for _ in range(P)], [make(local, hq, d) for _ in range(P)]
    kvs = [make(2, local, hkv, d) for _ in range(P)]
    dkvs = [torch.zeros(2, local, hkv, d, device=device) for _ in range(P)]
    scale = resolve_scale(None, d)
    rank = 1
    results = {}

    def forward():
        results["out"] = ring.forward_rank(rank, qs, kvs, kernel, scale)

    def backward():
        out, lse = results["out"]
        ring.backward_rank(rank, douts, qs, kvs, [out] * P, [lse] * P, dkvs, kernel, scale)

    for plan in ring.plans:
        plan.upload(device)
    forward(), backward()  # warm: plans on the device, kernels compiled, allocator warm
    synchronize(device)
    n_fwd, where_fwd = count_syncs(forward)
    n_bwd, where_bwd = count_syncs(backward)
    synchronize(device)
    # the whole autograd path too (argument checks, kernel choice, stacking K/V)
    shards = [[t.detach().clone().requires_grad_() for t in ts] for ts in (qs, [kv[0] for kv in kvs], [kv[1] for kv in kvs])]
    ring.attention(*shards, backend=kernel)
    synchronize(device)

    def autograd_path():
        outs = ring.attention(*shards, backend=kernel)
        torch.autograd.backward(outs, douts)

    n_all, where_all = count_syncs(autograd_path)
    synchronize(device)
    return {"backend": kernel.name, "ring_forward": n_fwd, "ring_backward": n_bwd, "ring_autograd_fwd_bwd": n_all,
            "where": where_fwd + where_bwd + where_all, "target": 0,
            "what": f"rank {rank} of an in-process ring, P={P}, {len(lengths)} padded documents, window 500"}


# ------------------------------------------------------------------------------------ plan
def section_plan(device, dtype, sizes, seed) -> dict:
    import plan as plan_benchmark

    argv = ["--world-sizes", "8", "--docs", "512", "--windows", "none", "--repeats", "3", "--device", str(device)]
    if device.type != "cuda":
        argv = ["--world-sizes", "2", "--docs", "8", "--tokens", "256", "--windows", "none", "--repeats", "1",
                "--device", "cpu"]
    payload = plan_benchmark.main(argv)
    row = payload["results"][0]
    return {"world_size": row["world_size"], "docs": row["docs"], "plan_ms_max": row["plan_ms_max"],
            "plan_ms_mean": row["plan_ms_mean"], "upload_ms": row.get("upload_ms"), "target_ms": payload["target_ms"]}


# ------------------------------------------------------------------------ kernel efficiency
def section_kernel_efficiency(device, dtype, sizes, seed, out_dir) -> dict:
    import kernel_efficiency

    path = os.path.join(out_dir, "kernel_efficiency.json")
    if device.type == "cuda":
        argv = ["--device", "cuda", "--world-sizes", "8", "--tokens-per-rank", "8K", "--layouts", "zigzag,contiguous",
                "--dtype", "bfloat16", "--heads", "32", "--kv-heads", "8", "--head-dim", "128", "--repeats", "3",
                "--warmup", "1", "--forms", "ranges,gathered"]
        window = "4096"
    else:
        argv = ["--device", "cpu", "--world-sizes", "2", "--tokens-per-rank", "64", "--layouts", "zigzag,contiguous",
                "--repeats", "1", "--warmup", "0", "--forms", "ranges,gathered"]
        window = "16"
    payload = kernel_efficiency.main(argv + ["--out", path])
    # packed documents under a sliding window too: the far steps' calls are short pieces between
    # long gaps, where the two forms of a call differ most
    windowed = kernel_efficiency.main(argv + ["--packed", "--window", window,
                                              "--out", os.path.join(out_dir, "kernel_efficiency_window.json")])
    keys = ("layout", "packed", "form", "window", "world_size", "tokens_per_rank", "efficiency_fwd",
            "efficiency_fwd_bwd", "balance_fwd", "balance_fwd_bwd", "kernel_calls", "fwd_bwd_peak_mib")
    rows = [{k: r[k] for k in keys} for r in payload["results"] + windowed["results"]]
    refs = [{k: r[k] for k in ("packed", "total_tokens", "num_docs", "tflops_fwd", "tflops_fwd_bwd")}
            for r in payload["reference"]]
    return {"backend": payload["machine"]["backend"], "rows": rows, "reference": refs, "json": path,
            "targets": {"zigzag_one_fwd_bwd": 0.95, "packed_fwd_bwd": 0.90, "balance": 1.02}}


# --------------------------------------------------------------------------------- summary
def _worst(rows: list[dict]) -> str:
    scored = [(max(r["errors"].values()), r) for r in rows if "errors" in r and not r.get("informative")]
    if not scored:
        return "-"
    err, row = max(scored, key=lambda x: x[0])
    name = max(row["errors"], key=row["errors"].get)
    return f"worst {err:.1e} ({row['case']}, {name})"


def summary(report: dict) -> str:
    m = report["machine"]
    lines = [f"gpu_check: {m['device_name']} ({m['device']}), torch {m['torch']}, CUDA {m['cuda']}, {m['date']}, "
             f"{report['seconds']:.0f} s"]
    for name in ("backends", "ring"):
        sec = report.get(name)
        if sec is None:
            continue
        if sec["status"] != "ok":
            lines.append(f"{name:<9} ERROR {sec['error']}")
            continue
        for backend, rows in sec["results"].items():
            checked = [r for r in rows if not r.get("informative")]
            bad = [r["case"] for r in checked if not r["ok"]]
            status = "ok" if not bad else f"FAIL {len(bad)}: {', '.join(bad[:3])}"
            lines.append(f"{name:<9} {backend:<13} {len(checked) - len(bad)}/{len(checked)} {status}; {_worst(rows)}")
            for r in rows:
                if r.get("informative"):
                    err = max(r["errors"].values()) if "errors" in r else float("nan")
                    lines.append(f"{'':<9} {'':<13} info: {r['case']}: worst {err:.1e} "
                                 f"({'exact' if r['ok'] else 'wrong, as expected of flash-attn 2 clamping'})")
        if sec["unavailable"]:
            lines.append(f"{'':<9} unavailable: " + "; ".join(f"{k}: {v[:70]}" for k, v in sec["unavailable"].items()))
    sec = report.get("syncs")
    if sec is not None:
        if sec["status"] != "ok":
            lines.append(f"syncs     ERROR {sec['error']}")
        elif "skipped" in sec:
            lines.append(f"syncs     skipped: {sec['skipped']}")
        else:
            lines.append(f"syncs     {sec['backend']}: ring forward {sec['ring_forward']}, backward {sec['ring_backward']}, "
                         f"autograd fwd+bwd {sec['ring_autograd_fwd_bwd']} (target 0)")
            lines += [f"{'':<9} {w}" for w in sec["where"][:3]]
    sec = report.get("plan")
    if sec is not None:
        lines.append(f"plan      ERROR {sec['error']}" if sec["status"] != "ok" else
                     f"plan      P={sec['world_size']}, {sec['docs']} documents: {sec['plan_ms_max']:.1f} ms on the "
                     f"slowest rank (target {sec['target_ms']:.0f}), upload {sec['upload_ms']:.2f} ms")
    sec = report.get("kernel_efficiency")
    if sec is not None:
        if sec["status"] != "ok":
            lines.append(f"kernel_efficiency ERROR {sec['error']}")
        else:
            lines.append(f"kernel_efficiency ({sec['backend']}; targets: zigzag fwd+bwd >= 0.95, packed >= 0.90, "
                         f"balance <= 1.02)")
            for r in sec["rows"]:
                window = "" if r["window"] is None else f" window {r['window']}"
                peak = "" if r["fwd_bwd_peak_mib"] is None else f", peak {r['fwd_bwd_peak_mib']:.0f} MiB"
                lines.append(f"  {r['layout']:>10} {'packed' if r['packed'] else 'one seq':>7}{window} {r['form']:>8} "
                             f"P={r['world_size']} "
                             f"{r['tokens_per_rank']}/rank: eff fwd {r['efficiency_fwd']:.3f} fwd+bwd "
                             f"{r['efficiency_fwd_bwd']:.3f}, balance fwd+bwd {r['balance_fwd_bwd']:.3f}{peak}")
            for r in sec["reference"]:
                lines.append(f"  reference {'packed' if r['packed'] else 'one seq'} {r['total_tokens']} tokens: "
                             f"{r['tflops_fwd']:.0f} TFLOP/s fwd, {r['tflops_fwd_bwd']:.0f} fwd+bwd")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is available (torch.cuda.is_available() is False). Run it on a "
                         "machine with an NVIDIA GPU, or pass --device cpu for a tiny smoke run of the same code.")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    known = ("backends", "ring", "syncs", "plan", "kernel_efficiency")
    unknown = [s for s in sections if s not in known]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {list(known)}")
    os.makedirs(args.out, exist_ok=True)
    sizes = GPU if device.type == "cuda" else CPU
    dtype = torch.bfloat16
    start = time.perf_counter()
    report = {"benchmark": "gpu_check", "machine": machine_info(device, None), "settings": vars(args)}
    for name in sections:
        if name == "kernel_efficiency":
            run_section(name, section_kernel_efficiency, report, device, dtype, sizes, args.seed, args.out)
        else:
            fn = {"backends": section_backends, "ring": section_ring, "syncs": section_syncs, "plan": section_plan}[name]
            run_section(name, fn, report, device, dtype, sizes, args.seed)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:  # partial results survive a crash
            json.dump(report, f, indent=2, default=str)
    report["seconds"] = time.perf_counter() - start
    text = summary(report)
    report["summary"] = text
    write_json(os.path.join(args.out, "gpu_check.json"), report)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print("\n" + text, flush=True)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
