"""The context-parallel setup shared by the plugin and the callback: cp_size resolution, the mesh
layouts for DDP and FSDP2, and the engines refused."""

from types import SimpleNamespace

import pytest
import torch

from hf_ring_attention.cp import ENV_CP_SIZE, ContextParallelSetup, FSDP_SHARD_DIM, check_engine, mesh_layout, resolve_cp_size

from helpers import spawn


def test_cp_size_argument_wins_over_environment_which_wins_over_world_size(monkeypatch):
    monkeypatch.delenv(ENV_CP_SIZE, raising=False)
    assert resolve_cp_size(None, 8) == 8
    monkeypatch.setenv(ENV_CP_SIZE, "4")
    assert resolve_cp_size(None, 8) == 4
    assert resolve_cp_size(2, 8) == 2
    monkeypatch.setenv(ENV_CP_SIZE, "")
    assert resolve_cp_size(None, 8) == 8  # an empty variable is unset


@pytest.mark.parametrize("value, source, message", [
    (3, "cp_size", r"cp_size=3 must be a positive divisor of the number of processes \(8\); with 8 processes choose one of \[1, 2, 4, 8\]"),
    (0, "cp_size", r"cp_size=0 must be a positive divisor"),
    ("x", "cp_size", r"cp_size='x' is not an integer"),
    (True, "cp_size", r"cp_size=True is not an integer"),
])
def test_bad_cp_size_names_the_value_and_the_choices(monkeypatch, value, source, message):
    monkeypatch.delenv(ENV_CP_SIZE, raising=False)
    with pytest.raises(ValueError, match=message):
        resolve_cp_size(value, 8)


@pytest.mark.parametrize("value, message", [
    ("3", rf"{ENV_CP_SIZE}=3 must be a positive divisor of the number of processes \(8\)"),
    ("two", rf"{ENV_CP_SIZE}='two' is not an integer"),
])
def test_bad_environment_variable_is_named_as_the_source(monkeypatch, value, message):
    monkeypatch.setenv(ENV_CP_SIZE, value)
    with pytest.raises(ValueError, match=message):
        resolve_cp_size(None, 8)


def test_setup_refuses_unknown_layout_and_a_check_count_instead_of_a_switch():
    with pytest.raises(ValueError, match="layout='diagonal' is not supported"):
        ContextParallelSetup(layout="diagonal")
    # check_batches was a number of batches; it is now on (every batch) or off
    with pytest.raises(TypeError, match="check_batches must be True .* or False, got 2"):
        ContextParallelSetup(check_batches=2)
    assert ContextParallelSetup().check_batches is True


@pytest.mark.parametrize("world, cp, replicas, names, shape", [
    (4, 2, None, ("dp_replicate", "cp"), (2, 2)),
    (8, 8, None, ("dp_replicate", "cp"), (1, 8)),
    (4, 2, 1, ("dp_replicate", "dp_shard", "cp"), (1, 2, 2)),
    (8, 2, 2, ("dp_replicate", "dp_shard", "cp"), (2, 2, 2)),
    (4, 2, 2, ("dp_replicate", "dp_shard", "cp"), (2, 1, 2)),
])
def test_mesh_layout_deals_one_batch_per_cp_group_and_shards_fsdp_over_every_process(world, cp, replicas, names, shape):
    got_names, got_shape = mesh_layout(world, cp, replicas)
    assert (got_names, got_shape) == (names, shape)
    sizes = dict(zip(names, shape))
    # accelerate's data loader (prepare_data_loader): batches differ across dp_replicate x dp_shard
    # and repeat across cp, whose ranks are consecutive (the last mesh dimension)
    assert sizes["dp_replicate"] * sizes.get("dp_shard", 1) == world // cp and names[-1] == "cp"
    if replicas is not None:  # FSDP shards each replica over dp_shard x cp: all processes together
        from accelerate import ParallelismConfig

        assert sizes["dp_replicate"] == replicas and sizes["dp_shard"] * cp * replicas == world
        # the dimensions accelerate's fsdp2_prepare_model shards over exist in the mesh: for the
        # config the plugin installs (plain FSDP) and for a user's HSDP config
        config = ParallelismConfig(dp_replicate_size=replicas, dp_shard_size=world // replicas)
        assert set(config.fsdp_dim_names) <= {*names, FSDP_SHARD_DIM}
        assert config.fsdp_dim_names[-1] == FSDP_SHARD_DIM and ("dp_replicate" in config.fsdp_dim_names) == (replicas > 1)


def test_fsdp_mesh_layout_refuses_replicas_that_split_a_cp_group():
    with pytest.raises(ValueError, match=r"dp_replicate_size=4 and cp_size=2 needs their product to divide the number of processes \(4\)"):
        mesh_layout(4, 2, 4)


@pytest.mark.parametrize("kind, plugin, config, error", [
    ("DEEPSPEED", None, None, r"DeepSpeed is not supported .* data loader under DeepSpeed deals batches by data-parallel rank only"),
    ("FSDP", SimpleNamespace(fsdp_version=1), None, r"FSDP version 1 is not supported .* set fsdp_version: 2"),
    ("FSDP", SimpleNamespace(fsdp_version=2), SimpleNamespace(tp_enabled=True, tp_size=2), r"tensor parallelism \(tp_size=2\) is not supported"),
])
def test_engines_the_ring_cannot_make_exact_are_refused(kind, plugin, config, error):
    from accelerate.utils import DistributedType

    state = SimpleNamespace(distributed_type=DistributedType[kind], fsdp_plugin=plugin)
    with pytest.raises(NotImplementedError, match=error):
        check_engine(state, config)


def test_fsdp2_and_ddp_are_accepted():
    from accelerate.utils import DistributedType

    assert check_engine(SimpleNamespace(distributed_type=DistributedType.FSDP, fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    assert not check_engine(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))
    assert not check_engine(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def test_batches_sharded_for_a_patched_model_get_their_plans_before_the_forward(monkeypatch):
    import hf_ring_attention.batch as batch_module
    from models import batches, tiny_model

    cp = ContextParallelSetup()
    model = cp.prepare_model(tiny_model("qwen2"))  # one full-attention layer and one of window 6
    batch = batches()["packed"]
    model(**cp.shard(batch))  # the first forward shows which windows the layers attend with
    built = []

    class CountingPlan(batch_module.RingPlan):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(kwargs["window_size"])

    monkeypatch.setattr(batch_module, "RingPlan", CountingPlan)
    local = cp.shard(batch)
    assert sorted(built, key=str) == [6, None]
    plans = local["ring_batch"]._plans
    assert all((torch.device("cpu"), True) in plan._on_device for plan in plans.values())  # uploaded
    model(**local)
    assert len(built) == 2  # the forward built nothing more


def test_callback_refuses_data_loader_workers(tmp_path):
    # the collator shards, and worker processes have no process group: refused when the Trainer
    # is built, with the setting to change
    from transformers import Trainer, TrainingArguments

    from hf_ring_attention.trainer import RingAttentionCallback
    from models import examples, tiny_model

    args = TrainingArguments(output_dir=str(tmp_path), dataloader_num_workers=2, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=r"dataloader_num_workers > 0 \(got 2\).*Set dataloader_num_workers=0"):
        Trainer(model=tiny_model("llama"), args=args, train_dataset=examples(2, packed=False),
                callbacks=[RingAttentionCallback()])


def test_plugin_options_changed_before_setup_take_effect_and_after_it_are_refused():
    from hf_ring_attention.accelerate import ContextParallelPlugin

    plugin = ContextParallelPlugin(cp_size=2)
    plugin.layout, plugin.chunked_loss = "striped", 256
    assert (plugin.cp.layout, plugin.cp.chunked_loss, plugin.cp.cp_size) == ("striped", 256, 2)
    with pytest.raises(ValueError, match="bogus"):
        plugin.layout = "bogus"
    assert plugin.layout == plugin.cp.layout == "striped"
    plugin.cp.mesh = SimpleNamespace(cp_size=2)  # as setup() leaves it
    with pytest.raises(AttributeError, match="layout cannot change after setup"):
        plugin.layout = "zigzag"
    assert plugin.layout == plugin.cp.layout == "striped"
    plugin.model = None  # other attributes stay free


def test_callback_options_are_read_only():
    from hf_ring_attention.trainer import RingAttentionCallback

    from hf_ring_attention.cp import OPTIONS

    assert all(isinstance(getattr(RingAttentionCallback, name, None), property) for name in OPTIONS)
    ring = RingAttentionCallback(cp_size=2, layout="striped", chunked_loss=128)
    assert (ring.cp_size, ring.layout, ring.chunked_loss, ring.check_batches) == (2, "striped", 128, True)
    with pytest.raises(AttributeError, match=r"pass RingAttentionCallback\(layout='zigzag', ...\) instead"):
        ring.layout = "zigzag"
    assert ring.layout == ring.cp.layout == "striped"


def _mesh_group_timeouts(rank, world_size):
    from datetime import timedelta

    from hf_ring_attention import _compat
    from hf_ring_attention.cp import CPMesh

    started_with = _compat.group_timeout()
    assert started_with == timedelta(seconds=60)  # helpers.spawn's init_process_group(timeout=)
    ddp = CPMesh.build(2, "cpu")
    fsdp = CPMesh.build(2, "cpu", fsdp_replicas=1)
    groups = {f"ddp {name}": ddp.mesh.get_group(name) for name in ddp.mesh.mesh_dim_names}
    groups |= {f"fsdp {name}": fsdp.mesh.get_group(name) for name in (*fsdp.mesh.mesh_dim_names, FSDP_SHARD_DIM)}
    timeouts = {name: _compat.group_timeout(group) for name, group in groups.items()}
    assert timeouts == dict.fromkeys(groups, started_with), timeouts
    assert [groups[f"ddp {name}"].size() for name in ddp.mesh.mesh_dim_names] == [2, 2]  # not the default group
    assert CPMesh.build(2, "cpu", existing=ddp.mesh).mesh is ddp.mesh  # reused (and its groups kept)


@pytest.mark.distributed
def test_mesh_groups_keep_the_timeout_the_processes_started_with():
    """torch gives a device mesh's new groups its default timeout (30 minutes for gloo, 10 for
    NCCL): a rank that stops answering would hang the others far past the user's timeout."""
    spawn(_mesh_group_timeouts, 4)  # dp 2 x cp 2: every dimension a new group of 2 ranks
