"""The grouped op's tools: its Triton kernels compile ahead of time for sm_80/sm_90 (what the interpreter
cannot check), and ``python -m benchmarks.grouped`` runs end to end on a tiny problem."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_grouped_kernels_compile_for_sm80_and_sm90():
    pytest.importorskip("triton")
    done = _run(["-m", "adapterfast.grouped_compile_check", "--dtypes", "bf16", "fp32", "--ranks", "16"], 900)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2 * 3 * 2
    for row in rows:
        assert row["shared"] <= 163 * 1024, row
        if row["dtype"] == "bf16":
            assert row["tensor_cores"], row


def test_benchmark_smoke():
    done = _run(["-m", "benchmarks.grouped", "--adapters", "2", "--rows", "64", "--d", "32", "--r", "4",
                 "--rounds", "1", "--min-run-time", "0.01", "--dtypes", "float32", "--threads", "1", "--clock", "cpu",
                 "--no-save"], 600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("float32")]
    assert len(lines) == 2 and "forward" in lines[0] and "fwd+bwd" in lines[1]
    assert "'allocator': 'keep'" in done.stdout
