"""fused_adapter: input checking, shapes, autograd wiring and backend choice, on every CPU backend."""
import dataclasses
import logging


import pytest
import torch

import adapterfast
from adapterfast import dispatch, dropout, reference

from helpers import adapter_inputs, backend_params, rel_err

CPU_BACKENDS = backend_params()


def run(x, wd, wu, bd=None, bu=None, **kw):
    return adapterfast.fused_adapter(x, wd, wu, bd, bu, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(8,), (3, 8), (2, 3, 8), (2, 1, 3, 8)])
def test_leading_dims_and_grads_match_reference(backend, shape):
    d, r = shape[-1], 4
    x = torch.randn(*shape, dtype=torch.float32, requires_grad=True)
    _, wd, wu, bd, bu, _ = adapter_inputs(1, d, r)
    params = [t.requires_grad_() for t in (wd, wu, bd, bu)]
    with adapterfast.use_backend(backend):
        y = run(x, *params, activation="gelu", scale=0.5)
    assert y.shape == x.shape and y.dtype == x.dtype
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *params], g)
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    y64 = reference.adapter(x64.reshape(-1, d), *p64[:2], *p64[2:], activation="gelu", scale=0.5).view(shape)
    want = torch.autograd.grad(y64, [x64, *p64], g.double())
    assert rel_err(y, y64) < 1e-5
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("backend", backend_params(("reference", "cpu")))
def test_gradcheck_through_custom_ops(backend):
    x, wd, wu, bd, bu, res = adapter_inputs(6, 5, 3, dtype=torch.float64, residual=True)
    inputs = [t.requires_grad_() for t in (x, wd, wu, bd, bu, res)]

    def f(x, wd, wu, bd, bu, res):
        torch.manual_seed(1)
        return run(x, wd, wu, bd, bu, activation="silu", scale=1.5, dropout=0.2, residual=res)

    with adapterfast.use_backend(backend):
        assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_and_separate_residual(backend):
    base = torch.randn(6, 20)
    x = base[:, ::2].requires_grad_()
    res = torch.randn(10, 6).t().requires_grad_()
    _, wd, wu, bd, bu, _ = adapter_inputs(1, 10, 4)
    with adapterfast.use_backend(backend):
        y = run(x, wd, wu, bd, bu, residual=res, activation="tanh")
    g = torch.randn_like(y)
    dx, dres = torch.autograd.grad(y, [x, res], g)
    x64 = x.detach().double().requires_grad_()
    y_ref = reference.adapter(x64, wd.double(), wu.double(), bd.double(), bu.double(),
                              activation="tanh", residual=res.detach().double())
    (dx_ref,) = torch.autograd.grad(y_ref, [x64], g.double())
    assert rel_err(y, y_ref) < 1e-5
    assert torch.equal(dres, g)
    assert dx.shape == x.shape and rel_err(dx, dx_ref) < 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 3, 16, requires_grad=True)
    _, wd, wu, bd, bu, _ = adapter_inputs(1, 16, 4)
    wd.requires_grad_()
    with adapterfast.use_backend(backend):
        y = run(x, wd, wu, bd, bu)
        y.sum().backward()
    assert y.shape == x.shape
    assert torch.count_nonzero(wd.grad) == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_propagates_like_eager(backend):
    x, wd, wu, *_ = adapter_inputs(4, 8, 4, bias=False)
    x[1, 3] = float("nan")
    with adapterfast.use_backend(backend):
        y = run(x, wd, wu)
    eager = x + torch.relu(x @ wd.t()) @ wu.t()
    assert torch.equal(torch.isnan(y), torch.isnan(eager))


def test_dropout_only_in_training_and_seeded():
    x, wd, wu, *_ = adapter_inputs(32, 16, 4, bias=False)
    with adapterfast.use_backend("reference"):
        plain = run(x, wd, wu)
        evaluated = run(x, wd, wu, dropout=0.5, training=False)
        torch.manual_seed(5)
        a = run(x, wd, wu, dropout=0.5)
        torch.manual_seed(5)
        b = run(x, wd, wu, dropout=0.5)
    assert torch.equal(plain, evaluated)
    assert torch.equal(a, b)
    torch.manual_seed(5)
    kept = dropout.keep_mask(int(dropout.new_seed()), 0.5, 32, 16)
    assert torch.equal(a[~kept], x[~kept])
    # a - x and plain - x each round once in fp32 (values up to ~4): compare at that resolution.
    torch.testing.assert_close(a[kept] - x[kept], 2 * (plain - x)[kept], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(x=torch.randn(3, 8, dtype=torch.float64).long()), TypeError, "x must be a floating-point"),
        (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.randn(3, 0)), ValueError, "last (feature) dimension"),
        (dict(wd=torch.randn(4, 9)), ValueError, "down_weight must have shape [r, d] = [r, 8]"),
        (dict(wd=torch.randn(4)), ValueError, "down_weight must have shape"),
        (dict(wu=torch.randn(8, 5)), ValueError, "up_weight must have shape [d, r] = [8, 4]"),
        (dict(bd=torch.randn(5)), ValueError, "down_bias must have shape [4]"),
        (dict(bu=torch.randn(7)), ValueError, "up_bias must have shape [8]"),
        (dict(bu=torch.ones(8, dtype=torch.int32)), TypeError, "up_bias must be a floating-point"),
        (dict(activation="swishy"), ValueError, "unknown activation 'swishy'"),
        (dict(activation=3), TypeError, "activation must be a string"),
        (dict(dropout=1.0), ValueError, "dropout must be a number in [0, 1)"),
        (dict(dropout=-0.1), ValueError, "dropout must be a number in [0, 1)"),
        (dict(scale="2"), TypeError, "scale must be a real number"),
        (dict(residual=torch.randn(3, 7)), ValueError, "residual must have x's shape (3, 8)"),
        (dict(residual=torch.randn(3, 8, dtype=torch.float64)), TypeError, "residual must have x's dtype"),
        (dict(wd=torch.randn(4, 8, device="meta")), ValueError, "down_weight is on meta but x is on cpu"),
    ],
)
def test_bad_input_is_a_clear_error(change, error, words):
    x, wd, wu, bd, bu, _ = adapter_inputs(3, 8, 4)
    args = dict(x=x, wd=wd, wu=wu, bd=bd, bu=bu)
    kw = {}
    for key, value in change.items():
        (args if key in args else kw)[key] = value
    with pytest.raises(error) as info:
        run(args["x"], args["wd"], args["wu"], args["bd"], args["bu"], **kw)
    assert words in str(info.value)


def test_activation_aliases():
    x, wd, wu, *_ = adapter_inputs(4, 8, 4, bias=False)
    with adapterfast.use_backend("reference"):
        for alias, name in [("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"), ("swish", "silu"),
                            ("linear", "identity"), ("GELU", "gelu")]:
            assert torch.equal(run(x, wd, wu, activation=alias), run(x, wd, wu, activation=name))


def test_unknown_backend_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown adapterfast backend 'cuda'"):
        with adapterfast.use_backend("cuda"):
            pass
    monkeypatch.setenv("ADAPTERFAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown adapterfast backend 'fast' in the environment variable "
                                         "ADAPTERFAST_BACKEND"):
        run(*adapter_inputs(2, 4, 2)[:3])


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("ADAPTERFAST_BACKEND", "reference")
    x, wd, wu, *_ = adapter_inputs(2, 4, 2)
    assert dispatch.select(x, 2) == "reference"
    with adapterfast.use_backend("auto"):
        assert dispatch.current() == "auto"
    assert dispatch.current() == "reference"


def test_forced_backend_that_cannot_run_is_an_error(monkeypatch):
    x, wd, wu, *_ = adapter_inputs(2, 4, 2)
    with adapterfast.use_backend("triton"):
        with pytest.raises(ValueError, match="the triton backend does not support torch.float64"):
            run(x.double(), wd.double(), wu.double())
    monkeypatch.setattr(dispatch, "_INTERPRETING", False)
    monkeypatch.setattr(dispatch, "_choices", {})
    if not torch.cuda.is_available():
        with adapterfast.use_backend("triton"):
            with pytest.raises(ValueError, match="triton backend runs CUDA tensors"):
                run(x, wd, wu)


def test_fallback_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(adapterfast._log, "_said", set())
    # fp16 now runs fused on CPU; pretend it does not, to see the fallback and its one log line.
    cpu = dispatch.kernels("cpu")
    monkeypatch.setitem(dispatch._registry, "cpu", dataclasses.replace(cpu, dtypes=(torch.float32, torch.float64)))
    monkeypatch.setattr(dispatch, "_choices", {})
    x, wd, wu, *_ = adapter_inputs(2, 4, 2)
    with caplog.at_level(logging.WARNING, logger="adapterfast"):
        for _ in range(3):
            run(x.half(), wd, wu)
    fallbacks = [r for r in caplog.records if "falling back to the eager reference" in r.message]
    assert len(fallbacks) == 1
    assert "float16" in fallbacks[0].message


def test_backends_report():
    report = adapterfast.backends()
    assert set(report) == {"triton", "cpu", "reference"}
    assert report["reference"].available
    for info in report.values():
        assert info.available == (info.reason is None)
