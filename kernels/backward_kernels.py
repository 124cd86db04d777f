"""Backward kernels of the adapter op.

With ``g`` the gradient of y, ``m`` the kept-mask, ``s = scale / (1 - p)`` (``scale`` without
dropout), ``a = act(h)``:

    gz      = g * m * s                      gradient at the up-projection output  [N, d]
    da      = gz @ Wu                        gradient at the activation output     [N, r]
    dh      = da * act'(h)                   gradient at the pre-activation        [N, r]
    dx      = dh @ Wd  (+ g when the residual is x)                                [N, d]
    dWu     = gz^T a        dbu = sum_rows gz                                      [d, r], [d]
    dWd     = dh^T x        dbd = sum_rows dh                                      [r, d], [r]

Matmul operands are in x's dtype (gz, a, dh, the weights are rounded to it), accumulation fp32.

Two kernels, because dh needs a full reduction over d before anything that uses it:

1. ``adapter_backward_dh_kernel``, shaped like the forward's first loop: a program owns
   ``BLOCK_M`` rows, accumulates ``da`` over d-chunks in registers (regenerating the dropout mask
   from the seed), forms ``dh = da * act'(h)`` and writes it (``[N, r]`` fp32). Nothing ``[N, d]``
   is written and g is read once.
2. ``adapter_backward_dxdw_kernel``: a program owns a ``BLOCK_D`` column tile and one of S fixed row
   slices, and loads its ``Wd[:, tile]`` once. Per ``BLOCK_M`` rows it reads the g and x tiles
   once (and h, dh) and uses them for everything: ``dx[rows, tile] = dh Wd[:, tile] (+ g)``
   (written), ``dWu^T[:, tile] += act(h)^T gz``, ``dWd[:, tile] += dh^T x`` (both ``[BLOCK_R,
   BLOCK_D]`` fp32 in registers) and ``dbu[tile] += sum_rows gz`` (on sm_90 at r <= 16 and
   33..64, 16-bit: gz added elementwise into a ``[BLOCK_M, BLOCK_D]`` tile summed once after the
   loop, ``config.db_after_loop``). It writes fp32 partials ``[S, ...]``; the launcher sums them
   with torch (fixed order, no atomics), so the weight gradients are bitwise reproducible: S
   depends only on the shapes and the device's SM count (``config.row_slices``). ``dbd =
   dh.sum(0)`` in torch.

Why this split (issue 13): the previous design produced dx in the row kernel, which had to read
its rows of g a second time after the reduction over d (from HBM once the rows in flight exceed
L2, i.e. at d = 4096), and the weight-gradient kernel read g a third time: ~5.2 passes. The
column-tile kernel already holds g (for dWu) and dh (for dWd) of every row, so dx costs it one
``[BLOCK_M, BLOCK_R] x [BLOCK_R, BLOCK_D]`` dot and the store, and the second read of g disappears
for any d.

Bytes moved per backward (``hbm_bytes``), for ``[N, d]`` tensors in ``e``-byte elements, rank r:
- dh kernel: read g (1 pass); read h, write dh (``4 N r`` bytes each); Wu from L2.
- dx/dw kernel: read g, read x, write dx (3 passes; 2 without ``need_dx``); h and dh read once
  from HBM (``4 N r`` each; the re-reads by the other column tiles of a row slice, which run side
  by side, hit L2); write the partials ``S (2 r + 1) d * 4`` bytes; ``Wd[:, tile]`` once.
- reduce (torch): read the partials, write the weight gradients, read dh for dbd.
Total: 4 ``[N, d]`` passes for any d (the fused floor is 3: read g, read x, write dx), against
~5.2 before and ~7 for eager PyTorch. For ranks > 64 (``config.dx_in_row_kernel``) the dh kernel
writes dx in a second pass over d re-reading g, as before (up to ~5.2 passes): there the column
kernel had no registers left for the dx tile on sm_80.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import config as _config
from .activations import backprop
from .adapter_tiles import dx_tile, project_down, weight_grad_dots, weight_grad_tiles
from .launch import Launch, cdiv, dot_precision, dropout_args, in_dtype as _in_dtype


TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit(do_not_specialize=["key_lo", "key_hi", "threshold"])
def adapter_backward_dh_kernel(
    g_ptr, w_up_ptr, w_down_ptr, h_ptr, dh_ptr, dx_ptr,
    n_rows, d, r,
    stride_gm, stride_gd, stride_wu_d, stride_wu_r, stride_wd_r, stride_wd_d,
    scale, key_lo, key_hi, threshold,
    ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, RESIDUAL_IS_X: tl.constexpr, WRITE_DX: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``dh = (gz Wu) * act'(h)`` for rows ``[pid * BLOCK_M, (pid + 1) * BLOCK_M)``; h, dh, dx contiguous.

    Bytes: g read once (one ``[N, d]`` pass), h read and dh written (``4 N r`` each), Wu from L2.
    With ``WRITE_DX`` (ranks > 64 only, see ``config.dx_in_row_kernel``) it also writes
    ``dx = dh Wd (+ g)`` in a second pass over d, last chunk first, re-reading g: up to one
    more read pass where the rows in flight exceed L2, and the dx write.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    ranks = tl.arange(0, BLOCK_R).to(tl.int64)
    rank_mask = ranks < r

    da = project_down(tl.zeros((BLOCK_M, BLOCK_R), tl.float32), g_ptr, rows, row_mask, stride_gm, stride_gd,
                      w_up_ptr, stride_wu_d, stride_wu_r, ranks, rank_mask, d, scale, key_lo, key_hi, threshold,
                      SCALED=True, HAS_DROPOUT=HAS_DROPOUT, DOT_DTYPE=DOT_DTYPE, INPUT_PRECISION=INPUT_PRECISION,
                      BLOCK_D=BLOCK_D)

    hr_mask = row_mask[:, None] & rank_mask[None, :]
    h = tl.load(h_ptr + rows[:, None] * r + ranks[None, :], mask=hr_mask, other=0.0)
    dh = backprop(h, da, ACTIVATION)
    tl.store(dh_ptr + rows[:, None] * r + ranks[None, :], dh, mask=hr_mask)
    if WRITE_DX:
        dh = dh.to(DOT_DTYPE)
        last = (d - 1) // BLOCK_D * BLOCK_D
        for back in range(0, d, BLOCK_D):
            cols = last - back + tl.arange(0, BLOCK_D).to(tl.int64)
            dx_tile(dh, cols, rows, row_mask, ranks, rank_mask, d, w_down_ptr, stride_wd_r, stride_wd_d, g_ptr,
                    stride_gm, stride_gd, dx_ptr, RESIDUAL_IS_X=RESIDUAL_IS_X, INPUT_PRECISION=INPUT_PRECISION,
                    DOT_DTYPE=DOT_DTYPE)


@triton.jit(do_not_specialize=["key_lo", "key_hi", "threshold"])
def adapter_backward_dxdw_kernel(
    g_ptr, x_ptr, w_down_ptr, h_ptr, dh_ptr, dx_ptr, dw_down_part_ptr, dw_up_part_ptr, db_up_part_ptr,
    n_rows, d, r, blocks_per_slice,
    stride_gm, stride_gd, stride_xm, stride_xd, stride_wd_r, stride_wd_d,
    scale, key_lo, key_hi, threshold,
    ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, RESIDUAL_IS_X: tl.constexpr, WRITE_DX: tl.constexpr,
    DB_AFTER_LOOP: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dx of column tile ``pid(0)`` over row slice ``pid(1)``, and that slice's partial dWu, dbu, dWd of the tile.

    ``dx = dh Wd (+ g when the residual is x)``, ``dWu^T = act(h)^T gz``, ``dWd = dh^T x``, ``dbu = sum gz``.
    Without ``WRITE_DX`` (x needs no grad, or ranks > 64 where the row kernel writes dx) it does not write dx.
    With ``DB_AFTER_LOOP`` gz is added elementwise into a ``[BLOCK_M, BLOCK_D]`` fp32 tile summed over
    its rows once after the loop (no cross-warp reduction per block; ``config.db_after_loop``), else
    each block's ``sum_rows gz`` is added to a ``[BLOCK_D]`` vector. dx, h, dh and the partials are contiguous:
    ``dw_down_part [S, r, d]``, ``dw_up_part [S, d, r]``, ``db_up_part [S, d]``.

    Bytes: g and x read once, dx written once (three ``[N, d]`` passes), h and dh once from HBM
    (the other column tiles of the slice find them in L2), ``Wd[:, tile]`` once per program,
    the partials ``(2 r + 1) BLOCK_D`` fp32 per program.
    """
    col0 = tl.program_id(0) * BLOCK_D
    cols = col0.to(tl.int64) + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < r
    slice_id = tl.program_id(1).to(tl.int64)
    w_mask = rank_mask[:, None] & col_mask[None, :]
    if WRITE_DX:
        w_down = tl.load(w_down_ptr + ranks.to(tl.int64)[:, None] * stride_wd_r + cols[None, :] * stride_wd_d,
                         mask=w_mask, other=0.0).to(DOT_DTYPE)

    dw_up_t = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    dw_down = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    if DB_AFTER_LOOP:
        gz_sum = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    else:
        db_up = tl.zeros((BLOCK_D,), tl.float32)
    for block in range(0, blocks_per_slice):
        rows = (slice_id * blocks_per_slice + block) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        g, gz, x, a, dh32 = weight_grad_tiles(
            rows, row_mask, col0, cols, col_mask, ranks, rank_mask, r, g_ptr, stride_gm, stride_gd, x_ptr, stride_xm,
            stride_xd, h_ptr, dh_ptr, scale, key_lo, key_hi, threshold, ACTIVATION=ACTIVATION,
            HAS_DROPOUT=HAS_DROPOUT, DOT_DTYPE=DOT_DTYPE, BLOCK_D=BLOCK_D)
        dh = dh32.to(DOT_DTYPE)
        dw_up_t, dw_down = weight_grad_dots(dw_up_t, dw_down, gz, x, a, dh, INPUT_PRECISION=INPUT_PRECISION,
                                            DOT_DTYPE=DOT_DTYPE)
        if DB_AFTER_LOOP:
            gz_sum += gz
        else:
            db_up += tl.sum(gz, axis=0)
        if WRITE_DX:
            dx = tl.dot(dh, w_down, input_precision=INPUT_PRECISION)
            if RESIDUAL_IS_X:
                dx += g.to(tl.float32)
            tl.store(dx_ptr + rows[:, None] * d + cols[None, :], dx.to(DOT_DTYPE),
                     mask=row_mask[:, None] & col_mask[None, :])

    tl.store(dw_down_part_ptr + (slice_id * r + ranks[:, None]) * d + cols[None, :], dw_down, mask=w_mask)
    tl.store(dw_up_part_ptr + (slice_id * d + cols[None, :]) * r + ranks[:, None], dw_up_t, mask=w_mask)
    if DB_AFTER_LOOP:
        db_up = tl.sum(gz_sum, axis=0)
    tl.store(db_up_part_ptr + slice_id * d + cols, db_up, mask=col_mask)


def hbm_bytes(n_rows: int, d: int, r: int, elem_bytes: int, residual_is_x: bool = True,
              need_dx: bool = True) -> dict:
    """The bytes model of one backward, per kernel (``backward_dh``, ``backward_dxdw``, ``reduce``).

    backward-dh: read g, read h, write dh, Wu once (for ranks > 64 also write dx and re-read the
    part of g that misses L2). backward-dxdw: read g and x, write dx (for ranks <= 64 with
    ``need_dx``), read h and dh once from HBM (the per-column-tile re-reads hit L2), Wd once,
    write the fp32 partials. reduce: read the partials and dh, write the weight gradients (torch
    sums). For ranks <= 64 ``residual_is_x`` changes no byte: dx's residual term is the g tile
    the dx/dw kernel has loaded anyway.
    """
    dtype = torch.float32 if elem_bytes == 4 else torch.float16
    cfgs = _config.choose(d, r, dtype)
    nd = n_rows * d * elem_bytes
    small = 4 * n_rows * r
    slices = _config.row_slices(n_rows, d, r, cfgs.backward_dxdw, _config.DEFAULT_SM_COUNT)
    partials = slices * (2 * r + 1) * d * 4
    in_rows = need_dx and _config.dx_in_row_kernel(r)
    regreads = (_config.reread_miss_fraction(d, elem_bytes, cfgs.backward_dh.block_m)
                if in_rows and residual_is_x else 0.0)
    return {
        "backward_dh": int(nd * (1 + (1 + regreads if in_rows else 0))) + 2 * small + 2 * r * d * elem_bytes,
        "backward_dxdw": (3 if need_dx and not in_rows else 2) * nd + 2 * small + partials + r * d * elem_bytes,
        "reduce": partials + (2 * r + 1) * d * elem_bytes + small,
    }


def _zero_grads(x, w_down, w_up):
    r, d = w_down.shape
    dev = x.device
    return (torch.zeros((r, d), dtype=w_down.dtype, device=dev), torch.zeros((r,), dtype=w_down.dtype, device=dev),
            torch.zeros((d, r), dtype=w_up.dtype, device=dev), torch.zeros((d,), dtype=w_up.dtype, device=dev))


@functools.lru_cache(maxsize=512)
def _static(d, r, dtype, activation, has_dropout, precision, residual_is_x, need_dx, major):
    """What the launches need beyond the tensors, once per problem kind: ``(configs, (constexprs, kwargs) x 2)``."""
    cfgs = _config.choose(d, r, dtype, major, precision)
    shared = dict(ACTIVATION=activation, HAS_DROPOUT=has_dropout, INPUT_PRECISION=precision,
                  DOT_DTYPE=TL_DTYPES[dtype])
    in_rows = _config.dx_in_row_kernel(r)
    c = cfgs.backward_dh
    dh_constexprs = dict(shared, RESIDUAL_IS_X=residual_is_x, WRITE_DX=need_dx and in_rows, BLOCK_M=c.block_m,
                         BLOCK_D=c.block_d, BLOCK_R=c.block_r)
    c = cfgs.backward_dxdw
    dxdw_constexprs = dict(shared, RESIDUAL_IS_X=residual_is_x, WRITE_DX=need_dx and not in_rows,
                           DB_AFTER_LOOP=_config.db_after_loop(r, dtype, major, precision), BLOCK_M=c.block_m,
                           BLOCK_D=c.block_d, BLOCK_R=c.block_r)
    return (cfgs, (dh_constexprs, {**dh_constexprs, **cfgs.backward_dh.options()}),
            (dxdw_constexprs, {**dxdw_constexprs, **cfgs.backward_dxdw.options()}))


def plan(grad_y, x, w_down, w_up, h, activation, scale, dropout_p, seed, residual_is_x, need_dx=True):
    """Allocates dx (None without ``need_dx``), dh and the fp32 partials; returns them with the two launches.

    The launches are empty when N == 0.
    """
    n_rows, d = x.shape
    r = w_down.shape[0]
    dev = x.device
    has_dropout, eff_scale, key_lo, key_hi, threshold = dropout_args(scale, dropout_p, seed)
    cfgs, (dh_constexprs, dh_kwargs), (dxdw_constexprs, dxdw_kwargs) = _static(
        d, r, x.dtype, activation, has_dropout, dot_precision(x.dtype, r), bool(residual_is_x), bool(need_dx),
        _config.cc_major(dev))
    dx = torch.empty((n_rows, d), dtype=x.dtype, device=dev) if need_dx else None
    dh = torch.empty((n_rows, r), dtype=torch.float32, device=dev)
    slices = _config.row_slices(n_rows, d, r, cfgs.backward_dxdw, _config.sm_count(dev)) if n_rows else 0
    parts = (torch.empty((slices, r, d), dtype=torch.float32, device=dev),
             torch.empty((slices, d, r), dtype=torch.float32, device=dev),
             torch.empty((slices, d), dtype=torch.float32, device=dev))
    if n_rows == 0:
        return dx, dh, parts, []
    w_down, w_up = _in_dtype(w_down, x.dtype), _in_dtype(w_up, x.dtype)
    if h.dtype != torch.float32 or not h.is_contiguous():
        h = h.to(torch.float32).contiguous()
    g_strides, x_strides = grad_y.stride(), x.stride()

    c = cfgs.backward_dh
    dh_launch = Launch(
        adapter_backward_dh_kernel, (cdiv(n_rows, c.block_m),),
        (grad_y, w_up, w_down, h, dh, dh if dx is None else dx, n_rows, d, r, *g_strides, *w_up.stride(),
         *w_down.stride(), eff_scale, key_lo, key_hi, threshold),
        dh_constexprs, c, dh_kwargs)

    c = cfgs.backward_dxdw
    blocks_per_slice = cdiv(cdiv(n_rows, c.block_m), slices)
    dxdw_launch = Launch(
        adapter_backward_dxdw_kernel, (cdiv(d, c.block_d), slices),
        (grad_y, x, w_down, h, dh, dh if dx is None else dx, *parts, n_rows, d, r, blocks_per_slice, *g_strides,
         *x_strides, *w_down.stride(), eff_scale, key_lo, key_hi, threshold),
        dxdw_constexprs, c, dxdw_kwargs)
    return dx, dh, parts, [dh_launch, dxdw_launch]


def backward(grad_y, x, w_down, w_up, b_down, b_up, h, activation, scale, dropout_p, seed, residual_is_x,
             need_dx=True):
    """Returns ``(dx, dw_down, db_down, dw_up, db_up)`` (see the module docstring); dx is None without ``need_dx``."""
    dx, dh, parts, launches = plan(grad_y, x, w_down, w_up, h, activation, scale, dropout_p, seed, residual_is_x,
                                   need_dx)
    if not launches:
        return (dx, *_zero_grads(x, w_down, w_up))
    for launch in launches:
        launch()
    return (dx, *reduce(parts, dh, w_down.dtype, w_up.dtype))


def reduce(parts, dh, down_dtype, up_dtype):
    """``(dw_down, db_down, dw_up, db_up)``: the fp32 partials of ``plan`` summed over their row
    slices in a fixed order (and db_down over dh's rows), in the weights' dtypes."""
    dw_down_part, dw_up_part, db_up_part = parts
    return (dw_down_part.sum(0).to(down_dtype), dh.sum(0).to(down_dtype), dw_up_part.sum(0).to(up_dtype),
            db_up_part.sum(0).to(up_dtype))


