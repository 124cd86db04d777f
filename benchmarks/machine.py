"""What is recorded with every result row: machine, software versions, threads, time, commit."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import uuid
from importlib import metadata

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def quiet_compile_workers(device: str) -> None:
    """On CPU, makes inductor compile in-process: its default pool of compile subprocesses starts
    (importing torch) in the background after the first compile and would steal the CPUs being
    measured for the next seconds. On CUDA the pool is kept (kernel compiles are CPU work outside
    the timed GPU region)."""
    if device == "cpu":
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1


# The CPU features that decide which CPU kernels run (adapterfast.cpu.kernel_isa): AMX tiles,
# AVX512 bf16/fp16 dot products, AVX-512 itself.
_CPU_FLAGS = ("amx_bf16", "amx_fp16", "amx_tile", "avx512_bf16", "avx512_fp16", "avx512f", "avx2")


def cpu_flags() -> list[str]:
    """Which of _CPU_FLAGS /proc/cpuinfo lists (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in _CPU_FLAGS if flag in present]
    except OSError:
        pass
    return []


def cpu_kernels() -> dict | None:
    """What adapterfast's CPU backend runs per dtype here (None when it is not built)."""
    from adapterfast import cpu

    if not cpu.available():
        return None
    return {name: cpu.kernel_isa(dtype) for name, dtype in
            (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"{cpu_name()} ({cpu_count()} CPUs)"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}{'+dirty' if dirty else ''}" if commit else None


def describe(device: str, threads: int | None) -> dict:
    """The fields shared by all rows of one run."""
    import adapterfast

    info = {
        "run_id": uuid.uuid4().hex[:12],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(device),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "adapterfast": getattr(adapterfast, "__version__", None),
        "adapters": _version("adapters"),
        "transformers": _version("transformers"),
        "git_commit": _git_commit(),
        "threads": threads,
    }
    if device == "cpu":
        info["cpu_flags"] = cpu_flags()
        info["cpu_kernels"] = cpu_kernels()
    if device == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info
