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


# ------------------------------------------------------------------------------------- torch
# Checked against torch 2.11 and 2.13.


def module_has_hooks(module) -> bool:
    """Whether forward hooks or pre-hooks are registered on ``module`` itself (torch keeps them
    in private ordered dicts; global hooks are not counted)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


# -------------------------------------------------------------------------------- accelerate
# Checked against accelerate 1.10.0 and 1.15.0.


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


# ------------------------------------------------------------------------------------ probes
def _probe_config() -> bool:
    from transformers import PretrainedConfig

    return hasattr(PretrainedConfig(), "_attn_implementation_internal")


def _probe_mask_function() -> bool:
    return callable(padding_mask_function())


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
    "accelerate AcceleratorState.device_mesh": _probe_state_mesh,
    "accelerate DataLoaderShard.end_of_dataloader": _probe_end_of_dataloader,
    "accelerate AcceleratedScheduler internals (split_batches, step_with_optimizer, gradient_state."
    "sync_gradients, optimizers[].step_was_skipped) and torch LRScheduler._step_count": _probe_scheduler,
}
