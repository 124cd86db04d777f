"""Shared test tools: the seed's eager modules, random inputs, and the error measure."""
from __future__ import annotations

import torch
import torch.nn as nn


class SeedAdapter(nn.Module):
    """The eager adapter adapterfast replaces, exactly as users write it."""

    def __init__(self, d_model, r=16):
        super().__init__()
        self.down = nn.Linear(d_model, r, bias=False)
        self.act = nn.ReLU()
        self.up = nn.Linear(r, d_model, bias=False)

    def forward(self, x):
        return x + self.up(self.act(self.down(x)))


class ToyTransformerLayer(nn.Module):
    """A post-LN transformer layer with a Pfeiffer adapter after the FFN, as in the seed project."""

    def __init__(self, d_model=32, n_heads=4, d_ff=64, r=8):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.adapter = SeedAdapter(d_model, r)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x):
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.adapter(self.ff(x)))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN never passes a threshold."""
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num / denom if denom > 0 else num


def adapter_inputs(n, d, r, *, dtype=torch.float32, bias=True, residual=False, device="cpu"):
    """Random inputs of realistic scale: weights like nn.Linear init, x and grad unit normal."""
    g = dict(dtype=dtype, device=device)
    x = torch.randn(n, d, **g)
    wd = torch.randn(r, d, **g) / d**0.5
    wu = torch.randn(d, r, **g) / r**0.5
    bd = torch.randn(r, **g) * 0.1 if bias else None
    bu = torch.randn(d, **g) * 0.1 if bias else None
    res = torch.randn(n, d, **g) if residual else None
    return x, wd, wu, bd, bu, res


def _max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def eager_error_ratio(out: torch.Tensor, oracle: torch.Tensor, eager: torch.Tensor, *, atol: float | None = None) -> float:
    """flash-attention's elementwise rule as a number: ``max|out - oracle| / (max|eager - oracle| + atol)``.

    ``oracle`` is the float64 computation from the same inputs; ``eager`` is plain eager PyTorch in
    the dtype under test, so its error is what that dtype costs anyway and a kernel is held to a
    multiple of it. ``atol`` (default ``ulp_atol``) covers outputs that eager happens to compute
    exactly (float64, all-zero gradients). Non-finite oracle values must be matched exactly (NaN
    where NaN, the same infinity), else the ratio is ``inf``; a NaN or Inf anywhere else never
    passes, except where eager itself overflowed in the dtype (its error there is unbounded, so
    any value passes). An oracle value beyond the dtype's range is expected as the infinity of its
    sign (fp16 overflows at 65504).
    """
    if atol is None:
        atol = ulp_atol(out.dtype, oracle)
    if out.dtype != torch.float64:
        big = oracle.double().abs() > torch.finfo(out.dtype).max
        oracle = torch.where(big, oracle.double().sign() * float("inf"), oracle.double())
    out, oracle, eager = out.double(), oracle.double(), eager.double()
    if out.shape != oracle.shape:
        return float("inf")
    bad = ~torch.isfinite(oracle)
    if bad.any():
        same = (torch.isnan(out) & torch.isnan(oracle)) | (out == oracle)
        if not bool(same[bad].all()):
            return float("inf")
    keep = ~bad & torch.isfinite(eager)
    out, oracle, eager = out[keep], oracle[keep], eager[keep]
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return _max_abs(out - oracle) / (_max_abs(eager - oracle) + atol)


def ulp_atol(dtype: torch.dtype, oracle: torch.Tensor, ulps: float | None = None) -> float:
    """``ulps`` units in the last place of ``dtype`` at ``oracle``'s largest finite magnitude: 4 by
    default, 64 for float64, where eager is the oracle's own algorithm (its error is 0 and only this
    term counts) and a different summation order over a few thousand rows with cancellation costs
    tens of ulps of the largest value."""
    if ulps is None:
        ulps = 64.0 if dtype == torch.float64 else 4.0
    finite = oracle[torch.isfinite(oracle)].double()
    return ulps * torch.finfo(dtype).eps * max(_max_abs(finite), torch.finfo(torch.float32).tiny)


def assert_close_to_oracle(name: str, out: torch.Tensor, oracle: torch.Tensor, eager: torch.Tensor, *,
                           dtype: torch.dtype, k: float = 4.0, rel: float | None = None) -> float:
    """Asserts flash-attention's rule (``max|out - oracle| <= k * (max|eager - oracle| + atol)``,
    ``eager_error_ratio``) and the norm-wise bound ``rel_err(out, oracle) <= max(rel, k * eager's)``
    (``rel`` by dtype: 1e-12 float64, 1e-5 fp32, 2e-2 bf16/fp16) over the positions where oracle and
    eager are finite. Returns the ratio for reporting."""
    ratio = eager_error_ratio(out, oracle, eager, atol=ulp_atol(dtype, oracle))
    assert ratio <= k, f"{name}: max error {ratio:.3g}x eager's own error in {dtype} (allowed {k}x)"
    if rel is None:
        rel = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    finite = torch.isfinite(oracle) & torch.isfinite(eager.double())
    if out.dtype != torch.float64:
        finite &= oracle.double().abs() <= torch.finfo(out.dtype).max
    if bool(finite.any()):
        err = rel_err(out.double()[finite], oracle.double()[finite])
        eager_rel = rel_err(eager.double()[finite], oracle.double()[finite])
        assert err <= max(rel, k * eager_rel), f"{name}: relative error {err:.3g} (allowed {max(rel, k * eager_rel):.2g})"
    return ratio
