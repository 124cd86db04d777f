"""Which backend computes the op for a given input, and how a user forces one.

Three backends implement the same two functions (``forward`` and ``backward``, see
``reference.py``): ``triton`` (``adapterfast.kernels``) for CUDA tensors, and for CPU tensors when
``TRITON_INTERPRET=1``; ``cpu`` (``adapterfast.cpu``, the C++ extension) for CPU tensors; and
``reference`` (eager PyTorch) everywhere. ``auto`` picks the fused backend for the device and
falls back to the reference, saying so once, where the fused one does not apply. A forced backend
that cannot run the input is an error, never a silent fallback.

The choice is process-wide (like ``torch.backends`` flags) so that a backward running on an
autograd worker thread sees the same backend as its forward.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from types import ModuleType

import torch

from ._log import warn_once

NAMES = ("auto", "triton", "cpu", "reference")
TRITON_MAX_R = 256
ENV_VAR = "ADAPTERFAST_BACKEND"

_DTYPES = {
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "reference": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}
_MODULES = {"triton": "adapterfast.kernels", "cpu": "adapterfast.cpu", "reference": "adapterfast.reference"}
_forced: str | None = None


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """What ``backends()`` reports for one backend."""

    name: str
    available: bool
    reason: str | None
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]


def _check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown adapterfast backend {name!r}; choose one of {', '.join(NAMES)}")
    return name


def current() -> str:
    """The backend in force: the innermost ``use_backend``, else ``$ADAPTERFAST_BACKEND``, else auto."""
    if _forced is not None:
        return _forced
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Forces a backend (``"triton"``, ``"cpu"``, ``"reference"`` or ``"auto"``) inside a ``with`` block."""
    global _forced
    _check_name(name)
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _unavailable(name: str) -> str | None:
    """Why a backend cannot run in this process at all, or None if it can."""
    if name == "reference":
        return None
    if name == "triton":
        if not (torch.cuda.is_available() or _interpreting()):
            return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors)"
        try:
            importlib.import_module(_MODULES["triton"])
        except ImportError as error:
            return f"the Triton kernels could not be imported: {error}"
        return None
    try:
        cpu = importlib.import_module(_MODULES["cpu"])
    except ImportError as error:
        return f"adapterfast.cpu could not be imported: {error}"
    return None if cpu.available() else cpu.unavailable_reason()


def backends() -> dict[str, BackendInfo]:
    """Each backend, whether it can run here, and why not if it cannot."""
    devices = {"triton": ("cuda",) + (("cpu",) if _interpreting() else ()), "cpu": ("cpu",), "reference": ("any",)}
    report = {}
    for name in ("triton", "cpu", "reference"):
        reason = _unavailable(name)
        report[name] = BackendInfo(name, reason is None, reason, devices[name], _DTYPES[name])
    return report


def _cannot_run(name: str, x: torch.Tensor, r: int) -> str | None:
    """Why backend ``name`` cannot compute this input, or None if it can."""
    device = x.device.type
    if name == "triton" and not (device == "cuda" or (device == "cpu" and _interpreting())):
        return f"the triton backend runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"
    if name == "cpu" and device != "cpu":
        return f"the cpu backend runs CPU tensors, got {device}"
    if x.dtype not in _DTYPES[name]:
        return f"the {name} backend does not support {x.dtype}"
    if name == "triton" and r > TRITON_MAX_R:
        return f"the triton backend supports r <= {TRITON_MAX_R}, got r={r}"
    return _unavailable(name)


def select(x: torch.Tensor, r: int) -> ModuleType:
    """The backend module that computes the op for input ``x`` with bottleneck size ``r``."""
    name = current()
    if name != "auto":
        reason = _cannot_run(name, x, r)
        if reason is not None:
            raise ValueError(f"adapterfast backend {name!r} was forced but cannot run this input: {reason}")
        return importlib.import_module(_MODULES[name])
    fused = "cpu" if x.device.type == "cpu" else "triton"
    reason = _cannot_run(fused, x, r)
    if reason is None:
        return importlib.import_module(_MODULES[fused])
    warn_once(f"adapterfast: falling back to the eager reference: {reason}")
    return importlib.import_module(_MODULES["reference"])
