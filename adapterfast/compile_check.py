"""Compile every Triton kernel variant ahead of time, without a GPU, and report its resources.

    python -m adapterfast.compile_check --arch sm_80 sm_90 [--json] [--quick] [--workers N]

For each variant (kernel x dtype x rank bucket x activation x constexpr flags) it builds the
launch exactly as the launchers do (``forward_kernel.plan`` / ``backward_kernels.plan`` of
``adapterfast.kernels``, on meta tensors of a representative ``[8192, 4096]`` shape),
specialises the arguments the way Triton's JIT would (pointer alignment, ``== 1`` strides,
divisibility by 16), compiles with ``triton.compile`` for the target, and reports registers and
spills (the bundled ``ptxas -v`` on the PTX), shared memory (``metadata.shared``, checked
against the arch limit) and whether tensor-core instructions appear in the PTX (``mma`` on
sm_80, ``wgmma``/``mma`` on sm_90). ``--json`` prints a list of objects with the keys
``kernel, arch, dtype, config, registers, spills, shared_bytes, tensor_core`` plus ``variant``
(rank bucket, activation and flags) and ``error``.

It exits non-zero on any compile error, spill, or shared memory over the limit. Triton's cache
lives in a fresh temporary directory, so nothing cached hides a failure.

Variant sets: ``cover()`` (``--quick``, what the tests run: 51 variants per arch) is every
kernel x dtype x rank bucket with every constexpr flag on (bias, dropout, residual-is-x: the
superset of the epilogue code), activations taken in turn so that each appears, plus fp32
weights with bf16 x and tf32. ``full()`` (the default, 900 variants per arch: use ``--workers``
on a machine with cores) is every kernel x (fp32, tf32, fp16, bf16, fp16 and bf16 with fp32
weights) x rank bucket x activation with the flags on, plus each with the flags off. The flags
and the activation only switch elementwise code; the tile shapes and dots, which decide most
of the registers, shared memory and tensor-core use, come from ``kernels/config.py``. Shapes
whose strides are not multiples of 16 get a JIT variant without divisibility hints, which
only narrows vector loads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

SHARED_LIMIT = {80: 166912, 90: 232448}
KERNELS = ("forward", "backward_dx", "backward_dw")
DTYPES = ("fp32", "fp16", "bf16")
SHAPE = (8192, 4096)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled kernel: which kernel, for which inputs, with which constexpr flags."""

    kernel: str
    dtype: str
    r: int
    activation: str = "relu"
    weight_dtype: str | None = None
    bias: bool = True
    dropout: bool = True
    residual_is_x: bool = True
    tf32: bool = False

    def describe(self) -> str:
        """The activation and the constexpr flags this kernel has, joined by ``+``."""
        relevant = {"forward": ("bias", "dropout", "tf32"), "backward_dx": ("dropout", "residual_is_x", "tf32"),
                    "backward_dw": ("dropout", "tf32")}[self.kernel]
        return "+".join([self.activation] + [flag for flag in relevant if getattr(self, flag)])

    def dtype_label(self) -> str:
        return self.dtype if self.weight_dtype in (None, self.dtype) else f"{self.dtype}/w{self.weight_dtype}"


def _activations():
    from adapterfast.activations import ACTIVATIONS
    return ACTIVATIONS


def _r_buckets():
    from adapterfast.kernels.config import R_BUCKETS
    return R_BUCKETS


def cover() -> list[Variant]:
    """A small covering set: every kernel x dtype x rank bucket, every activation at least once."""
    acts = _activations()
    variants = []
    i = 0
    for kernel in KERNELS:
        for dtype in DTYPES:
            for r in _r_buckets():
                variants.append(Variant(kernel, dtype, r, acts[i % len(acts)]))
                i += 1
        variants.append(Variant(kernel, "bf16", 64, weight_dtype="fp32"))
        variants.append(Variant(kernel, "fp32", 64, tf32=True))
    return variants


def full() -> list[Variant]:
    """Every activation for every kernel x dtype (with mixed precision and tf32) x rank bucket, plus flags off."""
    dtypes = [("fp32", None, False), ("fp32", None, True), ("fp16", None, False), ("bf16", None, False),
              ("fp16", "fp32", False), ("bf16", "fp32", False)]
    variants = []
    for kernel in KERNELS:
        for dtype, wdtype, tf32 in dtypes:
            for r in _r_buckets():
                for act in _activations():
                    variants.append(Variant(kernel, dtype, r, act, wdtype, tf32=tf32))
                variants.append(Variant(kernel, dtype, r, "identity", wdtype, bias=False, dropout=False,
                                        residual_is_x=False, tf32=tf32))
    return variants


def _launch(variant: Variant):
    """The ``Launch`` the launchers produce for this variant, on meta tensors."""
    import torch

    from adapterfast.kernels import backward_kernels, forward_kernel

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = dtypes[variant.dtype]
    wdtype = dtypes[variant.weight_dtype or variant.dtype]
    n, d = SHAPE
    r = variant.r
    meta = dict(device="meta")
    x = torch.empty((n, d), dtype=dtype, **meta)
    w_down = torch.empty((r, d), dtype=wdtype, **meta)
    w_up = torch.empty((d, r), dtype=wdtype, **meta)
    b_down = torch.empty((r,), dtype=wdtype, **meta) if variant.bias else None
    b_up = torch.empty((d,), dtype=wdtype, **meta) if variant.bias else None
    p, seed = (0.1, 12345678901) if variant.dropout else (0.0, None)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = variant.tf32
    try:
        if variant.kernel == "forward":
            return forward_kernel.plan(x, w_down, b_down, w_up, b_up, None, variant.activation, 0.5, p, seed)[2]
        h = torch.empty((n, r), dtype=torch.float32, **meta)
        launches = backward_kernels.plan(x, x, w_down, w_up, h, variant.residual_is_x, variant.activation,
                                         0.5, p, seed)[3]
        return launches[KERNELS.index(variant.kernel) - 1]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _source(launch):
    """``ASTSource`` with the signature, constexprs and alignment attributes Triton's JIT would use."""
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    kernel = launch.kernel
    values = dict(zip(kernel.arg_names, launch.args))
    values.update(launch.constexprs)
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, param.is_const, not param.do_not_specialize,
                                          not param.do_not_specialize_on_alignment)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[param.name] = value
        elif spec:
            attrs[(index,)] = BaseBackend.parse_attr(spec)
    return ASTSource(kernel, signature, constexprs, attrs)


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """``(registers, spill bytes)`` from the bundled ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-v", f"--gpu-name={target}", path, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    info = run.stdout + run.stderr
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    return registers, spills


def compile_variant(variant: Variant, arch: int) -> dict:
    """Compiles one variant for ``sm_<arch>`` and returns its row of the report."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = {"kernel": variant.kernel, "arch": f"sm_{arch}", "dtype": variant.dtype_label(), "config": None,
           "registers": None, "spills": None, "shared_bytes": None, "tensor_core": None,
           "variant": f"r{variant.r}:{variant.describe()}", "error": None}
    try:
        launch = _launch(variant)
        row["config"] = str(launch.config)
        compiled = triton.compile(_source(launch), target=GPUTarget("cuda", arch, 32), options=launch.config.options())
        ptx = compiled.asm["ptx"]
        row["shared_bytes"] = compiled.metadata.shared
        row["registers"], row["spills"] = _ptxas_usage(ptx, arch)
        pattern = r"\bwgmma\.|\bmma\." if arch >= 90 else r"\bmma\."
        row["tensor_core"] = re.search(pattern, ptx) is not None
    except Exception as error:  # reported per variant; the exit status says something failed
        row["error"] = _describe(error)
    return row


def _describe(error: Exception) -> str:
    """One line: the exception, where in the kernel (for Triton compilation errors), and the cause."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    if error.__cause__ is not None:
        text += f" caused by {type(error.__cause__).__name__}: {str(error.__cause__).strip()[:300]}"
    return text


def problems(row: dict) -> list[str]:
    """What is wrong with a report row: compile error, spills, shared memory over the limit."""
    if row["error"]:
        return [row["error"]]
    found = []
    if row["spills"]:
        found.append(f"{row['spills']} bytes of spills")
    limit = SHARED_LIMIT.get(int(row["arch"][3:]))
    if limit is not None and row["shared_bytes"] > limit:
        found.append(f"shared memory {row['shared_bytes']} B over the {limit} B limit")
    return found


def _worker_init(cache_dir: str) -> None:
    """Runs in each fresh worker before Triton is imported there: real compiler, private cache."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _compile_job(job):
    return compile_variant(*job)


def check(archs, variants, workers: int = 2) -> list[dict]:
    """Compiles ``variants`` for every arch in ``archs`` (ints like 90 or strings like "sm_90")."""
    archs = [int(str(a).removeprefix("sm_")) for a in archs]
    jobs = [(v, a) for a in archs for v in variants]
    with tempfile.TemporaryDirectory(prefix="adapterfast-triton-cache-") as cache_dir:
        context = get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init,
                                 initargs=(cache_dir,)) as pool:
            return list(pool.map(_compile_job, jobs))


def format_table(rows: list[dict]) -> str:
    columns = ["kernel", "arch", "dtype", "variant", "config", "registers", "spills", "shared_bytes", "tensor_core"]
    cells = [[str(row[c]) for c in columns] + ["; ".join(problems(row)) or "ok"] for row in rows]
    header = columns + ["status"]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapterfast.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], help="targets, e.g. sm_80 sm_90")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--quick", action="store_true", help="compile the covering set only")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    rows = check(args.arch, cover() if args.quick else full(), workers=args.workers)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    failed = [row for row in rows if problems(row)]
    if failed:
        print(f"{len(failed)} of {len(rows)} variants failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
