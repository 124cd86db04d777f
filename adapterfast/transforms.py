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
    """The op on 2-D inputs; ``backend`` a backend name, ``seed`` None or a 0-dim int64 tensor."""

    @staticmethod
    def forward(x, w_down, b_down, w_up, b_up, residual, backend, seed, activation, scale, dropout_p):
        with torch.no_grad():  # the custom op's own autograd wrapper is not a torch.func-ready Function
            return ops.adapter_forward(x, w_down, b_down, w_up, b_up, residual, seed, activation, scale, dropout_p,
                                       backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w_down, b_down, w_up, b_up, residual, backend, seed, activation, scale, dropout_p = inputs
        ctx.save_for_backward(x, w_down, b_down, w_up, b_up, output[1], seed)
        ctx.save_for_forward(x, w_down, b_down, w_up, b_up, output[1], seed)
        ctx.backend, ctx.residual_is_x = backend, residual is None
        ctx.activation, ctx.scale, ctx.dropout_p = activation, scale, dropout_p
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad_y, _grad_h):
        x, w_down, b_down, w_up, b_up, h, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.no_grad():
            grads = ops.adapter_backward(grad_y, x, w_down, b_down, w_up, b_up, h, seed, ctx.residual_is_x,
                                         ctx.activation, ctx.scale, ctx.dropout_p, ctx.backend, need[0])
        return tuple(g if n else None for g, n in zip(grads + (grad_y,), need)) + (None,) * 5

    @staticmethod
    def jvp(ctx, tx, tw_down, tb_down, tw_up, tb_up, tres, *_):
        x, w_down, b_down, w_up, b_up, _, seed = ctx.saved_tensors
        ty = tangent(x, w_down, b_down, w_up, b_up, ctx.residual_is_x, ctx.activation, ctx.scale, ctx.dropout_p,
                     None if seed is None else int(seed), tx, tw_down, tb_down, tw_up, tb_up, tres)
        return ty, None

    @staticmethod
    def vmap(info, in_dims, x, w_down, b_down, w_up, b_up, residual, backend, seed, activation, scale, dropout_p):
        """The rows of all vmapped samples form one batch of rows when only x and the residual are
        vmapped (so dropout draws one mask over all of them); otherwise the samples run in turn."""
        tensors = (x, w_down, b_down, w_up, b_up, residual)
        rest = (backend, seed, activation, scale, dropout_p)
        size = info.batch_size
        moved = [None if t is None or dim is None else t.movedim(dim, 0) for t, dim in zip(tensors, in_dims[:6])]
        if all(dim is None for dim in in_dims[1:5]):
            xb = moved[0] if moved[0] is not None else x.expand(size, *x.shape)
            rb = moved[5] if moved[5] is not None or residual is None else residual.expand(size, *residual.shape)
            n, d = xb.shape[1], xb.shape[2]
            y, h = FusedAdapterFunc.apply(xb.reshape(size * n, d), w_down, b_down, w_up, b_up,
                                          None if rb is None else rb.reshape(size * n, d), *rest)
            return (y.view(size, n, d), h.view(size, n, -1)), (0, 0)
        outs = [FusedAdapterFunc.apply(*[t if m is None else m[i] for t, m in zip(tensors, moved)], *rest)
                for i in range(size)]
        return (torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), (0, 0)
