"""Triton kernels of the grouped adapter op (semantics: ``adapterfast.grouped_reference``).

Rows arrive in any order with an adapter index each. The launcher (``grouped.py``) sorts them
stably by slot (slot 0: no adapter, slot ``a + 1``: adapter ``a``) into ``order`` and cuts every
slot into blocks of at most ``BLOCK_M`` rows, so a program owns rows of one adapter only and runs
the single-adapter kernels' arithmetic on that adapter's weights (``forward_kernel.py``,
``backward_kernels.py``), loading and storing its rows through ``order`` (a gather/scatter of
whole rows: the same bytes as contiguous rows, one pass over x and y). The block table is built
with torch ops on the device, sized by an upper bound (``cdiv(N, BLOCK_M) + A + 1``), so nothing
waits for the host; surplus programs find an empty block and exit.

Forward, per block of adapter a with rows R (slot-0 blocks copy the residual and zero h):
    h = x[R] Wd[a]^T + bd[a]        (stored for backward, fp32)
    y[R] = res[R] + s_a * mask * (act(h) Wu[a]^T + bu[a])      s_a = scales[a] / (1 - p)

Backward, with g = grad_y, gz = g * mask * s_a:
1. ``grouped_backward_dx_kernel`` (block table): da = gz Wu[a], dh = da * act'(h) (stored),
   dx = dh Wd[a] (+ g when the residual is x); slot-0 rows get dx = g (or 0).
2. ``grouped_backward_dw_kernel``: a program owns (adapter a, a ``BLOCK_D`` column tile) and loops
   over a's rows in sorted order, accumulating dWu[a]^T, dWd[a] tiles and dbu[a] in registers
   (dWu = gz^T act(h), dWd = dh^T x); the tile-0 program also sums dbd[a] = sum dh. One owner per
   output element and a fixed row order: bitwise reproducible, no partials, zeros for unused adapters.

Dropout uses the counters of the rows' original positions (``philox.branch_factor``), so the mask
is ``fused_adapter``'s for the whole batch.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .activations import activate, backprop
from .adapter_tiles import dx_tile, output_tile, project_down, weight_grad_step


@triton.jit
def block_rows(order_ptr, block_slot_ptr, block_begin_ptr, block_end_ptr, BLOCK_M: tl.constexpr):
    """The slot of block ``pid`` of the block table and its rows (original positions, masked)."""
    pid = tl.program_id(0)
    slot = tl.load(block_slot_ptr + pid)
    begin = tl.load(block_begin_ptr + pid)
    end = tl.load(block_end_ptr + pid)
    positions = begin + tl.arange(0, BLOCK_M)
    row_mask = positions < end
    rows = tl.load(order_ptr + positions, mask=row_mask, other=0)
    return slot, rows, row_mask


@triton.jit
def plain_rows(rows, row_mask, ranks, rank_mask, d, r, zero_ptr, src_ptr, stride_sm, stride_sd, out_ptr,
               OUT_DTYPE: tl.constexpr, HAS_SRC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_R: tl.constexpr):
    """A slot-0 block (rows without an adapter): ``zero[rows] = 0`` ([*, r]) and ``out[rows] = src[rows]``
    (zeros without ``HAS_SRC``) in OUT_DTYPE ([*, d]): h and y = residual, or dh and dx = g or 0."""
    tl.store(zero_ptr + rows[:, None] * r + ranks[None, :], tl.zeros((BLOCK_M, BLOCK_R), tl.float32),
             mask=row_mask[:, None] & rank_mask[None, :])
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        tile_mask = row_mask[:, None] & (cols < d)[None, :]
        if HAS_SRC:
            out = tl.load(src_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sd, mask=tile_mask, other=0.0)
        else:
            out = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        tl.store(out_ptr + rows[:, None] * d + cols[None, :], out.to(OUT_DTYPE), mask=tile_mask)


@triton.jit(do_not_specialize=["key_lo", "key_hi", "threshold"])
def grouped_forward_kernel(
    x_ptr, w_down_ptr, b_down_ptr, w_up_ptr, b_up_ptr, scales_ptr, res_ptr, y_ptr, h_ptr,
    order_ptr, block_slot_ptr, block_begin_ptr, block_end_ptr,
    d, r,
    stride_xm, stride_xd, stride_wd_a, stride_wd_r, stride_wd_d, stride_wu_a, stride_wu_d, stride_wu_r,
    stride_bd_a, stride_bu_a, stride_rm, stride_rd,
    key_lo, key_hi, threshold,
    ACTIVATION: tl.constexpr, HAS_B_DOWN: tl.constexpr, HAS_B_UP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program: block ``pid`` of the block table; y and h are contiguous."""
    dtype = x_ptr.dtype.element_ty
    slot, rows, row_mask = block_rows(order_ptr, block_slot_ptr, block_begin_ptr, block_end_ptr, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < r

    if slot == 0:
        plain_rows(rows, row_mask, ranks, rank_mask, d, r, h_ptr, res_ptr, stride_rm, stride_rd, y_ptr,
                   OUT_DTYPE=dtype, HAS_SRC=True, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R)
    else:
        adapter = (slot - 1).to(tl.int64)
        scale = tl.load(scales_ptr + adapter)
        h = project_down(tl.zeros((BLOCK_M, BLOCK_R), tl.float32), x_ptr, rows, row_mask, stride_xm, stride_xd,
                         w_down_ptr + adapter * stride_wd_a, stride_wd_d, stride_wd_r, ranks, rank_mask, d, scale,
                         key_lo, key_hi, threshold, SCALED=False, HAS_DROPOUT=HAS_DROPOUT, DOT_DTYPE=dtype,
                         INPUT_PRECISION=INPUT_PRECISION, BLOCK_D=BLOCK_D)
        if HAS_B_DOWN:
            h += tl.load(b_down_ptr + adapter * stride_bd_a + ranks, mask=rank_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(h_ptr + rows[:, None] * r + ranks[None, :], h, mask=row_mask[:, None] & rank_mask[None, :])
        a = tl.where(rank_mask[None, :], activate(h, ACTIVATION), 0.0).to(dtype)

        for start in range(0, d, BLOCK_D):
            output_tile(a, start, rows, row_mask, ranks, rank_mask, d,
                        w_up_ptr + adapter * stride_wu_a, stride_wu_r, stride_wu_d, b_up_ptr + adapter * stride_bu_a, 1,
                        res_ptr, stride_rm, stride_rd, y_ptr, scale, key_lo, key_hi, threshold,
                        HAS_B_UP=HAS_B_UP, HAS_DROPOUT=HAS_DROPOUT, INPUT_PRECISION=INPUT_PRECISION,
                        BLOCK_D=BLOCK_D)


@triton.jit(do_not_specialize=["key_lo", "key_hi", "threshold"])
def grouped_backward_dx_kernel(
    g_ptr, w_down_ptr, w_up_ptr, scales_ptr, h_ptr, dh_ptr, dx_ptr,
    order_ptr, block_slot_ptr, block_begin_ptr, block_end_ptr,
    d, r,
    stride_gm, stride_gd, stride_wd_a, stride_wd_r, stride_wd_d, stride_wu_a, stride_wu_d, stride_wu_r,
    key_lo, key_hi, threshold,
    ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, RESIDUAL_IS_X: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``dh`` and ``dx`` for block ``pid`` of the block table; dh and dx are contiguous."""
    slot, rows, row_mask = block_rows(order_ptr, block_slot_ptr, block_begin_ptr, block_end_ptr, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < r
    hr_mask = row_mask[:, None] & rank_mask[None, :]

    if slot == 0:
        plain_rows(rows, row_mask, ranks, rank_mask, d, r, dh_ptr, g_ptr, stride_gm, stride_gd, dx_ptr,
                   OUT_DTYPE=DOT_DTYPE, HAS_SRC=RESIDUAL_IS_X, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R)
    else:
        adapter = (slot - 1).to(tl.int64)
        scale = tl.load(scales_ptr + adapter)
        da = project_down(tl.zeros((BLOCK_M, BLOCK_R), tl.float32), g_ptr, rows, row_mask, stride_gm, stride_gd,
                          w_up_ptr + adapter * stride_wu_a, stride_wu_d, stride_wu_r, ranks, rank_mask, d, scale,
                          key_lo, key_hi, threshold, SCALED=True, HAS_DROPOUT=HAS_DROPOUT, DOT_DTYPE=DOT_DTYPE,
                          INPUT_PRECISION=INPUT_PRECISION, BLOCK_D=BLOCK_D)
        h = tl.load(h_ptr + rows[:, None] * r + ranks[None, :], mask=hr_mask, other=0.0)
        dh = backprop(h, da, ACTIVATION)
        tl.store(dh_ptr + rows[:, None] * r + ranks[None, :], dh, mask=hr_mask)
        dh = dh.to(DOT_DTYPE)
        for start in range(0, d, BLOCK_D):
            dx_tile(dh, start + tl.arange(0, BLOCK_D), rows, row_mask, ranks, rank_mask, d,
                    w_down_ptr + adapter * stride_wd_a, stride_wd_r, stride_wd_d, g_ptr, stride_gm, stride_gd, dx_ptr,
                    RESIDUAL_IS_X=RESIDUAL_IS_X, INPUT_PRECISION=INPUT_PRECISION, DOT_DTYPE=DOT_DTYPE)


@triton.jit(do_not_specialize=["key_lo", "key_hi", "threshold"])
def grouped_backward_dw_kernel(
    g_ptr, x_ptr, scales_ptr, h_ptr, dh_ptr, order_ptr, seg_begin_ptr, seg_end_ptr,
    dw_down_ptr, dw_up_ptr, db_up_ptr, db_down_ptr,
    d, r,
    stride_gm, stride_gd, stride_xm, stride_xd,
    key_lo, key_hi, threshold,
    ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dWu[a]^T, dWd[a], dbu[a] for column tile ``pid(0)`` of adapter ``a = pid(1)`` (and dbd[a] on tile 0).

    Outputs are contiguous fp32: ``dw_down [A, r, d]``, ``dw_up [A, d, r]``, ``db_up [A, d]``, ``db_down [A, r]``.
    """
    tile = tl.program_id(0)
    adapter = tl.program_id(1).to(tl.int64)
    col0 = tile * BLOCK_D
    cols = col0 + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < r
    begin = tl.load(seg_begin_ptr + adapter)
    end = tl.load(seg_end_ptr + adapter)
    scale = tl.load(scales_ptr + adapter)

    dw_up_t = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    dw_down = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    db_up = tl.zeros((BLOCK_D,), tl.float32)
    db_down = tl.zeros((BLOCK_R,), tl.float32)
    for start in range(begin, end, BLOCK_M):
        positions = start + tl.arange(0, BLOCK_M)
        row_mask = positions < end
        rows = tl.load(order_ptr + positions, mask=row_mask, other=0)
        dw_up_t, dw_down, db_up, dh32 = weight_grad_step(
            dw_up_t, dw_down, db_up, rows, row_mask, col0, cols, col_mask, ranks, rank_mask, d, r, g_ptr, stride_gm,
            stride_gd, x_ptr, stride_xm, stride_xd, h_ptr, dh_ptr, scale, key_lo, key_hi, threshold,
            ACTIVATION=ACTIVATION, HAS_DROPOUT=HAS_DROPOUT, INPUT_PRECISION=INPUT_PRECISION, DOT_DTYPE=DOT_DTYPE,
            BLOCK_D=BLOCK_D)
        db_down += tl.sum(dh32, axis=0)

    dw_mask = rank_mask[:, None] & col_mask[None, :]
    tl.store(dw_down_ptr + (adapter * r + ranks[:, None]) * d + cols[None, :], dw_down, mask=dw_mask)
    tl.store(dw_up_ptr + (adapter * d + cols[None, :]) * r + ranks[:, None], dw_up_t, mask=dw_mask)
    tl.store(db_up_ptr + adapter * d + cols, db_up, mask=col_mask)
    if tile == 0:
        tl.store(db_down_ptr + adapter * r + ranks, db_down, mask=rank_mask)
