"""adapterfast as a PEFT method: ``AdapterConfig`` works with ``get_peft_model`` and the rest of PEFT.

    from peft import get_peft_model, PeftModel, TaskType
    from adapterfast import AdapterConfig

    config = AdapterConfig(task_type=TaskType.SEQ_CLS, r=16, alpha=16, dropout=0.1)
    model = get_peft_model(model, config)          # adapters in, base frozen, head trainable
    model.print_trainable_parameters()
    ...Trainer(...).train()...
    model.save_pretrained("out")                   # adapter_config.json + adapter_model.safetensors
    # in a fresh process, after `import adapterfast`:
    model = PeftModel.from_pretrained(base_model, "out")

What works: several named adapters (``add_adapter``, ``set_adapter``, ``delete_adapter``, a list of
active adapters runs them in order), ``disable_adapter()``, ``unload()``, ``Trainer`` (also with
``bf16``/``fp16`` and gradient checkpointing, reentrant or not), fp16/bf16 base models (adapter
weights are kept in fp32 as PEFT does by default; the op takes them with half activations).
``merge_and_unload``/``merge_adapter`` raise ``ValueError``: a bottleneck adapter is nonlinear,
``up(act(down(x)))``, so it cannot be folded into the base weights. Mixed-batch inference
(``model(..., adapter_names=[...])``, eval mode) runs every adapter of the batch in one grouped op
per site (``peft_mixed.py``); ``PeftMixedModel`` is not supported.

The fields, the placements and where the adapters go are documented in ``integrations/hf.py``,
which this module shares with ``add_adapters``. Here ``bias`` is the adapter's own bias (a bool),
not PEFT's LoRA-style choice of which *base* biases to train (those stay frozen), so the tuner
overrides the four ``BaseTuner`` hooks that read ``config.bias`` with that meaning.

Registration. PEFT finds a method through four dicts in ``peft.mapping`` keyed by ``PeftType``
(``PEFT_TYPE_TO_CONFIG_MAPPING``, ``..._TUNER_MAPPING``, ``..._PREFIX_MAPPING``,
``..._MIXED_MODEL_MAPPING``). ``peft.utils.register_peft_method`` fills them but only accepts names
that are members of the ``PeftType`` enum, which a third party cannot add to without rewriting
the enum. ``PeftType`` is a ``str`` enum, and PEFT only ever looks these dicts up with values that
compare equal to the string (``config.peft_type``, or the ``"peft_type"`` read back from
``adapter_config.json``), so ``register()`` adds our own ``str`` enum member ``"ADAPTERFAST"`` (it
has ``.value`` and ``.name`` like a PeftType member) to the config, tuner and prefix dicts (not the
mixed-model one), with the uniqueness checks ``register_peft_method`` makes. Nothing of PEFT is
patched: no enum, class or function of PEFT is modified. ``register()`` is idempotent and runs
when this module is imported; ``import adapterfast`` imports it as soon as PEFT is imported (or at
once if PEFT already is), so ``PeftModel.from_pretrained`` works in a fresh process.

Versions: PEFT >= 0.21 (tested: 0.21.2) with transformers 4.46 through 5.x (``make test`` runs the
pinned 4.57.6 and 5.24.0). PEFT 0.21 is the first release whose save/load selects a
method's weights structurally (``BaseTuner._get_adapter_state_dict``); up to 0.20,
``get_peft_model_state_dict`` saves only methods that are members of ``PeftType`` ("Unknown PEFT
type passed"), which would mean patching PEFT's enum. Older PEFT versions are refused at import
with an error that says so (``PEFT_MIN_VERSION``).
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn

import peft as _peft
from packaging.version import Version
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists

from .. import activations
from ..functional import fused_adapter
from . import hf, peft_mixed

PEFT_MIN_VERSION = "0.21.0"
if Version(_peft.__version__) < Version(PEFT_MIN_VERSION):
    raise ImportError(f"adapterfast's PEFT integration needs peft >= {PEFT_MIN_VERSION} (tested with 0.21.2), "
                      f"found {_peft.__version__}: older PEFT can save only its built-in methods. Upgrade PEFT, "
                      "or use adapterfast.add_adapters/save_adapters, which need no PEFT")

from peft.utils.other import AuxiliaryTrainingWrapper as _AuxiliaryWrapper  # noqa: E402 (after the version check)

PREFIX = "adapterfast_"
MERGE_ERROR = ("adapterfast adapters cannot be merged into the base weights: a bottleneck adapter is nonlinear "
               "(x + s * up(act(down(x)))), so no weight update reproduces it. Keep the PeftModel for "
               "inference, or call unload() to get the base model back without the adapters.")


REQUIRES = ("adapterfast: `import adapterfast` (pip install 'adapterfast[hf]') before PeftModel.from_pretrained; "
            "without it PEFT does not know peft_type ADAPTERFAST and raises KeyError: 'ADAPTERFAST'")

class AdapterfastPeftType(str, enum.Enum):
    """adapterfast's PEFT type; a ``str`` enum like ``peft.PeftType`` (so ``.value`` works and
    ``"ADAPTERFAST"`` read from ``adapter_config.json`` finds it in PEFT's tables)."""

    ADAPTERFAST = "ADAPTERFAST"


PEFT_TYPE = AdapterfastPeftType.ADAPTERFAST


@dataclass
class AdapterConfig(PeftConfig):
    """Bottleneck adapters (Houlsby/Pfeiffer/parallel) run by adapterfast's fused op, as a PEFT config.

    Args:
        task_type: PEFT's task type; SEQ_CLS/TOKEN_CLS keep ``classifier``/``score`` trainable.
        r: bottleneck size.
        alpha: the adapter branch is scaled by ``alpha / r``; None means ``alpha = r`` (scale 1).
        dropout: dropout on the adapter branch (never on the residual).
        activation: relu (default), gelu, gelu_tanh, silu, tanh, sigmoid, leaky_relu, identity, ...
        bias: whether the adapter's down/up projections have biases.
        placement: ``"pfeiffer"`` (after each FFN), ``"houlsby"`` (after attention and FFN) or
            ``"parallel"`` (beside each FFN, He et al. 2022).
        target_modules: None for the architecture's default sites, else module-name suffixes or a
            regular expression (PEFT's rules).
        init: ``"zero"`` (the adapted model equals the base at step 0), ``"bert"`` or ``"houlsby"``.
        init_weights: PEFT's common switch; ``False`` with ``init="zero"`` means ``init="bert"``.
        modules_to_save: extra modules trained and saved in full (the task head is added for you).
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
    init_weights: bool = field(default=True, metadata={
        "help": "PEFT's convention: False turns the default identity init ('zero') into 'bert'"})
    # Saved in adapter_config.json for whoever reads it, or meets PEFT's bare KeyError: 'ADAPTERFAST'.
    requires: str = field(default=REQUIRES, metadata={"help": "How to load this config (not an option)"})

    # PEFT's target matching reads these; adapterfast adapters target modules, never parameters.
    target_parameters = None
    exclude_modules = None

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if not isinstance(self.init_weights, bool):
            raise TypeError(f"init_weights must be True or False, got {self.init_weights!r}")
        if not self.init_weights and self.init == "zero":
            self.init = "bert"
        hf.check_options(self)

    @property
    def scale(self) -> float:
        return hf.adapter_scale(self)


@dataclass(frozen=True)
class _Settings:
    mode: str
    activation: str
    scale: float
    dropout: float
    placement: str = "pfeiffer"


def _fused_branch(down: nn.Linear, up: nn.Linear, settings: _Settings, training: bool,
                  x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    return fused_adapter(x, down.weight, up.weight, down.bias, up.bias, activation=settings.activation,
                         scale=settings.scale, dropout=settings.dropout, training=training, residual=residual)


class AdapterfastLayer(nn.Module, BaseTunerLayer):
    """Wraps a module (``base_layer``) and runs the active adapters at its site (see ``hf.run_site``).

    Per adapter name: ``adapterfast_down[name]`` (``nn.Linear(d, r)``), ``adapterfast_up[name]``
    (``nn.Linear(r, d)``) and ``adapterfast_settings[name]`` (mode, activation, scale, dropout).
    """

    adapter_layer_names = ("adapterfast_down", "adapterfast_up")
    other_param_names = ("adapterfast_settings",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdapterConfig, mode: str, features: int):
        nn.Module.__init__(self)
        self.base_layer = base_layer
        d_in, d_out = hf.linear_sizes(base_layer)
        self.in_features = features if d_in is None else d_in
        self.out_features = features if d_out is None else d_out
        self.adapterfast_down = nn.ModuleDict()
        self.adapterfast_up = nn.ModuleDict()
        self.adapterfast_settings: dict[str, _Settings] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, mode, features)

    def update_layer(self, adapter_name: str, config: AdapterConfig, mode: str, features: int) -> None:
        device, dtype = hf.base_device_dtype(self.get_base_layer())
        down = nn.Linear(features, config.r, bias=config.bias, device=device, dtype=torch.float32)
        up = nn.Linear(config.r, features, bias=config.bias, device=device, dtype=torch.float32)
        hf.init_adapter_(down, up, config.init)
        if dtype is not None and dtype != torch.float32:  # PeftModel upcasts half dtypes back to fp32 by default
            down.to(dtype)
            up.to(dtype)
        self.adapterfast_down[adapter_name] = down
        self.adapterfast_up[adapter_name] = up
        self.adapterfast_settings[adapter_name] = _Settings(
            mode, activations.canonical(config.activation), hf.adapter_scale(config), float(config.dropout),
            config.placement)
        self.set_adapter(self.active_adapters)
        if config.inference_mode:
            down.requires_grad_(False)
            up.requires_grad_(False)

    def _branch(self, name: str):
        return functools.partial(_fused_branch, self.adapterfast_down[name], self.adapterfast_up[name],
                                 self.adapterfast_settings[name], self.training)

    def forward(self, *args, **kwargs):
        if self.disable_adapters:
            return self.base_layer(*args, **kwargs)
        if peft_mixed.is_mixed(self):  # model(..., adapter_names=[...]): the grouped op (peft_mixed.py)
            return peft_mixed.mixed_forward(self, args, kwargs)
        active = [n for n in self.active_adapters if n in self.adapterfast_down]
        if not active:
            return self.base_layer(*args, **kwargs)
        adapters = [(self.adapterfast_settings[n].mode, self._branch(n)) for n in active]
        return hf.run_site(self.base_layer, args, kwargs, adapters)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        # nothing is ever merged
        return None

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{name}: r={self.adapterfast_down[name].out_features}, activation={s.activation}, "
                             f"placement={s.placement} ({s.mode}), scale={s.scale:g}" for name, s in self.adapterfast_settings.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}]"

    def __repr__(self) -> str:
        return "adapterfast." + super().__repr__()


class AdapterfastModel(BaseTuner):
    """The PEFT tuner: wraps each target module in an ``AdapterfastLayer``."""

    prefix: str = PREFIX
    tuner_layer_cls = AdapterfastLayer
    target_module_mapping = {name: sites.ffn_output for name, sites in hf.ARCHITECTURES.items()}

    def _prepare_adapter_config(self, peft_config: AdapterConfig, model_config: dict) -> AdapterConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = hf.default_target_modules(model_config.get("model_type"),
                                                                   peft_config.placement, self.model)
        return peft_config

    @staticmethod
    def _check_target_module_exists(peft_config, key: str):
        return check_target_module_exists(peft_config, key)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        mode = hf.site_mode(base, peft_config.placement)
        hf.check_site(base, mode, current_key)
        features = hf.feature_size(base, mode, getattr(self.model, "config", None), current_key)
        if isinstance(target, AdapterfastLayer):
            target.update_layer(adapter_name, peft_config, mode, features)
            return
        new_module = AdapterfastLayer(target, adapter_name, peft_config, mode, features)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # The adapter was created on the base layer's device (update_layer), so a swap is all it takes.
        setattr(parent, child_name, new_module)

    # ``bias`` in AdapterConfig is the adapter's own bias; PEFT's base-bias handling does not apply.

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        keep = set()
        for module in model.modules():
            if isinstance(module, AdapterfastLayer):
                for name in module.adapter_layer_names:
                    keep.update(id(p) for p in getattr(module, name).parameters())
            elif isinstance(module, _AuxiliaryWrapper):  # modules_to_save manage their own requires_grad
                keep.update(id(p) for p in module.parameters())
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad = False

    def _check_new_adapter_config(self, config) -> None:
        return None

    @classmethod
    def _get_learnable_bias_state_dict(cls, model, state_dict, config) -> dict:
        return {}

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        for module in self.model.modules():
            if isinstance(module, (BaseTunerLayer, _AuxiliaryWrapper)):
                module.enable_adapters(enabled)

    def disable_adapter_layers(self) -> None:
        self._enable_adapter_layers(False)

    def enable_adapter_layers(self) -> None:
        self._enable_adapter_layers(True)

    # Merging: impossible for a nonlinear adapter.

    _enable_peft_forward_hooks = peft_mixed.enable_peft_forward_hooks  # adapter_names= (peft_mixed.py)

    def _check_merge_allowed(self):
        raise ValueError(MERGE_ERROR)

    def merge_adapter(self, *args, **kwargs) -> None:
        raise ValueError(MERGE_ERROR)

    def merge_and_unload(self, *args, **kwargs):
        raise ValueError(MERGE_ERROR)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs):
        """The base model's activation checkpointing (``activation_checkpointing_enable`` on transformers 5,
        ``gradient_checkpointing_enable`` before), plus what reentrant checkpointing needs for frozen-base
        training: the input embeddings' output must require grad, or no gradient reaches the adapters
        inside checkpointed layers."""
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs,
                                                       **kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
        reentrant = (gradient_checkpointing_kwargs or {}).get("use_reentrant", True)
        if reentrant and getattr(self.model, "_require_grads_hook", None) is None \
                and hasattr(self.model, "enable_input_require_grads"):
            self.model.enable_input_require_grads()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None, **kwargs):
        """transformers 5's name for ``gradient_checkpointing_enable`` (its ``Trainer`` calls this one)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)


def register() -> None:
    """Makes ``AdapterConfig`` known to PEFT (idempotent); see the module docstring."""
    from peft import mapping

    tables = {
        "config": mapping.PEFT_TYPE_TO_CONFIG_MAPPING,
        "tuner": mapping.PEFT_TYPE_TO_TUNER_MAPPING,
        "prefix": mapping.PEFT_TYPE_TO_PREFIX_MAPPING,
    }
    ours = {"config": AdapterConfig, "tuner": AdapterfastModel, "prefix": PREFIX}

    def same(a, b) -> bool:  # a class from an earlier import of this module (importlib.reload) is ours too
        if isinstance(a, str) or isinstance(b, str):
            return a == b
        return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)

    for key, table in tables.items():
        if PEFT_TYPE in table and not same(table[PEFT_TYPE], ours[key]):
            raise KeyError(f"PEFT already has a method called {PEFT_TYPE.value!r} ({table[PEFT_TYPE]!r})")
    for peft_type, prefix in tables["prefix"].items():
        if prefix == PREFIX and peft_type != PEFT_TYPE:
            raise KeyError(f"the PEFT prefix {PREFIX!r} is already used by {peft_type}")
    for key, table in tables.items():
        table[PEFT_TYPE] = ours[key]


register()
_READY = True  # tells the import hook in integrations/__init__.py that registration is done
