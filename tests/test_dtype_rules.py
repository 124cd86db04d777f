"""Which dtype combinations the op accepts (as nn.Linear does, plus mixed precision), clear
messages for the rest, and meta tensors through the op's fake kernels."""
import pytest
import torch

import adapterfast
from adapterfast import reference

from helpers import adapter_inputs, backend_params, rel_err

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


@pytest.mark.parametrize("x_dtype, w_dtype", [(F32, BF16), (F32, F64), (F64, F32), (BF16, F64), (F32, F16),
                                              (F16, BF16), (BF16, F16)])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_mixed_dtypes_outside_the_rules_are_a_type_error(backend, x_dtype, w_dtype):
    x, wd, wu, bd, bu, _ = adapter_inputs(4, 8, 4)
    with adapterfast.use_backend(backend):
        with pytest.raises(TypeError, match=f"x is {x_dtype} but the weights are {w_dtype}"):
            adapterfast.fused_adapter(x.to(x_dtype), wd.to(w_dtype), wu.to(w_dtype), bd.to(w_dtype), bu.to(w_dtype))


def test_bias_dtype_must_match_the_weights():
    x, wd, wu, bd, bu, _ = adapter_inputs(4, 8, 4)
    with pytest.raises(TypeError, match="up_bias is torch.float64 but down_weight is torch.float32"):
        adapterfast.fused_adapter(x, wd, wu, bd, bu.double())


@pytest.mark.parametrize("x_dtype", [F16, BF16])
def test_half_x_with_fp32_weights_is_accepted(x_dtype):
    x, wd, wu, bd, bu, _ = adapter_inputs(6, 16, 4)
    y = adapterfast.fused_adapter(x.to(x_dtype), wd, wu, bd, bu)
    want = reference.adapter(x.to(x_dtype).double(), wd.to(x_dtype).double(), wu.to(x_dtype).double(),
                             bd.to(x_dtype).double(), bu.to(x_dtype).double())
    assert y.dtype == x_dtype and rel_err(y, want) < 1e-2


def test_autocast_accepts_what_it_casts():
    x, wd, wu, bd, bu, _ = adapter_inputs(6, 16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = adapterfast.fused_adapter(x, wd.half(), wu.half(), bd.half(), bu.half())
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(dropout="0.1"), TypeError, "dropout must be a real number (a float), got str '0.1'"),
    (dict(scale="x"), TypeError, "scale must be a real number (a float), got str 'x'"),
    (dict(scale=None), TypeError, "scale must be a real number"),
])
def test_adapter_constructor_messages(kwargs, error, words):
    with pytest.raises(error) as info:
        adapterfast.Adapter(16, 4, **kwargs)
    assert words in str(info.value)


def test_wrong_d_model_names_x_and_the_adapter():
    adapter = adapterfast.Adapter(768, 8)
    with pytest.raises(ValueError, match="x's last dimension 512 does not match the adapter's d_model 768"):
        adapter(torch.randn(2, 512))


@pytest.mark.parametrize("backend", ["auto"] + backend_params())
def test_meta_tensors_run_through_the_fake_kernels(backend):
    adapter = adapterfast.Adapter(32, 4, bias=True, device="meta")
    x = torch.empty(3, 5, 32, device="meta", requires_grad=True)
    with adapterfast.use_backend(backend):
        y = adapter(x)
        y.sum().backward()
    assert y.device.type == "meta" and y.shape == x.shape
    assert x.grad.shape == x.shape and adapter.down.weight.grad.shape == (4, 32)


def test_meta_then_to_empty_trains():
    adapter = adapterfast.Adapter(16, 4, device="meta")
    adapter.to_empty(device="cpu")
    torch.nn.init.normal_(adapter.down.weight)
    torch.nn.init.normal_(adapter.up.weight)
    x = torch.randn(4, 16)
    y = adapter(x)
    want = x + torch.relu(x @ adapter.down.weight.t()) @ adapter.up.weight.t()
    assert rel_err(y, want.detach()) < 1e-5
