"""The Triton backend (``adapterfast.kernels``) against the float64 reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1`` is
set here, before Triton is imported, whatever conftest does); with one they run compiled on
CUDA tensors. The interpreter cannot check bf16 dots (it returns garbage), ``tl.dot`` K >= 16,
out-of-bounds loads or races: ``test_compile_check.py`` compiles every variant for sm_80/sm_90.

Every comparison is a relative error ``||out - ref|| / ||ref||`` per output and per gradient,
against ``reference.adapter`` differentiated by autograd in float64 from the same (rounded)
inputs: fp32 < 1e-5, fp16/bf16 < 1e-2.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from adapterfast import dropout, kernels, reference  # noqa: E402
from adapterfast.activations import ACTIVATIONS  # noqa: E402
from adapterfast.kernels import activations, config, philox  # noqa: E402
from adapterfast.kernels.forward_kernel import adapter_forward_kernel  # noqa: E402

from helpers import assert_matches, rel_err  # noqa: E402

INTERPRETED = type(adapter_forward_kernel).__name__ == "InterpretedFunction"
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("adapterfast.kernels was imported without TRITON_INTERPRET and there is no GPU",
                allow_module_level=True)
DEVICE = "cpu" if INTERPRETED else "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
SEED = (0x1234ABCD << 32) | 0x9E3779B9  # both key words, the low one with its top bit set


def make_inputs(n, d, r, dtype, *, bias=True, residual=False, weight_dtype=None):
    g = torch.Generator().manual_seed(n * 1000003 + d * 101 + r)
    wdt = weight_dtype or dtype

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dt)

    return dict(
        x=rand(n, d), w_down=rand(r, d, scale=d**-0.5, dt=wdt), w_up=rand(d, r, scale=r**-0.5, dt=wdt),
        b_down=rand(r, scale=0.1, dt=wdt) if bias else None, b_up=rand(d, scale=0.1, dt=wdt) if bias else None,
        residual=rand(n, d) if residual else None, grad=rand(n, d),
    )


def run_kernels(t, activation, scale, p, seed):
    y, h = kernels.forward(t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], activation, scale, p, seed,
                           t["residual"])
    grads = kernels.backward(t["grad"], t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], h, activation, scale,
                             p, seed, t["residual"] is None)
    return y, h, grads


def run_oracle(t, activation, scale, p, seed, dot_dtype):
    """``(y, h, grads)`` in float64 by autograd; weights rounded to the dot dtype as the kernels do."""
    def leaf(v, dt=None):
        if v is None:
            return None
        return (v if dt is None else v.to(dt)).detach().to("cpu", torch.float64).requires_grad_()

    x, res = leaf(t["x"]), leaf(t["residual"])
    wd, wu = leaf(t["w_down"], dot_dtype), leaf(t["w_up"], dot_dtype)
    bd, bu = leaf(t["b_down"]), leaf(t["b_up"])
    y = reference.adapter(x, wd, wu, bd, bu, activation=activation, scale=scale, dropout_p=p, seed=seed,
                          residual=res)
    h = x @ wd.t() + (0 if bd is None else bd)
    params = [x, wd, bd, wu, bu]
    used = [v for v in params if v is not None]
    got = iter(torch.autograd.grad(y, used, t["grad"].to("cpu", torch.float64)))
    grads = [next(got) if v is not None else None for v in params]
    return y.detach(), h.detach(), grads


def check_case(n, d, r, dtype, activation="relu", *, bias=True, residual=False, scale=1.0, p=0.0,
               weight_dtype=None, transform=None):
    t = make_inputs(n, d, r, dtype, bias=bias, residual=residual, weight_dtype=weight_dtype)
    if transform is not None:
        t = transform(t)
    seed = SEED if p > 0 else None
    before = {k: v.clone() for k, v in t.items() if v is not None}
    y, h, (dx, dwd, dbd, dwu, dbu) = run_kernels(t, activation, scale, p, seed)
    for k, v in before.items():
        assert torch.equal(t[k], v), f"the kernels modified their input {k}"
    y_ref, h_ref, (dx_ref, dwd_ref, dbd_ref, dwu_ref, dbu_ref) = run_oracle(t, activation, scale, p, seed, dtype)

    wdt = t["w_down"].dtype
    assert y.shape == (n, d) and y.dtype == dtype and y.is_contiguous()
    assert h.shape == (n, r) and h.dtype == torch.float32 and h.is_contiguous()
    assert dx.shape == (n, d) and dx.dtype == dtype
    assert dwd.shape == (r, d) and dwu.shape == (d, r) and dbd.shape == (r,) and dbu.shape == (d,)
    assert {dwd.dtype, dbd.dtype, dwu.dtype, dbu.dtype} == {wdt}
    tol = TOL[dtype]
    pairs = {"y": (y, y_ref), "h": (h, h_ref), "dx": (dx, dx_ref), "dw_down": (dwd, dwd_ref),
             "dw_up": (dwu, dwu_ref)}
    if bias:
        pairs.update(db_down=(dbd, dbd_ref), db_up=(dbu, dbu_ref))
    for name, (a, b) in pairs.items():
        assert_matches(name, a.cpu(), b, tol)
    return t, y


CASES = [
    # n, d, r, dtype, activation, options
    (37, 123, 5, torch.float32, "relu", {}),
    (19, 1, 3, torch.float32, "gelu", {}),
    (33, 431, 24, torch.float32, "gelu_tanh", dict(bias=False)),
    (24, 100, 100, torch.float32, "silu", dict(scale=0.25)),
    (17, 64, 256, torch.float32, "tanh", {}),
    (40, 123, 16, torch.float32, "sigmoid", dict(residual=True)),
    (21, 77, 7, torch.float32, "leaky_relu", dict(p=0.3, scale=2.0)),
    (29, 50, 9, torch.float32, "identity", dict(bias=False, residual=True, p=0.5)),
    (35, 90, 12, torch.float32, "quick_gelu", dict(scale=-0.5)),
    (200, 40, 2, torch.float32, "gelu", dict(p=0.1)),
    (37, 123, 5, torch.float16, "relu", {}),
    (26, 431, 100, torch.float16, "gelu", dict(residual=True, p=0.2)),
    (18, 64, 256, torch.float16, "silu", dict(bias=False)),
    (23, 1, 1, torch.float16, "tanh", {}),
    (31, 96, 33, torch.float16, "quick_gelu", dict(scale=0.5, p=0.25)),
]


@pytest.mark.parametrize("n,d,r,dtype,activation,options", CASES,
                         ids=[f"{c[0]}x{c[1]}-r{c[2]}-{str(c[3])[6:]}-{c[4]}" for c in CASES])
def test_matches_reference(n, d, r, dtype, activation, options):
    check_case(n, d, r, dtype, activation, **options)


def test_every_activation_is_covered():
    assert {c[4] for c in CASES} == set(ACTIVATIONS)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter computes bf16 tl.dot wrongly")
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_bf16_matches_reference(activation):
    check_case(45, 123, 24, torch.bfloat16, activation, p=0.1, residual=True)


def _strided(t, keys):
    """The same values as ``t[key]`` for each key, as non-contiguous views with strides that differ per key."""
    out = dict(t)
    for k, key in enumerate(keys):
        v = t[key]
        rows, cols = v.shape
        step = 2 + k % 2
        base = torch.empty((cols + 3 + k, step * rows), dtype=v.dtype, device=v.device)
        view = base.t()[::step, 1:cols + 1]
        view.copy_(v)
        assert not view.is_contiguous() and torch.equal(view, v)
        out[key] = view
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs(dtype):
    check_case(30, 70, 10, dtype, "gelu", residual=True, p=0.2,
               transform=lambda t: _strided(t, ["x", "residual", "grad", "w_down", "w_up"]))


def test_non_contiguous_x_as_residual():
    check_case(25, 45, 6, torch.float32, "silu", transform=lambda t: _strided(t, ["x", "grad"]))


def test_mixed_precision_fp32_weights_fp16_x():
    t, _ = check_case(27, 123, 20, torch.float16, "gelu", p=0.1, weight_dtype=torch.float32)
    assert t["w_down"].dtype == torch.float32


def test_dropout_mask_is_keep_mask():
    n, d, r, p = 40, 100, 8, 0.3
    t = make_inputs(n, d, r, torch.float32, residual=True)
    t["residual"].zero_()
    t["w_up"].zero_()
    t["b_up"].fill_(1.0)
    y, _ = kernels.forward(t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], "relu", 1.0, p, SEED, t["residual"])
    keep = dropout.keep_mask(SEED, p, n, d)
    assert torch.equal(y.cpu() != 0, keep)
    assert torch.equal(y.cpu()[keep], torch.full((int(keep.sum()),), 1.0 / (1.0 - p)))
    assert abs((~keep).float().mean().item() - p) < 0.03
    y_again, _ = kernels.forward(t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], "relu", 1.0, p, SEED,
                                 t["residual"])
    assert torch.equal(y, y_again)
    y_other, _ = kernels.forward(t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], "relu", 1.0, p, SEED + 1,
                                 t["residual"])
    assert not torch.equal(y, y_other)


def test_dropout_backward_uses_the_forward_mask():
    n, d, r, p = 20, 64, 8, 0.4
    t = make_inputs(n, d, r, torch.float32, residual=True)
    t["grad"].fill_(1.0)
    t["w_up"].zero_()
    _, h = kernels.forward(t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], "relu", 1.0, p, SEED, t["residual"])
    db_up = kernels.backward(t["grad"], t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], h, "relu", 1.0, p,
                             SEED, False)[4]
    keep = dropout.keep_mask(SEED, p, n, d)
    assert rel_err(db_up.cpu(), keep.double().sum(0) / (1.0 - p)) < 1e-6


# do_not_specialize as in the kernels: compiled Triton makes an int argument equal to 1 a constant
# (seed 1's low key word), which has no .to(); the interpreter does not (the GPU run of 2026-12-04 failed here).
@triton.jit(do_not_specialize=["key_lo", "key_hi", "threshold"])
def _keep_tile_kernel(rows_ptr, out_ptr, col0, key_lo, key_hi, threshold, BLOCK_M: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    rows = tl.load(rows_ptr + tl.arange(0, BLOCK_M))
    keep = philox.keep_mask(rows, col0, key_lo, key_hi, threshold, BLOCK_D)
    tl.store(out_ptr + tl.arange(0, BLOCK_M)[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :], keep.to(tl.int8))


def test_keep_tile_matches_reference_for_any_rows_and_column_tiles():
    """Gathered rows past 2**32 (the high counter word) and column tiles away from 0 give dropout.keep_rows."""
    rows = torch.tensor([0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 3 * 2**40 + 5], dtype=torch.int64)
    block_d, p = 16, 0.3
    out = torch.empty((rows.numel(), block_d), dtype=torch.int8, device=DEVICE)
    for seed in (0, 1, SEED, 2**62 - 1):
        key_lo, key_hi = philox.key_words(seed)
        threshold = philox.as_int32(dropout.threshold(p))
        for col0 in (0, 16, 48):
            _keep_tile_kernel[(1,)](rows.to(DEVICE), out, col0, key_lo, key_hi, threshold,
                                    BLOCK_M=rows.numel(), BLOCK_D=block_d)
            want = dropout.keep_rows(seed, p, rows, col0 + block_d)[:, col0:]
            assert torch.equal(out.cpu().bool(), want), (seed, col0)


def test_empty_batch():
    t = make_inputs(0, 12, 5, torch.float16)
    y, h, (dx, dwd, dbd, dwu, dbu) = run_kernels(t, "gelu", 1.0, 0.1, SEED)
    assert y.shape == (0, 12) and y.dtype == torch.float16
    assert h.shape == (0, 5) and h.dtype == torch.float32
    assert dx.shape == (0, 12) and dx.dtype == torch.float16
    for grad, weight in ((dwd, "w_down"), (dbd, "b_down"), (dwu, "w_up"), (dbu, "b_up")):
        assert grad.shape == t[weight].shape and grad.dtype == t[weight].dtype
        assert not grad.any()


def test_weight_gradients_are_deterministic():
    n, d, r = 130, 40, 1
    t = make_inputs(n, d, r, torch.float32)
    slices = config.row_slices(n, d, r, config.choose(d, r, torch.float32).backward_dxdw,
                               config.sm_count(torch.device(DEVICE)))
    assert slices > 1, "the test should exercise several fp32 partials"
    _, _, first = run_kernels(t, "gelu", 1.0, 0.1, SEED)
    _, _, second = run_kernels(t, "gelu", 1.0, 0.1, SEED)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_db_are_returned_without_biases():
    """Without biases the kernels still return db_down/db_up: the gradients zero biases would get."""
    t = make_inputs(10, 20, 3, torch.float32, bias=False)
    _, _, (_, _, dbd, _, dbu) = run_kernels(t, "gelu", 0.5, 0.0, None)
    zero_biases = dict(t, b_down=torch.zeros(3, device=t["x"].device), b_up=torch.zeros(20, device=t["x"].device))
    _, _, (_, _, dbd_ref, _, dbu_ref) = run_oracle(zero_biases, "gelu", 0.5, 0.0, None, torch.float32)
    assert dbd.shape == (3,) and dbu.shape == (20,)
    assert_matches("db_down", dbd.cpu(), dbd_ref, TOL[torch.float32])
    assert_matches("db_up", dbu.cpu(), dbu_ref, TOL[torch.float32])


def test_rank_over_256_raises():
    t = make_inputs(4, 16, 257, torch.float32)
    with pytest.raises(ValueError, match="r <= 256"):
        kernels.forward(t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], "relu", 1.0, 0.0, None, None)
    h = torch.zeros(4, 257, device=DEVICE)
    with pytest.raises(ValueError, match="r <= 256"):
        kernels.backward(t["grad"], t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], h, "relu", 1.0, 0.0,
                         None, True)


def test_unknown_activation_raises():
    t = make_inputs(4, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="activation"):
        kernels.forward(t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], "swish", 1.0, 0.0, None, None)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_nan_propagates_as_in_eager(activation):
    t = make_inputs(20, 30, 6, torch.float32)
    t["x"][3] = float("nan")
    t["x"][7, 11] = float("nan")
    t["grad"][12, 4] = float("nan")
    args = (t["w_down"], t["w_up"], t["b_down"], t["b_up"])
    y, h, grads = run_kernels(t, activation, 1.0, 0.2, SEED)
    y_ref, h_ref = reference.forward(t["x"].cpu(), *(a.cpu() for a in args), activation, 1.0, 0.2, SEED, None)
    grads_ref = reference.backward(t["grad"].cpu(), t["x"].cpu(), *(a.cpu() for a in args), h_ref, activation, 1.0,
                                   0.2, SEED, True)
    for got, want in zip((y, h, *grads), (y_ref, h_ref, *grads_ref)):
        got = got.cpu()
        assert torch.equal(got.isnan(), want.isnan())
        finite = ~want.isnan()
        assert rel_err(got[finite], want[finite]) < 1e-5


def _column_major(v):
    out = torch.empty(v.shape[::-1], dtype=v.dtype, device=v.device).t()
    out.copy_(v)
    return out


def _sliced(v):
    """Every other element of a larger buffer, starting at an offset: strides 2 (and 2 * cols)."""
    base = torch.empty(2 * v.numel() + 3, dtype=v.dtype, device=v.device)
    out = base[3:].as_strided(v.shape, tuple(2 * s for s in _contiguous_strides(v.shape)))
    out.copy_(v)
    return out


def _contiguous_strides(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _expanded(v):
    """A stride-0 view: row 0 (or element 0) repeated."""
    return v[:1].expand(v.shape) if v.dim() == 2 else v[:1].expand(v.shape)


LAYOUTS = {"contiguous": lambda v: v, "column_major": _column_major, "sliced": _sliced, "expanded": _expanded}
ARGUMENTS = ("x", "residual", "w_down", "w_up", "b_down", "b_up", "grad")


def _relayout(t, layouts):
    out = dict(t)
    for key, layout in layouts.items():
        if out[key] is not None and not (layout == "column_major" and out[key].dim() == 1):
            out[key] = LAYOUTS[layout](out[key])
    return out


def test_sliced_biases():
    """Biases read as if contiguous gave max |y - ref| = 5.8 with ``b[::2]`` views."""
    check_case(30, 70, 10, torch.float32, "gelu", p=0.2,
               transform=lambda t: _relayout(t, {"b_down": "sliced", "b_up": "sliced"}))


def test_transposed_grad_y():
    check_case(33, 90, 12, torch.float32, "silu", transform=lambda t: _relayout(t, {"grad": "column_major"}))


@pytest.mark.parametrize("case", range(6))
def test_every_argument_over_strides(case):
    """Each tensor argument in a random layout (column-major, sliced with an offset, expanded)."""
    g = torch.Generator().manual_seed(case)
    names = list(LAYOUTS)
    layouts = {key: names[int(torch.randint(len(names), (1,), generator=g))] for key in ARGUMENTS}
    dtype = (torch.float32, torch.float16)[case % 2]
    check_case(21 + case, 40 + 7 * case, 3 + 5 * case, dtype, ("relu", "tanh", "gelu")[case % 3],
               residual=case % 3 != 0, p=0.25 if case % 2 else 0.0,
               transform=lambda t: _relayout(t, layouts))


@pytest.mark.parametrize("residual", [False, True])
def test_need_dx_false_skips_dx_and_keeps_the_rest(residual):
    t = make_inputs(37, 90, 12, torch.float32, residual=residual)
    p = 0.2
    y, h = kernels.forward(t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], "gelu", 0.5, p, SEED, t["residual"])
    args = (t["grad"], t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], h, "gelu", 0.5, p, SEED,
            not residual)
    full = kernels.backward(*args)
    skipped = kernels.backward(*args, need_dx=False)
    assert full[0] is not None and skipped[0] is None
    for a, b in zip(full[1:], skipped[1:]):
        assert torch.equal(a, b)


@triton.jit
def _activation_kernel(h_ptr, out_ptr, grad_ptr, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    h = tl.load(h_ptr + offsets, mask=offsets < n, other=0.0)
    tl.store(out_ptr + offsets, activations.activate(h, ACTIVATION), mask=offsets < n)
    tl.store(grad_ptr + offsets, activations.activate_grad(h, ACTIVATION), mask=offsets < n)


@pytest.mark.parametrize("activation", ["tanh", "gelu_tanh"])
def test_tanh_is_accurate_near_zero_and_saturates(activation):
    """``1 - 2 / (exp(2h) + 1)`` had 4.7e-4 relative error at |h| = 1e-4; fp32 allows a few ulps."""
    mags = torch.logspace(-8, 1.5, 120, dtype=torch.float64)
    h64 = torch.cat([mags, -mags, torch.tensor([0.0, 0.5499, 0.55, 0.5501, 40.0, -40.0, 1e4], dtype=torch.float64)])
    h = h64.to(torch.float32)
    out = torch.empty_like(h, device=DEVICE)
    grad = torch.empty_like(out)
    _activation_kernel[(1,)](h.to(DEVICE), out, grad, h.numel(), ACTIVATION=activation, BLOCK=512)
    x = h.double().requires_grad_()
    want = reference.activate(x, activation)
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    err = (out.cpu().double() - want.detach()).abs()
    # gelu_tanh's own 1 + tanh cancels for h << 0 (as in eager fp32): relative error only where it does not
    judged = h64.abs() < 1 if activation == "gelu_tanh" else torch.ones_like(h64, dtype=torch.bool)
    rel = (err / want.detach().abs().clamp_min(1e-30))[judged].max().item()
    assert rel < 2e-6, rel
    assert err.max().item() < 1e-6
    assert (grad.cpu().double() - want_grad).abs().max().item() < 1e-6
    if activation == "tanh":
        assert torch.equal(out.cpu()[:120], -out.cpu()[120:240])
        assert out.cpu()[-3:].tolist() == [1.0, -1.0, 1.0]


def test_fp32_weights_are_rounded_once_exactly_like_16bit_weights():
    """fp32 weights with fp16 x give the bits of the same weights rounded to fp16 (cast once per call)."""
    t = make_inputs(29, 96, 12, torch.float16, weight_dtype=torch.float32)
    rounded = dict(t, w_down=t["w_down"].half(), w_up=t["w_up"].half())
    y32, h32, g32 = run_kernels(t, "gelu", 0.5, 0.2, SEED)
    y16, h16, g16 = run_kernels(rounded, "gelu", 0.5, 0.2, SEED)
    assert torch.equal(y32, y16) and torch.equal(h32, h16) and torch.equal(g32[0], g16[0])
    assert g32[1].dtype == torch.float32 and torch.equal(g32[1].half(), g16[1])
    assert torch.equal(g32[3].half(), g16[3])


@pytest.mark.parametrize("r", [1, 64, 65])
@pytest.mark.parametrize("residual", [False, True])
def test_dx_from_the_column_kernel_and_from_the_row_kernel(r, residual):
    """Up to r = 64 the dx/dw column kernel writes dx (at r = 1 over several row slices; ragged last
    block and column tile); from r = 65 the dh row kernel does: all match float64, with and without x
    as residual."""
    n, d = 150, 70
    assert config.dx_in_row_kernel(r) == (r > 64)
    cfg = config.choose(d, r, torch.float32).backward_dxdw
    assert config.row_slices(n, d, r, cfg, config.sm_count(torch.device(DEVICE))) > 1 or r > 1
    check_case(n, d, r, torch.float32, "silu", p=0.1, residual=residual)
