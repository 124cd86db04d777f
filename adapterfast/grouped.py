"""``grouped_adapter``: many adapters in one batch, as a differentiable function of tensors.

Row ``i`` of ``x`` goes through adapter ``adapter_index[i]`` of a bank of stacked adapters, or
through none when the index is -1 (then ``y = residual``). Semantics:
``adapterfast.grouped_reference``. This module checks the inputs (a wrong shape, dtype or device
is a ``ValueError``/``TypeError`` that names it; a few attribute reads accept the common case
first), flattens leading dimensions, draws the dropout seed and runs the op:

- eagerly, where neither forward-mode AD, torch.func nor autocast is on: the backend's native
  differentiable op where it has one (the C++ backend's ``adapterfast_cpu::grouped``, one C++
  autograd node), with or without autograd recording; else the backend's ``forward`` directly
  without autograd, or ``grouped_autograd.GroupedAdapter`` around its ``forward`` and
  ``backward`` with it;
- under forward-mode AD and torch.func transforms, the eager reference
  (``grouped_reference.forward``, plain differentiable torch ops), logged once: the custom op has
  no jvp or vmap rule, and through it a tangent came back missing or wrong;
- otherwise (torch.compile, autocast, meta tensors, DTensors), the custom op of
  ``grouped_ops.py``.

Index values outside ``[-1, A)`` are reported by the op itself (a ``ValueError``), where reading
them needs no graph break.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor
import torch.autograd.forward_ad as _forward_ad

from . import activations, checks, grouped_autograd, grouped_ops, grouped_reference
from . import dropout as dropout_rng
from ._log import warn_once

_PLAIN = frozenset((Tensor, torch.nn.Parameter))
_FLOAT = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_INDEX = frozenset((torch.int64, torch.int32))
_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_any_autocast = torch._C._is_any_autocast_enabled
_scales_cache: dict[tuple[float, int], Tensor] = {}


def _common_case(x, adapter_index, w_down, w_up, b_down, b_up, p, residual) -> bool:
    """True when the inputs are plainly valid CPU tensors (the common case), checked in a few
    attribute reads; False sends them to ``_validate``, which names what is wrong or accepts a
    rarer valid form (other devices, other index dtypes)."""
    if (type(x) not in _PLAIN or type(w_down) not in _PLAIN or type(w_up) not in _PLAIN
            or type(adapter_index) is not Tensor):
        return False
    ws, us = w_down.shape, w_up.shape
    if len(ws) != 3 or len(us) != 3 or x.dim() == 0:
        return False
    A, r, d = ws
    if A == 0 or r == 0 or d == 0 or x.shape[-1] != d or us[0] != A or us[1] != d or us[2] != r:
        return False
    if x.dtype not in _FLOAT or w_down.dtype not in _FLOAT or w_up.dtype not in _FLOAT:
        return False
    if not (x.is_cpu and w_down.is_cpu and w_up.is_cpu and adapter_index.is_cpu):
        return False
    if adapter_index.dtype not in _INDEX or adapter_index.shape != x.shape[:-1]:
        return False
    for b, n in ((b_down, r), (b_up, d)):
        if b is not None and not (type(b) in _PLAIN and b.dtype in _FLOAT and b.dim() == 2 and b.shape[0] == A
                                  and b.shape[1] == n and b.is_cpu):
            return False
    if residual is not None and not (type(residual) in _PLAIN and residual.dtype is x.dtype
                                     and residual.shape == x.shape and residual.is_cpu):
        return False
    return type(p) is float and 0.0 <= p < 1.0


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


def _op_scales(scale, adapters: int, x: Tensor) -> Tensor:
    """``scales_tensor`` for the op's own use: a float scale on CPU comes from a small cache, as
    building the tensor costs a small call several microseconds, and a float64 ``[A]`` tensor
    that needs no grad on x's device (``AdapterBank``'s buffer) is used as it is. The op only
    reads it, and a cached one never leaves this module (a module buffer made from it would
    share it)."""
    if (type(scale) is Tensor and scale.dtype is torch.float64 and not scale.requires_grad
            and scale.shape == (adapters,) and scale.device == x.device):
        return scale
    if type(scale) is not float or not x.is_cpu:
        return scales_tensor(scale, adapters, x.device)
    key = (scale, adapters)
    cached = _scales_cache.get(key)
    if cached is None:
        if len(_scales_cache) >= 64:
            _scales_cache.clear()
        cached = _scales_cache[key] = torch.full((adapters,), scale, dtype=torch.float64)
    return cached


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
    if not _common_case(x, adapter_index, down_weight, up_weight, down_bias, up_bias, dropout, residual):
        _validate(x, adapter_index, down_weight, up_weight, down_bias, up_bias, dropout, residual)
    activation = activations.canonical(activation)
    A = down_weight.shape[0]
    scales = _op_scales(scale, A, x)
    d = x.shape[-1]
    p = float(dropout) if training else 0.0
    seed = dropout_rng.new_seed() if p > 0.0 else None
    shape = x.shape
    index = adapter_index if adapter_index.dim() == 1 else adapter_index.reshape(-1)
    if torch.is_autocast_enabled(x.device.type) and x.dtype not in (torch.float64,
                                                                    torch.get_autocast_dtype(x.device.type)):
        # As fused_adapter does under autocast: the branch runs in the autocast dtype and is added
        # to the residual in the residual's own dtype, as eager ``x + up(act(down(x)))`` would.
        x_amp = x.to(torch.get_autocast_dtype(x.device.type)).reshape(-1, d)
        branch = _run(x_amp, index, down_weight, up_weight, down_bias, up_bias, activation, scales, p, seed,
                      torch.zeros_like(x_amp))
        return (x if residual is None else residual) + branch.view(shape)
    if x.dim() == 2:
        return _run(x, index, down_weight, up_weight, down_bias, up_bias, activation, scales, p, seed, residual)
    y = _run(x.reshape(-1, d), index, down_weight, up_weight, down_bias, up_bias, activation, scales, p, seed,
             None if residual is None else residual.reshape(-1, d))
    return y.view(shape)


def _run(x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, p, seed, residual) -> Tensor:
    """The op on 2-D inputs (the module docstring says which path runs); ``seed`` is None or a
    0-dim int64 CPU tensor."""
    if not _is_compiling() and (_functorch_active() or _forward_ad._current_level >= 0):
        warn_once("adapterfast: grouped_adapter under forward-mode AD or a torch.func transform runs on the eager "
                  "reference (the fused grouped op has no jvp or vmap rule)")
        y, _ = grouped_reference.forward(x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, p,
                                         0 if seed is None else int(seed), residual)
        return y
    if not (_is_compiling() or type(x) is not Tensor or x.is_meta or _any_autocast()):
        backend = grouped_ops.backend_module(x, w_down.shape[1])
        seed = 0 if seed is None else int(seed)
        if backend.differentiable is not None:
            return backend.differentiable(x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, p, seed,
                                          residual)
        if torch.is_grad_enabled():
            return grouped_autograd.apply_fast(x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, p,
                                               seed, residual, backend)
        y, _ = backend.forward(x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, p, seed, residual)
        return y if y.is_contiguous() else y.contiguous()
    y, _ = grouped_ops.grouped_forward(x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, p, seed,
                                       residual)
    return y


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
