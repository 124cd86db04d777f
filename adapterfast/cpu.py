"""The fused CPU backend: C++ kernels in ``csrc/``, built by ``setup.py`` as ``adapterfast._C``.

``forward`` and ``backward`` have exactly the semantics of ``adapterfast.reference.forward`` and
``adapterfast.reference.backward`` for 2-D CPU tensors in float32, bfloat16, float16 or float64
(weights in any of these dtypes; any strides). Per block of rows, x is read once and y written once
in the forward, and grad_y and x read once and dx written once in the backward: no ``[N, d]``
temporary. Results are bitwise reproducible, whatever the thread count.

What runs the GEMMs is chosen at run time, per dtype (``kernel_isa(dtype)`` says which):

- bfloat16: PyTorch's brgemm micro-kernel (oneDNN's ukernel) on 16-bit operands with fp32
  accumulation, on AMX tiles (``"brgemm-amx"``) or AVX512-BF16 (``"brgemm-avx512"``), where oneDNN
  offers it (AVX-512 and up);
- float16 where oneDNN's float16 kernel runs on AMX tiles (AMX-FP16): that kernel
  (``"brgemm-amx"``);
- float16 where bf16 runs on AMX tiles but float16 does not (AMX-BF16 without AMX-FP16):
  ``"brgemm-amx-bf16x3-fwd"``, the forward from r = 32 and 256 rows with its float16 values split
  exactly into bf16 hi + lo and each product taken as the three bf16 products hi.hi + hi.lo + lo.hi
  on the AMX tiles (``csrc/bf16_split.h``; the dropped lo.lo is below 2^-16 relative), the other
  forwards and the backward on the fp32 kernels below, which measured faster there than both the
  split and oneDNN's AVX512-FP16 kernel (figures in ``csrc/brgemm.cpp`` at ``fp16_route``);
- otherwise, and for float32: hand-tiled AVX-512 fp32 kernels where PyTorch itself runs AVX-512
  (``"avx512"``; 16-bit rows read as stored and widened as the tiles load them), else the same row
  blocks with their products on PyTorch's BLAS, MKL's sgemm in PyTorch's x86 builds (``"blas"``;
  16-bit operands widened to fp32 a block at a time), or portable C++ loops where PyTorch exports
  no sgemm or ``ADAPTERFAST_CPU_BLAS=0`` (``"generic"``);
- float64: the same row blocks on PyTorch's dgemm on every CPU (``"blas"``), or the portable loops
  where PyTorch exports no dgemm or ``ADAPTERFAST_CPU_BLAS=0`` (``"generic"``).

Switches for tests and for comparing paths on one machine: ``ADAPTERFAST_CPU_BRGEMM=0`` turns
brgemm off; ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` makes oneDNN act as on a CPU without AMX;
``ATEN_CPU_CAPABILITY=avx2`` selects the BLAS kernels (and so no brgemm), with
``ADAPTERFAST_CPU_BLAS=0`` the portable ones;
``ADAPTERFAST_CPU_FP16=native`` runs float16 on oneDNN's float16 kernel wherever it exists,
``=bf16x3`` splits forward and backward at every r and row count wherever bf16 brgemm runs
(``"brgemm-amx-bf16x3"``, or ``"brgemm-avx512-bf16x3"`` without AMX), and ``=bf16x3-fwd`` the
forward alone at every r and row count. The grouped op (``grouped_cpu``) runs float16 on oneDNN's float16 kernel
wherever it exists. All are read once, at the
first call.

An eager call with autograd recording runs ``adapterfast_cpu::fused`` (``csrc/adapter_autograd.cpp``):
the op with its derivative as a C++ ``torch::autograd::Function``, so a training step costs one op
call from Python and the autograd engine runs the backward without coming back to Python. The
Python ``autograd.FusedAdapter`` around ``forward``/``backward`` gives bitwise the same results,
but its Python backward node, the saved-tensor unpacking and a second op call from Python cost a
[8, 64] r=8 step about a third more (``python -m benchmarks.profile_call``, fastest interleaved
batches on the 2-CPU dev VM: 79 us native, 104 us through the Python Function, 121 us for the
eager adapter), which at small N decides whether adapterfast beats the eager adapter.
Forward-mode AD, torch.func and autocast still take the Python Function.

Outputs of 256 KiB or more (y, dx, the backward's partial sums) come from a small cache of
buffers released by earlier outputs (``csrc/output_buffers.cpp``; at most 64 MiB kept, reported to
the profiler as allocations and frees), so a training step does not pay the first-touch page
faults of fresh memory each call; ``ADAPTERFAST_CPU_OUTPUT_CACHE=0`` turns the cache off. A fresh
buffer spanning two or more 2 MiB pages is advised to use transparent huge pages (Linux), which
makes its page faults several times cheaper; ``ADAPTERFAST_CPU_HUGE_PAGES=0`` turns that off.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (importing it registers torch.ops.adapterfast_cpu)
except ImportError as error:
    _IMPORT_ERROR: Optional[ImportError] = error
else:
    _IMPORT_ERROR = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def available() -> bool:
    """Whether the C++ extension is built and loads."""
    return _IMPORT_ERROR is None


def unavailable_reason() -> Optional[str]:
    """Why the backend cannot run, or None when it can."""
    if _IMPORT_ERROR is None:
        return None
    if os.environ.get("ADAPTERFAST_BUILD_CPU") == "0":
        return f"adapterfast._C was not built (ADAPTERFAST_BUILD_CPU=0 at install): {_IMPORT_ERROR}"
    return f"adapterfast._C was not built or does not load: {_IMPORT_ERROR}"


def kernel_isa(dtype: torch.dtype = torch.float32) -> str:
    """What runs the single-adapter op's GEMMs for inputs of ``dtype`` here: ``"brgemm-amx"``,
    ``"brgemm-avx512"``, ``"brgemm-amx-bf16x3"`` / ``"brgemm-avx512-bf16x3"`` (float16 split into
    bf16 in both passes; with ``-fwd`` in the forward only, at the ranks and rows it is split),
    ``"avx512"``, ``"blas"`` or ``"generic"`` (see the module docstring). Calls of a few rows may take the
    fp32 kernels even where this names brgemm: bf16 forwards of up to 4 rows (8 with weights of
    2^17 elements or more) read the weights as given there instead of packing them."""
    _require()
    return torch.ops.adapterfast_cpu.kernel_isa(dtype)


# Measured with ``python -m benchmarks.overhead`` on an AMD EPYC with AVX2 and no AVX-512
# (benchmarks/results/cpu_avx2_epyc.txt, 2026-12-04/05): the portable loops against the eager adapter.
_GENERIC_MEASURED = ("0.14x-0.80x the eager adapter in float32 at N = 64-8192, where the reference ran 0.77x-1.06x; "
                     "in bfloat16 at N = 64-320 the reference ran 4.5x-7.0x eager, the C++ loops 0.70x-4.4x; "
                     "0.22x-0.72x in float64 at N = 64-2048")


def slower_here(dtype: torch.dtype) -> Optional[str]:
    """Why auto should not run this backend for ``dtype`` on this CPU, or None.

    Where only the portable loops would run (``kernel_isa(dtype) == "generic"``: the BLAS kernels
    are off or PyTorch exports no such gemm, and for the 16-bit dtypes and float32 PyTorch itself
    runs below AVX-512 here), the reference on PyTorch's own GEMMs is faster than them (float32,
    bfloat16 and float64 measured; float16 converts as bfloat16 does and is taken to follow), so
    auto runs the reference, saying so once; ``use_backend("cpu")`` still runs the C++ kernels.
    Everywhere else (``"blas"``, ``"avx512"``, brgemm) the C++ backend runs."""
    if kernel_isa(dtype) != "generic":
        return None
    return (f"adapterfast's C++ kernels have only portable loops for {dtype} on this CPU (PyTorch runs at "
            f"{torch.backends.cpu.get_cpu_capability()}; no BLAS kernels: ADAPTERFAST_CPU_BLAS=0, or PyTorch exports "
            f"no such gemm) ({_GENERIC_MEASURED} on an AMD EPYC with AVX2); "
            "use_backend('cpu') or ADAPTERFAST_BACKEND=cpu runs them anyway")


def _require() -> None:
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"the adapterfast cpu backend is unavailable: {unavailable_reason()}")


def _check_dtype(x: Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(
            f"the adapterfast cpu backend supports float32, bfloat16, float16 and float64 inputs, got {x.dtype}; "
            "use the reference backend for other dtypes"
        )


def _seed(seed, dropout_p: float) -> int:
    return 0 if dropout_p == 0.0 or seed is None else int(seed)


def forward(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual):
    """Returns ``(y, h)``: ``y`` ``[N, d]`` in x's dtype and the pre-activation ``h`` ``[N, r]``
    in fp32 (float64 for float64 x)."""
    _require()
    _check_dtype(x)
    return torch.ops.adapterfast_cpu.forward(
        x, w_down, w_up, b_down, b_up, activation, float(scale), float(dropout_p), _seed(seed, dropout_p), residual
    )


def backward(grad_y, x, w_down, w_up, b_down, b_up, h, activation, scale, dropout_p, seed, residual_is_x, *,
             need_dx=True):
    """Returns ``(dx, dw_down, db_down, dw_up, db_up)``; weight and bias gradients in the weights' dtypes."""
    _require()
    _check_dtype(x)
    return torch.ops.adapterfast_cpu.backward(
        grad_y, x, w_down, w_up, b_down, b_up, h, activation, float(scale), float(dropout_p),
        _seed(seed, dropout_p), bool(residual_is_x),
    )



def _registered_backward(grad_y, x, w_down, w_up, b_down, b_up, h, activation, scale, dropout_p, seed, residual_is_x,
                         *, need_dx=True):
    return _op_backward(grad_y, x, w_down, w_up, b_down, b_up, h, activation, scale, dropout_p, seed, residual_is_x)


# Registration: the backend is selectable by name once imported. dispatch only selects it for the
# dtypes in DTYPES, and the autograd Function passes a float scale and an int seed (0 without
# dropout), so the C++ ops are registered directly, without the checks above on every call.
from . import dispatch  # noqa: E402

if _IMPORT_ERROR is None:
    # ``_op`` is the overload's C++ callable, without OpOverload.__call__'s Python frame
    _op_backward = getattr(torch.ops.adapterfast_cpu.backward.default, "_op", torch.ops.adapterfast_cpu.backward)
    _op_forward = getattr(torch.ops.adapterfast_cpu.forward.default, "_op", torch.ops.adapterfast_cpu.forward)
    _op_fused = getattr(torch.ops.adapterfast_cpu.fused.default, "_op", torch.ops.adapterfast_cpu.fused)
    dispatch.register("cpu", forward=_op_forward, backward=_registered_backward,
                      dtypes=DTYPES, unavailable=unavailable_reason, differentiable=_op_fused, slower_here=slower_here)
else:
    dispatch.register("cpu", forward=forward, backward=backward, dtypes=DTYPES, unavailable=unavailable_reason)
