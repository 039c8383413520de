"""Every read or write of another library's private or undocumented attributes, in one place.

Each function names the versions it was checked against. ``PROBES`` lists them all as checks
that ``tests/test_compat.py`` runs against the installed versions, so that a release that drops
one fails loudly, naming the attribute, instead of failing somewhere deep inside training.
"""

from __future__ import annotations

from typing import Callable

# ------------------------------------------------------------------------------ transformers
# Checked against transformers 5.0.0 and 5.24.0.


def requested_attn_implementation(config) -> str | None:
    """The attention implementation a config was explicitly given (None: transformers' default
    resolution). ``config._attn_implementation`` resolves None to a default, which would not
    restore the config exactly."""
    return config._attn_implementation_internal


def restore_attn_implementation(config, value: str | None) -> None:
    """Put back what :func:`requested_attn_implementation` returned. ``set_attn_implementation``
    cannot restore None (it resolves it) and re-checks kernels, so the field is written."""
    config._attn_implementation_internal = value


def padding_mask_function():
    """transformers' mask function of the flash-attention path: the 2-D padding mask (None without
    padding). Registering it for our name makes transformers pass that mask to the ring."""
    from transformers.masking_utils import flash_attention_mask

    return flash_attention_mask


def initialising_trainer(callback):
    """The ``Trainer`` whose ``__init__`` is running ``callback.on_init_end``, found on the call
    stack (``Trainer.__init__`` -> ``CallbackHandler.on_init_end`` -> ``call_event`` -> the
    callback), or None. Callbacks are not handed the Trainer, but the callback must wrap its data
    collator: TRL's ``SFTTrainer`` refuses a user collator in its padding-free modes."""
    import sys

    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and callback in getattr(owner.callback_handler, "callbacks", ()):
            return owner
        frame = frame.f_back
    return None


def passes_kwargs_to_attention(model_class) -> bool:
    """Whether transformers declares that ``model_class`` passes the keyword arguments of its
    ``forward`` through every module to the attention function (``_supports_attention_backend``,
    read through the public classmethod ``is_backend_compatible``). True when it cannot tell."""
    check = getattr(model_class, "is_backend_compatible", None)
    return True if check is None else bool(check())


def can_switch_attention(model_class) -> bool:
    """Whether ``set_attn_implementation`` really switches ``model_class`` (transformers only
    warns, and leaves the config unchanged, when its attention does not look its function up in
    ``ALL_ATTENTION_FUNCTIONS``; ``_can_set_attn_implementation`` reads the modeling source)."""
    check = getattr(model_class, "_can_set_attn_implementation", None)
    return True if check is None else bool(check())


def loss_type(model) -> str | None:
    """The kind of head transformers derived from the class name (``"ForCausalLM"``,
    ``"ForSequenceClassification"``, ...; None for base models and ``...LMHeadModel``)."""
    return getattr(model, "loss_type", None)


# -------------------------------------------------------------------------------- accelerate
# Checked against accelerate 1.10.0, 1.10.1 and 1.15.0.


def accelerator_mesh(state):
    """The device mesh accelerate's data loaders read to deal batches (``AcceleratorState``)."""
    return state.device_mesh


def set_accelerator_mesh(state, mesh) -> None:
    """Install ``mesh`` on accelerate's shared state: its data loader then gives every rank of a
    ``"cp"`` group the same batch and different ``"dp_replicate"`` groups different batches."""
    state.device_mesh = mesh


def at_end_of_dataloader(loader) -> bool:
    """Whether an accelerate ``DataLoaderShard`` has announced its last batch (read by
    ``Accelerator.accumulate`` to force a gradient sync there)."""
    return bool(getattr(loader, "end_of_dataloader", False))


def announce_end_of_dataloader(loader, value: bool) -> None:
    """Set accelerate's end-of-data flag when batches are re-grouped in front of the loader."""
    if hasattr(loader, "end_of_dataloader"):
        loader.end_of_dataloader = value


def step_scheduler(scheduler, times: int, *args, **kwargs) -> None:
    """Step an ``AcceleratedScheduler`` ``times`` times per optimizer step, following
    accelerate's own rules: step plainly when it does not follow the optimizer or when gradients
    are not synchronised yet; skip when the optimizer skipped its step (fp16 overflow); never
    step OneCycleLR past its ``total_steps`` (it raises). ``_step_count`` is torch's
    (``LRScheduler``, checked against torch 2.11 and 2.13)."""
    if scheduler.split_batches or not scheduler.step_with_optimizer or not scheduler.gradient_state.sync_gradients:
        scheduler.step(*args, **kwargs)
        return
    if any(opt.step_was_skipped for opt in scheduler.optimizers):
        return
    inner = scheduler.scheduler
    for _ in range(times):
        if inner._step_count <= getattr(inner, "total_steps", float("inf")):
            inner.step(*args, **kwargs)


def set_parallelism_config(state, config) -> None:
    """Install ``config`` as accelerate's parallelism configuration (``AcceleratorState``), which
    its FSDP2 preparation reads (``fsdp2_prepare_model`` shards over
    ``device_mesh[parallelism_config.fsdp_dim_names]``)."""
    state.parallelism_config = config


# ------------------------------------------------------------------------------------- torch
# Checked against torch 2.11 and 2.13.


def module_has_hooks(module) -> bool:
    """Whether forward hooks or pre-hooks are registered on ``module`` itself (torch keeps them
    in private ordered dicts; global hooks are not counted)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def flatten_mesh(mesh, dims: tuple[str, ...], name: str):
    """Flatten dimensions ``dims`` of a ``DeviceMesh`` into one named ``name`` (reachable from the
    root mesh as ``mesh[name]``), as accelerate does for its ``dp_shard_cp`` dimension."""
    return mesh[dims]._flatten(name)


def group_timeout(group=None):
    """The timeout ``group`` (default: the default process group) was created with: what
    ``init_process_group(timeout=...)`` or accelerate's ``InitProcessGroupKwargs`` set. None where
    it cannot be read (backends other than gloo and NCCL have no options). Checked against torch
    2.11 and 2.13."""
    import torch.distributed as dist

    group = dist.distributed_c10d._get_default_group() if group is None else group
    for device in group._device_types:
        try:
            timeout = group._get_backend(device).options._timeout
        except (AttributeError, RuntimeError):
            continue
        if timeout is not None:
            return timeout
    return None


def inherit_timeout(groups) -> None:
    """Give ``groups`` the default process group's timeout (torch gives the groups of a device
    mesh its built-in default instead: 30 minutes for gloo, 10 for NCCL); a backend that cannot
    change its timeout keeps its own."""
    timeout = group_timeout()
    for group in groups if timeout is not None else ():
        try:
            group.set_timeout(timeout)
        except RuntimeError:
            pass


def fsdp_gradient_divide_factors(module) -> list[float | None]:
    """The gradient divide factor of each parameter group of an FSDP2 module: None means the
    default, the number of ranks the gradient is reduced over (``set_gradient_divide_factor`` has
    a setter only)."""
    return [group.gradient_divide_factor for group in module._get_fsdp_state()._fsdp_param_groups]


# ------------------------------------------------------------------------------------ probes
def _probe_config() -> bool:
    from transformers import PretrainedConfig

    return hasattr(PretrainedConfig(), "_attn_implementation_internal")


def _probe_mask_function() -> bool:
    return callable(padding_mask_function())


def _probe_initialising_trainer() -> bool:
    import tempfile

    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    found = []

    class Probe(TrainerCallback):
        def on_init_end(self, args, state, control, **kwargs):
            found.append(initialising_trainer(self))

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, report_to=[], use_cpu=True)
        trainer = Trainer(model=torch.nn.Linear(1, 1), args=args, callbacks=[Probe()])
    return found == [trainer] and hasattr(trainer, "data_collator")


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))


def _probe_attention_capabilities() -> bool:
    from transformers import LlamaForCausalLM, PreTrainedModel

    return (hasattr(PreTrainedModel, "is_backend_compatible") and LlamaForCausalLM.is_backend_compatible() is True
            and hasattr(PreTrainedModel, "_can_set_attn_implementation")
            and LlamaForCausalLM._can_set_attn_implementation() is True)


def _probe_loss_type() -> bool:
    return loss_type(_tiny_llama()) == "ForCausalLM"


def _probe_state_mesh() -> bool:
    import inspect

    from accelerate import state

    return "self.device_mesh" in inspect.getsource(state.AcceleratorState)


def _probe_end_of_dataloader() -> bool:
    from accelerate.data_loader import DataLoaderShard

    return hasattr(DataLoaderShard, "end_of_dataloader")


def _probe_scheduler() -> bool:
    import torch
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    inner = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    wrapped = AcceleratedScheduler(inner, opt)
    fields = ("split_batches", "step_with_optimizer", "gradient_state", "optimizers", "scheduler")
    return (all(hasattr(wrapped, f) for f in fields) and hasattr(wrapped.gradient_state, "sync_gradients")
            and isinstance(getattr(inner, "_step_count", None), int)
            and isinstance(getattr(AcceleratedOptimizer, "step_was_skipped", None), property))


def _probe_parallelism_config() -> bool:
    import inspect

    from accelerate import state

    return "self.parallelism_config = parallelism_config" in inspect.getsource(state.AcceleratorState)


def _probe_flatten() -> bool:
    from torch.distributed.device_mesh import DeviceMesh

    return callable(getattr(DeviceMesh, "_flatten", None))


def _probe_fsdp_divide_factor() -> bool:
    import inspect

    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    return (callable(getattr(FSDPModule, "_get_fsdp_state", None))
            and "self._fsdp_param_groups" in inspect.getsource(FSDPState.__init__)
            and "self.gradient_divide_factor" in inspect.getsource(FSDPParamGroup.__init__))


def _probe_group_timeout() -> bool:
    import torch.distributed as dist

    return (callable(getattr(dist.distributed_c10d, "_get_default_group", None))
            and all(hasattr(dist.ProcessGroup, name) for name in ("_device_types", "_get_backend", "set_timeout"))
            and isinstance(getattr(dist.ProcessGroupGloo, "options", None), property)
            and hasattr(dist.ProcessGroupGloo._Options, "_timeout"))


def _probe_module_hooks() -> bool:
    import torch

    module = torch.nn.Linear(1, 1)
    before = module_has_hooks(module)
    handle = module.register_forward_hook(lambda *args: None)
    during = module_has_hooks(module)
    handle.remove()
    return not before and during and not module_has_hooks(module)


PROBES: dict[str, Callable[[], bool]] = {
    "torch Module._forward_hooks and _forward_pre_hooks": _probe_module_hooks,
    "transformers PretrainedConfig._attn_implementation_internal": _probe_config,
    "transformers.masking_utils.flash_attention_mask": _probe_mask_function,
    "transformers Trainer.__init__ calls callback_handler.on_init_end (the callback finds its Trainer)":
        _probe_initialising_trainer,
    "transformers PreTrainedModel.is_backend_compatible and _can_set_attn_implementation": _probe_attention_capabilities,
    "transformers PreTrainedModel.loss_type": _probe_loss_type,
    "accelerate AcceleratorState.device_mesh": _probe_state_mesh,
    "accelerate DataLoaderShard.end_of_dataloader": _probe_end_of_dataloader,
    "accelerate AcceleratedScheduler internals (split_batches, step_with_optimizer, gradient_state."
    "sync_gradients, optimizers[].step_was_skipped) and torch LRScheduler._step_count": _probe_scheduler,
    "accelerate AcceleratorState.parallelism_config": _probe_parallelism_config,
    "torch DeviceMesh._flatten": _probe_flatten,
    "torch ProcessGroup._device_types, _get_backend(device).options._timeout": _probe_group_timeout,
    "torch FSDPModule._get_fsdp_state()._fsdp_param_groups[].gradient_divide_factor": _probe_fsdp_divide_factor,
}
