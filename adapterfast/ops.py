"""The op as ``torch.library`` custom ops: ``adapterfast::forward`` and ``adapterfast::backward``.

Custom ops make the fused kernels opaque, well-typed nodes for ``torch.compile`` (the fake
implementations give output shapes and layouts without running anything; they are also what runs
for meta tensors). ``functional.py`` uses them under ``torch.compile``, for meta tensors and for
DTensors; eager calls take the faster ``autograd.FusedAdapter`` to the same kernels. Inputs are
2-D; ``functional.py`` validates and flattens.

``backend`` names the backend (``dispatch.select``'s answer); empty, the op selects when it runs.
The backward op receives the name its forward ran with when there is one (eager calls); in a
compiled graph both ops select when they run, under the backend in force then. Every output has
the contiguous layout the fake kernel promises, whatever layout a backend returns.
The dropout seed is a 0-dim int64 CPU tensor, so it is read here without a device sync and a
compiled graph carries it as data rather than as a constant.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch, reference
from .autograd import run_backward, run_forward


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.is_contiguous() else t.contiguous()


def _seed(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed)


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
    backend: str = "",
) -> tuple[Tensor, Tensor]:
    """Returns ``(y, h)``: the output ``[N, d]`` and the pre-activation ``[N, r]`` kept for backward."""
    kernels = dispatch.kernels(backend or dispatch.select(x, w_down.shape[0]))
    return run_forward(kernels, x, w_down, b_down, w_up, b_up, residual, _seed(seed), activation, scale, dropout_p)


@adapter_forward.register_fake
def _(x, w_down, b_down, w_up, b_up, residual, seed, activation, scale, dropout_p, backend=""):
    n, r = x.shape[0], w_down.shape[0]
    return x.new_empty(x.shape), x.new_empty((n, r), dtype=reference.accumulation_dtype(x.dtype))


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
    backend: str = "",
    need_dx: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dw_down, db_down, dw_up, db_up)``; the bias gradients are always computed.
    Without ``need_dx`` the backend may skip dx, and dx is then an unfilled tensor nobody reads."""
    kernels = dispatch.kernels(backend or dispatch.select(x, w_down.shape[0]))
    dx, *rest = run_backward(kernels, grad_y, x, w_down, b_down, w_up, b_up, h, residual_is_x, activation,
                                 scale, dropout_p, _seed(seed), need_dx)
    if dx is None:
        dx = x.new_empty(x.shape)
    return tuple(_contiguous(g) for g in (dx, *rest))


@adapter_backward.register_fake
def _(grad_y, x, w_down, b_down, w_up, b_up, h, seed, residual_is_x, activation, scale, dropout_p, backend="",
      need_dx=True):
    r, d = w_down.shape
    return (
        x.new_empty(x.shape),
        torch.empty_like(w_down, memory_format=torch.contiguous_format),
        w_down.new_empty((r,)),
        torch.empty_like(w_up, memory_format=torch.contiguous_format),
        w_up.new_empty((d,)),
    )


def _setup_context(ctx, inputs, output):
    x, w_down, b_down, w_up, b_up, residual, seed, activation, scale, dropout_p, backend = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.save_for_backward(x, w_down, b_down, w_up, b_up, h, seed)
    ctx.residual_is_x = residual is None
    ctx.activation, ctx.scale, ctx.dropout_p, ctx.backend = activation, scale, dropout_p, backend


def _backward(ctx, grad_y, _grad_h):
    x, w_down, b_down, w_up, b_up, h, seed = ctx.saved_tensors
    dx, dw_down, db_down, dw_up, db_up = adapter_backward(
        grad_y, x, w_down, b_down, w_up, b_up, h, seed, ctx.residual_is_x, ctx.activation, ctx.scale, ctx.dropout_p,
        ctx.backend, ctx.needs_input_grad[0],
    )
    need = ctx.needs_input_grad
    grads = (dx, dw_down, db_down, dw_up, db_up, grad_y)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 5


# The autograd formula lives on the op itself (rather than in an autograd.Function around it), so
# ``torch.ops.adapterfast.forward`` is differentiable wherever it is called and passes
# ``torch.library.opcheck`` with inputs that require grad. ``h`` is an internal saved for backward.
adapter_forward.register_autograd(_backward, setup_context=_setup_context)
