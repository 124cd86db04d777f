"""Shared test tools: the eager adapter and a toy layer, random inputs, the error rules, and which
backends can run here (missing ones become skips that say why, not shorter parameter lists)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from adapterfast import dispatch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.providers import EagerAdapter  # noqa: E402  (one eager adapter, the benchmarks' baseline)

SeedAdapter = EagerAdapter  # the name tests/test_grouped_bank.py imports


class ToyTransformerLayer(nn.Module):
    """A post-LN transformer layer with a Pfeiffer adapter after the FFN, as in the seed project."""

    def __init__(self, d_model=32, n_heads=4, d_ff=64, r=8):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.adapter = EagerAdapter(d_model, r)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x):
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.adapter(self.ff(x)))


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """``||out - ref|| / max(||ref||, floor)`` in float64 (``||out - ref||`` when that is zero); NaN
    never passes a threshold. ``floor`` is for gradients that are zero up to rounding."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = max(ref.norm().item(), floor)
    num = (out - ref).norm().item()
    return num / denom if denom > 0 else num


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|out - ref| / max|ref|``: the elementwise companion of ``rel_err``. One wrong row in
    thousands barely moves the norm-wise error but shows here in full."""
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        return float("inf")
    if not out.numel():
        return 0.0
    num = (out - ref).abs().max().item()
    denom = ref.abs().max().item()
    return num / denom if denom > 0 else num


def assert_matches(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Both rules, the norm-wise and the elementwise one, within ``tol``."""
    norm_wise, elementwise = rel_err(out, ref), max_rel_err(out, ref)
    assert norm_wise < tol and elementwise < tol, (
        f"{name}: relative error {norm_wise:.3g}, max elementwise {elementwise:.3g} (of max|ref|), allowed {tol:g}")


VOCAB = 100  # the tiny transformers models' vocabulary


def tiny_bert(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer BERT sequence classifier (hidden 32) with random weights from ``seed``, in eval mode."""
    import transformers

    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, num_labels=2)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).to(dtype).eval()


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer Llama causal LM (hidden 32, grouped KV heads) with random weights from ``seed``, in eval mode."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def ids(seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    """Random token ids for the tiny models (3 and up: clear of the special tokens)."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def fp16_unsupported_reason() -> str | None:
    """Why fp16 mixed precision (autocast and GradScaler) cannot train here, or None when it can."""
    if torch.cuda.is_available():
        return None
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
        torch.amp.GradScaler("cpu")
    except (RuntimeError, TypeError, ValueError) as error:  # depends on the torch build
        return f"fp16 autocast on CPU unavailable: {error}"
    return None


BACKEND_NAMES = ("reference", "cpu", "triton")


def backend_params(names=BACKEND_NAMES) -> list:
    """``pytest.param`` per backend, skipped with the reason where it cannot run here."""
    report = dispatch.backends()
    return [pytest.param(name, id=name, marks=pytest.mark.skipif(
        not report[name].available, reason=f"backend {name!r} unavailable: {report[name].reason}"))
        for name in names]


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
