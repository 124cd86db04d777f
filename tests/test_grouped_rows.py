"""The C++ grouped op's row-list GEMMs (csrc/grouped_row_kernels*.cpp), which read a block's x rows
where they lie in x instead of a gathered copy: every register-tile width and K chunk of the
AVX-512 kernel, x views with a row stride other than d (read in place) or a column stride other
than 1 (gathered), and the BLAS and portable kernels that ATEN_CPU_CAPABILITY=avx2/default select,
each against the float64 loop over single adapters (tests/test_grouped.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapterfast import grouped_adapter, use_backend
from adapterfast.dispatch import backends
from helpers import rel_err
from test_grouped import TOL, loop_oracle, run_case

pytestmark = pytest.mark.skipif(not backends()["cpu"].available, reason="C++ backend not built")


@pytest.mark.parametrize("r", [5, 16, 20, 40, 70])
def test_every_tile_width(r):
    """r picks the tile (16 or 8 rows of one vector, 8 rows of two or three, 6 of four, and two
    column passes past 64); 301 rows over 3 adapters leave partial tiles and blocks."""
    n, d, adapters = 301, 67, 3
    index = torch.randint(-1, adapters, (n,))
    run_case("cpu", torch.float32, n, d, r, adapters, index)


@pytest.mark.parametrize("d", [512, 1536])
def test_one_vector_on_rows_2_kib_apart(d):
    """r <= 16 with x's rows a multiple of 2 KiB apart takes 8-row tiles (rows_share_l1_sets in
    block_kernels_avx512.h), elsewhere 16-row ones; 70 rows over 2 adapters leave partial tiles."""
    n, r, adapters = 70, 13, 2
    index = torch.randint(-1, adapters, (n,))
    run_case("cpu", torch.float32, n, d, r, adapters, index)


def test_width_past_one_k_chunk():
    """d > 1024: the product is summed over two K chunks (the second accumulating into h)."""
    n, d, r, adapters = 90, 1100, 8, 2
    index = torch.randint(-1, adapters, (n,))
    for dtype in (torch.float32, torch.float64):
        run_case("cpu", dtype, n, d, r, adapters, index, residual=False, p=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["row_stride", "column_stride"])
def test_strided_x(dtype, layout):
    """x a view: rows d + 9 apart (read in place with that stride, residual too), or columns not
    contiguous (gathered; bf16: made unit-stride once); forward and the gradients of x and both
    weights against the float64 loop. bf16 on brgemm repacks the listed x rows for dw_down."""
    n, d, r, adapters = 150, 40, 6, 3
    if layout == "row_stride":
        x = torch.randn(n, d + 9, dtype=dtype)[:, 4:4 + d]
    else:
        x = torch.randn(d, n, dtype=dtype).t()
    wd = torch.randn(adapters, r, d, dtype=dtype) / d**0.5
    wu = torch.randn(adapters, d, r, dtype=dtype) / r**0.5
    bd = torch.randn(adapters, r, dtype=dtype) * 0.1
    bu = torch.randn(adapters, d, dtype=dtype) * 0.1
    index = torch.randint(-1, adapters, (n,))
    scales = [0.5, 1.0, 2.0]
    xg, wdg, wug = (t.detach().requires_grad_() for t in (x, wd, wu))
    with use_backend("cpu"):
        y = grouped_adapter(xg, index, wdg, wug, bd, bu, activation="gelu", scale=scales)
    want, leaves = loop_oracle(x, index, wd, wu, bd, bu, None, scales, "gelu", 0.0, None)
    grad = torch.randn(n, d, dtype=dtype)
    y.backward(grad)
    want.backward(grad.double())
    assert rel_err(y, want) < TOL[dtype]
    for got, leaf in zip((xg, wdg, wug), leaves):
        assert rel_err(got.grad, leaf.grad) < 4 * TOL[dtype]


_BELOW_AVX512_CHECK = """
import sys, torch
from adapterfast import cpu, use_backend
from test_grouped import run_case
assert {cpu.kernel_isa(t) for t in (torch.float32, torch.float64)} == {sys.argv[1]}
torch.manual_seed(0)
for r in (5, 40):
    index = torch.randint(-1, 3, (301,))
    for dtype in (torch.float32, torch.float64):
        run_case("cpu", dtype, 301, 67, r, 3, index)
        run_case("cpu", dtype, 301, 67, r, 3, index, residual=True, p=0.2)
run_case("cpu", torch.bfloat16, 301, 67, 5, 3, index)
print("ok")
"""


@pytest.mark.parametrize("capability, switches, rows", [("avx2", {}, "blas"), ("default", {}, "blas"),
                                                      ("avx2", {"ADAPTERFAST_CPU_BLAS": "0"}, "generic")])
def test_row_kernels_below_avx512_in_a_subprocess(capability, switches, rows):
    """ATEN_CPU_CAPABILITY below AVX512 selects the BLAS block kernels, whose row kernels gather a
    block's listed rows and make one gemm of them, or with ADAPTERFAST_CPU_BLAS=0 the portable block
    and row kernels; the grouped op must agree with the loop there as well (bf16 too, whose rows the
    block kernels take gathered where brgemm does not run)."""
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, **switches,
               PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _BELOW_AVX512_CHECK, rows], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tests)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
