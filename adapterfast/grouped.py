"""``grouped_adapter``: many adapters in one batch, as a differentiable function of tensors.

Row ``i`` of ``x`` goes through adapter ``adapter_index[i]`` of a bank of stacked adapters, or
through none when the index is -1 (then ``y = residual``). Semantics:
``adapterfast.grouped_reference``. This module checks the inputs (a wrong shape, dtype or device
is a ``ValueError``/``TypeError`` that names it), flattens leading dimensions, draws the dropout
seed and runs the custom op of ``grouped_ops.py``. Index values outside ``[-1, A)`` are reported
by the op itself (a ``ValueError``), where reading them needs no graph break.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import activations, checks, grouped_ops
from . import dropout as dropout_rng


def _validate(x, adapter_index, w_down, w_up, b_down, b_up, p, residual) -> None:
    checks.check_floats((("x", x, False), ("down_weight", w_down, False), ("up_weight", w_up, False),
                         ("down_bias", b_down, True), ("up_bias", b_up, True), ("residual", residual, True)))
    d = checks.check_features(x)
    if w_down.dim() != 3 or w_down.shape[0] < 1 or w_down.shape[1] < 1 or w_down.shape[2] != d:
        raise ValueError(f"down_weight must have shape [A, r, d] = [A, r, {d}] with A, r >= 1, got "
                         f"{tuple(w_down.shape)}")
    A, r, _ = w_down.shape
    if tuple(w_up.shape) != (A, d, r):
        raise ValueError(f"up_weight must have shape [A, d, r] = [{A}, {d}, {r}], got {tuple(w_up.shape)}")
    if b_down is not None and tuple(b_down.shape) != (A, r):
        raise ValueError(f"down_bias must have shape [A, r] = [{A}, {r}], got {tuple(b_down.shape)}")
    if b_up is not None and tuple(b_up.shape) != (A, d):
        raise ValueError(f"up_bias must have shape [A, d] = [{A}, {d}], got {tuple(b_up.shape)}")
    if not isinstance(adapter_index, Tensor):
        raise TypeError(f"adapter_index must be a torch.Tensor of ints, got {type(adapter_index).__name__}")
    if adapter_index.is_floating_point() or adapter_index.is_complex() or adapter_index.dtype == torch.bool:
        raise TypeError(f"adapter_index must be an integer tensor, got {adapter_index.dtype}")
    if tuple(adapter_index.shape) not in (tuple(x.shape[:-1]), (x.numel() // d,)):
        raise ValueError(f"adapter_index must have x's leading shape {tuple(x.shape[:-1])} (one adapter per row), "
                         f"got {tuple(adapter_index.shape)}")
    checks.check_residual(x, residual)
    checks.check_devices(x, (("down_weight", w_down), ("up_weight", w_up), ("down_bias", b_down), ("up_bias", b_up),
                             ("adapter_index", adapter_index), ("residual", residual)))
    checks.check_dropout(p)


def scales_tensor(scale, adapters: int, device) -> Tensor:
    """Per-adapter scales as the op takes them: a float64 ``[A]`` tensor on ``device`` (constants, no grad)."""
    if isinstance(scale, Tensor):
        if scale.dim() == 0:
            scale = scale.reshape(1).expand(adapters)
        if tuple(scale.shape) != (adapters,):
            raise ValueError(f"scale must be a number or have one entry per adapter ([{adapters}]), "
                             f"got shape {tuple(scale.shape)}")
        return scale.detach().to(device=device, dtype=torch.float64)
    if isinstance(scale, bool):
        raise TypeError("scale must be a real number, a sequence of them or a tensor, got bool")
    if isinstance(scale, numbers.Real):
        return torch.full((adapters,), float(scale), dtype=torch.float64, device=device)
    values = list(scale)
    if len(values) != adapters or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        raise ValueError(f"scale must be a number or one number per adapter ({adapters}), got {scale!r}")
    return torch.tensor(values, dtype=torch.float64, device=device)


def grouped_adapter(
    x: Tensor,
    adapter_index: Tensor,
    down_weight: Tensor,
    up_weight: Tensor,
    down_bias: Tensor | None = None,
    up_bias: Tensor | None = None,
    *,
    activation: str = "relu",
    scale=1.0,
    dropout: float = 0.0,
    training: bool = True,
    residual: Tensor | None = None,
) -> Tensor:
    """``residual + scale[a] * dropout(up_a(act(down_a(x) + down_bias[a])) + up_bias[a])`` per row, fused.

    ``x`` is ``[..., d]`` and ``adapter_index`` (integers, ``x.shape[:-1]``) picks each row's
    adapter, -1 for none. ``down_weight`` ``[A, r, d]`` and ``up_weight`` ``[A, d, r]`` stack the
    ``nn.Linear`` weights of A adapters (biases ``[A, r]``, ``[A, d]``); ``scale`` is a number,
    one number per adapter, or an ``[A]`` tensor (constants). Dropout is ``fused_adapter``'s mask
    for the whole batch, applied only when ``training``. Gradients reach only the adapters used.
    """
    _validate(x, adapter_index, down_weight, up_weight, down_bias, up_bias, dropout, residual)
    activation = activations.canonical(activation)
    A = down_weight.shape[0]
    scales = scales_tensor(scale, A, x.device)
    d = x.shape[-1]
    p = float(dropout) if training else 0.0
    seed = dropout_rng.new_seed() if p > 0.0 else None
    shape = x.shape
    index = adapter_index.reshape(-1)
    if torch.is_autocast_enabled(x.device.type) and x.dtype not in (torch.float64,
                                                                    torch.get_autocast_dtype(x.device.type)):
        # As fused_adapter does under autocast: the branch runs in the autocast dtype and is added
        # to the residual in the residual's own dtype, as eager ``x + up(act(down(x)))`` would.
        x_amp = x.to(torch.get_autocast_dtype(x.device.type)).reshape(-1, d)
        branch, _ = grouped_ops.grouped_forward(
            x_amp, index, down_weight, up_weight, down_bias, up_bias, activation, scales, p, seed,
            torch.zeros_like(x_amp),
        )
        return (x if residual is None else residual) + branch.view(shape)
    y, _ = grouped_ops.grouped_forward(
        x.reshape(-1, d), index, down_weight, up_weight, down_bias, up_bias, activation, scales, p, seed,
        None if residual is None else residual.reshape(-1, d),
    )
    return y.view(shape)


def pad_rank(t: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """``t`` zero-padded to rank ``r`` along ``dim``, so adapters of different ranks stack into one
    ``[A, r, d]``/``[A, d, r]`` tensor exactly: a padded rank's down row (and bias) gives act(0) and
    its zero up column cancels it."""
    missing = r - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim)
