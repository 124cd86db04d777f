"""The fused C++ CPU backend (adapterfast.cpu) against the float64 reference.

Outputs and gradients are compared by relative error with the reference op computed in float64
from the same inputs (fp32 < 1e-5, bf16 < 1e-2); gradcheck runs float64 through the C++ forward
and backward; the dropout mask must equal adapterfast.dropout.keep_mask bit for bit; results must
be bitwise identical across thread counts and runs.
"""
import os
import subprocess
import sys

import pytest
import torch

import adapterfast
from adapterfast import cpu, dropout, reference
from adapterfast.activations import ACTIVATIONS

from helpers import adapter_inputs, assert_matches, rel_err

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU backend not built: {cpu.unavailable_reason()}")

GRAD_NAMES = ("dx", "dw_down", "db_down", "dw_up", "db_up")


class CpuAdapter(torch.autograd.Function):
    """The backend's forward/backward as an autograd function, for gradcheck and autograd tests."""

    @staticmethod
    def forward(ctx, x, wd, bd, wu, bu, residual, activation, scale, p, seed):
        y, h = cpu.forward(x, wd, wu, bd, bu, activation, scale, p, seed, residual)
        ctx.save_for_backward(x, wd, bd, wu, bu, h)
        ctx.args = (residual is None, activation, scale, p, seed)
        return y

    @staticmethod
    def backward(ctx, g):
        x, wd, bd, wu, bu, h = ctx.saved_tensors
        residual_is_x, activation, scale, p, seed = ctx.args
        dx, dwd, dbd, dwu, dbu = cpu.backward(g, x, wd, wu, bd, bu, h, activation, scale, p, seed, residual_is_x)
        d_res = None if residual_is_x else g
        return dx, dwd, dbd if bd is not None else None, dwu, dbu if bu is not None else None, d_res, None, None, None, None


def reference_grads(x, wd, wu, bd, bu, res, g, **kw):
    """y and the gradients (x, w_down, b_down, w_up, b_up) of the reference op, in float64."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, wd, bd, wu, bu)]
    x64, wd64, bd64, wu64, bu64 = leaves
    res64 = None if res is None else res.double()
    y = reference.adapter(x64, wd64, wu64, bd64, bu64, residual=res64, **kw)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, present, g.double()))
    return y, [next(grads) if t is not None else None for t in leaves]


def check_against_reference(x, wd, wu, bd, bu, res, *, tol, activation="relu", scale=1.0, p=0.0, seed=0):
    y, h = cpu.forward(x, wd, wu, bd, bu, activation, scale, p, seed, res)
    g = torch.randn_like(y)
    grads = cpu.backward(g, x, wd, wu, bd, bu, h, activation, scale, p, seed, res is None)
    y_ref, grads_ref = reference_grads(x, wd, wu, bd, bu, res, g, activation=activation, scale=scale,
                                       dropout_p=p, seed=seed)
    h_ref = reference.forward(x.double(), wd.double(), wu.double(), None if bd is None else bd.double(), None,
                              activation, scale, p, seed, None)[1]
    assert y.dtype == x.dtype and y.shape == x.shape
    assert h.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert_matches("y", y, y_ref, tol)
    assert_matches("h", h, h_ref, tol)
    for name, got, want, like in zip(GRAD_NAMES, grads, grads_ref, (x, wd, bd, wu, bu)):
        assert got.dtype == (x.dtype if name == "dx" else (wd if "down" in name else wu).dtype), name
        if want is not None:
            assert_matches(name, got, want, tol)


# (150, 768, 16) runs project_in's 16-row r <= 16 tiles; (150, 512, 16) and (70, 1536, 13), rows a
# multiple of 2 KiB apart, its 8-row ones (rows_share_l1_sets in block_kernels_avx512.cpp).
# (192, 256, 24) and (331, 96, 64) run the backward in blocks of 48 and 56 rows (backward_block_rows:
# two reduction groups of equal rows), the last block of the second partial.
@pytest.mark.parametrize("n,d,r", [(37, 1, 1), (64, 123, 5), (130, 431, 24), (65, 1000, 100), (9, 123, 300), (200, 64, 16),
                                   (150, 768, 16), (150, 512, 16), (70, 1536, 13), (192, 256, 24), (331, 96, 64)])
def test_fp32_matches_reference(n, d, r):
    x, wd, wu, bd, bu, _ = adapter_inputs(n, d, r)
    check_against_reference(x, wd, wu, bd, bu, None, tol=1e-5, scale=0.5)


@pytest.mark.parametrize("r", [16, 40, 64])
def test_fp32_every_row_count_up_to_two_tiles(r):
    """Row counts 1 to 33: full 16-, 8- and 6-row tiles and every tail (a partial tile of more than
    half its rows, or the 4-, 2- and 1-row tiles of kTailRows), in project_in, project_out and
    the weight gradients; d = 48 (16-row tiles), r from one to four column vectors."""
    for n in range(1, 34):
        x, wd, wu, bd, bu, _ = adapter_inputs(n, 48, r)
        check_against_reference(x, wd, wu, bd, bu, None, tol=1e-5, scale=0.5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.float64, 1e-12)],
                         ids=["fp32", "fp16", "fp64"])
def test_small_calls_read_the_weights_as_given(dtype, tol):
    """A call of up to 128 rows (kGivenForwardMaxRows, csrc/adapter_common.h) with weights in x's
    dtype reads them as given: h = x Wd^T as dot
    products from the [r, d] weight (project_nt), y from panels of Wu^T transposed as they are
    needed. d = 131 and r = 33 leave a partial run of 16 lanes, a partial tile of columns and,
    over 1 to 128 rows, 4-, 2- and 1-row tiles; a strided x, a separate residual and dropout take
    the other operands of the route. Every result matches the float64 reference, and a row's
    results do not depend on the rows called with it on the same route (calls of up to 4 rows at
    this r compute y by dot products instead: forward_out_by_dots), except on BLAS, whose
    products of a row depend on the call's other rows, as eager's do (_rows_depend_on_the_call)."""
    torch.manual_seed(3)
    d, r = 131, 33
    x, wd, wu, bd, bu = (t.to(dtype) for t in adapter_inputs(128, d, r)[:5])
    for n in (1, 2, 3, 5, 17, 64, 65, 100, 128):
        check_against_reference(x[:n], wd, wu, bd, bu, None, tol=tol, activation="gelu", scale=0.5)
    wide = torch.randn(40, 2 * d).to(dtype)
    check_against_reference(wide[:, ::2], wd, wu, bd, bu, torch.randn(40, d).to(dtype), tol=tol, p=0.3, seed=5)
    wide = torch.randn(100, 2 * d).to(dtype)
    check_against_reference(wide[:, ::2], wd, wu, bd, bu, torch.randn(100, d).to(dtype), tol=tol, p=0.3, seed=5)
    if _rows_depend_on_the_call(dtype):
        return
    y_all, h_all = cpu.forward(x, wd, wu, bd, bu, "gelu", 0.5, 0.0, 0, None)
    y_4, h_4 = cpu.forward(x[:4], wd, wu, bd, bu, "gelu", 0.5, 0.0, 0, None)
    for n, y_top, h_top in ((1, y_4, h_4), (3, y_4, h_4), (5, y_all, h_all), (7, y_all, h_all),
                            (33, y_all, h_all), (65, y_all, h_all), (127, y_all, h_all)):
        y, h = cpu.forward(x[:n], wd, wu, bd, bu, "gelu", 0.5, 0.0, 0, None)
        assert torch.equal(y, y_top[:n]) and torch.equal(h, h_top[:n])
    assert torch.equal(h_4, h_all[:4])


def _rows_depend_on_the_call(dtype: torch.dtype) -> bool:
    """Whether a row's results may differ in the last bits between calls with different rows: where
    BLAS runs the products (kernel_isa "blas", CPUs below AVX-512), sgemm picks its kernels by the
    call's shape, as in eager PyTorch (float64 runs on dgemm on every CPU). Results stay bitwise the
    same for any thread count there (test_bitwise_identical_across_threads_and_runs)."""
    return cpu.kernel_isa(dtype) == "blas"


@pytest.mark.parametrize("r, rows", [(33, 4), (64, 8)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)],
                         ids=["fp32", "bf16", "fp16"])
def test_calls_of_a_few_rows_compute_y_by_dot_products(dtype, tol, r, rows):
    """Up to 4 rows, and 8 at r >= 64 (forward_out_by_dots, csrc/adapter_common.h), y's columns are
    dot products along r with Wu's rows as given (project_out_nt) instead of products with
    transposed panels of Wu. d = 131 leaves a partial panel and a partial 16-column tile; r = 33 a
    partial vector per dot product; every row count up to the bound and one past it, with a
    separate residual, dropout and a strided x, with weights in x's dtype (read in it) and in fp32,
    match the float64 reference in both passes. gelu, not relu: fp32 weights are rounded to x's
    dtype as operands, which moves some h across 0, and a relu mask flipped there is an error the
    reference (the unrounded weights) does not model."""
    torch.manual_seed(11)
    d = 131
    x, wd, wu, bd, bu, _ = adapter_inputs(rows + 1, d, r)
    x = x.to(dtype)
    for weights in (lambda t: t.to(dtype), lambda t: t):
        w = [weights(t) for t in (wd, wu, bd, bu)]
        for n in range(1, rows + 2):
            check_against_reference(x[:n], *w, None, tol=tol, activation="gelu", scale=0.5)
            wide = torch.randn(n, 2 * d).to(dtype)
            check_against_reference(wide[:, ::2], *w, torch.randn(n, d).to(dtype), tol=tol, activation="gelu", p=0.3,
                                    seed=5)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)], ids=["fp32", "fp16"])
def test_large_weights_are_read_as_given_up_to_256_rows(dtype, tol):
    """Weights of 2^18 elements or more are read as given up to 256 rows (given_forward_max_rows,
    csrc/adapter_common.h): rows of a 200-row call are bitwise those of a 256-row call (255 in
    float16, which takes its split forward from 256 rows where the CPU has AMX-BF16), and match the
    float64 reference; a 257-row fp32 call takes the block route, which sums h in another order.
    On BLAS (below AVX-512) only the match is checked: there every call of up to 384 rows reads the
    weights as given, and a row's products depend on the call's other rows."""
    torch.manual_seed(6)
    d, r = 4096, 64
    top = 256 if dtype == torch.float32 else 255
    x, wd, wu, bd, bu = (t.to(dtype) for t in adapter_inputs(257, d, r)[:5])
    check_against_reference(x[:200], wd, wu, bd, bu, None, tol=tol, scale=0.5)
    if _rows_depend_on_the_call(dtype):
        return
    y_top, h_top = cpu.forward(x[:top], wd, wu, bd, bu, "relu", 0.5, 0.0, 0, None)
    y_200, h_200 = cpu.forward(x[:200], wd, wu, bd, bu, "relu", 0.5, 0.0, 0, None)
    assert torch.equal(y_200, y_top[:200]) and torch.equal(h_200, h_top[:200])
    if dtype == torch.float32:
        _, h_257 = cpu.forward(x, wd, wu, bd, bu, "relu", 0.5, 0.0, 0, None)
        assert not torch.equal(h_257[:top], h_top)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_each_activation(activation):
    x, wd, wu, bd, bu, _ = adapter_inputs(70, 123, 24)
    check_against_reference(x, wd, wu, bd, bu, None, tol=1e-5, activation=activation, scale=0.8)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("separate_residual", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_bias_residual_dropout(bias, separate_residual, p):
    x, wd, wu, bd, bu, res = adapter_inputs(100, 431, 24, bias=bias, residual=separate_residual)
    check_against_reference(x, wd, wu, bd, bu, res, tol=1e-5, activation="gelu", scale=2.0, p=p, seed=2**40 + 17)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_bf16(weight_dtype, p):
    x, wd, wu, bd, bu, res = adapter_inputs(130, 431, 24, residual=True)
    x, res = x.bfloat16(), res.bfloat16()
    wd, wu, bd, bu = (t.to(weight_dtype) for t in (wd, wu, bd, bu))
    check_against_reference(x, wd, wu, bd, bu, None, tol=1e-2, activation="gelu", p=p, seed=5)
    check_against_reference(x, wd, wu, bd, bu, res, tol=1e-2, activation="silu", scale=0.5)


def test_residual_dtype_differs_from_x():
    """The reference adds the residual in fp32 whatever its dtype; so do the kernels."""
    x, wd, wu, bd, bu, res = adapter_inputs(40, 100, 8, residual=True)
    check_against_reference(x.bfloat16(), wd, wu, bd, bu, res, tol=1e-2)
    check_against_reference(x, wd, wu, bd, bu, res.bfloat16(), tol=1e-5)
    check_against_reference(x, wd, wu, bd, bu, res.double(), tol=1e-5)


def test_bf16_relu_backward_against_reference_backward():
    """With relu, an h within bf16 rounding of 0 can flip act'(h) against a float64 h; given the same
    h, the backward must agree with the reference's backward in float64."""
    x, wd, wu, bd, bu, _ = adapter_inputs(257, 431, 24)
    x = x.bfloat16()
    y, h = cpu.forward(x, wd, wu, bd, bu, "relu", 1.0, 0.3, 11, None)
    g = torch.randn_like(y)
    grads = cpu.backward(g, x, wd, wu, bd, bu, h, "relu", 1.0, 0.3, 11, True)
    want = reference.backward(g.double(), x.double(), wd.double(), wu.double(), bd.double(), bu.double(), h.double(),
                              "relu", 1.0, 0.3, 11, True)
    for name, got, ref in zip(GRAD_NAMES, grads, want):
        assert rel_err(got, ref) < 1e-2, name


def test_float64_matches_reference():
    x, wd, wu, bd, bu, res = adapter_inputs(50, 123, 5, dtype=torch.float64, residual=True)
    check_against_reference(x, wd, wu, bd, bu, res, tol=1e-12, activation="tanh", scale=0.3, p=0.4, seed=9)


@pytest.mark.parametrize("r", [33, 64])
def test_float64_every_route(r):
    """float64 runs its products on PyTorch's dgemm wherever it is exported (kernel_isa "blas", on
    every CPU), else on the portable loops: calls of up to 384 rows read the weights as given
    (kBlasGivenForwardMaxRows), larger ones take blocks of 64 rows, or 128 from r = 64
    (blas_block_rows), and several reduction groups in the backward. A separate residual, dropout,
    fp32 weights (read in float64), a strided x and an expanded x (rows 0 elements apart, which BLAS
    cannot read as they are) take the other operands; every result matches the float64 reference."""
    torch.manual_seed(8)
    d = 131
    x, wd, wu, bd, bu, res = adapter_inputs(1500, d, r, dtype=torch.float64, residual=True)
    for n in (1, 5, 64, 384, 385, 1500):
        check_against_reference(x[:n], wd, wu, bd, bu, None, tol=1e-12, activation="gelu", scale=0.5)
    check_against_reference(x[:700], wd, wu, bd, bu, res[:700], tol=1e-12, activation="silu", p=0.3, seed=5)
    low = [t.float() for t in (wd, wu, bd, bu)]  # weight gradients come back in fp32: within its rounding
    check_against_reference(x[:500], *low, None, tol=1e-7, activation="gelu")
    wide = torch.randn(600, 2 * d, dtype=torch.float64)
    check_against_reference(wide[:, ::2], wd, wu, bd, bu, res[:600], tol=1e-12, p=0.3, seed=5)
    for n in (40, 400):
        check_against_reference(torch.randn(1, d, dtype=torch.float64).expand(n, d), wd, wu, bd, bu, None,
                                tol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("separate_residual", [False, True])
def test_gradcheck_float64(activation, separate_residual):
    x, wd, wu, bd, bu, res = adapter_inputs(6, 7, 3, dtype=torch.float64, residual=separate_residual)
    inputs = [t.requires_grad_() for t in (x, wd, bd, wu, bu) + ((res,) if separate_residual else ())]

    def f(x, wd, bd, wu, bu, res=None):
        return CpuAdapter.apply(x, wd, bd, wu, bu, res, activation, 0.7, 0.25, 1234)

    assert torch.autograd.gradcheck(f, inputs)


def test_gradcheck_through_fused_adapter():
    x, wd, wu, bd, bu, _ = adapter_inputs(2 * 3, 7, 3, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x.view(2, 3, 7), wd, wu, bd, bu)]
    with adapterfast.use_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda *a: adapterfast.fused_adapter(*a, activation="silu", scale=1.5), inputs)


def test_non_contiguous_inputs():
    n, d, r = 90, 123, 5
    x, wd, wu, bd, bu, res = adapter_inputs(n, d, r, residual=True)
    x_t = x.t().contiguous().t()                                     # column stride n
    x_cols = torch.randn(n, 2 * d)[:, ::2].copy_(x)                   # column stride 2
    x_rows = torch.randn(n, d + 7)[:, :d].copy_(x)                    # row stride d + 7
    wd_t = wd.t().contiguous().t()
    wu_t = wu.t().contiguous().t()
    bu_s = torch.randn(2 * d)[::2].copy_(bu)
    res_t = res.t().contiguous().t()
    for xi in (x_t, x_cols, x_rows):
        check_against_reference(xi, wd_t, wu_t, bd, bu_s, None, tol=1e-5, p=0.1, seed=3)
        check_against_reference(xi, wd, wu, bd, bu, res_t, tol=1e-5)
    y, h = cpu.forward(x, wd, wu, bd, bu, "relu", 1.0, 0.0, 0, None)
    g = torch.randn(d, n).t()
    expected = cpu.backward(g.contiguous(), x, wd, wu, bd, bu, h, "relu", 1.0, 0.0, 0, True)
    for got, want in zip(cpu.backward(g, x_t, wd, wu, bd, bu, h.t().contiguous().t(), "relu", 1.0, 0.0, 0, True),
                                      expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_past_the_streaming_threshold(dtype):
    """Outputs of 16 MiB (past both of stream_output's sizes) are written with non-temporal stores
    (full, line-aligned tiles) and plain stores (the ragged last tile of each row, here d = 1000)."""
    for d in (1024, 1000):
        n = (16 << 20) // (d * (4 if dtype == torch.float32 else 2)) + 3
        x, wd, wu, bd, bu, _ = adapter_inputs(n, d, 8)
        check_against_reference(x.to(dtype), wd, wu, bd, bu, None, tol=1e-5 if dtype == torch.float32 else 1e-2,
                                activation="silu", scale=0.5)


def test_bf16_bf16_non_contiguous():
    x, wd, wu, bd, bu, _ = adapter_inputs(40, 100, 8)
    x = x.bfloat16().t().contiguous().t()
    check_against_reference(x, wd.bfloat16(), wu.bfloat16(), bd, bu, None, tol=1e-2, activation="gelu")


def test_empty_batch():
    x, wd, wu, bd, bu, _ = adapter_inputs(0, 64, 8)
    y, h = cpu.forward(x, wd, wu, bd, bu, "relu", 1.0, 0.1, 1, None)
    assert y.shape == (0, 64) and h.shape == (0, 8)
    grads = cpu.backward(torch.empty(0, 64), x, wd, wu, bd, bu, h, "relu", 1.0, 0.1, 1, True)
    for got, like in zip(grads, (x, wd, bd, wu, bu)):
        assert got.shape == like.shape and not got.any()


@pytest.mark.parametrize("p,seed", [(0.1, 0), (0.5, 123456789), (0.9, 2**33 + 5)])
def test_dropout_mask_is_bit_exact(p, seed):
    """With w_up = 0, b_up = 1 and scale = 1 - p, y = keep exactly; db_up sums the same mask."""
    n, d, r = 77, 300, 4
    x, wd, _, bd, _, _ = adapter_inputs(n, d, r)
    wu, bu = torch.zeros(d, r), torch.ones(d)
    y, h = cpu.forward(x, wd, wu, bd, bu, "relu", 1.0 - p, p, seed, torch.zeros(n, d))
    keep = dropout.keep_mask(seed, p, n, d)
    assert torch.equal(y, keep.float())
    g = torch.ones(n, d)
    db_up = cpu.backward(g, x, wd, wu, bd, bu, h, "relu", 1.0 - p, p, seed, False)[4]
    assert torch.equal(db_up, keep.sum(0).float())


def test_mixed_precision_dtypes():
    x, wd, wu, bd, bu, _ = adapter_inputs(33, 64, 8)
    y, h = cpu.forward(x.bfloat16(), wd, wu, bd, bu, "relu", 1.0, 0.0, 0, None)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    grads = cpu.backward(torch.randn_like(y), x.bfloat16(), wd, wu, bd, bu, h, "relu", 1.0, 0.0, 0, True)
    assert [t.dtype for t in grads] == [torch.bfloat16] + [torch.float32] * 4


def _run_all(x, wd, wu, bd, bu, g, **kw):
    y, h = cpu.forward(x, wd, wu, bd, bu, kw["activation"], 0.9, kw["p"], 77, None)
    return (y, h) + tuple(cpu.backward(g, x, wd, wu, bd, bu, h, kw["activation"], 0.9, kw["p"], 77, True))


# 320 rows: forward blocks of 64 rows on one thread, of 32 or 40 on two (forward_block_rows), and
# backward blocks of 56 rows on the block kernels (backward_block_rows); r = 64 takes float16's
# split forward where the CPU has AMX-BF16. 192 rows: backward blocks of 48. 48 rows: the small-call routes
# (forward_given, backward_by_columns: two blocks) spread over the threads by columns. 100 rows:
# forward_given (kGivenForwardMaxRows) with backward_by_columns at r = 64 (takes_backward_by_columns)
# and the block backward at r = 24, two blocks of 50 rows each.
@pytest.mark.parametrize("n, r", [(3000, 24), (1024, 24), (320, 64), (192, 24), (48, 64), (100, 64), (100, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_bitwise_identical_across_threads_and_runs(dtype, n, r):
    x, wd, wu, bd, bu, _ = adapter_inputs(n, 200, r)
    x, g = x.to(dtype), torch.randn(n, 200).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_all(x, wd, wu, bd, bu, g, activation="gelu", p=0.2)
        torch.set_num_threads(max(2, threads))
        many = _run_all(x, wd, wu, bd, bu, g, activation="gelu", p=0.2)
        again = _run_all(x, wd, wu, bd, bu, g, activation="gelu", p=0.2)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(one, many, again):
        assert torch.equal(a, b) and torch.equal(b, c)


@pytest.mark.parametrize("activation", ["relu", "gelu", "leaky_relu"])
def test_nan_propagates_like_eager(activation):
    x, wd, wu, bd, bu, _ = adapter_inputs(40, 50, 6)
    x[3, 7] = float("nan")
    g = torch.randn(40, 50)
    g[11, 2] = float("nan")
    y, h = cpu.forward(x, wd, wu, bd, bu, activation, 1.0, 0.5, 4, None)
    grads = cpu.backward(g, x, wd, wu, bd, bu, h, activation, 1.0, 0.5, 4, True)
    y_ref, h_ref = reference.forward(x, wd, wu, bd, bu, activation, 1.0, 0.5, 4, None)
    grads_ref = reference.backward(g, x, wd, wu, bd, bu, h_ref, activation, 1.0, 0.5, 4, True)
    assert torch.isnan(y[3]).all()
    for got, want in zip((y, h) + tuple(grads), (y_ref, h_ref) + tuple(grads_ref)):
        assert torch.equal(torch.isnan(got), torch.isnan(want))


def test_clear_errors():
    x, wd, wu, bd, bu, _ = adapter_inputs(4, 8, 2)
    with pytest.raises(TypeError, match="int32"):
        cpu.forward(x.int(), wd, wu, bd, bu, "relu", 1.0, 0.0, 0, None)
    with pytest.raises(ValueError, match="w_up"):
        cpu.forward(x, wd, wu.t(), bd, bu, "relu", 1.0, 0.0, 0, None)
    with pytest.raises(ValueError, match="dropout_p"):
        cpu.forward(x, wd, wu, bd, bu, "relu", 1.0, 1.0, 0, None)
    with pytest.raises(ValueError, match="activation"):
        cpu.forward(x, wd, wu, bd, bu, "swishy", 1.0, 0.0, 0, None)
    with pytest.raises(ValueError, match="residual"):
        cpu.forward(x, wd, wu, bd, bu, "relu", 1.0, 0.0, 0, x[:2])


_BELOW_AVX512_CHECK = """
import sys, torch
from adapterfast import cpu, reference
assert {cpu.kernel_isa(t) for t in (torch.float32, torch.bfloat16, torch.float16)} == {sys.argv[1]}
torch.manual_seed(0)
for dtype, n, expanded in ((torch.float32, 70, False), (torch.bfloat16, 70, False), (torch.float16, 70, False),
                          (torch.float32, 40, False), (torch.float16, 40, False), (torch.float32, 3, False),
                          (torch.bfloat16, 2, False), (torch.float32, 385, False), (torch.bfloat16, 400, False),
                          (torch.float16, 300, False), (torch.float32, 40, True), (torch.float32, 200, True),
                          (torch.float32, 400, True), (torch.float32, 4100, False), (torch.float16, 8200, False)):
    # expanded: every row of x is the same memory (row stride 0), which BLAS cannot read as it is
    x = torch.randn(1, 131).expand(n, 131) if expanded else torch.randn(n, 131).to(dtype)
    wd, wu, bd, bu = torch.randn(9, 131) / 11, torch.randn(131, 9) / 3, torch.randn(9), torch.randn(131)
    if n <= 64:  # weights in x's dtype: read as given (project_nt; y by project_out_nt up to 4 rows)
        wd, wu, bd, bu = (t.to(dtype) for t in (wd, wu, bd, bu))
    y, h = cpu.forward(x, wd, wu, bd, bu, "gelu", 0.5, 0.3, 8, None)
    g = torch.randn_like(y)
    got = (y, h) + tuple(cpu.backward(g, x, wd, wu, bd, bu, h, "gelu", 0.5, 0.3, 8, True))
    d = lambda t: None if t is None else t.double()
    y64, h64 = reference.forward(d(x), d(wd), d(wu), d(bd), d(bu), "gelu", 0.5, 0.3, 8, None)
    want = (y64, h64) + tuple(reference.backward(d(g), d(x), d(wd), d(wu), d(bd), d(bu), h.double(), "gelu", 0.5,
                                                 0.3, 8, True))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(got, want):
        assert ((a.double() - b).norm() / b.norm()).item() < tol
print("ok")
"""


@pytest.mark.parametrize("kernels, switches", [("blas", {}), ("generic", {"ADAPTERFAST_CPU_BLAS": "0"})])
def test_kernels_below_avx512_in_a_subprocess(kernels, switches):
    """ATEN_CPU_CAPABILITY=avx2 makes any x86 CPU one below AVX-512: the float kernels are then the
    BLAS ones, or with ADAPTERFAST_CPU_BLAS=0 the portable loops, and both must agree as well (at 40
    rows with weights in x's dtype, on the route that reads them as given; up to 384 rows on BLAS,
    and in blocks past it), an expanded x (rows 0 elements apart) among them, and a dx of over
    2 MiB (4100 and 8200 rows), written with non-temporal stores from rows that start off any
    32-byte boundary (d = 131)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", **switches)
    done = subprocess.run([sys.executable, "-c", _BELOW_AVX512_CHECK, kernels], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


_AVX2_KERNELS_CHECK = """
import torch
from adapterfast import cpu, reference
assert cpu.kernel_isa(torch.float32) == "blas"
torch.manual_seed(0)
# n: every row-tile tail (6-row tiles, then 4, 2 and 1); d: partial 16-column tiles (131, 24), whole
# ones (16, 136), rows 4 KiB apart (1024); outputs past 2 MiB (training) and 6 MiB (inference) with
# rows on 32-byte boundaries: non-temporal stores. residual: x itself, or a separate tensor.
# project_in on AVX2 tiles (r <= 32) in the forward's blocks (from 385 rows) and the backward: 12-row
# tiles of one vector (r <= 8) and 6-row ones of two, with every tail, and r = 64 on sgemm. Past 256 KiB
# of B (d x r floats) it walks d in chunks of whole 64-product runs, the last one short (d = 2113,
# r = 32: chunks of 512; d = 2801, r = 24: of 640, in the forward of up to 384 rows and in blocks).
for n, d, r, separate in ((1, 16, 3, False), (5, 24, 9, True), (11, 131, 9, False), (13, 8, 1, True),
                          (70, 40, 16, False), (385, 136, 64, True), (4100, 136, 9, False), (1537, 1024, 16, True),
                          (389, 40, 3, False), (397, 131, 32, True), (459, 72, 24, False), (401, 64, 8, True),
                          (23, 2113, 32, False), (391, 2801, 24, True), (3, 2113, 32, True), (7, 4100, 24, False)):
    x = torch.randn(n, d)
    wd, wu, bd, bu = torch.randn(r, d) / d ** 0.5, torch.randn(d, r) / r ** 0.5, torch.randn(r), torch.randn(d)
    res = torch.randn(n, d) if separate else None
    for p in (0.0, 0.3):
        y, h = cpu.forward(x, wd, wu, bd, bu, "gelu", 0.5, p, 8, res)
        g = torch.randn_like(y)
        got = (y, h) + tuple(cpu.backward(g, x, wd, wu, bd, bu, h, "gelu", 0.5, p, 8, not separate))
        d64 = lambda t: None if t is None else t.double()
        y64, h64 = reference.forward(d64(x), d64(wd), d64(wu), d64(bd), d64(bu), "gelu", 0.5, p, 8, d64(res))
        want = (y64, h64) + tuple(reference.backward(d64(g), d64(x), d64(wd), d64(wu), d64(bd), d64(bu), h.double(),
                                                     "gelu", 0.5, p, 8, not separate))
        for a, b in zip(got, want):
            assert ((a.double() - b).norm() / b.norm()).item() < 1e-5, (n, d, r, separate, p)
# A row's h and y are the same bits whatever the call's other rows up to r = 32, in calls of 8 rows or
# more (the forward of up to 384 rows splits x Wd^T over the threads by rows, in ranges of 8 or more);
# calls of fewer rows take dot products along Wd's rows for h, the same bits for a row whatever the
# call's other rows among them (and for y, at one row or up to r / 16, along Wu's).
for d, r in ((131, 9), (1024, 32), (2113, 32)):
    x, wd, wu = torch.randn(70, d), torch.randn(r, d) / d ** 0.5, torch.randn(d, r) / r ** 0.5
    y, h = cpu.forward(x, wd, wu, None, None, "relu", 1.0, 0.0, 0, None)
    for i0, i1 in ((3, 11), (20, 28), (40, 70)):
        y_part, h_part = cpu.forward(x[i0:i1], wd, wu, None, None, "relu", 1.0, 0.0, 0, None)
        assert torch.equal(h_part, h[i0:i1]) and torch.equal(y_part, y[i0:i1]), (d, r, i0, i1)
    y_few, h_few = cpu.forward(x[:7], wd, wu, None, None, "relu", 1.0, 0.0, 0, None)
    for i0, i1 in ((0, 1), (2, 5), (6, 7)):
        y_part, h_part = cpu.forward(x[i0:i1], wd, wu, None, None, "relu", 1.0, 0.0, 0, None)
        assert torch.equal(h_part, h_few[i0:i1]), (d, r, i0, i1)
# Bitwise the same for any thread count: in blocks (1537 rows), and split by rows (241 rows: on 16
# threads at::parallel_for's own ranges would leave the last one a single row).
for n, d, r in ((1537, 1024, 16), (241, 131, 9)):
    x, wd, wu = torch.randn(n, d), torch.randn(r, d) / d ** 0.5, torch.randn(d, r) / r ** 0.5
    runs = []
    for threads in (1, 2, 16, 1):
        torch.set_num_threads(threads)
        y, h = cpu.forward(x, wd, wu, None, None, "relu", 1.0, 0.0, 0, None)
        runs.append((y, h, cpu.backward(torch.ones_like(y), x, wd, wu, None, None, h, "relu", 1.0, 0.0, 0, True)[0]))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0])), (n, d, r)
print("ok")
"""


def test_avx2_kernels_in_a_subprocess():
    """Below AVX-512 float's project_out runs on AVX2 register tiles with the epilogue in the registers,
    and its project_in and project_nt up to r = 32 (csrc/block_kernels_avx2.cpp): against float64 eager
    with every row-tile tail, partial column tiles, dropout, a separate residual and streamed outputs,
    in training and inference; a row's results the same bits in calls of other rows (of 8 rows or
    more, and among calls of fewer, which take dot products); and bitwise the same for 1, 2 and 16
    threads. In a subprocess with ATEN_CPU_CAPABILITY=avx2, so it runs on AVX-512
    CPUs too."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    done = subprocess.run([sys.executable, "-c", _AVX2_KERNELS_CHECK], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def _forward_output(n, d, r=16):
    torch.manual_seed(0)
    x, wd, wu, bd, bu, _ = adapter_inputs(n, d, r)
    y, _ = cpu.forward(x, wd, wu, bd, bu, "relu", 1.0, 0.0, 0, None)
    return y, (x, wd, wu, bd, bu)


def test_released_output_buffer_is_reused_and_correct():
    """An output of 256 KiB or more released by its tensor is handed to the next output of that
    size (no fresh pages to fault in), and the reused buffer's old contents never leak into it."""
    y, _ = _forward_output(512, 384)
    first = y.data_ptr()
    y.fill_(float("nan"))
    del y
    y, (x, wd, wu, bd, bu) = _forward_output(512, 384)
    assert y.data_ptr() == first
    want, _ = reference.forward(x.double(), wd.double(), wu.double(), bd.double(), bu.double(), "relu", 1.0, 0.0, 0, None)
    assert torch.isfinite(y).all()
    assert rel_err(y, want) < 1e-5
    # A buffer still owned by a live tensor is never handed out twice.
    other, _ = _forward_output(512, 384)
    assert other.data_ptr() != y.data_ptr()


def test_output_buffers_are_reported_to_the_profiler():
    """The memory profiler (what benchmarks.memory reads) sees each output handed out from the cache
    as an allocation and its release as a free."""
    from benchmarks.memory import cpu_peak

    _forward_output(512, 384)  # leaves a released buffer of y's size in the cache
    y_bytes = 512 * 384 * 4
    measured = cpu_peak(lambda: _forward_output(512, 384)[0].sum())  # y released inside
    assert measured["peak_bytes"] >= y_bytes
    assert measured["retained_bytes"] < y_bytes


def test_output_cache_can_be_turned_off():
    """ADAPTERFAST_CPU_OUTPUT_CACHE=0 returns a released 40 MiB output to the system at once (the
    resident set shrinks); by default the cache keeps it. Results are the same either way."""
    code = """
import os, torch
from adapterfast import cpu
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
torch.manual_seed(0)
x = torch.randn(16384, 640); wd = torch.randn(16, 640) / 25; wu = torch.randn(640, 16) / 4
y, _ = cpu.forward(x, wd, wu, None, None, "relu", 1.0, 0.0, 0, None)
want = x.double() + torch.relu(x.double() @ wd.double().t()) @ wu.double().t()
err = ((y.double() - want).norm() / want.norm()).item()
before = rss()
del y
print("freed" if before - rss() > 30 * 2**20 else "kept", err < 1e-5)
"""
    results = {}
    for setting in ("0", "1"):
        env = dict(os.environ, ADAPTERFAST_CPU_OUTPUT_CACHE=setting)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        results[setting] = done.stdout.split()
    assert results["0"] == ["freed", "True"]
    assert results["1"] == ["kept", "True"]
