"""The Triton kernels' cost proxies for the README's table, compiled ahead of time without a GPU.

    python -m benchmarks.triton_proxies [--arch 90 80]

Compiles the kernel variants of the README's proxy table (bf16, r = 64 and 16, with and without
dropout) with ``adapterfast.compile_check.compile_variant`` for each ``--arch`` and prints one
row per variant: configuration, registers, spills, MMA kind and the SASS instructions per thread
per tile element of each loop. Proxies, not timings: they say how much each kernel issues per
element, which is what dropout's RNG and the tile shapes change. A few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from adapterfast import compile_check

V = compile_check.Variant
TABLE = (
    V("forward", "bf16", 64), V("forward", "bf16", 64, dropout=False),
    V("backward_dx", "bf16", 64), V("backward_dx", "bf16", 64, dropout=False),
    V("backward_dw", "bf16", 64), V("backward_dw", "bf16", 64, dropout=False),
    V("backward_dw", "bf16", 16),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 90 80")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="adapterfast-proxies-"))
    print("| arch | kernel | variant | config | registers | spills | mma | loop instr/elem |")
    print("|---|---|---|---|---:|---:|---|---|")
    failed = False
    for arch in args.arch:
        for variant in TABLE:
            row = compile_check.compile_variant(variant, arch)
            failed |= bool(compile_check.problems(row))
            loops = ", ".join(f"{v:.2f}" for v in row["loop_instructions"] or [])
            print(f"| {row['arch']} | {row['kernel']} | {row['dtype']} {row['variant']} | {row['config']} | "
                  f"{row['registers']} | {row['spills']} | {row['mma']} | {loops or row['error']} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
