"""FSDP2 (fully_shard) with context parallelism through the plugin: a model the user sharded with
fully_shard (per decoder layer and at the root, over all processes) trains exactly like one
process on the same global batches, at cp=2 and dp=2 x cp=2, with gradient accumulation, packed
documents and activation checkpointing; its full state dict saves and loads. Reductions the loss
scaling cannot make exact are refused."""

import os
from pathlib import Path

import pytest
import torch

from helpers import launch
from models import BATCH, LR, collate, enable_checkpointing, examples, is_checkpointing, tiny_model
from test_accelerate import STEPS, reference

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full_state(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _train(rank, world_size, cp_size, accumulate, checkpointing, result_path):
    from accelerate import Accelerator
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from hf_ring_attention.accelerate import ContextParallelPlugin
    from hf_ring_attention.fsdp import is_fully_sharded

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    dp = world_size // cp_size
    mesh = init_device_mesh("cpu", (world_size,))  # parameters sharded over every process
    model = tiny_model("llama")
    if checkpointing:
        enable_checkpointing(model)
    model = _shard(model, mesh)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)  # after fully_shard: DTensor parameters
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / STEPS)
    data = examples(STEPS * dp * accumulate * BATCH, packed=True)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False, collate_fn=collate)
    cp = ContextParallelPlugin(cp_size=cp_size)
    model, opt, loader, sched = cp.prepare(accelerator, model, opt, loader, sched)
    assert is_fully_sharded(model) and is_checkpointing(model) == checkpointing
    losses, running = [], 0.0
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            running += accelerator.reduce(loss.detach(), "mean").item() / accumulate
            opt.step()
            sched.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            losses.append(running)
            running = 0.0
    state = _full_state(model)
    # a full state dict loads into a freshly sharded model (differently initialised) from rank 0
    fresh = _shard(tiny_model("llama", seed=1), mesh)
    # (set_model_state_dict replaces the values of the dict it is given by DTensors: give it a copy)
    set_model_state_dict(fresh, dict(state) if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    reloaded = _full_state(fresh)
    if rank == 0:
        torch.save({"losses": losses, "state": state, "reloaded": reloaded}, result_path)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "world_size, cp_size, accumulate, checkpointing",
    [(2, 2, 2, False), (4, 2, 2, False), (2, 2, 2, True)],
    ids=["cp2-accum2", "dp2xcp2-accum2", "cp2-accum2-checkpointing"],
)
def test_fully_sharded_training_matches_one_process(tmp_path, world_size, cp_size, accumulate, checkpointing):
    path = tmp_path / "result.pt"
    launch(_train, world_size, cp_size, accumulate, checkpointing, str(path))
    got = torch.load(path)
    ref_losses, ref_state = reference(world_size // cp_size, accumulate, packed=True)
    assert len(got["losses"]) == STEPS
    for step, (a, b) in enumerate(zip(got["losses"], ref_losses)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: loss {a} vs {b}"
    assert set(got["state"]) == set(ref_state)
    for name, ref in ref_state.items():
        # after a few SGD steps the weights differ by lr x (gradient rounding): far below 1e-5
        err = ((got["state"][name] - ref).norm() / ref.norm()).item()
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"
        assert torch.equal(got["reloaded"][name], got["state"][name]), f"{name}: reloaded state differs"


def _bad_reductions(rank, world_size, out_dir):
    from accelerate import Accelerator
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hf_ring_attention.accelerate import ContextParallelPlugin

    accelerator = Accelerator(cpu=True)
    everyone = init_device_mesh("cpu", (world_size,))
    # the root's parameters (embeddings, final norm, lm_head) are never reduced
    model = tiny_model("llama")
    for layer in model.model.layers:
        fully_shard(layer, mesh=everyone)
    with pytest.raises(ValueError, match=r"trainable parameter\(s\) of the fully sharded model are not managed by FSDP"):
        ContextParallelPlugin(cp_size=2).prepare(accelerator, model)
    # each rank alone: the two halves of a sequence's gradient are never added up
    alone = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("others", "me"))["me"]
    with pytest.raises(ValueError, match=r"FSDP shards \d+ parameter\(s\) over a mesh smaller than the 2 processes"):
        ContextParallelPlugin(cp_size=2).prepare(accelerator, _shard(tiny_model("llama"), alone))
    model = _shard(tiny_model("llama"), everyone)
    model.set_gradient_divide_factor(1.0)
    with pytest.raises(ValueError, match=r"FSDP divides gradients by \[1.0\] \(set_gradient_divide_factor\)"):
        ContextParallelPlugin(cp_size=2).prepare(accelerator, model)
    model = _shard(tiny_model("llama"), everyone)
    model.set_gradient_divide_factor(2.0)  # the default, stated
    ContextParallelPlugin(cp_size=2).prepare(accelerator, model)
    # the Trainer without FSDP2 would wrap a fully sharded model in DDP
    from transformers import Trainer, TrainingArguments

    from hf_ring_attention.trainer import RingAttentionCallback

    ring = RingAttentionCallback(cp_size=2)
    args = TrainingArguments(output_dir=out_dir, use_cpu=True, report_to=[], per_device_train_batch_size=BATCH)
    with pytest.raises(ValueError, match="the model is wrapped with fully_shard but the Trainer does not use FSDP2"):
        Trainer(model=_shard(tiny_model("llama"), everyone), args=args, train_dataset=examples(4, packed=True),
                data_collator=ring.data_collator(collate), callbacks=[ring])


@pytest.mark.distributed
def test_inexact_reductions_are_refused_on_every_rank(tmp_path):
    launch(_bad_reductions, 2, str(tmp_path))


def example_fsdp_environment() -> dict:
    """The FSDP settings `accelerate launch --config_file examples/accelerate_fsdp2.yaml` passes
    to the processes (its FSDP_* environment variables)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(EXAMPLES / "accelerate_fsdp2.yaml"), "x.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith("FSDP_")}


def test_example_accelerate_config_selects_fsdp2_with_decoder_layer_wrapping():
    env = example_fsdp_environment()
    assert env["FSDP_VERSION"] == "2" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"


def _train_accelerate_fsdp2(rank, world_size, cp_size, accumulate, replicas, result_path):
    from accelerate import Accelerator, ParallelismConfig, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from hf_ring_attention.accelerate import ContextParallelPlugin

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    # accelerate applies FSDP only on accelerators (AcceleratorState.__init__ picks DistributedType.FSDP
    # for MULTI_GPU and the like, and copies it to PartialState); set the state as it does there, so
    # that accelerator.prepare takes its FSDP2 path (_prepare_fsdp2, fsdp2_prepare_model) on CPU
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    os.environ.update(example_fsdp_environment())  # the plugin reads the FSDP_* variables
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    assert accelerator.is_fsdp2
    if replicas is not None:  # HSDP, configured as Accelerator(parallelism_config=...) does on GPUs
        config = ParallelismConfig(dp_replicate_size=replicas, dp_shard_size=world_size // replicas)
        accelerator.state.parallelism_config = config
        accelerator.state.device_mesh = config.get_device_mesh("cpu")
    dp = world_size // cp_size
    model = tiny_model("llama")
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / STEPS)
    data = examples(STEPS * dp * accumulate * BATCH, packed=True)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False, collate_fn=collate)
    cp = ContextParallelPlugin(cp_size=cp_size)
    model, opt, loader, sched = cp.prepare(accelerator, model, opt, loader, sched)
    # accelerate sharded the model over every process (HSDP: replicas x shards)
    meshes = {tuple(p.device_mesh.shape) for p in model.parameters()}
    assert meshes == {(world_size,) if replicas is None else (replicas, world_size // replicas)}, meshes
    assert accelerator.parallelism_config.cp_size == 1  # accelerate's own context parallelism stays off
    losses, running = [], 0.0
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            running += accelerator.reduce(loss.detach(), "mean").item() / accumulate
            opt.step()
            sched.step()
            opt.zero_grad()
        if accelerator.sync_gradients:
            losses.append(running)
            running = 0.0
    state = accelerator.get_state_dict(model)  # accelerate's full state dict (rank 0)
    if rank == 0:
        torch.save({"losses": losses, "state": state}, result_path)


@pytest.mark.distributed
@pytest.mark.parametrize("replicas", [None, 2], ids=["fsdp", "hsdp2"])
def test_accelerate_fsdp2_training_matches_one_process(tmp_path, replicas):
    """accelerate's own FSDP2 preparation, configured by examples/accelerate_fsdp2.yaml, with the
    plugin at dp=2 x cp=2, gradient accumulation 2."""
    path = tmp_path / "result.pt"
    launch(_train_accelerate_fsdp2, 4, 2, 2, replicas, str(path))
    got = torch.load(path)
    ref_losses, ref_state = reference(2, 2, packed=True)
    assert len(got["losses"]) == STEPS
    for step, (a, b) in enumerate(zip(got["losses"], ref_losses)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: loss {a} vs {b}"
    assert set(got["state"]) == set(ref_state)
    for name, ref in ref_state.items():
        err = ((got["state"][name] - ref).norm() / ref.norm()).item()
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"
