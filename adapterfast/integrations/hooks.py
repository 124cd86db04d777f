"""``add_adapters``/``remove_adapters``: adapters in a transformers model by forward hooks, no PEFT.

Each adapted module keeps its type and its parameter names and gets an ``adapterfast`` child (an
``adapterfast.Adapter``, built by ``options.new_adapter``) that a forward (pre-)hook runs at the
site (``site_forward``), so the base model's state dict keys do not change. See ``hf.py`` for
the placements and what stays trainable.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..modules import Adapter
from .architectures import is_head, matches, model_type_of, resolve_target_modules
from .options import HEAD_MODULES, AdapterOptions, adapter_dtype, as_options, new_adapter
from .site_forward import (PARALLEL_INPUT, adapt_inputs, adapt_output, base_device_dtype, check_site,
                           feature_size, site_mode)

ATTACHED_NAME = "adapterfast"  # the child module add_adapters gives each adapted module


class _SiteHook:
    """A forward (pre-)hook running the ``adapterfast`` child of the hooked module at its site."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, module, args, kwargs, output=None):
        adapter = getattr(module, ATTACHED_NAME)
        if self.mode == PARALLEL_INPUT:
            return adapt_inputs(args, kwargs, [adapter])
        return adapt_output(self.mode, adapter, args, kwargs, output)

    def __repr__(self):
        return f"adapterfast site hook ({self.mode})"


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that ``add_adapters`` attached an adapter to, by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, ATTACHED_NAME, None), Adapter) and hasattr(m, "_adapterfast_hooks")}


def head_names(options: AdapterOptions) -> list[str]:
    """``modules_to_save`` plus the task type's head (``HEAD_MODULES``)."""
    heads = list(options.modules_to_save or [])
    for h in HEAD_MODULES.get(options.task_type or "", ()):
        if h not in heads:
            heads.append(h)
    return heads


def add_adapters(model: nn.Module, config=None, *, autocast_adapter_dtype: bool = True, **options) -> nn.Module:
    """Injects bottleneck adapters into ``model`` in place, freezes the base, and returns ``model``.

    ``config`` is an ``AdapterOptions``, a PEFT ``adapterfast.AdapterConfig`` or a dict; keywords
    override its fields (``add_adapters(model, r=8, placement="houlsby")``). Only the adapters and
    the task head (see ``hf.py``) stay trainable. A model that already has adapters is an error:
    ``remove_adapters`` first, or use PEFT for several named adapters.
    """
    opts = as_options(config, **options)
    if any(hasattr(m, "adapterfast_down") for m in model.modules()):
        raise ValueError("this model has adapterfast adapters from PEFT (get_peft_model); manage them with PEFT "
                         "(add_adapter, save_pretrained, PeftModel.from_pretrained)")
    if adapted_modules(model):
        raise ValueError("this model already has adapterfast adapters; call remove_adapters(model) first, "
                         "or use PEFT (get_peft_model / add_adapter) for several named adapters")
    targets = resolve_target_modules(opts, model_type_of(model), model)
    heads = head_names(opts)
    model_config = getattr(model, "config", None)
    sites = []
    for name, module in model.named_modules():
        if not name or is_head(name, heads) or not matches(targets, name):
            continue
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        sites.append((name, module))
    if not sites:
        raise ValueError(f"target_modules {targets!r} matched no module of {type(model).__name__}")

    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in sites:
        mode = site_mode(module, opts.placement)
        check_site(module, mode, name)
        d = feature_size(module, mode, model_config, name)
        device, dtype = base_device_dtype(module)
        adapter = new_adapter(d, opts, mode, device=device, dtype=adapter_dtype(dtype, autocast_adapter_dtype))
        adapter.train(module.training)
        module.add_module(ATTACHED_NAME, adapter)
        hook = _SiteHook(mode)
        if mode == PARALLEL_INPUT:
            handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            handle = module.register_forward_hook(hook, with_kwargs=True)
        module._adapterfast_hooks = [handle]
    for name, module in model.named_modules():
        if name and heads and is_head(name, heads):
            for p in module.parameters():
                p.requires_grad_(True)
    model.adapterfast_config = opts
    if hasattr(model, "enable_input_require_grads") and getattr(model, "_require_grads_hook", None) is None:
        try:
            model.enable_input_require_grads()
        except (NotImplementedError, AttributeError):
            pass
    return model


def remove_adapters(model: nn.Module) -> nn.Module:
    """Removes what ``add_adapters`` added (the base stays frozen); returns ``model``."""
    for module in adapted_modules(model).values():
        for handle in module._adapterfast_hooks:
            handle.remove()
        del module._adapterfast_hooks
        delattr(module, ATTACHED_NAME)
    if hasattr(model, "adapterfast_config"):
        del model.adapterfast_config
    return model


def describe(model: nn.Module) -> dict[str, Any]:
    """Counts of adapted sites and trainable parameters (a quick check after ``add_adapters``)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"sites": len(adapted_modules(model)), "trainable": trainable, "total": total}
