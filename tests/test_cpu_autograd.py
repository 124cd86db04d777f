"""The C++ backend's differentiable op (``adapterfast_cpu::fused``, a C++ autograd Function): eager
calls that record autograd run it, and it gives bitwise what the Python ``autograd.FusedAdapter``
around the same kernels gives, for every optional argument and every subset of inputs that need
gradients."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import adapterfast
from adapterfast import autograd, cpu, dispatch, reference

from helpers import assert_matches

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU backend not built: {cpu.unavailable_reason()}")


def _inputs(bias: bool, residual: bool, dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    n, d, r = 70, 48, 8
    t = {
        "x": torch.randn(n, d, generator=gen),
        "w_down": torch.randn(r, d, generator=gen) * d**-0.5,
        "w_up": torch.randn(d, r, generator=gen) * r**-0.5,
        "b_down": torch.randn(r, generator=gen) if bias else None,
        "b_up": torch.randn(d, generator=gen) if bias else None,
        "residual": torch.randn(n, d, generator=gen) if residual else None,
    }
    t["x"] = t["x"].to(dtype)
    if residual:
        t["residual"] = t["residual"].to(dtype)
    return t, torch.randn(n, d, generator=gen).to(dtype)


def _run(t, g, needs, native: bool, dropout: float):
    leaves = {k: (v.clone().requires_grad_(k in needs) if v is not None else None) for k, v in t.items()}
    args = (leaves["x"], leaves["w_down"], leaves["w_up"], leaves["b_down"], leaves["b_up"], "gelu", 0.5, dropout, 1234,
            leaves["residual"])
    if native:
        y = dispatch.kernels("cpu").differentiable(*args)
        assert type(y.grad_fn).__name__ == "CppFunction"
    else:
        y, _ = autograd.apply_fast(*args, dispatch.kernels("cpu"))
    y.backward(g)
    return y.detach(), {k: leaves[k].grad for k in needs}


@pytest.mark.parametrize("bias,residual,dropout", itertools.product([False, True], [False, True], [0.0, 0.25]))
@pytest.mark.parametrize("needs", [("x", "w_down", "w_up", "b_down", "b_up", "residual"), ("w_down", "w_up"),
                                   ("x",), ("w_up", "b_up", "residual")])
def test_native_op_is_bitwise_the_python_function(bias, residual, dropout, needs):
    t, g = _inputs(bias, residual)
    needs = tuple(k for k in needs if t[k] is not None)
    y_native, g_native = _run(t, g, needs, True, dropout)
    y_python, g_python = _run(t, g, needs, False, dropout)
    assert torch.equal(y_native, y_python)
    for k in needs:
        assert g_native[k] is not None and torch.equal(g_native[k], g_python[k]), k


def test_bf16_with_fp32_weights():
    t, g = _inputs(True, False, torch.bfloat16)
    needs = ("x", "w_down", "w_up", "b_down", "b_up")
    y_native, g_native = _run(t, g, needs, True, 0.0)
    y_python, g_python = _run(t, g, needs, False, 0.0)
    assert torch.equal(y_native, y_python)
    for k in needs:
        assert g_native[k].dtype == t[k].dtype and torch.equal(g_native[k], g_python[k]), k


def test_eager_calls_record_the_native_node_unless_forward_ad_or_autocast():
    adapter = adapterfast.Adapter(32, 4)
    x = torch.randn(5, 32, requires_grad=True)
    with adapterfast.use_backend("cpu"):
        assert type(adapter(x).grad_fn).__name__ == "CppFunction"
        with fwAD.dual_level():
            y = adapter(fwAD.make_dual(x.detach(), torch.randn(5, 32)))
            assert fwAD.unpack_dual(y).tangent is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert type(adapter(x).grad_fn).__name__ != "CppFunction"


@pytest.mark.parametrize("dtype, n, tol", [(torch.float32, 700, 1e-5), (torch.bfloat16, 1400, 3e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [1024, 1000])
def test_training_step_outputs_streamed_from_2_mib(d, dtype, n, tol):
    """The CPU drivers (fp32's block kernels, bf16's brgemm) write y of a recorded (training)
    forward and dx with non-temporal stores from 2 MiB on, y of an inference forward from 6 MiB
    (stream_output in csrc/adapter_common.h). At 2.7 MiB the training step streams both and an
    inference call does not: the training y equals the inference y bitwise, dx's first and last
    rows equal a 129-row call's (which streams nothing; rows are independent in y and dx among
    calls of more than 128 rows, which take the same route: kGivenForwardMaxRows), and
    everything matches the float64 reference. d = 1000 leaves a ragged last tile per row, written
    with plain stores. On BLAS (below AVX-512) a row's results depend on the call's other rows, as
    in eager, so there the rows are not compared with a smaller call's."""
    r = 16
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n, d, generator=gen).to(dtype)
    wd, wu = torch.randn(r, d, generator=gen) * d**-0.5, torch.randn(d, r, generator=gen) * r**-0.5
    bd, bu = torch.randn(r, generator=gen) * 0.1, torch.randn(d, generator=gen) * 0.1
    wd, wu, bd, bu = (t.to(dtype) for t in (wd, wu, bd, bu))
    g = torch.randn(n, d, generator=gen).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, wd, wu, bd, bu)]
    y = dispatch.kernels("cpu").differentiable(*leaves[:3], *leaves[3:], "gelu", 0.5, 0.0, 0, None)
    assert type(y.grad_fn).__name__ == "CppFunction"
    y.backward(g)
    with torch.no_grad():
        y_infer = dispatch.kernels("cpu").differentiable(x, wd, wu, bd, bu, "gelu", 0.5, 0.0, 0, None)
    assert torch.equal(y.detach(), y_infer)
    dx = leaves[0].grad
    row_independent = cpu.kernel_isa(dtype) != "blas"
    for rows in (slice(0, 129), slice(n - 129, n)) if row_independent else ():
        h_small = cpu.forward(x[rows], wd, wu, bd, bu, "gelu", 0.5, 0.0, 0, None)[1]
        dx_small = cpu.backward(g[rows], x[rows], wd, wu, bd, bu, h_small, "gelu", 0.5, 0.0, 0, True)[0]
        assert torch.equal(dx[rows], dx_small)
    ref = [t.double().requires_grad_() for t in (x, wd, wu, bd, bu)]
    y_ref = reference.adapter(*ref, activation="gelu", scale=0.5)
    y_ref.backward(g.double())
    assert_matches("y", y.detach(), y_ref.detach(), tol)
    for name, got, want in zip(("x", "w_down", "w_up", "b_down", "b_up"), leaves, ref):
        assert_matches(name, got.grad, want.grad, tol)
