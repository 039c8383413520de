"""Chunked loss (hf_ring_attention.loss): the loss and every gradient equal transformers'
ForCausalLMLoss on the full logits, and the same through patch_model(chunked_loss=...) on 1, 2 and
4 ranks with packed documents and padding."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

import hf_ring_attention as hra
from hf_ring_attention.loss import chunked_causal_lm_loss, default_chunk_size
from helpers import rel_err, spawn
from models import batches, reference_kwargs, tiny_model

# float32 against float32 (chunk sums against one reduction): a few ulps; 1e-5 relative is far
# below any real error (a lost target or a wrong normalisation moves the loss by > 1e-2).
TOL = 1e-5
# against float64, the same inputs: float32 rounding of a 37-way softmax and sums over 26 tokens
TOL64 = 1e-6


def _inputs(dtype=torch.float32, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 13, 16, generator=gen, dtype=dtype)
    weight = torch.randn(37, 16, generator=gen, dtype=dtype) * 0.5
    b = torch.randn(37, generator=gen, dtype=dtype) if bias else None
    labels = torch.randint(0, 37, (2, 13), generator=gen)
    labels[0, 3:6] = -100
    labels[1, 0] = -100
    return hidden, weight, b, labels


def _standard(hidden, weight, bias, labels, **kwargs):
    """transformers' path: full logits from nn.Linear, then ForCausalLMLoss."""
    logits = F.linear(hidden, weight, bias)
    return ForCausalLMLoss(logits, labels, vocab_size=weight.shape[0], **kwargs)


def _reference64(hidden, weight, bias, labels, num_items_in_batch=None):
    """The causal-LM loss in float64 throughout (ForCausalLMLoss itself reduces in float32)."""
    logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    targets = F.pad(labels, (0, 1), value=-100)[..., 1:]
    total = F.cross_entropy(logits.reshape(-1, weight.shape[0]), targets.reshape(-1), reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())


def _grads(loss_fn, tensors):
    leaves = [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in tensors]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves if t is not None and t.is_floating_point()]


@pytest.mark.parametrize("chunk", [1, 5, 13, 26, 1000])
@pytest.mark.parametrize("num_items", [None, 17, "tensor"])
def test_loss_and_gradients_equal_the_full_logits_path(chunk, num_items):
    hidden, weight, bias, labels = _inputs()
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(17) if num_items == "tensor" else num_items}
    ref64, grads64 = _grads(lambda h, w, b, y: _reference64(h, w, b, y, **kwargs), [t.double() if t.is_floating_point() else t for t in (hidden, weight, bias, labels)])
    ref, grads = _grads(lambda h, w, b, y: _standard(h, w, b, y, **kwargs), [hidden, weight, bias, labels])
    got, got_grads = _grads(lambda h, w, b, y: chunked_causal_lm_loss(h, w, y, bias=b, chunk_size=chunk, **kwargs),
                            [hidden, weight, bias, labels])
    assert got.dtype == torch.float32 and got.shape == ()
    assert abs(got.item() - ref.item()) <= TOL * abs(ref.item())
    assert abs(got.item() - ref64.item()) <= TOL64 * abs(ref64.item())
    for name, g, r, r64 in zip(("hidden", "weight", "bias"), got_grads, grads, grads64):
        assert g.dtype == torch.float32
        assert rel_err(g, r) <= TOL, f"{name}: {rel_err(g, r):.2e}"
        assert rel_err(g, r64) <= TOL64, f"{name} vs float64: {rel_err(g, r64):.2e}"


def test_shift_labels_and_a_custom_ignore_index_follow_transformers():
    hidden, weight, _, labels = _inputs(bias=False)
    shifted = torch.randint(0, 37, (2, 13), generator=torch.Generator().manual_seed(1))
    shifted[0, :4] = -1
    shifted[1, -1] = -1
    ref = ForCausalLMLoss(F.linear(hidden, weight), labels, 37, shift_labels=shifted, ignore_index=-1)
    got = chunked_causal_lm_loss(hidden, weight, labels, shift_labels=shifted, ignore_index=-1, chunk_size=4)
    assert abs(got.item() - ref.item()) <= TOL * ref.item()


def test_no_targets_give_nan_as_a_mean_and_zero_with_num_items():
    hidden, weight, _, labels = _inputs(bias=False)
    labels = torch.full_like(labels, -100)
    assert torch.isnan(chunked_causal_lm_loss(hidden, weight, labels, chunk_size=4))
    assert torch.isnan(_standard(hidden, weight, None, labels))
    h = hidden.clone().requires_grad_()
    loss = chunked_causal_lm_loss(h, weight, labels, num_items_in_batch=3, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_gradients_scale_with_the_incoming_gradient_and_backward_twice_is_refused():
    hidden, weight, _, labels = _inputs(bias=False)
    h = hidden.clone().requires_grad_()
    (3.0 * chunked_causal_lm_loss(h, weight, labels, chunk_size=4)).backward()
    h_ref = hidden.clone().requires_grad_()
    (3.0 * _standard(h_ref, weight, None, labels)).backward()
    assert rel_err(h.grad, h_ref.grad) <= TOL
    loss = chunked_causal_lm_loss(hidden.clone().requires_grad_(), weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()


def test_no_grad_computes_only_the_loss():
    hidden, weight, _, labels = _inputs(bias=False)
    w = weight.clone().requires_grad_()
    with torch.no_grad():
        loss = chunked_causal_lm_loss(hidden, w, labels, chunk_size=4)
    assert not loss.requires_grad
    assert abs(loss.item() - _standard(hidden, weight, None, labels).item()) <= TOL * loss.item()


def test_autocast_runs_the_head_in_bfloat16_and_reduces_in_float32():
    hidden, weight, bias, labels = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, grads = _grads(lambda h, w, b, y: _standard(h, w, b, y), [hidden, weight, bias, labels])
        got, got_grads = _grads(lambda h, w, b, y: chunked_causal_lm_loss(h, w, y, bias=b, chunk_size=5),
                                [hidden, weight, bias, labels])
    # the same bfloat16 logits reduced in float32: the loss agrees to float32 rounding
    assert abs(got.item() - ref.item()) <= TOL * ref.item()
    for g, r, t in zip(got_grads, grads, (hidden, weight, bias)):
        assert g.dtype == t.dtype == torch.float32
        # bfloat16 gradients of the logits (8 bits): the standard path rounds its product once
        # over all tokens, the chunked one once per chunk
        assert rel_err(g, r) <= 2e-2


def test_bfloat16_weights_give_bfloat16_gradients_close_to_float64():
    hidden, weight, bias, labels = _inputs()
    got, got_grads = _grads(lambda h, w, b, y: chunked_causal_lm_loss(h, w, y, bias=b, chunk_size=5),
                            [t.bfloat16() if t.is_floating_point() else t for t in (hidden, weight, bias, labels)])
    ref, grads = _grads(lambda h, w, b, y: _reference64(h, w, b, y),
                        [t.bfloat16().double() if t.is_floating_point() else t for t in (hidden, weight, bias, labels)])
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) <= 2e-2 * ref.item()
    for g, r in zip(got_grads, grads):
        assert g.dtype == torch.bfloat16 and rel_err(g, r) <= 2e-2


def test_default_chunk_holds_about_32m_logits():
    assert default_chunk_size(32768) == 1024 and default_chunk_size(128256) == 261
    assert default_chunk_size(2**30) == 1


# ------------------------------------------------------------------------- patch_model
def _train_step(model, kwargs):
    model.zero_grad()
    out = model(**kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_patched_model_with_chunked_loss_equals_unpatched_at_world_size_one(kind):
    reference = tiny_model(kind).train()
    patched = hra.patch_model(copy.deepcopy(reference), chunked_loss=7).train()
    for name, batch in batches().items():
        ref, ref_grads = _train_step(reference, reference_kwargs(batch))
        for how, kwargs in (("shard_batch", hra.shard_batch(batch)), ("plain", reference_kwargs(batch))):
            out, grads = _train_step(patched, kwargs)
            assert out.logits is None, "training forwards with labels return no logits"
            assert abs(out.loss.item() - ref.loss.item()) <= TOL * ref.loss.item(), f"{kind} {name} {how}"
            for pname, g in grads.items():
                assert rel_err(g, ref_grads[pname]) <= TOL, f"{kind} {name} {how} {pname}: {rel_err(g, ref_grads[pname]):.2e}"


def test_evaluation_and_label_free_forwards_still_return_logits():
    reference = tiny_model("llama")
    patched = hra.patch_model(copy.deepcopy(reference), chunked_loss=True)
    batch = batches()["right padding"]
    mask = batch["attention_mask"].bool()
    patched.train()
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert rel_err(patched(**no_labels).logits[mask], reference(**no_labels).logits[mask]) <= TOL
    patched.eval()
    reference.eval()
    out, ref = patched(**batch), reference(**batch)
    assert rel_err(out.logits[mask], ref.logits[mask]) <= TOL and abs(out.loss.item() - ref.loss.item()) <= TOL * ref.loss.item()


def test_tied_embeddings_and_head_bias_get_exact_gradients():
    from transformers import LlamaConfig, LlamaForCausalLM

    from models import COMMON

    torch.manual_seed(0)
    reference = LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True)).train()
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    reference.lm_head.bias = torch.nn.Parameter(torch.randn(COMMON["vocab_size"]))
    patched = hra.patch_model(copy.deepcopy(reference), chunked_loss=5).train()
    assert patched.lm_head.weight is patched.model.embed_tokens.weight
    batch = batches()["packed"]
    ref, ref_grads = _train_step(reference, reference_kwargs(batch))
    out, grads = _train_step(patched, hra.shard_batch(batch))
    assert abs(out.loss.item() - ref.loss.item()) <= TOL * ref.loss.item()
    assert "lm_head.bias" in grads
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= TOL, name


def test_return_dict_false_unpatch_and_deepcopy():
    model = hra.patch_model(tiny_model("llama"), chunked_loss=True).train()
    batch = batches()["one sequence"]
    tup = model(**batch, return_dict=False)
    assert isinstance(tup, tuple) and tup[0].shape == ()
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone and clone(**batch).logits is None
    hra.unpatch_model(model)
    assert "forward" not in vars(model) and model(**batch).logits is not None


def test_unpatching_a_forward_wrapped_since_restores_the_standard_loss():
    import types

    model = hra.patch_model(tiny_model("llama"), chunked_loss=True).train()
    inner = model.forward
    model.forward = types.MethodType(lambda self, *a, **k: inner(*a, **k), model)  # e.g. accelerate's autocast
    batch = batches()["one sequence"]
    assert model(**batch).logits is None
    hra.unpatch_model(model)
    assert model(**batch).logits is not None


def test_heads_and_losses_the_chunked_loss_cannot_reproduce_are_refused():
    model = tiny_model("llama")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping=30.0"):
        hra.patch_model(model, chunked_loss=True)
    model = tiny_model("llama")

    class Quantized(torch.nn.Linear):
        pass

    model.lm_head = Quantized(32, 96, bias=False)
    with pytest.raises(NotImplementedError, match="plain torch.nn.Linear; this one is Quantized"):
        hra.patch_model(model, chunked_loss=True)
    model = tiny_model("llama")
    model.lm_head.register_forward_hook(lambda *args: None)
    with pytest.raises(NotImplementedError, match="forward hooks"):
        hra.patch_model(model, chunked_loss=True)
    with pytest.raises(NotImplementedError, match="language-model head, got LlamaModel"):
        hra.patch_model(tiny_model("llama").model, chunked_loss=True)
    with pytest.raises(ValueError, match="chunk_size=0 must be a positive"):
        hra.patch_model(tiny_model("llama"), chunked_loss=0)
    model = tiny_model("llama")
    model.forward = model.forward
    with pytest.raises(NotImplementedError, match="forward was already replaced"):
        hra.patch_model(model, chunked_loss=True)
    assert not hra.is_patched(model), "a refusal leaves the model untouched"
    model = hra.patch_model(tiny_model("llama"), chunked_loss=True).train()
    model.lm_head.register_forward_hook(lambda *args: None)  # e.g. an adapter added after patching
    with pytest.raises(NotImplementedError, match="Linear with forward hooks"):
        model(**batches()["one sequence"])
    model = hra.patch_model(tiny_model("llama"), chunked_loss=True).train()
    model.loss_function = lambda *args, **kwargs: 0
    with pytest.raises(NotImplementedError, match="not transformers' ForCausalLMLoss"):
        model(**batches()["one sequence"])


# ------------------------------------------------------------------ several processes
def _parity(rank, world_size):
    import torch.distributed as dist

    for kind in ("llama", "qwen2"):
        reference = tiny_model(kind).train()
        patched = hra.patch_model(copy.deepcopy(reference), chunked_loss=3, tiled_mlp=4).train()
        for name, batch in batches().items():
            ref, ref_grads = _train_step(reference, reference_kwargs(batch))
            out, grads = _train_step(patched, hra.shard_batch(batch))
            assert out.logits is None
            loss = out.loss.detach().clone()
            dist.all_reduce(loss)
            what = f"{kind} {name} P={world_size} rank {rank}"
            assert abs(loss.item() - ref.loss.item()) <= TOL * ref.loss.item(), f"loss {what}"
            for pname, g in grads.items():
                dist.all_reduce(g)
                assert rel_err(g, ref_grads[pname]) <= TOL, f"grad {pname} {what}: {rel_err(g, ref_grads[pname]):.2e}"


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_chunked_loss_and_tiled_mlp_on_several_ranks_equal_one_device(world_size):
    spawn(_parity, world_size)
