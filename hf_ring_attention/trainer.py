"""Context-parallel training with the transformers ``Trainer``: :class:`RingAttentionCallback`.

    ring = RingAttentionCallback(cp_size=2)
    trainer = Trainer(model, args, train_dataset=ds, eval_dataset=eval_ds,
                      data_collator=ring.data_collator(collator), callbacks=[ring])

A callback cannot touch the batches (the Trainer passes none to it), so the callback comes with
one companion piece, a collator wrapper: it shards each collated batch with ``shard_batch``. The
callback builds the dp x cp process mesh when the Trainer is created (so that the Trainer's data
loader deals one batch per context-parallel group), patches the model, refuses what cannot be
exact, and checks on the first steps that the ranks of a group received the same batch.

Exactness follows from the Trainer's own bookkeeping: it counts the targets of the sharded
``shift_labels`` on every rank and sums them over all processes (``num_items_in_batch`` over the
gradient-accumulation micro-batches and all replicas), and scales the loss by the number of
processes to undo DDP's averaging. In evaluation each rank's loss is scaled so that the Trainer's
mean over processes is the batch's token mean.
"""

from __future__ import annotations

from transformers import TrainerCallback, default_data_collator

from .cp import ContextParallelSetup


class RingAttentionCallback(TrainerCallback):
    """Trains a transformers model with ring attention across context-parallel groups.

    Args:
        cp_size (`int`, *optional*): ranks per context-parallel group (consecutive ranks);
            default: the ``HF_RING_ATTENTION_CP_SIZE`` environment variable, else every process.
        layout (`str`): ``"zigzag"`` (default), ``"contiguous"`` or ``"striped"``.
        backend (`str`, *optional*): kernel backend (see ``hf_ring_attention.kernels``).
        check_batches (`int`): on this many first forward passes, check that every rank of a
            group was given the same batch.
        chunked_loss (`bool` or `int`): compute the training loss over chunks of tokens, never
            holding the ``[tokens, vocab]`` logits (an int: the chunk size in tokens); training
            forwards then return no logits. See :func:`~hf_ring_attention.patch_model`.
        tiled_mlp (`bool` or `int`): run each decoder layer's MLP over chunks of tokens under
            recomputation (an int: the chunk size in tokens). See :func:`~hf_ring_attention.patch_model`.
    """

    def __init__(self, cp_size: int | None = None, layout: str = "zigzag", backend: str | None = None,
                 check_batches: int = 2, chunked_loss: bool | int = False, tiled_mlp: bool | int = False):
        self.cp = ContextParallelSetup(cp_size, layout, backend, check_batches,
                                       chunked_loss=chunked_loss, tiled_mlp=tiled_mlp)
        self._hook = None

    @property
    def group(self):
        """The context-parallel process group of this rank (once the Trainer is created)."""
        return self.cp.group

    def data_collator(self, collator=None) -> ShardingCollator:
        """The Trainer's ``data_collator``: ``collator`` (default: transformers'
        ``default_data_collator``) followed by ``shard_batch``."""
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
        # the Trainer's data loader then deals the same batch to the ranks of a cp group
        self.cp.install(AcceleratorState(), getattr(args, "parallelism_config", None))
        model = self.cp.prepare_model(model)
        if self._hook is None and self.cp.check_batches:
            self._hook = model.register_forward_pre_hook(self._check_batch, with_kwargs=True)

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer's final train_loss adds the loss accumulated since the last log *without*
        # averaging it over processes: fine for data parallelism, wrong for context parallelism
        # (each rank holds only its tokens' share). Logging at the last step averages it.
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True
        return control

    def _check_batch(self, module, args, kwargs):
        ring_batch = kwargs.get("ring_batch")
        if ring_batch is not None:
            self.cp.check_batch(ring_batch, device=kwargs["input_ids"].device)
        if self.cp.checked_all and self._hook is not None:
            self._hook.remove()
            self._hook = None


class ShardingCollator:
    """Collate features with ``collator``, then keep this rank's shard (``shard_batch``).

    ``num_items_in_batch`` is set for evaluation (the Trainer replaces it during training):
    the batch's target count divided by the group size, so that the mean of the ranks' losses,
    which the Trainer reports, is the batch's token-mean loss."""

    def __init__(self, callback: RingAttentionCallback, collator):
        self.callback, self.collator = callback, collator

    def __call__(self, features):
        batch = self.collator(features)
        batch = {k: v for k, v in batch.items() if v is not None}
        cp = self.callback.cp
        if cp.mesh is None:
            raise RuntimeError("pass the RingAttentionCallback to the Trainer's callbacks as well as its data_collator")
        local = cp.shard(batch)
        if "labels" in local:
            local["num_items_in_batch"] = max(local["ring_batch"].num_targets, 1) / cp.mesh.cp_size
        return local
