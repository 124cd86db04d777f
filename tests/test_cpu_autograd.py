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
from adapterfast import autograd, cpu, dispatch

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
