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

Arguments come in one order at every layer, ``fused_adapter``'s: the tensors of the op (x, the
weights, then the optional biases, as in ``F.linear``), its constants (activation, scale,
dropout_p, seed), then the residual; the backward puts ``grad_y`` first and the saved ``h`` after
the biases, and ends with ``residual_is_x``. The backends (``reference.forward``/``backward``) and
the C++ schemas take the same order.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch, reference
from .autograd import run_backward, run_forward


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.is_contiguous() else t.contiguous()


def seed_int(seed: Optional[Tensor]) -> int:
    """The dropout seed as the backends take it: an int, 0 without dropout (the ops' seed is None then)."""
    return 0 if seed is None else int(seed)


def empty_grads(x: Tensor, w_down: Tensor, w_up: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Unfilled ``(dx, dw_down, db_down, dw_up, db_up)`` of the shapes a backward returns: what the
    fake kernels of the single and the grouped backward promise (a bias gradient has its weight's
    shape without the last dimension: ``[r]``/``[d]``, or ``[A, r]``/``[A, d]`` when stacked)."""
    return (
        x.new_empty(x.shape),
        torch.empty_like(w_down, memory_format=torch.contiguous_format),
        w_down.new_empty(w_down.shape[:-1]),
        torch.empty_like(w_up, memory_format=torch.contiguous_format),
        w_up.new_empty(w_up.shape[:-1]),
    )


@torch.library.custom_op("adapterfast::forward", mutates_args=())
def adapter_forward(
    x: Tensor,
    w_down: Tensor,
    w_up: Tensor,
    b_down: Optional[Tensor],
    b_up: Optional[Tensor],
    activation: str,
    scale: float,
    dropout_p: float,
    seed: Optional[Tensor],
    residual: Optional[Tensor],
    backend: str = "",
) -> tuple[Tensor, Tensor]:
    """Returns ``(y, h)``: the output ``[N, d]`` and the pre-activation ``[N, r]`` kept for backward."""
    kernels = dispatch.kernels(backend or dispatch.select(x, w_down.shape[0]))
    return run_forward(kernels, x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed_int(seed), residual)


@adapter_forward.register_fake
def _(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual, backend=""):
    n, r = x.shape[0], w_down.shape[0]
    return x.new_empty(x.shape), x.new_empty((n, r), dtype=reference.accumulation_dtype(x.dtype))


@torch.library.custom_op("adapterfast::backward", mutates_args=())
def adapter_backward(
    grad_y: Tensor,
    x: Tensor,
    w_down: Tensor,
    w_up: Tensor,
    b_down: Optional[Tensor],
    b_up: Optional[Tensor],
    h: Tensor,
    activation: str,
    scale: float,
    dropout_p: float,
    seed: Optional[Tensor],
    residual_is_x: bool,
    backend: str = "",
    need_dx: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(dx, dw_down, db_down, dw_up, db_up)``; the bias gradients are always computed.
    Without ``need_dx`` the backend may skip dx, and dx is then an unfilled tensor nobody reads."""
    kernels = dispatch.kernels(backend or dispatch.select(x, w_down.shape[0]))
    dx, *rest = run_backward(kernels, grad_y, x, w_down, w_up, b_down, b_up, h, activation, scale, dropout_p,
                             seed_int(seed), residual_is_x, need_dx)
    if dx is None:
        dx = x.new_empty(x.shape)
    return tuple(_contiguous(g) for g in (dx, *rest))


@adapter_backward.register_fake
def _(grad_y, x, w_down, w_up, b_down, b_up, h, activation, scale, dropout_p, seed, residual_is_x, backend="",
      need_dx=True):
    return empty_grads(x, w_down, w_up)


def _setup_context(ctx, inputs, output):
    x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual, backend = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    ctx.save_for_backward(x, w_down, w_up, b_down, b_up, h, seed)
    ctx.residual_is_x = residual is None
    ctx.activation, ctx.scale, ctx.dropout_p, ctx.backend = activation, scale, dropout_p, backend


def _backward(ctx, grad_y, _grad_h):
    x, w_down, w_up, b_down, b_up, h, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw_down, db_down, dw_up, db_up = adapter_backward(
        grad_y, x, w_down, w_up, b_down, b_up, h, ctx.activation, ctx.scale, ctx.dropout_p, seed, ctx.residual_is_x,
        ctx.backend, need[0],
    )
    grads = (dx, dw_down, dw_up, db_down, db_up)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 4 + (grad_y if need[9] else None, None)


# The autograd formula lives on the op itself (rather than in an autograd.Function around it), so
# ``torch.ops.adapterfast.forward`` is differentiable wherever it is called and passes
# ``torch.library.opcheck`` with inputs that require grad. ``h`` is an internal saved for backward.
adapter_forward.register_autograd(_backward, setup_context=_setup_context)
