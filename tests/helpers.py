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
