"""The GPU check (``benchmarks/gpu_check.sh``) run end to end on CPU: ``GPU_CHECK_DRY_RUN=1``.

The dry run takes the same steps, code paths and file layout as the GPU run (Triton in its
interpreter, tiny shapes), so a GPU never sees the script for the first time.
"""
import json
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("env", "warm", "correct", "kernels", "ops", "host", "ncu", "tests")
LOGGED = ("env", "warm", "correct", "kernels", "ops", "host", "tests_kernels", "tests_gpu")


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    files = sorted(p.name for p in out.iterdir())
    assert files == ["logs.tar.gz", "results.jsonl", "summary.json", "summary.md"], files

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    records = summary["records"]
    assert not [r for r in records if "error" in r], [r for r in records if "error" in r]
    assert set(STEPS) <= {r["step"] for r in records}
    correct = [r for r in records if r["step"] == "correct"]
    assert {r["name"] for r in correct} == {"accuracy", "backward_bitwise", "dropout_mask", "strided", "huge_forward",
                                            "grouped"}
    assert all(r["ok"] for r in correct)
    kernels = {r["kernel"] for r in records if r["step"] == "kernels"}
    assert kernels == {"forward", "backward_dh", "backward_dxdw", "reduce", "step"}
    assert {r["name"] for r in records if r["step"] == "ops"} >= {
        "eager", "addmm", "compile", "compile_max_autotune", "adapterfast", "cuda_graph", "grouped", "grouped_loop",
        "grouped_single"}
    host = [r for r in records if r["step"] == "host"]
    assert {(r["name"], r.get("call")) for r in host} >= {
        ("eager", "forward"), ("eager", "step"), ("adapterfast", "forward"), ("adapterfast", "step"),
        ("adapterfast layer", "launch backward_dxdw"), ("adapterfast layer", "reduce"), ("profile", None)}
    assert all(r["host_us"] > 0 for r in host if "host_us" in r)
    tests = {r["name"]: r for r in records if r["step"] == "tests"}
    assert int(tests["tests_kernels"]["tests"]) > 0 and tests["tests_kernels"]["failures"] == "0"
    assert "## kernels" in (out / "summary.md").read_text()

    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
        steps_log = tar.extractfile("logs/steps.log").read().decode()
    assert "logs/host_profile.txt" in names
    for step in LOGGED:
        assert f"logs/{step}.log" in names
        # the dry run's -m gpu selection is empty (pytest's exit 5): the step ran, nothing failed
        empty = step == "tests_gpu" and "tests_gpu rc=5 " in steps_log and "(no tests selected)" in steps_log
        assert f"{step} rc=0" in steps_log or empty, steps_log


def test_skipped_steps_leave_only_the_summary(tmp_path):
    """``GPU_CHECK_SKIP`` names steps not to run: a rerun of some steps costs no time on the others."""
    out = tmp_path / "out"
    every = "env warm correct kernels ops host ncu tests_kernels tests_gpu"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable, GPU_CHECK_SKIP=every)
    run = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with tarfile.open(out / "logs.tar.gz") as tar:
        steps_log = tar.extractfile("logs/steps.log").read().decode()
    for step in every.split():
        if step != "ncu":
            assert f"{step} skipped: GPU_CHECK_SKIP" in steps_log, steps_log
    records = json.loads((out / "summary.json").read_text())["records"]
    assert {r["step"] for r in records} <= {"ncu", "tests"}, records
