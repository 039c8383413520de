"""The context-parallel setup shared by the Accelerate plugin and the Trainer callback.

Ranks are grouped into context-parallel (cp) groups of ``cp_size`` consecutive ranks; the groups
are the data-parallel (dp) replicas. :class:`CPMesh` is that arrangement: a torch ``DeviceMesh``
with dimensions named ``("dp_replicate", "cp")``, the names accelerate's data loader reads, so
that it hands every rank of a cp group the same batch and different batches to different groups,
without enabling accelerate's own context parallelism (which would also shard the batch and
replace SDPA). :class:`ContextParallelSetup` holds the options and does everything the plugin and
the callback have in common: the mesh, patching and checking the model, sharding batches, and
checking that the ranks of a group were given the same batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from . import _compat
from .batch import check_same_batch, shard_batch
from .layout import check_layout

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

ENV_CP_SIZE = "HF_RING_ATTENTION_CP_SIZE"
MESH_DIMS = ("dp_replicate", "cp")


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
    "cp")`` (None on a single process)."""

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
    def build(cls, cp_size: int | None, device_type: str, existing: DeviceMesh | None = None) -> CPMesh:
        """Build the mesh (a collective call: every process must call it), or reuse ``existing``
        (the accelerator state's mesh) when it is the one needed."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        world_size = dist.get_world_size() if dist.is_initialized() else 1
        cp = resolve_cp_size(cp_size, world_size)
        if not dist.is_initialized():
            return cls(1, 1, None)
        shape = (world_size // cp, cp)
        if existing is not None:
            if tuple(existing.mesh_dim_names or ()) != MESH_DIMS or tuple(existing.shape) != shape:
                raise ValueError(
                    f"the accelerator already has a device mesh {existing}; context parallelism with "
                    f"cp_size={cp} needs dimensions {MESH_DIMS} of sizes {shape}"
                )
            return cls(world_size, cp, existing)
        return cls(world_size, cp, init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS))


@dataclass
class ContextParallelSetup:
    """Options and state shared by :class:`~hf_ring_attention.accelerate.ContextParallelPlugin`
    and :class:`~hf_ring_attention.trainer.RingAttentionCallback`; the options (``cp_size``,
    ``layout``, ``backend``, ``check_batches``, ``chunked_loss``, ``tiled_mlp``) are documented
    there."""

    cp_size: int | None = None
    layout: str = "zigzag"
    backend: str | None = None
    check_batches: int = 2
    chunked_loss: bool | int = False
    tiled_mlp: bool | int = False
    mesh: CPMesh | None = field(default=None, init=False, repr=False)
    _checked: int = field(default=0, init=False, repr=False)

    def __post_init__(self):
        check_layout(self.layout)
        if self.check_batches < 0:
            raise ValueError(f"check_batches must be >= 0, got {self.check_batches}")

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
        mesh = CPMesh.build(self.cp_size, accelerator_state.device.type,
                            existing=_compat.accelerator_mesh(accelerator_state))
        if mesh.mesh is not None:
            _compat.set_accelerator_mesh(accelerator_state, mesh.mesh)
        self.mesh = mesh
        return mesh

    def prepare_model(self, model):
        """Refuse what training cannot make exact, then patch ``model`` (a transformers model, or
        a PEFT model around one) for ring attention. Returns the patched transformers model."""
        from .transformers import patch_model

        model = transformers_model(model)
        check_trainable(model)
        return patch_model(model, group=self.group, layout=self.layout, backend=self.backend,
                           chunked_loss=self.chunked_loss, tiled_mlp=self.tiled_mlp)

    def shard(self, batch: dict) -> dict:
        """This rank's shard of a full batch (:func:`~hf_ring_attention.shard_batch`)."""
        return shard_batch(batch, group=self.group, layout=self.layout)

    @property
    def checked_all(self) -> bool:
        """Whether the first ``check_batches`` batches have been checked."""
        return self._checked >= self.check_batches

    def check_batch(self, ring_batch, device: torch.device | None = None) -> None:
        """On the first ``check_batches`` batches, check that every rank of the group was given
        the same batch (a collective: call it on every rank)."""
        if self._checked < self.check_batches:
            self._checked += 1
            check_same_batch(ring_batch, device=device)


def transformers_model(module):
    """The transformers model inside ``module`` (itself, or the base model of a PEFT model)."""
    from transformers import PreTrainedModel

    if isinstance(module, PreTrainedModel):
        return module
    base = module.get_base_model() if hasattr(module, "get_base_model") else None
    if isinstance(base, PreTrainedModel):
        return base
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
