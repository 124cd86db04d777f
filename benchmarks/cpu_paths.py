"""The CPU backend's GEMM paths against each other, for the per-dtype choice in csrc/brgemm.cpp.

The path is fixed per process (adapterfast.cpu reads its switches once), so each path runs in its
own subprocess, alternating path by path for ``--repeats`` rounds; each prints forward and
backward times at the given shape. Paths: ``default`` (what runs for the dtype here),
``brgemm-off`` (ADAPTERFAST_CPU_BRGEMM=0), ``fp32-brgemm`` (ADAPTERFAST_CPU_FP32_BRGEMM=1),
``no-amx`` (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16), ``fp16-native`` / ``fp16-bf16x3`` /
``fp16-bf16x3-fwd`` (ADAPTERFAST_CPU_FP16: float16 on oneDNN's float16 kernel, or split into three
bf16 products in both passes, or in the forward only at every N and r),
``brgemm-pad`` / ``brgemm-no-pad`` (ADAPTERFAST_CPU_BRGEMM_PAD=1 / 0: the d-wide VNNI B operands'
rows padded by 16 columns always / never; by default only where d % 512 == 0 without AMX),
``no-steal`` (ADAPTERFAST_CPU_STEAL=0: each thread keeps its equal share of row blocks or reduction
groups, where by default a thread that runs out takes the back half of another's remaining
share; csrc/parallel_tasks.h), ``eager`` (the op as PyTorch ops in the same dtype,
``x + up(relu(down(x)))`` with both biases, as the fused paths here are called; the eager
provider of ``python -m benchmarks`` is the bias-free module). Each row also gives the op's GEMM
rate, its 12 N d r flops (two GEMMs forward, four backward) over the fwd+bwd time.

``--ceiling`` first prints what oneDNN's own matmul (``torch.matmul``) reaches in the dtype on this
machine with the same threads and clock, at 2048^3 and at the op's GEMM shapes: the rate the
op's GEMMs can be held against (on the development VM AMX-BF16 gives a few hundred GFLOP/s per
core there, not the nominal 1024 flops per cycle).

``--background-load F`` runs, for the whole measurement, one more process that is busy for the
fraction F of every 10 ms and sleeps the rest: a core shared with another job, as on a shared VM,
where a thread that waits for the slowest share loses most. After the rows, each path's median
fwd+bwd time over the repeats, and the first path's time over it.

``--clock wall`` (default) reports medians of wall time (torch.utils.benchmark). ``--clock
thread`` reports the least thread CPU time of ``--calls`` calls and needs ``--threads 1`` (the
op then runs on the calling thread): on a machine shared with other jobs, where wall times of
multi-threaded calls are dominated by waiting for a core, it still measures the work done.

    python -m benchmarks.cpu_paths --dtype fp32 --paths default,fp32-brgemm --shapes 8192,1024,64 8192,4096,16
    python -m benchmarks.cpu_paths --dtype bf16 --paths eager,default --threads 1 --clock thread
    python -m benchmarks.cpu_paths --dtype bf16 --paths no-steal,default --repeats 8 --background-load 0.3
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys

from . import machine

PATHS = {
    "default": {},
    "brgemm-off": {"ADAPTERFAST_CPU_BRGEMM": "0"},
    "fp32-brgemm": {"ADAPTERFAST_CPU_FP32_BRGEMM": "1"},
    "no-amx": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "fp16-native": {"ADAPTERFAST_CPU_FP16": "native"},
    "fp16-bf16x3": {"ADAPTERFAST_CPU_FP16": "bf16x3"},
    "fp16-bf16x3-fwd": {"ADAPTERFAST_CPU_FP16": "bf16x3-fwd"},
    "brgemm-pad": {"ADAPTERFAST_CPU_BRGEMM_PAD": "1"},
    "brgemm-no-pad": {"ADAPTERFAST_CPU_BRGEMM_PAD": "0"},
    "no-steal": {"ADAPTERFAST_CPU_STEAL": "0"},
    "eager": {},
}

_CHILD = r"""
import json, sys, time, torch
from torch.utils import benchmark
from adapterfast import cpu
n, d, r, dtype, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
path, clock, calls, weights_in_x_dtype = sys.argv[6], sys.argv[7], int(sys.argv[8]), sys.argv[9] == "x"
torch.set_num_threads(threads)
dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
torch.manual_seed(0)
x, g = torch.randn(n, d).to(dt), torch.randn(n, d).to(dt)
wd, wu = torch.randn(r, d) / d**0.5, torch.randn(d, r) / r**0.5
bd, bu = torch.zeros(r), torch.zeros(d)
if weights_in_x_dtype:
    wd, wu, bd, bu = (t.to(dt) for t in (wd, wu, bd, bu))
_, h = cpu.forward(x, wd, wu, bd, bu, "relu", 1.0, 0.0, 0, None)
if path == "eager":
    F = torch.nn.functional
    leaves = [t.to(dt).requires_grad_() for t in (x, wd, bd, wu, bu)]
    fwd = lambda: leaves[0] + F.linear(torch.relu(F.linear(leaves[0], leaves[1], leaves[2])), leaves[3], leaves[4])
    y_eager = fwd()
    bwd = lambda: torch.autograd.grad(y_eager, leaves, g, retain_graph=True)
    out = {"kernel": "eager"}
else:
    fwd = lambda: cpu.forward(x, wd, wu, bd, bu, "relu", 1.0, 0.0, 0, None)
    bwd = lambda: cpu.backward(g, x, wd, wu, bd, bu, h, "relu", 1.0, 0.0, 0, True)
    out = {"kernel": cpu.kernel_isa(dt)}
def least_thread_time(f):
    f()
    times = []
    for _ in range(calls):
        start = time.thread_time()
        f()
        times.append(time.thread_time() - start)
    return min(times)
threads_seen = set()
def counted(f):
    def call():
        threads_seen.add(torch.get_num_threads())
        return f()
    return call
for name, f in (("fwd", counted(fwd)), ("bwd", counted(bwd))):
    if clock == "thread":
        out[name + "_ms"] = least_thread_time(f) * 1e3
    else:
        timer = benchmark.Timer("f()", globals={"f": f}, num_threads=threads)
        out[name + "_ms"] = timer.blocked_autorange(min_run_time=0.5).median * 1e3
out["threads"] = sorted(threads_seen)
print(json.dumps(out))
"""


_CEILING = r"""
import sys, time, torch
from torch.utils import benchmark
dtype, threads, clock, calls = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
shapes = [tuple(int(v) for v in s.split(",")) for s in sys.argv[5:]]
torch.set_num_threads(threads)
dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
def seconds(f):
    if clock == "wall":
        timer = benchmark.Timer("f()", globals={"f": f}, num_threads=threads)
        return timer.blocked_autorange(min_run_time=0.5).median
    f()
    best = float("inf")
    for _ in range(calls):
        start = time.thread_time()
        f()
        best = min(best, time.thread_time() - start)
    return best
gemms = [(2048, 2048, 2048)]
for n, d, r in shapes:
    gemms += [(n, r, d), (n, d, r), (r, d, n)]
for m, nn, k in dict.fromkeys(gemms):
    a, b = torch.randn(m, k).to(dt), torch.randn(k, nn).to(dt)
    t = seconds(lambda: torch.matmul(a, b))
    print(f"torch.matmul {dtype} [{m}, {k}] x [{k}, {nn}]: {2 * m * nn * k / t / 1e9:7.1f} GFLOP/s", flush=True)
"""


_BUSY = r"""
import sys, time
busy = float(sys.argv[1]) * 0.01
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < busy:
        pass
    time.sleep(0.01 - busy)
"""


@contextlib.contextmanager
def background_load(fraction: float):
    """One process busy for `fraction` of every 10 ms while the block runs (none for 0)."""
    if fraction <= 0:
        yield
        return
    busy = subprocess.Popen([sys.executable, "-c", _BUSY, str(fraction)])
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


def summary(times: dict[str, list[float]]) -> list[str]:
    """Per path the median fwd+bwd ms of its repeats, and the first path's median over it."""
    medians = {path: statistics.median(ms) for path, ms in times.items()}
    first = next(iter(medians.values()))
    return [f"  {path:12s} median fwd+bwd {ms:8.2f} ms  first path / this {first / ms:5.2f}x"
            for path, ms in medians.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--paths", default="default,fp32-brgemm", help=f"comma list from {', '.join(PATHS)}")
    parser.add_argument("--shapes", nargs="+", default=["8192,1024,64", "8192,4096,16"], metavar="N,d,r")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--clock", default="wall", choices=("wall", "thread"),
                        help="wall: median wall time; thread: least thread CPU time (needs --threads 1)")
    parser.add_argument("--calls", type=int, default=5, help="calls per measurement with --clock thread")
    parser.add_argument("--ceiling", action="store_true", help="first print torch.matmul's rate in the dtype")
    parser.add_argument("--weights", default="fp32", choices=("fp32", "x"),
                        help="the fused paths' weights and biases in fp32 (default) or in x's dtype, as in a model "
                             "converted whole (.half()); eager always runs in x's dtype")
    parser.add_argument("--background-load", type=float, default=0.0, metavar="F",
                        help="run one more process busy for the fraction F (0-1) of every 10 ms meanwhile")
    args = parser.parse_args(argv)
    if not 0.0 <= args.background_load < 1.0:
        parser.error(f"--background-load must be in [0, 1), got {args.background_load}")
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures the calling thread only: use it with --threads 1")
    paths = args.paths.split(",")
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        parser.error(f"unknown paths {unknown}; choose from {', '.join(PATHS)}")
    print(f"{machine.cpu_name()}, flags {' '.join(machine.cpu_flags())}, {args.threads} threads, {args.dtype}, "
          f"{'least thread CPU time of %d calls' % args.calls if args.clock == 'thread' else 'median wall time'}"
          f", weights {'in x dtype' if args.weights == 'x' else 'fp32'}"
          + (f", background load {args.background_load:g} of one CPU" if args.background_load else ""))
    if args.ceiling:
        done = subprocess.run([sys.executable, "-c", _CEILING, args.dtype, str(args.threads), args.clock, str(args.calls),
                               *args.shapes], capture_output=True, text=True, check=True)
        print(done.stdout, end="")
    with background_load(args.background_load):
        for shape in args.shapes:
            n, d, r = (int(v) for v in shape.split(","))
            times: dict[str, list[float]] = {path: [] for path in paths}
            for repeat in range(args.repeats):
                for path in paths:
                    env = dict(os.environ, **PATHS[path])
                    done = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(d), str(r), args.dtype,
                                           str(args.threads), path, args.clock, str(args.calls), args.weights],
                                          env=env, capture_output=True, text=True, check=True)
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    if row["threads"] != [args.threads]:
                        raise RuntimeError(f"{path} ran its timed calls on {row['threads']} threads, "
                                           f"not {args.threads}")
                    total = row["fwd_ms"] + row["bwd_ms"]
                    times[path].append(total)
                    print(f"N={n} d={d} r={r} {path:12s} {row['kernel']:14s} fwd {row['fwd_ms']:8.2f} ms  "
                          f"bwd {row['bwd_ms']:8.2f} ms  fwd+bwd {total:8.2f} ms  "
                          f"GEMMs {12 * n * d * r / total / 1e6:6.1f} GFLOP/s", flush=True)
            print(f"N={n} d={d} r={r}, {args.repeats} repeats:")
            print("\n".join(summary(times)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
