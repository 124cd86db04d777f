"""What the launchers share: the ``Launch`` record, the dot precision and the dropout arguments.

A launcher's ``plan`` allocates the outputs and returns ``Launch`` records instead of launching,
so ``adapterfast.compile_check`` compiles exactly the argument lists the launchers produce.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from adapterfast._log import warn_once
from adapterfast.dropout import threshold as dropout_threshold

from .config import Config
from .philox import as_int32, key_words


class Launch:
    """A kernel, its grid, positional arguments, constexpr arguments and configuration.

    ``kwargs`` (the constexprs and the launch options together) is built once per problem kind
    by the launchers' caches, so calling a ``Launch`` costs one ``kernel[grid](...)``.
    """

    __slots__ = ("kernel", "grid", "args", "constexprs", "config", "kwargs")

    def __init__(self, kernel, grid: tuple, args: tuple, constexprs: dict, config: Config, kwargs: dict | None = None):
        self.kernel, self.grid, self.args, self.constexprs, self.config = kernel, grid, args, constexprs, config
        self.kwargs = kwargs if kwargs is not None else {**constexprs, **config.options()}

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


_NO_CONTEXT = contextlib.nullcontext()


def on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: a context that makes it x's (nothing for CPU tensors)."""
    return torch.cuda.device(x.device) if x.is_cuda else _NO_CONTEXT


def tf32_allowed() -> bool:
    """Whether torch allows TF32 for fp32 matmuls, read through whichever API the user set.

    PyTorch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision``; once it (or the global
    ``torch.backends.fp32_precision``) has been set, reading the legacy ``allow_tf32`` raises
    RuntimeError ("mix of the legacy and new APIs"), so the new one is read when it exists. Its
    getter already resolves ``"none"`` against the global setting and reflects the legacy flag,
    so ``"tf32"`` is the only answer that means yes. Read on every fp32 call (a user may switch
    it between calls); it costs one C call.
    """
    if _PRECISION_GETTER is not None:
        return _PRECISION_GETTER("cuda", "matmul") == "tf32"
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    return precision == "tf32"


def _precision_getter():
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    try:
        getter("cuda", "matmul")
    except Exception:  # absent or with another signature in this torch: use the public attributes
        return None
    return getter


_PRECISION_GETTER = _precision_getter()


def in_dtype(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in the dot dtype, cast once per call (fp32 weights with 16-bit x).

    The kernels round weights to x's dtype before every dot; doing it once here, with the same
    round-to-nearest-even, gives the same bits and saves every program a conversion per tile.
    """
    return weight if weight.dtype == dtype else weight.to(dtype)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` in Python (``triton.cdiv`` is a jit function, slow to call from the host)."""
    return -(-a // b)


TF32X3_ENV = "ADAPTERFAST_TF32X3"


def tf32x3_requested() -> bool:
    """Whether the user opted in to ``tf32x3`` fp32 dots: ``ADAPTERFAST_TF32X3=1`` in the environment.

    tf32x3 splits each fp32 operand into a TF32 high part and a TF32 remainder and sums three
    tensor-core products (hi*hi + hi*lo + lo*hi): close to fp32 accuracy at tensor-core speed,
    where the default "ieee" dots run on FMA units. Read on every fp32 call, like the TF32 flag.
    """
    return os.environ.get(TF32X3_ENV, "") == "1"


TF32X3_MAX_R = 128


def dot_precision(dtype: torch.dtype, r: int | None = None) -> str:
    """``tl.dot`` input precision for x's dtype and rank r, read now: for fp32 operands "tf32" when
    torch allows TF32, else "tf32x3" when ``ADAPTERFAST_TF32X3=1``, else "ieee"; 16-bit operands
    ignore both. tf32x3 applies to the single-adapter kernels (``r`` given) up to rank 128: at
    r = 256 its split operands spilled 336-720 bytes in every configuration tried, and the grouped
    kernels have not been checked with it, so there the switch is ignored, with a warning once."""
    if dtype != torch.float32:
        return "ieee"
    if tf32_allowed():
        return "tf32"
    if not tf32x3_requested():
        return "ieee"
    if r is None or r > TF32X3_MAX_R:
        warn_once(f"{TF32X3_ENV}=1 is ignored (fp32 dots stay exact 'ieee') by the grouped Triton kernels and for "
                  f"ranks over {TF32X3_MAX_R}; got {'the grouped op' if r is None else f'r={r}'}")
        return "ieee"
    return "tf32x3"


def dropout_args(scale: float, dropout_p: float, seed) -> tuple[bool, float, int, int, int]:
    """``(has_dropout, branch scale, key_lo, key_hi, threshold)`` for the kernels.

    As in the reference, dropout applies when ``p > 0`` and a seed is given; the branch scale is
    then ``scale / (1 - p)`` (computed in double, passed as fp32 like the reference's scalar).
    """
    if dropout_p == 0.0 or seed is None:
        return False, float(scale), 0, 0, 0
    key_lo, key_hi = key_words(int(seed))
    return True, float(scale / (1.0 - dropout_p)), key_lo, key_hi, _threshold_bits(dropout_p)


@functools.lru_cache(maxsize=64)
def _threshold_bits(dropout_p: float) -> int:
    return as_int32(dropout_threshold(dropout_p))
