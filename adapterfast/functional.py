"""``fused_adapter``: the op as a differentiable function of tensors of any leading shape.

It checks its inputs (a wrong shape, dtype or device is a ``ValueError``/``TypeError`` that names
it), flattens the leading dimensions to ``[N, d]``, draws the dropout seed, and runs the autograd
Function whose forward and backward are the custom ops of ``ops.py``.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import activations, ops
from . import dropout as dropout_rng


class FusedAdapterFunction(torch.autograd.Function):
    """Autograd for the op on 2-D inputs; saves the inputs and the small pre-activation ``h``."""

    @staticmethod
    def forward(ctx, x, w_down, b_down, w_up, b_up, residual, seed, activation, scale, dropout_p):
        y, h = ops.adapter_forward(x, w_down, b_down, w_up, b_up, residual, seed, activation, scale, dropout_p)
        ctx.save_for_backward(x, w_down, b_down, w_up, b_up, h, seed)
        ctx.residual_is_x = residual is None
        ctx.activation, ctx.scale, ctx.dropout_p = activation, scale, dropout_p
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w_down, b_down, w_up, b_up, h, seed = ctx.saved_tensors
        dx, dw_down, db_down, dw_up, db_up = ops.adapter_backward(
            grad_y, x, w_down, b_down, w_up, b_up, h, seed,
            ctx.residual_is_x, ctx.activation, ctx.scale, ctx.dropout_p,
        )
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            dw_down if need[1] else None,
            db_down if need[2] else None,
            dw_up if need[3] else None,
            db_up if need[4] else None,
            grad_y if need[5] else None,
            None, None, None, None,
        )


def _describe(t: Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def _check_tensor(name: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _validate(x, w_down, w_up, b_down, b_up, residual, scale, p) -> None:
    for name, t, optional in (("x", x, False), ("down_weight", w_down, False), ("up_weight", w_up, False),
                              ("down_bias", b_down, True), ("up_bias", b_up, True), ("residual", residual, True)):
        _check_tensor(name, t, optional=optional)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a last (feature) dimension of size >= 1, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    if w_down.dim() != 2 or w_down.shape[1] != d or w_down.shape[0] < 1:
        raise ValueError(f"down_weight must have shape [r, d] = [r, {d}] with r >= 1 (nn.Linear(d, r).weight), "
                         f"got {tuple(w_down.shape)}")
    r = w_down.shape[0]
    if w_up.dim() != 2 or tuple(w_up.shape) != (d, r):
        raise ValueError(f"up_weight must have shape [d, r] = [{d}, {r}] (nn.Linear(r, d).weight), got {tuple(w_up.shape)}")
    if b_down is not None and tuple(b_down.shape) != (r,):
        raise ValueError(f"down_bias must have shape [{r}], got {tuple(b_down.shape)}")
    if b_up is not None and tuple(b_up.shape) != (d,):
        raise ValueError(f"up_bias must have shape [{d}], got {tuple(b_up.shape)}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    for name, t in (("down_weight", w_down), ("up_weight", w_up), ("down_bias", b_down),
                    ("up_bias", b_up), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: "
                             f"x {_describe(x)}, {name} {_describe(t)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")


def fused_adapter(
    x: Tensor,
    down_weight: Tensor,
    up_weight: Tensor,
    down_bias: Tensor | None = None,
    up_bias: Tensor | None = None,
    *,
    activation: str = "relu",
    scale: float = 1.0,
    dropout: float = 0.0,
    training: bool = True,
    residual: Tensor | None = None,
) -> Tensor:
    """``residual + scale * dropout(up(act(down(x) + down_bias)) + up_bias)``, fused.

    ``x`` is ``[..., d]``; ``down_weight`` ``[r, d]`` and ``up_weight`` ``[d, r]`` are ``nn.Linear``
    weights and may be fp32 while ``x`` is fp16/bf16. ``residual`` defaults to ``x`` (a sequential
    adapter); pass the block input for a parallel adapter. Dropout acts on the adapter branch only
    and only when ``training``.
    """
    _validate(x, down_weight, up_weight, down_bias, up_bias, residual, scale, dropout)
    activation = activations.canonical(activation)
    d = x.shape[-1]
    p = float(dropout) if training else 0.0
    seed = dropout_rng.new_seed() if p > 0.0 else None
    x2 = x.reshape(-1, d)
    res2 = None if residual is None else residual.reshape(-1, d)
    y = FusedAdapterFunction.apply(
        x2, down_weight, down_bias, up_weight, up_bias, res2, seed, activation, float(scale), p
    )
    return y.view(x.shape)
