"""Safetensors I/O for ``add_adapters`` models: ``save_adapters``, ``load_adapters``.

One ``.safetensors`` file holds the adapters' parameters and the task head's, by their names in
the model, with the options in its metadata so that ``load_adapters`` can first inject the same
adapters into a fresh model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Union

import torch
import torch.nn as nn

from .architectures import is_head
from .hooks import ATTACHED_NAME, add_adapters, adapted_modules, head_names

SAFETENSORS_NAME = "adapterfast.safetensors"
_METADATA_KEY = "adapterfast_config"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' parameters and the task head's, by their names in ``model``."""
    opts = getattr(model, "adapterfast_config", None)
    if opts is None or not adapted_modules(model):
        raise ValueError("this model has no adapterfast adapters (add them with add_adapters)")
    heads = head_names(opts)
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner = name.rsplit(".", 1)[0]
        if f".{ATTACHED_NAME}." in f".{name}" or (heads and is_head(owner, heads)):
            state[name] = tensor
    return state


def _file_path(path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    return path if path.endswith(".safetensors") else os.path.join(path, SAFETENSORS_NAME)


def save_adapters(model: nn.Module, path: Union[str, os.PathLike]) -> str:
    """Saves the adapters (and the task head) of an ``add_adapters`` model as safetensors.

    ``path`` is a ``.safetensors`` file or a directory (created; the file is ``adapterfast.safetensors``
    inside). The adapter options are stored in the file's metadata, so ``load_adapters`` can
    inject the same adapters into a fresh model. Returns the file written.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    target = _file_path(path)
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    metadata = {"format": "pt", _METADATA_KEY: json.dumps(dataclasses.asdict(model.adapterfast_config))}
    save_file(tensors, target, metadata=metadata)
    return target


def load_adapters(model: nn.Module, path: Union[str, os.PathLike], *, strict: bool = True) -> nn.Module:
    """Loads adapters saved by ``save_adapters`` into ``model``; returns ``model``.

    A model without adapters gets them first (``add_adapters`` with the saved options). With
    ``strict`` every saved tensor must find its parameter and every adapter parameter a tensor.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    target = _file_path(path)
    with safe_open(target, framework="pt") as f:
        metadata = f.metadata() or {}
    if _METADATA_KEY not in metadata:
        raise ValueError(f"{target} was not written by adapterfast.save_adapters (no {_METADATA_KEY} metadata)")
    if not adapted_modules(model):
        add_adapters(model, json.loads(metadata[_METADATA_KEY]))
    tensors = load_file(target)
    own = adapter_state_dict(model)
    unexpected = sorted(set(tensors) - set(own))
    missing = sorted(set(own) - set(tensors))
    if strict and (unexpected or missing):
        raise ValueError(f"adapter weights in {target} do not fit the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name in own:
                if own[name].shape != tensor.shape:
                    raise ValueError(f"{name}: saved shape {tuple(tensor.shape)}, model has {tuple(own[name].shape)}")
                own[name].copy_(tensor)
    return model
