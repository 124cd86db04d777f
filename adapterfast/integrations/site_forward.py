"""How an adapter meets the module it sits at: the site's mode, its feature size, and the forward.

Shared by the ``add_adapters`` hooks (``hooks.py``) and the PEFT layer (``peft.py``), which both
hand ``run_site``/``adapt_output`` their ``adapterfast.Adapter`` modules as branches. Modes:

- ``OUTPUT`` (pfeiffer, houlsby): ``y = module(...)``, then ``y + s f(y)`` (sequential);
- ``PARALLEL``: ``module(x) + s f(x)``, x the module's input (He et al. 2022);
- ``PARALLEL_INPUT``: BERT-style output blocks ``module(h, x)`` whose LayerNorm sits inside:
  the residual input becomes ``x + s f(x)``, which gives the same sum.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

OUTPUT = "output"                  # y = module(...); y + s f(y)              (sequential)
PARALLEL = "parallel"              # module(x) + s f(x), x the module's input  (parallel)
PARALLEL_INPUT = "parallel_input"  # module(h, x + s f(x)): BERT-style output blocks (parallel)

Branch = Callable[..., torch.Tensor]  # branch(x, residual=None) -> residual + s * f(x): an Adapter


def site_mode(module: nn.Module, placement: str) -> str:
    """How an adapter with this placement attaches to ``module`` (OUTPUT, PARALLEL or PARALLEL_INPUT)."""
    if placement != "parallel":
        return OUTPUT
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return PARALLEL
    return PARALLEL_INPUT if "input_tensor" in parameters else PARALLEL


def _hidden_size(model_config) -> Optional[int]:
    size = getattr(model_config, "hidden_size", None)
    if size is None and isinstance(model_config, dict):
        size = model_config.get("hidden_size") or model_config.get("n_embd") or model_config.get("dim")
    return size if isinstance(size, int) else None


def linear_sizes(module: nn.Module) -> tuple[Optional[int], Optional[int]]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or transformers ``Conv1D``, else ``(None, None)``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if hasattr(module, "nf") and isinstance(weight, torch.Tensor) and weight.dim() == 2:  # transformers Conv1D
        return weight.shape[0], weight.shape[1]
    return None, None


def feature_size(module: nn.Module, mode: str, model_config=None, name: str = "") -> int:
    """The adapter's ``d``: the size of the features it reads and writes at this site."""
    d_in, d_out = linear_sizes(module)
    if d_in is not None:
        return d_out if mode == OUTPUT else d_in
    if isinstance(module, nn.Embedding) and mode == OUTPUT:
        return module.embedding_dim
    size = _hidden_size(model_config)
    if size is None:
        size = getattr(module, "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"cannot tell the feature size of {name or type(module).__name__} ({type(module).__name__}): "
                         "it is not an nn.Linear/Conv1D and the model config has no hidden_size")
    return size


def check_site(module: nn.Module, mode: str, name: str) -> None:
    """A parallel adapter computes ``module(x) + s * f(x)``: ``module`` must map d features to d."""
    if mode != PARALLEL:
        return
    d_in, d_out = linear_sizes(module)
    if d_in is not None and d_in != d_out:
        raise ValueError(f"placement='parallel' cannot go on {name} ({type(module).__name__}, {d_in} -> {d_out} "
                         f"features): a parallel adapter adds s * f(x) to the module's output, so its input and "
                         "output sizes must match. Target the whole MLP block (the default sites do), or use "
                         "placement='pfeiffer'/'houlsby' on this layer")


def base_device_dtype(module: nn.Module) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
    """Device and floating dtype of the first floating parameter (or buffer) of ``module``."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "x", "input", "inputs"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    raise ValueError("a parallel adapter needs the block's input as its first argument (or hidden_states=)")


def _on_first(output, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Applies ``fn`` to the output tensor, or to the first element of a tuple/list output."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return type(output)([fn(output[0]), *output[1:]])
    raise TypeError(f"an adapter can act on a tensor output (or the first element of a tuple), "
                    f"got {type(output).__name__}")


def adapt_inputs(args: tuple, kwargs: dict, branches: Sequence[Branch]) -> tuple[tuple, dict]:
    """PARALLEL_INPUT: replaces the block's residual input x (``input_tensor``) by x + sum_i s_i f_i(x)."""
    if not branches:
        return args, kwargs
    if "input_tensor" in kwargs:
        x = kwargs["input_tensor"]
    elif len(args) >= 2:
        x = args[1]
    else:
        raise ValueError("a parallel adapter on a BERT-style output block needs its residual input "
                         "(input_tensor) as the second argument or as input_tensor=")
    y = x
    for branch in branches:
        y = branch(x, residual=y)
    if "input_tensor" in kwargs:
        return args, {**kwargs, "input_tensor": y}
    return (args[0], y, *args[2:]), kwargs


def adapt_output(mode: str, branch: Branch, args: tuple, kwargs: dict, output):
    """OUTPUT: ``y + s f(y)``; PARALLEL: ``y + s f(x)`` with x the block's input (cast to y's dtype)."""
    if mode == OUTPUT:
        return _on_first(output, branch)
    if mode == PARALLEL:
        x = _first_input(args, kwargs)
        return _on_first(output, lambda y: branch(x.to(y.dtype), residual=y))
    raise ValueError(f"unknown adapter mode {mode!r}")


def run_site(base: nn.Module, args: tuple, kwargs: dict, adapters: Sequence[tuple[str, Branch]]):
    """Calls ``base`` with the given adapters (mode, branch) applied, in order."""
    args, kwargs = adapt_inputs(args, kwargs, [b for mode, b in adapters if mode == PARALLEL_INPUT])
    output = base(*args, **kwargs)
    for mode, branch in adapters:
        if mode != PARALLEL_INPUT:
            output = adapt_output(mode, branch, args, kwargs, output)
    return output
