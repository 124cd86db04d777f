"""``Adapter``, the drop-in module, and ``replace_adapters``, which swaps existing adapters for it.

``Adapter`` keeps the parameters of the common eager adapter (``down`` and ``up`` ``nn.Linear``
submodules) so its state dict is interchangeable with one, and runs ``fused_adapter``.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn

from . import activations
from ._log import logger
from .functional import fused, fused_adapter


def _check_size(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (a float), got {type(value).__name__} {value!r}")


class Adapter(nn.Module):
    """A bottleneck adapter: ``residual + scale * dropout(up(act(down(x))))``, residual = x by default.

    ``down = nn.Linear(d_model, r)`` and ``up = nn.Linear(r, d_model)`` (with biases if ``bias``),
    initialised as ``nn.Linear`` does, like the eager adapters it replaces.
    """

    def __init__(self, d_model: int, r: int = 16, *, activation: str = "relu", bias: bool = False,
                 scale: float = 1.0, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        _check_size("d_model", d_model)
        _check_size("r", r)
        _check_real("scale", scale)
        _check_real("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype (the adapter's parameters are trained), "
                            f"got {dtype}")
        self.activation = activations.canonical(activation)
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.down = nn.Linear(d_model, r, bias=bias, device=device, dtype=dtype)
        self.up = nn.Linear(r, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        modules = self._modules
        down, up = modules["down"], modules["up"]
        if type(down) is nn.Linear and type(up) is nn.Linear:
            # Plain nn.Linear layers hold their tensors in _parameters: read there, this skips four
            # nn.Module.__getattr__ calls, about a tenth of a small call's Python. Anything else
            # (parametrized or FSDP-wrapped layers change their class) is read as attributes.
            dp, up_ = down._parameters, up._parameters
            return fused(x, dp["weight"], up_["weight"], dp["bias"], up_["bias"], self.activation, self.scale,
                         self.dropout, self.training, residual)
        return fused(x, down.weight, up.weight, down.bias, up.bias, self.activation, self.scale, self.dropout,
                     self.training, residual)

    def extra_repr(self) -> str:
        return (f"d_model={self.up.out_features}, r={self.down.out_features}, activation={self.activation!r}, "
                f"scale={self.scale}, dropout={self.dropout}")

    @classmethod
    def from_module(cls, module: nn.Module) -> "Adapter":
        """An ``Adapter`` computing what ``module`` computes, sharing its parameters.

        ``module`` must have ``down``/``up`` ``nn.Linear`` submodules and one activation module
        (ReLU, GELU, SiLU, Tanh, Sigmoid, LeakyReLU(0.01), Identity, or a transformers activation).
        A ``scale`` float attribute and an ``nn.Dropout`` child are carried over if present.
        """
        down, up = getattr(module, "down", None), getattr(module, "up", None)
        if not isinstance(down, nn.Linear) or not isinstance(up, nn.Linear):
            raise TypeError(f"{type(module).__name__} has no `down`/`up` nn.Linear submodules")
        if down.in_features != up.out_features or down.out_features != up.in_features:
            raise ValueError(f"down {down.in_features}->{down.out_features} and up "
                             f"{up.in_features}->{up.out_features} do not form a bottleneck")
        if (down.bias is None) != (up.bias is None):
            raise ValueError("down and up must both have biases or both have none")
        activation = _find_activation(module)
        scale = getattr(module, "scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"{type(module).__name__}.scale must be a float to convert, got {type(scale).__name__}")
        drop = [m.p for m in module.children() if isinstance(m, nn.Dropout)]
        adapter = cls.__new__(cls)
        nn.Module.__init__(adapter)
        adapter.activation = activation
        adapter.scale = float(scale)
        adapter.dropout = float(drop[0]) if drop else 0.0
        adapter.down, adapter.up = down, up
        adapter.train(module.training)
        return adapter


def _find_activation(module: nn.Module) -> str:
    found = []
    for name, child in module.named_children():
        if name in ("down", "up") or isinstance(child, nn.Dropout):
            continue
        kind = activations.from_module(child)
        if kind is None:
            raise TypeError(f"{type(module).__name__}.{name} ({type(child).__name__}) is not an activation "
                            "the fused op computes")
        found.append(kind)
    if len(found) != 1:
        raise TypeError(f"{type(module).__name__} must have exactly one activation module, found {len(found)}")
    return found[0]


def _computes_the_same(original: nn.Module, adapter: Adapter) -> bool:
    """Whether ``adapter`` reproduces ``original`` on a random input, in float64, in eval mode."""
    d = adapter.down.in_features
    param = adapter.down.weight
    x = torch.randn(3, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(param.device)
    modes = original.training
    try:
        original.eval()
        with torch.no_grad():
            params = {n: p.detach().double() for n, p in original.named_parameters()}
            expected = torch.func.functional_call(original, params, (x,))
            got = fused_adapter(x, params["down.weight"], params["up.weight"], params.get("down.bias"),
                                params.get("up.bias"), activation=adapter.activation, scale=adapter.scale,
                                training=False)
    except Exception:
        return False
    finally:
        original.train(modes)
    return isinstance(expected, torch.Tensor) and torch.allclose(expected, got, rtol=1e-9, atol=1e-9)


def replace_adapters(model: nn.Module, *, verify: bool = True) -> int:
    """Replaces, in place, every eager adapter in ``model`` by an ``Adapter`` sharing its parameters.

    An eager adapter is a module with ``down``/``up`` ``nn.Linear`` submodules and one activation
    module. With ``verify`` (the default) each candidate is first run against its replacement on a
    random input; one whose forward computes something else (a layer norm, a gate, no residual) is
    left alone and logged. Weights, device, dtype and ``requires_grad`` are kept because the
    parameters themselves are reused. Returns the number of modules replaced; when that is 0 it
    logs why (no candidate, or each candidate and the reason it was left).

    A module cannot replace itself in place, so when ``model`` is itself an eager adapter it is not
    swapped (the call logs this and returns 0): convert it with ``model = Adapter.from_module(model)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_adapters: model must be an nn.Module, got {type(model).__name__}")
    swaps, left = [], []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            path = f"{parent_name}.{name}".lstrip(".")
            if isinstance(child, Adapter):
                continue
            reason = _why_not_replaceable(child, verify)
            if reason is None:
                swaps.append((parent, name, Adapter.from_module(child)))
            elif reason != _NOT_A_CANDIDATE:
                left.append((path, type(child).__name__, reason))
                if reason == _COMPUTES_ELSE:
                    logger.warning("adapterfast: left %s (%s) alone: its forward is not x + up(act(down(x)))",
                                   path, type(child).__name__)
    for parent, name, adapter in swaps:
        setattr(parent, name, adapter)
    if not swaps:
        _say_why_none(model, left, verify)
    return len(swaps)


_NOT_A_CANDIDATE = "no down/up nn.Linear submodules"
_COMPUTES_ELSE = "its forward is not x + up(act(down(x)))"


def _why_not_replaceable(module: nn.Module, verify: bool) -> str | None:
    """Why ``module`` is not swapped for an ``Adapter``, or None when it is."""
    if not (isinstance(getattr(module, "down", None), nn.Linear) and isinstance(getattr(module, "up", None), nn.Linear)):
        return _NOT_A_CANDIDATE
    try:
        adapter = Adapter.from_module(module)
    except (TypeError, ValueError) as error:
        return str(error)
    if verify and not _computes_the_same(module, adapter):
        return _COMPUTES_ELSE
    return None


def _say_why_none(model: nn.Module, left: list, verify: bool) -> None:
    """Logs why ``replace_adapters`` replaced nothing in ``model``."""
    kind = type(model).__name__
    if _why_not_replaceable(model, verify) is None:
        logger.warning("adapterfast: replace_adapters replaced nothing: %s is itself an eager adapter, and a module "
                       "cannot replace itself in place; use `model = adapterfast.Adapter.from_module(model)`", kind)
    elif left:
        logger.warning("adapterfast: replace_adapters replaced nothing in %s: %s", kind,
                       "; ".join(f"{path} ({name}): {reason}" for path, name, reason in left))
    else:
        logger.warning("adapterfast: replace_adapters replaced nothing in %s: no submodule has `down` and `up` "
                       "nn.Linear submodules and one activation module (an eager adapter)", kind)
