"""What the launchers share: the ``Launch`` record, the dot precision and the dropout arguments.

A launcher's ``plan`` allocates the outputs and returns ``Launch`` records instead of launching,
so ``adapterfast.compile_check`` compiles exactly the argument lists the launchers produce.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterfast.dropout import threshold as dropout_threshold

from .config import Config
from .philox import as_int32, key_words


@dataclass
class Launch:
    """A kernel, its grid, positional arguments, constexpr arguments and configuration."""

    kernel: object
    grid: tuple
    args: tuple
    constexprs: dict
    config: Config

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.config.options())


def tf32_allowed() -> bool:
    """Whether torch allows TF32 for fp32 matmuls, read through whichever API the user set.

    PyTorch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` (``"none"`` inherits
    ``torch.backends.fp32_precision``); once it has been set, reading the legacy ``allow_tf32``
    raises RuntimeError ("mix of the legacy and new APIs"), so the new one is read first. Setting
    the legacy flag is reflected in the new one, so both kinds of user are followed.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: tf32 for fp32 operands only when torch allows it (read now)."""
    if dtype == torch.float32 and tf32_allowed():
        return "tf32"
    return "ieee"


def dropout_args(scale: float, dropout_p: float, seed) -> tuple[bool, float, int, int, int]:
    """``(has_dropout, branch scale, key_lo, key_hi, threshold)`` for the kernels.

    As in the reference, dropout applies when ``p > 0`` and a seed is given; the branch scale is
    then ``scale / (1 - p)`` (computed in double, passed as fp32 like the reference's scalar).
    """
    if dropout_p == 0.0 or seed is None:
        return False, float(scale), 0, 0, 0
    key_lo, key_hi = key_words(int(seed))
    return True, float(scale / (1.0 - dropout_p)), key_lo, key_hi, as_int32(dropout_threshold(dropout_p))
