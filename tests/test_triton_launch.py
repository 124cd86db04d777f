"""The Triton backend's host side: the launch setup computed once per problem kind, the TF32 flag
read per call through either of torch's APIs, the block-size table, and the host-overhead figures
(split from ``test_triton_kernels.py``, whose inputs and checks these tests use)."""
import logging

import pytest
import torch

pytest.importorskip("triton")
from test_triton_kernels import check_case, make_inputs  # noqa: E402  (sets TRITON_INTERPRET without a GPU)

from adapterfast.kernels import config, launch  # noqa: E402


def test_tf32_follows_torch_flag_at_launch():
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert launch.dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert launch.dot_precision(torch.float32) == "tf32"
        assert launch.dot_precision(torch.float16) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def test_config_table_covers_every_rank():
    for r in range(1, 257):
        cfgs = config.choose(1000, r, torch.float16)
        assert cfgs.forward.block_r in config.R_BUCKETS and cfgs.forward.block_r >= r


def test_tf32_flag_read_through_the_new_precision_api():
    """After ``fp32_precision`` is set, reading the legacy ``allow_tf32`` raises: the launcher must not."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    try:
        matmul.fp32_precision = "tf32"
        assert launch.dot_precision(torch.float32) == "tf32"
        assert launch.dot_precision(torch.bfloat16) == "ieee"
        check_case(20, 48, 8, torch.float16, "relu")
        matmul.fp32_precision = "ieee"
        assert launch.dot_precision(torch.float32) == "ieee"
        check_case(20, 48, 8, torch.float32, "relu")
        matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"
        assert launch.dot_precision(torch.float32) == "tf32"
        torch.backends.fp32_precision = "ieee"
        assert launch.dot_precision(torch.float32) == "ieee"
    finally:
        torch.backends.fp32_precision = "none"
        matmul.fp32_precision = "none"
    assert matmul.allow_tf32 in (False, True)


def test_launch_setup_is_cached_per_problem_kind_but_follows_the_tf32_flag():
    """Config choice and constexprs are computed once per (d, r, dtype, flags); the TF32 flag is read per call."""
    from adapterfast.kernels import forward_kernel

    t = make_inputs(12, 48, 8, torch.float32)
    forward_kernel._static.cache_clear()
    plans = [forward_kernel.plan(t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], "relu", 1.0, 0.0, None,
                                 None)[2] for _ in range(3)]
    assert forward_kernel._static.cache_info().misses == 1 and forward_kernel._static.cache_info().hits == 2
    assert plans[0].kwargs is plans[2].kwargs and plans[0].args[0] is t["x"]
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        try:
            matmul.fp32_precision = "tf32"
            tf32 = forward_kernel.plan(t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], "relu", 1.0, 0.0,
                                       None, None)[2]
        finally:
            matmul.fp32_precision = "none"
        assert tf32.kwargs["INPUT_PRECISION"] == "tf32" and plans[0].kwargs["INPUT_PRECISION"] == "ieee"


def test_host_overhead_benchmark_runs():
    from benchmarks import gpu_check_overhead

    figures = gpu_check_overhead.measure(calls=20)
    assert set(figures) == {"forward_us", "forward_dropout_us", "backward_us", "grouped_forward_us",
                            "grouped_step_us"}
    assert all(0 < v < 1e5 for v in figures.values())


def test_tf32x3_is_opt_in_per_call_and_matches_float64(monkeypatch, caplog):
    """``ADAPTERFAST_TF32X3=1`` turns fp32 dots to tf32x3 when torch does not allow TF32 (read per call)
    up to r = 128 (beyond: exact dots and a warning); torch's TF32 flag wins, 16-bit operands ignore it.
    The AOT check (test_compile_check) shows that the tf32x3 kernels use tensor cores; here the
    interpreter checks the results against float64."""
    from adapterfast.kernels import forward_kernel

    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        monkeypatch.delenv(launch.TF32X3_ENV, raising=False)
        assert launch.dot_precision(torch.float32) == "ieee"
        monkeypatch.setenv(launch.TF32X3_ENV, "1")
        assert launch.dot_precision(torch.float32, 8) == "tf32x3"
        assert launch.dot_precision(torch.bfloat16, 8) == "ieee"
        t = make_inputs(12, 48, 8, torch.float32)
        plan = forward_kernel.plan(t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], "relu", 1.0, 0.0, None,
                                   None)[2]
        assert plan.kwargs["INPUT_PRECISION"] == "tf32x3"
        check_case(33, 70, 12, torch.float32, "gelu", p=0.1, residual=True)
        assert launch.dot_precision(torch.float32, 128) == "tf32x3"
        with caplog.at_level(logging.WARNING, logger="adapterfast"):
            assert launch.dot_precision(torch.float32, 129) == "ieee"
        assert "ADAPTERFAST_TF32X3=1 is ignored" in caplog.text and "r=129" in caplog.text
        torch.backends.cuda.matmul.allow_tf32 = True
        assert launch.dot_precision(torch.float32) == "tf32"
        monkeypatch.setenv(launch.TF32X3_ENV, "0")
        torch.backends.cuda.matmul.allow_tf32 = False
        assert launch.dot_precision(torch.float32) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
