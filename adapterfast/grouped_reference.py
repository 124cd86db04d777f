"""The grouped adapter op in plain eager PyTorch: the specification of ``grouped_adapter``.

Row ``i`` of ``x`` ``[N, d]`` goes through adapter ``a = adapter_index[i]`` of a bank of A
adapters with stacked weights ``w_down [A, r, d]``, ``w_up [A, d, r]``, optional stacked biases
``b_down [A, r]``, ``b_up [A, d]`` and per-adapter scales ``scales [A]``:

    y[i] = residual[i] + scales[a] * dropout_p(up_a(act(down_a(x[i]) + b_down[a])) + b_up[a])
    y[i] = residual[i]                                             when a == -1 (no adapter)

It is exactly ``adapterfast.reference.forward`` applied to each row with its own adapter's
weights, with the same precision rules, and the dropout mask is the one ``fused_adapter`` uses
for the whole ``[N, d]`` batch (``adapterfast.dropout``: element ``(i, k)`` has counter
``i * d + k``), so a grouped call equals running every row through its own adapter inside one
``[N, d]`` call with one seed. The saved pre-activation ``h`` ``[N, r]`` is 0 on rows without an
adapter. Gradients of adapters no row uses are zeros. ``scales`` are constants (no gradient),
like ``fused_adapter``'s ``scale``.

``forward``/``backward`` loop over the adapters present, the clearest form of the spec and the
eager fallback backend.
"""
from __future__ import annotations

import torch

from . import dropout as _dropout
from .reference import _matmul, accumulation_dtype, activate, activate_grad


# No native differentiable op: eager calls with autograd run grouped_autograd.GroupedAdapter
# around forward and backward (grouped.py).
differentiable = None

def _keep(seed, p: float, rows: torch.Tensor, d: int) -> torch.Tensor | None:
    """The kept-mask of ``fused_adapter`` for the given rows of an ``[N, d]`` batch."""
    if p == 0.0 or seed is None:
        return None
    return _dropout.keep_rows(int(seed), p, rows, d)


def _factor(keep, scale: torch.Tensor, p: float):
    """The branch factor: ``scale / (1 - p)`` where kept, 0 where dropped (``scale`` without dropout)."""
    if keep is None:
        return scale
    return keep * (scale / (1.0 - p))


def check_index(adapter_index: torch.Tensor, adapters: int) -> None:
    """A ``ValueError`` unless every index is in ``[-1, adapters)``."""
    if adapter_index.numel() == 0:
        return
    low, high = (int(v) for v in torch.aminmax(adapter_index))
    if low < -1 or high >= adapters:
        raise ValueError(f"adapter_index must be in [-1, {adapters}) for a bank of {adapters} adapters, "
                         f"got values in [{low}, {high}]")


def _groups(adapter_index: torch.Tensor, adapters: int):
    """``(a, rows)`` for each adapter that has rows, in adapter order."""
    check_index(adapter_index, adapters)
    for a in torch.unique(adapter_index).tolist():
        if a >= 0:
            yield a, torch.nonzero(adapter_index == a).flatten()


def forward(x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, dropout_p, seed, residual):
    """Returns ``(y, h)``: ``y`` ``[N, d]`` in x's dtype and ``h`` ``[N, r]`` in fp32 (float64 for float64)."""
    dtype = x.dtype
    acc = accumulation_dtype(dtype)
    n, d = x.shape
    res = x if residual is None else residual
    y = res.to(acc).clone()
    h = torch.zeros((n, w_down.shape[1]), dtype=acc, device=x.device)
    for a, rows in _groups(adapter_index, w_down.shape[0]):
        xa = x[rows]
        ha = _matmul(xa, w_down[a].t(), dtype)
        if b_down is not None:
            ha = ha + b_down[a].to(acc)
        u = _matmul(activate(ha, activation), w_up[a].t(), dtype)
        if b_up is not None:
            u = u + b_up[a].to(acc)
        factor = _factor(_keep(seed, dropout_p, rows, d), scales[a].to(acc), dropout_p)
        y = y.index_put((rows,), y[rows] + factor * u)  # out of place, so torch.func.vmap can batch x
        h = h.index_put((rows,), ha)
    return y.to(dtype), h


def backward(grad_y, x, adapter_index, w_down, w_up, b_down, b_up, h, activation, scales, dropout_p, seed,
             residual_is_x):
    """Returns ``(dx, dw_down [A, r, d], db_down [A, r], dw_up [A, d, r], db_up [A, d])``.

    Per adapter ``a`` over its rows, with ``m`` the kept-mask, ``s = scales[a] / (1 - p)``:
        gz = g * m * s;  dw_up[a] = gz^T act(h);  db_up[a] = sum gz
        dh = (gz @ w_up[a]) * act'(h);  dw_down[a] = dh^T x;  db_down[a] = sum dh
        dx = dh @ w_down[a]  (+ g when the residual is x; rows without an adapter get g or 0)
    """
    dtype = x.dtype
    acc = accumulation_dtype(dtype)
    n, d = x.shape
    A, r, _ = w_down.shape
    g = grad_y.to(acc)
    dx = g.clone() if residual_is_x else torch.zeros_like(g)
    dw_down = torch.zeros((A, r, d), dtype=acc, device=x.device)
    dw_up = torch.zeros((A, d, r), dtype=acc, device=x.device)
    db_down = torch.zeros((A, r), dtype=acc, device=x.device)
    db_up = torch.zeros((A, d), dtype=acc, device=x.device)
    for a, rows in _groups(adapter_index, A):
        gz = g[rows] * _factor(_keep(seed, dropout_p, rows, d), scales[a].to(acc), dropout_p)
        ha = h[rows].to(acc)
        dw_up[a] = _matmul(gz.t(), activate(ha, activation), dtype)
        db_up[a] = gz.sum(0)
        dh = _matmul(gz, w_up[a], dtype) * activate_grad(ha, activation)
        dw_down[a] = _matmul(dh.t(), x[rows], dtype)
        db_down[a] = dh.sum(0)
        dx[rows] = dx[rows] + _matmul(dh, w_down[a], dtype)
    wd, wu = w_down.dtype, w_up.dtype
    return dx.to(dtype), dw_down.to(wd), db_down.to(wd), dw_up.to(wu), db_up.to(wu)
