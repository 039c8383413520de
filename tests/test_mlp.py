"""Tiled MLP (hf_ring_attention.mlp): outputs and gradients equal the untiled MLP's, alone and in
a patched model (with gradient checkpointing, frozen weights and autocast). Several ranks: see
tests/test_loss.py."""

import copy

import pytest
import torch

import hf_ring_attention as hra
from hf_ring_attention.mlp import _TiledMLP
from helpers import rel_err
from models import batches, enable_checkpointing, reference_kwargs, tiny_model

TOL = 1e-5  # float32 chunked products against one product: a few ulps
TOL64 = 1e-6  # against float64: float32 rounding through three 32 x 64 products


def _mlp_step(mlp, x, dout, tiled_chunk=None):
    mlp.zero_grad()
    x = x.clone().requires_grad_()
    params = [p for p in mlp.parameters() if p.requires_grad]
    out = _TiledMLP.apply(mlp, tiled_chunk, x, *params) if tiled_chunk else mlp(x)
    out.backward(dout)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in mlp.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk", [1, 4, 7, 26, 100])
def test_tiled_mlp_equals_the_mlp_and_float64(chunk):
    mlp = tiny_model("llama").model.layers[0].mlp
    gen = torch.Generator().manual_seed(0)
    x, dout = torch.randn(2, 13, 32, generator=gen), torch.randn(2, 13, 32, generator=gen)
    ref = _mlp_step(mlp, x, dout)
    ref64 = _mlp_step(copy.deepcopy(mlp).double(), x.double(), dout.double())
    got = _mlp_step(mlp, x, dout, chunk)
    for what, g, r, r64 in (("out", got[0], ref[0], ref64[0]), ("dx", got[1], ref[1], ref64[1]),
                            *((n, got[2][n], ref[2][n], ref64[2][n]) for n in ref[2])):
        assert g.dtype == torch.float32 and g.shape == r.shape
        assert rel_err(g, r) <= TOL, f"{what}: {rel_err(g, r):.2e}"
        assert rel_err(g, r64) <= TOL64, f"{what} vs float64: {rel_err(g, r64):.2e}"


def test_frozen_weights_get_no_gradient_and_autocast_is_replayed_in_the_backward():
    mlp = tiny_model("llama").model.layers[0].mlp
    mlp.up_proj.weight.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    x, dout = torch.randn(3, 9, 32, generator=gen), torch.randn(3, 9, 32, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _mlp_step(mlp, x, dout)
        got = _mlp_step(mlp, x, dout, 5)
    assert set(got[2]) == {"gate_proj.weight", "down_proj.weight"} and mlp.up_proj.weight.grad is None
    assert got[0].dtype == torch.bfloat16
    # the same bfloat16 products chunk by chunk: equal up to the summation order of the weight
    # gradients (accumulated in float32 over chunks, as one product accumulates internally)
    assert torch.equal(got[0], ref[0]) and rel_err(got[1], ref[1]) <= TOL
    for name, g in got[2].items():
        assert g.dtype == torch.float32 and rel_err(g, ref[2][name]) <= 1e-2, name


@pytest.mark.parametrize("checkpointing", [False, True])
def test_patched_model_with_tiled_mlp_equals_unpatched(checkpointing):
    reference = tiny_model("qwen3").train()
    patched = hra.patch_model(copy.deepcopy(reference), tiled_mlp=6).train()
    if checkpointing:
        enable_checkpointing(patched)
    for name, batch in batches().items():
        reference.zero_grad()
        patched.zero_grad()
        ref = reference(**reference_kwargs(batch))
        ref.loss.backward()
        out = patched(**hra.shard_batch(batch))
        out.loss.backward()
        assert abs(out.loss.item() - ref.loss.item()) <= TOL * ref.loss.item(), name
        for (pname, p), q in zip(reference.named_parameters(), patched.parameters()):
            assert rel_err(q.grad, p.grad) <= TOL, f"{name} {pname}: {rel_err(q.grad, p.grad):.2e}"


def test_tiled_mlp_keeps_only_its_input_for_the_backward():
    mlp = tiny_model("llama").model.layers[0].mlp
    x = torch.randn(1, 40, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        params = [p for p in mlp.parameters()]
        _TiledMLP.apply(mlp, 8, x, *params)
    assert len(saved) == 1 and saved[0] is x
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mlp(x)
    intermediate = {t.data_ptr() for t in saved if t.numel() == 40 * 64}
    assert len(intermediate) == 4  # untiled: gate, up, activation, product


def test_unpatch_restores_the_mlps_and_refusals_name_the_reason():
    model = hra.patch_model(tiny_model("llama"), tiled_mlp=True)
    assert all("forward" in vars(layer.mlp) for layer in model.model.layers)
    assert hra.patch_model(model, tiled_mlp=False) is model
    assert not any("forward" in vars(layer.mlp) for layer in model.model.layers)
    hra.patch_model(model, tiled_mlp=3)
    hra.unpatch_model(model)
    assert not any("forward" in vars(layer.mlp) or hasattr(layer.mlp, "_hf_ring_attention_tile")
                   for layer in model.model.layers)
    with pytest.raises(ValueError, match="tiled_mlp=-2 must be True, False or a positive number"):
        hra.patch_model(tiny_model("llama"), tiled_mlp=-2)
    model = tiny_model("llama")
    model.model.layers[1].mlp.dropout = torch.nn.Dropout(0.1)
    with pytest.raises(NotImplementedError, match=r"dropout \(p=0.1\)"):
        hra.patch_model(model, tiled_mlp=True)
    assert not hra.is_patched(model)
