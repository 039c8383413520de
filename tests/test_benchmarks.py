"""Smoke tests of benchmarks/: every script runs in its tiniest configuration as a subprocess,
exits 0, and writes JSON with the expected keys and sane values. Timings are never asserted
beyond being positive: CI machines are shared and noisy."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def run_script(name: str, out, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, os.path.join(BENCHMARKS, name), "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    assert "machine:" in proc.stdout and "torch" in proc.stdout, proc.stdout
    with open(out) as f:
        payload = json.load(f)
    machine = payload["machine"]
    assert machine["torch"] and machine["backend"] and machine["device_name"]
    return payload


def test_kernel_efficiency_cpu_smoke_reports_efficiency_and_balance(tmp_path):
    payload = run_script("kernel_efficiency.py", tmp_path / "k.json", "--device", "cpu",
                         "--world-sizes", "2", "--tokens-per-rank", "64", "--layouts", "zigzag,contiguous",
                         "--repeats", "1", "--warmup", "0", "--forms", "ranges,gathered")
    rows = payload["results"]
    # one sequence reads ranges in either form: timed once; packed documents in both forms
    assert {(r["layout"], r["packed"], r["form"]) for r in rows} == {
        (l, p, f) for l in ("zigzag", "contiguous") for p in (False, True) for f in ("ranges", "gathered")
        if p or f == "ranges"
    }
    for r in rows:
        assert r["world_size"] == 2 and r["tokens_per_rank"] == 64 and r["total_tokens"] == 128
        assert r["window"] is None and r["fwd_bwd_peak_mib"] is None  # peak memory: CUDA only
        assert len(r["fwd_s"]) == len(r["fwd_bwd_s"]) == 2
        assert all(t > 0 for t in r["fwd_s"] + r["fwd_bwd_s"])
        for key in ("efficiency_fwd", "efficiency_fwd_bwd"):
            assert r[key] > 0
        for key in ("balance_fwd", "balance_fwd_bwd"):
            assert r[key] >= 1.0
    refs = payload["reference"]
    assert {r["packed"] for r in refs} == {False, True}
    assert all(r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 for r in refs)
    assert next(r for r in refs if r["packed"])["num_docs"] > 1


def test_kernel_efficiency_rejects_sizes_a_layout_cannot_split(tmp_path):
    cmd = [sys.executable, os.path.join(BENCHMARKS, "kernel_efficiency.py"), "--device", "cpu",
           "--world-sizes", "4", "--tokens-per-rank", "5"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "must be a multiple of" in proc.stderr


@pytest.mark.distributed
def test_cpu_ring_smoke_reports_overlap_and_balance(tmp_path):
    payload = run_script("cpu_ring.py", tmp_path / "r.json", "--tokens", "64", "--heads", "2",
                         "--kv-heads", "1", "--head-dim", "8", "--layouts", "zigzag,contiguous",
                         "--repeats", "1", "--warmup", "0", "--exchange-repeats", "1")
    transfer = payload["transfer"]
    assert transfer["step_s"] > 0 and transfer["bytes"] == 2 * 32 * 1 * 8 * 4
    rows = {r["layout"]: r for r in payload["results"]}
    assert set(rows) == {"zigzag", "contiguous"}
    for r in rows.values():
        for phase in ("fwd", "fwd_bwd"):
            assert len(r[f"compute_{phase}_samples_s"]) == len(r[f"ring_{phase}_samples_s"]) == 2
            assert r[f"compute_{phase}_ms"] > 0 and r[f"ring_{phase}_ms"] > 0
            assert r[f"balance_{phase}"] >= 1.0
            assert r[f"hidden_{phase}"] is None or 0.0 <= r[f"hidden_{phase}"] <= 1.0
            assert r[f"noise_{phase}_ms"] >= 0
        assert (r["transfers_fwd"], r["transfers_fwd_bwd"]) == (1, 4)


@pytest.mark.distributed
def test_memory_smoke_reports_peak_per_rank_and_budget(tmp_path):
    payload = run_script("memory.py", tmp_path / "m.json", "--device", "cpu", "--world-sizes", "1,2",
                         "--seq-lens", "128", "--budget-gib", "1")
    rows = payload["results"]
    assert [(r["world_size"], r["seq_len"]) for r in rows] == [(1, 128), (2, 128)]
    for r in rows:
        assert r["inputs_mib"] > 0 and r["peak_mib"] >= 0
        assert len(r["peak_mib_per_rank"]) == r["world_size"]
        assert r["total_mib"] == pytest.approx(r["inputs_mib"] + r["peak_mib"])
    # q, k, v and dout of a rank: (8 + 2 + 2 + 8) heads x 32 dims x 4 bytes per token
    assert rows[1]["inputs_mib"] == pytest.approx(64 * 20 * 32 * 4 / 2**20)
    fits = {f["world_size"]: f for f in payload["fits"]}
    assert fits[1]["longest_measured_fitting"] == fits[2]["longest_measured_fitting"] == 128


@pytest.mark.distributed
def test_memory_model_mode_measures_a_patched_llama_training_step(tmp_path):
    payload = run_script("memory.py", tmp_path / "mm.json", "--model", "--world-sizes", "1,2", "--seq-lens", "64",
                         "--layers", "1", "--hidden-size", "64", "--heads", "4", "--kv-heads", "2",
                         "--intermediate-size", "128", "--vocab-size", "128", "--budget-gib", "1")
    assert payload["mode"] == "model"
    rows = payload["results"]
    assert [(r["world_size"], r["seq_len"]) for r in rows] == [(1, 64), (2, 64)]
    # inputs are the weights: the same on every rank and for every P
    assert rows[0]["inputs_mib"] == rows[1]["inputs_mib"] > 0
    assert all(r["peak_mib"] >= 0 and len(r["peak_mib_per_rank"]) == r["world_size"] for r in rows)


def test_plan_smoke_reports_planning_time_per_rank(tmp_path):
    payload = run_script("plan.py", tmp_path / "p.json", "--world-sizes", "2,4", "--docs", "1,16",
                         "--tokens", "512", "--layouts", "zigzag,striped", "--windows", "none,8",
                         "--repeats", "1", "--device", "cpu")
    rows = payload["results"]
    assert [(r["layout"], r["window"], r["world_size"], r["docs"]) for r in rows] == [
        (l, w, p, d) for l in ("zigzag", "striped") for w in (None, 8) for p in (2, 4) for d in (1, 16)
    ]
    for r in rows:
        assert len(r["plan_ms_per_rank"]) == r["world_size"]
        assert r["plan_ms_max"] == max(r["plan_ms_per_rank"]) > 0
        assert r["plan_cpu_ms_max"] == max(r["plan_cpu_ms_per_rank"]) >= 0
        assert 1 <= r["num_steps"] <= r["world_size"] and r["calls_per_step_max"] >= 1
        # every document is padded to the layout's multiple: 2P for zigzag, P for striped
        multiple = 2 * r["world_size"] if r["layout"] == "zigzag" else r["world_size"]
        assert r["padded_tokens"] % multiple == 0 and 512 <= r["padded_tokens"] < 512 + r["docs"] * multiple
        assert r["upload_ms"] > 0
        without = r["q_rows_gathered_without_empty_sequences"], r["k_rows_gathered_without_empty_sequences"]
        assert all(0 <= share <= 1 for share in without)
        # with the gaps as empty sequences only the few calls with a gap longer than a row block,
        # or key ranges out of query order, gather
        assert r["q_rows_gathered"] <= without[0] and r["k_rows_gathered"] <= without[1]
        assert r["q_rows_gathered"] < 0.1 and r["k_rows_gathered"] < 0.1
        assert r["sequences_ratio"] >= 1
        if r["docs"] == 1 and r["window"] is None:  # one document: every call takes ranges either way
            assert without == (0, 0) and r["sequences_ratio"] == 1
    # packed, padded documents break the ranges: without empty sequences they are gathered
    packed = [r for r in rows if r["layout"] == "striped" and r["docs"] == 16]
    assert all(r["q_rows_gathered_without_empty_sequences"] > 0 and r["sequences_ratio"] > 1 for r in packed)
    assert payload["target_ms"] == 50.0


def test_gpu_check_cpu_smoke_runs_every_section(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, os.path.join(BENCHMARKS, "gpu_check.py"), "--device", "cpu", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "gpu_check.json") as f:
        report = json.load(f)
    assert {s: report[s]["status"] for s in ("backends", "ring", "syncs", "plan", "kernel_efficiency")} == dict.fromkeys(
        ("backends", "ring", "syncs", "plan", "kernel_efficiency"), "ok")
    for section in ("backends", "ring"):
        assert report[section]["usable"] == ["cpu"]
        assert set(report[section]["unavailable"]) == {"flash_attn_4", "flash_attn", "torch_flash"}
        rows = report[section]["results"]["cpu"]
        assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    cases = [r["case"] for r in report["backends"]["results"]["cpu"]]
    assert any("issue 11" in c for c in cases) and any("one query per sequence" in c for c in cases)
    assert {r["case"].split()[0] for r in report["ring"]["results"]["cpu"]} == {"zigzag", "contiguous", "striped"}
    assert "skipped" in report["syncs"]
    assert report["plan"]["plan_ms_max"] > 0
    assert {(r["layout"], r["packed"], r["form"], r["window"]) for r in report["kernel_efficiency"]["rows"]} == {
        (l, p, f, w) for l in ("zigzag", "contiguous") for p in (False, True) for f in ("ranges", "gathered")
        for w in (None, 16) if (p or f == "ranges") and (p or w is None)}
    assert any("empty sequences" in c for c in cases)
    assert any(r["case"].endswith(", gathered") for r in report["ring"]["results"]["cpu"])
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.startswith("gpu_check:") and "kernel_efficiency" in summary and summary in proc.stdout
    assert len(summary.splitlines()) <= 40  # one screen


def test_gpu_check_without_cuda_fails_with_a_clear_message(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, os.path.join(BENCHMARKS, "gpu_check.py"), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no CUDA device is available" in proc.stderr and "--device cpu" in proc.stderr


def test_gpu_check_records_a_failing_section_and_goes_on():
    sys.path.insert(0, BENCHMARKS)
    try:
        import gpu_check
    finally:
        sys.path.remove(BENCHMARKS)

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    report = {}
    gpu_check.run_section("backends", broken, report)
    gpu_check.run_section("plan", lambda: {"plan_ms_max": 1.0}, report)
    assert report["backends"]["status"] == "error" and "illegal memory access" in report["backends"]["error"]
    assert "Traceback" in report["backends"]["traceback"]
    assert report["plan"]["status"] == "ok" and report["plan"]["plan_ms_max"] == 1.0
