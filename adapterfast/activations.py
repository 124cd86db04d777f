"""Activation names: the canonical set the kernels implement, and the aliases that map onto it.

Every backend implements exactly the functions in ``ACTIVATIONS``; the aliases are the
transformers ``ACT2FN`` names (and common spellings) that compute the same function.
"""
from __future__ import annotations

import torch.nn as nn

ACTIVATIONS = (
    "relu",
    "gelu",
    "gelu_tanh",
    "silu",
    "tanh",
    "sigmoid",
    "leaky_relu",
    "identity",
    "quick_gelu",
)

# The one source of the activations' constants: the reference and the Triton kernels import these;
# tests/test_constants.py checks the C++ copies in csrc/activations.h against them.
LEAKY_RELU_SLOPE = 0.01
QUICK_GELU_ALPHA = 1.702  # quick_gelu(h) = h * sigmoid(1.702 h)

ALIASES = {
    "gelu_python": "gelu",
    "gelu_erf": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "swish": "silu",
    "linear": "identity",
    "none": "identity",
}


def canonical(name: str) -> str:
    """Returns the canonical activation name for ``name`` (case-insensitive), or raises ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"activation must be a string, got {type(name).__name__}")
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        known = sorted(set(ACTIVATIONS) | set(ALIASES))
        raise ValueError(f"unknown activation {name!r}; supported: {', '.join(known)}")
    return key


def from_module(module: nn.Module) -> str | None:
    """The canonical name of an activation module, or None if it is not one the op computes.

    Only exact types with the default parameters the kernels use are recognised (for example
    ``nn.LeakyReLU`` only with slope 0.01), so a conversion never changes the function.
    """
    kind = type(module)
    if kind is nn.ReLU:
        return "relu"
    if kind is nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if kind is nn.SiLU:
        return "silu"
    if kind is nn.Tanh:
        return "tanh"
    if kind is nn.Sigmoid:
        return "sigmoid"
    if kind is nn.Identity:
        return "identity"
    if kind is nn.LeakyReLU:
        return "leaky_relu" if module.negative_slope == LEAKY_RELU_SLOPE else None
    return _from_transformers(module)


def _from_transformers(module: nn.Module) -> str | None:
    names = {
        "GELUActivation": "gelu",
        "NewGELUActivation": "gelu_tanh",
        "FastGELUActivation": "gelu_tanh",
        "PytorchGELUTanh": "gelu_tanh",
        "GELUTanh": "gelu_tanh",
        "QuickGELUActivation": "quick_gelu",
        "SiLUActivation": "silu",
        "LinearActivation": "identity",
    }
    kind = type(module)
    if not kind.__module__.startswith("transformers."):
        return None
    return names.get(kind.__name__)
