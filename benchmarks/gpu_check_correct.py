"""The GPU check's correctness step: the Triton kernels at real sizes against float64.

    python -m benchmarks.gpu_check_correct

- bf16/fp16/fp32 forward and backward at N=16384, d=4096, r in {16, 64, 256} (dropout 0.1,
  biases, gelu): relative error per output against ``adapterfast.reference`` in float64 on the
  GPU, from the same rounded inputs;
- the dropout mask against ``adapterfast.dropout.keep_mask`` (the shared Philox definition);
- two backward runs compared bitwise (deterministic weight gradients);
- N*d > 2**31 (bf16 forward, rows at the start, at 2**31 / d and at the end against float64);
- strided inputs (column-major x and grad, sliced biases);
- the grouped op's Triton kernels (issue 18): 8 adapters, rows at random, about one in nine on no
  adapter, against ``adapterfast.grouped_reference`` in float64, forward and backward.
Each result is a record as soon as it is known (``benchmarks.gpu_check.record``).
"""
from __future__ import annotations

import sys

import torch

from .gpu_check import CORRECT_SHAPES, DRY, GROUPED_SHAPE, HUGE_SHAPE, device, guarded, record

STEP = "correct"
SEED = (0x1234ABCD << 32) | 0x9E3779B9
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _dtypes():
    # the interpreter computes bf16 tl.dot wrongly: the dry run checks fp32 and fp16 only
    return (torch.float32, torch.float16) if DRY else (torch.bfloat16, torch.float16, torch.float32)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom or 1.0)


def inputs(n, d, r, dtype, *, seed=0):
    g = torch.Generator(device=device()).manual_seed(seed)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, device=device()) * s).to(dtype)

    return dict(x=rand(n, d), w_down=rand(r, d, s=d**-0.5), w_up=rand(d, r, s=r**-0.5), b_down=rand(r, s=0.1),
                b_up=rand(d, s=0.1), grad=rand(n, d))


def _run(t, p, seed, activation="gelu"):
    from adapterfast import kernels

    y, h = kernels.forward(t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], activation, 0.5, p, seed, None)
    grads = kernels.backward(t["grad"], t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], h, activation, 0.5,
                             p, seed, True)
    return y, h, grads


def _reference(t, p, seed, activation="gelu"):
    from adapterfast import reference

    d64 = {k: v.double() for k, v in t.items()}
    y, h = reference.forward(d64["x"], d64["w_down"], d64["w_up"], d64["b_down"], d64["b_up"], activation, 0.5, p,
                             seed, None)
    grads = reference.backward(d64["grad"], d64["x"], d64["w_down"], d64["w_up"], d64["b_down"], d64["b_up"], h,
                               activation, 0.5, p, seed, True)
    return y, h, grads


NAMES = ("y", "h", "dx", "dw_down", "db_down", "dw_up", "db_up")


def accuracy(n, d, r, dtype) -> None:
    t = inputs(n, d, r, dtype)
    got = _run(t, 0.1, SEED)
    want = _reference(t, 0.1, SEED)
    flat_got = [got[0], got[1], *got[2]]
    flat_want = [want[0], want[1], *want[2]]
    errors = {name: _rel(a, b) for name, a, b in zip(NAMES, flat_got, flat_want)}
    record(STEP, name="accuracy", shape=f"{n}x{d} r{r}", dtype=str(dtype)[6:], max_rel_err=max(errors.values()),
           ok=all(e < TOL[dtype] for e in errors.values()), **errors)
    again = _run(t, 0.1, SEED)[2]
    record(STEP, name="backward_bitwise", shape=f"{n}x{d} r{r}", dtype=str(dtype)[6:],
           ok=all(torch.equal(a, b) for a, b in zip(got[2], again)))


def dropout_mask(n, d, r) -> None:
    """With Wu = 0, bu = 1, residual 0, scale 1: y is 1/(1-p) where kept, 0 where dropped."""
    from adapterfast import dropout, kernels

    p = 0.1
    t = inputs(n, d, r, torch.float32)
    t["w_up"].zero_()
    t["b_up"].fill_(1.0)
    zero = torch.zeros_like(t["x"])
    y, _ = kernels.forward(t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], "relu", 1.0, p, SEED, zero)
    keep = dropout.keep_mask(SEED, p, n, d, device=device())
    record(STEP, name="dropout_mask", shape=f"{n}x{d}", ok=bool(torch.equal(y != 0, keep)),
           keep_rate=float(keep.float().mean()), mismatches=int((((y != 0) != keep)).sum()))


def huge() -> None:
    """A bf16 (fp16 dry) forward with N*d > 2**31: rows near the int32 boundary against float64."""
    from adapterfast import kernels

    n, d, r = HUGE_SHAPE
    dtype = torch.float16 if DRY else torch.bfloat16
    g = torch.Generator(device=device()).manual_seed(1)
    x = torch.randn(n, d, generator=g, device=device(), dtype=dtype)
    wd = (torch.randn(r, d, generator=g, device=device()) * d**-0.5).to(dtype)
    wu = (torch.randn(d, r, generator=g, device=device()) * r**-0.5).to(dtype)
    y, _ = kernels.forward(x, wd, wu, None, None, "relu", 1.0, 0.0, None, None)
    boundary = min(n - 2, (2**31) // d)
    rows = torch.tensor([0, 1, boundary - 1, boundary, boundary + 1, n - 1], device=device())
    xs = x[rows].double()
    want = xs + torch.relu(xs @ wd.double().t()) @ wu.double().t()
    record(STEP, name="huge_forward", shape=f"{n}x{d} r{r}", elements=n * d, over_2_31=n * d > 2**31,
           rel_err=_rel(y[rows], want), ok=_rel(y[rows], want) < 2e-2)
    del x, y


def strided(n, d, r) -> None:
    dtype = torch.float32 if DRY else torch.bfloat16
    t = inputs(n, d, r, dtype, seed=3)
    want = _reference(t, 0.1, SEED)
    s = dict(t)
    for key in ("x", "grad"):
        s[key] = torch.empty((d, n), dtype=dtype, device=device()).t().copy_(t[key])
    for key in ("b_down", "b_up"):
        s[key] = torch.empty(2 * t[key].numel(), dtype=dtype, device=device())[::2].copy_(t[key])
    got = _run(s, 0.1, SEED)
    errors = {name: _rel(a, b) for name, a, b in zip(NAMES, [got[0], got[1], *got[2]],
                                                     [want[0], want[1], *want[2]])}
    record(STEP, name="strided", shape=f"{n}x{d} r{r}", dtype=str(dtype)[6:], max_rel_err=max(errors.values()),
           ok=max(errors.values()) < TOL[dtype], **errors)


def grouped(n, d, r, dtype) -> None:
    """``kernels.grouped`` forward and backward (dropout 0.1, biases, gelu, per-adapter scales)
    against ``grouped_reference`` in float64 from the same rounded inputs."""
    from adapterfast import grouped_reference
    from adapterfast.kernels import grouped as triton_grouped

    adapters = 8
    g = torch.Generator(device=device()).manual_seed(5)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, device=device()) * s).to(dtype)

    t = (rand(n, d), rand(adapters, r, d, s=d**-0.5), rand(adapters, d, r, s=r**-0.5), rand(adapters, r, s=0.1),
         rand(adapters, d, s=0.1))
    grad = rand(n, d)
    index = torch.randint(-1, adapters, (n,), generator=g, device=device())
    scales = torch.linspace(0.5, 1.5, adapters, dtype=torch.float64, device=device())
    got = []
    want = []
    for module, tensors, g_y in ((triton_grouped, t, grad), (grouped_reference, [v.double() for v in t], grad.double())):
        x, wd, wu, bd, bu = tensors
        y, h = module.forward(x, index, wd, wu, bd, bu, "gelu", scales, 0.1, SEED, None)
        out = got if module is triton_grouped else want
        out += [y, h, *module.backward(g_y, x, index, wd, wu, bd, bu, h, "gelu", scales, 0.1, SEED, True)]
    errors = {name: _rel(a, b) for name, a, b in zip(NAMES, got, want)}
    record(STEP, name="grouped", shape=f"{n}x{d} r{r}", adapters=adapters, dtype=str(dtype)[6:],
           max_rel_err=max(errors.values()), ok=max(errors.values()) < TOL[dtype], **errors)


def main() -> int:
    try:
        for n, d, r in CORRECT_SHAPES:
            for dtype in _dtypes():
                guarded(STEP, f"accuracy {n}x{d} r{r} {dtype}", accuracy, n, d, r, dtype)
        n, d, r = CORRECT_SHAPES[1]
        guarded(STEP, "dropout_mask", dropout_mask, n, d, r)
        guarded(STEP, "strided", strided, n, d, r)
        guarded(STEP, "huge_forward", huge)
        n, d, r = GROUPED_SHAPE
        for dtype in _dtypes():
            guarded(STEP, f"grouped {n}x{d} r{r} {dtype}", grouped, n, d, r, dtype)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
