"""``AdapterBank``: A adapters of one shape in stacked parameters, run on a mixed batch at once.

Each row of the input picks its adapter by index (-1: none), and the whole batch runs as one
``grouped_adapter`` call, instead of one adapter call per subset of rows. Existing adapters
(``adapterfast.Adapter``, the eager ``down``/``up`` adapters it replaces, or their state dicts)
load into slots of the bank, and a slot's weights come back out as such a state dict.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from . import activations
from .grouped import grouped_adapter, scales_tensor
from .modules import Adapter, _check_size

__all__ = ["AdapterBank", "grouped_adapter"]


class AdapterBank(nn.Module):
    """``num_adapters`` bottleneck adapters ``d_model -> r -> d_model`` in stacked parameters.

    ``down_weight [A, r, d]``, ``up_weight [A, d, r]`` (and ``down_bias [A, r]``, ``up_bias [A, d]``
    with ``bias``) hold adapter ``a``'s ``nn.Linear`` weights at index ``a``, initialised as
    ``nn.Linear`` does. ``scale`` is one number or one per adapter (kept in the ``scales`` buffer).
    ``forward(x, adapter_index, residual=None)`` gives row ``i`` of ``x`` (``[..., d]``) the
    adapter ``adapter_index[i]`` (integers shaped like ``x.shape[:-1]``; -1: y = residual).
    """

    def __init__(self, num_adapters: int, d_model: int, r: int = 16, *, activation: str = "relu",
                 bias: bool = False, scale=1.0, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        for name, value in (("num_adapters", num_adapters), ("d_model", d_model), ("r", r)):
            _check_size(name, value)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.activation = activations.canonical(activation)
        self.dropout = float(dropout)
        f = dict(device=device, dtype=dtype)
        self.down_weight = nn.Parameter(torch.empty(num_adapters, r, d_model, **f))
        self.up_weight = nn.Parameter(torch.empty(num_adapters, d_model, r, **f))
        self.down_bias = nn.Parameter(torch.empty(num_adapters, r, **f)) if bias else None
        self.up_bias = nn.Parameter(torch.empty(num_adapters, d_model, **f)) if bias else None
        self.register_buffer("scales", scales_tensor(scale, num_adapters, device))
        self.reset_parameters()

    @property
    def num_adapters(self) -> int:
        return self.down_weight.shape[0]

    @property
    def d_model(self) -> int:
        return self.down_weight.shape[2]

    @property
    def r(self) -> int:
        return self.down_weight.shape[1]

    def reset_parameters(self) -> None:
        """Every slot initialised as ``nn.Linear(d, r)`` / ``nn.Linear(r, d)`` initialise themselves."""
        with torch.no_grad():
            for weight, bias, fan_in in ((self.down_weight, self.down_bias, self.d_model),
                                         (self.up_weight, self.up_bias, self.r)):
                bound = 1.0 / math.sqrt(fan_in)
                weight.uniform_(-bound, bound)
                if bias is not None:
                    bias.uniform_(-bound, bound)

    def _apply(self, fn, recurse=True):
        """As ``nn.Module._apply``, but ``scales`` keeps float64: ``bank.to(torch.bfloat16)`` or
        ``bank.half()`` would otherwise round every adapter's scale to the 16-bit dtype (0.7 to
        0.69921875), where ``Adapter`` keeps its scale a Python float. Device moves apply."""
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float64:
            self.scales = scales.to(device=self.scales.device)
        return self

    def forward(self, x: torch.Tensor, adapter_index: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        return grouped_adapter(
            x, adapter_index, self.down_weight, self.up_weight, self.down_bias, self.up_bias,
            activation=self.activation, scale=self.scales, dropout=self.dropout, training=self.training,
            residual=residual,
        )

    def load_adapter(self, slot: int, source) -> None:
        """Copies an adapter into ``slot``: an ``Adapter``, an eager ``down``/``up`` adapter module, or
        a state dict with ``down.weight``, ``up.weight`` (and ``down.bias``, ``up.bias`` when the bank
        has biases). An ``Adapter``'s scale is carried over; its activation must be the bank's."""
        if isinstance(slot, bool) or not isinstance(slot, numbers.Integral) or not 0 <= slot < self.num_adapters:
            raise ValueError(f"slot must be an int in [0, {self.num_adapters}), got {slot!r}")
        scale = None
        if isinstance(source, Mapping):
            state = source
        elif isinstance(source, nn.Module):
            adapter = source if isinstance(source, Adapter) else Adapter.from_module(source)
            if adapter.activation != self.activation:
                raise ValueError(f"adapter activation {adapter.activation!r} differs from the bank's "
                                 f"{self.activation!r}")
            scale = adapter.scale
            state = {k: v for k, v in adapter.state_dict().items() if k.split(".")[0] in ("down", "up")}
        else:
            raise TypeError("source must be an Adapter, an eager adapter module or a state dict, "
                            f"got {type(source).__name__}")
        expected = {"down.weight": (self.r, self.d_model), "up.weight": (self.d_model, self.r)}
        if self.down_bias is not None:
            expected.update({"down.bias": (self.r,), "up.bias": (self.d_model,)})
        if set(state) != set(expected):
            raise ValueError(f"state dict keys {sorted(state)} do not match the bank's {sorted(expected)}")
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"{key} must have shape {list(shape)} for this bank, got {list(state[key].shape)}")
        targets = {"down.weight": self.down_weight, "up.weight": self.up_weight,
                   "down.bias": self.down_bias, "up.bias": self.up_bias}
        with torch.no_grad():
            for key in expected:
                targets[key][slot].copy_(state[key])
            if scale is not None:
                self.scales[slot] = scale

    def adapter_state_dict(self, slot: int) -> dict[str, torch.Tensor]:
        """Slot ``slot`` as an ``Adapter`` (or eager adapter) state dict: ``down.weight``, ``up.weight``, ..."""
        state = {"down.weight": self.down_weight[slot], "up.weight": self.up_weight[slot]}
        if self.down_bias is not None:
            state.update({"down.bias": self.down_bias[slot], "up.bias": self.up_bias[slot]})
        return {k: v.detach().clone() for k, v in state.items()}

    @classmethod
    def from_adapters(cls, adapters: Sequence[nn.Module], *, device=None, dtype=None) -> "AdapterBank":
        """A bank holding copies of ``adapters`` (``Adapter``s or eager adapters of one shape and activation)."""
        if len(adapters) == 0:
            raise ValueError("from_adapters needs at least one adapter")
        converted = [a if isinstance(a, Adapter) else Adapter.from_module(a) for a in adapters]
        first = converted[0]
        shape = (first.down.in_features, first.down.out_features, first.down.bias is not None)
        for i, a in enumerate(converted):
            got = (a.down.in_features, a.down.out_features, a.down.bias is not None)
            if got != shape or a.activation != first.activation or a.dropout != first.dropout:
                raise ValueError(f"adapter {i} (d={got[0]}, r={got[1]}, bias={got[2]}, activation={a.activation!r}, "
                                 f"dropout={a.dropout}) differs from adapter 0 (d={shape[0]}, r={shape[1]}, "
                                 f"bias={shape[2]}, activation={first.activation!r}, dropout={first.dropout})")
        weight = first.down.weight
        bank = cls(len(converted), shape[0], shape[1], activation=first.activation, bias=shape[2],
                   dropout=first.dropout, device=device or weight.device, dtype=dtype or weight.dtype)
        for slot, a in enumerate(converted):
            bank.load_adapter(slot, a)
        return bank

    def extra_repr(self) -> str:
        return (f"num_adapters={self.num_adapters}, d_model={self.d_model}, r={self.r}, "
                f"activation={self.activation!r}, bias={self.down_bias is not None}, dropout={self.dropout}")
