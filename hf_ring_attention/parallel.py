"""The data-parallel x sequence-parallel layout of the processes, shared by the Accelerate plugin
and the Trainer callback.

Ranks are grouped into sequence-parallel (sp) groups of consecutive ranks; the groups are the
data-parallel (dp) replicas. The layout is a torch ``DeviceMesh`` with dimensions named
``("dp_replicate", "cp")``: the names accelerate's data loader reads, so that it hands every rank
of an sp group the same batch and different batches to different groups, without enabling
accelerate's own context parallelism (which would also shard the batch and replace SDPA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch.distributed as dist

ENV_SP_SIZE = "HF_RING_ATTENTION_SP_SIZE"


def resolve_sp_size(sp_size: int | None, world_size: int) -> int:
    """``sp_size`` argument > ``HF_RING_ATTENTION_SP_SIZE`` environment variable > world size,
    validated to divide the world size."""
    source = "sp_size"
    if sp_size is None and os.environ.get(ENV_SP_SIZE):
        sp_size, source = os.environ[ENV_SP_SIZE], ENV_SP_SIZE
    if sp_size is None:
        return world_size
    if isinstance(sp_size, str) and sp_size.strip().isdigit():
        sp_size = int(sp_size)
    if not isinstance(sp_size, int) or isinstance(sp_size, bool):
        raise ValueError(f"{source}={sp_size!r} is not an integer")
    if sp_size < 1 or world_size % sp_size:
        raise ValueError(
            f"{source}={sp_size} must be a positive divisor of the number of processes ({world_size}); "
            f"with {world_size} processes choose one of {[d for d in range(1, world_size + 1) if world_size % d == 0]}"
        )
    return sp_size


@dataclass
class ParallelLayout:
    """The dp x sp process layout: ``mesh`` (``("dp_replicate", "cp")``), this rank's sp group."""

    world_size: int
    sp_size: int
    mesh: object = field(repr=False)

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @classmethod
    def build(cls, sp_size: int | None, device_type: str, existing=None) -> "ParallelLayout":
        """Build the mesh (a collective call: every process must call it), or reuse ``existing``
        (the accelerator state's mesh) when it is the one this layout needs."""
        from torch.distributed.device_mesh import init_device_mesh

        world_size = dist.get_world_size() if dist.is_initialized() else 1
        sp = resolve_sp_size(sp_size, world_size)
        if not dist.is_initialized():
            return cls(1, 1, None)
        shape, names = (world_size // sp, sp), ("dp_replicate", "cp")
        if existing is not None:
            if tuple(existing.mesh_dim_names or ()) != names or tuple(existing.shape) != shape:
                raise ValueError(
                    f"the accelerator already has a device mesh {existing}; sequence parallelism with "
                    f"sp_size={sp} needs dimensions {names} of sizes {shape}"
                )
            return cls(world_size, sp, existing)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        return cls(world_size, sp, mesh)

    @classmethod
    def install(cls, sp_size: int | None, accelerator_state, parallelism_config=None) -> "ParallelLayout":
        """Build (or reuse) the layout and install its mesh on accelerate's shared state, so that
        accelerate's data loader deals one batch per sp group. Accelerate's own context or
        sequence parallelism must be off: it would shard the batch a second time."""
        pc = parallelism_config
        if pc is not None and (getattr(pc, "cp_enabled", False) or getattr(pc, "sp_enabled", False)):
            raise ValueError(
                f"accelerate's own context/sequence parallelism is enabled in parallelism_config "
                f"(cp_size={pc.cp_size}, sp_size={pc.sp_size}); it would shard the batch a second "
                f"time. Use either it or hf_ring_attention's sequence parallelism, not both."
            )
        layout = cls.build(sp_size, accelerator_state.device.type, existing=accelerator_state.device_mesh)
        if layout.mesh is not None:
            accelerator_state.device_mesh = layout.mesh
        return layout

    def group(self):
        """The sp group for ``patch_model``/``shard_batch`` (None on a single process)."""
        return None if self.mesh is None else self.mesh.get_group("cp")


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
