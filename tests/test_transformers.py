"""patch_model + shard_batch: the patched model on P ranks gives the unpatched model's logits,
loss and gradients on the whole batch on one process."""

import copy

import pytest
import torch
import torch.distributed as dist
from transformers import (
    GPT2Config, GPT2LMHeadModel, LlamaForSequenceClassification, LlamaForTokenClassification, LlamaModel,
)

import hf_ring_attention as hra
from helpers import rel_err, spawn
from models import COMMON, batches, enable_checkpointing, reference_kwargs, tiny_model

# float32 against float32: both sides round differently (block-wise softmax here, one softmax
# there), a few ulps amplified through two layers; 1e-5 relative is far below any real error.
TOL = 1e-5


def _compare(model_kind, layout, world_size, rank, training):
    reference = tiny_model(model_kind)
    patched = hra.patch_model(copy.deepcopy(reference), layout=layout)
    for m in (reference, patched):
        m.train(training)
    for name, batch in batches().items():
        what = f"{model_kind} {layout} P={world_size} rank {rank} {name} train={training}"
        ref = reference(**reference_kwargs(batch))
        local = hra.shard_batch(batch, layout=layout)
        with torch.set_grad_enabled(training):
            out = patched(**local)
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        logits = local["ring_batch"].gather(out.logits.detach())
        assert rel_err(logits[mask], ref.logits.detach()[mask]) <= TOL, f"logits {what}"
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        assert abs(loss.item() - ref.loss.item()) <= TOL * abs(ref.loss.item()), f"loss {what}: {loss.item()} vs {ref.loss.item()}"
        if not training:
            assert not out.loss.requires_grad
            continue
        ref.loss.backward()
        out.loss.backward()
        for (pname, p), q in zip(reference.named_parameters(), patched.parameters()):
            grad = q.grad.clone()
            dist.all_reduce(grad)
            assert rel_err(grad, p.grad) <= TOL, f"grad {pname} {what}: {rel_err(grad, p.grad):.2e}"
        reference.zero_grad()
        patched.zero_grad()


def _parity(rank, world_size, kinds, layouts):
    for kind in kinds:
        for layout in layouts:
            _compare(kind, layout, world_size, rank, training=True)
    _compare(kinds[0], layouts[0], world_size, rank, training=False)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_llama_mistral_qwen_match_unpatched_model(world_size):
    spawn(_parity, world_size, ["llama", "mistral", "qwen2", "qwen3"], ["zigzag"])


@pytest.mark.distributed
def test_every_layout_matches_unpatched_model():
    spawn(_parity, 2, ["mistral"], ["contiguous", "striped"])


# ----------------------------------------------------------------------- single process
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_world_size_one_patched_equals_unpatched_with_and_without_shard_batch(kind):
    reference = tiny_model(kind)
    patched = hra.patch_model(copy.deepcopy(reference))
    for name, batch in batches().items():
        ref = reference(**reference_kwargs(batch))
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        plain = patched(**reference_kwargs(batch))  # no shard_batch: structure from mask and positions
        local = hra.shard_batch(batch)
        sharded = patched(**local)
        for out, logits in ((plain, plain.logits), (sharded, local["ring_batch"].gather(sharded.logits))):
            assert rel_err(logits[mask], ref.logits[mask]) <= TOL, name
            assert abs(out.loss.item() - ref.loss.item()) <= TOL * ref.loss.item(), name


def test_patch_then_unpatch_restores_behaviour_bit_for_bit():
    model = tiny_model("mistral")
    batch = batches()["right padding"]
    before = model(**batch).logits
    previous = model.config._attn_implementation
    assert hra.patch_model(model) is model and hra.patch_model(model) is model  # idempotent
    assert model.config._attn_implementation == "hf_ring_attention" and hra.is_patched(model)
    hra.unpatch_model(model)
    assert model.config._attn_implementation == previous and not hra.is_patched(model)
    assert torch.equal(model(**batch).logits, before)
    assert not any(hasattr(m, "_ring_attention") for m in model.modules())


def test_shift_labels_drop_targets_at_document_ends_and_padding():
    ids = torch.arange(10)[None]
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]])
    local = hra.shard_batch({"input_ids": ids, "position_ids": pos, "attention_mask": mask, "labels": ids})
    rb = local["ring_batch"]
    assert rb.lengths == [3, 2, 3] and rb.bounds == [0, 3, 5, 8]  # one rank: no layout padding
    targets = rb.gather(local["shift_labels"][..., None], fill=-7)[0, :, 0].tolist()
    assert targets == [1, 2, -100, 4, -100, 6, 7, -100, -7, -7]
    assert local["num_items_in_batch"] == 5 == hra.count_targets({"input_ids": ids, "position_ids": pos,
                                                                    "attention_mask": mask, "labels": ids})


# ------------------------------------------------------------------------ refusals
def test_support_is_decided_by_capability_not_by_model_type():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    assert hra.is_patched(hra.patch_model(gpt2))  # learned absolute positions through position_ids
    decoder = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, add_cross_attention=True))
    with pytest.raises(NotImplementedError, match="cross-attention"):
        hra.patch_model(decoder)
    model = tiny_model("llama")
    model.config.layer_types = ["linear_attention", "full_attention"]
    with pytest.raises(NotImplementedError, match="layers of type linear_attention"):
        hra.patch_model(model)


def test_heads_other_than_causal_lm_are_refused_at_patch_time_with_the_reason():
    config = tiny_model("llama").config
    with pytest.raises(NotImplementedError, match="pools the last real token of each row"):
        hra.patch_model(LlamaForSequenceClassification(config))
    with pytest.raises(NotImplementedError, match="shard_batch shifts labels"):
        hra.patch_model(LlamaForTokenClassification(config))
    assert hra.is_patched(hra.patch_model(LlamaModel(config)))  # the base model: no head


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_rotary_types_that_depend_on_the_sequence_length_are_refused_at_patch_time(rope_type):
    model = tiny_model("llama")
    rope = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0}
    if rope_type == "longrope":
        rope.update(short_factor=[1.0] * 4, long_factor=[2.0] * 4, original_max_position_embeddings=16)
    model.config.rope_parameters = rope
    with pytest.raises(NotImplementedError, match=f"rope_type='{rope_type}' computes its frequencies from the largest"):
        hra.patch_model(model)


def _tiny_mixtral(router_logits: bool):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                            output_router_logits=router_logits))


def _router_aux_loss_refusals(rank, world_size):
    model = _tiny_mixtral(router_logits=True)
    reference = copy.deepcopy(model)
    with pytest.raises(NotImplementedError, match="router logits themselves are exact"):
        hra.patch_model(model)
    assert not hra.is_patched(model)
    model.config.output_router_logits = False
    hra.patch_model(model)
    batch = batches()["packed"]
    local = hra.shard_batch(batch)
    with pytest.raises(NotImplementedError, match="do not pass output_router_logits=True"):
        model(**local, output_router_logits=True)
    # refused before any communication: the group still works, and without the auxiliary loss the
    # ring gives the language-model loss of the unpatched model
    loss = model(**local).loss.detach()
    dist.all_reduce(loss)
    ref = reference(**reference_kwargs(batch), output_router_logits=False).loss
    assert abs(loss.item() - ref.item()) <= TOL * ref.item()


@pytest.mark.distributed
def test_router_auxiliary_loss_is_refused_on_every_rank_before_any_communication():
    spawn(_router_aux_loss_refusals, 2)


def test_router_auxiliary_loss_is_exact_on_one_rank():
    reference = _tiny_mixtral(router_logits=True)
    patched = hra.patch_model(copy.deepcopy(reference))
    batch = batches()["one sequence"]
    ref = reference(**reference_kwargs(batch))
    out = patched(**hra.shard_batch(batch))
    assert ref.aux_loss is not None and abs(out.aux_loss.item() - ref.aux_loss.item()) <= TOL * ref.aux_loss.item()
    assert abs(out.loss.item() - ref.loss.item()) <= TOL * ref.loss.item()


def test_layers_that_do_not_pass_keyword_arguments_to_attention_are_refused_at_patch_time():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    class Dropping(torch.nn.Module):  # a layer that calls its attention without **kwargs
        def __init__(self, attention):
            super().__init__()
            self.attention = attention

        def forward(self, hidden_states, **kwargs):
            return self.attention(hidden_states)

    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32))
    assert hra.is_patched(hra.patch_model(model))  # GPT-NeoX style: no num_key_value_groups
    hra.unpatch_model(model)
    model.gpt_neox.layers[0] = Dropping(model.gpt_neox.layers[0].attention)
    with pytest.raises(NotImplementedError, match="Dropping calls its GPTNeoXAttention without passing on"):
        hra.patch_model(model)


def test_dropout_in_training_is_refused():
    model = tiny_model("llama")
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    hra.patch_model(model).train()
    with pytest.raises(NotImplementedError, match=r"attention dropout \(0.1\)"):
        model(**hra.shard_batch(batches()["one sequence"]))
    model.eval()  # no dropout in evaluation: fine
    model(**hra.shard_batch(batches()["one sequence"]))


def test_output_attentions_and_kv_cache_are_refused():
    model = hra.patch_model(tiny_model("llama"))
    batch = batches()["one sequence"]
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(**hra.shard_batch(batch), output_attentions=True)
    with pytest.raises(NotImplementedError, match="KV cache"):
        model.generate(batch["input_ids"][:, :5], max_new_tokens=2, do_sample=False)


def test_softcapping_and_sinks_the_attention_does_not_pass_on_are_refused_at_patch_time():
    # Gemma 2 and GPT-OSS pass them to the attention function (softcap=, s_aux=), which gives them to the
    # ring (tests/test_families.py); Llama's attention passes neither, so the ring could not apply them
    model = tiny_model("llama")
    model.config.attn_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match=r"logit softcap \(attn_logit_softcapping=30.0\) but "
                                                  r"LlamaAttention.forward does not pass it"):
        hra.patch_model(model)
    model = tiny_model("llama")
    model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(NotImplementedError, match="LlamaAttention has attention sinks .* does not pass them"):
        hra.patch_model(model)


def test_non_causal_attention_is_refused_at_patch_time():
    model = tiny_model("qwen3")
    model.model.layers[1].self_attn.is_causal = False
    with pytest.raises(NotImplementedError, match="causal self-attention only"):
        hra.patch_model(model)


def test_bad_batches_are_refused_with_their_values():
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\) but input_ids has shape \(1, 4\)"):
        hra.shard_batch({"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 3)})
    with pytest.raises(ValueError, match=r"does not know how to shard \['pixel_values'\]"):
        hra.shard_batch({"input_ids": torch.zeros(1, 4, dtype=torch.long), "pixel_values": torch.zeros(1)})
    with pytest.raises(ValueError, match="row 1 of attention_mask has padding between its tokens"):
        hra.shard_batch({"input_ids": torch.zeros(2, 4, dtype=torch.long),
                         "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 0, 1, 0]])})
    with pytest.raises(ValueError, match="layout='ring'"):
        hra.shard_batch({"input_ids": torch.zeros(1, 4, dtype=torch.long)}, layout="ring")


# ------------------------------------------------------------------ world size 1, plain batches
def test_interior_padding_without_shard_batch_is_refused():
    model = hra.patch_model(tiny_model("llama"))
    ids = torch.randint(0, 96, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 3:5] = 0  # a gap inside row 1: the unpatched model would attend across it
    with pytest.raises(ValueError, match="row 1 of attention_mask has padding between its tokens"):
        model(input_ids=ids, attention_mask=mask)


def _packed_and_padded():
    """Two rows of packed documents (restarting position_ids) that also carry an attention_mask:
    row 1 is right-padded."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (2, 20), generator=gen)
    pos = torch.tensor([list(range(7)) + list(range(13)), list(range(9)) + list(range(8)) + [0, 0, 0]])
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 17:] = 0
    labels = ids.masked_fill((mask == 0) | (pos == 0), -100)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask, "labels": labels}


def test_packed_rows_with_attention_mask_keep_their_documents_separate():
    """Restarting position_ids mean separate documents, with or without an attention_mask: the
    patched model equals the unpatched model given the documents without the mask (transformers
    then separates them, as its flash-attention path and DataCollatorWithFlattening do). sdpa and
    eager with the mask would let the documents attend to each other."""
    reference = tiny_model("llama")
    patched = hra.patch_model(copy.deepcopy(reference))
    batch = _packed_and_padded()
    mask = batch["attention_mask"].bool()
    separate = reference(**reference_kwargs({k: v for k, v in batch.items() if k != "attention_mask"}))
    across = reference(**reference_kwargs(batch))
    plain = patched(**reference_kwargs(batch))
    local = hra.shard_batch(batch)
    sharded = patched(**local)
    for out, logits in ((plain, plain.logits), (sharded, local["ring_batch"].gather(sharded.logits))):
        assert rel_err(logits[mask], separate.logits[mask]) <= TOL
        assert abs(out.loss.item() - separate.loss.item()) <= TOL * separate.loss.item()
    # the difference the choice makes is far above the tolerance
    assert rel_err(across.logits[mask], separate.logits[mask]) > 100 * TOL


def test_plain_batch_structure_is_built_once_per_forward(monkeypatch):
    import hf_ring_attention.transformers as integration

    built = []
    original = integration._single_rank_batch
    monkeypatch.setattr(integration, "_single_rank_batch", lambda *a: built.append(1) or original(*a))
    model = hra.patch_model(tiny_model("llama"))
    assert model.config.num_hidden_layers == 2
    for batch in batches().values():
        model(**reference_kwargs(batch))
    assert len(built) == 3  # one per forward pass, not one per layer
    scope = model.model.layers[0].self_attn._ring_attention.scope
    assert scope.entries is None and scope.depth == 0  # closed after the forward
    with pytest.raises(ValueError, match="padding between"):
        model(input_ids=torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1, 1, 1]]))
    assert scope.entries is None and scope.depth == 0  # closed after a forward that raised


def test_plain_batch_gradients_with_activation_checkpointing():
    """Checkpointed layers are recomputed in the backward pass, outside the forward's scope: the
    structure is rebuilt there, and the gradients stay exact."""
    reference = tiny_model("mistral")
    patched = hra.patch_model(copy.deepcopy(reference))
    enable_checkpointing(patched)
    patched.train()
    reference.train()
    batch = _packed_and_padded()
    reference(**reference_kwargs({k: v for k, v in batch.items() if k != "attention_mask"})).loss.backward()
    patched(**reference_kwargs(batch)).loss.backward()
    for (name, p), q in zip(reference.named_parameters(), patched.parameters()):
        assert rel_err(q.grad, p.grad) <= TOL, name


def test_a_deep_copy_of_a_patched_model_is_patched_on_its_own():
    model = hra.patch_model(tiny_model("llama"))
    clone = copy.deepcopy(model)
    assert hra.is_patched(clone)
    hra.unpatch_model(clone)
    assert not hra.is_patched(clone) and not clone.model._forward_pre_hooks and not clone.model._forward_hooks
    assert hra.is_patched(model) and model.model._forward_pre_hooks  # the original keeps its patch
    batch = batches()["packed"]
    assert torch.equal(model(**reference_kwargs(batch)).logits, hra.patch_model(clone)(**reference_kwargs(batch)).logits)


def test_an_attention_mask_other_than_the_shards_is_refused():
    model = hra.patch_model(tiny_model("llama"))
    batch = batches()["right padding"]
    local = hra.shard_batch(batch)
    model(**local)  # its own mask (all True at world size 1) passes
    wrong = local["attention_mask"].clone()
    wrong[0, 3] = False
    with pytest.raises(ValueError, match="pass the attention_mask it returns unchanged"):
        model(**{**local, "attention_mask": wrong})
    with pytest.raises(ValueError, match="pass the attention_mask it returns unchanged"):
        model(**{**local, "attention_mask": batch["attention_mask"]})  # the full batch's mask
