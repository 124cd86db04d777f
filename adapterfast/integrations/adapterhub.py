"""AdapterHub ``adapters``: run the bottleneck adapters of an ``adapters`` model on the fused op.

(Past 400 lines on purpose: about 100 are this docstring, which maps the library's forward onto
the op; the code is one job, the library's bottleneck layer on the fused op, and its mixed-batch
compositions are in ``adapterhub_grouped.py``.)

    import adapters, adapterfast.integrations.adapterhub as ah
    model = adapters.AutoAdapterModel.from_pretrained(...)   # or adapters.init(hf_model)
    model.add_adapter("task", config="seq_bn"); model.train_adapter("task")
    ah.accelerate(model)        # -> number of adapter modules now running on adapterfast
    ...train / save_adapter / load_adapter / add more adapters as usual...
    ah.restore(model)           # back to the library's own code

What the library computes (``adapters`` 1.1 to 1.3, ``methods/modeling.py`` and
``methods/bottleneck.py``; one ``Adapter``/``ParallelAdapter`` module per adapter, layer and
location, held in the ``adapters`` dict of a ``BottleneckLayer``)::

    sequential (Adapter.forward(x, residual)):   out = residual + dropout(scaling * up(act(down(x))))
    parallel   (ParallelAdapter.forward(x, _)):  out = dropout(scaling * up(act(down(x))))
               then ParallelAdapter.post_forward adds the sub-layer output h:  h + out

``x`` and ``residual`` come from the adapter's ``pre_forward`` (the Transformer layer norm and
residual placement: ``original_ln_before``, ``residual_before_ln``) and the result goes through its
``post_forward`` (``original_ln_after``). Those run unchanged, as the library's code.

How it maps onto ``fused_adapter(x, Wd, Wu, bd, bu, activation, scale, dropout, training, residual)``,
``y = residual + scale * dropout(up(act(down(x) + bd)) + bu)``:

- ``down``/``up`` are ``adapter_down[0]``/``adapter_up`` (``nn.Linear``, weights and biases as is).
- ``scaling``: a float becomes ``scale``. ``"learned"`` (a ``[1]`` parameter) and ``"channel"`` (a
  ``[d]`` parameter) are folded into the up projection each call, ``s * (Wu a + bu) =
  (diag(s) Wu) a + s * bu``: a ``[d, r]`` product that autograd differentiates, so ``s`` trains.
- dropout: theirs acts on the scaled branch output, before the residual, in the adapter module's
  training mode: the same place and the same inverted scaling as ours (``dropout(s * u) =
  s * dropout(u)``), so it is fused. Only the random stream differs: masks come from adapterfast's
  Philox generator (seeded from torch's CPU generator), so a run with adapter dropout > 0 is not
  bit-for-bit the library's; its distribution is the same.
- ``non_linearity``: the activation module the library built (``Activation_Function_Class.f``,
  transformers ``ACT2FN`` or ``leaky_relu``) is recognised by type (``activations.from_module``)
  and then checked numerically against our implementation on a float64 probe, so ``relu``,
  ``gelu``, ``gelu_new``/``gelu_fast``/``gelu_pytorch_tanh``, ``swish``/``silu``, ``tanh``,
  ``sigmoid``, ``quick_gelu``, ``leakyrelu``, ``linear`` fuse and anything else falls back.
- sequential adapters: ``residual`` is the adapter residual from ``pre_forward`` (with no
  ``ln_after``, adding it before or after the missing layer norm is the same sum).
- parallel adapters: when the active setup at a layer is one parallel adapter (``par_bn``,
  ``scaled_par_bn``: the usual case), the layer's step is taken here in one op:
  ``x`` = the sub-layer input, ``residual`` = the sub-layer output ``h``, then ``post_forward``'s
  remaining ``original_ln_after`` step (``LN(y + input)``, or ``y + input`` without a layer norm).
  Inside a composition (Stack of several, Parallel, Average, Split, BatchSplit), where the library
  needs the branch alone, the op runs with a zero residual.

How it is switched on: methods of ``BottleneckLayer`` get wrappers, put on the class once
(``install()``, by the first ``accelerate``; ``uninstall()``, or ``adapterfast.unregister()``, takes
them off): ``compose_single`` (runs one adapter), ``compose_fuse`` (marks
AdapterFusion, whose children stay on the library path because fusion needs each adapter's
un-dropped up-projection output) and ``bottleneck_layer_forward`` (the parallel fast path). A
wrapper does something new only on a layer whose ``__dict__`` holds the flag ``accelerate`` sets
(``restore`` removes it); everywhere else it calls the library's method and nothing more. The flag is
a plain attribute, so ``deepcopy`` and ``DataParallel`` replicas carry it. The decision
is made per call from the adapter module's current state, so adapters added, loaded or averaged
after ``accelerate`` are accelerated too, and parameters, ``state_dict``,
``save_adapter``/``load_adapter``, ``train_adapter``, freezing and the active setup all stay the
library's. Hooks registered on an adapter module would be skipped by the fused path, so such a
module stays on the library's code.

What stays on the library's code, and why (logged through the ``adapterfast`` logger once per
model, adapter name and reason): PHM/Compacter layers (factorised weights, no ``nn.Linear``),
gating (``use_gating``: an input-dependent scalar gate), ``ln_before``/``ln_after`` (a layer norm
inside the adapter is not part of the op), stochastic depth on sequential adapters (per-row drop
path), activations the op does not compute, ``scaling`` of another shape, dropout p >= 1, modules
with hooks or of a subclass.
At run time, also: AdapterFusion children, calls that ask for gating scores, and inputs whose
residual has another shape or dtype than ``x``.
"""
from __future__ import annotations

import logging
import numbers
import weakref
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import activations, reference
from .._log import first_time, logger, warn_once
from ..functional import fused_adapter

try:
    import adapters as _adapters
    from adapters.composition import Stack
    from adapters.context import ForwardContext
    from adapters.methods.bottleneck import BottleneckLayer
    from adapters.methods.modeling import Activation_Function_Class, Adapter, ParallelAdapter
except ImportError as error:  # pragma: no cover - exercised only without the package
    raise ImportError(
        "adapterfast.integrations.adapterhub needs the AdapterHub `adapters` package "
        "(pip install 'adapterfast[adapterhub]')"
    ) from error

__all__ = ["SUPPORTED_VERSIONS", "accelerate", "install", "is_accelerated", "plan", "restore", "uninstall"]

SUPPORTED_VERSIONS = ((1, 1), (1, 4))  # >= 1.1, < 1.4: the forwards mirrored here are unchanged there
_FLAG = "_adapterfast_accelerated"  # per-layer switch read by the wrappers
_FUSE_DEPTH = "_adapterfast_fuse_depth"
_PROBE = torch.linspace(-6.0, 6.0, 121, dtype=torch.float64)

# plan()'s activation check per adapter module (a float64 probe: too slow to repeat every call),
# valid while the module's activation function is the one checked; gone with the module.
_activation_cache: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------- eligibility


def _activation(adapter: nn.Module, act: nn.Module) -> tuple[str | None, str | None]:
    """``(canonical name, None)`` for the adapter's non-linearity ``act``, or ``(None, reason)``."""
    if type(act) is not Activation_Function_Class:
        return None, f"its activation is a {type(act).__name__}, not the library's Activation_Function_Class"
    f = act.f
    cached = _activation_cache.get(adapter)
    if cached is not None and cached[0] is f:
        return cached[1], cached[2]
    if f is F.leaky_relu:
        name = "leaky_relu"
    elif isinstance(f, nn.Module):
        name = activations.from_module(f)
    else:
        name = None
    label = type(f).__name__ if isinstance(f, nn.Module) else getattr(f, "__name__", repr(f))
    reason = None
    if name is None:
        reason = f"activation {label} is not one the fused op computes"
    else:
        try:
            with torch.no_grad():
                same = torch.allclose(f(_PROBE), reference.activate(_PROBE, name), rtol=1e-9, atol=1e-9)
        except Exception:  # an activation that cannot run on a float64 CPU probe is not checked
            same = False
        if not same:
            name, reason = None, f"activation {label} does not match the fused op's on a probe"
    _activation_cache[adapter] = (f, name, reason)
    return name, reason


def _has_hooks(*modules: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in modules)


def plan(adapter: nn.Module) -> tuple[str | None, str | None]:
    """``(activation, None)`` when the fused op computes ``adapter`` exactly, else ``(None, reason)``.

    ``adapter`` is an ``adapters`` ``Adapter``/``ParallelAdapter`` module; only its configuration is
    looked at (its structure and flags), never an input.
    """
    kind = type(adapter)
    if kind not in (Adapter, ParallelAdapter):
        return None, f"{kind.__name__} is not the library's Adapter/ParallelAdapter"
    if getattr(adapter, "use_gating", False):
        return None, "gating (use_gating) is not part of the fused op"
    down, up = adapter.adapter_down, adapter.adapter_up
    if type(down) is not nn.Sequential:
        return None, "adapter_down is not the library's Sequential"
    parts = tuple(down._modules.values())
    if len(parts) != 2 or type(parts[0]) is not nn.Linear or type(up) is not nn.Linear:
        if any(isinstance(p, nn.LayerNorm) for p in parts):
            return None, "ln_before: a layer norm inside the adapter is not part of the fused op"
        if any(type(p).__name__ == "PHMLayer" for p in parts + (up,)):
            return None, "PHM/Compacter layers (phm_layer) are not nn.Linear projections"
        return None, "its projections are not nn.Linear (adapter_down = [Linear, activation], adapter_up = Linear)"
    if getattr(adapter, "add_layer_norm_after", False):
        return None, "ln_after: a layer norm inside the adapter is not part of the fused op"
    if kind is Adapter and hasattr(adapter, "DropPath"):
        return None, "stochastic depth (per-row drop path) is not part of the fused op"
    scaling = adapter.scaling
    if isinstance(scaling, torch.Tensor):
        if scaling.dim() != 1 or scaling.numel() not in (1, up.out_features):
            return None, f"scaling of shape {tuple(scaling.shape)} is neither a scalar nor per-channel"
    elif isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        return None, f"scaling {scaling!r} is not a number or a parameter"
    drop = adapter.dropout
    if type(drop) is not nn.Dropout or not 0.0 <= drop.p < 1.0:
        return None, f"dropout {drop!r} is not an nn.Dropout with p in [0, 1)"
    act = parts[1]
    f = getattr(act, "f", None)
    if _has_hooks(adapter, down, parts[0], act, up, drop) or (isinstance(f, nn.Module) and _has_hooks(f)):
        return None, "it has forward/backward hooks, which the fused path would skip"
    return _activation(adapter, act)


# ----------------------------------------------------------------------------- the fused step


def _run(adapter: nn.Module, activation: str, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + scaling * dropout(up(act(down(x))))`` for one adapter module, on the fused op."""
    down, up = adapter.adapter_down[0], adapter.adapter_up
    w_up, b_up, scaling = up.weight, up.bias, adapter.scaling
    if isinstance(scaling, torch.Tensor):  # "learned" [1] / "channel" [d]: folded, differentiably
        s = scaling.to(w_up.dtype)
        w_up = w_up * s.reshape(-1, 1)
        b_up = None if b_up is None else b_up * s.reshape(-1)
        scale = 1.0
    else:
        scale = float(scaling)
    drop = adapter.dropout
    return fused_adapter(
        x, down.weight, w_up, down.bias, b_up,
        activation=activation, scale=scale, dropout=drop.p, training=drop.training, residual=residual,
    )


def _first_report(layer: nn.Module, name: str, reason: str) -> bool:
    """True the first time ``(name, reason)`` is seen for ``layer``'s model; records it.

    The model is the adapters config its layers share (``_log.first_time``'s owner).
    """
    return first_time((name, reason), owner=getattr(layer, "adapters_config", layer))


def _fusable(layer: nn.Module, name: str, x: torch.Tensor, residual: torch.Tensor | None) -> str | None:
    """The activation to fuse adapter ``name`` of ``layer`` with for this call, or None for the library path."""
    if layer.__dict__.get(_FUSE_DEPTH, 0) > 0:
        warn_once("adapterfast: adapters inside a Fuse block run on the adapters library code "
                  "(AdapterFusion needs each adapter's up-projection output)", level=logging.INFO)
        return None
    context = ForwardContext.get_context()
    if context is not None and getattr(context, "output_adapter_gating_scores", False):
        return None
    if residual is None or residual.shape != x.shape or residual.dtype != x.dtype:
        return None
    adapter = layer.adapters[name]
    activation, reason = plan(adapter)
    if activation is None and _first_report(layer, name, reason):
        logger.warning("adapterfast: AdapterHub adapter %r stays on the adapters library code: %s", name, reason)
    return activation


def _compose_single(self, adapter_setup, state, lvl=0):
    """``BottleneckLayer.compose_single`` on the fused op (library path where it cannot be)."""
    if self.__dict__.get(_FLAG):
        adapter = self.adapters[adapter_setup]
        x = state.hidden_states
        parallel = isinstance(adapter, ParallelAdapter)  # the library wants its branch alone here
        activation = _fusable(self, adapter_setup, x, x if parallel else state.adapter_residual)
        if activation is not None:
            residual = torch.zeros_like(x) if parallel else state.adapter_residual
            hidden_states = _run(adapter, activation, x, residual)
            # bottleneck_up is only read by compose_fuse, whose children never take this path
            return state._replace(hidden_states=hidden_states, bottleneck_up=None, last=adapter_setup)
    return _ORIGINAL["compose_single"](self, adapter_setup, state, lvl=lvl)


def _compose_fuse(self, adapter_setup, state, lvl=0):
    """``BottleneckLayer.compose_fuse``, with the adapters under it kept on the library path."""
    if not self.__dict__.get(_FLAG):
        return _ORIGINAL["compose_fuse"](self, adapter_setup, state, lvl=lvl)
    self.__dict__[_FUSE_DEPTH] = self.__dict__.get(_FUSE_DEPTH, 0) + 1
    try:
        return _ORIGINAL["compose_fuse"](self, adapter_setup, state, lvl=lvl)
    finally:
        self.__dict__[_FUSE_DEPTH] -= 1


def _single_parallel(layer, setup) -> str | None:
    """The name of the one parallel adapter that ``setup`` runs at ``layer``, if that is all it runs."""
    if isinstance(setup, Stack) and len(setup.children) == 1:
        setup = setup.children[0]
    if isinstance(setup, str) and setup in layer.adapters and type(layer.adapters[setup]) is ParallelAdapter:
        return setup
    return None


def _bottleneck_layer_forward(self, hidden_states, residual_input, layer_norm):
    """``BottleneckLayer.bottleneck_layer_forward``; one active parallel adapter runs here as a single op.

    For that case the library computes ``pre_forward`` (x = residual_input), the branch, then
    ``post_forward``: ``h = branch + hidden_states``, and with ``original_ln_after``
    ``LN(h + residual_input)`` (or ``h + residual_input`` without a layer norm).
    """
    if (self.__dict__.get(_FLAG) and residual_input is not None
            and residual_input.shape == hidden_states.shape):
        name = _single_parallel(self, self.get_active_setup())
        if name is not None:
            activation = _fusable(self, name, residual_input, hidden_states)
            if activation is not None:
                adapter = self.adapters[name]
                out = _run(adapter, activation, residual_input, hidden_states)
                if adapter.original_ln_after:
                    out = layer_norm(out + residual_input) if layer_norm else out + residual_input
                return out
    return _ORIGINAL["bottleneck_layer_forward"](self, hidden_states, residual_input, layer_norm)


from . import adapterhub_grouped  # noqa: E402  (BatchSplit/Parallel on the grouped op)

_REPLACEMENTS = {
    "compose_single": _compose_single,
    "compose_fuse": _compose_fuse,
    "bottleneck_layer_forward": _bottleneck_layer_forward,
    "compose_batch_split": adapterhub_grouped.compose_batch_split,
    "compose_parallel": adapterhub_grouped.compose_parallel,
}
_ORIGINAL: dict = {}


_INHERITED: set = set()  # names install() added to BottleneckLayer that it had only by inheritance


def install() -> None:
    """Puts the wrappers on ``BottleneckLayer`` (idempotent); ``accelerate`` calls it.

    They do nothing new for layers ``accelerate`` did not switch on; ``uninstall`` takes them off.
    """
    if _ORIGINAL:
        return
    for name, wrapper in _REPLACEMENTS.items():
        original = getattr(BottleneckLayer, name)  # compose_batch_split/_parallel are inherited
        wrapper.__wrapped__ = original
        _ORIGINAL[name] = original
        if name not in BottleneckLayer.__dict__:
            _INHERITED.add(name)
        setattr(BottleneckLayer, name, wrapper)


def uninstall() -> None:
    """Gives ``BottleneckLayer`` its own methods back (idempotent): every model runs the library's code
    until the next ``accelerate``. ``adapterfast.unregister()`` calls it."""
    for name, original in _ORIGINAL.items():
        if name in _INHERITED:
            delattr(BottleneckLayer, name)
        else:
            setattr(BottleneckLayer, name, original)
    _ORIGINAL.clear()
    _INHERITED.clear()


# ----------------------------------------------------------------------------- public API


def _version_ok() -> bool:
    try:
        parts = tuple(int(p) for p in _adapters.__version__.split(".")[:2])
    except (AttributeError, ValueError):
        return False
    low, high = SUPPORTED_VERSIONS
    return low <= parts < high


def _patchable(layer: nn.Module) -> bool:
    """Whether ``layer``'s class runs the three methods the wrappers stand in for (no override)."""
    cls = type(layer)
    return all(getattr(cls, name) is wrapper for name, wrapper in _REPLACEMENTS.items())


def accelerate(model: nn.Module) -> int:
    """Runs the bottleneck adapters of an ``adapters`` model on the fused op, from now on.

    Switches on every ``BottleneckLayer`` of ``model`` (call after ``adapters.init(model)`` or on an
    ``AutoAdapterModel``; adapters added before or after both run fused). Returns how many adapter
    modules (one per adapter, layer and location) the model holds now that run fused; those that
    cannot are logged once, with the reason, and keep running on the library's code. Calling it
    again is harmless.
    """
    if not _version_ok():
        logger.warning("adapterfast: adapters %s is outside the tested range >=%d.%d,<%d.%d; "
                       "accelerating anyway", getattr(_adapters, "__version__", "?"),
                       *SUPPORTED_VERSIONS[0], *SUPPORTED_VERSIONS[1])
    install()
    layers = [m for m in model.modules() if isinstance(m, BottleneckLayer)]
    if not layers:
        logger.warning("adapterfast: %s has no AdapterHub bottleneck layers (call adapters.init(model) first)",
                       type(model).__name__)
    fused = 0
    fallbacks: dict[tuple[str, str], int] = defaultdict(int)
    for layer in layers:
        if not _patchable(layer):
            logger.warning("adapterfast: %s overrides the bottleneck layer's methods; left on the library code",
                           type(layer).__name__)
            continue
        layer.__dict__[_FLAG] = True
        fused += _fused_count(layer)
        for name, adapter in getattr(layer, "adapters", {}).items():
            activation, reason = plan(adapter)
            if activation is None:
                fallbacks[(name, reason)] += 1
                _first_report(layer, name, reason)
    for (name, reason), count in sorted(fallbacks.items()):
        logger.warning("adapterfast: AdapterHub adapter %r stays on the adapters library code in %d layer(s): %s",
                       name, count, reason)
    logger.info("adapterfast: %d AdapterHub bottleneck adapter module(s) run on the fused op", fused)
    return fused


def restore(model: nn.Module) -> int:
    """Undoes ``accelerate``: every bottleneck layer of ``model`` runs the library's own code again.

    Returns how many adapter modules ran fused and now run on the library's code: the same count
    ``accelerate`` returns (one per adapter, layer and location), so ``restore(model) ==
    accelerate(model)`` when no adapter was added in between. (The class-level wrappers stay
    installed, for other models; on a layer that is not switched on they call the library's method
    and nothing else. ``uninstall()`` removes them.)
    """
    restored = 0
    for layer in model.modules():
        if isinstance(layer, BottleneckLayer) and layer.__dict__.pop(_FLAG, False):
            layer.__dict__.pop(_FUSE_DEPTH, None)
            restored += _fused_count(layer)
    return restored


def _fused_count(layer: nn.Module) -> int:
    """How many of ``layer``'s adapter modules the fused op runs (those ``plan`` accepts)."""
    return sum(plan(adapter)[0] is not None for adapter in getattr(layer, "adapters", {}).values())


def is_accelerated(layer: nn.Module) -> bool:
    """Whether a ``BottleneckLayer`` is switched on by ``accelerate``."""
    return bool(layer.__dict__.get(_FLAG))
