"""The dropout mask in Triton: Philox4x32-10 exactly as ``adapterfast.dropout`` defines it.

Element ``(row, col)`` of the ``[N, d]`` branch has the int64 counter ``i = row * d + col``, split
into the 32-bit words ``(i mod 2**32, i >> 32, 0, 0)``; the key is the 64-bit seed split the same
way. Ten rounds of Philox give four words; the element is kept when the first word is
``>= floor(p * 2**32)``. All arithmetic is uint32 (products split with ``tl.umulhi``), so the
mask is bit-identical to ``adapterfast.dropout.keep_mask`` and the backward regenerates it from
the seed instead of reading a stored mask.

The launcher passes the key halves and the threshold as int32 bit patterns (``as_int32``), so
their kernel argument type never depends on their value.
"""
import triton
import triton.language as tl

from adapterfast import dropout as _dropout

PHILOX_M0 = tl.constexpr(_dropout.PHILOX_M0)
PHILOX_M1 = tl.constexpr(_dropout.PHILOX_M1)
PHILOX_W0 = tl.constexpr(_dropout.PHILOX_W0)
PHILOX_W1 = tl.constexpr(_dropout.PHILOX_W1)
PHILOX_ROUNDS = tl.constexpr(_dropout.PHILOX_ROUNDS)


def as_int32(word: int) -> int:
    """The int32 with the same bit pattern as the 32-bit unsigned ``word``."""
    word &= 0xFFFFFFFF
    return word - (1 << 32) if word >= (1 << 31) else word


def key_words(seed: int) -> tuple[int, int]:
    """The Philox key ``(seed mod 2**32, seed >> 32)`` as int32 bit patterns."""
    return as_int32(seed), as_int32(seed >> 32)


@triton.jit
def philox_first_word(index, key_lo, key_hi):
    """First output word of Philox4x32-10 for int64 counters ``index`` (uint32 result)."""
    c0 = (index & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((index >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = key_lo.to(tl.uint32, bitcast=True)
    k1 = key_hi.to(tl.uint32, bitcast=True)
    for _ in tl.static_range(PHILOX_ROUNDS):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = c0 * PHILOX_M0
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = c2 * PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0


@triton.jit
def keep_mask(rows, cols, d, key_lo, key_hi, threshold):
    """Boolean ``[len(rows), len(cols)]`` tile of kept elements; ``rows`` int64, ``threshold`` int32 bits."""
    index = rows[:, None] * d + cols[None, :]
    return philox_first_word(index, key_lo, key_hi) >= threshold.to(tl.uint32, bitcast=True)


@triton.jit
def branch_factor(rows, cols, d, scale, key_lo, key_hi, threshold, HAS_DROPOUT: tl.constexpr):
    """The factor on the adapter branch: ``scale`` (already divided by ``1 - p``) where kept, 0 where dropped.

    Multiplying by the factor (rather than selecting 0) keeps NaN/inf in dropped elements, as
    the reference's ``mask * s * u`` does.
    """
    if HAS_DROPOUT:
        factor = tl.where(keep_mask(rows, cols, d, key_lo, key_hi, threshold), scale, 0.0)
    else:
        factor = scale
    return factor
