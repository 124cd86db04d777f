"""The GPU check's shared parts: run mode, shapes, timing, incremental records, and its steps ``env`` and ``pack``.

    python -m benchmarks.gpu_check env|pack          (benchmarks/gpu_check.sh runs every step)

Every step is its own process, run by ``gpu_check.sh`` under a timeout (SIGINT first). A step
appends one JSON object per result to ``$OUT_DIR/results.jsonl`` as soon as it has it (flushed),
so a step that is killed still leaves what it measured; ``pack`` turns the records into
``summary.json`` (every figure) and ``summary.md`` (tables).

``GPU_CHECK_DRY_RUN=1`` runs the same steps on CPU: Triton in its interpreter, tiny shapes, a
couple of timing repetitions, ``torch.compile`` with the ``eager`` backend, no ``nvidia-smi`` or
``ncu``. The dry run is a test (``tests/test_gpu_check_dry_run.py``), so the script is known to
run end to end before a GPU sees it.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

DRY = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
OUT_DIR = os.environ.get("OUT_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_check")
RESULTS = os.path.join(OUT_DIR, "results.jsonl")
OPTIONAL = ("numpy", "triton", "transformers", "peft", "adapters", "matplotlib", "pytest", "xdist", "pytest_timeout")

# (N, d, r): correctness at real sizes, the two timing shapes of the issue, and the > 2**31 case.
CORRECT_SHAPES = [(48, 80, 4), (40, 96, 16)] if DRY else [(16384, 4096, 16), (16384, 4096, 64), (16384, 4096, 256)]
TIMING_SHAPES = [(64, 96, 8), (32, 48, 4)] if DRY else [(16384, 4096, 64), (8192, 768, 16)]
HUGE_SHAPE = (40, 64, 8) if DRY else (524800, 4096, 64)
GROUPED_SHAPE = (45, 48, 8) if DRY else (8192, 768, 16)  # issue 18's benchmark shape


def device() -> str:
    return "cpu" if DRY else "cuda"


def record(step: str, **fields) -> dict:
    """Appends one result to ``results.jsonl`` (flushed at once) and echoes it to stdout."""
    row = {"step": step, "time": round(time.time(), 3), **fields}
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
    print(json.dumps(row, default=str), flush=True)
    return row


def guarded(step: str, name: str, fn, *args, **kwargs):
    """Runs ``fn``; an exception becomes an ``error`` record (the step goes on), Ctrl-C ends the step."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        record(step, name=name, error="interrupted (step timeout)")
        raise
    except Exception as error:  # one failing case must not cost the rest of the run
        record(step, name=name, error=f"{type(error).__name__}: {str(error).strip()[:500]}")
        return None


def sync() -> None:
    if not DRY:
        import torch

        torch.cuda.synchronize()


def bench_ms(fn, *, rep_ms: int = 60) -> float:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` (CUDA events) on GPU, two calls in a dry run."""
    if DRY:
        times = []
        for _ in range(2):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))


def versions() -> dict:
    """Python, torch, CUDA, and every optional package: version, or why it is missing."""
    import torch

    found = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
             "cuda": torch.version.cuda}
    for name in OPTIONAL:
        try:
            module = importlib.import_module(name)
            found[name] = getattr(module, "__version__", "present")
        except Exception as error:  # noqa: BLE001 - a missing optional package is a fact to record
            found[name] = f"missing ({type(error).__name__})"
    return found


def tf32_flags() -> dict:
    """Both TF32 APIs' values (the legacy read can raise once the new API was used)."""
    import torch

    flags = {"fp32_precision": getattr(torch.backends.cuda.matmul, "fp32_precision", "absent"),
             "backends.fp32_precision": getattr(torch.backends, "fp32_precision", "absent")}
    try:
        flags["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    except RuntimeError as error:
        flags["allow_tf32"] = f"raises: {str(error)[:80]}"
    return flags


def _nvidia_smi() -> str:
    if DRY:
        return "dry run: nvidia-smi not run"
    try:
        query = "name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,driver_version"
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
    except Exception as error:  # noqa: BLE001
        return f"nvidia-smi failed: {error}"


def copy_bandwidth_gbs() -> float:
    """Measured device copy bandwidth (read + write bytes / time) of a 1 GiB copy (64 KiB dry)."""
    import torch

    n = (64 << 10) if DRY else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=device())
    dst = torch.empty_like(src)
    return 2 * n / (bench_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def gemm_tflops() -> float:
    """bf16 GEMM throughput, 8192^3 (64^3 fp32 dry): the compute roofline the results are judged against."""
    import torch

    n = 64 if DRY else 8192
    dtype = torch.float32 if DRY else torch.bfloat16
    a = torch.randn(n, n, device=device(), dtype=dtype)
    b = torch.randn(n, n, device=device(), dtype=dtype)
    return 2 * n**3 / (bench_ms(lambda: a @ b) * 1e-3) / 1e12


def env() -> None:
    """Step ``env``: versions, GPU properties, TF32 flags, copy bandwidth and GEMM roofline."""
    import torch

    record("env", name="versions", dry_run=DRY, **versions())
    record("env", name="tf32", **tf32_flags())
    if not DRY:
        props = torch.cuda.get_device_properties(0)
        record("env", name="gpu", gpu=props.name, sm_count=props.multi_processor_count,
               l2_bytes=getattr(props, "L2_cache_size", None), memory_bytes=props.total_memory,
               capability=f"{props.major}.{props.minor}", nvidia_smi=_nvidia_smi())
    else:
        record("env", name="gpu", gpu="none (dry run)", nvidia_smi=_nvidia_smi())
    guarded("env", "copy_bandwidth", lambda: record("env", name="copy_bandwidth", gb_per_s=copy_bandwidth_gbs()))
    guarded("env", "gemm", lambda: record("env", name="gemm_bf16", tflops=gemm_tflops()))


def read_records() -> list[dict]:
    if not os.path.exists(RESULTS):
        return []
    rows = []
    with open(RESULTS) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append({"step": "pack", "error": f"unreadable line: {line[:200]}"})
    return rows


def markdown(rows: list[dict]) -> str:
    """One table per step: the union of the record fields as columns."""
    out = ["# GPU check summary", "", f"{'dry run (CPU, interpreter, tiny shapes)' if DRY else 'GPU run'}; "
           f"{len(rows)} records, {sum('error' in r for r in rows)} with errors.", ""]
    steps = list(dict.fromkeys(r["step"] for r in rows))
    for step in steps:
        group = [r for r in rows if r["step"] == step]
        columns = [c for c in dict.fromkeys(k for r in group for k in r) if c not in ("step", "time")]
        out += [f"## {step}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for r in group:
            cells = []
            for c in columns:
                v = r.get(c, "")
                cells.append(f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/").replace("\n", " ")[:120])
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def pack() -> None:
    """Step ``pack``: ``summary.json`` and ``summary.md`` from the records."""
    rows = read_records()
    with open(os.path.join(OUT_DIR, "summary.json"), "w") as f:
        json.dump({"dry_run": DRY, "records": rows}, f, indent=1, default=str)
    with open(os.path.join(OUT_DIR, "summary.md"), "w") as f:
        f.write(markdown(rows))


def run_step(prog: str, steps: dict, argv: list[str]) -> int:
    """Runs the one step named on the command line; 130 when SIGINT (the step's timeout) stops it."""
    if len(argv) != 1 or argv[0] not in steps:
        print(f"usage: python -m {prog} {'|'.join(steps)}", file=sys.stderr)
        return 2
    try:
        steps[argv[0]]()
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str]) -> int:
    return run_step("benchmarks.gpu_check", {"env": env, "pack": pack}, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
