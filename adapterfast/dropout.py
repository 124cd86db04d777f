"""The dropout mask every backend shares: Philox4x32-10 keyed by a seed, counted by element index.

Element ``(row, col)`` of an ``[N, d]`` output has counter ``i = row * d + col`` (int64). With
``key = (seed & 0xffffffff, seed >> 32)`` and ``counter = (i & 0xffffffff, i >> 32, 0, 0)``, ten
Philox rounds give four 32-bit words; the first word ``u`` decides the element: it is kept when
``u >= threshold(p)``, with ``threshold(p) = floor(p * 2**32)``. Kept elements are scaled by
``1 / (1 - p)``. The backward regenerates the same mask from the same seed, so no mask is stored,
and the Triton, C++ and reference backends produce bit-identical masks.
"""
from __future__ import annotations

import torch

# The one source of the Philox constants: kernels/philox.py imports them; tests/test_constants.py
# checks the C++ copies in csrc/philox.h against them.
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
SEED_BOUND = 2**62


def threshold(p: float) -> int:
    """The 32-bit threshold below which an element is dropped."""
    return min(int(p * 2**32), MASK32)


def new_seed(device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh seed drawn from torch's CPU generator, as a 0-dim int64 CPU tensor.

    Drawing from the CPU generator (even for CUDA inputs) means ``torch.manual_seed`` controls the
    mask, activation checkpointing replays it (it restores the CPU RNG state), and the seed is read
    inside the op without a device synchronisation.
    """
    return torch.randint(0, SEED_BOUND, (), dtype=torch.int64, device="cpu")


def _mulhilo(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``m * c`` for a 32-bit constant and int64 tensor of 32-bit values."""
    c_hi = c >> 16
    c_lo = c & 0xFFFF
    p_hi = m * c_hi
    p_lo = m * c_lo
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox_words(seed: int, index: torch.Tensor) -> torch.Tensor:
    """First output word of Philox4x32-10 for each int64 counter in ``index`` (values 0..2**32-1)."""
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    c0 = index & MASK32
    c1 = (index >> 32) & MASK32
    c2 = torch.zeros_like(index)
    c3 = torch.zeros_like(index)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0


def keep_mask(seed: int, p: float, rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[rows, cols]`` mask of kept elements, as every backend computes it."""
    index = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    return philox_words(seed, index) >= threshold(p)
