"""Forward kernel: ``y = residual + s * mask * (act(x Wd^T + bd) Wu^T + bu)`` and ``h = x Wd^T + bd``.

One kernel, one program per ``BLOCK_M`` rows:

1. ``h = x_rows @ Wd^T`` accumulated in fp32 over d-chunks of ``BLOCK_D`` (``tl.dot`` with the
   weights in x's dtype: the launcher casts fp32 weights once per call); ``h`` (``[BLOCK_M, BLOCK_R]``, r padded and masked) stays in
   registers. Add ``bd``, store h (fp32, the only saved activation), ``a = act(h)`` in x's dtype.
2. For each d-chunk, last chunk first: ``u = a @ Wu^T[:, chunk] + bu``, the Philox dropout
   factor, the residual, and the store of ``y``. Going backwards, the residual chunks read first
   are those step 1 read last, the likeliest to be still in L2.

Bytes moved per forward, for ``[N, d]`` x in ``e``-byte elements and rank r:
- HBM: read x (``N d e``), write y (``N d e``), write h (``4 N r``): the fused 2-pass
  floor. The residual (x itself by default) is re-read in step 2 right after step 1 read the
  same rows: that read is served from L2 while the rows of the programs in flight
  (``BLOCK_M * d * e`` bytes each: 96 KB for d = 768 in bf16, 512 KB for d = 4096) fit in it,
  and costs up to one more read pass beyond that. A separate residual adds one read pass.
- L2: every program reads both weights (``2 r d e_w``), i.e. ``r / BLOCK_M`` times the bytes of
  its rows; they are small and stay L2-resident.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import config as _config
from .activations import activate
from .adapter_tiles import output_tile, project_down
from .launch import Launch, cdiv, dot_precision, dropout_args, in_dtype


@triton.jit(do_not_specialize=["key_lo", "key_hi", "threshold"])
def adapter_forward_kernel(
    x_ptr, w_down_ptr, b_down_ptr, w_up_ptr, b_up_ptr, res_ptr, y_ptr, h_ptr,
    n_rows, d, r,
    stride_xm, stride_xd, stride_wd_r, stride_wd_d, stride_wu_d, stride_wu_r, stride_rm, stride_rd,
    stride_bd, stride_bu, scale, key_lo, key_hi, threshold,
    ACTIVATION: tl.constexpr, HAS_B_DOWN: tl.constexpr, HAS_B_UP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program: rows ``[pid * BLOCK_M, (pid + 1) * BLOCK_M)``; y and h are contiguous.

    Row and column offsets are int64, so any view of an ``[N, d]`` tensor past 2**31 elements (a
    column-major x) is addressed right. Rank offsets stay int32 (a weight's rank stride times
    r <= 256 stays far below 2**31 for any real d); int64 there made the fp32 forward spill on sm_90.
    """
    dtype = x_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < r

    h = project_down(tl.zeros((BLOCK_M, BLOCK_R), tl.float32), x_ptr, rows, row_mask, stride_xm, stride_xd,
                     w_down_ptr, stride_wd_d, stride_wd_r, ranks, rank_mask, d, scale, key_lo, key_hi, threshold,
                     SCALED=False, HAS_DROPOUT=HAS_DROPOUT, DOT_DTYPE=dtype, INPUT_PRECISION=INPUT_PRECISION,
                     BLOCK_D=BLOCK_D)
    if HAS_B_DOWN:
        h += tl.load(b_down_ptr + ranks * stride_bd, mask=rank_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(h_ptr + rows[:, None] * r + ranks[None, :], h, mask=row_mask[:, None] & rank_mask[None, :])
    a = tl.where(rank_mask[None, :], activate(h, ACTIVATION), 0.0).to(dtype)

    last = (d - 1) // BLOCK_D * BLOCK_D
    for back in range(0, d, BLOCK_D):
        start = last - back
        output_tile(a, start, rows, row_mask, ranks, rank_mask, d, w_up_ptr, stride_wu_r, stride_wu_d, b_up_ptr, stride_bu,
                    res_ptr, stride_rm, stride_rd, y_ptr, scale, key_lo, key_hi, threshold,
                    HAS_B_UP=HAS_B_UP, HAS_DROPOUT=HAS_DROPOUT, INPUT_PRECISION=INPUT_PRECISION,
                    BLOCK_D=BLOCK_D)


def hbm_bytes(n_rows: int, d: int, r: int, elem_bytes: int, separate_residual: bool = False) -> int:
    """The bytes model of one forward: HBM bytes moved for ``[N, d]`` x of ``elem_bytes`` elements.

    Read x and write y (the floor), write h (fp32 ``[N, r]``), read a separate residual, or re-read
    the part of x (as the residual) that L2 does not serve (``config.reread_miss_fraction``).
    Weights (``2 r d``, L2-resident) are counted once.
    """
    block_m = _config.choose(d, r, torch.float32 if elem_bytes == 4 else torch.float16).forward.block_m
    passes = 3.0 if separate_residual else 2.0 + _config.reread_miss_fraction(d, elem_bytes, block_m)
    return int(passes * n_rows * d * elem_bytes) + 4 * n_rows * r + 2 * r * d * elem_bytes


@functools.lru_cache(maxsize=512)
def _static(d, r, dtype, activation, has_b_down, has_b_up, has_dropout, precision):
    """What a launch needs beyond the tensors, computed once per problem kind: ``(config, kwargs)``."""
    cfg = _config.choose(d, r, dtype, precision=precision).forward
    constexprs = dict(
        ACTIVATION=activation, HAS_B_DOWN=has_b_down, HAS_B_UP=has_b_up, HAS_DROPOUT=has_dropout,
        INPUT_PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_R=cfg.block_r,
    )
    return cfg, constexprs, {**constexprs, **cfg.options()}


def plan(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual):
    """Allocates ``(y, h)`` and returns them with the launch that fills them (None when N == 0)."""
    n_rows, d = x.shape
    r = w_down.shape[0]
    y = torch.empty((n_rows, d), dtype=x.dtype, device=x.device)
    h = torch.empty((n_rows, r), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, h, None
    res = x if residual is None else residual
    w_down, w_up = in_dtype(w_down, x.dtype), in_dtype(w_up, x.dtype)
    has_dropout, eff_scale, key_lo, key_hi, threshold = dropout_args(scale, dropout_p, seed)
    cfg, constexprs, kwargs = _static(d, r, x.dtype, activation, b_down is not None, b_up is not None, has_dropout,
                                      dot_precision(x.dtype, r))
    x_strides, wd_strides, wu_strides, res_strides = x.stride(), w_down.stride(), w_up.stride(), res.stride()
    args = (
        x, w_down, w_down if b_down is None else b_down, w_up, w_up if b_up is None else b_up, res, y, h,
        n_rows, d, r, *x_strides, *wd_strides, wu_strides[0], wu_strides[1], *res_strides,
        1 if b_down is None else b_down.stride(0), 1 if b_up is None else b_up.stride(0),
        eff_scale, key_lo, key_hi, threshold,
    )
    return y, h, Launch(adapter_forward_kernel, (cdiv(n_rows, cfg.block_m),), args, constexprs, cfg, kwargs)


def forward(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual):
    """Returns ``(y, h)``: ``y`` ``[N, d]`` in x's dtype, the pre-activation ``h`` ``[N, r]`` fp32."""
    y, h, launch = plan(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual)
    if launch is not None:
        launch()
    return y, h
