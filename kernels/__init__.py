"""Triton backend of the adapter op (installed as ``adapterfast.kernels``).

``forward`` and ``backward`` have the signatures and semantics of ``adapterfast.reference``'s, on
2-D ``[N, d]`` inputs of any strides, for ranks ``1 <= r <= 256`` (larger ranks raise
``ValueError``; the ops layer sends them to the reference).

- ``forward_kernel.py``: the forward, one fused kernel;
- ``backward_kernels.py``: the backward, a row kernel (dh) then a column-tile kernel (dx and
  the deterministic weight and bias gradients, from one read of g and x);
- ``config.py``: block sizes, one table for the launchers and ``adapterfast.compile_check``;
- ``philox.py``: the dropout mask; ``activations.py``: act and act';
- ``launch.py``: what the launchers share.
"""
from __future__ import annotations

if __name__ != "adapterfast.kernels":
    raise ImportError(
        f"adapterfast's kernels/ folder was imported as {__name__!r}; it is the package "
        "adapterfast.kernels. A Python started in an adapterfast checkout sees the folder as a top-level "
        "'kernels' (the name of Hugging Face's kernels package, which transformers 5 imports) unless adapterfast "
        "is installed (pip install -e . adds a path hook that hides it): install it, or start Python elsewhere"
    )

import torch

from adapterfast.activations import ACTIVATIONS

from . import backward_kernels, forward_kernel
from .config import MAX_R, block_r
from .launch import on_device

__all__ = ["forward", "backward"]


_ACTIVATIONS = frozenset(ACTIVATIONS)


def _check(x, w_down, activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; the kernels implement {', '.join(ACTIVATIONS)}")
    if x.dim() != 2:
        raise ValueError(f"the kernels take 2-D x [N, d], got shape {tuple(x.shape)}")
    r = w_down.shape[0]
    if not 1 <= r <= MAX_R:
        block_r(r)


def forward(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual):
    """Returns ``(y, h)``: ``y`` ``[N, d]`` contiguous in x's dtype, ``h = x Wd^T + bd`` ``[N, r]`` fp32."""
    _check(x, w_down, activation)
    with on_device(x):
        return forward_kernel.forward(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual)


def backward(grad_y, x, w_down, w_up, b_down, b_up, h, activation, scale, dropout_p, seed, residual_is_x, *,
             need_dx=True):
    """Returns ``(dx, dw_down, db_down, dw_up, db_up)``; the weight gradients are bitwise reproducible.

    With ``need_dx=False`` (x does not require grad) dx is not computed and is returned as None.
    """
    _check(x, w_down, activation)
    with on_device(x):
        return backward_kernels.backward(grad_y, x, w_down, w_up, b_down, b_up, h, activation, scale, dropout_p,
                                         seed, residual_is_x, need_dx)


from adapterfast import dispatch  # noqa: E402  (registration: the backend is selectable by name once imported)

dispatch.register("triton", forward=forward, backward=backward,
                  dtypes=(torch.float32, torch.float16, torch.bfloat16))
