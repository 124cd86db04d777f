"""The op as ``torch.library`` custom ops: ``adapterfast::forward`` and ``adapterfast::backward``.

Custom ops make the fused kernels opaque, well-typed nodes for ``torch.compile`` (the fake
implementations give output shapes without running anything), and are the single place where a
backend is chosen for each call. Inputs are 2-D; ``functional.py`` validates and flattens.
The dropout seed is a 0-dim int64 CPU tensor, so it is read here without a device sync and a
compiled graph carries it as data rather than as a constant.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch


def _seed(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("adapterfast::forward", mutates_args=())
def adapter_forward(
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    residual: Optional[Tensor],
    seed: Optional[Tensor],
    activation: str,
    scale: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """Returns ``(y, h)``: the output ``[N, d]`` and the pre-activation ``[N, r]`` kept for backward."""
    backend = dispatch.select(x, w_down.shape[0])
    return backend.forward(x, w_down, b_down, w_up, b_up, residual, activation, scale, dropout_p, _seed(seed))


@adapter_forward.register_fake
def _(x, w_down, b_down, w_up, b_up, residual, seed, activation, scale, dropout_p):
    n, r = x.shape[0], w_down.shape[0]
    return x.new_empty(x.shape), x.new_empty((n, r), dtype=_acc_dtype(x))


@torch.library.custom_op("adapterfast::backward", mutates_args=())
def adapter_backward(
    grad_y: Tensor,
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    h: Tensor,
    seed: Optional[Tensor],
    residual_is_x: bool,
    activation: str,
    scale: float,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dw_down, db_down, dw_up, db_up)``; the bias gradients are always computed."""
    backend = dispatch.select(x, w_down.shape[0])
    return backend.backward(
        grad_y, x, w_down, b_down, w_up, b_up, h, residual_is_x, activation, scale, dropout_p, _seed(seed)
    )


@adapter_backward.register_fake
def _(grad_y, x, w_down, b_down, w_up, b_up, h, seed, residual_is_x, activation, scale, dropout_p):
    r, d = w_down.shape
    return (
        x.new_empty(x.shape),
        torch.empty_like(w_down, memory_format=torch.contiguous_format),
        w_down.new_empty((r,)),
        torch.empty_like(w_up, memory_format=torch.contiguous_format),
        w_up.new_empty((d,)),
    )
