"""The grouped op (``grouped_adapter``) against a loop over single adapters in float64, on every backend."""
from __future__ import annotations

import pytest
import torch

import adapterfast
from adapterfast import dropout as dropout_rng
from adapterfast import grouped_adapter, reference, use_backend
from adapterfast.dispatch import backends
from helpers import backend_params, rel_err

AVAILABLE = [name for name, info in backends().items() if info.available]
# Triton runs in its CPU interpreter here: small shapes, fp32 and fp16 (it has no float64).
DTYPES = {"reference": (torch.float64, torch.float32), "cpu": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
          "triton": (torch.float32, torch.float16)}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def bank_inputs(n, d, r, adapters, *, dtype, bias=True, residual=False):
    g = dict(dtype=dtype)
    x = torch.randn(n, d, **g)
    wd = torch.randn(adapters, r, d, **g) / d**0.5
    wu = torch.randn(adapters, d, r, **g) / r**0.5
    bd = torch.randn(adapters, r, **g) * 0.1 if bias else None
    bu = torch.randn(adapters, d, **g) * 0.1 if bias else None
    res = torch.randn(n, d, **g) if residual else None
    return x, wd, wu, bd, bu, res


def loop_oracle(x, index, wd, wu, bd, bu, res, scales, activation, p, seed):
    """The grouped op as a loop of single-adapter reference calls over row subsets, in float64 autograd.

    Each subset's branch is the single adapter's ``reference.adapter`` on a zero residual; the
    dropout mask is ``fused_adapter``'s for the whole ``[N, d]`` batch, indexed by original row."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, wd, wu, bd, bu, res)]
    x64, wd64, wu64, bd64, bu64, res64 = leaves
    n, d = x.shape
    mask = dropout_rng.keep_mask(seed, p, n, d).double() / (1 - p) if p > 0 else torch.ones(n, d, dtype=torch.float64)
    y = (x64 if res64 is None else res64) * 1.0
    for a in range(wd.shape[0]):
        rows = torch.nonzero(index == a).flatten()
        if rows.numel() == 0:
            continue
        xa = x64[rows]
        branch = reference.adapter(xa, wd64[a], wu64[a], None if bd64 is None else bd64[a],
                                   None if bu64 is None else bu64[a], activation=activation,
                                   residual=torch.zeros_like(xa))
        y = y.index_add(0, rows, float(scales[a]) * mask[rows] * branch)
    return y, leaves


def run_case(backend, dtype, n, d, r, adapters, index, *, bias=True, residual=False, activation="gelu", p=0.0,
             scales=None):
    x, wd, wu, bd, bu, res = bank_inputs(n, d, r, adapters, dtype=dtype, bias=bias, residual=residual)
    scales = scales if scales is not None else [0.5 + a / adapters for a in range(adapters)]
    params = [t.detach().clone().requires_grad_() for t in (x, wd, wu) + ((bd, bu) if bias else ())]
    xg = params[0]
    torch.manual_seed(123)
    with use_backend(backend):
        y = grouped_adapter(xg, index, params[1], params[2], *(params[3:] if bias else ()), activation=activation,
                            scale=scales, dropout=p, residual=None if res is None else res)
    seed = None
    if p > 0:
        torch.manual_seed(123)
        seed = int(dropout_rng.new_seed())
    want, leaves = loop_oracle(x, index, wd, wu, bd, bu, res, scales, activation, p, seed)
    grad = torch.randn(n, d, dtype=dtype)
    with use_backend(backend):
        y.backward(grad)
    want.backward(grad.double())
    tol = TOL[dtype]
    assert y.dtype == dtype and y.shape == (n, d)
    assert rel_err(y, want) < tol, ("y", rel_err(y, want))
    names = ("x", "down_weight", "up_weight", "down_bias", "up_bias")
    for name, got, leaf in zip(names, params, leaves):
        ref = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        assert got.grad is not None and got.grad.dtype == got.dtype, name
        assert torch.isfinite(got.grad).all(), name
        if ref.norm() == 0:
            assert got.grad.abs().max() == 0, name
        else:
            assert rel_err(got.grad, ref) < tol * 4, (name, rel_err(got.grad, ref))
    for a in range(adapters):
        if not (index == a).any():
            for t in params[1:]:
                assert t.grad[a].abs().max() == 0, f"unused adapter {a} got a gradient"
    return y


CASES = {
    "random": lambda n, A: torch.randint(-1, A, (n,)),
    "empty_groups": lambda n, A: torch.tensor([0, 2])[torch.randint(0, 2, (n,))],
    "all_one_adapter": lambda n, A: torch.full((n,), A - 1),
    "no_adapter_rows": lambda n, A: torch.where(torch.rand(n) < 0.5, -1, torch.randint(0, A, (n,))),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_loop(backend, case):
    n, d, r, adapters = (70, 37, 5, 4) if backend == "triton" else (150, 123, 5, 4)
    for dtype in DTYPES[backend]:
        run_case(backend, dtype, n, d, r, adapters, CASES[case](n, adapters))


@pytest.mark.parametrize("backend", backend_params())
def test_one_row_per_adapter_and_no_bias(backend):
    adapters = 6
    index = torch.randperm(adapters)
    for dtype in DTYPES[backend]:
        run_case(backend, dtype, adapters, 33, 3, adapters, index, bias=False, activation="relu")


@pytest.mark.parametrize("backend", backend_params())
def test_dropout_and_residual(backend):
    n, d, r, adapters = (70, 37, 5, 3) if backend == "triton" else (130, 67, 6, 3)
    index = torch.randint(-1, adapters, (n,))
    for dtype in DTYPES[backend]:
        run_case(backend, dtype, n, d, r, adapters, index, p=0.25, residual=True, activation="silu")


@pytest.mark.parametrize("backend", backend_params())
def test_single_adapter_bank_is_fused_adapter(backend):
    """With one adapter and every row on it, the grouped op is fused_adapter, dropout mask included."""
    dtype = torch.float32
    x, wd, wu, bd, bu, _ = bank_inputs(64, 40, 8, 1, dtype=dtype)
    with use_backend(backend):
        torch.manual_seed(7)
        got = grouped_adapter(x, torch.zeros(64, dtype=torch.long), wd, wu, bd, bu, scale=0.7, dropout=0.3)
        torch.manual_seed(7)
        want = adapterfast.fused_adapter(x, wd[0], wu[0], bd[0], bu[0], scale=0.7, dropout=0.3)
    assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("backend", backend_params())
def test_all_rows_without_adapter_and_empty_batch(backend):
    x, wd, wu, bd, bu, res = bank_inputs(9, 16, 4, 2, dtype=torch.float32, residual=True)
    with use_backend(backend):
        y = grouped_adapter(x, torch.full((9,), -1), wd, wu, bd, bu, residual=res)
        assert torch.equal(y, res)
        empty = grouped_adapter(x[:0].requires_grad_(), torch.zeros(0, dtype=torch.long), wd, wu)
        assert empty.shape == (0, 16)


def test_leading_dims_and_int32_index():
    x, wd, wu, bd, bu, _ = bank_inputs(24, 10, 4, 3, dtype=torch.float64)
    index = torch.randint(-1, 3, (24,))
    flat = grouped_adapter(x, index, wd, wu, bd, bu)
    shaped = grouped_adapter(x.view(2, 3, 4, 10), index.view(2, 3, 4).int(), wd, wu, bd, bu)
    assert torch.allclose(shaped.view(24, 10), flat, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", backend_params())
def test_index_out_of_range_is_a_value_error(backend):
    x, wd, wu, _, _, _ = bank_inputs(5, 8, 2, 2, dtype=torch.float32)
    with use_backend(backend), pytest.raises(ValueError, match="adapter_index"):
        grouped_adapter(x, torch.tensor([0, 1, 2, 0, 0]), wd, wu)


def test_bad_inputs_name_what_is_wrong():
    x, wd, wu, bd, bu, _ = bank_inputs(5, 8, 2, 2, dtype=torch.float32)
    index = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="up_weight"):
        grouped_adapter(x, index, wd, wu[:, :, :1])
    with pytest.raises(ValueError, match="down_weight"):
        grouped_adapter(x, index, wd[0], wu)
    with pytest.raises(TypeError, match="adapter_index"):
        grouped_adapter(x, index.float(), wd, wu)
    with pytest.raises(ValueError, match="adapter_index"):
        grouped_adapter(x, index[:4], wd, wu)
    with pytest.raises(ValueError, match="down_bias"):
        grouped_adapter(x, index, wd, wu, bd[:, :1], bu)
    with pytest.raises(ValueError, match="scale"):
        grouped_adapter(x, index, wd, wu, scale=[1.0, 2.0, 3.0])


@pytest.mark.parametrize("backend", backend_params(("cpu", "reference")))
def test_gradcheck_float64(backend):
    x, wd, wu, bd, bu, _ = bank_inputs(12, 7, 3, 3, dtype=torch.float64)
    index = torch.tensor([0, 2, -1, 2, 2, 0, -1, 0, 2, 2, 0, 0])
    inputs = [t.requires_grad_() for t in (x, wd, wu, bd, bu)]
    with use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *t: grouped_adapter(t[0], index, *t[1:], activation="tanh", scale=[0.5, 1.0, 2.0]),
            inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_are_bitwise_reproducible_on_cpu(dtype):
    """y, dx and the weight gradients of the C++ grouped op are bitwise the same on one thread and
    on two (float64 runs its products on dgemm, whose results for a row or column may depend on
    the shape of the call that computes it)."""
    if "cpu" not in AVAILABLE:
        pytest.skip("C++ backend not built")
    x, wd, wu, bd, bu, _ = bank_inputs(3000, 64, 8, 3, dtype=dtype)
    index = torch.randint(-1, 3, (3000,))
    results = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            leaves = [t.clone().requires_grad_() for t in (x, wd, wu)]
            with use_backend("cpu"):
                y = grouped_adapter(leaves[0], index, *leaves[1:], bd, bu)
                y.sum().backward()
            results.append([y.detach()] + [t.grad for t in leaves])
        finally:
            torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_autocast_runs_the_branch_in_the_autocast_dtype_and_keeps_the_residual():
    x, wd, wu, bd, bu, _ = bank_inputs(40, 24, 4, 3, dtype=torch.float32)
    index = torch.randint(-1, 3, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_adapter(x, index, wd, wu, bd, bu, scale=[0.5, 1.0, 2.0])
    assert y.dtype == torch.float32
    want, _ = loop_oracle(x, index, wd, wu, bd, bu, None, [0.5, 1.0, 2.0], "relu", 0.0, None)
    assert rel_err(y, want) < 2e-2
    plain = index < 0
    assert torch.equal(y[plain], x[plain])


def test_cpu_many_blocks_per_adapter():
    """Adapters with several 64-row blocks (and, in the bf16 backward, more rows than one 256-row
    weight-gradient run), odd d and r: the block loops and the run flushes of the C++ drivers."""
    if "cpu" not in AVAILABLE:
        pytest.skip("C++ backend not built")
    n, d, r, adapters = 700, 67, 6, 2
    index = torch.where(torch.rand(n) < 0.1, -1, torch.randint(0, adapters, (n,)))
    for dtype in (torch.float32, torch.bfloat16):
        run_case("cpu", dtype, n, d, r, adapters, index)
        run_case("cpu", dtype, n, d, r, adapters, index, p=0.2, residual=True, activation="relu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_last_partial_block_of_an_adapter(dtype):
    """Adapters of 4 full 64-row blocks plus a short one (odd), of 5 full blocks, and of 5 plus a
    short one, in one reduction group each (r large against n): the bf16 backward sums a group's
    last, short block in the run before it when it fits. The gradient comes only from each
    adapter's last rows (its last block, in row order), so a block left out of the weight
    gradients, or summed twice, shows as an error of order one."""
    if "cpu" not in AVAILABLE:
        pytest.skip("C++ backend not built")
    d, r, counts = 67, 24, (4 * 64 + 7, 5 * 64, 5 * 64 + 5)
    index = torch.cat([torch.full((c,), a) for a, c in enumerate(counts)] + [torch.full((9,), -1)])
    index = index[torch.randperm(index.numel())]
    n, adapters = index.numel(), len(counts)
    x, wd, wu, bd, bu, _ = bank_inputs(n, d, r, adapters, dtype=dtype)
    scales = [0.5, 1.0, 2.0]
    grad = torch.zeros(n, d, dtype=dtype)
    for a, c in enumerate(counts):
        last = torch.nonzero(index == a).flatten()[-(c % 64 or 64):]
        grad[last] = torch.randn(last.numel(), d, dtype=dtype)
    params = [t.clone().requires_grad_() for t in (x, wd, wu, bd, bu)]
    with use_backend("cpu"):
        grouped_adapter(params[0], index, *params[1:], activation="relu", scale=scales).backward(grad)
    want, leaves = loop_oracle(x, index, wd, wu, bd, bu, None, scales, "relu", 0.0, None)
    want.backward(grad.double())
    for got, leaf in zip(params, leaves):
        assert rel_err(got.grad, leaf.grad) < TOL[dtype] * 4, rel_err(got.grad, leaf.grad)


def test_cpu_bfloat16_rows_with_float32_weights():
    """Mixed precision: bf16 activations, fp32 weights (rounded to bf16 as matmul operands, as
    fused_adapter does); gradients come back in the weights' dtype."""
    if "cpu" not in AVAILABLE:
        pytest.skip("C++ backend not built")
    n, d, r, adapters = 300, 80, 8, 5
    x, wd, wu, bd, bu, _ = bank_inputs(n, d, r, adapters, dtype=torch.float32)
    index = torch.randint(-1, adapters, (n,))
    scales = [0.5 + a for a in range(adapters)]
    xb = x.bfloat16()
    params = [t.clone().requires_grad_() for t in (wd, wu, bd, bu)]
    with use_backend("cpu"):
        y = grouped_adapter(xb, index, *params, activation="gelu", scale=scales)
    want, leaves = loop_oracle(xb, index, wd, wu, bd, bu, None, scales, "gelu", 0.0, None)
    grad = torch.randn(n, d, dtype=torch.bfloat16)
    y.backward(grad)
    want.backward(grad.double())
    assert y.dtype == torch.bfloat16 and rel_err(y, want) < 2e-2
    for got, leaf in zip(params, leaves[1:]):
        assert got.grad.dtype == torch.float32
        assert rel_err(got.grad, leaf.grad) < 8e-2, rel_err(got.grad, leaf.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_outputs_past_the_streaming_threshold(dtype):
    """y and dx of at least 2 MiB (kScatteredStreamBytes in csrc/grouped_rows.h, below the
    single-adapter ops' 16 MiB): the epilogue writes the rows in place through the block's row
    list with non-temporal stores (residual read in place through it too); rows in random order,
    some without an adapter, against the float64 loop."""
    if "cpu" not in AVAILABLE:
        pytest.skip("C++ backend not built")
    d, r, adapters = 256, 8, 3
    n = (2 << 20) // (d * dtype.itemsize) + 77
    index = torch.randint(-1, adapters, (n,))
    run_case("cpu", dtype, n, d, r, adapters, index, residual=True, activation="relu")
    run_case("cpu", dtype, n, d, r, adapters, index, p=0.1)


@pytest.mark.parametrize("r, d", [(20, 123), (16, 48)])
def test_cpu_bf16_weight_gradients_of_one_and_several_groups(r, d):
    """bf16 weights on the brgemm driver: dw_up is transposed from the summed dw_up^T by 16 x 16
    tiles (r = 20, d = 123 leave edge rows and columns; r = 16, d = 48 none), from the partials row
    of an adapter with a single reduction group (12 adapters of ~40 rows) or from the sum of
    several (2 adapters of ~500 rows), against the float64 loop."""
    if "cpu" not in AVAILABLE:
        pytest.skip("C++ backend not built")
    run_case("cpu", torch.bfloat16, 480, d, r, 12, torch.randint(-1, 12, (480,)))
    run_case("cpu", torch.bfloat16, 1000, d, r, 2, torch.randint(0, 2, (1000,)), residual=True, p=0.1)
