"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90, without a GPU.

This is the check for what the interpreter cannot see: dtype rules of the compiler, ``tl.dot``
shapes (K >= 16), constexpr errors, bf16 dots, register spills, shared memory over the chip's
limit, and whether 16-bit dots reach the tensor cores.
"""
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
def test_tensor_cores_for_16bit_and_tf32_dots(rows):
    for row in rows:
        wants_tensor_cores = not row["dtype"].startswith("fp32") or row["variant"].endswith("+tf32")
        assert row["tensor_core"] == wants_tensor_cores, row


def test_problems_flags_spills_shared_memory_and_errors():
    ok = dict(kernel="forward", arch="sm_80", dtype="fp16", config="c", registers=100, spills=0,
              shared_bytes=1000, tensor_core=True, variant="v", error=None)
    assert compile_check.problems(ok) == []
    assert compile_check.problems(dict(ok, spills=8))
    assert compile_check.problems(dict(ok, shared_bytes=compile_check.SHARED_LIMIT[80] + 1))
    assert compile_check.problems(dict(ok, error="CompilationError: at 1:2"))
