"""What an adapter is, once: its option fields, their checks, its dtype and its initialisation.

``AdapterFields`` holds the nine option fields; ``AdapterOptions`` (``add_adapters``, no PEFT) and
the PEFT ``AdapterConfig`` (``integrations/peft.py``) both inherit them, so a field is declared,
documented and validated in this one place. ``new_adapter`` turns options into an
``adapterfast.Adapter`` for one site, for both routes; the PEFT layer and the ``add_adapters``
hooks then run that module, so the forward is ``Adapter.forward`` whichever way it got there.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import field
from typing import Optional, Union

import torch
import torch.nn as nn

from .. import activations
from ..modules import Adapter

PLACEMENTS = ("pfeiffer", "houlsby", "parallel")
INITS = ("zero", "bert", "houlsby")
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# The task heads PEFT keeps trainable (and saves) for each task type; add_adapters does the same.
HEAD_MODULES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                "QUESTION_ANS": ("qa_outputs",)}


@dataclasses.dataclass
class AdapterFields:
    """The adapter option fields shared by ``AdapterOptions`` and the PEFT ``AdapterConfig``.

    ``r``: bottleneck size. ``alpha``: the branch is scaled by ``alpha / r`` (None: alpha = r,
    scale 1). ``dropout``: on the adapter branch (never on the residual). ``activation``: relu,
    gelu, gelu_tanh, silu, tanh, sigmoid, leaky_relu, identity, ... ``bias``: biases in the
    down/up projections. ``placement``: ``"pfeiffer"`` (after each FFN), ``"houlsby"`` (after
    attention and FFN) or ``"parallel"`` (beside each FFN, He et al. 2022). ``target_modules``:
    None for the architecture's default sites, else module-name suffixes or a regular expression
    (PEFT's rules). ``init``: ``"zero"`` (the adapted model equals the base at step 0), ``"bert"``
    or ``"houlsby"``. ``modules_to_save``: extra modules trained and saved in full (the task head
    is added for you).
    """

    r: int = field(default=16, metadata={"help": "Bottleneck size"})
    alpha: Optional[float] = field(default=None, metadata={"help": "Scale = alpha / r (None: alpha = r)"})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter branch"})
    activation: str = field(default="relu", metadata={"help": "Activation between down and up"})
    bias: bool = field(default=False, metadata={"help": "Biases in the adapter's down/up projections"})
    placement: str = field(default="pfeiffer", metadata={"help": "pfeiffer, houlsby or parallel"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names/suffixes or a regex; None: the architecture's default"})
    init: str = field(default="zero", metadata={"help": "zero, bert or houlsby"})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the adapters to train and save"})

    @property
    def scale(self) -> float:
        return adapter_scale(self)


OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(AdapterFields))


def check_options(config) -> None:
    """Validates the adapter fields of ``config`` (AdapterOptions or AdapterConfig), in place.

    Normalises ``task_type`` to its upper-case string value and ``target_modules`` tuples/sets
    to lists; raises ``TypeError``/``ValueError`` naming the field otherwise.
    """
    r = config.r
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"r (the bottleneck size) must be an int >= 1, got {r!r}")
    alpha = config.alpha
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or alpha <= 0):
        raise ValueError(f"alpha must be a positive number (scale = alpha / r) or None (alpha = r), got {alpha!r}")
    p = config.dropout
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")
    activations.canonical(config.activation)
    if not isinstance(config.bias, bool):
        raise TypeError(f"bias must be True or False (whether the adapter's down/up projections have biases), "
                        f"got {config.bias!r}; PEFT's 'none'/'all'/'lora_only' base-bias training is not supported")
    if config.placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {config.placement!r}")
    if config.init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {config.init!r}")
    targets = config.target_modules
    if isinstance(targets, (tuple, set, frozenset)):
        targets = config.target_modules = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise TypeError(f"target_modules must be None, a regular expression or a list of module names, got {targets!r}")
    heads = config.modules_to_save
    if isinstance(heads, (tuple, set, frozenset)):
        heads = config.modules_to_save = list(heads)
    if heads is not None and not (isinstance(heads, list) and all(isinstance(h, str) for h in heads)):
        raise TypeError(f"modules_to_save must be None or a list of module names, got {heads!r}")
    task = config.task_type
    if task is not None:
        value = getattr(task, "value", task)
        if not isinstance(value, str) or value.upper() not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {', '.join(TASK_TYPES)} or None, got {task!r}")


def adapter_scale(config) -> float:
    """``alpha / r`` (1.0 when alpha is None)."""
    return 1.0 if config.alpha is None else float(config.alpha) / config.r


@dataclasses.dataclass
class AdapterOptions(AdapterFields):
    """The adapter settings for ``add_adapters`` without PEFT: the ``AdapterFields`` and ``task_type``.

    ``task_type``: SEQ_CLS/TOKEN_CLS/QUESTION_ANS keep the task head trainable (PEFT's rule).
    """

    task_type: Optional[str] = None

    def __post_init__(self):
        check_options(self)
        if self.task_type is not None:
            self.task_type = getattr(self.task_type, "value", self.task_type).upper()


_OPTIONS_NAMES = tuple(f.name for f in dataclasses.fields(AdapterOptions))


def as_options(config=None, **overrides) -> AdapterOptions:
    """An ``AdapterOptions`` from an AdapterOptions, a PEFT ``AdapterConfig``, a dict, or keywords."""
    if config is None:
        values = {}
    elif isinstance(config, dict):
        values = dict(config)
    else:
        values = {name: getattr(config, name) for name in _OPTIONS_NAMES if hasattr(config, name)}
    values.update(overrides)
    unknown = sorted(set(values) - set(_OPTIONS_NAMES))
    if unknown:
        raise TypeError(f"unknown adapter option(s) {unknown}; known: {', '.join(_OPTIONS_NAMES)}")
    if isinstance(values.get("target_modules"), (set, frozenset)):
        values["target_modules"] = sorted(values["target_modules"])
    return AdapterOptions(**values)


def adapter_dtype(base_dtype: Optional[torch.dtype], autocast_adapter_dtype: bool = True) -> Optional[torch.dtype]:
    """The adapter's parameter dtype: float32 for a float16/bfloat16 base (master weights in fp32,
    PEFT's ``autocast_adapter_dtype``), else the base dtype. The op takes fp32 weights with
    half-precision activations, so nothing needs casting at run time."""
    if autocast_adapter_dtype and base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype


@torch.no_grad()
def init_adapter_(down: nn.Linear, up: nn.Linear, init: str) -> None:
    """Initialises an adapter's projections in place (``integrations/hf.py`` describes the schemes)."""
    if init == "zero":
        down.reset_parameters()
        nn.init.zeros_(up.weight)
    elif init == "bert":
        nn.init.normal_(down.weight, std=0.02)
        nn.init.normal_(up.weight, std=0.02)
    elif init == "houlsby":
        nn.init.trunc_normal_(down.weight, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.trunc_normal_(up.weight, std=1e-2, a=-2e-2, b=2e-2)
    else:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    for linear in (down, up):
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)


class SiteAdapter(Adapter):
    """An ``adapterfast.Adapter`` that also records how it meets its site.

    ``mode`` is how it attaches (``site_forward.OUTPUT``, ``PARALLEL`` or ``PARALLEL_INPUT``) and
    ``placement`` the option it came from; the forward is ``Adapter.forward``, unchanged.
    """

    def __init__(self, d_model: int, r: int, *, mode: str, placement: str, **kwargs):
        super().__init__(d_model, r, **kwargs)
        self.mode = mode
        self.placement = placement

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, placement={self.placement} ({self.mode})"


def new_adapter(features: int, options: AdapterFields, mode: str, *, device=None,
                dtype: Optional[torch.dtype] = None) -> SiteAdapter:
    """The adapter ``options`` describe for one site of ``features`` features, on ``device``.

    Initialised in float32 (so an ``init`` draws the same values whatever the dtype), then cast
    to ``dtype`` (see ``adapter_dtype``).
    """
    adapter = SiteAdapter(features, options.r, mode=mode, placement=options.placement,
                          activation=activations.canonical(options.activation), bias=options.bias,
                          scale=adapter_scale(options), dropout=float(options.dropout),
                          device=device, dtype=torch.float32)
    init_adapter_(adapter.down, adapter.up, options.init)
    if dtype is not None and dtype != torch.float32:
        adapter.to(dtype)
    return adapter
