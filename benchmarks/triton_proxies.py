"""The Triton kernels' cost proxies for the README's table, compiled ahead of time without a GPU.

    python -m benchmarks.triton_proxies [--arch 90 80]

Compiles the kernel variants of the README's proxy table (the forward and the two backward
kernels, bf16, r = 64 and 16, with and without dropout: issue 13's shapes) with
``adapterfast.compile_check.compile_variant`` for each ``--arch`` and prints one row per variant:
configuration, registers, spills, MMA kind, the SASS instructions per thread per tile element of
each loop, and the kernel's bytes model (``hbm_bytes`` next to it) in ``[N, d]`` passes at
N = 16384, d = 4096. Proxies, not timings: they say how much each kernel issues per
element, which is what dropout's RNG and the tile shapes change. A few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from adapterfast import compile_check

V = compile_check.Variant
TABLE = tuple(V(kernel, "bf16", r, dropout=dropout) for r in (64, 16) for kernel in compile_check.KERNELS
              for dropout in (True, False))
N, D = 16384, 4096


def hbm_passes(variant) -> float:
    """The kernel's bytes model at ``N x D`` in ``[N, d]`` passes of x's dtype (backward-dxdw: with the
    reduction of its partials)."""
    from adapterfast.kernels import backward_kernels, forward_kernel

    elem = 4 if variant.dtype == "fp32" else 2
    if variant.kernel == "forward":
        total = forward_kernel.hbm_bytes(N, D, variant.r, elem)
    else:
        model = backward_kernels.hbm_bytes(N, D, variant.r, elem)
        total = model[variant.kernel] + (model["reduce"] if variant.kernel == "backward_dxdw" else 0)
    return total / (N * D * elem)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 90 80")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="adapterfast-proxies-"))
    print(f"| arch | kernel | variant | config | registers | spills | mma | loop instr/elem | HBM passes N={N} d={D} |")
    print("|---|---|---|---|---:|---:|---|---|---:|")
    failed = False
    for arch in args.arch:
        for variant in TABLE:
            row = compile_check.compile_variant(variant, arch)
            failed |= bool(compile_check.problems(row))
            loops = ", ".join(f"{v:.2f}" for v in row["loop_instructions"] or [])
            print(f"| {row['arch']} | {row['kernel']} | {row['dtype']} {row['variant']} | {row['config']} | "
                  f"{row['registers']} | {row['spills']} | {row['mma']} | {loops or row['error']} | "
                  f"{hbm_passes(variant):.2f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
