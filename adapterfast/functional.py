"""``fused_adapter``: the op as a differentiable function of tensors of any leading shape.

It checks its inputs (a wrong shape, dtype or device is a ``ValueError``/``TypeError`` that names
it), flattens the leading dimensions to ``[N, d]``, draws the dropout seed, and runs the custom
op of ``ops.py``, whose registered autograd formula calls the backward op.
"""
from __future__ import annotations

import numbers
import sys

import torch
from torch import Tensor

from . import activations, ops
from . import dropout as dropout_rng


def _run(x, w_down, b_down, w_up, b_up, residual, seed, activation, scale, dropout_p) -> Tensor:
    """The op on 2-D inputs; its autograd formula is registered on the custom op (``ops.py``)."""
    y, _ = ops.adapter_forward(x, w_down, b_down, w_up, b_up, residual, seed, activation, scale, dropout_p)
    return y


def _sharded(t) -> bool:
    """Whether ``t`` is a DTensor; looked up lazily, as importing DTensor costs ~0.5 s and anything
    that made a DTensor has imported it already."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def _describe(t: Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def _check_tensor(name: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _validate(x, w_down, w_up, b_down, b_up, residual, scale, p, *, autocast: bool = False) -> None:
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
        if residual.dtype != x.dtype and not autocast:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    sharded = [name for name, t in (("down_weight", w_down), ("up_weight", w_up), ("down_bias", b_down),
                                    ("up_bias", b_up)) if _sharded(t)]
    if sharded and not _sharded(x):
        raise TypeError(f"{', '.join(sharded)} {'is a DTensor' if len(sharded) == 1 else 'are DTensors'} (sharded, "
                        "e.g. by FSDP2's fully_shard) but x is a plain tensor. With FSDP2, fully_shard the "
                        "Adapter or a module above it, not its down/up nn.Linear layers: their forward never "
                        "runs, so FSDP never gathers their weights")
    for name, t in (("down_weight", w_down), ("up_weight", w_up), ("down_bias", b_down),
                    ("up_bias", b_up), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: "
                             f"x {_describe(x)}, {name} {_describe(t)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")


def _autocast_enabled(x) -> bool:
    return isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type)


def _autocast_cast(x: Tensor) -> Tensor:
    """``x`` as autocast would hand it to ``nn.Linear``: floating types other than float64 are cast
    to the autocast dtype of x's device (a differentiable cast, so x's gradient comes back in x's
    dtype). The weights are not cast here: the op casts them to x's dtype itself and returns their
    gradients in their own dtype, so fp32 master weights get fp32 gradients."""
    dtype = torch.get_autocast_dtype(x.device.type)
    return x if x.dtype in (dtype, torch.float64) else x.to(dtype)


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
    autocast = _autocast_enabled(x)
    _validate(x, down_weight, up_weight, down_bias, up_bias, residual, scale, dropout, autocast=autocast)
    activation = activations.canonical(activation)
    d = x.shape[-1]
    p = float(dropout) if training else 0.0
    seed = dropout_rng.new_seed() if p > 0.0 else None
    shape = x.shape
    if autocast:
        # Under autocast the branch runs in the autocast dtype, like the nn.Linear layers of an eager
        # adapter, while the residual keeps its own dtype: eager's ``x + up(act(down(x)))`` adds a
        # bf16/fp16 branch to an fp32 residual in fp32. When the two dtypes differ the fused op computes
        # the branch alone (on a zero residual) and the residual is added outside it, as eager does.
        x_amp = _autocast_cast(x)
        res = x if residual is None else residual
        if res.dtype != x_amp.dtype:
            branch = _run(
                x_amp.reshape(-1, d), down_weight, down_bias, up_weight, up_bias,
                torch.zeros((x_amp.numel() // d, d), dtype=x_amp.dtype, device=x_amp.device),
                seed, activation, float(scale), p,
            )
            return res + branch.view(shape)
        x = x_amp
    x2 = x.reshape(-1, d)
    res2 = None if residual is None else residual.reshape(-1, d)
    y = _run(
        x2, down_weight, down_bias, up_weight, up_bias, res2, seed, activation, float(scale), p
    )
    return y.view(shape)
