"""The grouped op as ``torch.library`` custom ops: ``adapterfast::grouped_forward`` and
``adapterfast::grouped_backward``, with fake kernels and the autograd formula registered on the op.

Semantics: ``adapterfast.grouped_reference``. Inputs are 2-D ``x [N, d]``, stacked weights and an
integer ``adapter_index [N]``; ``grouped.py`` validates them, and uses these ops under
torch.compile, autocast, for meta tensors and DTensors (eager calls take the backend's native
op or ``grouped_autograd.GroupedAdapter``, which skip this Python wrapper). The backend is chosen
by ``adapterfast.dispatch`` exactly as for the single-adapter op (same forcing context, same
fallback rules); ``backend_module`` maps its answer to the backend's grouped module. In a
compiled graph the backward selects the backend in force when it runs, as the single op's does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch, grouped_cpu, grouped_reference, reference
from .ops import empty_grads, seed_int


def backend_module(x: Tensor, r: int):
    """The grouped functions of the backend ``dispatch.select`` names for ``x`` and rank ``r``."""
    name = dispatch.select(x, r)
    if name == "cpu":
        return grouped_cpu
    if name == "triton":
        from .kernels import grouped  # dispatch imported adapterfast.kernels before it could select triton

        return grouped
    return grouped_reference


@torch.library.custom_op("adapterfast::grouped_forward", mutates_args=())
def grouped_forward(
    x: Tensor, adapter_index: Tensor, w_down: Tensor, w_up: Tensor, b_down: Optional[Tensor], b_up: Optional[Tensor],
    activation: str, scales: Tensor, dropout_p: float, seed: Optional[Tensor], residual: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """Returns ``(y, h)``: the output ``[N, d]`` and the pre-activation ``[N, r]`` kept for backward."""
    backend = backend_module(x, w_down.shape[1])
    with torch.autocast(x.device.type, enabled=False):
        return backend.forward(x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, dropout_p,
                               seed_int(seed), residual)


@grouped_forward.register_fake
def _(x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, dropout_p, seed, residual):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], w_down.shape[1]), dtype=reference.accumulation_dtype(x.dtype))


@torch.library.custom_op("adapterfast::grouped_backward", mutates_args=())
def grouped_backward(
    grad_y: Tensor, x: Tensor, adapter_index: Tensor, w_down: Tensor, w_up: Tensor, b_down: Optional[Tensor],
    b_up: Optional[Tensor], h: Tensor, activation: str, scales: Tensor, dropout_p: float, seed: Optional[Tensor],
    residual_is_x: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dw_down, db_down, dw_up, db_up)``, stacked ``[A, ...]``; unused adapters get zeros."""
    backend = backend_module(x, w_down.shape[1])
    with torch.autocast(x.device.type, enabled=False):
        return backend.backward(grad_y, x, adapter_index, w_down, w_up, b_down, b_up, h, activation, scales,
                                dropout_p, seed_int(seed), residual_is_x)


@grouped_backward.register_fake
def _(grad_y, x, adapter_index, w_down, w_up, b_down, b_up, h, activation, scales, dropout_p, seed, residual_is_x):
    return empty_grads(x, w_down, w_up)


def _setup_context(ctx, inputs, output):
    x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, dropout_p, seed, residual = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.save_for_backward(x, adapter_index, w_down, w_up, b_down, b_up, h, scales, seed)
    ctx.residual_is_x = residual is None
    ctx.activation, ctx.dropout_p = activation, dropout_p


def _backward(ctx, grad_y, _grad_h):
    x, adapter_index, w_down, w_up, b_down, b_up, h, scales, seed = ctx.saved_tensors
    dx, dw_down, db_down, dw_up, db_up = grouped_backward(
        grad_y, x, adapter_index, w_down, w_up, b_down, b_up, h, ctx.activation, scales, ctx.dropout_p, seed,
        ctx.residual_is_x,
    )
    need = ctx.needs_input_grad
    grads = (dx, None, dw_down, dw_up, db_down, db_up)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 4 + (grad_y if need[10] else None,)


grouped_forward.register_autograd(_backward, setup_context=_setup_context)
