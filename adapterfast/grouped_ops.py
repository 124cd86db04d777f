"""The grouped op as ``torch.library`` custom ops: ``adapterfast::grouped_forward`` and
``adapterfast::grouped_backward``, with fake kernels and the autograd formula registered on the op.

Semantics: ``adapterfast.grouped_reference``. Inputs are 2-D ``x [N, d]``, stacked weights and an
int64 ``adapter_index [N]``; ``grouped.py`` validates them. The backend is chosen by
``adapterfast.dispatch`` exactly as for the single-adapter op (same forcing context, same
fallback rules); ``_backend`` is the one place this module touches dispatch.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from . import dispatch, reference

# The grouped implementation of each backend ``dispatch.select`` names.
_GROUPED_MODULES = {
    "triton": "adapterfast.kernels.grouped",
    "cpu": "adapterfast.grouped_cpu",
    "reference": "adapterfast.grouped_reference",
}


def _backend(x: Tensor, r: int):
    """The grouped backend for the backend ``dispatch`` selects for ``x`` and rank ``r``."""
    return importlib.import_module(_GROUPED_MODULES[dispatch.select(x, r)])


def _seed(seed: Optional[Tensor]) -> Optional[int]:
    return None if seed is None else int(seed)


@torch.library.custom_op("adapterfast::grouped_forward", mutates_args=())
def grouped_forward(
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    scales: Tensor,
    adapter_index: Tensor,
    residual: Optional[Tensor],
    seed: Optional[Tensor],
    activation: str,
    dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """Returns ``(y, h)``: the output ``[N, d]`` and the pre-activation ``[N, r]`` kept for backward."""
    backend = _backend(x, w_down.shape[1])
    with torch.autocast(x.device.type, enabled=False):
        return backend.forward(x, w_down, b_down, w_up, b_up, scales, adapter_index, residual, activation,
                               dropout_p, _seed(seed))


@grouped_forward.register_fake
def _(x, w_down, b_down, w_up, b_up, scales, adapter_index, residual, seed, activation, dropout_p):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], w_down.shape[1]), dtype=reference.accumulation_dtype(x.dtype))


@torch.library.custom_op("adapterfast::grouped_backward", mutates_args=())
def grouped_backward(
    grad_y: Tensor,
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    scales: Tensor,
    adapter_index: Tensor,
    h: Tensor,
    seed: Optional[Tensor],
    residual_is_x: bool,
    activation: str,
    dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dw_down, db_down, dw_up, db_up)``, stacked ``[A, ...]``; unused adapters get zeros."""
    backend = _backend(x, w_down.shape[1])
    with torch.autocast(x.device.type, enabled=False):
        return backend.backward(grad_y, x, w_down, b_down, w_up, b_up, scales, adapter_index, h, residual_is_x,
                                activation, dropout_p, _seed(seed))


@grouped_backward.register_fake
def _(grad_y, x, w_down, b_down, w_up, b_up, scales, adapter_index, h, seed, residual_is_x, activation, dropout_p):
    A, r, d = w_down.shape
    return (
        x.new_empty(x.shape),
        torch.empty_like(w_down, memory_format=torch.contiguous_format),
        w_down.new_empty((A, r)),
        torch.empty_like(w_up, memory_format=torch.contiguous_format),
        w_up.new_empty((A, d)),
    )


def _setup_context(ctx, inputs, output):
    x, w_down, b_down, w_up, b_up, scales, adapter_index, residual, seed, activation, dropout_p = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.save_for_backward(x, w_down, b_down, w_up, b_up, scales, adapter_index, h, seed)
    ctx.residual_is_x = residual is None
    ctx.activation, ctx.dropout_p = activation, dropout_p


def _backward(ctx, grad_y, _grad_h):
    x, w_down, b_down, w_up, b_up, scales, adapter_index, h, seed = ctx.saved_tensors
    dx, dw_down, db_down, dw_up, db_up = grouped_backward(
        grad_y, x, w_down, b_down, w_up, b_up, scales, adapter_index, h, seed, ctx.residual_is_x,
        ctx.activation, ctx.dropout_p,
    )
    need = ctx.needs_input_grad
    grads = (dx, dw_down, db_down, dw_up, db_up)
    out = tuple(g if n else None for g, n in zip(grads, need))
    return out + (None, None, grad_y if need[7] else None, None, None, None)


grouped_forward.register_autograd(_backward, setup_context=_setup_context)
