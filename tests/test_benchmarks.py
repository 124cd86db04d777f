"""The benchmark suite: its measurements are what they claim, and its scripts run end to end.

- pytest-benchmark timings of eager vs adapterfast fwd+bwd at small CPU shapes (few rounds, so
  ``make test`` stays fast; ``--benchmark-disable`` turns them into one-call checks);
- the pieces of ``benchmarks/`` checked in process: shape presets and parsing, the statistics,
  the providers computing the same thing from the same weights, the CPU memory measure, the
  floor and ratio arithmetic of a result row;
- smoke tests running ``python -m benchmarks``, ``benchmarks.e2e``, ``benchmarks.table`` and
  ``benchmarks.plot`` as a user would, on tiny shapes;
- on a GPU, the CUDA timer and memory measure.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import memory, providers, results, run, shapes, timing  # noqa: E402

# --- pytest-benchmark: eager vs adapterfast, forward + backward, CPU --------------------------

BENCH_SHAPES = [(1024, 256, 16), (2048, 768, 64)]


@pytest.mark.benchmark(group="adapter fwd+bwd cpu fp32")
@pytest.mark.parametrize("n,d,r", BENCH_SHAPES, ids=[f"N{n}-d{d}-r{r}" for n, d, r in BENCH_SHAPES])
@pytest.mark.parametrize("provider", ["eager", "adapterfast"])
def test_bench_fwd_bwd_cpu(benchmark, provider, n, d, r):
    (built,) = providers.build([provider], d, r, "relu", torch.float32, "cpu")
    x = torch.randn(n, d, requires_grad=True)
    g = torch.randn(n, d)
    inputs = [x] + built.params

    def step():
        return torch.autograd.grad(built.module(x), inputs, g)

    grads = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    assert grads[0].shape == x.shape and all(torch.isfinite(t).all() for t in grads)


# --- shapes and statistics ----------------------------------------------------------------------


def test_presets_cover_the_cpu_speed_targets():
    quick = shapes.preset("cpu", quick=True)
    targets = {(8192, d, r) for d in (768, 1024, 4096) for r in (16, 64)}
    assert targets <= {(p.N, p.d, p.r) for p in quick if p.dtype == "fp32" and p.activation == "relu"}
    assert any(p.dtype == "bf16" for p in quick) and any(p.activation == "gelu" for p in quick)
    full = shapes.preset("cpu", quick=False)
    assert len(full) == 3 * 3 * 3 * 2 * 2
    assert {p.N for p in full} == {2048, 8192, 32768}
    cuda = shapes.preset("cuda", quick=False)
    assert {p.d for p in cuda} == {768, 1024, 4096, 8192} and {p.dtype for p in cuda} == {"bf16", "fp16"}
    assert {p.r for p in cuda} == {16, 64, 256} and min(p.N for p in cuda) == 4096 and max(p.N for p in cuda) == 65536


def test_shapes_option():
    points = shapes.select("cpu", False, ["8192,768,16", "1024x64x8,gelu"], "fp32,bf16", None)
    assert shapes.Point(8192, 768, 16, "relu", "fp32") in points
    assert shapes.Point(1024, 64, 8, "gelu", "bf16") in points
    assert len(points) == 4
    assert all(p.dtype == "bf16" for p in shapes.select("cuda", True, None, None, None)[:8])
    assert {p.activation for p in shapes.select("cpu", True, None, None, "gelu")} == {"gelu"}
    for bad in ("8192,768", "a,b,c", "8192,768,0", "8192,768,16,swish"):
        with pytest.raises(ValueError):
            shapes.parse_shape(bad)
    with pytest.raises(ValueError):
        shapes.parse_dtypes("fp8")


def test_summarize():
    stats = timing.summarize([0.004, 0.001, 0.003, 0.002, 0.005])  # seconds
    assert stats["median_ms"] == pytest.approx(3.0)
    assert stats["q25_ms"] == pytest.approx(2.0) and stats["q75_ms"] == pytest.approx(4.0)
    assert stats["iqr_ms"] == pytest.approx(2.0) and stats["min_ms"] == pytest.approx(1.0)
    assert stats["samples"] == 5
    assert timing.summarize([])["median_ms"] is None


# --- providers compute the same op from the same weights ---------------------------------------


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_providers_agree(activation):
    n, d, r = 64, 48, 8
    built = providers.build(["eager", "adapterhub", "adapterfast"], d, r, activation, torch.float32, "cpu")
    x = torch.randn(n, d, requires_grad=True)
    g = torch.randn(n, d)
    want = None
    for provider in built:
        if provider.skip:
            assert provider.name == "adapterhub", provider.skip  # only the optional dependency may be missing
            continue
        y = provider.module(x)
        grads = torch.autograd.grad(y, [x] + provider.params, g)
        got = [y.detach(), grads[0], *run._weight_grads(provider, grads, d, r)]
        assert all(t is not None for t in got), provider.name
        if want is None:
            want = got
            continue
        for a, b in zip(got, want):
            assert run._rel_err(a, b) < 1e-5, provider.name


def test_seed_adapter_is_the_seed():
    seed = providers.EagerAdapter(32, 4)
    x = torch.randn(5, 32)
    assert torch.equal(seed(x), x + seed.up(torch.relu(seed.down(x))))
    assert seed.down.bias is None and seed.up.bias is None


# --- memory and result rows --------------------------------------------------------------------


def test_cpu_peak_memory_counts_tensor_allocations():
    mib = 1 << 20

    def two_then_one():
        a = torch.empty(4 * mib, dtype=torch.uint8)
        b = torch.empty(4 * mib, dtype=torch.uint8)
        del a
        return b

    measured = memory.cpu_peak(two_then_one)
    assert measured["peak_bytes"] == pytest.approx(8 * mib, rel=0.01)
    assert measured["retained_bytes"] == pytest.approx(4 * mib, rel=0.01)


def test_rows_floor_and_ratios():
    point = shapes.Point(1000, 100, 8, "relu", "bf16")
    args = run.parse_args(["--shapes", "1000,100,8", "--passes", "fwd,full"])
    fake = {}
    for name, fwd_ms, full_ms, peak in (("eager", 4.0, 12.0, 400), ("compile", 2.0, 8.0, 300),
                                        ("adapterfast", 1.0, 2.0, 200)):
        fake[name] = {"provider": providers.Provider(name, None, []),
                      "passes": {"fwd": {"median_ms": fwd_ms, "peak_bytes": peak},
                                 "full": {"median_ms": full_ms, "peak_bytes": peak}}}
    rows = run.rows_for_point(point, fake, {"device": "cpu", "run_id": "t"}, bandwidth=1e9, args=args)
    by = {(r["provider"], r["pass"]): r for r in rows}
    fast_fwd, fast_full = by[("adapterfast", "fwd")], by[("adapterfast", "full")]
    assert fast_fwd["floor_bytes"] == 2 * 1000 * 100 * 2  # read x, write y; bf16
    assert fast_full["floor_bytes"] == 5 * 1000 * 100 * 2
    assert fast_fwd["floor_ms"] == pytest.approx(2 * 1000 * 100 * 2 / 1e9 * 1e3)
    assert fast_fwd["floor_fraction"] == pytest.approx(fast_fwd["floor_ms"] / 1.0)
    assert fast_fwd["speedup_vs_eager"] == pytest.approx(4.0) and fast_fwd["speedup_vs_compile"] == pytest.approx(2.0)
    assert fast_full["speedup_vs_eager"] == pytest.approx(6.0) and fast_full["speedup_vs_compile"] == pytest.approx(4.0)
    assert fast_full["mem_vs_eager"] == pytest.approx(0.5)
    assert by[("eager", "full")]["speedup_vs_eager"] == pytest.approx(1.0)
    assert fast_full["speedup_vs_compile_max_autotune"] is None


def test_results_pick_latest_run(tmp_path):
    path = str(tmp_path / "ops.jsonl")
    for run_id, stamp, device in (("a", "2026-01-01T00:00:00", "cpu"), ("b", "2026-01-02T00:00:00", "cpu"),
                                  ("c", "2026-01-01T12:00:00", "cuda")):
        results.append(path, {"run_id": run_id, "timestamp": stamp, "device": device, "median_ms": float("nan")})
    with open(path, "a") as f:
        f.write('{"run_id": "cut sho')  # a row cut short by a killed run is skipped
    rows = results.read(path)
    assert len(rows) == 3 and rows[0]["median_ms"] is None
    assert {r["run_id"] for r in results.pick(rows)} == {"b", "c"}
    assert {r["run_id"] for r in results.pick(rows, device="cpu")} == {"b"}
    assert len(results.pick(rows, "all")) == 3


# --- the scripts, end to end -------------------------------------------------------------------


def _env():
    """The user's environment: the repository importable, no Triton interpreter (conftest sets it)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(*args, timeout=600):
    env = _env()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_benchmark_scripts_smoke(tmp_path):
    out = tmp_path / "results"
    _run("-m", "benchmarks", "--device", "cpu", "--quick", "--shapes", "256,64,8", "--out", str(out),
         "--min-run-time", "0.01", "--rounds", "1", "--no-progress")
    rows = results.read(str(out / results.OPS_FILE))
    names = {r["provider"] for r in rows}
    assert {"eager", "compile", "adapterfast"} <= names and "compile_max_autotune" not in names
    assert {r["pass"] for r in rows} == {"fwd", "bwd", "full"}
    fast = next(r for r in rows if r["provider"] == "adapterfast" and r["pass"] == "full")
    for field in ("run_id", "timestamp", "device_name", "torch", "triton", "adapterfast", "threads", "median_ms",
                  "iqr_ms", "peak_bytes", "floor_fraction", "speedup_vs_eager", "speedup_vs_compile", "backend"):
        assert fast.get(field) is not None, field
    assert (fast["N"], fast["d"], fast["r"], fast["dtype"], fast["device"]) == (256, 64, 8, "fp32", "cpu")
    assert fast["check"] == "ok" and fast["median_ms"] > 0 and fast["peak_bytes"] > 0
    assert {r["allocator"] for r in rows} == {"keep"}
    assert all(r.get("error") is None for r in rows), [r["error"] for r in rows if r.get("error")]

    _run("-m", "benchmarks.e2e", "--device", "cpu", "--quick", "--layers", "1", "--d-model", "64", "--heads", "2",
         "--seq", "8", "--batch", "2", "--r", "8", "--rounds", "1", "--min-run-time", "0.01", "--out", str(out))
    e2e = results.read(str(out / results.E2E_FILE))
    assert {r["provider"] for r in e2e} == {"eager", "adapterfast"}
    assert all(r["tokens_per_s"] > 0 and r["kind"] == "e2e" for r in e2e)

    table = _run("-m", "benchmarks.table", "--results", str(out)).stdout
    assert "| 256 × 64, r=8, relu, fp32 |" in table and "full step" in table and "End-to-end" in table
    plots = _run("-m", "benchmarks.plot", "--results", str(out)).stdout.split()
    assert {Path(p).name for p in plots} == {"speedup_cpu.png", "memory_cpu.png", "floor_cpu.png", "e2e_cpu.png"}
    for p in plots:
        assert Path(p).read_bytes()[:4] == b"\x89PNG"


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("there is a GPU")
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--device", "cuda", "--quick"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0


# --- the CUDA measurement path ------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_timer_and_memory():
    timer = timing.CudaTimer()
    a = torch.randn(4096, 4096, device="cuda")
    times = timer.times(lambda: a @ a, 0.05)
    assert len(times) >= 1 and all(t > 0 for t in times)
    after = timer.times_after(lambda: a + 1, lambda b: b @ b, 0.05)
    assert len(after) >= 10 and all(t > 0 for t in after)
    assert timer.copy_bandwidth(nbytes=256 << 20, min_run_time=0.05) > 1e10  # > 10 GB/s on any GPU
    measured = memory.cuda_peak(lambda: torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))
    assert measured["peak_bytes"] >= 64 << 20 and measured["retained_bytes"] >= 64 << 20
    x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16)
    assert providers.adapterfast_backend(x, 16) in ("triton", "reference")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_benchmark_point_bf16():
    args = run.parse_args(["--device", "cuda", "--shapes", "4096,768,16", "--dtype", "bf16", "--rounds", "1",
                           "--min-run-time", "0.02", "--providers", "eager,adapterhub,adapterfast"])
    found = run.measure_point(args.points[0], args, timing.CudaTimer(), "cuda")
    rows = run.rows_for_point(args.points[0], found, {"device": "cuda", "run_id": "t"}, 3e12, args)
    fast = [r for r in rows if r["provider"] == "adapterfast"]
    assert len(fast) == 3 and all(r["median_ms"] > 0 and r["peak_bytes"] is not None for r in fast)
    assert fast[0]["check"] == "ok", fast[0]


# ----------------------------------------------------------------------------- quiet, and tracked results untouched

def test_native_stderr_is_silenced_but_python_stderr_is_not(capfd):
    with run.native_stderr_silenced():
        os.write(2, b"USDT: from C++\n")
        print("from python", file=sys.stderr)
    os.write(2, b"after\n")
    err = capfd.readouterr().err
    assert "from python" in err and "after" in err and "USDT" not in err


def test_default_run_is_quiet_and_writes_a_new_file(tmp_path, monkeypatch, capfd):
    tracked = os.path.join(results.DEFAULT_DIR, results.OPS_FILE)
    before = os.path.getsize(tracked) if os.path.exists(tracked) else None
    monkeypatch.setattr(results, "RUNS_DIR", str(tmp_path))
    assert run.main(["--device", "cpu", "--quick", "--allocator", "system", "--shapes", "64,32,4",
                     "--providers", "eager,adapterfast",
                     "--passes", "fwd", "--rounds", "1", "--min-run-time", "0.01", "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert "USDT" not in err and "profiler" not in err, err
    written = list(tmp_path.glob("ops-*.jsonl"))
    assert len(written) == 1 and str(written[0]) in err
    assert {r["provider"] for r in results.read(str(written[0]))} == {"eager", "adapterfast"}
    assert (os.path.getsize(tracked) if os.path.exists(tracked) else None) == before


def test_cpu_paths_summary_and_background_load():
    from benchmarks import cpu_paths

    lines = cpu_paths.summary({"no-steal": [4.0, 6.0, 5.0], "default": [4.0, 4.0, 5.0]})
    assert "no-steal" in lines[0] and "5.00 ms" in lines[0] and "1.00x" in lines[0]
    assert "default" in lines[1] and "4.00 ms" in lines[1] and "1.25x" in lines[1]

    def busy_seconds():
        children = os.times()
        return children.children_user + children.children_system

    before = busy_seconds()
    with cpu_paths.background_load(0.5):
        time.sleep(1.0)
    # The busy process has been waited for, and while it ran it kept a CPU about half busy.
    assert 0.2 < busy_seconds() - before < 1.0


@pytest.mark.slow
def test_cpu_paths_runs_the_no_steal_path():
    done = _run("-m", "benchmarks.cpu_paths", "--dtype", "fp32", "--paths", "no-steal,default", "--shapes",
                "256,64,8", "--repeats", "1", "--background-load", "0.2")
    assert "background load 0.2 of one CPU" in done.stdout
    assert "N=256 d=64 r=8 no-steal" in done.stdout and "first path / this" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks.cpu_paths", "--background-load", "1.5"], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--background-load must be in [0, 1)" in bad.stderr
