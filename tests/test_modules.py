"""Adapter and replace_adapters: drop-in for the seed's eager adapter, in a real layer and in training."""
import copy
import logging

import pytest
import torch
import torch.nn as nn

import adapterfast
from adapterfast import Adapter, replace_adapters

from helpers import EagerAdapter, ToyTransformerLayer, backend_params, rel_err

BACKENDS = backend_params()


def test_state_dict_interchangeable_with_seed():
    seed = EagerAdapter(32, 8)
    fused = Adapter(32, 8)
    fused.load_state_dict(seed.state_dict())
    seed.load_state_dict(fused.state_dict())
    x = torch.randn(5, 32)
    assert rel_err(fused(x), seed(x)) < 1e-6


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(d_model=0), ValueError, "d_model must be >= 1"),
    (dict(d_model=16, r=0), ValueError, "r must be >= 1"),
    (dict(d_model=16.0), TypeError, "d_model must be an int"),
    (dict(d_model=16, activation="nope"), ValueError, "unknown activation"),
    (dict(d_model=16, dropout=1.5), ValueError, "dropout must be in [0, 1)"),
])
def test_constructor_errors(kwargs, error, words):
    with pytest.raises(error) as info:
        Adapter(**kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize("act, name", [
    (nn.ReLU(), "relu"), (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.SiLU(), "silu"),
    (nn.Tanh(), "tanh"), (nn.Sigmoid(), "sigmoid"), (nn.LeakyReLU(), "leaky_relu"), (nn.Identity(), "identity"),
])
def test_from_module_each_activation(act, name):
    seed = EagerAdapter(24, 6)
    seed.act = act
    fused = Adapter.from_module(seed)
    assert fused.activation == name
    assert fused.down is seed.down and fused.up is seed.up
    x = torch.randn(4, 24)
    with adapterfast.use_backend("reference"):
        assert rel_err(fused(x), seed(x)) < 1e-6


def test_from_module_rejects_what_it_cannot_compute():
    seed = EagerAdapter(16, 4)
    seed.act = nn.LeakyReLU(0.2)
    with pytest.raises(TypeError, match="not an activation the fused op computes"):
        Adapter.from_module(seed)
    with pytest.raises(TypeError, match="no `down`/`up` nn.Linear"):
        Adapter.from_module(nn.Linear(3, 3))


class NoResidual(EagerAdapter):
    def forward(self, x):
        return self.up(self.act(self.down(x)))


def test_replace_leaves_other_computations_alone(caplog):
    model = nn.Sequential(EagerAdapter(16, 4), NoResidual(16, 4))
    with caplog.at_level(logging.WARNING, logger="adapterfast"):
        assert replace_adapters(model) == 1
    assert isinstance(model[0], Adapter) and isinstance(model[1], NoResidual)
    assert "left 1 (NoResidual) alone" in caplog.text


def test_replace_keeps_dtype_device_and_requires_grad():
    model = nn.Sequential(EagerAdapter(16, 4)).to(torch.float64)
    model[0].down.weight.requires_grad_(False)
    assert replace_adapters(model) == 1
    assert model[0].down.weight.dtype == torch.float64
    assert not model[0].down.weight.requires_grad and model[0].up.weight.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_toy_transformer_outputs_and_grads(backend):
    """The swapped layer is as accurate as the eager fp32 layer, both measured against float64.

    Some gradients here (the attention projections behind two layer norms) are small and
    ill-conditioned, so fp32 eager itself is only ~1e-3 from the float64 truth on them.
    """
    torch.manual_seed(0)
    eager = ToyTransformerLayer()
    fused = copy.deepcopy(eager)
    truth = copy.deepcopy(eager).double()
    assert replace_adapters(fused) == 1
    assert isinstance(fused.adapter, Adapter)
    x = torch.randn(2, 5, 32)
    with adapterfast.use_backend(backend):
        y = fused(x)
        y.square().sum().backward()
    y_eager = eager(x)
    y_eager.square().sum().backward()
    y_truth = truth(x.double())
    y_truth.square().sum().backward()
    assert rel_err(y, y_truth) <= 2 * rel_err(y_eager, y_truth) + 1e-6
    for (name, p), q, t in zip(fused.named_parameters(), eager.parameters(), truth.parameters()):
        assert rel_err(p.grad, t.grad) <= 2 * rel_err(q.grad, t.grad) + 1e-5, name


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_twenty_training_steps_same_losses(backend):
    torch.manual_seed(0)
    eager = ToyTransformerLayer()
    fused = copy.deepcopy(eager)
    replace_adapters(fused)
    data = [(torch.randn(4, 6, 32), torch.randn(4, 6, 32)) for _ in range(20)]

    def train(model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for x, target in data:
            loss = (model(x) - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    with adapterfast.use_backend(backend):
        fused_losses = train(fused)
    eager_losses = train(eager)
    assert fused_losses[-1] < fused_losses[0]
    for a, b in zip(fused_losses, eager_losses):
        assert abs(a - b) <= 1e-4 * abs(b)


def test_parametrized_and_replaced_layers_are_read_as_attributes():
    """Adapter.forward reads plain nn.Linear tensors from _parameters; a parametrized weight (its
    layer's class changes) or a replaced layer must still be what the call uses."""
    import torch.nn.utils.parametrize as parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.manual_seed(0)
    adapter = Adapter(16, 4, bias=True)
    x = torch.randn(5, 16)
    parametrize.register_parametrization(adapter.down, "weight", Doubled())
    down_w = adapter.down.weight
    want = x + nn.functional.linear(torch.relu(nn.functional.linear(x, down_w, adapter.down.bias)),
                                    adapter.up.weight, adapter.up.bias)
    assert torch.allclose(adapter(x), want, rtol=1e-5, atol=1e-6)
    adapter.up = nn.Linear(4, 16)
    want = x + adapter.up(torch.relu(nn.functional.linear(x, down_w, adapter.down.bias)))
    assert torch.allclose(adapter(x), want, rtol=1e-5, atol=1e-6)
