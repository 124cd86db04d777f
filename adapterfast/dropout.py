"""The dropout mask every backend shares: Philox4x32-10 keyed by a seed, one call per four elements.

Elements ``(row, 4q) .. (row, 4q + 3)`` of an ``[N, d]`` output share one Philox call: with
``key = (seed & 0xffffffff, seed >> 32)`` and ``counter = (q, row & 0xffffffff, row >> 32, 0)``,
ten Philox rounds give four 32-bit words ``u0 .. u3``, and element ``(row, col)`` takes word
``u[col & 3]``: it is kept when that word is ``>= threshold(p)``, with
``threshold(p) = floor(p * 2**32)``. Kept elements are scaled by ``1 / (1 - p)``. The backward
regenerates the same mask from the same seed, so no mask is stored, and the Triton, C++ and
reference backends produce bit-identical masks.

Why four elements per call: Philox is ~10 multiply-xor rounds per call, and spending all four of
its output words (rather than one word per element, as before) cuts the generator's arithmetic
per element fourfold, which on a GPU is the difference between dropout costing more than the
memory traffic it rides on and costing less. The counter holds the row and the column quad
rather than a flat index ``row * d + col``, so a quad never straddles two rows (any d), tiles
whose columns start at a multiple of 4 own whole quads, and no 64-bit multiply is needed.
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


def philox(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
           c3: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox4x32-10 for counters ``(c0, c1, c2, c3)`` (``c3`` 0 unless given).

    Inputs and outputs are int64 tensors holding 32-bit values.
    """
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    if c3 is None:
        c3 = torch.zeros_like(c0)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def element_words(seed: int, rows: torch.Tensor, cols: int) -> torch.Tensor:
    """The Philox word of each element ``(rows[i], col)``, ``col < cols``: int64 ``[len(rows), cols]``."""
    rows = rows.to(torch.int64)[:, None]
    quads = torch.arange((cols + 3) // 4, dtype=torch.int64, device=rows.device)[None, :]
    c0 = quads.expand(rows.shape[0], -1)
    words = philox(seed, c0, (rows & MASK32).expand_as(c0), (rows >> 32).expand_as(c0))
    return torch.stack(words, dim=-1).reshape(rows.shape[0], 4 * quads.shape[1])[:, :cols]


def keep_rows(seed: int, p: float, rows: torch.Tensor, cols: int) -> torch.Tensor:
    """Boolean ``[len(rows), cols]`` mask of kept elements of the given rows of the batch."""
    return element_words(seed, rows, cols) >= threshold(p)


def keep_mask(seed: int, p: float, rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[rows, cols]`` mask of kept elements, as every backend computes it."""
    return keep_rows(seed, p, torch.arange(rows, dtype=torch.int64, device=device), cols)
