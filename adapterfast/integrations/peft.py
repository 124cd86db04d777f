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

The fields are ``options.AdapterFields``, shared with ``AdapterOptions``; the placements and
where the adapters go are documented in ``integrations/hf.py``. Each site runs the same
``adapterfast.Adapter`` modules (``options.new_adapter``) through the same forward
(``site_forward.run_site``) as ``add_adapters``. Here ``bias`` is the adapter's own bias (a bool),
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
mixed-model one), with the uniqueness checks ``register_peft_method`` makes, and ``unregister()``
takes it out. Nothing of PEFT is patched: no enum, class or function of PEFT is modified. Who calls
them, and when: ``integrations/registration.py`` (``import adapterfast`` registers, as soon as
PEFT is imported or at once if it already is, so ``PeftModel.from_pretrained`` works in a fresh
process; ``adapterfast.unregister()`` undoes it).

Versions: PEFT >= 0.21 (tested: 0.21.2) with transformers 4.46 through 5.x (``make test`` runs the
pinned 4.57.6 and 5.24.0). PEFT 0.21 is the first release whose save/load selects a
method's weights structurally (``BaseTuner._get_adapter_state_dict``); up to 0.20,
``get_peft_model_state_dict`` saves only methods that are members of ``PeftType`` ("Unknown PEFT
type passed"), which would mean patching PEFT's enum. Older PEFT versions are refused at import
with an error that says so (``PEFT_MIN_VERSION``).
"""
from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch.nn as nn

import peft as _peft
from packaging.version import Version
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists

from . import peft_mixed
from .architectures import ARCHITECTURES, default_target_modules
from .options import AdapterFields, SiteAdapter, adapter_dtype, check_options, new_adapter
from .site_forward import base_device_dtype, check_site, feature_size, linear_sizes, run_site, site_mode

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
class AdapterConfig(PeftConfig, AdapterFields):
    """Bottleneck adapters (Houlsby/Pfeiffer/parallel) run by adapterfast's fused op, as a PEFT config.

    The adapter fields (``r``, ``alpha``, ``dropout``, ``activation``, ``bias``, ``placement``,
    ``target_modules``, ``init``, ``modules_to_save``) are ``options.AdapterFields``, shared with
    ``AdapterOptions``; besides them:

    Args:
        task_type: PEFT's task type; SEQ_CLS/TOKEN_CLS keep ``classifier``/``score`` trainable.
        init_weights: PEFT's common switch; ``False`` with ``init="zero"`` means ``init="bert"``.
    """

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
        check_options(self)


class AdapterfastLayer(nn.Module, BaseTunerLayer):
    """Wraps a module (``base_layer``) and runs the active adapters at its site (``site_forward.run_site``).

    Per adapter name: ``adapterfast_settings[name]`` is the ``adapterfast.Adapter`` (an
    ``options.SiteAdapter``, which also records its mode and placement) that runs at this site,
    built by ``options.new_adapter`` as ``add_adapters`` builds its own. Its ``down``/``up``
    linears are also held in ``adapterfast_down[name]``/``adapterfast_up[name]``: those module
    dicts are where the parameters live in the module tree (so PEFT's state-dict keys,
    ``...adapterfast_down.weight``, are those of every saved checkpoint); the dict of adapters is
    not a submodule, so nothing is counted or saved twice.
    """

    adapter_layer_names = ("adapterfast_down", "adapterfast_up")
    other_param_names = ("adapterfast_settings",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdapterConfig, mode: str, features: int):
        nn.Module.__init__(self)
        self.base_layer = base_layer
        d_in, d_out = linear_sizes(base_layer)
        self.in_features = features if d_in is None else d_in
        self.out_features = features if d_out is None else d_out
        self.adapterfast_down = nn.ModuleDict()
        self.adapterfast_up = nn.ModuleDict()
        self.adapterfast_settings: dict[str, SiteAdapter] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, mode, features)

    def update_layer(self, adapter_name: str, config: AdapterConfig, mode: str, features: int) -> None:
        device, dtype = base_device_dtype(self.get_base_layer())
        # In the base dtype: PeftModel applies its own autocast_adapter_dtype (fp32 for half bases) afterwards.
        adapter = new_adapter(features, config, mode, device=device,
                              dtype=adapter_dtype(dtype, autocast_adapter_dtype=False))
        self.adapterfast_down[adapter_name] = adapter.down
        self.adapterfast_up[adapter_name] = adapter.up
        self.adapterfast_settings[adapter_name] = adapter
        adapter.train(self.training)
        self.set_adapter(self.active_adapters)
        if config.inference_mode:
            adapter.requires_grad_(False)

    def train(self, mode: bool = True):
        """Also sets the adapters' mode: ``adapterfast_settings`` is not a submodule that ``train`` reaches."""
        super().train(mode)
        for adapter in self.adapterfast_settings.values():
            adapter.train(mode)
        return self

    def forward(self, *args, **kwargs):
        if self.disable_adapters:
            return self.base_layer(*args, **kwargs)
        if peft_mixed.is_mixed(self):  # model(..., adapter_names=[...]): the grouped op (peft_mixed.py)
            return peft_mixed.mixed_forward(self, args, kwargs)
        active = [n for n in self.active_adapters if n in self.adapterfast_down]
        if not active:
            return self.base_layer(*args, **kwargs)
        adapters = [(self.adapterfast_settings[n].mode, self.adapterfast_settings[n]) for n in active]
        return run_site(self.base_layer, args, kwargs, adapters)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        # nothing is ever merged
        return None

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{name}: r={a.down.out_features}, activation={a.activation}, placement={a.placement} "
                             f"({a.mode}), scale={a.scale:g}" for name, a in self.adapterfast_settings.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}]"

    def __repr__(self) -> str:
        return "adapterfast." + super().__repr__()


class AdapterfastModel(BaseTuner):
    """The PEFT tuner: wraps each target module in an ``AdapterfastLayer``."""

    prefix: str = PREFIX
    tuner_layer_cls = AdapterfastLayer
    target_module_mapping = {name: sites.ffn_output for name, sites in ARCHITECTURES.items()}

    def _prepare_adapter_config(self, peft_config: AdapterConfig, model_config: dict) -> AdapterConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(model_config.get("model_type"),
                                                                peft_config.placement, self.model)
        return peft_config

    @staticmethod
    def _check_target_module_exists(peft_config, key: str):
        return check_target_module_exists(peft_config, key)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        mode = site_mode(base, peft_config.placement)
        check_site(base, mode, current_key)
        features = feature_size(base, mode, getattr(self.model, "config", None), current_key)
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


def _tables() -> dict:
    from peft import mapping

    return {"config": mapping.PEFT_TYPE_TO_CONFIG_MAPPING, "tuner": mapping.PEFT_TYPE_TO_TUNER_MAPPING,
            "prefix": mapping.PEFT_TYPE_TO_PREFIX_MAPPING}


def register() -> None:
    """Makes ``AdapterConfig`` known to PEFT (idempotent); see the module docstring.

    ``adapterfast.integrations.registration.register()`` (run by ``import adapterfast``) calls it.
    """
    tables = _tables()
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


def unregister() -> None:
    """Takes ``"ADAPTERFAST"`` out of PEFT's tables again (idempotent)."""
    for table in _tables().values():
        table.pop(PEFT_TYPE, None)


_LOADED = True  # tells registration._register_with_peft that this module is complete
from . import registration as _registration  # noqa: E402

_registration.peft_module_loaded(sys.modules[__name__])
