"""The CPU backend's 16-bit paths (bf16 and fp16 on PyTorch's brgemm micro-kernel) and every lower
path this machine can run, forced in subprocesses, against float64.

Each output and gradient must be within 1e-2 of the float64 reference and within 2x the error
eager PyTorch makes in the same dtype on the same inputs (plus a small floor for values eager
gets exactly). The lower paths are forced with the switches of adapterfast.cpu:
ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 (oneDNN as on a CPU without AMX), ADAPTERFAST_CPU_BRGEMM=0
(the fp32 AVX-512 kernels with 16-bit operands converted), ATEN_CPU_CAPABILITY=avx2 (portable),
and for float16 ADAPTERFAST_CPU_FP16=native (oneDNN's float16 kernel), =bf16x3 (float16 split
into bf16 hi + lo, three bf16 products, in both passes) or =bf16x3-fwd (the forward split at every
rank, the backward on its default path).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from adapterfast import cpu, reference

from helpers import adapter_inputs, rel_err

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU backend not built: {cpu.unavailable_reason()}")

NAMES = ("y", "h", "dx", "dw_down", "db_down", "dw_up", "db_up")


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def errors(x, wd, wu, bd, bu, res, *, activation, scale, p, seed):
    """Relative errors against float64 of the backend and of eager PyTorch in x's dtype."""
    y, h = cpu.forward(x, wd, wu, bd, bu, activation, scale, p, seed, res)
    g = torch.randn_like(y)
    got = (y, h) + tuple(cpu.backward(g, x, wd, wu, bd, bu, h, activation, scale, p, seed, res is None))

    def run(dtype):
        leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, wd, bd, wu, bu)]
        xx, wdd, bdd, wuu, buu = leaves
        r = None if res is None else res.to(dtype)
        y, h = reference.forward(xx, wdd, wuu, bdd, buu, activation, scale, p, seed, r)
        present = [t for t in leaves if t is not None]
        grads = iter(torch.autograd.grad(y, present, g.to(dtype)))
        grads = [next(grads) if t is not None else None for t in leaves]
        return (y, h, grads[0], grads[1], grads[2], grads[3], grads[4])

    want = run(torch.float64)
    eager = run(x.dtype)
    ours = {n: rel_err(a, b) for n, a, b in zip(NAMES, got, want) if b is not None}
    theirs = {n: rel_err(a, b) for n, a, b in zip(NAMES, eager, want) if b is not None}
    return ours, theirs


def assert_close(ours, theirs, versus_eager=True):
    """versus_eager=False for tensors of a few elements, where one rounding decides the error
    (eager's own is 1.1e-2 on the 1 x 2 x 1 case): then only a looser absolute bound."""
    for name, err in ours.items():
        assert err < (1e-2 if versus_eager else 3e-2), (name, err)
        if versus_eager:
            assert err <= 2 * theirs[name] + 1e-4, (name, err, theirs[name])


def assert_same_on_one_and_two_threads(run):
    """run() (forward, then backward: NAMES) gives bitwise the same tensors on one thread and on two."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        two = run()
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(NAMES, one, two):
        assert torch.equal(a, b), name


# Smooth activations only: with relu, one h within rounding of 0 flips act'(h) against float64
# and the comparison measures luck (test_cpu_backend checks relu given the same h).
CASES = [
    # n, d, r, bias, residual, p, activation, strided x
    (64, 128, 16, True, False, 0.0, "sigmoid", False),
    (130, 431, 24, True, True, 0.3, "gelu", False),
    (65, 1000, 7, False, False, 0.0, "silu", True),
    (9, 123, 300, True, False, 0.1, "tanh", False),
    (1, 2, 1, True, False, 0.0, "gelu_tanh", False),
    (3000, 96, 64, True, False, 0.0, "gelu", False),  # several reduction groups and 256-row runs
    (67, 37, 5, True, True, 0.0, "silu", False),  # odd d and row count without dropout
    # d a multiple of 512: on AVX512-BF16 without AMX the d-wide B operands get padded rows
    # (b_stride in adapter_brgemm.cpp), with and without dropout, odd row counts
    (131, 1024, 16, True, False, 0.0, "gelu", False),
    (197, 512, 8, False, True, 0.2, "silu", False),
    # weights of 2^18 and 2^17 elements: packed side by side (packs_side_by_side in adapter_brgemm.cpp)
    (8, 4096, 64, True, False, 0.0, "gelu", False),
    (100, 2048, 64, False, False, 0.1, "silu", False),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}r{c[2]}" for c in CASES])
def test_16bit_within_twice_eager_error(dtype, case):
    n, d, r, bias, residual, p, activation, strided = case
    torch.manual_seed(n + d + r)
    x, wd, wu, bd, bu, res = adapter_inputs(n, d, r, bias=bias, residual=residual)
    if strided:
        x = torch.randn(d, n).t()
    x = x.to(dtype)
    res = None if res is None else res.to(dtype)
    ours, theirs = errors(x, wd, wu, bd, bu, res, activation=activation, scale=0.7, p=p, seed=123)
    assert_close(ours, theirs, versus_eager=n * r >= 64)


@pytest.mark.parametrize("n, d", [(8, 4096), (100, 2048), (48, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_packed_side_by_side_give_the_one_thread_results(dtype, n, d):
    """Weights this large have their two per-call passes run on two threads at once where there are
    two (kSideBySideWeightElements, csrc/adapter_common.h): brgemm's packs (packs_side_by_side),
    the fp32 kernels' widened copies (operand_weights; float16 below 256 rows) and the weight
    gradients written from the sums. Where bf16 brgemm runs on AVX-512 dot products, a 48-row
    forward at d = 4096 also goes to both threads in blocks of 16 rows (forward_rows_per_thread,
    csrc/adapter_brgemm.cpp). Forward and backward are bitwise those of one thread."""
    torch.manual_seed(d)
    x, wd, wu, bd, bu, _ = adapter_inputs(n, d, 64)
    x, g = x.to(dtype), torch.randn(n, d).to(dtype)
    wd, wu, bd, bu = (t.to(dtype) for t in (wd, wu, bd, bu))

    def run():
        y, h = cpu.forward(x, wd, wu, bd, bu, "gelu", 0.5, 0.0, 0, None)
        return (y, h) + tuple(cpu.backward(g, x, wd, wu, bd, bu, h, "gelu", 0.5, 0.0, 0, True))

    assert_same_on_one_and_two_threads(run)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("n, d, r, p", [(64, 4100, 64, 0.0), (17, 4100, 64, 0.3), (63, 4096, 64, 0.2),
                                        (9, 4096, 64, 0.0), (40, 2736, 96, 0.0)])
def test_one_block_bf16_backward_by_column_ranges(n, d, r, p, residual):
    """A bf16 backward of one block (up to 64 rows, weights of 2^18 elements or more) where brgemm
    runs on AVX512-BF16 dot products spreads its dx and weight-gradient products over the threads
    by ranges of 256-column chunks (backward_by_column_ranges, csrc/adapter_brgemm.cpp): d = 4100
    ends in a 4-column chunk, odd row counts pad the VNNI pairs, dropout takes db_up's sums from
    the dropout loop and without it from the repack of g. A backward of one block writes the
    weight gradients chunk by chunk (brgemm_backward_writes_gradients), here with the scale
    applied to dw_up without dropout, and at r = 96 in chunks larger than the dx product's. The
    results match the float64 reference within twice eager's error and are bitwise those of one
    thread (where the route is not taken)."""
    torch.manual_seed(n + d)
    x, wd, wu, bd, bu, _ = adapter_inputs(n, d, r)
    x, wd, wu, bd, bu = (t.to(torch.bfloat16) for t in (x, wd, wu, bd, bu))
    res = torch.randn(n, d).to(torch.bfloat16) if residual else None
    ours, theirs = errors(x, wd, wu, bd, bu, res, activation="silu", scale=0.7, p=p, seed=9)
    assert_close(ours, theirs)
    g = torch.randn(n, d).to(torch.bfloat16)

    def run():
        y, h = cpu.forward(x, wd, wu, bd, bu, "silu", 0.7, p, 9, res)
        return (y, h) + tuple(cpu.backward(g, x, wd, wu, bd, bu, h, "silu", 0.7, p, 9, res is None))

    assert_same_on_one_and_two_threads(run)


@pytest.mark.parametrize("n, d, p", [(192, 1024, 0.0), (197, 1024, 0.2), (320, 2048, 0.0), (449, 1030, 0.1)])
def test_bf16_backward_blocks_balanced_over_reduction_groups(n, d, p):
    """From 128 rows, a bf16 backward where brgemm runs on AVX512-BF16 dot products takes the block
    size (64 down to 48 rows) whose larger reduction group holds the fewest rows
    (brgemm_backward_block_rows, csrc/adapter_brgemm.cpp): 192 rows in four blocks of 48, 320 in
    six of 56, whose weight-gradient runs end short of 128 rows; with odd row counts and d not a
    multiple of 256. The results match the float64 reference within twice eager's error and are
    bitwise those of one thread. On AMX the blocks stay at 64 rows, and this checks that path."""
    torch.manual_seed(n + d)
    r = 64
    x, wd, wu, bd, bu, _ = adapter_inputs(n, d, r)
    x, wd, wu, bd, bu = (t.to(torch.bfloat16) for t in (x, wd, wu, bd, bu))
    ours, theirs = errors(x, wd, wu, bd, bu, None, activation="gelu", scale=0.7, p=p, seed=5)
    assert_close(ours, theirs)
    g = torch.randn(n, d).to(torch.bfloat16)

    def run():
        y, h = cpu.forward(x, wd, wu, bd, bu, "gelu", 0.7, p, 5, None)
        return (y, h) + tuple(cpu.backward(g, x, wd, wu, bd, bu, h, "gelu", 0.7, p, 5, True))

    assert_same_on_one_and_two_threads(run)


@pytest.mark.parametrize("weights", ["x", "fp32"])
@pytest.mark.parametrize("n, d, r, p", [(1, 700, 64, 0.0), (40, 700, 64, 0.2), (100, 450, 64, 0.0), (64, 200, 24, 0.1)])
def test_fp16_column_route_writes_gradients_by_panel(n, d, r, p, weights):
    """float16 calls of up to 127 rows at r >= 64 (64 rows at smaller r) on the fp32 kernels take
    the column route (backward_by_columns), which reads Wd as given and writes both weight
    gradients in the weights' dtype panel by panel of 192 columns (panel_gradients,
    csrc/adapter_backward.cpp): d = 700 and 450 end in a partial panel, as does each thread's range
    of columns on two threads. Within 2x eager's error, weights in float16 and in fp32."""
    torch.manual_seed(n + d)
    x, wd, wu, bd, bu, _ = adapter_inputs(n, d, r)
    if weights == "x":
        wd, wu, bd, bu = (t.half() for t in (wd, wu, bd, bu))
    ours, theirs = errors(x.half(), wd, wu, bd, bu, None, activation="gelu", scale=0.7, p=p, seed=5)
    assert_close(ours, theirs, versus_eager=n * r >= 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_weights_in_x_dtype(dtype):
    x, wd, wu, bd, bu, _ = adapter_inputs(200, 256, 32)
    ours, theirs = errors(x.to(dtype), wd.to(dtype), wu.to(dtype), bd.to(dtype), bu.to(dtype), None,
                          activation="gelu", scale=1.0, p=0.2, seed=9)
    for name, err in ours.items():
        assert err < 1e-2, (name, err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, d, r", [(37, 130, 7), (1, 768, 16), (9, 1024, 16), (300, 256, 64), (257, 129, 33),
                                     (70, 600, 24)])
@pytest.mark.parametrize("scale", [0.7, 1.0])
def test_16bit_weights_give_the_rounded_fp32_weight_gradients(dtype, n, d, r, scale):
    """Weights in x's 16-bit dtype are widened (or, bf16 on brgemm and float16 split into bf16,
    packed as given: packs_given_weights), and their gradients rounded, 8 values at a time
    (widen_row, narrow_row): the same operands as float32 weights holding the same values, so y, h
    and dx are bitwise the float32 weights' and each weight gradient is exactly theirs rounded to
    the dtype (to nearest even). The shapes take the given-weight packing's three routes: 32-bit
    word transposes (even widths), the element loop (odd r or d), and padded B rows (d = 1024 on
    AVX512-BF16); 256 rows or more and r >= 32 take float16's split forward where the CPU has AMX-BF16.
    On brgemm the [r, d] sums are column-blocked (kOutCols = 256 columns a chunk) and each gradient
    is written from them in one pass: d = 600 has a narrower last chunk, and scale 1.0 writes the
    float32 weights' dw_up with the transpose kernel, scale 0.7 with the scaling loop."""
    torch.manual_seed(n)
    x, g = torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype)
    wd, wu = (torch.randn(r, d) / d**0.5).to(dtype), (torch.randn(d, r) / r**0.5).to(dtype)
    bd, bu = torch.randn(r).to(dtype), torch.randn(d).to(dtype)
    low = [wd, wu, bd, bu]
    wide = [t.float() for t in low]
    y16, h16 = cpu.forward(x, *low[:2], *low[2:], "gelu", scale, 0.0, 0, None)
    y32, h32 = cpu.forward(x, *wide[:2], *wide[2:], "gelu", scale, 0.0, 0, None)
    assert torch.equal(y16, y32) and torch.equal(h16, h32)
    g16 = cpu.backward(g, x, *low[:2], *low[2:], h16, "gelu", scale, 0.0, 0, True)
    g32 = cpu.backward(g, x, *wide[:2], *wide[2:], h32, "gelu", scale, 0.0, 0, True)
    assert torch.equal(g16[0], g32[0])
    for ours, wide_grad in zip(g16[1:], g32[1:]):
        assert ours.dtype == dtype and torch.equal(ours, wide_grad.to(dtype))


def test_brgemm_is_used_where_the_cpu_has_it():
    flags = cpu_flags()
    if "amx_bf16" in flags and torch.backends.mkldnn.is_available():
        assert cpu.kernel_isa(torch.bfloat16) == "brgemm-amx"
    elif "avx512_bf16" in flags and torch.backends.mkldnn.is_available():
        assert cpu.kernel_isa(torch.bfloat16) == "brgemm-avx512"
    else:
        pytest.skip("no AMX-BF16 or AVX512-BF16 here")
    if "amx_fp16" in flags and torch.backends.mkldnn.is_available():
        assert cpu.kernel_isa(torch.float16) == "brgemm-amx"
    elif "amx_bf16" in flags and torch.backends.mkldnn.is_available():
        assert cpu.kernel_isa(torch.float16) == "brgemm-amx-bf16x3-fwd"
    else:  # oneDNN's float16 kernel off AMX tiles (AVX512-FP16) is slower than the fp32 kernels
        assert cpu.kernel_isa(torch.float16) == "avx512"
    assert cpu.kernel_isa(torch.float32) == "avx512"


def test_fp16_split_products_are_exact_to_fp32_accumulation():
    """On the bf16x3 path (the forward is split by default on AMX without AMX-FP16) h = x Wd^T + bd (kept in fp32) must match float64 on the float16 values
    to fp32 accumulation (the dropped lo . lo term is below 2^-16 relative): bf16 operands alone
    would be 2^-9 off per product, float16 output rounding 2^-11."""
    if "-bf16x3" not in cpu.kernel_isa(torch.float16):
        pytest.skip(f"float16 runs {cpu.kernel_isa(torch.float16)} here")
    n, d, r = 300, 1001, 40
    torch.manual_seed(1)
    x = torch.randn(n, d).half()
    x[0, :5] = torch.tensor([65504.0, -6.1e-5, 6e-8, 1.0 + 2**-10, -(1.0 + 3 * 2**-10)]).half()
    wd, wu = torch.randn(r, d) / d**0.5, torch.randn(d, r) / r**0.5
    bd, bu = torch.randn(r), torch.randn(d)
    _, h = cpu.forward(x, wd, wu, bd, bu, "gelu", 1.0, 0.0, 0, None)
    want = x.double() @ wd.half().double().t() + bd.double()
    assert rel_err(h, want) < 2e-6, rel_err(h, want)


@pytest.mark.parametrize("n", [1024, 200])
def test_fp32_bias_gradients_do_not_drift_with_rows(n):
    """N < 16 r puts every row in one reduction group; db_up, a plain sum of grad_y's rows, must stay
    within a few ulps of float64 (one fp32 chain over 1024 rows of ~0.4 was 323 ulps off). db_down
    sums dh, which carries the fp32 GEMM's own error, so it is held to the relative rule."""
    d, r = 256, 64
    x, wd, wu, bd, bu, _ = adapter_inputs(n, d, r)
    g = 0.4 + 0.01 * torch.randn(n, d)
    y, h = cpu.forward(x, wd, wu, bd, bu, "relu", 1.0, 0.0, 0, None)
    _, _, db_down, _, db_up = cpu.backward(g, x, wd, wu, bd, bu, h, "relu", 1.0, 0.0, 0, True)
    want = reference.backward(g.double(), x.double(), wd.double(), wu.double(), bd.double(), bu.double(), h.double(),
                              "relu", 1.0, 0.0, 0, True)
    ulp = torch.finfo(torch.float32).eps * want[4].abs().clamp_min(1e-30)
    assert ((db_up.double() - want[4]).abs() / ulp).max().item() <= 4
    assert rel_err(db_down, want[2]) < 1e-6


_PATH_CHECK = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from adapterfast import cpu
from test_cpu_brgemm import CASES, adapter_inputs, errors
report = {str(dt): cpu.kernel_isa(dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}
worst = 0.0
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for n, d, r, bias, residual, p, activation, strided in CASES[:5]:
        torch.manual_seed(n)
        x, wd, wu, bd, bu, res = adapter_inputs(n, d, r, bias=bias, residual=residual)
        x = x.to(dtype)
        res = None if res is None else res.to(dtype)
        ours, theirs = errors(x, wd, wu, bd, bu, res, activation=activation, scale=0.7, p=p, seed=3)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for name, err in ours.items():
            assert err < (tol if n * r >= 64 else 3 * tol), (dtype, name, err)
            assert n * r < 64 or err <= 2 * theirs[name] + (1e-6 if dtype == torch.float32 else 1e-4), (dtype, name, err, theirs[name])
            worst = max(worst, err)
report["worst"] = worst
print(json.dumps(report))
"""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_streamed_outputs_match_unstreamed_rows(dtype):
    """y and dx this large (16 MiB) are written with non-temporal stores (stream_output): their
    first and last 129 rows equal what a 129-row call, which does not stream, writes for the same
    rows (rows are independent in y and dx without dropout, among calls of more than 128 rows: a
    smaller call on the block kernels reads the weights as given, kGivenForwardMaxRows, and sums h
    in another order). On BLAS (below AVX-512) 448 rows: it reads the weights as given up to 384
    rows, and a row's products are those of its 64-row block's call, so the rows compared are
    whole blocks in both calls."""
    blas = cpu.kernel_isa(dtype) == "blas"
    n, d, r, small = 8192, 1024, 16, 448 if blas else 129
    torch.manual_seed(0)
    x, g = torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype)
    wd, wu = torch.randn(r, d) / d**0.5, torch.randn(d, r) / r**0.5
    bd, bu = torch.randn(r) * 0.1, torch.randn(d) * 0.1
    y, h = cpu.forward(x, wd, wu, bd, bu, "gelu", 0.5, 0.0, 0, None)
    dx = cpu.backward(g, x, wd, wu, bd, bu, h, "gelu", 0.5, 0.0, 0, True)[0]
    for rows in (slice(0, small), slice(n - small, n)):
        y_small, h_small = cpu.forward(x[rows], wd, wu, bd, bu, "gelu", 0.5, 0.0, 0, None)
        dx_small = cpu.backward(g[rows], x[rows], wd, wu, bd, bu, h_small, "gelu", 0.5, 0.0, 0, True)[0]
        assert torch.equal(y[rows], y_small)
        assert torch.equal(dx[rows], dx_small)


def run_forced(env_update):
    env = dict(os.environ, **env_update)
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", _PATH_CHECK, here], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_path_without_amx():
    """oneDNN capped below AMX: bf16 runs brgemm on AVX512-BF16 dot products (as on a CPU without AMX)."""
    if "avx512_bf16" not in cpu_flags():
        pytest.skip("no AVX512-BF16 here")
    report = run_forced({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})
    assert report["torch.bfloat16"] == "brgemm-avx512", report


@pytest.mark.parametrize("forced", ["native", "bf16x3", "bf16x3-no-amx", "bf16x3-fwd", "bf16x3-fwd-no-amx"])
def test_fp16_paths_forced(forced):
    """float16 on oneDNN's float16 kernel (ADAPTERFAST_CPU_FP16=native), split into bf16 in forward
    and backward (=bf16x3), and split in the forward only at every rank (=bf16x3-fwd, the default
    on AMX without AMX-FP16 from r = 32), on AMX tiles and on AVX512-BF16 dot products, each within
    2x eager's error."""
    flags = cpu_flags()
    if "avx512_bf16" not in flags:
        pytest.skip("no AVX512-BF16 here")
    no_amx = forced.endswith("-no-amx")
    if not no_amx and forced != "native" and "amx_bf16" not in flags:
        pytest.skip("no AMX-BF16 here")
    env = {"ADAPTERFAST_CPU_FP16": forced.removesuffix("-no-amx")}
    if no_amx:
        env["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE_BF16"
    report = run_forced(env)
    if forced == "native":
        assert report["torch.float16"] in (("brgemm-avx512", "brgemm-amx") if "avx512_fp16" in flags else ("avx512",))
    else:
        unit = "avx512" if no_amx else "amx"
        assert report["torch.float16"] == f"brgemm-{unit}-{env['ADAPTERFAST_CPU_FP16']}", report


def test_fp16_with_avx512_fp16_but_no_amx():
    """oneDNN capped at AVX512-FP16 (as on a CPU with it and no AMX): float16 runs on the fp32
    kernels, which beat oneDNN's AVX512-FP16 kernel in both passes (fp16_route), and kernel_isa
    reports those kernels, not the brgemm kernel that exists but does not run."""
    if "avx512_fp16" not in cpu_flags():
        pytest.skip("no AVX512-FP16 here")
    report = run_forced({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_FP16"})
    assert report["torch.float16"] == "avx512" and report["torch.bfloat16"] == "brgemm-avx512", report


@pytest.mark.parametrize("pad", ["0", "1"])
def test_brgemm_b_padding_forced(pad):
    """The d-wide VNNI B operands with rows padded by 16 columns at every d (=1, AMX included) and
    never (=0), each within 2x eager's error."""
    if "avx512_bf16" not in cpu_flags():
        pytest.skip("no AVX512-BF16 here")
    report = run_forced({"ADAPTERFAST_CPU_BRGEMM_PAD": pad})
    assert report["torch.bfloat16"].startswith("brgemm-"), report


def test_path_without_16bit_instructions():
    """oneDNN capped at plain AVX-512: bf16 on brgemm's emulation or the fp32 kernels, still correct."""
    if "avx512f" not in cpu_flags():
        pytest.skip("no AVX-512 here")
    report = run_forced({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"})
    assert report["torch.float16"] == "avx512", report


def test_path_with_brgemm_off():
    report = run_forced({"ADAPTERFAST_CPU_BRGEMM": "0"})
    assert report["torch.bfloat16"] in ("avx512", "blas") and report["torch.float16"] == report["torch.float32"], report


_FEW_ROWS = """
import sys, torch
from adapterfast import cpu
torch.manual_seed(4)
out = []
for d, r, rows in ((131, 33, 5), (2048, 64, 9)):
    x = torch.randn(rows, d).bfloat16()
    wd, wu = (torch.randn(r, d) / d**0.5).bfloat16(), (torch.randn(d, r) / r**0.5).bfloat16()
    bd, bu = torch.randn(r).bfloat16(), torch.randn(d).bfloat16()
    out.append([cpu.forward(x[:n], wd, wu, bd, bu, "gelu", 0.5, 0.0, 0, None) for n in range(1, rows + 1)])
torch.save(out, sys.argv[1])
"""


def default_and_brgemm_off(script, tmp_path):
    """What `script` saves to the path it is given, run in a subprocess as the default build runs
    and with brgemm off (ADAPTERFAST_CPU_BRGEMM=0): {"default": ..., "off": ...}."""
    outputs = {}
    for name, env in (("default", {}), ("off", {"ADAPTERFAST_CPU_BRGEMM": "0"})):
        path = str(tmp_path / f"{name}.pt")
        done = subprocess.run([sys.executable, "-c", script, path], env=dict(os.environ, **env),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[name] = torch.load(path)
    return outputs


def test_bf16_forwards_of_a_few_rows_run_on_the_block_kernels(tmp_path):
    """A bf16 forward of up to 4 rows, 8 with weights of 2^17 elements or more
    (bf16_forward_on_block_kernels, csrc/adapter_brgemm.h), runs on the block kernels, which read
    the weights as given, where brgemm would first pack both: its y and h are bitwise those of the
    same call with brgemm off (ADAPTERFAST_CPU_BRGEMM=0). One row more runs on brgemm where bf16
    has it, and its h (fp32, summed in another order) differs."""
    outputs = default_and_brgemm_off(_FEW_ROWS, tmp_path)
    brgemm = cpu.kernel_isa(torch.bfloat16).startswith("brgemm")
    for bound, calls, calls_off in zip((4, 8), outputs["default"], outputs["off"]):
        for n, ((y, h), (y_off, h_off)) in enumerate(zip(calls, calls_off), start=1):
            if n <= bound:
                assert torch.equal(y, y_off) and torch.equal(h, h_off), (bound, n)
            elif brgemm:
                assert not torch.equal(h, h_off), (bound, n)


_FEW_ROWS_BACKWARD = """
import sys, torch
from adapterfast import cpu
torch.manual_seed(5)
out = []
for d, r, rows in ((4096, 64, 5), (2048, 64, 2)):
    x, g, h = torch.randn(rows, d).bfloat16(), torch.randn(rows, d).bfloat16(), torch.randn(rows, r)
    wd, wu = torch.randn(r, d) / d**0.5, torch.randn(d, r) / r**0.5
    bd, bu = torch.randn(r), torch.randn(d)
    out.append([cpu.backward(g[:n], x[:n], wd, wu, bd, bu, h[:n], "gelu", 0.5, 0.0, 0, True) for n in range(1, rows + 1)])
torch.save(out, sys.argv[1])
"""


def test_bf16_backwards_of_a_few_rows_with_large_weights_run_on_the_block_kernels(tmp_path):
    """A bf16 backward of up to 4 rows with weights of 2^18 elements or more
    (bf16_backward_on_block_kernels, csrc/adapter_brgemm.h) runs on the block kernels' column route,
    which reads the weights as given and writes the gradients by panel, where brgemm would pack both
    weights and round fp32 partials in another pass: its gradients are bitwise those of the same call
    with brgemm off (ADAPTERFAST_CPU_BRGEMM=0). 5 rows, and weights of 2^17 elements, run on brgemm
    where bf16 has it, whose fp32 weight gradients (fp32 weights; summed in another order) differ."""
    outputs = default_and_brgemm_off(_FEW_ROWS_BACKWARD, tmp_path)
    brgemm = cpu.kernel_isa(torch.bfloat16).startswith("brgemm")
    for bound, calls, calls_off in zip((4, 0), outputs["default"], outputs["off"]):
        for n, (grads, grads_off) in enumerate(zip(calls, calls_off), start=1):
            same = [torch.equal(a, b) for a, b in zip(grads, grads_off)]
            if n <= bound:
                assert all(same), (bound, n, same)
            elif brgemm:
                assert not all(same), (bound, n)


@pytest.mark.parametrize("kernels, switches", [("blas", {}), ("generic", {"ADAPTERFAST_CPU_BLAS": "0"})])
def test_path_below_avx512(kernels, switches):
    report = run_forced({"ATEN_CPU_CAPABILITY": "avx2", **switches})
    assert set(report[k] for k in ("torch.float32", "torch.bfloat16", "torch.float16")) == {kernels}, report


@pytest.mark.skipif(os.environ.get("ADAPTERFAST_TEST_HUGE") != "1",
                    reason="needs ~9 GiB and minutes: set ADAPTERFAST_TEST_HUGE=1")
def test_bf16_forward_past_2_31_elements():
    """A [4194307, 1024] bf16 forward (4.29e9 elements): rows on both sides of element 2^31 and the
    last rows match float64. x is a strided view of a small buffer (row i starts at element i), so
    only y is [N, d]-sized; y's offsets pass 2^31."""
    n, d, r = 4194307, 1024, 16
    torch.manual_seed(0)
    buffer = torch.randn(n + d).bfloat16()
    x = buffer.as_strided((n, d), (1, 1))
    wd, wu = torch.randn(r, d) / d**0.5, torch.randn(d, r) / r**0.5
    bd, bu = torch.randn(r) * 0.1, torch.randn(d) * 0.1
    y, h = cpu.forward(x, wd, wu, bd, bu, "gelu", 1.0, 0.0, 0, None)
    boundary = 2**31 // d
    rows = torch.tensor([0, boundary - 2, boundary - 1, boundary, boundary + 1, n - 2, n - 1])
    xs = x[rows].double()
    y64, _ = reference.forward(xs, wd.double(), wu.double(), bd.double(), bu.double(), "gelu", 1.0, 0.0, 0, None)
    y_eager, _ = reference.forward(x[rows], wd.bfloat16(), wu.bfloat16(), bd.bfloat16(), bu.bfloat16(), "gelu", 1.0,
                                   0.0, 0, None)
    ours, theirs = rel_err(y[rows], y64), rel_err(y_eager, y64)
    print(f"past 2^31: error {ours:.3e}, eager bf16 {theirs:.3e}")
    assert ours < 1e-2 and ours <= 2 * theirs


@pytest.mark.slow
def test_scratch_is_written_before_it_is_read():
    """The CPU drivers' scratch buffers are not zeroed (csrc/scratch.h); with
    ADAPTERFAST_CPU_POISON_SCRATCH=1 they (and the drivers' outputs and partial sums) start as
    NaN, so any read of an element no code wrote first shows up as a NaN or an error in these
    tests (the 16-bit single-op cases, with 16-bit weights packed as given too, the fp32, float64
    and 16-bit cases of the CPU backend's tests, and the grouped op on the CPU backend, in a fresh
    process that reads the switch)."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ADAPTERFAST_CPU_POISON_SCRATCH="1")
    tests = [os.path.join(here, f"test_cpu_brgemm.py::{name}") for name in (
        "test_16bit_within_twice_eager_error", "test_16bit_weights_in_x_dtype",
        "test_16bit_weights_give_the_rounded_fp32_weight_gradients")]
    tests += [os.path.join(here, "test_cpu_backend.py"), os.path.join(here, "test_grouped.py")]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "not reference",
                           *tests], env=env, cwd=os.path.dirname(here), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
