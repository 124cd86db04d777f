"""Which backend computes the op for a given input, and how a user forces one.

Three backends implement the same two functions (``forward`` and ``backward``, see
``reference.py``) and register them here by name when their module is imported: ``triton``
(``adapterfast/kernels``) for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1``;
``cpu`` (``adapterfast/cpu.py``, the C++ extension) for CPU tensors; and ``reference`` (eager
PyTorch) everywhere. ``select`` returns a backend *name*; ``kernels(name)`` its functions.
``auto`` picks the fused backend for the device and falls back to the reference, saying so once,
where the fused one does not apply. A forced backend that cannot run the input is an error,
never a silent fallback.

Forcing is per thread and per asyncio task (a ``ContextVar``) and undone on any exit from the
``with`` block. A backward does not consult it: the autograd Function records the backend that
ran the forward and its backward uses that one (its saved state and dropout mask belong to it).
``$ADAPTERFAST_BACKEND`` is checked when adapterfast is imported, and again if it changes.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Callable, Optional

import torch

from ._log import warn_once

NAMES = ("auto", "triton", "cpu", "reference")
TRITON_MAX_R = 256
ENV_VAR = "ADAPTERFAST_BACKEND"
DEVICES = {"triton": ("cuda",), "cpu": ("cpu",), "reference": ("any",)}

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("adapterfast_backend", default=None)
_env_seen: tuple[Optional[str], str] = (None, "auto")
_choices: dict[tuple, str] = {}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """A backend's two functions, with the dtypes of x it runs and why it cannot run, if so.

    ``slower_here(dtype)``, where a backend has it, says why auto should not pick the backend for
    inputs of ``dtype`` on this machine although it can run them (it is measured slower than the
    eager reference here), or None; forcing the backend by name still runs it.

    ``differentiable``, where a backend has one, is the op with its derivative in one native
    autograd node, ``(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual)
    -> y``: what an eager call with autograd recording runs instead of ``autograd.FusedAdapter``
    around ``forward``/``backward`` (same results, bitwise; no Python in the backward)."""

    name: str
    forward: Callable
    backward: Callable
    dtypes: tuple[torch.dtype, ...]
    unavailable: Callable[[], Optional[str]]
    differentiable: Optional[Callable] = None
    slower_here: Callable[[torch.dtype], Optional[str]] = lambda dtype: None


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """What ``backends()`` reports for one backend."""

    name: str
    available: bool
    reason: Optional[str]
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]


_registry: dict[str, Kernels] = {}


def register(name: str, *, forward: Callable, backward: Callable, dtypes, unavailable=lambda: None,
             differentiable: Optional[Callable] = None, slower_here=lambda dtype: None) -> None:
    """Called by each backend module when imported: makes ``name`` selectable."""
    if name not in NAMES or name == "auto":
        raise ValueError(f"unknown adapterfast backend {name!r}")
    _registry[name] = Kernels(name, forward, backward, tuple(dtypes), unavailable, differentiable, slower_here)
    _choices.clear()


def _check_name(name, where: str = "") -> str:
    if name not in NAMES:
        raise ValueError(f"unknown adapterfast backend {name!r}{where}; choose one of {', '.join(NAMES)}")
    return name


# os.environ keeps its encoded keys and values in ``_data``; reading it there skips the encoding
# and decoding of ``os.environ.get`` (a measurable share of a small call).
_environ = getattr(os.environ, "_data", None)
_env_key = os.environ.encodekey(ENV_VAR) if _environ is not None and hasattr(os.environ, "encodekey") else None


def _from_env() -> str:
    """``$ADAPTERFAST_BACKEND`` (or auto), validated the first time each value is seen."""
    global _env_seen
    raw = _environ.get(_env_key) if _env_key is not None else os.environ.get(ENV_VAR)
    if raw == _env_seen[0]:
        return _env_seen[1]
    text = os.environ.get(ENV_VAR)
    name = _check_name(text or "auto", f" in the environment variable {ENV_VAR}")
    _env_seen = (raw, name)
    return name


def current() -> str:
    """The backend in force: the innermost ``use_backend``, else ``$ADAPTERFAST_BACKEND``, else auto."""
    forced = _forced.get()
    return forced if forced is not None else _from_env()


@contextlib.contextmanager
def use_backend(name: str):
    """Forces a backend (``"triton"``, ``"cpu"``, ``"reference"`` or ``"auto"``) inside a ``with`` block,
    for this thread (or asyncio task) only."""
    token = _forced.set(_check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _interpreting() -> bool:
    """Whether Triton runs in its interpreter: read when adapterfast is imported, as Triton reads it
    when it is imported."""
    return _INTERPRETING


def _triton_loaded() -> Optional[str]:
    """Imports the Triton backend (which registers itself), or says why it cannot be imported."""
    if "triton" in _registry:
        return None
    try:
        from . import kernels  # noqa: F401
    except ImportError as error:
        return f"the Triton kernels could not be imported: {error}"
    return None


def _unavailable(name: str) -> Optional[str]:
    """Why a backend cannot run in this process at all, or None if it can."""
    if name == "triton":
        if not (torch.cuda.is_available() or _interpreting()):
            return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors)"
        reason = _triton_loaded()
        if reason is not None:
            return reason
    if name not in _registry:
        return f"the {name} backend is not registered"
    return _registry[name].unavailable()


def _dtypes(name: str) -> tuple[torch.dtype, ...]:
    return _registry[name].dtypes if name in _registry else ()


def backends() -> dict[str, BackendInfo]:
    """Each backend, whether it can run here, and why not if it cannot."""
    report = {}
    for name in ("triton", "cpu", "reference"):
        reason = _unavailable(name)
        devices = DEVICES[name] + (("cpu",) if name == "triton" and _interpreting() else ())
        report[name] = BackendInfo(name, reason is None, reason, devices, _dtypes(name))
    return report


def _cannot_run(name: str, device: str, dtype: torch.dtype, r: int) -> Optional[str]:
    """Why backend ``name`` cannot compute this input, or None if it can."""
    if name == "triton" and not (device == "cuda" or (device == "cpu" and _interpreting())):
        return f"the triton backend runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"
    if name == "cpu" and device != "cpu":
        return f"the cpu backend runs CPU tensors, got {device}"
    reason = _unavailable(name)
    if reason is not None:
        return reason
    if dtype not in _dtypes(name):
        return f"the {name} backend does not support {dtype}"
    if name == "triton" and r > TRITON_MAX_R:
        return f"the triton backend supports r <= {TRITON_MAX_R}, got r={r}"
    return None


def _choose(name: str, device: str, dtype: torch.dtype, r: int) -> str:
    if name != "auto":
        reason = _cannot_run(name, device, dtype, r)
        if reason is not None:
            raise ValueError(f"adapterfast backend {name!r} was forced but cannot run this input: {reason}")
        return name
    fused = "cpu" if device == "cpu" else "triton"
    reason = _cannot_run(fused, device, dtype, r)
    if reason is None:
        reason = _registry[fused].slower_here(dtype)
    if reason is None:
        return fused
    warn_once(f"adapterfast: falling back to the eager reference: {reason}")
    return "reference"


def select(x: torch.Tensor, r: int) -> str:
    """The name of the backend that computes the op for input ``x`` with bottleneck size ``r``.

    The answer depends only on the backend in force, x's device type and dtype, and whether r
    fits the Triton kernels; it is worked out once per combination."""
    forced = _forced.get()
    key = (forced if forced is not None else _from_env(), "cpu" if x.is_cpu else x.device.type, x.dtype,
           r > TRITON_MAX_R)
    name = _choices.get(key)
    if name is None:
        name = _choose(key[0], key[1], key[2], r)
        _choices[key] = name
    return name


def kernels(name: str) -> Kernels:
    """The registered functions of backend ``name`` (as returned by ``select``)."""
    return _registry[name]


def _register_reference() -> None:
    from . import reference

    register("reference", forward=reference.forward, backward=reference.backward,
             dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))


_register_reference()
