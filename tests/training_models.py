"""Tiny models shared by the training-integration tests (compile, autocast, checkpoint, distributed).

``Block`` is a transformer-ish block with the two adapter placements people use: a sequential
adapter on a sublayer output (Houlsby/Pfeiffer, residual = its input) and a parallel adapter
``h + s * f(x)`` (He et al.), whose residual is the sublayer output ``h``. ``eager_twin`` builds
the same model with ``helpers.EagerAdapter`` (same parameter names), so eager and fused runs can
be compared weight for weight.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from adapterfast import Adapter
from helpers import EagerAdapter

class Block(nn.Module):
    """A frozen-able base sublayer with a sequential and a parallel adapter, then a LayerNorm."""

    def __init__(self, d, r, dropout=0.0, adapter_cls=Adapter):
        super().__init__()
        self.ff = nn.Linear(d, d)
        self.adapter = adapter_cls(d, r, activation="gelu", bias=True, dropout=dropout)
        self.parallel = adapter_cls(d, r, activation="silu", bias=False, scale=0.5, dropout=dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = self.adapter(torch.relu(self.ff(x)))
        return self.norm(self.parallel(x, residual=h))


def make_model(d=16, r=4, *, blocks=2, dropout=0.0, adapter_cls=Adapter, seed=0, freeze_base=True):
    """``blocks`` Blocks and a linear head, initialised from ``seed``; only adapters train if ``freeze_base``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(*[Block(d, r, dropout, adapter_cls) for _ in range(blocks)], nn.Linear(d, 2))
    if freeze_base:
        freeze_all_but_adapters(model)
    return model


def freeze_all_but_adapters(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, (Adapter, EagerAdapter)):
            module.requires_grad_(True)
    return model


def eager_twin(model: nn.Module) -> nn.Module:
    """The same model with ``EagerAdapter`` in place of every ``Adapter``, same weights and requires_grad."""
    blocks = sum(isinstance(m, Block) for m in model)
    d = model[-1].in_features
    r = model[0].adapter.down.out_features
    twin = make_model(d, r, blocks=blocks, adapter_cls=EagerAdapter, freeze_base=False)
    twin.load_state_dict(model.state_dict())
    for (_, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        q.requires_grad_(p.requires_grad)
    return twin


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
