"""``AdapterBank`` (loading from single adapters, state dicts, per-adapter scales) and the grouped custom ops
under ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)``."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from adapterfast import Adapter, AdapterBank, grouped_adapter, use_backend
from adapterfast.grouped_ops import grouped_forward
from helpers import SeedAdapter, backend_params, rel_err


def test_bank_from_adapters_matches_each_adapter():
    adapters = [Adapter(24, 6, activation="gelu", bias=True, scale=0.5 + i) for i in range(3)]
    for a in adapters:
        nn.init.normal_(a.up.weight)
    bank = AdapterBank.from_adapters(adapters)
    x = torch.randn(40, 24)
    index = torch.randint(-1, 3, (40,))
    y = bank(x, index)
    for i in range(40):
        want = x[i:i + 1] if index[i] < 0 else adapters[index[i]](x[i:i + 1])
        assert rel_err(y[i:i + 1], want) < 1e-6


def test_bank_loads_eager_adapters_and_state_dicts_and_exports_them():
    eager = [SeedAdapter(16, 4) for _ in range(2)]
    bank = AdapterBank(3, 16, 4)
    bank.load_adapter(0, eager[0])
    bank.load_adapter(2, eager[1].state_dict())
    assert torch.equal(bank.adapter_state_dict(2)["up.weight"], eager[1].up.weight)
    fresh = SeedAdapter(16, 4)
    fresh.load_state_dict(bank.adapter_state_dict(0))
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert rel_err(bank(x, torch.zeros(5, dtype=torch.long)), fresh(x)) < 1e-6
        assert rel_err(bank(x, torch.full((5,), 2)), eager[1](x)) < 1e-6
    with pytest.raises(ValueError, match="state dict keys"):
        bank.load_adapter(1, {"down.weight": torch.zeros(4, 16)})
    with pytest.raises(ValueError, match="up.weight"):
        bank.load_adapter(1, {"down.weight": torch.zeros(4, 16), "up.weight": torch.zeros(16, 5)})
    with pytest.raises(ValueError, match="slot"):
        bank.load_adapter(3, eager[0])
    with pytest.raises(ValueError, match="differs from adapter 0"):
        AdapterBank.from_adapters([Adapter(16, 4), Adapter(16, 8)])


def test_bank_trains_only_the_adapters_used():
    bank = AdapterBank(4, 12, 3, bias=True)
    x = torch.randn(20, 12, requires_grad=True)
    index = torch.tensor([1, 3] * 10)
    bank(x, index).square().sum().backward()
    for p in bank.parameters():
        assert p.grad[[0, 2]].abs().max() == 0 and p.grad[[1, 3]].abs().max() > 0
    assert x.grad is not None


@pytest.mark.parametrize("cast", ["to_bfloat16", "half", "to_float64"])
def test_bank_dtype_casts_keep_the_scales_exact(cast):
    """Casting the bank casts its weights, never its per-adapter scales (a float64 buffer): a
    16-bit scale would give every row a branch scaled by 0.69921875 where its Adapter's is 0.7."""
    bank = AdapterBank(3, 32, 4, scale=[0.7, 1.3, 2.9])
    bank = {"to_bfloat16": lambda b: b.to(torch.bfloat16), "half": lambda b: b.half(),
            "to_float64": lambda b: b.to(torch.float64)}[cast](bank)
    assert bank.scales.dtype == torch.float64
    assert bank.scales.tolist() == [0.7, 1.3, 2.9]
    dtype = bank.down_weight.dtype
    x = torch.randn(64, 32).to(dtype)
    index = torch.randint(-1, 3, (64,))
    with torch.no_grad():
        want = grouped_adapter(x, index, bank.down_weight, bank.up_weight, scale=[0.7, 1.3, 2.9])
        assert torch.equal(bank(x, index), want)
    bank.load_adapter(1, Adapter(32, 4, scale=0.3))
    assert bank.scales.dtype == torch.float64 and bank.scales[1].item() == 0.3


def _op_args(dtype=torch.float64, bias=True, residual=False):
    n, d, r, a = 10, 8, 3, 3
    x = torch.randn(n, d, dtype=dtype, requires_grad=True)
    wd = torch.randn(a, r, d, dtype=dtype, requires_grad=True)
    wu = torch.randn(a, d, r, dtype=dtype, requires_grad=True)
    bd = torch.randn(a, r, dtype=dtype, requires_grad=True) if bias else None
    bu = torch.randn(a, d, dtype=dtype, requires_grad=True) if bias else None
    res = torch.randn(n, d, dtype=dtype) if residual else None
    scales = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    index = torch.tensor([0, 2, -1, 2, 0, 0, -1, 2, 2, 0])
    return (x, index, wd, wu, bd, bu, "silu", scales, 0.0, None, res)


@pytest.mark.parametrize("backend", backend_params(("reference", "cpu")))
def test_opcheck(backend):
    with use_backend(backend):
        torch.library.opcheck(grouped_forward, _op_args())
        torch.library.opcheck(grouped_forward, _op_args(bias=False, residual=True))


def test_compile_fullgraph():
    bank = AdapterBank(3, 16, 4, bias=True, scale=[0.5, 1.0, 2.0])
    x = torch.randn(2, 5, 16, requires_grad=True)
    index = torch.randint(-1, 3, (2, 5))
    compiled = torch.compile(bank, fullgraph=True, backend="aot_eager")
    got = compiled(x, index)
    want = bank(x, index)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    grads = [p.grad.clone() for p in bank.parameters()]
    bank.zero_grad()
    bank(x, index).sum().backward()
    for g, p in zip(grads, bank.parameters()):
        torch.testing.assert_close(g, p.grad)
