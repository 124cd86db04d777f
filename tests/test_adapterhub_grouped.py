"""AdapterHub ``BatchSplit``/``Parallel`` of fusable bottleneck adapters on the grouped op: one grouped call per
adapter layer, same outputs and gradients as the library (fp32, with the library in float64 as the yardstick)."""
import pytest
import torch

adapters = pytest.importorskip("adapters")

from adapters import BnConfig  # noqa: E402
from adapters.composition import BatchSplit, Parallel  # noqa: E402

from adapterfast.integrations import adapterhub as ah  # noqa: E402
from adapterfast.integrations import adapterhub_grouped  # noqa: E402
from test_adapterhub import (  # noqa: E402
    BATCH, D, SEQ, assert_same, forward_backward, matches_library, randomize, tiny_model,
)

SETUPS = {
    "batch_split": (lambda: BatchSplit("a0", "a1", "a2", batch_sizes=[1, 2, 0]), 3),
    "parallel": (lambda: Parallel("a0", "a1", "a2"), 3),
}
CONFIGS = ["seq_bn[reduction_factor=4]", "seq_bn[reduction_factor=8]",
           BnConfig(mh_adapter=False, output_adapter=True, reduction_factor=4, non_linearity="relu", scaling="channel")]


@pytest.fixture
def counts(monkeypatch):
    count = {"grouped": 0, "fused": 0}
    grouped, fused = adapterhub_grouped.grouped_adapter, ah.fused_adapter

    def counting_grouped(*args, **kwargs):
        count["grouped"] += 1
        return grouped(*args, **kwargs)

    def counting_fused(*args, **kwargs):
        count["fused"] += 1
        return fused(*args, **kwargs)

    monkeypatch.setattr(adapterhub_grouped, "grouped_adapter", counting_grouped)
    monkeypatch.setattr(ah, "fused_adapter", counting_fused)
    return count


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", list(SETUPS))
def test_composition_runs_grouped_and_matches_library(name, backend, counts):
    setup, batch = SETUPS[name]
    model = tiny_model("bert")
    for i, config in enumerate(CONFIGS):
        model.add_adapter(f"a{i}", config=config)
    model.set_active_adapters(setup())
    randomize(model)
    embeds = torch.randn(batch, SEQ, D)
    weight = torch.randn(batch * (3 if name == "parallel" else 1), SEQ, D)
    matches_library(model, embeds, weight, backend)
    # the mh adapter is absent in the third config, so the output adapter layers (2) run grouped and the
    # attention-output layers run the per-child library/fused path
    assert counts["grouped"] == 2


def test_mixed_kinds_stay_per_child(counts):
    model = tiny_model("bert")
    model.add_adapter("a0", config="seq_bn[reduction_factor=4]")
    model.add_adapter("a1", config="seq_bn[reduction_factor=4,non_linearity='gelu']")
    model.set_active_adapters(BatchSplit("a0", "a1", batch_sizes=[1, 1]))
    randomize(model)
    embeds, weight = torch.randn(BATCH, SEQ, D), torch.randn(BATCH, SEQ, D)
    want = forward_backward(model, embeds, weight)
    ah.accelerate(model)
    got = forward_backward(model, embeds, weight)
    assert_same(got, want)
    assert counts["grouped"] == 0 and counts["fused"] == 4
