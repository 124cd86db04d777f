"""The tile steps that the single-adapter kernels (``forward_kernel.py``, ``backward_kernels.py``)
and the grouped kernels (``grouped_kernels.py``) share, as ``@triton.jit`` helpers.

A program of either kind owns ``BLOCK_M`` rows of one adapter: contiguous rows for the single
op, rows gathered through the sorted permutation for the grouped op. The caller passes the rows
(int64 offsets, masked) and the adapter's weight pointers; everything below is the same
arithmetic for both, so both paths round and accumulate identically:

- ``project_down``: ``acc + rows_of(src) * factor @ w`` over d-chunks of ``BLOCK_D``, fp32
  accumulation: the forward's ``h = x Wd^T`` (factor 1) and the backward's ``da = gz Wu`` with
  ``gz = g * mask * s`` (the dropout factor regenerated from the seed);
- ``output_tile``: one ``[BLOCK_M, BLOCK_D]`` tile of ``y = res + s * mask * (a Wu^T + bu)``;
- ``dx_tile``: one tile of ``dx = dh Wd (+ g when the residual is x)``;
- ``weight_grad_tiles`` (the block's g, gz, x, act(h), dh) and ``weight_grad_dots`` (its share of a
  column tile of ``dWu^T`` and ``dWd``), and ``weight_grad_step`` (both, plus ``dbu`` summed per block:
  the grouped kernel's step; the single op's kernel keeps ``dbu`` in registers and also writes dx).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .activations import activate
from .philox import branch_factor


@triton.jit
def project_down(acc, src_ptr, rows, row_mask, stride_sm, stride_sd, w_ptr, stride_w_d, stride_w_r, ranks, rank_mask,
                 d, scale, key_lo, key_hi, threshold,
                 SCALED: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr):
    """``acc + sum over d-chunks of src[rows, chunk] @ w[chunk, ranks]``, fp32, with w[c, j] at
    ``w_ptr + c * stride_w_d + j * stride_w_r``. With ``SCALED`` each src tile is first taken to
    fp32 and multiplied by the dropout factor ``s * mask`` (``branch_factor``): the backward's gz."""
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
        col_mask = cols < d
        src = tl.load(src_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sd,
                      mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if SCALED:
            src = src.to(tl.float32) * branch_factor(rows, start, scale, key_lo, key_hi, threshold, HAS_DROPOUT, BLOCK_D)
        w = tl.load(w_ptr + cols[:, None] * stride_w_d + ranks[None, :] * stride_w_r,
                    mask=col_mask[:, None] & rank_mask[None, :], other=0.0)
        acc = tl.dot(src.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def output_tile(a, col0, rows, row_mask, ranks, rank_mask, d, w_up_ptr, stride_wu_r, stride_wu_d, b_up_ptr, stride_bu,
                res_ptr, stride_rm, stride_rd, y_ptr, scale, key_lo, key_hi, threshold,
                HAS_B_UP: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Stores ``y[rows, cols] = res + s * mask * (a @ Wu^T[:, cols] + bu)`` in a's dtype for the columns
    ``cols = col0 .. col0 + BLOCK_D - 1`` (``col0`` a multiple of 4, as the dropout mask's quads need);
    y contiguous [*, d]."""
    dtype = a.dtype
    cols = col0 + tl.arange(0, BLOCK_D).to(tl.int64)
    col_mask = cols < d
    tile_mask = row_mask[:, None] & col_mask[None, :]
    w_up_t = tl.load(w_up_ptr + ranks[:, None] * stride_wu_r + cols[None, :] * stride_wu_d,
                     mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
    u = tl.dot(a, w_up_t.to(dtype), input_precision=INPUT_PRECISION)
    if HAS_B_UP:
        u += tl.load(b_up_ptr + cols * stride_bu, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    factor = branch_factor(rows, col0, scale, key_lo, key_hi, threshold, HAS_DROPOUT, BLOCK_D)
    res = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rd, mask=tile_mask, other=0.0)
    y = res.to(tl.float32) + factor * u
    tl.store(y_ptr + rows[:, None] * d + cols[None, :], y.to(dtype), mask=tile_mask)


@triton.jit
def dx_tile(dh, cols, rows, row_mask, ranks, rank_mask, d, w_down_ptr, stride_wd_r, stride_wd_d, g_ptr, stride_gm,
            stride_gd, dx_ptr, RESIDUAL_IS_X: tl.constexpr, INPUT_PRECISION: tl.constexpr,
            DOT_DTYPE: tl.constexpr):
    """Stores ``dx[rows, cols] = dh @ Wd[:, cols] (+ g[rows, cols] when the residual is x)``; dx contiguous [*, d]."""
    col_mask = cols < d
    tile_mask = row_mask[:, None] & col_mask[None, :]
    w_down = tl.load(w_down_ptr + ranks[:, None] * stride_wd_r + cols[None, :] * stride_wd_d,
                     mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
    dx = tl.dot(dh, w_down.to(DOT_DTYPE), input_precision=INPUT_PRECISION)
    if RESIDUAL_IS_X:
        dx += tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gd,
                      mask=tile_mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + rows[:, None] * d + cols[None, :], dx.to(DOT_DTYPE), mask=tile_mask)


@triton.jit
def weight_grad_tiles(rows, row_mask, col0, cols, col_mask, ranks, rank_mask, r, g_ptr, stride_gm, stride_gd, x_ptr,
                      stride_xm, stride_xd, h_ptr, dh_ptr, scale, key_lo, key_hi, threshold,
                      ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """The block's operands of the weight gradients: ``(g, gz, x, a, dh32)``: g and x as stored (16-bit tiles take
    half the registers of fp32 ones), ``gz = g * mask * s`` in fp32, ``a = act(h)`` in DOT_DTYPE (zero past
    r), dh in fp32; h and dh contiguous [*, r] fp32."""
    tile_mask = row_mask[:, None] & col_mask[None, :]
    hr_mask = row_mask[:, None] & rank_mask[None, :]
    g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gd, mask=tile_mask, other=0.0)
    gz = g.to(tl.float32) * branch_factor(rows, col0, scale, key_lo, key_hi, threshold, HAS_DROPOUT, BLOCK_D)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xd, mask=tile_mask, other=0.0)
    h = tl.load(h_ptr + rows[:, None] * r + ranks[None, :], mask=hr_mask, other=0.0)
    a = tl.where(rank_mask[None, :], activate(h, ACTIVATION), 0.0).to(DOT_DTYPE)
    dh32 = tl.load(dh_ptr + rows[:, None] * r + ranks[None, :], mask=hr_mask, other=0.0)
    return g, gz, x, a, dh32


@triton.jit
def weight_grad_dots(dw_up_t, dw_down, gz, x, a, dh, INPUT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``dWu^T += a^T gz`` and ``dWd += dh^T x`` for one block of rows, operands rounded to DOT_DTYPE."""
    dw_up_t = tl.dot(tl.trans(a), gz.to(DOT_DTYPE), dw_up_t, input_precision=INPUT_PRECISION)
    dw_down = tl.dot(tl.trans(dh), x.to(DOT_DTYPE), dw_down, input_precision=INPUT_PRECISION)
    return dw_up_t, dw_down


@triton.jit
def weight_grad_step(dw_up_t, dw_down, db_up, rows, row_mask, col0, cols, col_mask, ranks, rank_mask, d, r,
                     g_ptr, stride_gm, stride_gd, x_ptr, stride_xm, stride_xd, h_ptr, dh_ptr,
                     scale, key_lo, key_hi, threshold, ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr):
    """The block's rows added to the column tile's sums: ``dWu^T += act(h)^T gz``, ``dWd += dh^T x``,
    ``dbu += sum gz`` (gz = g * mask * s). Returns them and the block's fp32 dh (for ``dbd``); h and dh
    are contiguous [*, r] fp32."""
    _, gz, x, a, dh32 = weight_grad_tiles(rows, row_mask, col0, cols, col_mask, ranks, rank_mask, r, g_ptr, stride_gm,
                                          stride_gd, x_ptr, stride_xm, stride_xd, h_ptr, dh_ptr, scale, key_lo,
                                          key_hi, threshold, ACTIVATION=ACTIVATION, HAS_DROPOUT=HAS_DROPOUT,
                                          DOT_DTYPE=DOT_DTYPE, BLOCK_D=BLOCK_D)
    dw_up_t, dw_down = weight_grad_dots(dw_up_t, dw_down, gz, x, a, dh32.to(DOT_DTYPE), INPUT_PRECISION=INPUT_PRECISION,
                                        DOT_DTYPE=DOT_DTYPE)
    db_up += tl.sum(gz, axis=0)
    return dw_up_t, dw_down, db_up, dh32
