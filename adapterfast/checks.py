"""The input checks ``fused_adapter`` and ``grouped_adapter`` share: each names the argument that is
wrong and what was expected, as a ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong
shape, device or value). Only the slow path runs them: ``functional.py`` first tries a few
attribute reads that accept the common case."""
from __future__ import annotations

import numbers

from torch import Tensor


def describe(t: Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def check_floats(named) -> None:
    """Each ``(name, tensor, optional)`` is a floating-point tensor (or None where optional)."""
    for name, t, optional in named:
        if t is None and optional:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_features(x: Tensor) -> int:
    """x's feature size ``d`` (its last dimension), which must be at least 1."""
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a last (feature) dimension of size >= 1, got shape {tuple(x.shape)}")
    return x.shape[-1]


def check_residual(x: Tensor, residual, *, any_dtype: bool = False) -> None:
    """``residual`` is None or has x's shape (and x's dtype unless ``any_dtype``, as under autocast)."""
    if residual is None:
        return
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype and not any_dtype:
        raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")


def check_devices(x: Tensor, named) -> None:
    """Each ``(name, tensor)`` that is not None is on x's device."""
    for name, t in named:
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: x {describe(x)}, {name} {describe(t)}")


def check_dropout(p) -> None:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")
