"""The grouped op as a ``torch.autograd.Function``: the eager path of backends without a native
differentiable grouped op (Triton, the reference).

``GroupedAdapter`` calls the backend's grouped ``forward``, and its backward the same backend's
``backward``, directly: an eager call costs one ``Function.apply`` on top of them, not the
``adapterfast::grouped_forward`` custom op's Python autograd wrapper (argument re-binding, two
autocast context managers, a second op call from Python in the backward). The gradients are the
custom op's: ``grouped_ops._backward`` maps the same backend's ``backward`` to the same inputs.
``grouped.py`` uses it only where no torch.func transform, forward-mode AD or autocast is active
(those take the reference or the custom op), so ``apply_fast`` may skip ``Function.apply``'s
per-call argument handling, which only torch.func needs.
"""
from __future__ import annotations

import torch


class GroupedAdapter(torch.autograd.Function):
    """The grouped op on 2-D inputs; ``backend`` is a grouped backend module, ``seed`` an int."""

    @staticmethod
    def forward(ctx, x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, dropout_p, seed, residual,
                backend):
        y, h = backend.forward(x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, dropout_p, seed,
                               residual)
        ctx.save_for_backward(x, adapter_index, w_down, w_up, b_down, b_up, h, scales)
        ctx.backend, ctx.seed, ctx.residual_is_x = backend, seed, residual is None
        ctx.activation, ctx.dropout_p = activation, dropout_p
        return y if y.is_contiguous() else y.contiguous()

    @staticmethod
    def backward(ctx, grad_y):
        x, adapter_index, w_down, w_up, b_down, b_up, h, scales = ctx.saved_tensors
        dx, dw_down, db_down, dw_up, db_up = ctx.backend.backward(
            grad_y, x, adapter_index, w_down, w_up, b_down, b_up, h, ctx.activation, scales, ctx.dropout_p, ctx.seed,
            ctx.residual_is_x,
        )
        need = ctx.needs_input_grad
        return (dx if need[0] else None, None, dw_down if need[2] else None, dw_up if need[3] else None,
                db_down if need[4] else None, db_up if need[5] else None, None, None, None, None,
                grad_y if need[10] else None, None)


apply_fast = torch._C._FunctionBase.__dict__["apply"].__get__(None, GroupedAdapter)
