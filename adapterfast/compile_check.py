"""Compile every Triton kernel variant ahead of time, without a GPU, and report its resources.

(One file past 400 lines on purpose: enumerating the variants, compiling them and reading ptxas/SASS
output are one job, a report row per variant, and every part is only used here.)

    python -m adapterfast.compile_check [--arch sm_80 sm_90] [--full] [--json] [--workers N]

For each variant (kernel x dtype x rank bucket x activation x constexpr flags x layout) it builds
the launch exactly as the launchers do (``forward_kernel.plan`` / ``backward_kernels.plan`` of
``adapterfast.kernels``, on meta tensors of a representative ``[8192, 4096]`` shape),
specialises the arguments the way Triton's JIT would (pointer alignment, ``== 1`` strides,
divisibility by 16), compiles with ``triton.compile`` for the target and reports, per variant:

- ``registers``, ``spills``: the bundled ``ptxas -v`` on the PTX;
- ``shared_bytes``: ``metadata.shared``, checked against the arch's limit;
- ``mma``: the matrix instructions in the PTX: ``wgmma`` (sm_90 warpgroup MMA), ``mma.sync``
  (sm_80-style tensor cores) or ``fma`` (no tensor cores), joined by ``+`` when a kernel's dots
  differ, so a regression from wgmma to mma.sync on sm_90 shows;
- ``loop_instructions``: for each loop of the SASS (``nvdisasm``, shipped with Triton), its
  instructions per thread per tile element (``instructions x 32 x num_warps / (BLOCK_M x
  BLOCK_D)``): the issue cost of each main loop, the proxy for epilogue arithmetic such as the
  dropout RNG;
- ``hbm_passes``: the kernel's bytes model (``hbm_bytes`` next to each kernel) in ``[N, d]``
  passes of x's dtype;
- ``i32_tensor_muls``: 32-bit integer multiplies on tensors in the Triton IR. Without dropout
  (whose Philox is uint32 arithmetic) it must be 0: every offset that a stride multiplies is
  int64, so views past 2**31 elements are addressed right.

``--json`` prints a list of these rows (with ``kernel, arch, dtype, variant, config, error``).
It exits non-zero on any compile error, spill, or shared memory over the limit. Triton's cache
lives in a fresh temporary directory, so nothing cached hides a failure.

Variant sets: ``cover()`` (the default and what the tests run: 60 variants per arch, a few minutes
on 2 cores) is every kernel x dtype x rank bucket with every constexpr flag on (bias, dropout,
residual-is-x: the superset of the epilogue code), activations taken in turn so that each appears,
plus fp32 weights with bf16 x, tf32, tf32x3 (``ADAPTERFAST_TF32X3``), and strided (column-major)
inputs without dropout. ``full()`` (``--full``: 900 variants per arch, about 2 hours per arch on 2
cores; use ``--workers`` on a machine with cores) is every kernel x (fp32, tf32, fp16, bf16, fp16
and bf16 with fp32 weights) x rank bucket x activation with the flags on, plus each with the flags
off. The flags and the activation only switch elementwise code; the tile shapes and dots, which
decide most of the registers, shared memory and tensor-core use, come from ``kernels/config.py``.
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
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

SHARED_LIMIT = {80: 166912, 90: 232448}
KERNELS = ("forward", "backward_dh", "backward_dxdw")
DTYPES = ("fp32", "fp16", "bf16")
SHAPE = (8192, 4096)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled kernel: which kernel, for which inputs, with which constexpr flags and layout."""

    kernel: str
    dtype: str
    r: int
    activation: str = "relu"
    weight_dtype: str | None = None
    bias: bool = True
    dropout: bool = True
    residual_is_x: bool = True
    tf32: bool = False
    tf32x3: bool = False
    strided: bool = False

    def describe(self) -> str:
        """The activation and the constexpr flags this kernel has, joined by ``+``."""
        relevant = {"forward": ("bias", "dropout", "tf32", "tf32x3"), "backward_dh": ("dropout", "tf32", "tf32x3"),
                    "backward_dxdw": ("dropout", "residual_is_x", "tf32", "tf32x3")}[self.kernel]
        flags = [flag for flag in relevant if getattr(self, flag)]
        return "+".join([self.activation] + flags + (["strided"] if self.strided else []))

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
        variants.append(Variant(kernel, "fp32", 64, tf32x3=True))
        variants.append(Variant(kernel, "fp16", 64, dropout=False, strided=True))
        variants.append(Variant(kernel, "fp32", 16, dropout=False, strided=True))
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


def _tensors(variant: Variant) -> dict:
    """Meta tensors of the variant's shape; strided ones are column-major (x, g) or sliced (biases).

    The weights stay row-major: their rank offsets are int32 by design (see the forward kernel).
    """
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = dtypes[variant.dtype]
    wdtype = dtypes[variant.weight_dtype or variant.dtype]
    n, d = SHAPE
    r = variant.r

    def make(shape, dt):
        if not variant.strided:
            return torch.empty(shape, dtype=dt, device="meta")
        if len(shape) == 1:
            return torch.empty((2 * shape[0],), dtype=dt, device="meta")[::2]
        return torch.empty(shape[::-1], dtype=dt, device="meta").t()

    return dict(x=make((n, d), dtype), g=make((n, d), dtype),
                w_down=torch.empty((r, d), dtype=wdtype, device="meta"),
                w_up=torch.empty((d, r), dtype=wdtype, device="meta"), b_down=make((r,), wdtype) if variant.bias else None,
                b_up=make((d,), wdtype) if variant.bias else None,
                h=torch.empty((n, r), dtype=torch.float32, device="meta"))


def _launch(variant: Variant, arch: int = 90):
    """The ``Launch`` the launchers produce for this variant on ``sm_<arch>``, on meta tensors."""
    from adapterfast.kernels import backward_kernels, config, forward_kernel, launch

    t = _tensors(variant)
    p, seed = (0.1, 12345678901) if variant.dropout else (0.0, None)
    previous = launch.tf32_allowed, launch.tf32x3_requested, config.cc_major
    launch.tf32_allowed, launch.tf32x3_requested = (lambda: variant.tf32), (lambda: variant.tf32x3)
    config.cc_major = lambda device: arch // 10
    try:
        if variant.kernel == "forward":
            return forward_kernel.plan(t["x"], t["w_down"], t["w_up"], t["b_down"], t["b_up"], variant.activation,
                                       0.5, p, seed, None)[2]
        launches = backward_kernels.plan(t["g"], t["x"], t["w_down"], t["w_up"], t["h"], variant.activation, 0.5, p,
                                         seed, variant.residual_is_x)[3]
        return launches[KERNELS.index(variant.kernel) - 1]
    finally:
        launch.tf32_allowed, launch.tf32x3_requested, config.cc_major = previous


def _hbm_passes(variant: Variant) -> float:
    """The kernel's bytes model at ``SHAPE``, in ``[N, d]`` passes of x's dtype."""
    from adapterfast.kernels import backward_kernels, forward_kernel

    n, d = SHAPE
    elem = 4 if variant.dtype == "fp32" else 2
    if variant.kernel == "forward":
        total = forward_kernel.hbm_bytes(n, d, variant.r, elem, separate_residual=False)
    else:
        total = backward_kernels.hbm_bytes(n, d, variant.r, elem)[variant.kernel]
    return round(total / (n * d * elem), 3)


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


def _tool(name: str) -> str:
    """Path of a CUDA binary shipped with Triton (``ptxas``, ``nvdisasm``)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


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


def mma_kind(ptx: str) -> str:
    """``wgmma``, ``mma.sync`` or ``fma``: the matrix instructions in the PTX, ``+``-joined when several."""
    kinds = [kind for kind, pattern in (("wgmma", r"\bwgmma\.mma_async"), ("mma.sync", r"\bmma\.sync\."))
             if re.search(pattern, ptx)]
    return "+".join(kinds) or "fma"


def loop_sizes(sass: str) -> list[int]:
    """Instructions in each loop of ``nvdisasm -c`` output: label to the branch that jumps back to it.

    Loops of one or two instructions (the trap loop ending every kernel, spin waits) are left out.
    """
    label_at, sizes, count = {}, [], 0
    for line in sass.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line.strip())
        if label:
            label_at[label.group(1)] = count
            continue
        if not re.match(r"^\s*/\*[0-9a-f]+\*/", line):
            continue
        count += 1
        branch = re.search(r"\bBRA\s+`?\(?(\.L_x_\d+)", line)
        if branch and branch.group(1) in label_at:
            sizes.append(count - label_at[branch.group(1)])
    return [size for size in sizes if size > 2]


def _sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout


def i32_tensor_muls(ttir: str) -> int:
    """32-bit integer multiplies on tensors in Triton IR (int32 offset arithmetic, or Philox)."""
    return len(re.findall(r"arith\.muli [^\n]*: tensor<[0-9x]*xi32>", ttir))


def compile_variant(variant: Variant, arch: int) -> dict:
    """Compiles one variant for ``sm_<arch>`` and returns its row of the report."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = {"kernel": variant.kernel, "arch": f"sm_{arch}", "dtype": variant.dtype_label(), "config": None,
           "registers": None, "spills": None, "shared_bytes": None, "mma": None, "loop_instructions": None,
           "hbm_passes": None, "i32_tensor_muls": None, "variant": f"r{variant.r}:{variant.describe()}",
           "error": None}
    try:
        launch = _launch(variant, arch)
        cfg = launch.config
        row["config"] = str(cfg)
        row["hbm_passes"] = _hbm_passes(variant)
        compiled = triton.compile(_source(launch), target=GPUTarget("cuda", arch, 32), options=cfg.options())
        ptx = compiled.asm["ptx"]
        row["shared_bytes"] = compiled.metadata.shared
        row["registers"], row["spills"] = _ptxas_usage(ptx, arch)
        row["mma"] = mma_kind(ptx)
        row["i32_tensor_muls"] = i32_tensor_muls(compiled.asm["ttir"])
        per_element = 32 * cfg.num_warps / (cfg.block_m * cfg.block_d)
        row["loop_instructions"] = [round(n * per_element, 2) for n in loop_sizes(_sass(compiled.asm["cubin"]))]
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


def check(archs, variants, workers: int = 2, progress=None) -> list[dict]:
    """Compiles ``variants`` for every arch in ``archs`` (ints like 90 or strings like "sm_90").

    ``progress(done, total, row)`` is called as each variant finishes (rows stay in job order).
    """
    archs = [int(str(a).removeprefix("sm_")) for a in archs]
    jobs = [(v, a) for a in archs for v in variants]
    rows = []
    with tempfile.TemporaryDirectory(prefix="adapterfast-triton-cache-") as cache_dir:
        context = get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init,
                                 initargs=(cache_dir,)) as pool:
            for row in pool.map(_compile_job, jobs):
                rows.append(row)
                if progress is not None:
                    progress(len(rows), len(jobs), row)
    return rows


class ProgressBar:
    """A one-line progress bar on stderr (a line per 10% when stderr is not a terminal)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.tty = self.stream.isatty()
        self.failed = 0
        self.last_decile = -1

    def __call__(self, done: int, total: int, row: dict) -> None:
        self.failed += bool(problems(row))
        elapsed = time.monotonic() - self.started
        eta = elapsed / done * (total - done)
        filled = 30 * done // total
        text = (f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} variants, {self.failed} failed, "
                f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left")
        if self.tty:
            self.stream.write("\r" + text + ("\n" if done == total else ""))
        elif 10 * done // total != self.last_decile:
            self.last_decile = 10 * done // total
            self.stream.write(text + "\n")
        self.stream.flush()


def summary(rows: list[dict], seconds: float) -> str:
    """One line: variants, failures, worst registers and shared memory, MMA kinds seen."""
    failed = [row for row in rows if problems(row)]
    good = [row for row in rows if not row["error"]]
    registers = max((row["registers"] for row in good), default=0)
    shared = max((row["shared_bytes"] for row in good), default=0)
    kinds = sorted({row["mma"] for row in good})
    return (f"compile_check: {len(rows)} variants, {len(rows) - len(failed)} ok, {len(failed)} failed; "
            f"max {registers} registers, max {shared} B shared; mma kinds {', '.join(kinds) or '-'}; "
            f"{seconds:.0f}s")


def format_table(rows: list[dict]) -> str:
    columns = ["kernel", "arch", "dtype", "variant", "config", "registers", "spills", "shared_bytes", "mma",
               "loop_instructions", "hbm_passes"]
    cells = [[str(row[c]) for c in columns] + ["; ".join(problems(row)) or "ok"] for row in rows]
    header = columns + ["status"]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adapterfast.compile_check", description=__doc__.split("\n")[0],
        epilog=f"Default: the covering set, {len(cover())} variants per arch (a few minutes on 2 cores). "
               f"--full: {len(full())} variants per arch, about 2 hours per arch on 2 cores.")
    parser.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"],
                        help="compile targets, e.g. sm_80 sm_90 (default: both)")
    parser.add_argument("--full", action="store_true",
                        help=f"compile every variant ({len(full())} per arch, ~2 h per arch on 2 cores) "
                             "instead of the covering set")
    parser.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    parser.add_argument("--workers", type=int, default=2, help="compiler processes in parallel (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows = check(args.arch, full() if args.full else cover(), workers=args.workers,
                 progress=None if args.no_progress else ProgressBar())
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    print(summary(rows, time.monotonic() - started), file=sys.stderr)
    return 1 if any(problems(row) for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
