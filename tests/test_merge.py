"""The log-sum-exp merge: PyTorch and Triton implementations against float64, on rows given as a
range or as an index, with rows that have seen nothing (lse -inf) on either side, and block rows
without keys as flash-attn 2 returns them (lse +inf, output not to be read).

The Triton kernel runs on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set in a
subprocess because Triton reads it when the kernel is defined); triton is in the test extra."""

import math
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from hf_ring_attention import merge
from hf_ring_attention.merge import merge_
from hf_ring_attention.plan import Rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEG_INF = float("-inf")


def random_case(seed: int, heads: int = 3, head_dim: int = 24, total: int = 70, n: int = 37, index: bool = True,
                block_dtype=torch.bfloat16):
    """Running (out, lse) over ``total`` rows and a block for ``n`` of them, with -inf rows."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(total, heads, head_dim, generator=gen)
    lse = torch.randn(heads, total, generator=gen) * 3
    fresh = torch.rand(heads, total, generator=gen) < 0.25  # rows that have seen no key yet
    lse[fresh] = NEG_INF
    out.masked_fill_(fresh.T[..., None], 0.0)
    if index:
        rows = Rows(0, total, torch.randperm(total, generator=gen)[:n].sort().values.to(torch.int32))
        rows = Rows(int(rows.index.min()), int(rows.index.max()) + 1, rows.index)
    else:
        rows = Rows(11, 11 + n)
    block_out = torch.randn(n, heads, head_dim, generator=gen).to(block_dtype)
    block_lse = torch.randn(heads, n, generator=gen) * 3
    block_lse[torch.rand(heads, n, generator=gen) < 0.25] = NEG_INF  # rows that see nothing here
    # rows of an empty sequence: flash-attn 2 writes lse +inf there; their output must not be read
    keyless = torch.rand(heads, n, generator=gen) < 0.15
    block_lse[keyless] = float("inf")
    block_out.masked_fill_(keyless.T[..., None], float("nan"))
    return out, lse, rows, block_out, block_lse


def merge_float64(out, lse, rows, block_out, block_lse):
    """log(exp(a) + exp(b)) and the exp-weighted outputs, in float64, row by row."""
    out, lse = out.double().clone(), lse.double().clone()
    index = range(rows.start, rows.stop) if rows.index is None else rows.index.tolist()
    for i, r in enumerate(index):
        for h in range(out.shape[1]):
            a, b = lse[h, r].item(), block_lse[h, i].item()
            b = NEG_INF if b == float("inf") else b  # a row without keys
            if b == NEG_INF:
                continue
            m = max(a, b)
            wa, wb = math.exp(a - m), math.exp(b - m)
            out[r, h] = (wa * out[r, h] + wb * block_out[i, h].double()) / (wa + wb)
            lse[h, r] = m + math.log(wa + wb)
    return out, lse


def check_against_float64(use_triton: bool):
    for seed, index, block_dtype in [(0, True, torch.bfloat16), (1, False, torch.float32), (2, True, torch.float32)]:
        out, lse, rows, block_out, block_lse = random_case(seed, index=index, block_dtype=block_dtype)
        want_out, want_lse = merge_float64(out, lse, rows, block_out, block_lse)
        merge_(out, lse, rows, block_out, block_lse, use_triton=use_triton)
        assert not out.isnan().any() and not lse.isnan().any()
        assert torch.equal(lse == NEG_INF, want_lse == NEG_INF)
        # float32 arithmetic on O(1) values: a few ulps
        torch.testing.assert_close(out.double(), want_out, rtol=1e-6, atol=1e-6)
        finite = want_lse != NEG_INF
        torch.testing.assert_close(lse.double()[finite], want_lse[finite], rtol=1e-6, atol=1e-6)


def test_torch_merge_matches_float64():
    check_against_float64(use_triton=False)


def test_triton_merge_matches_float64_under_the_interpreter():
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, "tests")
        try:
            import triton  # noqa: F401
        except ImportError:
            sys.exit("triton is not installed: it is in the test extra (pip install -e .[test])")
        import torch
        from hf_ring_attention.merge import self_test
        from test_merge import check_against_float64
        check_against_float64(use_triton=True)
        assert self_test(torch.device("cpu"))  # the check the ring runs before it starts
        assert self_test(torch.device("cpu"), 128, torch.bfloat16)  # at a model's head_dim and dtype
        print("triton merge ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "triton merge ok" in proc.stdout, proc.stdout + proc.stderr


def test_merge_handles_rows_that_saw_nothing():
    # rows 0: seen nothing yet + block sees nothing; 1: nothing yet + block; 2: both finite
    out = torch.zeros(3, 1, 2)
    lse = torch.tensor([[NEG_INF, NEG_INF, 0.5]])
    out[2] = 1.0
    block_out = torch.tensor([[[0.0, 0.0]], [[2.0, 3.0]], [[3.0, 3.0]]])
    block_lse = torch.tensor([[NEG_INF, 1.0, 0.5]])
    merge_(out, lse, Rows(0, 3), block_out, block_lse, use_triton=False)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[0], torch.zeros(1, 2)) and lse[0, 0] == NEG_INF
    assert torch.equal(out[1], block_out[1]) and lse[0, 1] == 1.0
    torch.testing.assert_close(out[2], torch.full((1, 2), 2.0))
    torch.testing.assert_close(lse[0, 2], torch.tensor(0.5 + math.log(2.0)))


def test_merge_uses_pytorch_off_cuda():
    assert merge.prepare(torch.device("cpu")) is False


def test_a_failing_triton_merge_warns_and_leaves_pytorch_in_charge(monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("PassManager::run failed")
            return launch

    fake_triton = types.SimpleNamespace(next_power_of_2=lambda n: 1 << (n - 1).bit_length(),
                                        cdiv=lambda a, b: -(-a // b))
    monkeypatch.setattr(merge, "_triton", lambda: (fake_triton, Broken()))
    with pytest.warns(RuntimeWarning, match="Triton merge does not work on cpu.*PassManager::run failed.*PyTorch"):
        assert merge.self_test(torch.device("cpu")) is False
