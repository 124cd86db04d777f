"""``replace_adapters`` says why when it replaces nothing, and tells how to convert a root adapter."""
import logging

import pytest
import torch
import torch.nn as nn

from adapterfast import Adapter, replace_adapters

from helpers import EagerAdapter, ToyTransformerLayer, rel_err


class NormedAdapter(EagerAdapter):
    """Has down/up and an activation, but a layer norm on the output: not the fused op."""

    def __init__(self, d_model, r=4):
        super().__init__(d_model, r)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x):
        return self.norm(x + self.up(self.act(self.down(x))))


def _said(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "adapterfast"]


def test_nothing_to_replace_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="adapterfast"):
        assert replace_adapters(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) == 0
    said = _said(caplog)
    assert len(said) == 1 and "replaced nothing" in said[0] and "no submodule" in said[0], said


def test_candidates_left_alone_are_listed_with_their_reason(caplog):
    model = nn.Sequential(nn.Linear(8, 8), NormedAdapter(8))
    with caplog.at_level(logging.WARNING, logger="adapterfast"):
        assert replace_adapters(model) == 0
    summary = [m for m in _said(caplog) if "replaced nothing" in m]
    assert len(summary) == 1 and "1 (NormedAdapter)" in summary[0], summary
    assert isinstance(model[1], NormedAdapter)


def test_root_adapter_is_not_swapped_and_the_log_says_how(caplog):
    root = EagerAdapter(16, 4)
    with caplog.at_level(logging.WARNING, logger="adapterfast"):
        assert replace_adapters(root) == 0
    said = _said(caplog)
    assert len(said) == 1 and "Adapter.from_module(model)" in said[0], said
    fused = Adapter.from_module(root)
    x = torch.randn(3, 16)
    assert rel_err(fused(x), root(x)) < 1e-6


def test_a_replacement_logs_no_warning(caplog):
    model = ToyTransformerLayer()
    with caplog.at_level(logging.WARNING, logger="adapterfast"):
        assert replace_adapters(model) == 1
    assert not _said(caplog)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        replace_adapters("not a model")
