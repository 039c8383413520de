"""The context-parallel setup shared by the Accelerate plugin and the Trainer callback.

Ranks are grouped into context-parallel (cp) groups of ``cp_size`` consecutive ranks; the groups
are the data-parallel (dp) replicas. :class:`CPMesh` is that arrangement: a torch ``DeviceMesh``
with dimensions named ``("dp_replicate", "cp")``, the names accelerate's data loader reads, so
that it hands every rank of a cp group the same batch and different batches to different groups,
without enabling accelerate's own context parallelism (which would also shard the batch and
replace SDPA). Under accelerate's FSDP2 the mesh is ``("dp_replicate", "dp_shard", "cp")``
instead, with ``("dp_shard", "cp")`` flattened into ``"dp_shard_cp"``, the dimension accelerate
shards the model over (as for its own context parallelism): the model is sharded over every
process and the ranks of a cp group hold different shards of one replica. :class:`ContextParallelSetup`
holds the options and does everything the plugin and the callback have in common: the mesh,
patching and checking the model, sharding batches, and checking that the ranks of a group were
given the same batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from . import _compat
from .batch import shard_batch
from .layout import check_layout

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

ENV_CP_SIZE = "HF_RING_ATTENTION_CP_SIZE"
MESH_DIMS = ("dp_replicate", "cp")
FSDP_MESH_DIMS = ("dp_replicate", "dp_shard", "cp")
FSDP_SHARD_DIM = "dp_shard_cp"  # accelerate's name for the flattened ("dp_shard", "cp") dimension


def resolve_cp_size(cp_size: int | str | None, world_size: int) -> int:
    """``cp_size`` argument > ``HF_RING_ATTENTION_CP_SIZE`` environment variable > world size,
    validated to divide the world size."""
    source = "cp_size"
    if cp_size is None and os.environ.get(ENV_CP_SIZE):
        cp_size, source = os.environ[ENV_CP_SIZE], ENV_CP_SIZE
    if cp_size is None:
        return world_size
    if isinstance(cp_size, str) and cp_size.strip().isdigit():
        cp_size = int(cp_size)
    if not isinstance(cp_size, int) or isinstance(cp_size, bool):
        raise ValueError(f"{source}={cp_size!r} is not an integer")
    if cp_size < 1 or world_size % cp_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"{source}={cp_size} must be a positive divisor of the number of processes ({world_size}); "
            f"with {world_size} processes choose one of {divisors}"
        )
    return cp_size


@dataclass
class CPMesh:
    """The dp x cp arrangement of the processes: ``mesh`` has dimensions ``("dp_replicate",
    "cp")``, or ``("dp_replicate", "dp_shard", "cp")`` under accelerate's FSDP2 (see
    :func:`mesh_layout`); None on a single process."""

    world_size: int
    cp_size: int
    mesh: DeviceMesh | None = field(repr=False)

    @property
    def dp_size(self) -> int:
        return self.world_size // self.cp_size

    @property
    def group(self) -> ProcessGroup | None:
        """This rank's context-parallel group (None on a single process)."""
        return None if self.mesh is None else self.mesh.get_group("cp")

    @classmethod
    def build(cls, cp_size: int | None, device_type: str, existing: DeviceMesh | None = None,
              fsdp_replicas: int | None = None) -> CPMesh:
        """Build the mesh (a collective call: every process must call it), or reuse ``existing``
        (the accelerator state's mesh) when it is the one needed. ``fsdp_replicas``: build the
        FSDP2 layout with that many HSDP replicas (1: plain FSDP over all processes)."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        world_size = dist.get_world_size() if dist.is_initialized() else 1
        cp = resolve_cp_size(cp_size, world_size)
        if not dist.is_initialized():
            return cls(1, 1, None)
        names, shape = mesh_layout(world_size, cp, fsdp_replicas)
        if existing is not None and tuple(existing.mesh_dim_names or ()) == names and tuple(existing.shape) == shape:
            _compat.inherit_timeout(existing.get_all_groups())
            return cls(world_size, cp, existing)
        if existing is not None and fsdp_replicas is None:
            raise ValueError(
                f"the accelerator already has a device mesh {existing}; context parallelism with "
                f"cp_size={cp} needs dimensions {names} of sizes {shape}"
            )
        # under FSDP2, accelerate's own mesh (from its parallelism config) has no "cp": replaced
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        groups = mesh.get_all_groups()
        if fsdp_replicas is not None:
            groups.append(_compat.flatten_mesh(mesh, ("dp_shard", "cp"), FSDP_SHARD_DIM).get_group())
        # a rank that stops answering must fail the others after the timeout the processes were
        # started with, not torch's default for new groups
        _compat.inherit_timeout(groups)
        return cls(world_size, cp, mesh)


def mesh_layout(world_size: int, cp_size: int, fsdp_replicas: int | None = None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Dimension names and sizes of the mesh. DDP (``fsdp_replicas=None``): ``("dp_replicate",
    "cp")``. FSDP2 with R replicas: ``("dp_replicate", "dp_shard", "cp")`` of sizes
    ``(R, world_size / (R * cp_size), cp_size)``. In both, accelerate's data loader deals one batch
    per ``world_size / cp_size`` consecutive-rank group of ``cp_size``."""
    if fsdp_replicas is None:
        return MESH_DIMS, (world_size // cp_size, cp_size)
    if fsdp_replicas < 1 or world_size % (fsdp_replicas * cp_size):
        raise ValueError(
            f"FSDP with dp_replicate_size={fsdp_replicas} and cp_size={cp_size} needs their product to divide "
            f"the number of processes ({world_size}): each replica is sharded over whole context-parallel "
            f"groups. Change dp_replicate_size (parallelism_config) or cp_size."
        )
    return FSDP_MESH_DIMS, (fsdp_replicas, world_size // (fsdp_replicas * cp_size), cp_size)


@dataclass
class ContextParallelSetup:
    """Options and state shared by :class:`~hf_ring_attention.accelerate.ContextParallelPlugin`
    and :class:`~hf_ring_attention.trainer.RingAttentionCallback`; the options (``cp_size``,
    ``layout``, ``backend``, ``check_batches``, ``chunked_loss``, ``tiled_mlp``) are documented
    there."""

    cp_size: int | None = None
    layout: str = "zigzag"
    backend: str | None = None
    check_batches: bool = True
    chunked_loss: bool | int = False
    tiled_mlp: bool | int = False
    mesh: CPMesh | None = field(default=None, init=False, repr=False)
    model: object = field(default=None, init=False, repr=False)  # the patched transformers model

    def __post_init__(self):
        check_layout(self.layout)
        if not isinstance(self.check_batches, bool):
            raise TypeError(
                f"check_batches must be True (check every batch: one all-gather of a checksum per "
                f"batch) or False, got {self.check_batches!r}"
            )

    @property
    def group(self) -> ProcessGroup | None:
        """The context-parallel group of this rank (after :meth:`install`)."""
        return None if self.mesh is None else self.mesh.group

    def install(self, accelerator_state, parallelism_config=None) -> CPMesh:
        """Build (or reuse) the mesh and install it on accelerate's shared state, so that
        accelerate's data loader deals one batch per cp group. Idempotent. Accelerate's own
        context or sequence parallelism must be off: it would shard the batch a second time."""
        if self.mesh is not None:
            return self.mesh
        pc = parallelism_config
        if pc is not None and (getattr(pc, "cp_enabled", False) or getattr(pc, "sp_enabled", False)):
            raise ValueError(
                f"accelerate's own context or sequence parallelism is enabled ({pc}); it would "
                f"shard the batch a second time. Use either it or hf_ring_attention's context "
                f"parallelism, not both."
            )
        fsdp2 = check_engine(accelerator_state, pc)
        replicas = (pc.dp_replicate_size if pc is not None else 1) if fsdp2 else None
        mesh = CPMesh.build(self.cp_size, accelerator_state.device.type,
                            existing=_compat.accelerator_mesh(accelerator_state), fsdp_replicas=replicas)
        if mesh.mesh is not None:
            _compat.set_accelerator_mesh(accelerator_state, mesh.mesh)
            if fsdp2 and pc is None:
                # accelerate's FSDP2 shards over mesh[parallelism_config.fsdp_dim_names]: a config
                # describing plain FSDP over every process names "dp_shard_cp" (cp stays off in it:
                # accelerate's own context parallelism would shard the batch and replace SDPA)
                from accelerate import ParallelismConfig

                # (every other size keeps its default of 1; accelerate 1.10 has no sp_size yet)
                _compat.set_parallelism_config(accelerator_state, ParallelismConfig(
                    dp_replicate_size=1, dp_shard_size=mesh.world_size))
        self.mesh = mesh
        return mesh

    def check_reduction(self, model) -> None:
        """After the engine wrapped ``model``: refuse a gradient reduction the loss scaling cannot
        make exact (:func:`~hf_ring_attention.fsdp.check_gradient_reduction` for FSDP2; DDP
        averages over all processes, which the scaling assumes)."""
        from .fsdp import check_gradient_reduction

        if self.mesh is not None and self.mesh.world_size > 1:
            check_gradient_reduction(model, self.mesh.world_size)

    def prepare_model(self, model):
        """Refuse what training cannot make exact, then patch ``model`` (a transformers model, or
        a PEFT model around one) for ring attention. Returns the patched transformers model."""
        from .transformers import patch_model

        model = transformers_model(model)
        check_trainable(model)
        self.model = patch_model(model, group=self.group, layout=self.layout, backend=self.backend,
                                 chunked_loss=self.chunked_loss, tiled_mlp=self.tiled_mlp)
        return self.model

    def shard(self, batch: dict) -> dict:
        """This rank's shard of a full batch (:func:`~hf_ring_attention.shard_batch`); with
        ``check_batches``, the patched model checks before its first ring that every rank of
        the group was given the same batch. The ring plans of the windows the model attends
        with are built here, before the forward, and put on the batch's device."""
        from .transformers import attention_windows

        local = shard_batch(batch, group=self.group, layout=self.layout, check=self.check_batches)
        if self.model is not None:
            local["ring_batch"].prepare(attention_windows(self.model), device=local["input_ids"].device)
        return local


OPTIONS = tuple(f.name for f in fields(ContextParallelSetup) if f.init)
"""The user's options of the plugin and the callback (``cp_size``, ``layout``, ...)."""


def check_engine(accelerator_state, parallelism_config=None) -> bool:
    """Refuse the training engines the ring cannot make exact; returns whether accelerate applies
    FSDP2 (which needs the FSDP2 mesh layout, see :func:`mesh_layout`)."""
    from accelerate.utils import DistributedType

    kind = accelerator_state.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise NotImplementedError(
            "DeepSpeed is not supported with hf_ring_attention's context parallelism: accelerate's data "
            "loader under DeepSpeed deals batches by data-parallel rank only (the ranks of a context-parallel "
            "group would get different batches), and DeepSpeed's train_batch_size counts every process as a "
            "data-parallel replica. "
            "For sharded parameters, gradients and optimizer states use FSDP2 (fsdp_version: 2)."
        )
    if kind == DistributedType.FSDP:
        version = getattr(getattr(accelerator_state, "fsdp_plugin", None), "fsdp_version", 1)
        if version != 2:
            raise NotImplementedError(
                f"accelerate's FSDP version {version} is not supported with context parallelism; "
                f"set fsdp_version: 2 (FSDP2, fully_shard) in the accelerate config."
            )
        if parallelism_config is not None and parallelism_config.tp_enabled:
            raise NotImplementedError(
                f"tensor parallelism (tp_size={parallelism_config.tp_size}) is not supported with "
                f"hf_ring_attention's context parallelism; set tp_size=1."
            )
        return True
    return False


def transformers_model(module):
    """The transformers model inside ``module`` (itself, or the base model of a PEFT model)."""
    from transformers import PreTrainedModel

    from .transformers import inner_model

    model = inner_model(module)
    if isinstance(model, PreTrainedModel):
        return model
    raise TypeError(
        f"context parallelism patches transformers models for ring attention; got "
        f"{type(module).__name__}. Pass the PreTrainedModel (before torch.compile or other wrappers)."
    )


def check_trainable(model) -> None:
    """Refuse, before training starts, a model config whose attention dropout ring attention
    cannot reproduce."""
    config = getattr(model, "config", None)
    dropout = getattr(config, "attention_dropout", 0.0) or 0.0
    if dropout > 0:
        raise ValueError(
            f"the model config has attention_dropout={dropout}; ring attention cannot reproduce "
            f"attention dropout in training. Set model.config.attention_dropout = 0.0 (and the "
            f"attention modules' attention_dropout) before training."
        )
