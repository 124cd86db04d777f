"""The CPU backend's GEMM paths against each other, for the per-dtype choice in csrc/brgemm.cpp.

The path is fixed per process (adapterfast.cpu reads its switches once), so each path runs in its
own subprocess, alternating path by path for ``--repeats`` rounds; each prints forward and
backward medians (torch.utils.benchmark) at the given shape. Paths: ``default`` (what runs for
the dtype here), ``brgemm-off`` (ADAPTERFAST_CPU_BRGEMM=0), ``fp32-brgemm``
(ADAPTERFAST_CPU_FP32_BRGEMM=1), ``no-amx`` (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16).

    python -m benchmarks.cpu_paths --dtype fp32 --paths default,fp32-brgemm --shapes 8192,1024,64 8192,4096,16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from . import machine

PATHS = {
    "default": {},
    "brgemm-off": {"ADAPTERFAST_CPU_BRGEMM": "0"},
    "fp32-brgemm": {"ADAPTERFAST_CPU_FP32_BRGEMM": "1"},
    "no-amx": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
}

_CHILD = r"""
import json, sys, torch
from torch.utils import benchmark
from adapterfast import cpu
n, d, r, dtype, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
torch.manual_seed(0)
x, g = torch.randn(n, d).to(dt), torch.randn(n, d).to(dt)
wd, wu = torch.randn(r, d) / d**0.5, torch.randn(d, r) / r**0.5
bd, bu = torch.zeros(r), torch.zeros(d)
_, h = cpu.forward(x, wd, bd, wu, bu, None, "relu", 1.0, 0.0, 0)
fwd = lambda: cpu.forward(x, wd, bd, wu, bu, None, "relu", 1.0, 0.0, 0)
bwd = lambda: cpu.backward(g, x, wd, bd, wu, bu, h, True, "relu", 1.0, 0.0, 0)
out = {"kernel": cpu.kernel_isa(dt)}
for name, f in (("fwd", fwd), ("bwd", bwd)):
    out[name + "_ms"] = benchmark.Timer("f()", globals={"f": f}).blocked_autorange(min_run_time=0.5).median * 1e3
print(json.dumps(out))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--paths", default="default,fp32-brgemm", help=f"comma list from {', '.join(PATHS)}")
    parser.add_argument("--shapes", nargs="+", default=["8192,1024,64", "8192,4096,16"], metavar="N,d,r")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    paths = args.paths.split(",")
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        parser.error(f"unknown paths {unknown}; choose from {', '.join(PATHS)}")
    print(f"{machine.cpu_name()}, flags {' '.join(machine.cpu_flags())}, {args.threads} threads, {args.dtype}")
    for shape in args.shapes:
        n, d, r = (int(v) for v in shape.split(","))
        for repeat in range(args.repeats):
            for path in paths:
                env = dict(os.environ, **PATHS[path])
                done = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(d), str(r), args.dtype, str(args.threads)],
                                      env=env, capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"N={n} d={d} r={r} {path:12s} {row['kernel']:14s} fwd {row['fwd_ms']:8.2f} ms  "
                      f"bwd {row['bwd_ms']:8.2f} ms  fwd+bwd {row['fwd_ms'] + row['bwd_ms']:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
