"""``torch.autocast`` with fp32 master weights: the op follows the casting rules of the eager adapter.

Under autocast an eager adapter ``x + up(act(down(x)))`` runs its ``nn.Linear`` layers in the
autocast dtype and adds the low-precision branch to the residual in the residual's own dtype. The
fused op does the same: x is cast to the autocast dtype, the fp32 weights are cast inside the op
(their gradients come back in fp32), the output has eager's dtype, and an fp32 residual is added in
fp32. Checked on CPU with bf16; the CUDA fp16/bf16 cases run where there is a GPU.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import adapterfast
from adapterfast import dispatch
from adapterfast import dropout as dropout_rng
from adapterfast import reference
from helpers import EagerAdapter, rel_err
from training_models import eager_twin, grads, make_model

BF16_TOL = 2e-2

DEVICE_DTYPES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu),
]


def _skip_without(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def _pair(d, r, device, *, bias=True, activation="gelu", scale=1.0):
    """An Adapter and an EagerAdapter with the same fp32 weights."""
    fused = adapterfast.Adapter(d, r, activation=activation, bias=bias, scale=scale).to(device)
    eager = EagerAdapter(d, r, activation=activation, bias=bias, scale=scale).to(device)
    eager.load_state_dict(fused.state_dict(), strict=False)
    return fused, eager


def _run(module, x, residual, g, device, amp_dtype):
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    res = None if residual is None else residual.detach().requires_grad_(True)
    with torch.autocast(device, dtype=amp_dtype):
        y = module(x) if res is None else module(x, residual=res)
    (y.float() * g).sum().backward()
    return y, x.grad, None if res is None else res.grad, grads(module)


@pytest.mark.parametrize("device,amp_dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("x_dtype", ["fp32", "amp"])
@pytest.mark.parametrize("residual", [None, "fp32", "amp"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_eager_adapter_under_autocast(backend, device, amp_dtype, x_dtype, residual, bias):
    _skip_without(device)
    d, r = 24, 6
    fused, eager = _pair(d, r, device, bias=bias, scale=0.5 if residual else 1.0)
    x = torch.randn(3, 5, d, device=device, dtype=torch.float32 if x_dtype == "fp32" else amp_dtype)
    res = None if residual is None else torch.randn(
        3, 5, d, device=device, dtype=torch.float32 if residual == "fp32" else amp_dtype)
    g = torch.randn(3, 5, d, device=device)
    y_f, dx_f, dres_f, dw_f = _run(fused, x, res, g, device, amp_dtype)
    y_e, dx_e, dres_e, dw_e = _run(eager, x, res, g, device, amp_dtype)

    assert y_f.dtype == y_e.dtype
    assert rel_err(y_f, y_e) < BF16_TOL
    assert dx_f.dtype == dx_e.dtype == x.dtype
    assert rel_err(dx_f, dx_e) < BF16_TOL
    if res is not None:
        assert dres_f.dtype == dres_e.dtype == res.dtype
        assert rel_err(dres_f, dres_e) < BF16_TOL
    assert dw_f.keys() == dw_e.keys()
    for name in dw_e:
        assert dw_f[name].dtype == torch.float32, name  # fp32 master weights get fp32 gradients
        assert rel_err(dw_f[name], dw_e[name]) < BF16_TOL, name


def test_fp32_residual_is_kept_in_fp32(backend):
    """With an fp32 residual the output is residual + bf16 branch in fp32, as eager computes it: the
    residual is not rounded to bf16 (an LLM's fp32 residual stream stays fp32)."""
    d = 16
    fused, eager = _pair(d, 4, "cpu")
    with torch.no_grad():
        fused.up.weight.mul_(1e-3)  # a tiny branch: any rounding of the residual would dominate the error
        eager.up.weight.copy_(fused.up.weight)
    x = torch.randn(64, d) * 100
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        y_f, y_e = fused(x), eager(x)
    assert y_f.dtype == torch.float32
    assert rel_err(y_f - x, y_e - x) < BF16_TOL  # the branch itself, at bf16 accuracy
    assert rel_err(y_f, y_e) < 1e-5  # the sum: the residual is exact


@pytest.mark.parametrize("residual", [None, "fp32", "bf16"])
def test_op_computes_in_autocast_dtype(monkeypatch, residual):
    """The backend receives x in bf16 (as nn.Linear would under autocast) and the fp32 weights
    themselves (cast inside the op, no extra copies); outside autocast nothing is cast."""
    seen = []
    real = dispatch.kernels("reference")

    def spy(x, w_down, *args):
        seen.append((x.dtype, w_down.dtype))
        return real.forward(x, w_down, *args)

    monkeypatch.setitem(dispatch._registry, "reference", dataclasses.replace(real, forward=spy))
    adapter = adapterfast.Adapter(16, 4)
    x = torch.randn(5, 16)
    res = None if residual is None else torch.randn(5, 16, dtype=torch.float32 if residual == "fp32" else torch.bfloat16)
    with adapterfast.use_backend("reference"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            adapter(x, residual=res)
        adapter(x, residual=None if res is None else res.float())
    assert seen == [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)]


def test_op_keeps_fp32_preactivation_under_autocast(backend):
    """The custom op's saved pre-activation stays fp32 under autocast, as its fake implementation says."""
    x = torch.randn(6, 8, dtype=torch.bfloat16)
    wd, wu = torch.randn(3, 8), torch.randn(8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = torch.ops.adapterfast.forward(x, wd, wu, None, None, "relu", 1.0, 0.0, None, None)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32


@pytest.mark.parametrize("device,amp_dtype", DEVICE_DTYPES)
def test_dropout_mask_under_autocast(backend, device, amp_dtype):
    """Autocast changes the precision, not the mask: the same seed drops the same elements."""
    _skip_without(device)
    d, r, p = 16, 4, 0.4
    adapter = adapterfast.Adapter(d, r, bias=True, dropout=p, scale=1.5).to(device)
    x = torch.randn(32, d, device=device)
    torch.manual_seed(11)
    with torch.autocast(device, dtype=amp_dtype):
        y = adapter(x)
    torch.manual_seed(11)
    seed = dropout_rng.new_seed()
    params = [t.detach().to(amp_dtype).double() for t in (adapter.down.weight, adapter.up.weight,
                                                          adapter.down.bias, adapter.up.bias)]
    expected = reference.adapter(x.to(amp_dtype).double(), params[0], params[1], params[2], params[3],
                                 activation="relu", scale=1.5, dropout_p=p, seed=seed, residual=x.double())
    assert y.dtype == torch.float32
    assert torch.equal(y == x, expected == x.double())  # dropped exactly where the reference drops
    assert rel_err(y, expected) < BF16_TOL


@pytest.mark.parametrize("device,amp_dtype", DEVICE_DTYPES)
def test_training_under_autocast_tracks_eager(backend, device, amp_dtype):
    """A few AdamW steps of a two-block model under autocast, fused vs eager adapters, same losses and
    weights within bf16 accuracy (fp16 on CUDA uses a GradScaler, as fp16 training does)."""
    _skip_without(device)
    fused_model = make_model(d=16, r=4).to(device)
    eager_model = eager_twin(fused_model).to(device)
    scaler_on = amp_dtype == torch.float16
    results = []
    for model in (fused_model, eager_model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        scaler = torch.amp.GradScaler(device, enabled=scaler_on)
        gen = torch.Generator().manual_seed(3)
        losses = []
        for _ in range(4):
            x = torch.randn(4, 6, 16, generator=gen).to(device)
            target = torch.randn(4, 6, 2, generator=gen).to(device)
            with torch.autocast(device, dtype=amp_dtype):
                loss = torch.nn.functional.mse_loss(model(x).float(), target)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        results.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_f, w_f), (loss_e, w_e) = results
    assert loss_f == pytest.approx(loss_e, rel=BF16_TOL)
    for name in w_e:
        assert w_f[name].dtype == torch.float32
        assert rel_err(w_f[name], w_e[name]) < BF16_TOL, name
