"""The op as ``torch.autograd.Function``s: the eager fast path, and the one torch.func transforms use.

``FusedAdapter`` is what an eager call runs on a backend without a native differentiable op (the
reference and Triton backends; the C++ backend's ``adapterfast_cpu::fused`` is a C++
``torch::autograd::Function`` and replaces it, see ``cpu.py``), and on any backend under forward-mode
AD or autocast: its forward calls the selected backend's kernel directly, so a call costs one
``Function.apply`` on top of the kernels (no custom-op wrapper, no argument re-binding, no per-call
module lookups). It records the backend that ran the forward on
the autograd context, and its backward runs that backend (whose saved pre-activation and dropout
mask it relies on), whatever backend is in force when the backward runs.

Forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``) uses ``jvp``. With
``h = x Wd^T + bd``, ``a = act(h)``, ``c = scale * mask / (1 - p)`` (``scale`` without dropout):

    y'  = res' + c * (a' Wu^T + a Wu'^T + bu'),   a' = act'(h) * (x' Wd^T + x Wd'^T + bd')

where ``res' = x'`` when the residual is x. It is computed in eager PyTorch in the accumulation
dtype (fp32, float64 for float64), which is what the reference backend does.

``transforms.FusedAdapterFunc`` is the same Function in the form torch.func requires;
``Function.apply`` re-binds the arguments of such a Function with ``inspect`` on every call, so
eager calls use ``FusedAdapter`` instead.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

from . import reference

_is_autocast_on = torch._C._is_any_autocast_enabled


def run_forward(kernels, x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual):
    """``(y, h)`` from the backend, y contiguous (the layout the custom op's fake kernel promises).

    Autocast is off while a backend runs: the torch ops inside one (the reference's
    fp32-accumulating matmuls) would otherwise be cast down; ``functional.py`` has already applied
    autocast's rules to the inputs."""
    if _is_autocast_on():
        with torch.autocast(x.device.type, enabled=False):
            y, h = kernels.forward(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual)
    else:
        y, h = kernels.forward(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual)
    return (y if y.is_contiguous() else y.contiguous()), h


def run_backward(kernels, grad_y, x, w_down, w_up, b_down, b_up, h, activation, scale, dropout_p, seed,
                 residual_is_x, need_dx):
    if _is_autocast_on():
        with torch.autocast(x.device.type, enabled=False):
            return kernels.backward(grad_y, x, w_down, w_up, b_down, b_up, h, activation, scale, dropout_p, seed,
                                    residual_is_x, need_dx=need_dx)
    return kernels.backward(grad_y, x, w_down, w_up, b_down, b_up, h, activation, scale, dropout_p, seed,
                            residual_is_x, need_dx=need_dx)


def tangent(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual_is_x,
            tx, tw_down, tw_up, tb_down, tb_up, tres):
    """The forward-mode derivative ``y'`` of the op (module docstring), in x's dtype."""
    acc = reference.accumulation_dtype(x.dtype)

    def f(t):
        return None if t is None else t.to(acc)

    xa, wd, wu = f(x), f(w_down), f(w_up)
    h = xa @ wd.t()
    if b_down is not None:
        h = h + f(b_down)
    dh = torch.zeros_like(h)
    if tx is not None:
        dh = dh + f(tx) @ wd.t()
    if tw_down is not None:
        dh = dh + xa @ f(tw_down).t()
    if tb_down is not None:
        dh = dh + f(tb_down)
    a = reference.activate(h, activation)
    du = (reference.activate_grad(h, activation) * dh) @ wu.t()
    if tw_up is not None:
        du = du + a @ f(tw_up).t()
    if tb_up is not None:
        du = du + f(tb_up)
    mask = reference.dropout_mask(seed, dropout_p, x.shape[0], x.shape[1], x.device)
    dy = du * (scale if mask is None else mask.to(acc) * (scale / (1.0 - dropout_p)))
    res_t = tx if residual_is_x else tres
    if res_t is not None:
        dy = dy + f(res_t)
    return dy.to(x.dtype)


class FusedAdapter(torch.autograd.Function):
    """The op on 2-D inputs for eager calls; ``kernels`` is a ``dispatch.Kernels``, ``seed`` an int."""

    @staticmethod
    def forward(ctx, x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual, kernels):
        if _is_autocast_on():
            y, h = run_forward(kernels, x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual)
        else:
            y, h = kernels.forward(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual)
            if not y.is_contiguous():
                y = y.contiguous()
        ctx.save_for_backward(x, w_down, w_up, b_down, b_up, h)
        if _forward_ad._current_level >= 0:
            ctx.save_for_forward(x, w_down, w_up, b_down, b_up, h)
        ctx.kernels, ctx.seed, ctx.residual_is_x = kernels, seed, residual is None
        ctx.activation, ctx.scale, ctx.dropout_p = activation, scale, dropout_p
        ctx.mark_non_differentiable(h)
        return y, h

    @staticmethod
    def backward(ctx, grad_y, _grad_h):
        x, w_down, w_up, b_down, b_up, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw_down, db_down, dw_up, db_up = run_backward(
            ctx.kernels, grad_y, x, w_down, w_up, b_down, b_up, h, ctx.activation, ctx.scale, ctx.dropout_p,
            ctx.seed, ctx.residual_is_x, need[0],
        )
        return (dx if need[0] else None, dw_down if need[1] else None, dw_up if need[2] else None,
                db_down if need[3] else None, db_up if need[4] else None, None, None, None, None,
                grad_y if need[9] else None, None)

    @staticmethod
    def jvp(ctx, tx, tw_down, tw_up, tb_down, tb_up, _t_activation, _t_scale, _t_dropout_p, _t_seed, tres, _t_kernels):
        x, w_down, w_up, b_down, b_up, _ = ctx.saved_tensors
        ty = tangent(x, w_down, w_up, b_down, b_up, ctx.activation, ctx.scale, ctx.dropout_p, ctx.seed,
                     ctx.residual_is_x, tx, tw_down, tw_up, tb_down, tb_up, tres)
        return ty, None


# Function.apply without its per-call argument handling, which only torch.func transforms need:
# ``functional.py`` calls this only when none is active.
apply_fast = torch._C._FunctionBase.__dict__["apply"].__get__(None, FusedAdapter)
