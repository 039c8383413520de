"""Sequence-parallel training with 🤗 Accelerate: :class:`SequenceParallelPlugin`.

    accelerator = Accelerator(gradient_accumulation_steps=2)
    sp = SequenceParallelPlugin(sp_size=2)
    model, optimizer, train_dl, scheduler = sp.prepare(accelerator, model, optimizer, train_dl, scheduler)
    for batch in train_dl:                          # this rank's shard of its group's batch
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()

Exactness: with W processes, gradient accumulation G, and N target tokens in the global batch
(all data-parallel replicas, all G micro-batches), each rank's loss is
``W * G * (sum of its token losses) / N``: ``accelerator.backward`` divides by G, DDP averages
over W, and the result is the gradient of the global token-mean loss. The loss of one
micro-batch, averaged over processes (``accelerator.reduce(loss, "mean")``) and then over the G
micro-batches, is that token mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate.scheduler import AcceleratedScheduler
from transformers import PreTrainedModel
from transformers.utils import logging

from .layout import check_layout
from .parallel import ParallelLayout, check_trainable
from .transformers import check_same_batch, patch_model, shard_batch

logger = logging.get_logger(__name__)


@dataclass
class SequenceParallelPlugin:
    """Ring-attention sequence parallelism for an ``accelerate.Accelerator``.

    Args:
        sp_size (`int`, *optional*): ranks per sequence-parallel group (consecutive ranks);
            default: the ``HF_RING_ATTENTION_SP_SIZE`` environment variable, else every process.
            The ``world_size / sp_size`` groups are data-parallel replicas.
        layout (`str`): ``"zigzag"`` (default), ``"contiguous"`` or ``"striped"``.
        backend (`str`, *optional*): kernel backend (see ``hf_ring_attention.kernels``).
        check_batches (`int`): on this many first batches, check (one all-gather of a checksum)
            that every rank of a group was given the same batch.
    """

    sp_size: int | None = None
    layout: str = "zigzag"
    backend: str | None = None
    check_batches: int = 2
    parallel: ParallelLayout | None = field(default=None, init=False, repr=False)
    model: PreTrainedModel | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        check_layout(self.layout)
        if self.check_batches < 0:
            raise ValueError(f"check_batches must be >= 0, got {self.check_batches}")

    @property
    def group(self):
        """The sequence-parallel process group of this rank (after :meth:`prepare`)."""
        return self.parallel.group() if self.parallel is not None else None

    def setup(self, accelerator) -> ParallelLayout:
        """Build the dp x sp process layout and make ``accelerator`` deal batches by sp group.
        Called by :meth:`prepare`; call it yourself before ``accelerator.prepare`` if you
        prepare objects separately."""
        if self.parallel is not None:
            return self.parallel
        self.parallel = ParallelLayout.install(self.sp_size, accelerator.state,
                                               getattr(accelerator, "parallelism_config", None))
        if self.parallel.mesh is not None:
            config = accelerator.dataloader_config
            if config.dispatch_batches:
                raise ValueError("dispatch_batches=True ignores sequence-parallel groups; use dispatch_batches=False")
            config.dispatch_batches = False
        if accelerator.is_main_process:
            logger.info(f"sequence parallel: {self.parallel.sp_size} ranks per group, "
                        f"{self.parallel.dp_size} data-parallel groups, layout={self.layout}")
        return self.parallel

    def prepare(self, accelerator, *objects):
        """``accelerator.prepare(*objects)`` with sequence parallelism: models are patched for
        ring attention (and checked), data loaders yield this rank's shard of each batch with the
        exact loss normalisation, and schedulers step once per data-parallel batch."""
        parallel = self.setup(accelerator)
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                model = _transformers_model(obj)
                check_trainable(model)
                patch_model(model, group=self.group, layout=self.layout, backend=self.backend)
                self.model = model
        if self.model is None and any(isinstance(o, torch.utils.data.DataLoader) for o in objects):
            raise ValueError(
                "prepare the model with (or before) the data loaders: batches are sharded for a "
                "model patched for ring attention, and an unpatched model would attend within shards"
            )
        prepared = accelerator.prepare(*objects)
        prepared = list(prepared) if isinstance(prepared, (tuple, list)) else [prepared]
        for i, obj in enumerate(prepared):
            if isinstance(obj, torch.utils.data.DataLoader):
                prepared[i] = ShardedDataLoader(obj, self, accelerator, self.model)
            elif isinstance(obj, AcceleratedScheduler):
                prepared[i] = _DataParallelScheduler(obj, parallel.dp_size)
        return prepared[0] if len(prepared) == 1 else tuple(prepared)


def _transformers_model(module) -> PreTrainedModel:
    """The transformers model inside ``module`` (itself, or the base model of a PEFT model)."""
    if isinstance(module, PreTrainedModel):
        return module
    base = module.get_base_model() if hasattr(module, "get_base_model") else None
    if isinstance(base, PreTrainedModel):
        return base
    raise TypeError(
        f"SequenceParallelPlugin patches transformers models for ring attention; got "
        f"{type(module).__name__}. Pass the PreTrainedModel (before torch.compile or other wrappers)."
    )


class ShardedDataLoader:
    """Wraps a prepared data loader: yields ``shard_batch`` of each batch with
    ``num_items_in_batch = N / (W * G)`` (see the module docstring), where N counts the targets of
    the G micro-batches of one optimizer step over all data-parallel replicas (G = 1 when the
    model is in eval mode). Everything else is delegated to the wrapped loader."""

    def __init__(self, dataloader, plugin: SequenceParallelPlugin, accelerator, model=None):
        self.dataloader, self.plugin, self.accelerator, self.model = dataloader, plugin, accelerator, model
        self._checked = 0

    def __len__(self):
        return len(self.dataloader)

    def __getattr__(self, name):
        return getattr(self.dataloader, name)

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
                if last and hasattr(self.dataloader, "end_of_dataloader"):
                    # tell accelerate's gradient accumulation where the loader really ends
                    self.dataloader.end_of_dataloader = i == len(sharded) - 1
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
        plugin, error = self.plugin, None
        try:
            sharded = [shard_batch(b, group=plugin.group, layout=plugin.layout) for b in group]
            count = sum(local["ring_batch"].num_targets for local in sharded)
        except ValueError as exc:
            sharded, count, error = None, 0, exc
        stats = torch.tensor([float(count), float(error is not None)], dtype=torch.float64, device=self.accelerator.device)
        stats = self.accelerator.reduce(stats, "sum").tolist()
        if error is not None:
            raise error
        if stats[1]:
            raise ValueError(f"{int(stats[1])} rank(s) could not shard their batch (see their error)")
        if self._checked < plugin.check_batches:
            check_same_batch(sharded[0]["ring_batch"], device=self.accelerator.device)
            self._checked += 1
        # every rank of a sequence-parallel group counted the same batches
        return sharded, stats[0] / plugin.parallel.sp_size

    def _next_group(self, batches, size):
        """Up to ``size`` batches, stopping early at the end of the loader (without asking the
        wrapped loader past its last batch, so it stays active for gradient accumulation)."""
        group = []
        for _ in range(size):
            try:
                group.append(next(batches))
            except StopIteration:
                return group, False
            if getattr(self.dataloader, "end_of_dataloader", False):
                return group, True
        return group, False


class _DataParallelScheduler:
    """An ``AcceleratedScheduler`` that advances once per data-parallel replica per optimizer
    step (accelerate's default advances once per *process*, which over-counts the ranks of a
    sequence-parallel group that share one batch)."""

    def __init__(self, scheduler, dp_size: int):
        self.scheduler, self.dp_size = scheduler, dp_size

    def __getattr__(self, name):
        return getattr(self.scheduler, name)

    def step(self, *args, **kwargs):
        s = self.scheduler
        if s.split_batches or not s.step_with_optimizer or not s.gradient_state.sync_gradients:
            return s.step(*args, **kwargs)
        if any(opt.step_was_skipped for opt in s.optimizers):
            return None
        for _ in range(self.dp_size):
            # as accelerate does: OneCycleLR raises when stepped past its total_steps
            if s.scheduler._step_count <= getattr(s.scheduler, "total_steps", float("inf")):
                s.scheduler.step(*args, **kwargs)
        return None

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict):
        return self.scheduler.load_state_dict(state_dict)
