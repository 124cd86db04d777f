"""``python -m benchmarks.overhead`` on a tiny grid: both providers timed per cell, ratios and tables."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import allocator, overhead  # noqa: E402


def test_tiny_grid_writes_rows_and_tables(tmp_path, capsys):
    out = tmp_path / "overhead.jsonl"
    assert overhead.main(["--n", "1", "8", "--d", "32", "--r", "4", "--threads", "1", "--rounds", "1",
                          "--min-run-time", "0.01", "--allocator", "system", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["N"], r["pass"]) for r in rows} == {(1, "train"), (1, "infer"), (8, "train"), (8, "infer")}
    for row in rows:
        assert row["eager_ms"] > 0 and row["adapterfast_ms"] > 0
        assert abs(row["ratio"] - row["eager_ms"] / row["adapterfast_ms"]) < 1e-9
        assert row["backend"] in ("cpu", "reference", "triton")
    printed = capsys.readouterr().out
    assert "| N | train 1T d=32 | infer 1T d=32 |" in printed
    assert overhead.main(["--results", str(out)]) == 0
    assert "cells at >= 1.0x" in capsys.readouterr().out


def test_thread_clock_times_one_thread_only(capsys):
    assert overhead.main(["--n", "8", "--d", "32", "--r", "4", "--threads", "1", "--rounds", "1",
                          "--min-run-time", "0.01", "--allocator", "system", "--clock", "thread"]) == 0
    assert "thread clock" in capsys.readouterr().out
    try:
        overhead.main(["--n", "8", "--d", "32", "--threads", "2", "--clock", "thread"])
    except SystemExit as exit_:
        assert exit_.code == 2
    else:
        raise AssertionError("--clock thread with 2 threads must be refused")
    times = overhead.ThreadClockTimer().times(lambda: sum(range(1000)), 0.0, min_samples=3)
    assert len(times) == 3 and all(t >= 0 for t in times)


def test_bf16_runs_both_modules_in_bf16(tmp_path, capsys):
    out = tmp_path / "overhead.jsonl"
    assert overhead.main(["--n", "8", "--d", "32", "--r", "4", "--threads", "1", "--rounds", "1",
                          "--min-run-time", "0.01", "--allocator", "system", "--dtype", "bf16", "--out", str(out)]) == 0
    assert "vs the eager seed adapter, bf16," in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["dtype"] == "bf16" for r in rows)
    modules = overhead._pair(32, 4, "cpu", overhead.DTYPES["bf16"])
    assert {p.dtype for m in modules.values() for p in m.parameters()} == {overhead.torch.bfloat16}
    assert overhead.main(["--results", str(out)]) == 0
    assert ", bf16" in capsys.readouterr().out.splitlines()[0]


def test_train_call_is_one_layer_step_with_the_same_gradients():
    """The timed train call returns dx and every parameter's gradient, equal for both modules,
    and leaves no state behind (no x.grad to accumulate into on the next call)."""
    modules = overhead._pair(32, 4, "cpu", overhead.torch.float64)
    x = overhead.torch.randn(8, 32, dtype=overhead.torch.float64, requires_grad=True)
    g = overhead.torch.randn(8, 32, dtype=overhead.torch.float64)
    eager, fused = (overhead._call(modules[name], x, g, "train")() for name in ("eager", "adapterfast"))
    assert len(eager) == len(fused) == 1 + len(list(modules["eager"].parameters()))
    for e, f in zip(eager, fused):
        overhead.torch.testing.assert_close(f, e)
    assert x.grad is None
    assert all(p.grad is None for m in modules.values() for p in m.parameters())


def test_rates_give_each_cells_gemm_rate_beside_matmuls(tmp_path, capsys):
    """--rates: every row carries torch.matmul's rate, and the table's rates are the pass's
    12 N d r (train) or 4 N d r (infer) FLOP over each provider's median time."""
    out = tmp_path / "overhead.jsonl"
    assert overhead.main(["--n", "64", "--d", "32", "--r", "4", "--threads", "1", "--rounds", "1",
                          "--min-run-time", "0.01", "--allocator", "system", "--rates", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["pass"] for r in rows} == {"train", "infer"}
    for row in rows:
        assert row["matmul_gflops"] == max(row["matmul_gflops_before"], row["matmul_gflops_after"]) > 0
    printed = capsys.readouterr().out
    for row in rows:
        gflop = overhead.FLOP_PER_NDR[row["pass"]] * 64 * 32 * 4 / 1e9
        fused = gflop / (row["adapterfast_ms"] / 1e3)
        expected = (f"| 1 | {row['pass']} | 32 | 64 | {gflop:.3g} | {gflop / (row['eager_ms'] / 1e3):.1f} "
                    f"| {fused:.1f} | {row['matmul_gflops']:.1f} | {fused / row['matmul_gflops']:.0%} |")
        assert expected in printed
    assert overhead.main(["--results", str(out)]) == 0
    assert "matmul 2048^3 GFLOP/s" in capsys.readouterr().out


def test_keep_allocator_is_recorded_with_each_cells_page_faults(tmp_path):
    """The default --allocator keep (in a child process: it changes the process's malloc for good)
    is named in the header and on every row, beside both modules' page faults per call."""
    out = tmp_path / "overhead.jsonl"
    done = subprocess.run([sys.executable, "-m", "benchmarks.overhead", "--n", "64", "--d", "32", "--r", "4",
                           "--threads", "1", "--rounds", "1", "--min-run-time", "0.01", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "allocator keep" in done.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and {r["allocator"] for r in rows} == {"keep"}
    assert all(r["eager_faults"] >= 0 and r["adapterfast_faults"] >= 0 for r in rows)


_REALLOCATE = """
import sys, torch
from benchmarks import allocator
print(allocator.configure(sys.argv[1]))
def fill():
    torch.ones(16 << 20)  # 64 MiB: above the largest mmap threshold glibc moves to on its own (32 MiB)
for _ in range(32):  # kept, the first few grow the heap until the aligned blocks fit the freed ones
    fill()
print(allocator.faults_per_call(fill, calls=4))
"""


@pytest.mark.parametrize("choice", allocator.CHOICES)
def test_keep_allocator_reuses_freed_memory_without_page_faults(choice):
    """A 64 MiB tensor allocated, filled and freed again and again: under glibc's defaults each one
    is a fresh mapping (16384 pages, a fault each); kept, after a few calls the freed memory serves
    the next one."""
    done = subprocess.run([sys.executable, "-c", _REALLOCATE, choice], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    in_force, faults = done.stdout.split()
    if in_force != choice:
        pytest.skip(f"this C library cannot keep freed memory ({in_force})")
    assert (float(faults) < 1000) if choice == "keep" else (float(faults) > 10000), faults


def test_allocator_choice_is_checked():
    assert allocator.configure("system") == "system"
    with pytest.raises(ValueError, match="allocator must be one of"):
        allocator.configure("jemalloc")
    calls = []
    assert allocator.faults_per_call(lambda: calls.append(1), calls=4) >= 0 and len(calls) == 5


def test_summary_names_the_cells_with_page_faults():
    row = {"N": 8, "d": 32, "threads": 1, "pass": "train", "ratio": 1.5, "eager_faults": 0.0, "adapterfast_faults": 0.0}
    assert "page faults" not in overhead.summary([row])
    faulting = {**row, "N": 4096, "ratio": 2.0, "eager_faults": 2016.0}
    text = overhead.summary([row, faulting])
    assert "eager: page faults in 1 cells, at most 2016 per call (train, N=4096, d=32, 1 thread(s))" in text
    assert "adapterfast: page faults" not in text
