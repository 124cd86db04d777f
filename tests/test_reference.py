"""The specification itself: the reference forward/backward agree with autograd and gradcheck."""
import pytest
import torch

import adapterfast
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
    y2, h = reference.forward(x, wd, wu, bd, bu, activation, 0.7, 0.3, 3, res)
    grads = reference.backward(g, x, wd, wu, bd, bu, h, activation, 0.7, 0.3, 3, not separate_residual)
    assert rel_err(y2, y) < 1e-12
    for got, want in zip(grads, expected):
        assert rel_err(got, want) < 1e-12


def test_activation_grads_match_autograd():
    h = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    for activation in ACTIVATIONS:
        (expected,) = torch.autograd.grad(reference.activate(h, activation).sum(), h)
        assert rel_err(reference.activate_grad(h.detach(), activation), expected) < 1e-12, activation


@pytest.mark.parametrize("key, counter, words", [
    ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(key, counter, words):
    """Random123's published answers (kat_vectors) for Philox4x32-10: all four output words."""
    seed = key[0] | key[1] << 32
    got = dropout.philox(seed, *(torch.tensor([c], dtype=torch.int64) for c in counter))
    assert tuple(w.item() for w in got) == words


def test_keep_mask_takes_word_col_mod_4_of_the_row_quad():
    """Element (row, col) uses word ``col & 3`` of Philox at counter ``(col >> 2, row lo, row hi, 0)``."""
    seed, p = 987654321, 0.5
    rows = torch.tensor([0, 5, 2**32 + 3], dtype=torch.int64)
    words = dropout.element_words(seed, rows, 11)
    for i, row in enumerate(rows.tolist()):
        for col in range(11):
            one = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
            want = dropout.philox(seed, one(col >> 2), one(row & 0xFFFFFFFF), one(row >> 32))[col & 3]
            assert words[i, col].item() == want.item(), (row, col)
    assert torch.equal(dropout.keep_rows(seed, p, rows, 11), words >= dropout.threshold(p))


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
    y, h = reference.forward(xb, wd, wu, bd, bu, "relu", 1.0, 0.0, 0, None)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    exact = reference.adapter(xb.double(), wd.bfloat16().double(), wu.bfloat16().double(), bd.double(), bu.double())
    assert rel_err(y, exact) < 1e-2


def test_float64_dropout_factor_is_exact():
    """``scale / (1 - p)`` in float64 for float64 inputs, not rounded to fp32 (1.1111111640930176)."""
    x, wd, wu, bd, bu, _ = adapter_inputs(64, 32, 8, dtype=torch.float64)
    res = torch.zeros_like(x)
    y, _ = reference.forward(x, wd, wu, bd, bu, "relu", 1.0, 0.1, 11, res)
    full, _ = reference.forward(x, wd, wu, bd, bu, "relu", 1.0, 0.0, 11, res)
    kept = y != 0
    assert kept.any()
    assert torch.equal(y[kept], full[kept] * (1.0 / 0.9))


@pytest.mark.parametrize("activation", ["relu", "gelu", "sigmoid"])
def test_gradcheck_float64_with_dropout_through_fused_adapter(activation):
    x, wd, wu, bd, bu, res = adapter_inputs(6, 7, 3, dtype=torch.float64, residual=True)
    inputs = [t.requires_grad_() for t in (x, wd, wu, bd, bu, res)]

    def f(x, wd, wu, bd, bu, res):
        torch.manual_seed(5)  # the same dropout mask on every call gradcheck makes
        return adapterfast.fused_adapter(x.view(2, 3, 7), wd, wu, bd, bu, activation=activation, scale=0.7,
                                         dropout=0.1, residual=res.view(2, 3, 7))

    with adapterfast.use_backend("reference"):
        assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("layout", ["expanded_x", "transposed_residual", "transposed_grad", "expanded_grad"])
def test_outputs_are_contiguous_for_any_strides(layout):
    x, wd, wu, bd, bu, res = adapter_inputs(48, 64, 8, residual=True)
    if layout == "expanded_x":
        x = x[:1].expand(48, 64)
    if layout == "transposed_residual":
        res = res.t().contiguous().t()
    g = torch.randn(48, 64)
    g = g.t().contiguous().t() if layout == "transposed_grad" else g[:1].expand(48, 64) if layout == "expanded_grad" else g
    y, h = reference.forward(x, wd, wu, bd, bu, "gelu", 0.5, 0.0, 0, res)
    grads = reference.backward(g, x, wd, wu, bd, bu, h, "gelu", 0.5, 0.0, 0, False)
    assert y.is_contiguous() and h.is_contiguous() and all(t.is_contiguous() for t in grads)
    with adapterfast.use_backend("reference"):
        leaves = [t.clone().requires_grad_() for t in (x, wd, wu, bd, bu, res)]
        y2 = adapterfast.fused_adapter(leaves[0], *leaves[1:5], activation="gelu", scale=0.5, residual=leaves[5])
        got = torch.autograd.grad(y2, leaves, g)
    want_y = reference.adapter(*(t.double() for t in (x, wd, wu, bd, bu)), activation="gelu", scale=0.5,
                               residual=res.double())
    assert rel_err(y2, want_y) < 1e-6
    assert all(t.is_contiguous() for t in got[:5])  # the residual's gradient is grad_y itself


# ----------------------------------------------------------------------------- NaN / Inf

def _eager(x, wd, wu, bd, bu, res, activation, scale):
    """The seed's eager adapter (nn.Linear algebra, autograd's own backward)."""
    a = reference.activate(torch.nn.functional.linear(x, wd, bd), activation)
    return (x if res is None else res) + scale * torch.nn.functional.linear(a, wu, bu)


def _pattern(t):
    return torch.where(torch.isnan(t), 1, 0) + torch.where(torch.isposinf(t), 2, 0) + torch.where(torch.isneginf(t), 3, 0)


NONFINITE = ["nan_scale", "inf_scale", "-inf_scale", "inf_grad", "nan_grad"]


def nonfinite_case(case, dtype, residual, activation="relu"):
    """Inputs for one NaN/Inf case: ``(inputs, scale, grad_y)`` with all hidden units of one row
    inactive for ReLU (so eager's select and a product differ there)."""
    gen = torch.Generator().manual_seed(3)
    n, d, r = 6, 10, 5
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    wd, wu = torch.randn(r, d, generator=gen, dtype=dtype) / 3, torch.randn(d, r, generator=gen, dtype=dtype) / 2
    bd, bu = torch.randn(r, generator=gen, dtype=dtype) * 0.1 - 0.5, torch.randn(d, generator=gen, dtype=dtype) * 0.1
    res = torch.randn(n, d, generator=gen, dtype=dtype) if residual else None
    g = torch.randn(n, d, generator=gen, dtype=dtype)
    scale = float(case.split("_")[0]) if case.endswith("scale") else 0.7
    if case == "inf_grad":
        g[2, 3] = float("inf")
    if case == "nan_grad":
        g[2, 3] = float("nan")
    return (x, wd, wu, bd, bu, res), scale, g


def nonfinite_outputs(fn, inputs, scale, g, activation):
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    y = fn(*leaves, activation, scale)
    used = [t for t in leaves if t is not None]
    return [y.detach()] + list(torch.autograd.grad(y, used, g))


def fused(backend):
    def run(x, wd, wu, bd, bu, res, activation, scale):
        with adapterfast.use_backend(backend):
            return adapterfast.fused_adapter(x, wd, wu, bd, bu, activation=activation, scale=scale, residual=res)
    return run


@pytest.mark.parametrize("case", NONFINITE)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_matches_eagers_nonfinite_pattern(case, residual, activation, dtype):
    """A NaN/Inf scale or an Inf/NaN in grad_y: NaN, +Inf and -Inf at exactly eager's positions."""
    inputs, scale, g = nonfinite_case(case, dtype, residual)
    want = nonfinite_outputs(_eager, inputs, scale, g, activation)
    got = nonfinite_outputs(fused("reference"), inputs, scale, g, activation)
    for name, a, b in zip(["y", "dx", "dw_down", "dw_up", "db_down", "db_up", "dres"], got, want):
        assert torch.equal(_pattern(a), _pattern(b)), name
        finite = torch.isfinite(b)
        assert rel_err(a[finite], b[finite]) < (1e-12 if dtype == torch.float64 else 1e-5), name
