"""PEFT: patch_model before or after get_peft_model, unpatch_model on either object, and
merge_and_unload all work; is_patched tells the truth; a merged model carries no stale patch."""

import copy

import peft
import pytest
import torch

import hf_ring_attention as hra
from helpers import rel_err
from models import batches, reference_kwargs, tiny_model

TOL = 1e-5  # float32 against float32, as in test_transformers.py


def lora(model):
    # init_lora_weights=False: random B as well as A, so the adapters change the outputs
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(1)
    return peft.get_peft_model(model, config)


def assert_same_outputs(model, reference, what):
    """``model`` (patched) gives ``reference``'s (unpatched) logits and loss, with and without
    shard_batch, on every test batch."""
    for name, batch in batches().items():
        ref = reference(**reference_kwargs(batch))
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        plain = model(**reference_kwargs(batch))
        local = hra.shard_batch(batch)
        sharded = model(**local)
        for out, logits in ((plain, plain.logits), (sharded, local["ring_batch"].gather(sharded.logits))):
            assert rel_err(logits[mask], ref.logits[mask]) <= TOL, f"{what}: {name}"
            assert abs(out.loss.item() - ref.loss.item()) <= TOL * ref.loss.item(), f"{what}: {name}"


def assert_unpatched(model, previous="sdpa"):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert not hra.is_patched(model) and not hra.is_patched(inner)
    assert inner.config._attn_implementation == previous
    assert not any(hasattr(m, "_ring_attention") for m in inner.modules())
    assert not hasattr(inner, "_hf_ring_attention")


@pytest.mark.parametrize("unpatch", ["peft model", "base model"])
def test_patch_before_get_peft_model(unpatch):
    model = lora(hra.patch_model(tiny_model("llama")))
    reference = lora(tiny_model("llama"))
    assert hra.is_patched(model) and hra.is_patched(model.get_base_model())
    assert_same_outputs(model, reference, "patched, then get_peft_model")
    batch = batches()["right padding"]
    hra.unpatch_model(model if unpatch == "peft model" else model.get_base_model())
    assert_unpatched(model)
    assert torch.equal(model(**batch).logits, reference(**batch).logits)


@pytest.mark.parametrize("unpatch", ["peft model", "base model"])
def test_patch_after_get_peft_model_and_patch_again(unpatch):
    model = lora(tiny_model("llama"))
    reference = copy.deepcopy(model)
    assert hra.patch_model(model) is model
    assert hra.is_patched(model) and hra.is_patched(model.get_base_model())
    assert_same_outputs(model, reference, "get_peft_model, then patched")
    hra.unpatch_model(model if unpatch == "peft model" else model.get_base_model())
    assert_unpatched(model)
    batch = batches()["packed"]
    assert torch.equal(model(**reference_kwargs(batch)).logits, reference(**reference_kwargs(batch)).logits)
    hra.patch_model(model)  # a second patch after an unpatch patches for real
    assert hra.is_patched(model) and model.config._attn_implementation == "hf_ring_attention"
    assert_same_outputs(model, reference, "patched a second time")


def test_merge_and_unload_of_a_patched_model_is_patched_and_unpatches_cleanly():
    model = hra.patch_model(lora(tiny_model("mistral")))
    reference = copy.deepcopy(model)
    hra.unpatch_model(reference)
    merged, merged_reference = model.merge_and_unload(), reference.merge_and_unload()
    assert type(merged).__name__ == "MistralForCausalLM"
    assert hra.is_patched(merged) and merged.config._attn_implementation == "hf_ring_attention"
    assert_same_outputs(merged, merged_reference, "merged")
    hra.unpatch_model(merged)
    assert_unpatched(merged)
    batch = batches()["right padding"]
    assert torch.equal(merged(**batch).logits, merged_reference(**batch).logits)


def test_merge_and_unload_after_unpatch_leaves_no_patch():
    model = lora(tiny_model("llama"))
    hra.patch_model(model)
    hra.unpatch_model(model)
    merged = model.merge_and_unload()
    assert_unpatched(merged)
    assert not merged.model._forward_hooks and not merged.model._forward_pre_hooks


def test_is_patched_is_false_once_the_implementation_is_switched_away():
    model = hra.patch_model(lora(tiny_model("llama")))
    model.get_base_model().set_attn_implementation("eager")
    assert not hra.is_patched(model)
    hra.patch_model(model)
    assert hra.is_patched(model) and model.config._attn_implementation == "hf_ring_attention"
    hra.unpatch_model(model)  # restores the implementation in use when it was patched again
    assert not hra.is_patched(model) and model.config._attn_implementation == "eager"
