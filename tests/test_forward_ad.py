"""Forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) and vmap through the op,
against autograd's own derivative of the float64 reference."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import adapterfast
from adapterfast import reference

from helpers import adapter_inputs, backend_params, rel_err

BACKENDS = backend_params()


def _case(residual):
    torch.manual_seed(0)
    x, wd, wu, bd, bu, res = adapter_inputs(5, 12, 4, residual=residual)
    primals = (x, wd, wu, bd, bu) + ((res,) if residual else ())
    tangents = tuple(torch.randn_like(t) for t in primals)
    return primals, tangents


def _expected(primals, tangents, activation, dropout_seed=None, p=0.0):
    def f(x, wd, wu, bd, bu, res=None):
        return reference.adapter(x, wd, wu, bd, bu, activation=activation, scale=0.7, residual=res,
                                 dropout_p=p, seed=dropout_seed)

    return torch.func.jvp(f, tuple(t.double() for t in primals), tuple(t.double() for t in tangents))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "tanh"])
def test_func_jvp_matches_reference(backend, residual, activation):
    primals, tangents = _case(residual)

    def f(x, wd, wu, bd, bu, res=None):
        return adapterfast.fused_adapter(x, wd, wu, bd, bu, activation=activation, scale=0.7, residual=res)

    with adapterfast.use_backend(backend):
        y, ty = torch.func.jvp(f, primals, tangents)
    y64, ty64 = _expected(primals, tangents, activation)
    assert rel_err(y, y64) < 1e-5
    assert rel_err(ty, ty64) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_ad_dual_tensors_with_dropout(backend):
    primals, tangents = _case(False)
    torch.manual_seed(3)
    seed = int(adapterfast.dropout.new_seed())
    with adapterfast.use_backend(backend), fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        torch.manual_seed(3)
        out = adapterfast.fused_adapter(*duals, activation="silu", scale=0.7, dropout=0.25)
        y, ty = fwAD.unpack_dual(out)
    assert ty is not None
    y64, ty64 = _expected(primals, tangents, "silu", dropout_seed=seed, p=0.25)
    assert rel_err(y, y64) < 1e-5
    assert rel_err(ty, ty64) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_and_grad(backend):
    torch.manual_seed(0)
    x, wd, wu, bd, bu, _ = adapter_inputs(12, 8, 4)
    xb = x.view(3, 4, 8)

    def f(x):
        return adapterfast.fused_adapter(x, wd, wu, bd, bu, activation="gelu")

    with adapterfast.use_backend(backend):
        yb = torch.func.vmap(f)(xb)
        g = torch.func.grad(lambda w: adapterfast.fused_adapter(x, w, wu, bd, bu, activation="gelu").square().sum())(wd)
    want = reference.adapter(x.double(), wd.double(), wu.double(), bd.double(), bu.double(), activation="gelu")
    assert rel_err(yb.reshape(12, 8), want) < 1e-5
    wd64 = wd.double().requires_grad_()
    y64 = reference.adapter(x.double(), wd64, wu.double(), bd.double(), bu.double(), activation="gelu")
    (g64,) = torch.autograd.grad(y64.square().sum(), [wd64])
    assert rel_err(g, g64) < 1e-5
