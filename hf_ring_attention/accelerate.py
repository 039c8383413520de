"""Context-parallel training with 🤗 Accelerate: :class:`ContextParallelPlugin`.

    accelerator = Accelerator(gradient_accumulation_steps=2)
    cp = ContextParallelPlugin(cp_size=2)
    model, optimizer, train_dl, scheduler = cp.prepare(accelerator, model, optimizer, train_dl, scheduler)
    for batch in train_dl:                          # this rank's shard of its group's batch
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()

Exactness: with W processes, gradient accumulation G, and N target tokens in the global batch
(all data-parallel replicas, all G micro-batches), each rank's loss is
``W * G * (sum of its token losses) / N``: ``accelerator.backward`` divides by G, DDP (or FSDP2
sharding over all W processes, see :mod:`hf_ring_attention.fsdp`) averages over W, and the result
is the gradient of the global token-mean loss. The loss of one
micro-batch, averaged over processes (``accelerator.reduce(loss, "mean")``) and then over the G
micro-batches, is that token mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from accelerate.scheduler import AcceleratedScheduler
from transformers import PreTrainedModel
from transformers.utils import logging

from . import _compat
from .cp import OPTIONS, ContextParallelSetup, CPMesh, check_engine

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

logger = logging.get_logger(__name__)


@dataclass
class ContextParallelPlugin:
    """Ring-attention context parallelism for an ``accelerate.Accelerator``.

    Args:
        cp_size (`int`, *optional*): ranks per context-parallel group (consecutive ranks);
            default: the ``HF_RING_ATTENTION_CP_SIZE`` environment variable, else every process.
            The ``world_size / cp_size`` groups are data-parallel replicas.
        layout (`str`): ``"zigzag"`` (default), ``"contiguous"`` or ``"striped"``.
        backend (`str`, *optional*): kernel backend (see ``hf_ring_attention.kernels``).
        check_batches (`bool`): check every batch (default): before its first ring the patched
            model all-gathers a checksum of the full batch over the group (with the ring's own
            check of its inputs: one small all-gather per batch and sliding window), and every
            rank raises if the ranks were given different batches. False trusts the ranks.
        chunked_loss (`bool` or `int`): compute the training loss over chunks of tokens, never
            holding the ``[tokens, vocab]`` logits (an int: the chunk size in tokens); training
            forwards then return no logits. See :func:`~hf_ring_attention.patch_model`.
        tiled_mlp (`bool` or `int`): run each decoder layer's MLP over chunks of tokens under
            recomputation (an int: the chunk size in tokens). See :func:`~hf_ring_attention.patch_model`.
    """

    cp_size: int | None = None
    layout: str = "zigzag"
    backend: str | None = None
    check_batches: bool = True
    chunked_loss: bool | int = False
    tiled_mlp: bool | int = False
    cp: ContextParallelSetup = field(init=False, repr=False)
    model: PreTrainedModel | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.cp = self._setup()

    def _setup(self, **changes) -> ContextParallelSetup:
        """A setup from the plugin's options (with ``changes``); it checks them."""
        return ContextParallelSetup(**{name: changes.get(name, getattr(self, name)) for name in OPTIONS})

    def __setattr__(self, name, value):
        # the options live in self.cp (shared with the callback's code): keep it in step, and
        # refuse a change that would come too late to take effect
        cp = self.__dict__.get("cp")
        if name in OPTIONS and cp is not None:
            if cp.mesh is not None:
                raise AttributeError(
                    f"ContextParallelPlugin.{name} cannot change after setup() or prepare(): the mesh "
                    f"and the patched model were built with {name}={getattr(self, name)!r}"
                )
            super().__setattr__("cp", self._setup(**{name: value}))  # checks value before it is set
        super().__setattr__(name, value)

    @property
    def mesh(self) -> CPMesh | None:
        """The dp x cp arrangement of the processes (after :meth:`setup`)."""
        return self.cp.mesh

    @property
    def group(self) -> ProcessGroup | None:
        """The context-parallel process group of this rank (after :meth:`setup`)."""
        return self.cp.group

    def setup(self, accelerator) -> CPMesh:
        """Build the dp x cp process mesh and make ``accelerator`` deal batches by cp group.
        Called by :meth:`prepare`; call it yourself before ``accelerator.prepare`` if you
        prepare objects separately."""
        if self.cp.mesh is not None:
            return self.cp.mesh
        mesh = self.cp.install(accelerator.state, getattr(accelerator, "parallelism_config", None))
        if mesh.mesh is not None:
            config = accelerator.dataloader_config
            if config.dispatch_batches:
                raise ValueError("dispatch_batches=True ignores context-parallel groups; use dispatch_batches=False")
            config.dispatch_batches = False
        if accelerator.is_main_process:
            logger.info(f"context parallel: {mesh.cp_size} ranks per group, "
                        f"{mesh.dp_size} data-parallel groups, layout={self.layout}")
        return mesh

    def prepare(self, accelerator, *objects):
        """``accelerator.prepare(*objects)`` with context parallelism: models are patched for
        ring attention (and checked), data loaders yield this rank's shard of each batch with the
        exact loss normalisation, and schedulers step once per data-parallel batch."""
        mesh = self.setup(accelerator)
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                self.model = self.cp.prepare_model(obj)
        if self.model is None and any(isinstance(o, torch.utils.data.DataLoader) for o in objects):
            raise ValueError(
                "prepare the model with (or before) the data loaders: batches are sharded for a "
                "model patched for ring attention, and an unpatched model would attend within shards"
            )
        prepared = _prepare(accelerator, objects)
        for i, obj in enumerate(prepared):
            if isinstance(obj, torch.nn.Module):
                self.cp.check_reduction(obj)
            elif isinstance(obj, torch.utils.data.DataLoader):
                prepared[i] = ShardedDataLoader(obj, self, accelerator, self.model)
            elif isinstance(obj, AcceleratedScheduler):
                prepared[i] = _DataParallelScheduler(obj, mesh.dp_size)
        return prepared[0] if len(prepared) == 1 else tuple(prepared)


def _prepare(accelerator, objects) -> list:
    """``accelerator.prepare(*objects)``, except for models the user already sharded with
    ``fully_shard`` while accelerate itself does not apply FSDP2 (e.g. ``Accelerator(cpu=True)``):
    accelerate would wrap those in DDP, which refuses DTensor parameters, and FSDP already reduces
    their gradients; they get autocast and compilation only (``evaluation_mode=True``)."""
    from .fsdp import is_fully_sharded

    fsdp2 = check_engine(accelerator.state)
    own = {i for i, obj in enumerate(objects)
           if isinstance(obj, torch.nn.Module) and not fsdp2 and is_fully_sharded(obj)}
    rest = [obj for i, obj in enumerate(objects) if i not in own]
    done = accelerator.prepare(*rest) if rest else []
    done = iter(list(done) if isinstance(done, (tuple, list)) else [done])
    return [accelerator.prepare_model(obj, evaluation_mode=True) if i in own else next(done)
            for i, obj in enumerate(objects)]


class ShardedDataLoader:
    """Wraps a prepared data loader: yields ``shard_batch`` of each batch with
    ``num_items_in_batch = N / (W * G)`` (see the module docstring), where N counts the targets of
    the G micro-batches of one optimizer step over all data-parallel replicas (G = 1 when the
    model is in eval mode). Everything else is delegated to the wrapped loader."""

    def __init__(self, dataloader, plugin: ContextParallelPlugin, accelerator, model=None):
        self.dataloader, self.plugin, self.accelerator, self.model = dataloader, plugin, accelerator, model

    def __len__(self):
        return len(self.dataloader)

    def __getattr__(self, name):
        return getattr(self.dataloader, name)

    def skip_first_batches(self, num_batches: int) -> ShardedDataLoader:
        """This loader without its first ``num_batches`` batches of the current epoch (as the
        wrapped loader counts them, on each process), to resume mid-epoch; accelerate's
        ``skip_first_batches`` skips them in the sampler, without loading them. Keep
        ``num_batches`` a multiple of the gradient accumulation steps, so that optimizer steps
        group the same micro-batches as in the run that is resumed."""
        skipped = self.accelerator.skip_first_batches(self.dataloader, num_batches)
        return ShardedDataLoader(skipped, self.plugin, self.accelerator, self.model)

    def __iter__(self):
        accumulate = self.accelerator.gradient_accumulation_steps
        if self.model is not None and not self.model.training:
            accumulate = 1
        batches = iter(self.dataloader)
        while True:
            group, last = self._next_group(batches, accumulate)
            if not group:
                return
            sharded, total = self._shard_group(group)
            scale = self.accelerator.num_processes * accumulate
            for i, local in enumerate(sharded):
                if last:  # tell accelerate's gradient accumulation where the loader really ends
                    _compat.announce_end_of_dataloader(self.dataloader, i == len(sharded) - 1)
                if "labels" in local:
                    local["num_items_in_batch"] = max(total, 1.0) / scale
                yield local
            if last:
                for _ in batches:  # let the wrapped loader finish its own bookkeeping
                    raise RuntimeError("the data loader yielded a batch after announcing its end")
                return

    def _shard_group(self, group):
        """Shard the micro-batches of one step and count their targets over all replicas. One
        all-reduce carries the count and whether any rank failed to shard, so that bad data
        raises on every rank instead of leaving the others waiting in a collective."""
        cp, error = self.plugin.cp, None
        try:
            sharded = [cp.shard(b) for b in group]
            count = sum(local["ring_batch"].num_targets for local in sharded)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks learn of it
            sharded, count, error = None, 0, exc
        stats = torch.tensor([float(count), float(error is not None)], dtype=torch.float64, device=self.accelerator.device)
        stats = self.accelerator.reduce(stats, "sum").tolist()
        if error is not None:
            raise error
        if stats[1]:
            raise ValueError(f"{int(stats[1])} rank(s) could not shard their batch (see their error)")
        # every rank of a context-parallel group counted the same batches
        return sharded, stats[0] / cp.mesh.cp_size

    def _next_group(self, batches, size):
        """Up to ``size`` batches, stopping early at the end of the loader (without asking the
        wrapped loader past its last batch, so it stays active for gradient accumulation)."""
        group = []
        for _ in range(size):
            try:
                group.append(next(batches))
            except StopIteration:
                return group, False
            if _compat.at_end_of_dataloader(self.dataloader):
                return group, True
        return group, False


class _DataParallelScheduler:
    """An ``AcceleratedScheduler`` that advances once per data-parallel replica per optimizer
    step (accelerate's default advances once per *process*, which over-counts the ranks of a
    context-parallel group that share one batch)."""

    def __init__(self, scheduler, dp_size: int):
        self.scheduler, self.dp_size = scheduler, dp_size

    def __getattr__(self, name):
        return getattr(self.scheduler, name)

    def step(self, *args, **kwargs):
        _compat.step_scheduler(self.scheduler, self.dp_size, *args, **kwargs)

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict):
        return self.scheduler.load_state_dict(state_dict)
