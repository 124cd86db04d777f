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

1. ``adapter_backward_dx_kernel``, shaped like the forward: a program owns ``BLOCK_M`` rows,
   accumulates ``da`` over d-chunks in registers (regenerating the dropout mask from the seed),
   forms ``dh = da * act'(h)``, writes it (``[N, r]`` fp32, for kernel 2), then produces ``dx``
   chunk by chunk, last chunk first (the g chunks it re-reads most recently read, so likeliest
   in L2), from ``dh`` and ``Wd`` (adding g again when the residual is x).
2. ``adapter_backward_dw_kernel``: a program owns a ``BLOCK_D`` column tile and one of S fixed
   row slices; per ``BLOCK_M`` rows it loads g (mask again), x, h and dh and accumulates
   ``dWu^T[:, tile]``, ``dWd[:, tile]`` (both ``[BLOCK_R, BLOCK_D]``, so both dots share one warp
   layout) and ``dbu[tile]`` in registers, then writes them as fp32 partials ``[S, ...]``.
   (Accumulating dbu elementwise and reducing once after the loop saves ~10 instructions per
   element but made the fp32 r=128 variant spill on sm_80, so dbu is still summed per block.) The
   launcher sums the S partials with torch (fixed order, no atomics), so the weight gradients
   are bitwise reproducible; S depends only on the shapes and the device
   (``config.row_slices``). ``dbd = dh.sum(0)`` in torch.

Bytes moved per backward, for ``[N, d]`` tensors in ``e``-byte elements and rank r:
- HBM, ``[N, d]`` passes: read g, write dx (kernel 1); read g, read x (kernel 2): 4 passes,
  against the fused floor of 3 and ~7 for eager PyTorch. Kernel 1 re-reads its rows of g for
  the residual right after reading them: from L2 while the rows in flight fit in it (as for the
  forward's residual), else up to one more pass. Without dx (``need_dx=False``) kernel 1 only
  reads g: 3 passes. Small tensors: h read twice, dh written
  once and read once (``4 N r`` bytes each); partials ``S (2 r + 1) d * 4`` bytes written and read.
- L2: kernel 2 re-reads the rows of h and dh once per column tile (``d / BLOCK_D`` times);
  column tiles of one row slice run side by side, so those reads hit L2. Every program of
  either kernel reads its weights from L2.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import config as _config
from .activations import backprop
from .adapter_tiles import dx_tile, project_down, weight_grad_step
from .launch import Launch, cdiv, dot_precision, dropout_args, in_dtype as _in_dtype


TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit(do_not_specialize=["key_lo", "key_hi", "threshold"])
def adapter_backward_dx_kernel(
    g_ptr, w_down_ptr, w_up_ptr, h_ptr, dh_ptr, dx_ptr,
    n_rows, d, r,
    stride_gm, stride_gd, stride_wd_r, stride_wd_d, stride_wu_d, stride_wu_r,
    scale, key_lo, key_hi, threshold,
    ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, RESIDUAL_IS_X: tl.constexpr, NEED_DX: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``dh`` and ``dx`` for rows ``[pid * BLOCK_M, (pid + 1) * BLOCK_M)``; dh and dx are contiguous.

    Without ``NEED_DX`` (x does not require grad) only dh is produced: the second pass over d,
    one read of g and the write of dx, is skipped.
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
    if NEED_DX:
        dh = dh.to(DOT_DTYPE)
        last = (d - 1) // BLOCK_D * BLOCK_D
        for back in range(0, d, BLOCK_D):
            start = last - back
            cols = start + tl.arange(0, BLOCK_D).to(tl.int64)
            dx_tile(dh, cols, rows, row_mask, ranks, rank_mask, d, w_down_ptr, stride_wd_r, stride_wd_d, g_ptr,
                    stride_gm, stride_gd, dx_ptr, RESIDUAL_IS_X=RESIDUAL_IS_X, INPUT_PRECISION=INPUT_PRECISION,
                    DOT_DTYPE=DOT_DTYPE)


@triton.jit(do_not_specialize=["key_lo", "key_hi", "threshold"])
def adapter_backward_dw_kernel(
    g_ptr, x_ptr, h_ptr, dh_ptr, dw_down_part_ptr, dw_up_part_ptr, db_up_part_ptr,
    n_rows, d, r, blocks_per_slice,
    stride_gm, stride_gd, stride_xm, stride_xd,
    scale, key_lo, key_hi, threshold,
    ACTIVATION: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Partial dWu, dbu, dWd of row slice ``pid(1)`` for column tile ``pid(0)``.

    Partials are contiguous: ``dw_down_part [S, r, d]``, ``dw_up_part [S, d, r]``, ``db_up_part [S, d]``.
    """
    col0 = tl.program_id(0) * BLOCK_D
    cols = col0.to(tl.int64) + tl.arange(0, BLOCK_D)
    col_mask = cols < d
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < r
    slice_id = tl.program_id(1).to(tl.int64)

    dw_up_t = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    dw_down = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    db_up = tl.zeros((BLOCK_D,), tl.float32)
    for block in range(0, blocks_per_slice):
        rows = (slice_id * blocks_per_slice + block) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        dw_up_t, dw_down, db_up, _ = weight_grad_step(
            dw_up_t, dw_down, db_up, rows, row_mask, col0, cols, col_mask, ranks, rank_mask, d, r, g_ptr, stride_gm,
            stride_gd, x_ptr, stride_xm, stride_xd, h_ptr, dh_ptr, scale, key_lo, key_hi, threshold,
            ACTIVATION=ACTIVATION, HAS_DROPOUT=HAS_DROPOUT, INPUT_PRECISION=INPUT_PRECISION, DOT_DTYPE=DOT_DTYPE,
            BLOCK_D=BLOCK_D)

    dw_mask = rank_mask[:, None] & col_mask[None, :]
    tl.store(dw_down_part_ptr + (slice_id * r + ranks[:, None]) * d + cols[None, :], dw_down, mask=dw_mask)
    tl.store(dw_up_part_ptr + (slice_id * d + cols[None, :]) * r + ranks[:, None], dw_up_t, mask=dw_mask)
    tl.store(db_up_part_ptr + slice_id * d + cols, db_up, mask=col_mask)


def hbm_bytes(n_rows: int, d: int, r: int, elem_bytes: int, residual_is_x: bool = True,
              need_dx: bool = True) -> dict:
    """The bytes model of one backward, per kernel (``backward_dx``, ``backward_dw``, ``reduce``).

    backward-dx: read g; re-read for dx, when the residual is x, the part of g that misses L2;
    write dx; read h, write dh. backward-dw: read g and x, read h and dh once from HBM (the
    per-column-tile re-reads hit L2), write the fp32 partials. reduce: read the partials, write
    the weight gradients (torch sums). Weights are counted once.
    """
    dtype = torch.float32 if elem_bytes == 4 else torch.float16
    cfgs = _config.choose(d, r, dtype)
    nd = n_rows * d * elem_bytes
    small = 4 * n_rows * r
    regreads = (_config.reread_miss_fraction(d, elem_bytes, cfgs.backward_dx.block_m)
                if residual_is_x and need_dx else 0.0)
    slices = _config.row_slices(n_rows, d, r, cfgs.backward_dw, _config.DEFAULT_SM_COUNT)
    partials = slices * (2 * r + 1) * d * 4
    return {
        "backward_dx": int(nd * (1 + (1 if need_dx else 0) + regreads)) + 2 * small + 2 * r * d * elem_bytes,
        "backward_dw": 2 * nd + 2 * small + partials,
        "reduce": partials + (2 * r + 1) * d * elem_bytes + small,
    }


def _zero_grads(x, w_down, w_up):
    r, d = w_down.shape
    dev = x.device
    return (torch.zeros((r, d), dtype=w_down.dtype, device=dev), torch.zeros((r,), dtype=w_down.dtype, device=dev),
            torch.zeros((d, r), dtype=w_up.dtype, device=dev), torch.zeros((d,), dtype=w_up.dtype, device=dev))


@functools.lru_cache(maxsize=512)
def _static(d, r, dtype, activation, has_dropout, precision, residual_is_x, need_dx):
    """What the launches need beyond the tensors, once per problem kind: ``(configs, (constexprs, kwargs) x 2)``."""
    cfgs = _config.choose(d, r, dtype)
    shared = dict(ACTIVATION=activation, HAS_DROPOUT=has_dropout, INPUT_PRECISION=precision,
                  DOT_DTYPE=TL_DTYPES[dtype])
    c = cfgs.backward_dx
    dx_constexprs = dict(shared, RESIDUAL_IS_X=residual_is_x, NEED_DX=need_dx, BLOCK_M=c.block_m,
                         BLOCK_D=c.block_d, BLOCK_R=c.block_r)
    c = cfgs.backward_dw
    dw_constexprs = dict(shared, BLOCK_M=c.block_m, BLOCK_D=c.block_d, BLOCK_R=c.block_r)
    return (cfgs, (dx_constexprs, {**dx_constexprs, **cfgs.backward_dx.options()}),
            (dw_constexprs, {**dw_constexprs, **cfgs.backward_dw.options()}))


def plan(grad_y, x, w_down, w_up, h, activation, scale, dropout_p, seed, residual_is_x, need_dx=True):
    """Allocates dx (None without ``need_dx``), dh and the fp32 partials; returns them with the two launches.

    The launches are empty when N == 0.
    """
    n_rows, d = x.shape
    r = w_down.shape[0]
    dev = x.device
    has_dropout, eff_scale, key_lo, key_hi, threshold = dropout_args(scale, dropout_p, seed)
    cfgs, (dx_constexprs, dx_kwargs), (dw_constexprs, dw_kwargs) = _static(
        d, r, x.dtype, activation, has_dropout, dot_precision(x.dtype), bool(residual_is_x), bool(need_dx))
    dx = torch.empty((n_rows, d), dtype=x.dtype, device=dev) if need_dx else None
    dh = torch.empty((n_rows, r), dtype=torch.float32, device=dev)
    slices = _config.row_slices(n_rows, d, r, cfgs.backward_dw, _config.sm_count(dev)) if n_rows else 0
    parts = (torch.empty((slices, r, d), dtype=torch.float32, device=dev),
             torch.empty((slices, d, r), dtype=torch.float32, device=dev),
             torch.empty((slices, d), dtype=torch.float32, device=dev))
    if n_rows == 0:
        return dx, dh, parts, []
    w_down, w_up = _in_dtype(w_down, x.dtype), _in_dtype(w_up, x.dtype)
    if h.dtype != torch.float32 or not h.is_contiguous():
        h = h.to(torch.float32).contiguous()
    g_strides, x_strides = grad_y.stride(), x.stride()

    c = cfgs.backward_dx
    dx_launch = Launch(
        adapter_backward_dx_kernel, (cdiv(n_rows, c.block_m),),
        (grad_y, w_down, w_up, h, dh, dh if dx is None else dx, n_rows, d, r, *g_strides,
         *w_down.stride(), *w_up.stride(), eff_scale, key_lo, key_hi, threshold),
        dx_constexprs, c, dx_kwargs)

    c = cfgs.backward_dw
    blocks_per_slice = cdiv(cdiv(n_rows, c.block_m), slices)
    dw_launch = Launch(
        adapter_backward_dw_kernel, (cdiv(d, c.block_d), slices),
        (grad_y, x, h, dh, *parts, n_rows, d, r, blocks_per_slice, *g_strides, *x_strides,
         eff_scale, key_lo, key_hi, threshold),
        dw_constexprs, c, dw_kwargs)
    return dx, dh, parts, [dx_launch, dw_launch]


def backward(grad_y, x, w_down, w_up, b_down, b_up, h, activation, scale, dropout_p, seed, residual_is_x,
             need_dx=True):
    """Returns ``(dx, dw_down, db_down, dw_up, db_up)`` (see the module docstring); dx is None without ``need_dx``."""
    dx, dh, parts, launches = plan(grad_y, x, w_down, w_up, h, activation, scale, dropout_p, seed, residual_is_x,
                                   need_dx)
    if not launches:
        return (dx, *_zero_grads(x, w_down, w_up))
    for launch in launches:
        launch()
    dw_down_part, dw_up_part, db_up_part = parts
    return (dx, dw_down_part.sum(0).to(w_down.dtype), dh.sum(0).to(w_down.dtype),
            dw_up_part.sum(0).to(w_up.dtype), db_up_part.sum(0).to(w_up.dtype))


