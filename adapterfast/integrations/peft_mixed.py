"""PEFT mixed-batch inference for ``AdapterConfig`` models: ``model(..., adapter_names=[...])``.

PEFT's convention (as for LoRA): ``adapter_names`` has one entry per sample of the batch, an
adapter name or ``"__base__"`` (no adapter), and is accepted in eval mode only. Here every
adapter site runs all of the batch's adapters in one ``grouped_adapter`` call: the weights of the
adapters named in the batch are stacked, each row (token) gets the index of its sample's adapter
(-1 for ``"__base__"`` or for an adapter that has no weights at this site), and the site's
residual semantics are those of the single-adapter path (``hf.run_site``). Adapters that differ
at a site in placement mode, activation or bias presence run as separate grouped calls, one per
kind; adapters of different ranks are zero-padded to the largest (exact), and per-adapter scales
(``alpha / r``) go to the op as its per-adapter scales.

Wiring: ``enable_peft_forward_hooks`` is ``AdapterfastModel._enable_peft_forward_hooks`` (the
context ``PeftModel.forward``/``generate`` enter with the call's kwargs). It marks each
``AdapterfastLayer`` with the batch's names for the duration of the call, and
``AdapterfastLayer.forward`` hands a marked layer to ``mixed_forward``.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch

from ..grouped import grouped_adapter, pad_rank
from . import hf

BASE_NAME = "__base__"
MARK = "_adapterfast_mixed_names"


def _layers(tuner):
    from .peft import AdapterfastLayer

    return [m for m in tuner.model.modules() if isinstance(m, AdapterfastLayer)]


@contextlib.contextmanager
def enable_peft_forward_hooks(tuner, *args, **kwargs):
    """Within the context, the ``AdapterfastLayer``s run the batch's ``adapter_names`` (one per sample)."""
    names = kwargs.pop("adapter_names", None)
    if names is None:
        yield
        return
    if tuner.training:
        raise ValueError("adapter_names= (mixed-batch inference) needs the model in eval mode; call model.eval()")
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must be a list of adapter names, one per sample, got {names!r}")
    names = list(names)
    layers = _layers(tuner)
    known = set()
    for layer in layers:
        known.update(layer.adapterfast_down.keys())
    unknown = sorted(set(names) - known - {BASE_NAME})
    if unknown:
        raise ValueError(f"adapter_names contains unknown adapters {unknown}; this model has {sorted(known)} "
                         f"(and {BASE_NAME!r} for no adapter)")
    for layer in layers:
        setattr(layer, MARK, names)
    try:
        yield
    finally:
        for layer in layers:
            if hasattr(layer, MARK):
                delattr(layer, MARK)


def is_mixed(layer) -> bool:
    """Whether ``layer`` is inside a mixed-batch call."""
    return getattr(layer, MARK, None) is not None


def _row_index(per_sample: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 2 or x.shape[0] != per_sample.shape[0]:
        raise ValueError(f"adapter_names has {per_sample.shape[0]} entries but the activations at an adapter site "
                         f"have shape {tuple(x.shape)}: pass one adapter name per sample of the batch")
    return per_sample.to(x.device).view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])


def _grouped_branch(layer, group: list[str], per_sample: torch.Tensor):
    """A ``Branch`` (``f(x, residual=None)``) running the adapters ``group`` of this site in one call."""
    downs = [layer.adapterfast_down[n] for n in group]
    ups = [layer.adapterfast_up[n] for n in group]
    settings = layer.adapterfast_settings[group[0]]
    r = max(m.out_features for m in downs)
    w_down = torch.stack([pad_rank(m.weight, r, 0) for m in downs])
    w_up = torch.stack([pad_rank(m.weight, r, 1) for m in ups])
    b_down = torch.stack([pad_rank(m.bias, r, 0) for m in downs]) if downs[0].bias is not None else None
    b_up = torch.stack([m.bias for m in ups]) if ups[0].bias is not None else None
    scales = [layer.adapterfast_settings[n].scale for n in group]

    def branch(x, residual=None):
        return grouped_adapter(x, _row_index(per_sample, x), w_down, w_up, b_down, b_up,
                               activation=settings.activation, scale=scales, dropout=settings.dropout,
                               training=False, residual=residual)

    return settings.mode, branch


def mixed_forward(layer, args: tuple, kwargs: dict):
    """``AdapterfastLayer.forward`` for a mixed batch: the base layer, then the batch's adapters grouped."""
    names = getattr(layer, MARK)
    groups: OrderedDict[tuple, list[str]] = OrderedDict()
    for name in dict.fromkeys(names):
        if name == BASE_NAME or name not in layer.adapterfast_down:
            continue
        s = layer.adapterfast_settings[name]
        groups.setdefault((s.mode, s.activation, layer.adapterfast_down[name].bias is not None), []).append(name)
    adapters = []
    for group in groups.values():
        position = {n: i for i, n in enumerate(group)}
        per_sample = torch.tensor([position.get(n, -1) for n in names], dtype=torch.long)
        adapters.append(_grouped_branch(layer, group, per_sample))
    return hf.run_site(layer.base_layer, args, kwargs, adapters)
