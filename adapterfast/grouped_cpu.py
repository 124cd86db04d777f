"""The grouped op on the fused CPU backend: ``csrc/grouped_*.cpp`` in ``adapterfast._C``.

``forward`` and ``backward`` have the semantics of ``adapterfast.grouped_reference`` for 2-D CPU
tensors in float32, bfloat16, float16 or float64. Rows are counting-sorted by adapter inside the op and
each block of rows of one adapter runs the single-adapter op's GEMMs (the AVX-512 block kernels
for float32, brgemm on AMX/AVX512-BF16 for bfloat16) with that adapter's weights: its x rows are
gathered into cache, and the GEMM's epilogue writes its output rows in place, so no ``[N, d]``
temporary exists. Only the adapters that have rows have their weights converted, once per call.
Weight gradients are bitwise reproducible whatever the thread count.

``differentiable`` is ``adapterfast_cpu::grouped`` (``csrc/grouped_autograd.cpp``): the op with its
derivative as one C++ autograd node, which an eager call with autograd recording runs instead of
the custom op's Python autograd wrapper (``grouped.py`` says when), and with autograd off as well
(it then records nothing). It takes an int seed, 0 without dropout, and returns y.
"""
from __future__ import annotations

import torch

from .cpu import _IMPORT_ERROR, _check_dtype, _require, _seed


def forward(x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, dropout_p, seed, residual):
    """Returns ``(y, h)`` (see ``adapterfast.grouped_reference.forward``)."""
    _require()
    _check_dtype(x)
    return torch.ops.adapterfast_cpu.grouped_forward(
        x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, float(dropout_p), _seed(seed, dropout_p),
        residual,
    )


def backward(grad_y, x, adapter_index, w_down, w_up, b_down, b_up, h, activation, scales, dropout_p, seed,
             residual_is_x):
    """Returns ``(dx, dw_down, db_down, dw_up, db_up)``, stacked per adapter; unused adapters get zeros."""
    _require()
    _check_dtype(x)
    return torch.ops.adapterfast_cpu.grouped_backward(
        grad_y, x, adapter_index, w_down, w_up, b_down, b_up, h, activation, scales, float(dropout_p),
        _seed(seed, dropout_p), bool(residual_is_x),
    )


if _IMPORT_ERROR is None:
    # ``_op`` is the overload's C++ callable, without OpOverload.__call__'s Python frame
    differentiable = getattr(torch.ops.adapterfast_cpu.grouped.default, "_op", torch.ops.adapterfast_cpu.grouped)
else:
    differentiable = None
