"""Block sizes for every kernel, in one table shared by the launchers and ``compile_check``.

``choose(d, r, dtype, major)`` returns the configuration of the kernels for a problem. It depends
on the rank bucket (``r`` padded to a power of two >= 16, the ``tl.dot`` minimum), on whether the
operands are fp32, and for a few entries on the GPU generation (``_SM90``); it does not vary with
``d`` (tails are masked), so ``compile_check`` covers every configuration the launchers can
produce by enumerating dtypes and rank buckets.

How the entries were chosen (``python -m adapterfast.compile_check`` and ptxas on sm_80 and
sm_90, with dropout on, whose Philox state of 4 words per tile element is a large register
consumer): no spills, at most ~230 registers with 8 warps, shared memory well under sm_80's
limit, tensor cores for 16-bit operands.
- forward / backward-dh / grouped backward-dx: a program owns ``block_m`` rows and keeps a ``[block_m, block_r]`` fp32
  accumulator over the whole pass over d. ``block_m`` is kept at 64 where registers allow,
  because every program re-reads the (L2-resident) weights: weight bytes per row are
  ``~r / block_m`` times the activation bytes per row.
- backward-dxdw (and the grouped backward-dw): a program owns a ``block_d`` column tile and keeps
  two ``[block_r, block_d]`` fp32 accumulators (the dW_up^T and dW_down tiles); larger
  ``block_d`` means fewer re-reads of the ``[N, r]`` h and dh per row, larger ``block_r`` forces
  ``block_m`` and ``block_d`` down. ``block_m`` is the K of both dots: 16-bit r = 16 and r = 64
  use 32-64 rows by 128 columns (sm_90 SASS per tile element, bf16 relu with dropout: r = 64 64.0
  -> 37.8 from 16 x 64 tiles, r = 16 34.8 -> 29.4 from 32 x 64; without dropout 47.0 -> 22.9 and
  18.8 -> 14.1), at up to ~230 registers and no spills on sm_80 or sm_90; 64 x 64 at r = 64
  spilled on sm_80.
- Since dropout interleaves four Philox words per quad of columns, two fp32 entries spilled a
  few bytes (forward r = 256 on sm_80, backward-dw r = 64 on sm_90): the first runs one stage,
  the second four warps (no spills for tanh, sigmoid or gelu_tanh on either arch).
  Triton gives the two dots of its loop one warp layout, along the longer of their dimensions;
  for ``block_r >= 64`` that is the rank, replicated over the warps when ``block_m`` is large.
- fp32 operands use FMA dots (exact mode) or tf32, whose operands take twice the registers and
  shared memory: narrower tiles and, for backward-dw, no software pipelining.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from adapterfast.dispatch import TRITON_MAX_R as MAX_R  # one source: dispatch routes r > MAX_R elsewhere
R_BUCKETS = (16, 32, 64, 128, 256)
FP_FUSION = True
DEFAULT_SM_COUNT = 132


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch options of one kernel."""

    block_m: int
    block_d: int
    block_r: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return (f"M{self.block_m}-D{self.block_d}-R{self.block_r}"
                f"-w{self.num_warps}-s{self.num_stages}")

    def options(self) -> dict:
        """Launch/compile options: ``kernel[grid](..., **config.options())``."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages,
                "enable_fp_fusion": FP_FUSION}


@dataclass(frozen=True)
class Configs:
    """``backward_dh`` and ``backward_dxdw`` are the single op's backward kernels; ``backward_dx`` and
    ``backward_dw`` the grouped op's (its row kernel writes dh and dx, its column kernel dW)."""

    forward: Config
    backward_dh: Config
    backward_dxdw: Config
    backward_dx: Config
    backward_dw: Config


def block_r(r: int) -> int:
    """``r`` padded to a power of two >= 16."""
    if not 1 <= r <= MAX_R:
        raise ValueError(f"the Triton backend supports 1 <= r <= {MAX_R}, got r={r}")
    return max(16, 1 << (r - 1).bit_length())


# kernel -> operand kind -> rank bucket -> (block_m, block_d, num_warps, num_stages)
_TABLE = {
    "forward": {
        "16bit": {16: (64, 64, 8, 3), 32: (64, 64, 8, 3), 64: (64, 64, 8, 3), 128: (64, 64, 8, 3), 256: (64, 32, 8, 2)},
        "fp32": {16: (64, 32, 8, 2), 32: (64, 32, 8, 2), 64: (64, 32, 8, 2), 128: (64, 16, 8, 2), 256: (32, 16, 8, 1)},
    },
    "backward_dh": {
        "16bit": {16: (64, 64, 8, 3), 32: (64, 64, 8, 3), 64: (64, 64, 8, 3), 128: (64, 64, 8, 3), 256: (32, 64, 8, 2)},
        "fp32": {16: (64, 32, 8, 2), 32: (64, 32, 8, 2), 64: (64, 32, 8, 2), 128: (64, 16, 8, 2), 256: (32, 16, 8, 2)},
    },
    "backward_dxdw": {
        "16bit": {16: (32, 64, 8, 2), 32: (32, 64, 8, 2), 64: (16, 64, 8, 2), 128: (16, 64, 8, 2), 256: (16, 32, 8, 2)},
        "fp32": {16: (16, 64, 8, 1), 32: (16, 64, 8, 1), 64: (16, 64, 4, 1), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1)},
    },
    "backward_dx": {
        "16bit": {16: (64, 64, 8, 3), 32: (64, 64, 8, 3), 64: (64, 64, 8, 3), 128: (64, 64, 8, 3), 256: (32, 64, 8, 2)},
        "fp32": {16: (64, 32, 8, 2), 32: (64, 32, 8, 2), 64: (64, 32, 8, 2), 128: (64, 16, 8, 2), 256: (32, 16, 8, 2)},
    },
    "backward_dw": {
        "16bit": {16: (64, 128, 8, 2), 32: (32, 64, 8, 2), 64: (32, 128, 8, 2), 128: (16, 64, 8, 2), 256: (16, 32, 8, 2)},
        "fp32": {16: (16, 64, 8, 1), 32: (16, 64, 8, 1), 64: (16, 64, 4, 1), 128: (16, 16, 8, 1), 256: (16, 16, 8, 1)},
    },
}


# entries that differ on sm_90 and later (compute capability major >= 9): kernel -> kind -> rank bucket.
# backward-dxdw at r <= 64 with 64 x 64 tiles: every dot a wgmma (M = 64 for dx too), 35 / 50 SASS
# instructions per element at r = 64 without / with dropout against 53 / 67 with the 32 x 64 tiles
# that sm_80 needs (64 x 64 spilled 368-936 bytes there: mma.sync keeps all accumulators in registers).
_SM90 = {
    "backward_dxdw": {"16bit": {16: (64, 64, 8, 2), 32: (64, 64, 8, 2), 64: (64, 64, 8, 2)}},
}
DEFAULT_MAJOR = 9
# entries for fp32 operands with tf32x3 dots (``ADAPTERFAST_TF32X3=1``), whose split operands take
# more registers than FMA or tf32 dots: kernel -> rank bucket.
_TF32X3 = {
    "forward": {64: (32, 32, 8, 2)},
    "backward_dxdw": {64: (16, 16, 4, 1)},
}


@functools.lru_cache(maxsize=256)
def choose(d: int, r: int, dtype: torch.dtype, major: int = DEFAULT_MAJOR, precision: str = "ieee") -> Configs:
    """The configuration of every kernel for ``[N, d]`` x and rank r on a GPU of compute capability
    ``major``.x, with ``tl.dot`` input precision ``precision``."""
    br = block_r(r)
    kind = "fp32" if dtype == torch.float32 else "16bit"

    def entry(kernel: str) -> Config:
        if kind == "fp32" and precision == "tf32x3" and br in _TF32X3.get(kernel, {}):
            block_m, block_d, num_warps, num_stages = _TF32X3[kernel][br]
        else:
            table = _SM90 if major >= 9 and br in _SM90.get(kernel, {}).get(kind, {}) else _TABLE
            block_m, block_d, num_warps, num_stages = table[kernel][kind][br]
        return Config(block_m, block_d, br, num_warps, num_stages)

    return Configs(**{kernel: entry(kernel) for kernel in _TABLE})


DX_IN_COLUMNS_MAX_R = 64


def dx_in_row_kernel(r: int) -> bool:
    """Whether the backward's dx is written by the row (dh) kernel instead of the column (dx/dw) kernel.

    Up to rank 64 the column kernel writes dx from the g and dh tiles it holds (4 ``[N, d]`` passes
    in all). Beyond, its ``[block_r, block_d]`` Wd tile and two weight-gradient accumulators leave no
    registers for the dx tile: every configuration tried spilled on sm_80 (r = 128: 84-260 bytes at
    16 x 32-64 tiles, r = 256: 36-9012 bytes), so the row kernel writes dx in a second pass over d
    (re-reading g: up to 5.2 passes). At r >= 128 the op is 2-4x more arithmetic per byte than at 64.
    """
    return block_r(r) > DX_IN_COLUMNS_MAX_R


# (compute capability major >= 9, operand kind, rank bucket) of the column kernels that sum db_up once
# after their loop; elsewhere the elementwise [block_m, block_d] fp32 accumulator spilled.
_DB_AFTER_LOOP = {(True, "16bit", 16), (True, "16bit", 64)}


def db_after_loop(r: int, dtype: torch.dtype, major: int = DEFAULT_MAJOR, precision: str = "ieee") -> bool:
    """Whether backward-dxdw sums db_up once after its loop (``DB_AFTER_LOOP``) rather than per block."""
    kind = "fp32" if dtype == torch.float32 else "16bit"
    return (major >= 9, kind, block_r(r)) in _DB_AFTER_LOOP


def row_slices(n_rows: int, d: int, r: int, config: Config, sm_count: int) -> int:
    """The number S of row slices of the weight-gradient kernel (its fp32 partials are ``[S, ...]``).

    At most: the row blocks; partials that cost at most a quarter of one 16-bit ``[N, d]`` pass
    (they are written and read once, ``2 * S * (2 r + 1) * d * 4 ~= 16 S r d`` bytes against
    ``2 N d``, so ``S <= N / (32 r)``); and ``2 * sm_count`` programs over the column tiles.
    Within that, the S whose ``col_tiles * S`` programs best fill whole waves of ``sm_count``
    (the largest such S on a tie): 320 programs on 132 SMs leave the third wave 40% full, 264
    fill two. S depends only on the shapes and the device's SM count, so the reduction order,
    and therefore every bit of the result, is the same on every run on that device.
    """
    block_rows = -(-n_rows // config.block_m)
    col_tiles = -(-d // config.block_d)
    fill = -(-2 * sm_count // col_tiles)
    traffic = max(1, n_rows // (32 * r))
    most = max(1, min(fill, traffic, block_rows))

    def wave_fill(s: int) -> float:
        programs = col_tiles * s
        return programs / (-(-programs // sm_count) * sm_count)

    return max(range(1, most + 1), key=lambda s: (round(wave_fill(s), 2), s))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a fixed default off CUDA, e.g. under the interpreter)."""
    return _cuda_properties(device).multi_processor_count if device.type == "cuda" else DEFAULT_SM_COUNT


def cc_major(device: torch.device) -> int:
    """Compute capability major of ``device`` (``DEFAULT_MAJOR``, an H100/H200, off CUDA)."""
    return _cuda_properties(device).major if device.type == "cuda" else DEFAULT_MAJOR


def _cuda_properties(device: torch.device):
    return _cuda_properties_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_properties_of(index: int):
    return torch.cuda.get_device_properties(index)


L2_BYTES = 50 * 2**20
PROGRAMS_PER_SM = 2


def reread_miss_fraction(d: int, elem_bytes: int, block_m: int, sm_count: int = DEFAULT_SM_COUNT) -> float:
    """The fraction of a row kernel's second pass over its rows that misses L2 (an H100/H200's ~50 MB).

    A row kernel re-reads its rows (the forward's residual, backward-dx's g) in a second pass over
    d, last chunk first. ``PROGRAMS_PER_SM`` resident programs per SM x ``block_m`` rows x ``d``
    are in flight; half of L2 holds the most recently read of them (the rest holds weights and
    outputs), and the backward order reads those first, so the miss fraction is
    ``1 - (L2 / 2) / in flight``: 0 at d = 768, ~0.81 at d = 4096 with 64-row bf16 blocks.
    """
    in_flight = PROGRAMS_PER_SM * sm_count * block_m * d * elem_bytes
    return max(0.0, 1.0 - (L2_BYTES / 2) / in_flight) if in_flight else 0.0
