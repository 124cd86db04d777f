"""The dropout mask in Triton: Philox4x32-10 exactly as ``adapterfast.dropout`` defines it.

Elements ``(row, 4q) .. (row, 4q + 3)`` share one Philox call with counter
``(q, row & 0xffffffff, row >> 32, 0)`` and the 64-bit seed split into the key words; element
``(row, col)`` takes output word ``col & 3`` and is kept when it is ``>= floor(p * 2**32)``. A
``[BLOCK_M, BLOCK_D]`` tile whose columns start at a multiple of 4 owns ``BLOCK_D / 4`` whole
quads per row: it runs Philox on the ``[BLOCK_M, BLOCK_D / 4]`` quads and interleaves the four
words back into columns (``tl.join`` + ``tl.reshape``, register moves within a thread), a
quarter of the generator arithmetic of one call per element. All arithmetic is uint32 (products
split with ``tl.umulhi``), so the mask is bit-identical to ``adapterfast.dropout.keep_mask`` and
the backward regenerates it from the seed instead of reading a stored mask.

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
def philox(c0, c1, c2, key_lo, key_hi):
    """The four output words of Philox4x32-10 for uint32 counters ``(c0, c1, c2, 0)``."""
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
    return c0, c1, c2, c3


@triton.jit
def keep_mask(rows, col0, key_lo, key_hi, threshold, BLOCK_D: tl.constexpr):
    """Boolean ``[len(rows), BLOCK_D]`` tile of kept elements in columns ``col0 .. col0 + BLOCK_D - 1``.

    ``rows`` int64 (any rows, e.g. gathered), ``col0`` a multiple of 4, ``threshold`` int32 bits.
    """
    quads = (col0 // 4 + tl.arange(0, BLOCK_D // 4)).to(tl.uint32)
    c0 = tl.zeros((rows.shape[0], BLOCK_D // 4), tl.uint32) + quads[None, :]
    c1 = tl.zeros_like(c0) + (rows & 0xFFFFFFFF).to(tl.uint32)[:, None]
    c2 = tl.zeros_like(c0) + ((rows >> 32) & 0xFFFFFFFF).to(tl.uint32)[:, None]
    u0, u1, u2, u3 = philox(c0, c1, c2, key_lo, key_hi)
    bound = threshold.to(tl.uint32, bitcast=True)
    # join(join(u0, u2), join(u1, u3))[..., i, k] is word 2 i + k: row-major order is the column order.
    words = tl.join(tl.join(u0, u2), tl.join(u1, u3))
    return tl.reshape(words, (rows.shape[0], BLOCK_D)) >= bound


@triton.jit
def branch_factor(rows, col0, scale, key_lo, key_hi, threshold, HAS_DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr):
    """The factor on the adapter branch: ``scale`` (already divided by ``1 - p``) where kept, 0 where dropped.

    The tile is ``rows`` x columns ``col0 .. col0 + BLOCK_D - 1``. Multiplying by the factor
    (rather than selecting 0) keeps NaN/inf in dropped elements, as the reference's
    ``mask * s * u`` does.
    """
    if HAS_DROPOUT:
        factor = tl.where(keep_mask(rows, col0, key_lo, key_hi, threshold, BLOCK_D), scale, 0.0)
    else:
        factor = scale
    return factor
