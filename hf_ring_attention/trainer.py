"""Context-parallel training with the transformers ``Trainer`` (and TRL's ``SFTTrainer``):
:class:`RingAttentionCallback`.

    ring = RingAttentionCallback(cp_size=2)
    trainer = Trainer(model, args, train_dataset=ds, eval_dataset=eval_ds, callbacks=[ring])

When the Trainer is created, the callback builds the dp x cp process mesh (so that the Trainer's
data loader deals one batch per context-parallel group), patches the model, refuses what cannot
be exact, and wraps the Trainer's data collator (yours, the Trainer's default, or TRL's, which TRL
does not let users replace in its padding-free modes) so that each collated batch is sharded with
``shard_batch``. Every batch is checked for being the same on the ranks of a group.

Exactness follows from the Trainer's own bookkeeping: it counts the targets of the sharded
``shift_labels`` on every rank and sums them over all processes (``num_items_in_batch`` over the
gradient-accumulation micro-batches and all replicas), and scales the loss by the number of
processes to undo DDP's averaging. In evaluation, every rank of a group reports the group's
token-mean loss for every batch (:func:`_group_eval_loss`).

The collator runs where the Trainer's data loader runs: in the main process
(``dataloader_num_workers=0``, which the callback requires), since sharding needs the process
group, which worker processes do not have.
"""

from __future__ import annotations

import torch
import torch.distributed
from transformers import TrainerCallback, default_data_collator
from transformers.utils import logging

from . import _compat
from .cp import ContextParallelSetup, check_engine
from .fsdp import is_fully_sharded

logger = logging.get_logger(__name__)


def _option(name: str) -> property:
    def get(self):
        return getattr(self.cp, name)

    def refuse(self, value):
        raise AttributeError(
            f"RingAttentionCallback.{name} is fixed at construction (the Trainer sets up the mesh and "
            f"the model with it): pass RingAttentionCallback({name}={value!r}, ...) instead"
        )

    return property(get, refuse, doc=f"The ``{name}`` option (read-only; see the class docstring).")


class RingAttentionCallback(TrainerCallback):
    """Trains a transformers model with ring attention across context-parallel groups.

    Pass it in the Trainer's ``callbacks``; it wraps the Trainer's data collator itself.

    Args:
        cp_size (`int`, *optional*): ranks per context-parallel group (consecutive ranks);
            default: the ``HF_RING_ATTENTION_CP_SIZE`` environment variable, else every process.
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

    cp_size = _option("cp_size")
    layout = _option("layout")
    backend = _option("backend")
    check_batches = _option("check_batches")
    chunked_loss = _option("chunked_loss")
    tiled_mlp = _option("tiled_mlp")

    def __init__(self, cp_size: int | None = None, layout: str = "zigzag", backend: str | None = None,
                 check_batches: bool = True, chunked_loss: bool | int = False, tiled_mlp: bool | int = False):
        self.cp = ContextParallelSetup(cp_size, layout, backend, check_batches,
                                       chunked_loss=chunked_loss, tiled_mlp=tiled_mlp)

    @property
    def group(self):
        """The context-parallel process group of this rank (once the Trainer is created)."""
        return self.cp.group

    def data_collator(self, collator=None) -> ShardingCollator:
        """``collator`` (default: transformers' ``default_data_collator``) followed by
        ``shard_batch``. The callback wraps the Trainer's collator by itself; this is for building
        the wrapped collator explicitly (passing it as the Trainer's ``data_collator`` is fine)."""
        return ShardingCollator(self, collator or default_data_collator)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        from accelerate.state import AcceleratorState

        if getattr(getattr(args, "accelerator_config", None), "dispatch_batches", None):
            raise ValueError(
                "accelerator_config.dispatch_batches=True sends every process a slice of one batch, "
                "ignoring context-parallel groups; set it to False"
            )
        if args.world_size > 1 and not args.average_tokens_across_devices:
            raise ValueError(
                "RingAttentionCallback needs average_tokens_across_devices=True: the target count "
                "of each rank's shard must be summed over all processes for an exact loss"
            )
        if model is None:
            raise ValueError("RingAttentionCallback needs the Trainer's model")
        if getattr(args, "dataloader_num_workers", 0):
            raise ValueError(
                f"RingAttentionCallback shards each batch in the data collator, which runs in the "
                f"data loader's worker processes when dataloader_num_workers > 0 (got "
                f"{args.dataloader_num_workers}); they have no context-parallel process group. Set "
                f"dataloader_num_workers=0 (collating a tokenized batch is cheap; tokenize in the "
                f"dataset, e.g. with datasets.map)."
            )
        state = AcceleratorState()
        if not check_engine(state) and is_fully_sharded(model):
            raise ValueError(
                "the model is wrapped with fully_shard but the Trainer does not use FSDP2: accelerate would "
                "wrap it in DDP, which refuses DTensor parameters. Let the Trainer apply FSDP2 "
                "(TrainingArguments(fsdp='full_shard', fsdp_config={'version': 2}); accelerate applies FSDP "
                "on GPUs only), or train the wrapped model with ContextParallelPlugin."
            )
        trainer = _compat.initialising_trainer(self)
        if trainer is None:
            raise RuntimeError(
                "RingAttentionCallback.on_init_end must be called by the Trainer it was passed to "
                "(Trainer(..., callbacks=[ring])); Trainer.add_callback after construction is too late"
            )
        # the Trainer's data loader then deals the same batch to the ranks of a cp group
        self.cp.install(state, getattr(args, "parallelism_config", None))
        self.cp.prepare_model(model)
        collator = trainer.data_collator
        if not (isinstance(collator, ShardingCollator) and collator.callback is self):
            trainer.data_collator = ShardingCollator(self, collator or default_data_collator)
        if self.cp.mesh.cp_size > 1 and not getattr(trainer.compute_loss, "ring_group_eval_loss", False):
            trainer.compute_loss = _group_eval_loss(trainer.compute_loss, self.cp)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # the Trainer scales the loss for an average over all processes: FSDP2 must reduce that way
        if model is not None:
            self.cp.check_reduction(model)

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer's final train_loss adds the loss accumulated since the last log *without*
        # averaging it over processes: fine for data parallelism, wrong for context parallelism
        # (each rank holds only its tokens' share). Logging at the last step averages it.
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True
        return control


def _group_eval_loss(compute_loss, cp):
    """The trainer's ``compute_loss`` (the Trainer's, or a subclass's such as TRL's), made exact in
    evaluation, where each rank holds only its share of a batch's loss:

    * it is given the group's target count when the Trainer gives none (TRL's trainers then divide
      each rank's loss by that rank's own targets: the mean of the ranks' token means, not the
      token mean), so that the loss is scaled as in training;
    * the ranks of a context-parallel group then return the same value, the group's token mean
      (one all-reduce per evaluation batch): the Trainer's evaluation loop gathers the losses of
      all processes and, at the last batch, keeps only as many as it believes there are samples
      left, which drops the shares of the group's other ranks.
    """

    def group_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        ring_batch = inputs.get("ring_batch")
        if model.training or ring_batch is None:
            return compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if num_items_in_batch is None:
            # the trainers multiply the loss by every process: the count covers every group
            num_items_in_batch = max(ring_batch.num_targets, 1) * cp.mesh.dp_size
        result = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = (result[0] if return_outputs else result).detach().clone()
        torch.distributed.all_reduce(loss, group=cp.group)
        loss /= cp.mesh.cp_size
        return (loss, *result[1:]) if return_outputs else loss

    group_compute_loss.ring_group_eval_loss = True
    return group_compute_loss


class ShardingCollator:
    """Collate features with ``collator``, then keep this rank's shard (``shard_batch``).

    ``num_items_in_batch`` is the batch's target count divided by the group size, for a model
    called on the collated batch directly: the ranks' losses then add up to the batch's token
    mean. The Trainer passes its own count instead (over all processes, in training and in
    evaluation)."""

    def __init__(self, callback: RingAttentionCallback, collator):
        self.callback, self.collator = callback, collator

    def __call__(self, features):
        batch = self.collator(features)
        batch = {k: v for k, v in batch.items() if v is not None}
        cp = self.callback.cp
        if cp.mesh is None:
            raise RuntimeError("pass the RingAttentionCallback to the Trainer's callbacks")
        local = cp.shard(batch)
        if "labels" in local:
            local["num_items_in_batch"] = max(local["ring_batch"].num_targets, 1) / cp.mesh.cp_size
        return local
