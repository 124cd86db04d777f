"""The op as the ``torch.autograd.Function`` torch.func transforms (jvp, vmap, grad, jacrev) run.

It has the form those require (``setup_context``, a ``vmap`` rule) and reaches the kernels through
the custom ops of ``ops.py``, so the transforms' wrapper tensors are unwrapped by the dispatcher
before any backend sees them (the Triton launcher cannot read a wrapper's storage). The jvp is
``autograd.tangent``. Eager calls outside transforms take ``autograd.FusedAdapter``, which skips
the per-call argument binding ``Function.apply`` does for this form.
"""
from __future__ import annotations

import torch

from . import ops
from .autograd import tangent


class FusedAdapterFunc(torch.autograd.Function):
    """The op on 2-D inputs; ``seed`` None or a 0-dim int64 tensor, ``backend`` a backend name."""

    @staticmethod
    def forward(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual, backend):
        with torch.no_grad():  # the custom op's own autograd wrapper is not a torch.func-ready Function
            return ops.adapter_forward(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual,
                                       backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual, backend = inputs
        ctx.save_for_backward(x, w_down, w_up, b_down, b_up, output[1], seed)
        ctx.save_for_forward(x, w_down, w_up, b_down, b_up, output[1], seed)
        ctx.backend, ctx.residual_is_x = backend, residual is None
        ctx.activation, ctx.scale, ctx.dropout_p = activation, scale, dropout_p
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_y, _grad_h):
        x, w_down, w_up, b_down, b_up, h, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.no_grad():
            dx, dw_down, db_down, dw_up, db_up = ops.adapter_backward(
                grad_y, x, w_down, w_up, b_down, b_up, h, ctx.activation, ctx.scale, ctx.dropout_p, seed,
                ctx.residual_is_x, ctx.backend, need[0])
        grads = (dx, dw_down, dw_up, db_down, db_up)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 4 + (grad_y if need[9] else None, None)

    @staticmethod
    def jvp(ctx, tx, tw_down, tw_up, tb_down, tb_up, _t_activation, _t_scale, _t_dropout_p, _t_seed, tres, _t_backend):
        x, w_down, w_up, b_down, b_up, _, seed = ctx.saved_tensors
        ty = tangent(x, w_down, w_up, b_down, b_up, ctx.activation, ctx.scale, ctx.dropout_p,
                     None if seed is None else int(seed), ctx.residual_is_x, tx, tw_down, tw_up, tb_down, tb_up, tres)
        return ty, None

    @staticmethod
    def vmap(info, in_dims, x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual, backend):
        """The rows of all vmapped samples form one batch of rows when only x and the residual are
        vmapped (so dropout draws one mask over all of them); otherwise the samples run in turn."""
        weights = (w_down, w_up, b_down, b_up)
        constants = (activation, scale, dropout_p, seed)
        size = info.batch_size

        def moved(t, dim):
            return None if t is None or dim is None else t.movedim(dim, 0)

        x_dim, weight_dims, residual_dim = in_dims[0], in_dims[1:5], in_dims[9]
        if all(dim is None for dim in weight_dims):
            xb = moved(x, x_dim) if x_dim is not None else x.expand(size, *x.shape)
            rb = moved(residual, residual_dim)
            if rb is None and residual is not None:
                rb = residual.expand(size, *residual.shape)
            n, d = xb.shape[1], xb.shape[2]
            y, h = FusedAdapterFunc.apply(xb.reshape(size * n, d), *weights, *constants,
                                          None if rb is None else rb.reshape(size * n, d), backend)
            return (y.view(size, n, d), h.view(size, n, -1)), (0, 0)
        tensors = (x, *weights)
        dims = (x_dim, *weight_dims)
        moved_tensors = [moved(t, dim) for t, dim in zip(tensors, dims)]
        moved_residual = moved(residual, residual_dim)

        def sample(i):
            args = [t if m is None else m[i] for t, m in zip(tensors, moved_tensors)]
            res = residual if moved_residual is None else moved_residual[i]
            return FusedAdapterFunc.apply(*args, *constants, res, backend)

        outs = [sample(i) for i in range(size)]
        return (torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), (0, 0)
