"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90, without a GPU.

This is the check for what the interpreter cannot see: dtype rules of the compiler, ``tl.dot``
shapes (K >= 16), constexpr errors, bf16 dots, register spills, shared memory over the chip's
limit, and whether 16-bit dots reach the tensor cores.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from adapterfast import compile_check  # noqa: E402
from adapterfast.activations import ACTIVATIONS  # noqa: E402
from adapterfast.kernels.config import R_BUCKETS  # noqa: E402

ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def rows():
    return compile_check.check(ARCHS, compile_check.cover())


def test_cover_spans_every_kernel_dtype_rank_and_activation():
    variants = compile_check.cover()
    assert {(v.kernel, v.dtype, v.r) for v in variants} >= {
        (k, t, r) for k in compile_check.KERNELS for t in compile_check.DTYPES for r in R_BUCKETS}
    assert {v.activation for v in variants} == set(ACTIVATIONS)
    assert any(v.weight_dtype == "fp32" and v.dtype != "fp32" for v in variants)
    assert any(v.tf32 for v in variants)
    assert any(v.tf32x3 and v.dtype == "fp32" for v in variants)


@pytest.mark.slow
def test_cover_compiles_without_spills_within_shared_memory(rows):
    assert len(rows) == len(ARCHS) * len(compile_check.cover())
    assert {row["arch"] for row in rows} == set(ARCHS)
    failures = {(row["kernel"], row["arch"], row["dtype"], row["variant"]): compile_check.problems(row)
                for row in rows if compile_check.problems(row)}
    assert not failures
    for row in rows:
        assert row["spills"] == 0
        assert 0 < row["registers"] <= 255
        assert row["shared_bytes"] <= compile_check.SHARED_LIMIT[int(row["arch"][3:])]


@pytest.mark.slow
def test_mma_kind_per_kernel(rows):
    """16-bit and tf32 dots reach tensor cores; on sm_90 the row kernels use wgmma, not mma.sync.

    wgmma needs M >= 64 (a warpgroup), so row kernels with ``BLOCK_M >= 64`` must use it;
    backward-dxdw's weight-gradient dots have M = the rank tile, so at r = 16/32 it uses mma.sync (issue 13's gap).
    """
    for row in rows:
        wants_tensor_cores = not row["dtype"].startswith("fp32") or "+tf32" in row["variant"]
        assert (row["mma"] != "fma") == wants_tensor_cores, row
        if wants_tensor_cores and row["arch"] == "sm_80":
            assert row["mma"] == "mma.sync", row
        block_m = int(row["config"].split("-")[0][1:])
        if wants_tensor_cores and row["arch"] == "sm_90" and row["kernel"] != "backward_dxdw" and block_m >= 64:
            assert row["mma"] == "wgmma", row


@pytest.mark.slow
def test_proxies_are_reported(rows):
    """Loop costs, and bytes models at least the kernel's unavoidable [N, d] passes: the forward reads x
    and writes y, backward-dh reads g, backward-dxdw reads g and x (and writes dx up to r = 64)."""
    floor = {"forward": 2, "backward_dh": 1, "backward_dxdw": 2}
    for row in rows:
        assert row["loop_instructions"] and all(v > 0 for v in row["loop_instructions"]), row
        assert row["hbm_passes"] >= floor[row["kernel"]], row


@pytest.fixture(scope="module")
def strided_rows():
    variants = [v for v in compile_check.cover() if v.strided]
    return compile_check.check(["sm_90"], variants)


def test_offsets_that_strides_multiply_are_int64(strided_rows):
    """Column-major x and g, sliced biases, no dropout (Philox is uint32): no int32 tensor multiply.

    ``cols * stride_d`` in int32 overflowed once ``stride(1) * d > 2**31``; the Triton IR shows it.
    """
    # the forward keeps its two rank offsets (w_down's and b_down's) int32 on purpose: int64 there
    # made its fp32 variant spill on sm_90, and r * a weight's rank stride stays far below 2**31
    allowed = {"forward": 2}
    assert {row["kernel"] for row in strided_rows} == set(compile_check.KERNELS)
    for row in strided_rows:
        assert not compile_check.problems(row), row
        assert row["i32_tensor_muls"] == allowed.get(row["kernel"], 0), row


def test_mma_kind_and_loop_parsers():
    assert compile_check.mma_kind("wgmma.mma_async.sync.aligned.m64n64k16") == "wgmma"
    assert compile_check.mma_kind("mma.sync.aligned.m16n8k16.row.col") == "mma.sync"
    assert compile_check.mma_kind("wgmma.mma_async.x\nmma.sync.aligned.y") == "wgmma+mma.sync"
    assert compile_check.mma_kind("fma.rn.f32") == "fma"
    sass = "\n".join([
        "        /*0000*/ MOV R1, c[0x0][0x28] ;",
        ".L_x_1:",
        "        /*0010*/ FFMA R2, R3, R4, R5 ;",
        "        /*0020*/ FFMA R2, R3, R4, R5 ;",
        "        /*0030*/ IADD3 R6, R6, 0x1, RZ ;",
        "        /*0040*/ @P0 BRA `(.L_x_1) ;",
        ".L_x_2:",
        "        /*0050*/ BRA `(.L_x_2);",
    ])
    assert compile_check.loop_sizes(sass) == [4]
    ttir = "%a = arith.muli %b, %c : tensor<64x1xi64>\n%d = arith.muli %e, %f : tensor<1x64xi32>"
    assert compile_check.i32_tensor_muls(ttir) == 1


def test_help_names_every_option_and_the_cost_of_full(capsys):
    with pytest.raises(SystemExit):
        compile_check.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--arch", "--full", "--json", "--workers", "--no-progress"):
        assert option in text
    assert "2 hours" in text.replace("\n", " ")
    assert text.count("default") >= 2


def test_progress_bar_and_summary_line():
    import io

    ok = dict(kernel="forward", arch="sm_90", dtype="fp16", config="c", registers=100, spills=0,
              shared_bytes=1000, mma="wgmma", variant="v", error=None)
    stream = io.StringIO()
    bar = compile_check.ProgressBar(stream)
    for done in range(1, 21):
        bar(done, 20, ok if done != 7 else dict(ok, spills=8))
    lines = stream.getvalue().splitlines()
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("[" + "#" * 30 + "] 20/20 variants, 1 failed")
    line = compile_check.summary([ok, dict(ok, spills=8), dict(ok, mma="mma.sync", registers=120)], 3.0)
    assert "3 variants, 2 ok, 1 failed" in line and "max 120 registers" in line and "mma.sync, wgmma" in line


def test_problems_flags_spills_shared_memory_and_errors():
    ok = dict(kernel="forward", arch="sm_80", dtype="fp16", config="c", registers=100, spills=0,
              shared_bytes=1000, mma="mma.sync", variant="v", error=None)
    assert compile_check.problems(ok) == []
    assert compile_check.problems(dict(ok, spills=8))
    assert compile_check.problems(dict(ok, shared_bytes=compile_check.SHARED_LIMIT[80] + 1))
    assert compile_check.problems(dict(ok, error="CompilationError: at 1:2"))


# Run where Triton compiles (no TRITON_INTERPRET), as compile_check's workers do: the interpreter
# has no specialization, so in-process the kernels are not JITFunctions.
_KEY_SPECIALIZATION = r"""
import importlib, json
import torch
from triton.runtime.jit import JITFunction
from adapterfast.compile_check import _source
from adapterfast.kernels import backward_kernels, forward_kernel, philox

exempt = {}
for name in ("forward_kernel", "backward_kernels", "grouped_kernels"):
    module = importlib.import_module("adapterfast.kernels." + name)
    for attr, fn in vars(module).items():
        if isinstance(fn, JITFunction) and "key_lo" in fn.arg_names and attr.endswith("_kernel"):
            exempt[attr] = sorted(p.name for p in fn.params if p.do_not_specialize)
x, g, wd, wu = torch.randn(8, 64), torch.randn(8, 64), torch.randn(4, 64), torch.randn(64, 4)
_, h, fwd = forward_kernel.plan(x, wd, wu, None, None, "relu", 1.0, 0.1, 1, None)
_, _, _, launches = backward_kernels.plan(g, x, wd, wu, h, "relu", 1.0, 0.1, 1, True)
types = {launch.kernel.__name__: [_source(launch).signature[k] for k in ("key_lo", "key_hi", "threshold")]
         for launch in (fwd, *launches)}
print(json.dumps({"key_words_of_1": philox.key_words(1), "exempt": exempt, "types": types}))
"""


def test_launched_kernels_never_specialize_the_dropout_key():
    """Triton's JIT makes an int argument equal to 1 a constant: a seed whose key word is 1 would
    compile a kernel where the key has no ``.to`` (and every other seed recompile by its value). Every
    launched kernel that takes the key exempts the key words and the threshold, and Triton's own
    specialization of real launches with seed 1 keeps them runtime i32 arguments."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _KEY_SPECIALIZATION], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["key_words_of_1"] == [1, 0]
    assert sorted(found["exempt"]) == sorted(
        ["adapter_forward_kernel", "adapter_backward_dh_kernel", "adapter_backward_dxdw_kernel",
         "grouped_forward_kernel", "grouped_backward_dx_kernel", "grouped_backward_dw_kernel"])
    for name, params in found["exempt"].items():
        assert {"key_lo", "key_hi", "threshold"} <= set(params), (name, params)
    assert found["types"] == {name: ["i32"] * 3 for name in
                              ("adapter_forward_kernel", "adapter_backward_dh_kernel", "adapter_backward_dxdw_kernel")}
