"""``fused_adapter``: the op as a differentiable function of tensors of any leading shape.

It checks its inputs (a wrong shape, dtype or device is a ``ValueError``/``TypeError`` that names
it), flattens the leading dimensions to ``[N, d]``, draws the dropout seed, and runs the op:

- eagerly, on the backend ``dispatch.select`` names (the fast path: one cheap check of the common
  case, a cached backend choice, then one call): the backend's native differentiable op where it
  has one (the C++ backend) and neither forward-mode AD nor autocast is on, else
  ``autograd.FusedAdapter`` around its forward and backward;
- under torch.func transforms, through ``transforms.FusedAdapterFunc`` (which has the jvp and
  vmap rules those need);
- under ``torch.compile``, on meta tensors and on DTensors, through the ``torch.library`` custom
  op of ``ops.py``, which the compiler sees as one node with a fake (shape-only) kernel.

Accepted dtypes: x, the weights and biases in one dtype; or fp16/bf16 x with fp32 weights
(mixed precision); or anything autocast produces. Everything else is a ``TypeError``, as for
``nn.Linear``. The residual has x's dtype (under autocast, any floating dtype).
"""
from __future__ import annotations

import numbers
import sys

import torch
from torch import Tensor
import torch.autograd.forward_ad as _forward_ad

from . import activations, autograd, checks, dispatch, ops, transforms
from . import dropout as dropout_rng

_HALF = (torch.float16, torch.bfloat16)
_CANONICAL = frozenset(activations.ACTIVATIONS)
_PLAIN = frozenset((Tensor, torch.nn.Parameter))
_FLOAT = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_any_autocast = torch._C._is_any_autocast_enabled


def _run(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual) -> Tensor:
    """The op on 2-D inputs; ``seed`` is None or a 0-dim int64 CPU tensor."""
    if _is_compiling() or (type(x) is not Tensor and _sharded(x)) or x.is_meta:
        y, _ = ops.adapter_forward(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual)
        return y
    name = dispatch.select(x, w_down.shape[0])
    if _functorch_active():
        y, _ = transforms.FusedAdapterFunc.apply(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed,
                                                 residual, name)
        return y
    kernels = dispatch.kernels(name)
    seed = 0 if seed is None else int(seed)
    if torch.is_grad_enabled() or _forward_ad._current_level >= 0:
        if kernels.differentiable is not None and _forward_ad._current_level < 0 and not _any_autocast():
            return kernels.differentiable(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual)
        y, _ = autograd.apply_fast(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual,
                                   kernels)
    else:
        y, _ = autograd.run_forward(kernels, x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed,
                                    residual)
    return y


def _common_case(x, w_down, w_up, b_down, b_up, scale, p, residual, autocast) -> bool:
    """True when the inputs are plainly valid (the common case), checked in a few attribute reads;
    False sends them to ``_validate``, which names what is wrong or accepts a rarer valid form."""
    if type(x) not in _PLAIN or type(w_down) not in _PLAIN or type(w_up) not in _PLAIN:
        return False  # not tensors, or subclasses such as DTensor: _validate decides
    ws, us = w_down.shape, w_up.shape
    if len(ws) != 2 or len(us) != 2 or x.dim() == 0:
        return False
    r, d = ws
    if x.shape[-1] != d or us[0] != d or us[1] != r or r == 0 or d == 0:
        return False
    wdt, xdt = w_down.dtype, x.dtype
    if w_up.dtype is not wdt or xdt not in _FLOAT:
        return False
    if not autocast and wdt is not xdt and not (wdt is torch.float32 and xdt in _HALF):
        return False
    # Tensor.device builds a torch.device object on every read (about 1 us here); is_cpu does not.
    on_x_device = _is_cpu if x.is_cpu else _SameDevice(x.device)
    if not (on_x_device(w_down) and on_x_device(w_up)):
        return False
    for b, n in ((b_down, r), (b_up, d)):
        if b is not None and not (type(b) in _PLAIN and b.dtype is wdt and b.dim() == 1 and b.shape[0] == n
                                  and on_x_device(b)):
            return False
    if residual is not None and not (isinstance(residual, Tensor) and residual.dtype is xdt
                                     and residual.shape == x.shape and on_x_device(residual)):
        return False
    return type(scale) is float and type(p) is float and 0.0 <= p < 1.0


def _is_cpu(t: Tensor) -> bool:
    return t.is_cpu


class _SameDevice:
    """Whether a tensor is on ``device``."""

    __slots__ = ("device",)

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, t: Tensor) -> bool:
        return t.device == self.device


def _sharded(t) -> bool:
    """Whether ``t`` is a DTensor; looked up lazily, as importing DTensor costs ~0.5 s and anything
    that made a DTensor has imported it already."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def _validate(x, w_down, w_up, b_down, b_up, scale, p, residual, *, autocast: bool = False) -> None:
    checks.check_floats((("x", x, False), ("down_weight", w_down, False), ("up_weight", w_up, False),
                         ("down_bias", b_down, True), ("up_bias", b_up, True), ("residual", residual, True)))
    d = checks.check_features(x)
    if (w_down.dim() == 2 and w_up.dim() == 2 and w_down.shape[1] != d and w_down.shape[0] >= 1
            and tuple(w_up.shape) == (w_down.shape[1], w_down.shape[0])):
        raise ValueError(f"x's last dimension {d} does not match the adapter's d_model {w_down.shape[1]} "
                         f"(x has shape {tuple(x.shape)}, down_weight {tuple(w_down.shape)})")
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
    checks.check_residual(x, residual, any_dtype=autocast)
    sharded = [name for name, t in (("down_weight", w_down), ("up_weight", w_up), ("down_bias", b_down),
                                    ("up_bias", b_up)) if _sharded(t)]
    if sharded and not _sharded(x):
        raise TypeError(f"{', '.join(sharded)} {'is a DTensor' if len(sharded) == 1 else 'are DTensors'} (sharded, "
                        "e.g. by FSDP2's fully_shard) but x is a plain tensor. With FSDP2, fully_shard the "
                        "Adapter or a module above it, not its down/up nn.Linear layers: their forward never "
                        "runs, so FSDP never gathers their weights")
    checks.check_devices(x, (("down_weight", w_down), ("up_weight", w_up), ("down_bias", b_down),
                             ("up_bias", b_up), ("residual", residual)))
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    checks.check_dropout(p)
    _check_dtypes(x, w_down, w_up, b_down, b_up, autocast)


def _check_dtypes(x, w_down, w_up, b_down, b_up, autocast: bool) -> None:
    """The dtype rules of the module docstring; ``x`` is the input before autocast's cast."""
    wdt = w_down.dtype
    for name, t in (("up_weight", w_up), ("down_bias", b_down), ("up_bias", b_up)):
        if t is not None and t.dtype != wdt:
            raise TypeError(f"{name} is {t.dtype} but down_weight is {wdt}: the weights and biases must share "
                            "one dtype")
    xdt = x.dtype
    if autocast and xdt != torch.float64 and wdt != torch.float64:
        return
    if wdt == xdt or (wdt == torch.float32 and xdt in _HALF):
        return
    raise TypeError(f"x is {xdt} but the weights are {wdt}: adapterfast accepts weights in x's dtype, fp32 "
                    "weights with fp16/bf16 x, or autocast (as nn.Linear, it does not cast "
                    f"{xdt} inputs to {wdt} weights); cast x or the adapter (adapter.to({xdt}))")


def _autocast_enabled(x) -> bool:
    return (isinstance(x, Tensor) and torch._C._is_any_autocast_enabled() and x.device.type != "meta"
            and torch.is_autocast_enabled(x.device.type))


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
    return fused(x, down_weight, up_weight, down_bias, up_bias, activation, scale, dropout, training, residual)


def fused(x, down_weight, up_weight, down_bias, up_bias, activation, scale, dropout, training, residual) -> Tensor:
    """``fused_adapter`` with positional arguments (what ``Adapter.forward`` calls)."""
    autocast = _any_autocast() and _autocast_enabled(x)
    if not _common_case(x, down_weight, up_weight, down_bias, up_bias, scale, dropout, residual, autocast):
        _validate(x, down_weight, up_weight, down_bias, up_bias, scale, dropout, residual, autocast=autocast)
    if type(activation) is not str or activation not in _CANONICAL:
        activation = activations.canonical(activation)
    if training is not True and training is not False:
        raise TypeError(f"training must be a bool, got {type(training).__name__} {training!r}")
    d = x.shape[-1]
    p = float(dropout) if training else 0.0
    seed = dropout_rng.new_seed() if p > 0.0 else None
    if autocast:
        # Under autocast the branch runs in the autocast dtype, like the nn.Linear layers of an eager
        # adapter, while the residual keeps its own dtype: eager's ``x + up(act(down(x)))`` adds a
        # bf16/fp16 branch to an fp32 residual in fp32. When the two dtypes differ the fused op computes
        # the branch alone (on a zero residual) and the residual is added outside it, as eager does.
        shape = x.shape
        x_amp = _autocast_cast(x)
        if down_weight.dtype not in (torch.float32, x_amp.dtype):  # e.g. fp16 weights under bf16 autocast
            down_weight, up_weight = down_weight.to(x_amp.dtype), up_weight.to(x_amp.dtype)
            down_bias = None if down_bias is None else down_bias.to(x_amp.dtype)
            up_bias = None if up_bias is None else up_bias.to(x_amp.dtype)
        res = x if residual is None else residual
        if res.dtype != x_amp.dtype:
            branch = _run(
                x_amp.reshape(-1, d), down_weight, up_weight, down_bias, up_bias, activation, float(scale), p, seed,
                torch.zeros((x_amp.numel() // d, d), dtype=x_amp.dtype, device=x_amp.device),
            )
            return res + branch.view(shape)
        x = x_amp
    if x.dim() == 2:
        return _run(x, down_weight, up_weight, down_bias, up_bias, activation, float(scale), p, seed, residual)
    shape = x.shape
    y = _run(x.reshape(-1, d), down_weight, up_weight, down_bias, up_bias, activation, float(scale), p, seed,
             None if residual is None else residual.reshape(-1, d))
    return y.view(shape)
