"""Triton backend of the grouped adapter op (``adapterfast.kernels.grouped``).

``forward`` and ``backward`` have the signatures and semantics of ``adapterfast.grouped_reference``
on 2-D inputs, for ranks ``1 <= r <= 256``. The launchers sort the rows by adapter and build the
block table (``schedule``), then run the kernels of ``grouped_kernels.py``, with the block sizes of
the single-adapter kernels (``config.py``). No host synchronisation, so index values outside
``[-1, A)`` are checked only on CPU tensors (the interpreter); on CUDA they are clamped by the
sort keys and must be validated by the caller (``AdapterBank`` builds its indices itself).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterfast.activations import ACTIVATIONS

from . import config as _config
from .backward_kernels import TL_DTYPES
from .grouped_kernels import grouped_backward_dw_kernel, grouped_backward_dx_kernel, grouped_forward_kernel
from .launch import dot_precision, dropout_args, on_device


# No native differentiable op: eager calls with autograd run grouped_autograd.GroupedAdapter
# around forward and backward (grouped.py).
differentiable = None

@dataclass
class Schedule:
    """Rows sorted by slot (0: no adapter, a + 1: adapter a) and blocks of one slot each."""

    order: torch.Tensor        # [N] int64: original row of each sorted position
    seg_begin: torch.Tensor    # [A + 1] int64: first sorted position of each slot
    seg_end: torch.Tensor      # [A + 1] int64
    block_slot: torch.Tensor   # [B] int32
    block_begin: torch.Tensor  # [B] int64
    block_end: torch.Tensor    # [B] int64 (== begin for the surplus blocks)


def schedule(adapter_index: torch.Tensor, adapters: int, block_m: int) -> Schedule:
    """Sorts rows by slot and cuts each slot into blocks of ``block_m`` rows, with device ops only.

    The block count is bounded by ``cdiv(N, block_m) + A + 1`` (each slot wastes at most one
    partial block), so the grid is known without reading the counts back to the host.
    """
    n = adapter_index.shape[0]
    dev = adapter_index.device
    slot = adapter_index.to(torch.int64) + 1
    if not slot.is_cuda and n:
        lo, hi = (int(v) for v in torch.aminmax(slot))
        if lo < 0 or hi > adapters:
            raise ValueError(f"adapter_index must be in [-1, {adapters}) for a bank of {adapters} adapters, "
                             f"got values in [{lo - 1}, {hi - 1}]")
    slot = slot.clamp(0, adapters)
    order = torch.sort(slot, stable=True).indices
    counts = torch.bincount(slot, minlength=adapters + 1)
    seg_end = torch.cumsum(counts, 0)
    seg_begin = seg_end - counts
    blocks_per = (counts + block_m - 1) // block_m
    blocks_end = torch.cumsum(blocks_per, 0)
    total = (n + block_m - 1) // block_m + adapters + 1  # triton.cdiv costs a jit call from the host
    b = torch.arange(total, device=dev, dtype=torch.int64)
    block_slot = torch.searchsorted(blocks_end, b, right=True)
    valid = block_slot <= adapters
    s = block_slot.clamp(max=adapters)
    first = blocks_end[s] - blocks_per[s]
    begin = seg_begin[s] + (b - first) * block_m
    end = torch.minimum(begin + block_m, seg_end[s])
    begin = torch.where(valid, begin, 0)
    end = torch.where(valid, end, 0)
    return Schedule(order, seg_begin, seg_end, s.to(torch.int32), begin, end)


def _check(x, w_down, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; the kernels implement {', '.join(ACTIVATIONS)}")
    if x.dim() != 2:
        raise ValueError(f"the kernels take 2-D x [N, d], got shape {tuple(x.shape)}")
    _config.block_r(w_down.shape[1])


def _branch_scales(scales, dropout_p: float) -> torch.Tensor:
    """Per-adapter branch scale ``scales / (1 - p)`` in float64, then fp32 as the kernels read it."""
    return (scales.to(torch.float64) / (1.0 - dropout_p)).to(torch.float32).contiguous()


def forward(x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, dropout_p, seed, residual):
    """Returns ``(y, h)``: ``y`` ``[N, d]`` contiguous in x's dtype, ``h`` ``[N, r]`` fp32 (0 where no adapter)."""
    _check(x, w_down, activation)
    n, d = x.shape
    A, r, _ = w_down.shape
    cfg = _config.choose(d, r, x.dtype).forward
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    h = torch.empty((n, r), dtype=torch.float32, device=x.device)
    if n == 0:
        return y, h
    sched = schedule(adapter_index, A, cfg.block_m)
    res = x if residual is None else residual
    has_dropout, _, key_lo, key_hi, threshold = dropout_args(1.0, dropout_p, seed)
    eff = _branch_scales(scales, dropout_p if has_dropout else 0.0)
    bd = w_down if b_down is None else b_down
    bu = w_up if b_up is None else b_up
    with on_device(x):
        grouped_forward_kernel[(sched.block_slot.shape[0],)](
            x, w_down, bd, w_up, bu, eff, res, y, h,
            sched.order, sched.block_slot, sched.block_begin, sched.block_end,
            d, r,
            x.stride(0), x.stride(1), w_down.stride(0), w_down.stride(1), w_down.stride(2),
            w_up.stride(0), w_up.stride(1), w_up.stride(2),
            0 if b_down is None else b_down.stride(0), 0 if b_up is None else b_up.stride(0),
            res.stride(0), res.stride(1),
            key_lo, key_hi, threshold,
            ACTIVATION=activation, HAS_B_DOWN=b_down is not None, HAS_B_UP=b_up is not None,
            HAS_DROPOUT=has_dropout, INPUT_PRECISION=dot_precision(x.dtype),
            BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_R=cfg.block_r, **cfg.options(),
        )
    return y, h


def backward(grad_y, x, adapter_index, w_down, w_up, b_down, b_up, h, activation, scales, dropout_p, seed,
             residual_is_x):
    """Returns ``(dx, dw_down, db_down, dw_up, db_up)`` stacked per adapter; bitwise reproducible."""
    _check(x, w_down, activation)
    n, d = x.shape
    A, r, _ = w_down.shape
    cfgs = _config.choose(d, r, x.dtype)
    dev = x.device
    dx = torch.empty((n, d), dtype=x.dtype, device=dev)
    dh = torch.empty((n, r), dtype=torch.float32, device=dev)
    dw_down = torch.zeros((A, r, d), dtype=torch.float32, device=dev)
    dw_up = torch.zeros((A, d, r), dtype=torch.float32, device=dev)
    db_up = torch.zeros((A, d), dtype=torch.float32, device=dev)
    db_down = torch.zeros((A, r), dtype=torch.float32, device=dev)
    if n > 0:
        c = cfgs.backward_dx
        sched = schedule(adapter_index, A, c.block_m)
        h = h.to(torch.float32).contiguous()
        has_dropout, _, key_lo, key_hi, threshold = dropout_args(1.0, dropout_p, seed)
        eff = _branch_scales(scales, dropout_p if has_dropout else 0.0)
        shared = dict(ACTIVATION=activation, HAS_DROPOUT=has_dropout, INPUT_PRECISION=dot_precision(x.dtype),
                      DOT_DTYPE=TL_DTYPES[x.dtype])
        with on_device(x):
            grouped_backward_dx_kernel[(sched.block_slot.shape[0],)](
                grad_y, w_down, w_up, eff, h, dh, dx,
                sched.order, sched.block_slot, sched.block_begin, sched.block_end,
                d, r,
                grad_y.stride(0), grad_y.stride(1), w_down.stride(0), w_down.stride(1), w_down.stride(2),
                w_up.stride(0), w_up.stride(1), w_up.stride(2),
                key_lo, key_hi, threshold,
                RESIDUAL_IS_X=bool(residual_is_x), BLOCK_M=c.block_m, BLOCK_D=c.block_d, BLOCK_R=c.block_r,
                **shared, **c.options(),
            )
            c = cfgs.backward_dw
            grouped_backward_dw_kernel[((d + c.block_d - 1) // c.block_d, A)](
                grad_y, x, eff, h, dh, sched.order, sched.seg_begin[1:], sched.seg_end[1:],
                dw_down, dw_up, db_up, db_down,
                d, r,
                grad_y.stride(0), grad_y.stride(1), x.stride(0), x.stride(1),
                key_lo, key_hi, threshold,
                BLOCK_M=c.block_m, BLOCK_D=c.block_d, BLOCK_R=c.block_r, **shared, **c.options(),
            )
    wd, wu = w_down.dtype, w_up.dtype
    return dx, dw_down.to(wd), db_down.to(wd), dw_up.to(wu), db_up.to(wu)
