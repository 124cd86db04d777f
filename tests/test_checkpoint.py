"""Recomputation and reproducibility: activation checkpointing and deterministic mode.

- ``torch.utils.checkpoint`` (``use_reentrant`` True and False) around blocks whose adapters use
  dropout gives the gradients of the un-checkpointed model, because the dropout seed is drawn from
  the CPU generator, whose state checkpointing restores before recomputing: the recomputation draws
  the same seeds, hence the same masks.
- ``torch.use_deterministic_algorithms(True)`` keeps working, and training is bitwise reproducible.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import adapterfast
from adapterfast import dropout as dropout_rng
from training_models import grads, make_model


class Checkpointed(nn.Module):
    """Runs each block of ``model`` under ``torch.utils.checkpoint``."""

    def __init__(self, model, use_reentrant, preserve_rng_state=True):
        super().__init__()
        self.model = model
        self.use_reentrant = use_reentrant
        self.preserve_rng_state = preserve_rng_state

    def forward(self, x):
        for block in self.model[:-1]:
            x = checkpoint(block, x, use_reentrant=self.use_reentrant, preserve_rng_state=self.preserve_rng_state)
        return self.model[-1](x)


def _grads_of(model, runner, x, seed=5):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)
    y = runner(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), {**grads(model), "x": x.grad}


@pytest.fixture
def seed_log(monkeypatch):
    """Records every dropout seed fused_adapter draws."""
    drawn = []
    real = dropout_rng.new_seed

    def recording(*args, **kwargs):
        seed = real(*args, **kwargs)
        drawn.append(int(seed))
        return seed

    monkeypatch.setattr(dropout_rng, "new_seed", recording)
    return drawn


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("freeze_base", [True, False])
def test_checkpoint_same_grads_and_masks(backend, seed_log, use_reentrant, freeze_base):
    model = make_model(dropout=0.3, freeze_base=freeze_base)
    x = torch.randn(3, 7, 16)
    y_plain, g_plain = _grads_of(model, model, x)
    plain_seeds = list(seed_log)
    seed_log.clear()
    y_ckpt, g_ckpt = _grads_of(model, Checkpointed(model, use_reentrant), x)

    # 2 blocks x 2 adapters: 4 seeds in the forward; the backward recomputes block 1 then block 0,
    # each drawing the seeds it drew in the forward
    assert len(plain_seeds) == 4
    assert seed_log == plain_seeds + plain_seeds[2:] + plain_seeds[:2]
    assert torch.equal(y_ckpt, y_plain)
    assert g_ckpt.keys() == g_plain.keys()
    for name in g_plain:
        assert torch.equal(g_ckpt[name], g_plain[name]), name


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_without_rng_preservation_changes_masks(seed_log, use_reentrant):
    """The control: with ``preserve_rng_state=False`` the recomputation draws new seeds, and the
    gradients no longer match, so the test above does detect a mask mismatch."""
    model = make_model(dropout=0.3, freeze_base=False)
    x = torch.randn(3, 7, 16)
    _, g_plain = _grads_of(model, model, x)
    seed_log.clear()
    _, g_ckpt = _grads_of(model, Checkpointed(model, use_reentrant, preserve_rng_state=False), x)
    assert seed_log[:4] != seed_log[4:]
    assert not torch.equal(g_ckpt["0.adapter.up.bias"], g_plain["0.adapter.up.bias"])


def test_checkpoint_under_autocast(backend):
    model = make_model(dropout=0.3)
    x = torch.randn(3, 7, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain, g_plain = _grads_of(model, model, x)
        y_ckpt, g_ckpt = _grads_of(model, Checkpointed(model, use_reentrant=False), x)
    assert torch.equal(y_ckpt, y_plain)
    for name in g_plain:
        assert torch.equal(g_ckpt[name], g_plain[name]), name


def _train(steps=3, compile_backend=None):
    model = make_model(dropout=0.2, freeze_base=False)
    runner = model if compile_backend is None else torch.compile(model, backend=compile_backend, fullgraph=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(steps):
        x, target = torch.randn(4, 6, 16), torch.randn(4, 6, 2)
        loss = torch.nn.functional.mse_loss(runner(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("compile_backend", [None, "aot_eager"])
def test_deterministic_mode_bitwise_reproducible(backend, compile_backend):
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch._dynamo.reset()
        first = _train(compile_backend=compile_backend)
        torch._dynamo.reset()
        second = _train(compile_backend=compile_backend)
    finally:
        torch.use_deterministic_algorithms(was)
        torch._dynamo.reset()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(first, _train(steps=1)))  # it did train
