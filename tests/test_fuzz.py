"""Differential fuzz: every backend against a float64 computation, over random shapes, strides and options.

Each case draws leading dims (including size 0 and 1, and a 1-D x), N up to ~5000, odd d, r from 1
to 300 (256 for Triton), an activation, each bias on or off, a scale (0, negative, tiny, large),
a residual or not, a memory layout for every argument (x, residual, both weights, both biases,
grad_y: contiguous, transposed, column-major, sliced, offset, expanded; the bytes around a view
are NaN, so a kernel that reads outside it shows), a dtype the backend runs, and dropout 0 or > 0.
``fused_adapter`` runs forward and backward on the backend; the output and every gradient are
compared elementwise with the float64 oracle (``reference.adapter`` on the same values in float64,
same dropout seed) by flash-attention's rule, as a multiple of plain eager PyTorch's own error in
that dtype (``helpers.assert_close_to_oracle``), and norm-wise.

Cases are drawn from a fixed seed, so a failing case id names the same case on every run.
``ADAPTERFAST_FUZZ_CASES=N`` runs N cases per backend instead of the default (300 for cpu and
reference, 40 small ones for Triton under the interpreter; Triton gets N // 7).
``python tests/test_fuzz.py`` runs them all and prints cases, failures and the largest error ratio
per backend.
"""
from __future__ import annotations

import dataclasses
import os
import random

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest
import torch

import adapterfast
from adapterfast import dispatch, reference
from adapterfast import dropout as dropout_rng
from adapterfast.activations import ACTIVATIONS

from helpers import assert_close_to_oracle

SEED = 20261201
K = 4.0
FULL = int(os.environ.get("ADAPTERFAST_FUZZ_CASES", "0") or 0)
COUNTS = {"cpu": FULL or 300, "reference": FULL or 300, "triton": (FULL // 7 if FULL else 40)}
MATRIX_LAYOUTS = ("contiguous", "transposed", "column_major", "sliced", "offset", "expanded")
VECTOR_LAYOUTS = ("contiguous", "sliced", "offset", "expanded")
SCALES = (1.0, 0.0, -0.5, 1e-20, 1e4, "uniform")


@dataclasses.dataclass(frozen=True)
class Case:
    """One fuzz case: everything needed to rebuild its inputs (``seed`` draws the values)."""

    seed: int
    lead: tuple[int, ...]
    d: int
    r: int
    dtype: torch.dtype
    weight_dtype: torch.dtype
    activation: str
    down_bias: bool
    up_bias: bool
    scale: float
    residual: bool
    dropout: float
    layouts: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        lay = ",".join(f"{k}:{v}" for k, v in self.layouts if v != "contiguous") or "contiguous"
        wd = "" if self.weight_dtype == self.dtype else f"/w{str(self.weight_dtype)[6:]}"
        return (f"{str(self.dtype)[6:]}{wd} {list(self.lead)}x{self.d} r={self.r} {self.activation} "
                f"bias={int(self.down_bias)}{int(self.up_bias)} scale={self.scale:g} res={int(self.residual)} "
                f"p={self.dropout} [{lay}]")


def _dtype(rng: random.Random, backend: str) -> tuple[torch.dtype, torch.dtype]:
    if backend == "triton":
        return torch.float32, torch.float32  # bf16 tl.dot is wrong under the Triton 3.9 interpreter
    roll = rng.random()
    if roll < 0.5:
        return torch.float32, torch.float32
    if roll < 0.7:
        return torch.bfloat16, torch.bfloat16
    if roll < 0.8:
        return torch.bfloat16, torch.float32  # mixed precision: fp32 master weights
    if roll < 0.9 or backend == "cpu":
        return torch.float64, torch.float64
    return torch.float16, torch.float16


def _lead(rng: random.Random, n_max: int) -> tuple[int, ...]:
    kind = rng.choice(("1d", "0", "1", "n", "n", "n", "ab", "a1b"))
    if kind == "1d":
        return ()
    if kind == "0":
        return rng.choice(((0,), (3, 0), (0, 5)))
    if kind == "1":
        return rng.choice(((1,), (1, 1)))
    n = rng.randint(2, n_max) if rng.random() < 0.15 else rng.randint(2, min(n_max, 300))
    if kind == "n":
        return (n,)
    a = rng.randint(1, 6)
    b = max(1, n // a)
    return (a, b) if kind == "ab" else (a, 1, b)


def make_case(backend: str, index: int) -> Case:
    rng = random.Random(SEED * 1000 + index * 7 + len(backend))
    small = backend == "triton"
    dtype, weight_dtype = _dtype(rng, backend)
    d = rng.choice((1, 3, 7, 33, 123)) if small else rng.choice((1, 3, 17, 65, 123, 431, 777, 1000))
    if not small and rng.random() < 0.3:
        d = rng.randrange(1, 800, 2)
    r = rng.choice((1, 3, 16, 37)) if small else rng.choice((1, 2, 5, 16, 64, 100, 256, 300))
    if small and rng.random() < 0.2:
        r = rng.choice((64, 256))
    scale = rng.choice(SCALES)
    scale = rng.uniform(-2.0, 2.0) if scale == "uniform" else scale
    if dtype == torch.float16 and abs(scale) > 100:
        scale = 100.0  # 1e4 overflows fp16 intermediates (65504) in eager too: no dtype error to compare with
    residual = rng.random() < 0.35
    dropout = 0.0 if rng.random() < 0.7 else rng.choice((0.1, 0.5, 0.9))
    # Sizes that keep the default run to a few minutes: the dropout mask is Philox evaluated in
    # eager PyTorch (slow per element), and CPU fp16 matmuls are slow.
    budget = 2e4 if small else (1e6 if dtype == torch.float16 else 3e6)
    n_max = max(2, min(64 if small else 5000, int(budget / (d * r))))
    if dropout > 0:
        n_max = max(2, min(n_max, int((2e3 if small else 3e4) / d)))
    lead = _lead(rng, n_max)
    names = ["x", "down_weight", "up_weight", "grad_y"] + (["residual"] if residual else [])
    down_bias, up_bias = rng.random() < 0.6, rng.random() < 0.6
    layouts = [(n, rng.choice(MATRIX_LAYOUTS)) for n in names]
    layouts += [(n, rng.choice(VECTOR_LAYOUTS)) for n, on in (("down_bias", down_bias), ("up_bias", up_bias)) if on]
    return Case(rng.randrange(2**31), lead, d, r, dtype, weight_dtype, rng.choice(ACTIVATIONS), down_bias,
                up_bias, scale, residual, dropout, tuple(layouts))


def _expand_source(values: torch.Tensor) -> torch.Tensor:
    """What an expanded view of ``values`` is made from: its first row (first element of a vector),
    with size 1 on every dim but the last."""
    shape = tuple(values.shape)
    source = (1,) * (len(shape) - 1) + shape[-1:] if len(shape) > 1 else (1,)
    if values.numel() == 0:
        return torch.randn(source).to(values.dtype)
    return values.reshape(-1)[: source[-1]].reshape(source).clone()


def lay_out(values: torch.Tensor, layout: str, requires_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf, view)``: a leaf holding ``values`` in ``layout`` (NaN around it) and the view of it
    with ``values``' shape that the op receives (differentiable back to the leaf when
    ``requires_grad``). ``values`` must already be constant along the expanded dims when ``layout``
    is "expanded"."""
    shape = tuple(values.shape)
    if layout == "transposed" and values.dim() >= 2:
        leaf, view = values.transpose(-1, -2).contiguous(), lambda t: t.transpose(-1, -2)
    elif layout == "column_major" and values.dim() >= 2:
        order = tuple(reversed(range(values.dim())))
        leaf, view = values.permute(order).contiguous(), lambda t: t.permute(order)
    elif layout == "sliced":
        leaf = torch.full(shape[:-1] + (2 * shape[-1] + 1,), float("nan"), dtype=values.dtype)
        leaf[..., 1::2] = values
        view = lambda t: t[..., 1::2]  # noqa: E731
    elif layout == "offset":
        leaf = torch.full((values.numel() + 10,), float("nan"), dtype=values.dtype)
        leaf[3:3 + values.numel()] = values.reshape(-1)
        view = lambda t: t[3:3 + values.numel()].view(shape)  # noqa: E731
    elif layout == "expanded":
        leaf, view = _expand_source(values), lambda t: t.expand(shape)
    else:
        leaf, view = values.clone(), lambda t: t
    leaf.requires_grad_(requires_grad)
    return leaf, view(leaf)


def _values(case: Case) -> dict[str, torch.Tensor]:
    """The inputs' values (contiguous, in their dtypes), constant where a layout expands them."""
    gen = torch.Generator().manual_seed(case.seed)
    shape = case.lead + (case.d,)
    d, r = case.d, case.r

    def randn(*size, std=1.0, dtype=case.dtype):
        return (torch.randn(*size, generator=gen, dtype=torch.float64) * std).to(dtype)

    values = {
        "x": randn(*shape),
        "down_weight": randn(r, d, std=d**-0.5, dtype=case.weight_dtype),
        "up_weight": randn(d, r, std=r**-0.5, dtype=case.weight_dtype),
        "grad_y": randn(*shape),
    }
    if case.residual:
        values["residual"] = randn(*shape)
    if case.down_bias:
        values["down_bias"] = randn(r, std=0.5, dtype=case.weight_dtype)
    if case.up_bias:
        values["up_bias"] = randn(d, std=0.5, dtype=case.weight_dtype)
    for name, layout in case.layouts:
        if layout == "expanded" and values[name].numel():
            values[name] = _expand_source(values[name]).expand(values[name].shape)
    return values


GRAD_NAMES = ("x", "down_weight", "up_weight", "down_bias", "up_bias", "residual")


def _oracle_and_eager(case: Case, values: dict, seed: int | None, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """``reference.adapter`` (plain autograd, x's dtype throughout) on contiguous copies in ``dtype``;
    in float64 the weights are first rounded to x's dtype, as every backend rounds its matmul
    operands, and the biases are not: every backend adds them to its fp32 sums unrounded (eager in
    x's dtype rounds them, part of its own error)."""
    d = case.d
    inputs = {}
    for name, v in values.items():
        if name == "grad_y":
            continue
        t = v.to(case.dtype) if name in ("down_weight", "up_weight") else v
        inputs[name] = t.detach().to(dtype).clone(memory_format=torch.contiguous_format).requires_grad_()
    x2 = inputs["x"].reshape(-1, d)
    res2 = inputs["residual"].reshape(-1, d) if case.residual else None
    y = reference.adapter(x2, inputs["down_weight"], inputs["up_weight"], inputs.get("down_bias"),
                          inputs.get("up_bias"), activation=case.activation, scale=case.scale,
                          dropout_p=case.dropout, seed=seed, residual=res2).reshape(values["x"].shape)
    names = [n for n in GRAD_NAMES if n in inputs]
    grads = torch.autograd.grad(y, [inputs[n] for n in names], values["grad_y"].to(dtype).contiguous(),
                                allow_unused=True)
    return y.detach(), {n: (torch.zeros_like(inputs[n]) if g is None else g) for n, g in zip(names, grads)}


def run_case(backend: str, case: Case) -> float:
    """Runs one case on ``backend``; asserts, and returns the largest error ratio to eager."""
    values = _values(case)
    laid = {name: lay_out(values[name], layout, name != "grad_y") for name, layout in case.layouts}
    views = {n: view for n, (_, view) in laid.items() if n != "grad_y"}
    torch.manual_seed(case.seed)
    seed = int(dropout_rng.new_seed()) if case.dropout > 0 else None
    torch.manual_seed(case.seed)
    with adapterfast.use_backend(backend):
        y = adapterfast.fused_adapter(
            views["x"], views["down_weight"], views["up_weight"], views.get("down_bias"), views.get("up_bias"),
            activation=case.activation, scale=case.scale, dropout=case.dropout, residual=views.get("residual"),
        )
        torch.randn(16)  # the backward must not depend on the RNG state after the forward
        names = [n for n in GRAD_NAMES if n in views]
        grads = torch.autograd.grad(y, [views[n] for n in names], laid["grad_y"][1], allow_unused=True)
    assert y.is_contiguous() and y.shape == values["x"].shape and y.dtype == case.dtype
    y_ref, g_ref = _oracle_and_eager(case, values, seed, torch.float64)
    y_eager, g_eager = _oracle_and_eager(case, values, seed, case.dtype)
    worst = assert_close_to_oracle("y", y, y_ref, y_eager, dtype=case.dtype, k=K)
    for name, got in zip(names, grads):
        got = torch.zeros_like(values[name]) if got is None else got
        want_dtype = values[name].dtype
        assert got.dtype == want_dtype, f"grad {name}: dtype {got.dtype}, expected {want_dtype}"
        ratio = assert_close_to_oracle(f"grad {name}", got, g_ref[name], g_eager[name].to(want_dtype),
                                       dtype=case.dtype, k=K)
        worst = max(worst, ratio)
    return worst


def _available(backend: str) -> str | None:
    info = dispatch.backends()[backend]
    return None if info.available else info.reason


# Known failures, by backend and case index, with what is known of them (xfail, strict).
KNOWN: dict[tuple[str, int], str] = {
}


def _params(backend: str):
    for i in range(COUNTS[backend]):
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN[(backend, i)])] if (backend, i) in KNOWN else []
        yield pytest.param(backend, i, id=f"{backend}-{i}", marks=marks)


@pytest.mark.parametrize("backend,index", [p for b in ("reference", "cpu", "triton") for p in _params(b)])
def test_fuzz(backend, index):
    reason = _available(backend)
    if reason is not None:
        pytest.skip(reason)
    case = make_case(backend, index)
    try:
        run_case(backend, case)
    except AssertionError as error:
        raise AssertionError(f"case {backend}-{index}: {case}: {error}") from None


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_dropout_same_seed_same_result_and_keep_rate(backend):
    if _available(backend):
        pytest.skip(_available(backend))
    n, d, r, p = (64, 48, 16, 0.3) if backend == "triton" else (512, 256, 16, 0.3)
    x = torch.randn(n, d)
    wd, wu = torch.randn(r, d) / d**0.5, torch.randn(d, r) / r**0.5
    res = torch.zeros(n, d)
    with adapterfast.use_backend(backend):
        torch.manual_seed(1)
        a = adapterfast.fused_adapter(x, wd, wu, dropout=p, residual=res)
        torch.manual_seed(1)
        b = adapterfast.fused_adapter(x, wd, wu, dropout=p, residual=res)
        c = adapterfast.fused_adapter(x, wd, wu, dropout=p, residual=res)
        full = adapterfast.fused_adapter(x, wd, wu, residual=res)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    kept = a != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 4 * (p * (1 - p) / kept.numel()) ** 0.5
    torch.testing.assert_close(a[kept], full[kept] / (1 - p), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    import sys
    import time

    for backend in sys.argv[1:] or ("reference", "cpu", "triton"):
        if _available(backend):
            print(f"{backend}: unavailable ({_available(backend)})")
            continue
        start, failures, worst = time.perf_counter(), [], 0.0
        for i in range(COUNTS[backend]):
            case = make_case(backend, i)
            try:
                worst = max(worst, run_case(backend, case))
            except Exception as error:  # noqa: BLE001 (a crash is a failure to report, not to stop at)
                failures.append((i, case, f"{type(error).__name__}: {error}".splitlines()[0][:300]))
        print(f"{backend}: {COUNTS[backend]} cases, {len(failures)} failed, max error ratio of passing cases "
              f"{worst:.3g} ({time.perf_counter() - start:.0f} s)")
        for i, case, message in failures:
            print(f"  {backend}-{i}: {case}\n      {message}")


# ----------------------------------------------------------------------------- NaN / Inf on the fused backends

@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", ["nan_scale", "inf_scale", "-inf_scale", "inf_grad", "nan_grad"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_backends_are_nonfinite_wherever_eager_is(backend, case, activation, residual):
    """What the fused backends do with a NaN/Inf scale or grad_y, as tested: every output is
    non-finite wherever eager's is, and equal to eager's wherever both are finite. They are not
    eager's exact pattern (the reference is, see test_reference.py): they apply ``scale`` after a
    matmul where eager applies it before (finite sum * Inf = Inf where eager's sum of +-Inf is NaN).
    Their ReLU backward selects, as eager's does."""
    from test_reference import _eager, fused, nonfinite_case, nonfinite_outputs

    if _available(backend):
        pytest.skip(_available(backend))
    inputs, scale, g = nonfinite_case(case, torch.float32, residual)
    want = nonfinite_outputs(_eager, inputs, scale, g, activation)
    got = nonfinite_outputs(fused(backend), inputs, scale, g, activation)
    for name, a, b in zip(["y", "dx", "dw_down", "dw_up", "db_down", "db_up", "dres"], got, want):
        eager_bad = ~torch.isfinite(b)
        assert not torch.isfinite(a[eager_bad]).any(), f"{name}: finite where eager is not"
        both = torch.isfinite(a) & torch.isfinite(b)
        torch.testing.assert_close(a[both], b[both], rtol=1e-4, atol=1e-5, msg=name)
