"""AdapterHub ``BatchSplit`` and ``Parallel`` compositions on the grouped op: one call for all children.

The library runs each child adapter on its slice of the batch (``BatchSplit``: consecutive
``batch_sizes``; ``Parallel``: the batch replicated once per child) and concatenates the slices.
When every child is an adapter name whose module the fused op computes exactly (``adapterhub.plan``),
all children are of one kind (all sequential ``Adapter`` or all ``ParallelAdapter``) and share the
activation, dropout and bias presence, the whole composition is one ``grouped_adapter`` call: row
``i`` of the batch gets the index of the child its sample belongs to. Ranks may differ (zero-padded
to the largest, exact); float scalings become per-adapter scales and ``"learned"``/``"channel"``
scalings are folded into the up projection as ``adapterhub._run`` does. Anything else runs the
library's code (or, inside an accelerated layer, one fused call per child).

``compose_batch_split`` and ``compose_parallel`` are installed on ``BottleneckLayer`` by
``adapterhub._install`` next to its other wrappers, and act only on accelerated layers.
"""
from __future__ import annotations

import torch
from adapters.composition import AdapterCompositionBlock
from adapters.context import ForwardContext
from adapters.methods.modeling import Adapter, ParallelAdapter

from ..grouped import grouped_adapter, pad_rank


def _eligible(layer, children) -> list[str] | None:
    """The children's activation-checked names when one grouped call computes them all, else None."""
    if not layer.__dict__.get(ah._FLAG) or layer.__dict__.get(ah._FUSE_DEPTH, 0) > 0:
        return None
    context = ForwardContext.get_context()
    if context is not None and getattr(context, "output_adapter_gating_scores", False):
        return None
    if not children or any(isinstance(c, AdapterCompositionBlock) or c not in layer.adapters for c in children):
        return None
    modules = [layer.adapters[c] for c in children]
    kinds = {type(m) for m in modules}
    if len(kinds) != 1 or kinds.pop() not in (Adapter, ParallelAdapter):
        return None
    settings = set()
    for m in modules:
        activation, _ = ah.plan(m)
        if activation is None:
            return None
        settings.add((activation, m.dropout.p, m.dropout.training, m.adapter_down[0].bias is not None,
                      m.adapter_up.bias is not None, m.adapter_down[0].in_features))
    return list(children) if len(settings) == 1 else None


def _run_grouped(layer, names: list[str], state, per_sample: torch.Tensor):
    """The children's adapter step for all rows at once; returns the composition's output state."""
    modules = [layer.adapters[n] for n in names]
    first = modules[0]
    activation, _ = ah.plan(first)
    r = max(m.adapter_down[0].out_features for m in modules)
    w_down, b_down, w_up, b_up, scales = [], [], [], [], []
    for m in modules:
        down, up = m.adapter_down[0], m.adapter_up
        wu, bu, scaling = up.weight, up.bias, m.scaling
        if isinstance(scaling, torch.Tensor):
            s = scaling.to(wu.dtype)
            wu = wu * s.reshape(-1, 1)
            bu = None if bu is None else bu * s.reshape(-1)
            scaling = 1.0
        w_down.append(pad_rank(down.weight, r, 0))
        w_up.append(pad_rank(wu, r, 1))
        b_down.append(None if down.bias is None else pad_rank(down.bias, r, 0))
        b_up.append(bu)
        scales.append(float(scaling))
    x = state.hidden_states
    parallel = type(first) is ParallelAdapter
    residual = torch.zeros_like(x) if parallel else state.adapter_residual
    index = per_sample.to(x.device).view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
    out = grouped_adapter(
        x, index, torch.stack(w_down), torch.stack(w_up),
        None if b_down[0] is None else torch.stack(b_down), None if b_up[0] is None else torch.stack(b_up),
        activation=activation, scale=scales, dropout=first.dropout.p, training=first.dropout.training,
        residual=residual,
    )
    return state._replace(hidden_states=out, bottleneck_up=None, last=names[-1])


def _fits(state) -> bool:
    x, res = state.hidden_states, state.adapter_residual
    return res is not None and res.shape == x.shape and res.dtype == x.dtype


def compose_batch_split(self, adapter_setup, state, lvl=0):
    """``BatchSplit`` of fusable adapters as one grouped call (library code otherwise)."""
    names = _eligible(self, list(adapter_setup))
    sizes = list(adapter_setup.batch_sizes)
    if names is not None and sum(sizes) == self._bsz(state):
        block_state = self.pre_block(adapter_setup, state)
        if _fits(block_state):
            per_sample = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes))
            return _run_grouped(self, names, block_state, per_sample)
    return ah._ORIGINAL["compose_batch_split"](self, adapter_setup, state, lvl=lvl)


def compose_parallel(self, adapter_setup, state, lvl=0):
    """``Parallel`` of fusable adapters as one grouped call over the replicated batch (library code otherwise).

    The batch replication and its bookkeeping in the forward context are the library's rules for a
    ``Parallel`` block: replicate once per channel at the first parallel block, afterwards expect a
    batch that is already a multiple of the channel count."""
    names = _eligible(self, list(adapter_setup))
    context = ForwardContext.get_context()
    if names is None or context is None:
        return ah._ORIGINAL["compose_parallel"](self, adapter_setup, state, lvl=lvl)
    channels = adapter_setup.parallel_channels
    bsz = self._bsz(state)
    if not context.adapters_parallelized:
        original = bsz
        state = self.repeat(state, channels)
        context.adapters_parallelized = True
        context.original_batch_size = original
    elif self.allow_multi_parallelize and bsz == getattr(context, "original_batch_size", -1):
        original = bsz
        state = self.repeat(state, channels)
    elif bsz % channels != 0:
        raise ValueError("The total input batch size in a Parallel adapter block must be divisible by the number "
                         "of parallel channels.")
    else:
        original = bsz // channels
    block_state = self.pre_block(adapter_setup, state)
    if not _fits(block_state):
        children = [self.compose_single(n, self.vslice(block_state, slice(i * original, (i + 1) * original)),
                                        lvl=lvl + 1) for i, n in enumerate(names)]
        return self.pad_and_concat(children)
    per_sample = torch.arange(len(names)).repeat_interleave(original)
    return _run_grouped(self, names, block_state, per_sample)


# At the end: adapterhub.py installs the functions above and imports this module, so either may be
# imported first.
from . import adapterhub as ah  # noqa: E402
