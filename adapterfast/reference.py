"""The adapter op in plain eager PyTorch: the specification every backend is tested against.

    y = residual + scale * dropout_p(up(act(down(x) + b_down)) + b_up),   residual = x by default

``adapter`` is the op as autograd sees it (used for gradcheck and as the float64 oracle in tests).
``forward`` and ``backward`` are the same op split the way the custom ops split it, with the
backward written out by hand, so the reference is also the fallback backend.

Precision rules shared by all backends: the matmul operands are in x's dtype (fp32 weights are
cast down for fp16/bf16 activations, as autocast does), accumulation is in fp32 (or float64 for
float64 inputs), the pre-activation ``h`` is kept in fp32 (float64 for float64), ``y`` and ``dx``
come back in x's dtype and the weight gradients in the weights' dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import dropout as _dropout
from .activations import LEAKY_RELU_SLOPE, QUICK_GELU_ALPHA

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(h)`` for a canonical activation name."""
    if activation == "relu":
        return torch.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "silu":
        return F.silu(h)
    if activation == "tanh":
        return torch.tanh(h)
    if activation == "sigmoid":
        return torch.sigmoid(h)
    if activation == "leaky_relu":
        return F.leaky_relu(h, LEAKY_RELU_SLOPE)
    if activation == "identity":
        return h
    if activation == "quick_gelu":
        return h * torch.sigmoid(QUICK_GELU_ALPHA * h)
    raise ValueError(f"unknown activation {activation!r}")


def activate_grad(h: torch.Tensor, activation: str) -> torch.Tensor:
    """``act'(h)``, the derivative the backward multiplies by (see ``activation_backward``)."""
    if activation == "relu":
        return (h > 0).to(h.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + h * pdf
    if activation == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (h + 0.044715 * h**3)
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * h * h)
    if activation == "silu":
        s = torch.sigmoid(h)
        return s * (1.0 + h * (1.0 - s))
    if activation == "tanh":
        t = torch.tanh(h)
        return 1.0 - t * t
    if activation == "sigmoid":
        s = torch.sigmoid(h)
        return s * (1.0 - s)
    if activation == "leaky_relu":
        return torch.where(h > 0, torch.ones_like(h), torch.full_like(h, LEAKY_RELU_SLOPE))
    if activation == "identity":
        return torch.ones_like(h)
    if activation == "quick_gelu":
        s = torch.sigmoid(QUICK_GELU_ALPHA * h)
        return s + QUICK_GELU_ALPHA * h * s * (1.0 - s)
    raise ValueError(f"unknown activation {activation!r}")


def activation_backward(grad: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    """``grad * act'(h)``, with eager autograd's non-finite pattern.

    Eager's ReLU backward is a select (``threshold_backward``), not a product: where ``h <= 0`` the
    gradient is 0 even when ``grad`` is NaN or Inf (a NaN ``scale``, an Inf in ``grad_y``). Every
    other activation's backward multiplies, so NaN/Inf propagate there as they do in eager.
    """
    if activation == "relu":
        return torch.where(h > 0, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    return grad * activate_grad(h, activation)


def apply_branch_scale(t: torch.Tensor, mask: torch.Tensor | None, scale: float, p: float) -> torch.Tensor:
    """``t`` times the factor on the adapter branch: ``scale / (1 - p)`` where kept, 0 where dropped.

    The factor is a Python float applied to ``t`` in ``t``'s own precision, so float64 inputs get
    ``scale / (1 - p)`` in float64 (gradcheck with dropout relies on it) and fp32 inputs get it
    rounded to fp32, as the fused backends do. The mask multiplies (it does not select), so a
    dropped Inf gives NaN, as ``nn.Dropout`` does.
    """
    if mask is None:
        return t * scale
    return (t * (scale / (1.0 - p))) * mask.to(t.dtype)


def dropout_mask(seed: int | torch.Tensor | None, p: float, rows: int, cols: int, device) -> torch.Tensor | None:
    if p == 0.0 or seed is None:
        return None
    return _dropout.keep_mask(int(seed), p, rows, cols, device)


def adapter(x, w_down, w_up, b_down=None, b_up=None, *, activation="relu", scale=1.0,
            dropout_p=0.0, seed=None, residual=None):
    """The op on 2-D ``x`` ``[N, d]``, differentiable by autograd, in x's dtype throughout."""
    h = F.linear(x, w_down.to(x.dtype), None if b_down is None else b_down.to(x.dtype))
    u = F.linear(activate(h, activation), w_up.to(x.dtype), None if b_up is None else b_up.to(x.dtype))
    mask = dropout_mask(seed, dropout_p, x.shape[0], x.shape[1], x.device)
    return (x if residual is None else residual) + apply_branch_scale(u, mask, scale, dropout_p)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What every backend accumulates inputs of ``dtype`` in: float64 for float64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` with operands rounded to ``dtype`` and the product accumulated in fp32 (or float64)."""
    acc = accumulation_dtype(dtype)
    return torch.matmul(a.to(dtype).to(acc), b.to(dtype).to(acc))


def forward(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual):
    """Returns ``(y, h)``: ``y`` ``[N, d]`` in x's dtype and the pre-activation ``h`` ``[N, r]`` in fp32.

    Both are contiguous whatever the inputs' strides (an expanded x, a transposed residual), as the
    op's fake implementation promises and ``fused_adapter``'s final ``view`` needs.
    """
    dtype = x.dtype
    h = _matmul(x, w_down.t(), dtype)
    if b_down is not None:
        h = h + b_down.to(h.dtype)
    a = activate(h, activation)
    u = _matmul(a, w_up.t(), dtype)
    if b_up is not None:
        u = u + b_up.to(u.dtype)
    mask = dropout_mask(seed, dropout_p, x.shape[0], x.shape[1], x.device)
    res = x if residual is None else residual
    y = res.to(u.dtype) + apply_branch_scale(u, mask, scale, dropout_p)
    return y.to(dtype).contiguous(), h.contiguous()


def backward(grad_y, x, w_down, w_up, b_down, b_up, h, activation, scale, dropout_p, seed, residual_is_x, *,
             need_dx=True):
    """Returns ``(dx, dw_down, db_down, dw_up, db_up)``.

    With ``m`` the kept-mask and ``s = scale / (1 - p)``, ``a = act(h)``:
        gz      = g * m * s                      gradient at the up-projection output  [N, d]
        db_up   = sum_rows gz                    dw_up   = gz^T a                     [d, r]
        dh      = (gz @ w_up) * act'(h)          gradient at the pre-activation       [N, r]
                  (a select for ReLU, as in eager: see ``activation_backward``)
        db_down = sum_rows dh                    dw_down = dh^T x                     [r, d]
        dx      = dh @ w_down  (+ g when the residual is x)
    """
    dtype = x.dtype
    acc = accumulation_dtype(dtype)
    g = grad_y.to(acc)
    mask = dropout_mask(seed, dropout_p, x.shape[0], x.shape[1], x.device)
    gz = apply_branch_scale(g, mask, scale, dropout_p)
    a = activate(h, activation)
    dw_up = _matmul(gz.t(), a, dtype)
    db_up = gz.sum(0)
    dh = activation_backward(_matmul(gz, w_up, dtype), h, activation)
    dw_down = _matmul(dh.t(), x, dtype)
    db_down = dh.sum(0)
    dx = _matmul(dh, w_down, dtype)
    if residual_is_x:
        dx = dx + g
    wd = w_down.dtype
    return (dx.to(dtype).contiguous(), dw_down.to(wd).contiguous(), db_down.to(wd), dw_up.to(w_up.dtype).contiguous(),
            db_up.to(w_up.dtype))
