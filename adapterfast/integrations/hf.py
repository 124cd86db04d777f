"""Bottleneck adapters in Hugging Face transformers models, without PEFT: ``add_adapters``.

    model = AutoModelForSequenceClassification.from_pretrained(...)
    model = adapterfast.add_adapters(model, AdapterOptions(task_type="SEQ_CLS", r=16, alpha=16))
    ...train...
    adapterfast.save_adapters(model, "out/adapters.safetensors")
    adapterfast.load_adapters(fresh_model, "out/adapters.safetensors")   # injects, then loads

This module is also the one place that knows *where adapters go* in each architecture; the PEFT
tuner (``integrations/peft.py``) uses the same table, the same rules for the adapter's size, mode
and initialisation, and the same forward code, so an ``AdapterConfig`` puts the same adapters in
the same places whether it goes through ``get_peft_model`` or ``add_adapters``.

Placements (``placement=``), each adapter being ``y = residual + s * up(act(down(x)))``, s = alpha / r:

- ``"pfeiffer"`` (default): one adapter per layer on the FFN output. In post-LN encoders (BERT,
  RoBERTa, DistilBERT) it acts on the output projection's result before the residual add and
  LayerNorm, as AdapterHub's ``seq_bn`` does; in pre-LN decoders (GPT-2, Llama, Mistral, Qwen2) on
  the MLP's output projection, before the residual add.
- ``"houlsby"``: the same plus one on the attention output projection.
- ``"parallel"`` (He et al. 2022): beside the whole FFN block, ``h = FFN(x) + s * f(x)`` with x the
  FFN input, computed by ``fused_adapter(x, ..., residual=FFN(x))``. BERT-style output blocks
  (``BertOutput(hidden_states, input_tensor)``, whose LayerNorm sits inside the block) get the
  same sum by adapting the block's residual input: ``input_tensor -> x + s * f(x)``.
  He et al. use s = 4 for parallel adapters: pass ``alpha = 4 * r``.

Default sites: ``ARCHITECTURES`` by ``model.config.model_type`` (overrides), else the rule in
``sites.py`` (each block's MLP output projection and attention output, found by shape), which
covers every decoder, encoder and sequence-classification architecture of PEFT's own test suite
(OPT, GPT-2, BLOOM, GPT-Neo, GPT-J, GPTBigCode, Llama, Mistral, Qwen2, Gemma3, BERT, RoBERTa,
DeBERTa, DeBERTa-v2). ``target_modules`` (a list of module-name suffixes, or one regular expression
matched against the full module name, as in PEFT) overrides both.

``init``: ``"zero"`` (default: up-projection zero, so the adapted model computes exactly what the
base model computes until the first update; down-projection as ``nn.Linear``), ``"bert"`` (both
weights normal(0, 0.02), biases zero) or ``"houlsby"`` (both weights truncated normal(0, 0.01),
biases zero: near-identity).

Without PEFT the adapters are attached by forward hooks: each adapted module keeps its type and
its parameter names and gets an ``adapterfast`` child (an ``adapterfast.Adapter``), so the base
model's state dict keys do not change. ``add_adapters`` freezes every base parameter except the
task head (``classifier``/``score`` for SEQ_CLS and TOKEN_CLS, ``qa_outputs`` for QUESTION_ANS, and
``modules_to_save``), and makes the input embeddings' output require grad so that reentrant
gradient checkpointing (``gradient_checkpointing_enable()``, transformers' default) still reaches
the adapters. Adapter weights are float32 when the model is float16/bfloat16 (as PEFT does by
default); the op takes fp32 weights with half-precision activations, so nothing needs casting.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import numbers
import os
import re
from typing import Any, Callable, Optional, Sequence, Union

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

# How an adapter meets the module it is attached to.
OUTPUT = "output"                  # y = module(...); y + s f(y)              (sequential)
PARALLEL = "parallel"              # module(x) + s f(x), x the module's input  (parallel)
PARALLEL_INPUT = "parallel_input"  # module(h, x + s f(x)): BERT-style output blocks (parallel)

ATTACHED_NAME = "adapterfast"  # the child module add_adapters gives each adapted module
SAFETENSORS_NAME = "adapterfast.safetensors"
_METADATA_KEY = "adapterfast_config"


@dataclasses.dataclass(frozen=True)
class Sites:
    """Where adapters go in one architecture: regular expressions fully matching module names."""

    ffn_output: str         # the FFN's output projection (pfeiffer, houlsby)
    attention_output: str   # the attention block's output projection (houlsby)
    ffn: str                # the whole FFN block, input = FFN input (parallel)

    def for_placement(self, placement: str) -> str:
        if placement == "pfeiffer":
            return self.ffn_output
        if placement == "houlsby":
            return f"(?:{self.attention_output})|(?:{self.ffn_output})"
        if placement == "parallel":
            return self.ffn
        raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")


def _sites(layers: str, ffn_output: str, attention_output: str, ffn: str) -> Sites:
    layer = rf"(?:.*\.)?{layers}\.\d+\."
    return Sites(layer + ffn_output, layer + attention_output, layer + ffn)


_BERT_LIKE = _sites("layer", r"output\.dense", r"attention\.output\.dense", "output")
_LLAMA_LIKE = _sites("layers", r"mlp\.down_proj", r"self_attn\.o_proj", "mlp")

#: Default adapter sites by ``config.model_type``. Every entry is exercised by the test suite on a
#: small random model.
ARCHITECTURES: dict[str, Sites] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": _sites("layer", r"ffn\.lin2", r"attention\.out_lin", "ffn"),
    "gpt2": _sites("h", r"mlp\.c_proj", r"attn\.c_proj", "mlp"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
}


# --------------------------------------------------------------------------------------------
# Options: the fields both AdapterOptions and the PEFT AdapterConfig have, and their checks.
# --------------------------------------------------------------------------------------------

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
class AdapterOptions:
    """The adapter settings, for ``add_adapters`` without PEFT (same fields as ``AdapterConfig``).

    ``r``: bottleneck size. ``alpha``: the branch is scaled by ``alpha / r`` (None: 1).
    ``dropout``: on the adapter branch. ``activation``: relu, gelu, gelu_tanh, silu, tanh, ...
    ``bias``: biases in the down/up projections. ``placement``: pfeiffer, houlsby or parallel.
    ``target_modules``: None for the architecture's default sites, else module-name suffixes or a
    regular expression. ``init``: zero, bert or houlsby. ``modules_to_save``: extra modules kept
    trainable and saved. ``task_type``: SEQ_CLS/TOKEN_CLS/QUESTION_ANS keep the task head trainable.
    """

    task_type: Optional[str] = None
    r: int = 16
    alpha: Optional[float] = None
    dropout: float = 0.0
    activation: str = "relu"
    bias: bool = False
    placement: str = "pfeiffer"
    target_modules: Optional[Union[list[str], str]] = None
    init: str = "zero"
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self):
        check_options(self)
        if self.task_type is not None:
            self.task_type = getattr(self.task_type, "value", self.task_type).upper()

    @property
    def scale(self) -> float:
        return adapter_scale(self)


_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(AdapterOptions))


def as_options(config=None, **overrides) -> AdapterOptions:
    """An ``AdapterOptions`` from an AdapterOptions, a PEFT ``AdapterConfig``, a dict, or keywords."""
    if config is None:
        values = {}
    elif isinstance(config, dict):
        values = dict(config)
    else:
        values = {name: getattr(config, name) for name in _OPTION_FIELDS if hasattr(config, name)}
    values.update(overrides)
    unknown = sorted(set(values) - set(_OPTION_FIELDS))
    if unknown:
        raise TypeError(f"unknown adapter option(s) {unknown}; known: {', '.join(_OPTION_FIELDS)}")
    if isinstance(values.get("target_modules"), (set, frozenset)):
        values["target_modules"] = sorted(values["target_modules"])
    return AdapterOptions(**values)


# --------------------------------------------------------------------------------------------
# Where: target modules, mode and feature size of each site.
# --------------------------------------------------------------------------------------------

def model_type_of(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def default_target_modules(model_type: Optional[str], placement: str, model: Optional[nn.Module] = None) -> str:
    """The default sites (a regular expression over module names): the ``ARCHITECTURES`` entry for
    ``model_type``, else what ``sites.for_placement`` finds in ``model``."""
    table = ARCHITECTURES.get(model_type)
    if table is not None:
        return table.for_placement(placement)
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if model is None:
        raise ValueError(
            f"adapterfast has no default adapter sites for model_type {model_type!r} without the model (table: "
            f"{', '.join(sorted(ARCHITECTURES))}); pass target_modules, e.g. the names of the modules whose "
            "output the adapter should act on (placement pfeiffer/houlsby) or the FFN blocks (parallel)")
    from . import sites
    return sites.for_placement(model, placement)


def resolve_target_modules(config, model_type: Optional[str], model: Optional[nn.Module] = None):
    """``config.target_modules`` if set, else the architecture's default for ``config.placement``."""
    if config.target_modules is not None:
        return config.target_modules
    return default_target_modules(model_type, config.placement, model)


def matches(target_modules, name: str) -> bool:
    """PEFT's rule: a string is a regular expression fully matching the name; a list holds names
    or suffixes (at a ``.`` boundary)."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _is_head(name: str, heads: Sequence[str]) -> bool:
    """Whether module ``name`` is (inside) a head: PEFT's modules_to_save rule, ``endswith``, applied
    to the name and each of its ancestors (so DistilBERT's ``pre_classifier`` counts, as in PEFT)."""
    parts = name.split(".")
    return any(".".join(parts[:i]).endswith(h) for i in range(1, len(parts) + 1) for h in heads)


def site_mode(module: nn.Module, placement: str) -> str:
    """How an adapter with this placement attaches to ``module`` (OUTPUT, PARALLEL or PARALLEL_INPUT)."""
    if placement != "parallel":
        return OUTPUT
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return PARALLEL
    return PARALLEL_INPUT if "input_tensor" in parameters else PARALLEL


def _hidden_size(model_config) -> Optional[int]:
    size = getattr(model_config, "hidden_size", None)
    if size is None and isinstance(model_config, dict):
        size = model_config.get("hidden_size") or model_config.get("n_embd") or model_config.get("dim")
    return size if isinstance(size, int) else None


def feature_size(module: nn.Module, mode: str, model_config=None, name: str = "") -> int:
    """The adapter's ``d``: the size of the features it reads and writes at this site."""
    if isinstance(module, nn.Linear):
        return module.out_features if mode == OUTPUT else module.in_features
    weight = getattr(module, "weight", None)
    if hasattr(module, "nf") and isinstance(weight, torch.Tensor) and weight.dim() == 2:  # transformers Conv1D
        return weight.shape[1] if mode == OUTPUT else weight.shape[0]
    if isinstance(module, nn.Embedding) and mode == OUTPUT:
        return module.embedding_dim
    size = _hidden_size(model_config)
    if size is None:
        size = getattr(module, "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"cannot tell the feature size of {name or type(module).__name__} ({type(module).__name__}): "
                         "it is not an nn.Linear/Conv1D and the model config has no hidden_size")
    return size


def linear_sizes(module: nn.Module) -> tuple[Optional[int], Optional[int]]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or transformers ``Conv1D``, else ``(None, None)``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if hasattr(module, "nf") and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0], weight.shape[1]
    return None, None


def check_site(module: nn.Module, mode: str, name: str) -> None:
    """A parallel adapter computes ``module(x) + s * f(x)``: ``module`` must map d features to d."""
    if mode != PARALLEL:
        return
    d_in, d_out = linear_sizes(module)
    if d_in is not None and d_in != d_out:
        raise ValueError(f"placement='parallel' cannot go on {name} ({type(module).__name__}, {d_in} -> {d_out} "
                         f"features): a parallel adapter adds s * f(x) to the module's output, so its input and "
                         "output sizes must match. Target the whole MLP block (the default sites do), or use "
                         "placement='pfeiffer'/'houlsby' on this layer")


def base_device_dtype(module: nn.Module) -> tuple[Optional[torch.device], Optional[torch.dtype]]:
    """Device and floating dtype of the first floating parameter (or buffer) of ``module``."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


def adapter_dtype(base_dtype: Optional[torch.dtype], autocast_adapter_dtype: bool = True) -> Optional[torch.dtype]:
    """float32 for a float16/bfloat16 base (master weights in fp32), else the base dtype."""
    if autocast_adapter_dtype and base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype


@torch.no_grad()
def init_adapter_(down: nn.Linear, up: nn.Linear, init: str) -> None:
    """Initialises an adapter's projections in place (see the module docstring for the schemes)."""
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


# --------------------------------------------------------------------------------------------
# The forward: shared by the add_adapters hooks and the PEFT layer.
# --------------------------------------------------------------------------------------------

Branch = Callable[..., torch.Tensor]  # branch(x, residual=None) -> residual + s * f(x)


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "x", "input", "inputs"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    raise ValueError("a parallel adapter needs the block's input as its first argument (or hidden_states=)")


def _on_first(output, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Applies ``fn`` to the output tensor, or to the first element of a tuple/list output."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return type(output)([fn(output[0]), *output[1:]])
    raise TypeError(f"an adapter can act on a tensor output (or the first element of a tuple), "
                    f"got {type(output).__name__}")


def adapt_inputs(args: tuple, kwargs: dict, branches: Sequence[Branch]) -> tuple[tuple, dict]:
    """PARALLEL_INPUT: replaces the block's residual input x (``input_tensor``) by x + sum_i s_i f_i(x)."""
    if not branches:
        return args, kwargs
    if "input_tensor" in kwargs:
        x = kwargs["input_tensor"]
    elif len(args) >= 2:
        x = args[1]
    else:
        raise ValueError("a parallel adapter on a BERT-style output block needs its residual input "
                         "(input_tensor) as the second argument or as input_tensor=")
    y = x
    for branch in branches:
        y = branch(x, residual=y)
    if "input_tensor" in kwargs:
        return args, {**kwargs, "input_tensor": y}
    return (args[0], y, *args[2:]), kwargs


def adapt_output(mode: str, branch: Branch, args: tuple, kwargs: dict, output):
    """OUTPUT: ``y + s f(y)``; PARALLEL: ``y + s f(x)`` with x the block's input (cast to y's dtype)."""
    if mode == OUTPUT:
        return _on_first(output, branch)
    if mode == PARALLEL:
        x = _first_input(args, kwargs)
        return _on_first(output, lambda y: branch(x.to(y.dtype), residual=y))
    raise ValueError(f"unknown adapter mode {mode!r}")


def run_site(base: nn.Module, args: tuple, kwargs: dict, adapters: Sequence[tuple[str, Branch]]):
    """Calls ``base`` with the given adapters (mode, branch) applied, in order."""
    args, kwargs = adapt_inputs(args, kwargs, [b for mode, b in adapters if mode == PARALLEL_INPUT])
    output = base(*args, **kwargs)
    for mode, branch in adapters:
        if mode != PARALLEL_INPUT:
            output = adapt_output(mode, branch, args, kwargs, output)
    return output


# --------------------------------------------------------------------------------------------
# add_adapters / save_adapters / load_adapters / remove_adapters
# --------------------------------------------------------------------------------------------

class _SiteHook:
    """A forward (pre-)hook running the ``adapterfast`` child of the hooked module at its site."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, module, args, kwargs, output=None):
        adapter = getattr(module, ATTACHED_NAME)
        if self.mode == PARALLEL_INPUT:
            return adapt_inputs(args, kwargs, [adapter])
        return adapt_output(self.mode, adapter, args, kwargs, output)

    def __repr__(self):
        return f"adapterfast site hook ({self.mode})"


def adapted_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that ``add_adapters`` attached an adapter to, by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, ATTACHED_NAME, None), Adapter) and hasattr(m, "_adapterfast_hooks")}


def _head_names(options: AdapterOptions) -> list[str]:
    heads = list(options.modules_to_save or [])
    for h in HEAD_MODULES.get(options.task_type or "", ()):
        if h not in heads:
            heads.append(h)
    return heads


def add_adapters(model: nn.Module, config=None, *, autocast_adapter_dtype: bool = True, **options) -> nn.Module:
    """Injects bottleneck adapters into ``model`` in place, freezes the base, and returns ``model``.

    ``config`` is an ``AdapterOptions``, a PEFT ``adapterfast.AdapterConfig`` or a dict; keywords
    override its fields (``add_adapters(model, r=8, placement="houlsby")``). Only the adapters and
    the task head (see the module docstring) stay trainable. A model that already has adapters is
    an error: ``remove_adapters`` first, or use PEFT for several named adapters.
    """
    opts = as_options(config, **options)
    if any(hasattr(m, "adapterfast_down") for m in model.modules()):
        raise ValueError("this model has adapterfast adapters from PEFT (get_peft_model); manage them with PEFT "
                         "(add_adapter, save_pretrained, PeftModel.from_pretrained)")
    if adapted_modules(model):
        raise ValueError("this model already has adapterfast adapters; call remove_adapters(model) first, "
                         "or use PEFT (get_peft_model / add_adapter) for several named adapters")
    targets = resolve_target_modules(opts, model_type_of(model), model)
    heads = _head_names(opts)
    model_config = getattr(model, "config", None)
    sites = []
    for name, module in model.named_modules():
        if not name or _is_head(name, heads) or not matches(targets, name):
            continue
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        sites.append((name, module))
    if not sites:
        raise ValueError(f"target_modules {targets!r} matched no module of {type(model).__name__}")
    scale, activation = adapter_scale(opts), activations.canonical(opts.activation)

    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in sites:
        mode = site_mode(module, opts.placement)
        check_site(module, mode, name)
        d = feature_size(module, mode, model_config, name)
        device, dtype = base_device_dtype(module)
        adapter = Adapter(d, opts.r, activation=activation, bias=opts.bias, scale=scale, dropout=opts.dropout,
                          device=device, dtype=adapter_dtype(dtype, autocast_adapter_dtype))
        init_adapter_(adapter.down, adapter.up, opts.init)
        adapter.train(module.training)
        module.add_module(ATTACHED_NAME, adapter)
        hook = _SiteHook(mode)
        if mode == PARALLEL_INPUT:
            handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            handle = module.register_forward_hook(hook, with_kwargs=True)
        module._adapterfast_hooks = [handle]
    for name, module in model.named_modules():
        if name and heads and _is_head(name, heads):
            for p in module.parameters():
                p.requires_grad_(True)
    model.adapterfast_config = opts
    if hasattr(model, "enable_input_require_grads") and getattr(model, "_require_grads_hook", None) is None:
        try:
            model.enable_input_require_grads()
        except (NotImplementedError, AttributeError):
            pass
    return model


def remove_adapters(model: nn.Module) -> nn.Module:
    """Removes what ``add_adapters`` added (the base stays frozen); returns ``model``."""
    for module in adapted_modules(model).values():
        for handle in module._adapterfast_hooks:
            handle.remove()
        del module._adapterfast_hooks
        delattr(module, ATTACHED_NAME)
    if hasattr(model, "adapterfast_config"):
        del model.adapterfast_config
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' parameters and the task head's, by their names in ``model``."""
    opts = getattr(model, "adapterfast_config", None)
    if opts is None or not adapted_modules(model):
        raise ValueError("this model has no adapterfast adapters (add them with add_adapters)")
    heads = _head_names(opts)
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        owner = name.rsplit(".", 1)[0]
        if f".{ATTACHED_NAME}." in f".{name}" or (heads and _is_head(owner, heads)):
            state[name] = tensor
    return state


def _file_path(path: Union[str, os.PathLike]) -> str:
    path = os.fspath(path)
    return path if path.endswith(".safetensors") else os.path.join(path, SAFETENSORS_NAME)


def save_adapters(model: nn.Module, path: Union[str, os.PathLike]) -> str:
    """Saves the adapters (and the task head) of an ``add_adapters`` model as safetensors.

    ``path`` is a ``.safetensors`` file or a directory (created; the file is ``adapterfast.safetensors``
    inside). The adapter options are stored in the file's metadata, so ``load_adapters`` can
    inject the same adapters into a fresh model. Returns the file written.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    target = _file_path(path)
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    metadata = {"format": "pt", _METADATA_KEY: json.dumps(dataclasses.asdict(model.adapterfast_config))}
    save_file(tensors, target, metadata=metadata)
    return target


def load_adapters(model: nn.Module, path: Union[str, os.PathLike], *, strict: bool = True) -> nn.Module:
    """Loads adapters saved by ``save_adapters`` into ``model``; returns ``model``.

    A model without adapters gets them first (``add_adapters`` with the saved options). With
    ``strict`` every saved tensor must find its parameter and every adapter parameter a tensor.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    target = _file_path(path)
    with safe_open(target, framework="pt") as f:
        metadata = f.metadata() or {}
    if _METADATA_KEY not in metadata:
        raise ValueError(f"{target} was not written by adapterfast.save_adapters (no {_METADATA_KEY} metadata)")
    if not adapted_modules(model):
        add_adapters(model, json.loads(metadata[_METADATA_KEY]))
    tensors = load_file(target)
    own = adapter_state_dict(model)
    unexpected = sorted(set(tensors) - set(own))
    missing = sorted(set(own) - set(tensors))
    if strict and (unexpected or missing):
        raise ValueError(f"adapter weights in {target} do not fit the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name in own:
                if own[name].shape != tensor.shape:
                    raise ValueError(f"{name}: saved shape {tuple(tensor.shape)}, model has {tuple(own[name].shape)}")
                own[name].copy_(tensor)
    return model


def describe(model: nn.Module) -> dict[str, Any]:
    """Counts of adapted sites and trainable parameters (a quick check after ``add_adapters``)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"sites": len(adapted_modules(model)), "trainable": trainable, "total": total}
