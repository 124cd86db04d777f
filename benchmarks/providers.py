"""The implementations measured side by side, all holding the same weights.

- ``eager``: the seed's adapter module, ``x + up(act(down(x)))`` with bias-free ``nn.Linear``s
  (the baseline every ratio is taken against);
- ``compile`` / ``compile_max_autotune``: ``torch.compile`` of a copy of that module
  (default mode; ``max-autotune`` is offered on CUDA);
- ``adapterhub``: the AdapterHub ``adapters`` bottleneck layer (``adapters.methods.modeling.Adapter``)
  built standalone with a sequential, no-layer-norm config and called as ``layer(x, residual=x)``.
  Its ``nn.Linear``s always carry biases (zeroed here, trainable as in real use) and its forward
  multiplies by ``scaling`` and applies ``nn.Dropout(0.0)``: that is what the library runs;
- ``adapterfast``: ``adapterfast.Adapter`` with the seed's weights loaded.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn

ORDER = ("eager", "compile", "compile_max_autotune", "adapterhub", "adapterfast")
LABELS = {
    "eager": "eager (seed)",
    "compile": "torch.compile",
    "compile_max_autotune": "torch.compile max-autotune",
    "adapterhub": "AdapterHub adapters",
    "adapterfast": "adapterfast",
}
# What a provider raises on a point it cannot run (out of memory, an unsupported dtype, size or
# backend): recorded in the result row. Anything else is a bug in the harness and propagates.
PROVIDER_ERRORS = (RuntimeError, ValueError, TypeError)

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class EagerAdapter(nn.Module):
    """The adapter as users write it in plain PyTorch: ``residual + scale * up(act(down(x)))``.

    With the defaults it is the seed project's module (bias-free ``nn.Linear``s, ReLU, residual = x,
    no scale multiply): the benchmarks' baseline, and the tests' eager twin (``tests/helpers.py``).
    Its parameter names are ``adapterfast.Adapter``'s, so state dicts load both ways. No dropout:
    ``nn.Dropout``'s masks are not the op's.
    """

    def __init__(self, d_model: int, r: int = 16, activation: str = "relu", *, bias: bool = False,
                 scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if dropout != 0.0:
            raise ValueError("the eager adapter has no dropout: nn.Dropout's masks differ from the op's")
        self.down = nn.Linear(d_model, r, bias=bias)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(r, d_model, bias=bias)
        self.scale = scale

    def forward(self, x, residual=None):
        branch = self.up(self.act(self.down(x)))
        if self.scale != 1.0:  # the seed multiplies by nothing; 1.0 * t would add a kernel to the baseline
            branch = self.scale * branch
        return (x if residual is None else residual) + branch


class AdapterHubLayer(nn.Module):
    """AdapterHub's bottleneck layer called the way its model integration calls it (residual = x)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x, residual_input=x)[0]


@dataclasses.dataclass
class Provider:
    name: str
    module: nn.Module | None
    params: list
    skip: str | None = None  # why this provider is not measured here
    note: str | None = None  # what is worth knowing about how it was built

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)


def _adapterhub(seed: EagerAdapter, d: int, r: int, activation: str) -> tuple[nn.Module | None, str | None]:
    try:
        from adapters.configuration import SeqBnConfig
        from adapters.methods.modeling import Adapter as HubAdapter
    except (ImportError, AttributeError) as error:  # not installed, or an incompatible transformers
        return None, f"AdapterHub `adapters` not importable: {type(error).__name__}: {error}"
    try:
        config = SeqBnConfig(reduction_factor=max(d // r, 1), non_linearity=activation, scaling=1.0,
                             dropout=0.0, ln_before=False, ln_after=False, use_gating=False,
                             adapter_residual_before_ln=False)
        layer = HubAdapter("bench", input_size=d, down_sample=r, config=config)
        down = layer.adapter_down[0]
        with torch.no_grad():
            down.weight.copy_(seed.down.weight)
            down.bias.zero_()
            layer.adapter_up.weight.copy_(seed.up.weight)
            layer.adapter_up.bias.zero_()
    except (*PROVIDER_ERRORS, AttributeError, KeyError) as error:  # an adapters version with another API
        return None, f"could not build AdapterHub's Adapter standalone: {type(error).__name__}: {error}"
    return AdapterHubLayer(layer), None


def build(names, d: int, r: int, activation: str, dtype: torch.dtype, device: str, seed: int = 0) -> list[Provider]:
    """The providers named in ``names`` (in ``ORDER``), each with the same weights, in train mode."""
    torch.manual_seed(seed)
    eager = EagerAdapter(d, r, activation)
    providers = []
    for name in [n for n in ORDER if n in names]:
        module, skip, note = None, None, None
        if name == "eager":
            module = eager
        elif name in ("compile", "compile_max_autotune"):
            if name == "compile_max_autotune" and device != "cuda":
                skip = "max-autotune is measured on CUDA only"
            else:
                mode = "max-autotune" if name == "compile_max_autotune" else "default"
                module = torch.compile(copy.deepcopy(eager), mode=mode, dynamic=False)
                note = f"torch.compile(mode={mode!r}, dynamic=False)"
        elif name == "adapterhub":
            module, skip = _adapterhub(eager, d, r, activation)
            note = "adapters.methods.modeling.Adapter, SeqBnConfig, biases zeroed (trainable), scaling=1.0"
        elif name == "adapterfast":
            import adapterfast

            module = adapterfast.Adapter(d, r, activation=activation)
            module.load_state_dict(eager.state_dict())
        else:
            raise ValueError(f"unknown provider {name!r}; choose from {', '.join(ORDER)}")
        if module is not None:
            module = module.to(device=device, dtype=dtype).train()
        params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
        providers.append(Provider(name, module, params, skip, note))
    return providers


def adapterfast_backend(x: torch.Tensor, r: int) -> str:
    """Which adapterfast backend computes this input (``cpu``, ``triton`` or ``reference``)."""
    from adapterfast import dispatch

    try:
        return dispatch.select(x, r)
    except ValueError as error:  # a forced backend that cannot run this input
        return f"error: {error}"
