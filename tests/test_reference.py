"""The specification itself: the reference forward/backward agree with autograd and gradcheck."""
import pytest
import torch

from adapterfast import dropout, reference
from adapterfast.activations import ACTIVATIONS

from helpers import adapter_inputs, rel_err


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64(activation):
    x, wd, wu, bd, bu, res = adapter_inputs(5, 7, 3, dtype=torch.float64, residual=True)
    inputs = [t.requires_grad_() for t in (x, wd, wu, bd, bu, res)]

    def f(x, wd, wu, bd, bu, res):
        return reference.adapter(x, wd, wu, bd, bu, activation=activation, scale=0.5,
                                 dropout_p=0.25, seed=7, residual=res)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("separate_residual", [False, True])
def test_split_backward_matches_autograd(activation, separate_residual):
    x, wd, wu, bd, bu, res = adapter_inputs(9, 13, 5, dtype=torch.float64, residual=separate_residual)
    leaves = [t.requires_grad_() for t in (x, wd, bd, wu, bu)]
    y = reference.adapter(x, wd, wu, bd, bu, activation=activation, scale=0.7, dropout_p=0.3, seed=3, residual=res)
    g = torch.randn_like(y)
    expected = torch.autograd.grad(y, leaves, g)
    y2, h = reference.forward(x, wd, bd, wu, bu, res, activation, 0.7, 0.3, 3)
    grads = reference.backward(g, x, wd, bd, wu, bu, h, not separate_residual, activation, 0.7, 0.3, 3)
    assert rel_err(y2, y) < 1e-12
    for got, want in zip(grads, expected):
        assert rel_err(got, want) < 1e-12


def test_activation_grads_match_autograd():
    h = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    for activation in ACTIVATIONS:
        (expected,) = torch.autograd.grad(reference.activate(h, activation).sum(), h)
        assert rel_err(reference.activate_grad(h.detach(), activation), expected) < 1e-12, activation


def test_philox_known_answer():
    """Random123's published answer for Philox4x32-10 with zero key and counter."""
    assert dropout.philox_words(0, torch.zeros(1, dtype=torch.int64)).item() == 0x6627E8D5


def test_keep_mask_rate_and_determinism():
    a = dropout.keep_mask(1234, 0.3, 64, 512)
    b = dropout.keep_mask(1234, 0.3, 64, 512)
    c = dropout.keep_mask(1235, 0.3, 64, 512)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert abs(a.double().mean().item() - 0.7) < 0.01


def test_mixed_precision_forward_rounds_operands_to_x_dtype():
    x, wd, wu, bd, bu, _ = adapter_inputs(16, 32, 8)
    xb = x.bfloat16()
    y, h = reference.forward(xb, wd, bd, wu, bu, None, "relu", 1.0, 0.0, 0)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    exact = reference.adapter(xb.double(), wd.bfloat16().double(), wu.bfloat16().double(), bd.double(), bu.double())
    assert rel_err(y, exact) < 1e-2
