"""The grouped op's eager paths. On the C++ backend, ``adapterfast_cpu::grouped`` (a C++ autograd
Function); on the others, ``grouped_autograd.GroupedAdapter`` (a Python autograd Function) around
the backend's forward and backward. Each gives bitwise what the ``adapterfast::grouped_forward``
custom op (torch.library's Python autograd) gives around the same kernels, for every optional
argument and every subset of inputs that need gradients; calls under autocast take the custom op,
and forward-mode AD and torch.func transforms the eager reference."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import adapterfast
from adapterfast import _log, cpu, grouped, grouped_cpu, grouped_ops

from helpers import backend_params

needs_cpu = pytest.mark.skipif(not cpu.available(), reason=f"CPU backend not built: {cpu.unavailable_reason()}")

A, N, D, R = 3, 41, 40, 8


def _inputs(bias: bool, residual: bool, dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    t = {
        "x": torch.randn(N, D, generator=gen).to(dtype),
        "w_down": (torch.randn(A, R, D, generator=gen) * D**-0.5).to(dtype),
        "w_up": (torch.randn(A, D, R, generator=gen) * R**-0.5).to(dtype),
        "b_down": torch.randn(A, R, generator=gen).to(dtype) if bias else None,
        "b_up": torch.randn(A, D, generator=gen).to(dtype) if bias else None,
        "residual": torch.randn(N, D, generator=gen).to(dtype) if residual else None,
    }
    index = torch.randint(-1, A - 1, (N,), generator=gen)  # adapter A - 1 has no rows: zero gradients
    return t, index, torch.randn(N, D, generator=gen).to(dtype)


def _run(t, index, g, needs, path: str, dropout: float, backend: str = "cpu"):
    """y and the gradients of ``needs`` through ``path``: "native" (adapterfast_cpu::grouped),
    "eager" (grouped_adapter as users call it) or "custom_op" (adapterfast::grouped_forward)."""
    leaves = {k: (v.clone().requires_grad_(k in needs) if v is not None else None) for k, v in t.items()}
    scales = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    args = (leaves["x"], index, leaves["w_down"], leaves["w_up"], leaves["b_down"], leaves["b_up"], "gelu", scales,
            dropout)
    torch.manual_seed(0)  # the dropout seed grouped_adapter draws
    seed = adapterfast.dropout.new_seed() if dropout > 0.0 else None
    if path == "native":
        y = grouped_cpu.differentiable(*args, 0 if seed is None else int(seed), leaves["residual"])
        assert type(y.grad_fn).__name__ == "CppFunction"
    elif path == "eager":  # the backward below runs outside use_backend: the Function keeps the forward's
        torch.manual_seed(0)
        with adapterfast.use_backend(backend):
            y = adapterfast.grouped_adapter(leaves["x"], index, *args[2:6], activation="gelu",
                                            scale=[0.5, 2.0, 1.0], dropout=dropout, residual=leaves["residual"])
        assert type(y.grad_fn).__name__ == "GroupedAdapterBackward"
    else:
        # The custom op's backward runs the backend in force when it runs (as in a compiled graph).
        with adapterfast.use_backend(backend):
            y, _ = grouped_ops.grouped_forward(*args, seed, leaves["residual"])
            y.backward(g)
        return y.detach(), {k: leaves[k].grad for k in needs}
    y.backward(g)
    return y.detach(), {k: leaves[k].grad for k in needs}


@pytest.mark.parametrize("bias,residual,dropout", list(itertools.product([False, True], [False, True], [0.0, 0.25])))
@pytest.mark.parametrize("needs", [("x", "w_down", "w_up", "b_down", "b_up", "residual"), ("w_down", "w_up"),
                                   ("x",), ("w_up", "b_up", "residual")])
@needs_cpu
def test_native_op_is_bitwise_the_custom_op(bias, residual, dropout, needs):
    t, index, g = _inputs(bias, residual)
    needs = tuple(k for k in needs if t[k] is not None)
    y_native, g_native = _run(t, index, g, needs, "native", dropout)
    y_custom, g_custom = _run(t, index, g, needs, "custom_op", dropout)
    assert torch.equal(y_native, y_custom)
    for k in needs:
        assert g_native[k] is not None and torch.equal(g_native[k], g_custom[k]), k
    if "w_down" in needs:
        assert not g_native["w_down"][A - 1].any()


@needs_cpu
def test_bf16():
    t, index, g = _inputs(True, False, torch.bfloat16)
    needs = ("x", "w_down", "w_up", "b_down", "b_up")
    y_native, g_native = _run(t, index, g, needs, "native", 0.0)
    y_custom, g_custom = _run(t, index, g, needs, "custom_op", 0.0)
    assert torch.equal(y_native, y_custom)
    for k in needs:
        assert g_native[k].dtype == torch.bfloat16 and torch.equal(g_native[k], g_custom[k]), k


@pytest.mark.parametrize("backend", backend_params(["reference", "triton"]))
@pytest.mark.parametrize("bias,residual,dropout", [(True, True, 0.25), (False, False, 0.0)])
@pytest.mark.parametrize("needs", [("x", "w_down", "w_up", "b_down", "b_up", "residual"), ("w_up",)])
def test_python_function_is_bitwise_the_custom_op(backend, bias, residual, dropout, needs):
    t, index, g = _inputs(bias, residual)
    needs = tuple(k for k in needs if t[k] is not None)
    y_eager, g_eager = _run(t, index, g, needs, "eager", dropout, backend)
    y_custom, g_custom = _run(t, index, g, needs, "custom_op", dropout, backend)
    assert torch.equal(y_eager, y_custom)
    for k in needs:
        assert g_eager[k] is not None and torch.equal(g_eager[k], g_custom[k]), k
    with adapterfast.use_backend(backend), torch.no_grad():
        torch.manual_seed(0)
        y_infer = adapterfast.grouped_adapter(t["x"], index, t["w_down"], t["w_up"], t["b_down"], t["b_up"],
                                              activation="gelu", scale=[0.5, 2.0, 1.0], dropout=dropout,
                                              residual=t["residual"])
    assert torch.equal(y_infer, y_eager)


@needs_cpu
def test_eager_calls_take_the_native_node_unless_forward_ad_autocast_or_another_backend():
    t, index, _ = _inputs(True, False)
    x = t["x"].clone().requires_grad_()
    w = [t[k] for k in ("w_down", "w_up", "b_down", "b_up")]
    with adapterfast.use_backend("cpu"):
        y = adapterfast.grouped_adapter(x, index, *w)
        assert type(y.grad_fn).__name__ == "CppFunction"
        y32 = adapterfast.grouped_adapter(x, index.to(torch.int32), *w)
        assert type(y32.grad_fn).__name__ == "CppFunction" and torch.equal(y32, y)
        with torch.no_grad():
            assert torch.equal(adapterfast.grouped_adapter(x, index, *w), y.detach())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert type(adapterfast.grouped_adapter(x, index, *w).grad_fn).__name__ != "CppFunction"
    with adapterfast.use_backend("reference"):
        assert type(adapterfast.grouped_adapter(x, index, *w).grad_fn).__name__ == "GroupedAdapterBackward"


@needs_cpu
def test_common_case_check_defers_every_unusual_input_to_the_full_validation():
    """``grouped._common_case`` accepts only what the op runs as given; anything else goes to
    ``_validate``, which accepts it or raises the error that names it."""
    t, index, _ = _inputs(True, True)
    args = dict(x=t["x"], adapter_index=index, w_down=t["w_down"], w_up=t["w_up"], b_down=t["b_down"],
                b_up=t["b_up"], p=0.0, residual=t["residual"])
    assert grouped._common_case(**args)
    for change in (dict(adapter_index=index.to(torch.int16)), dict(adapter_index=index[:-1]),
                   dict(adapter_index=index.float()), dict(b_down=t["b_down"][:, :-1]), dict(b_up=t["b_up"][0]),
                   dict(residual=t["residual"].double()), dict(w_up=t["w_up"][:, :, :-1]), dict(p=1),
                   dict(x=t["x"].int()), dict(w_down=t["w_down"][0])):
        assert not grouped._common_case(**{**args, **change}), change
    with pytest.raises(TypeError, match="adapter_index"):
        adapterfast.grouped_adapter(t["x"], index.float(), t["w_down"], t["w_up"])
    with pytest.raises(ValueError, match="up_bias"):
        adapterfast.grouped_adapter(t["x"], index, t["w_down"], t["w_up"], up_bias=t["b_up"][0])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_forward_mode_ad_and_torch_func_get_the_right_derivatives(backend):
    """Forward-mode AD and torch.func transforms run the eager reference (logged once): the
    tangents equal central differences, torch.func.grad and jacrev equal the backward's gradient,
    and vmap over x equals a loop."""
    t, index, _ = _inputs(True, False, torch.float64)
    x, wd, wu, bd, bu = (t[k] for k in ("x", "w_down", "w_up", "b_down", "b_up"))
    tx = torch.randn_like(x)

    def f(xx):
        return adapterfast.grouped_adapter(xx, index, wd, wu, bd, bu, activation="gelu", scale=[0.5, 2.0, 1.0])

    eps = 1e-6
    with adapterfast.use_backend(backend), torch.no_grad():
        expected = (f(x + eps * tx) - f(x - eps * tx)) / (2 * eps)
    with adapterfast.use_backend(backend):
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(f(fwAD.make_dual(x, tx))).tangent
        _, tangent_func = torch.func.jvp(f, (x,), (tx,))
        grad_func = torch.func.grad(lambda xx: f(xx).square().sum())(x)
        jac_row = torch.func.jacrev(lambda xx: f(xx)[3])(x)
        xg = x.clone().requires_grad_()
        f(xg).square().sum().backward()
        xj = x.clone().requires_grad_()
        f(xj)[3, 5].backward()
        batch = torch.stack([x, tx, 2 * x])
        torch.testing.assert_close(torch.func.vmap(f)(batch), torch.stack([f(b) for b in batch]), rtol=0, atol=1e-12)
    torch.testing.assert_close(tangent, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tangent_func, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_func, xg.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jac_row[5], xj.grad, rtol=1e-12, atol=1e-12)
    assert any("grouped_adapter under forward-mode AD" in said for said in _log._said)
