"""``python -m benchmarks.overhead``: adapterfast against the plain eager adapter, small calls to large.

Per-call cost decides small calls (a layer call sees batch x sequence rows: one to a few thousand),
so this measures ``adapterfast.Adapter`` against the seed's eager adapter (``nn.Linear`` down,
activation, ``nn.Linear`` up, plus the residual; ``providers.EagerAdapter``) holding the same
weights, for N in {1, 8, 64, 320, 1024, 2048, 4096, 8192, 32768}, d in {128, 384, 768}, r = 16,
fp32 (``--dtype bf16`` / ``fp16`` / ``fp64``: both modules and the inputs in that dtype), on 1 and 2
threads:

- ``train``: ``torch.autograd.grad(adapter(x), [x, *params], g)`` (forward + backward of a layer,
  as ``benchmarks.run`` times it). Grids before 2026-12-03 timed ``adapter(x).backward(g)``, which
  also added each step's dx into the leaf's ``x.grad`` (an [N, d] read-add-write on both sides
  that a layer inside a model does not do; 12% of the fused step at N = 1024, d = 768);
- ``infer``: ``adapter(x)`` under ``torch.no_grad()``.

The two providers alternate within each round and rounds repeat (``--rounds``), so load on a
shared machine hits both alike; the table gives the median time of each and the ratio
eager / adapterfast (above 1: adapterfast is faster). ``--clock thread --threads 1`` times each
call by the calling thread's CPU time instead of wall time, for a machine busy with other jobs.
``--device cuda`` measures CUDA tensors the same way (``--backend triton`` with
``TRITON_INTERPRET=1`` times the Triton launch path's host cost on CPU tensors, with the
interpreter's run time in it).

``--allocator keep`` (the default) keeps freed memory mapped for the rest of the process, so
neither module takes page faults after its warm-up (``benchmarks/allocator.py``: under glibc's
defaults the eager adapter took 2016 page faults per step in some cells and none in others, which
moved its time by up to 3x); ``--allocator system`` leaves glibc's defaults. Each row records the
page faults per call of both modules, and the summary names the cells that had any.

``--rates`` adds each cell's GEMM rate, the pass's matrix products (``train``: six of N x d x r,
12 N d r FLOP; ``infer``: two) over its median time, next to what ``torch.matmul`` of two
[2048, 2048] operands in the dtype reaches with the same threads and clock (measured before and
after each thread count's cells; the table holds the higher): how close each provider's step comes
to this machine's tuned GEMM.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from . import allocator, machine, providers
from .timing import make_timer, summarize

NS = (1, 8, 64, 320, 1024, 2048, 4096, 8192, 32768)
DS = (128, 384, 768)
QUICK_NS = (1, 8, 320, 2048, 8192)
QUICK_DS = (128, 768)
PASSES = ("train", "infer")
FLOP_PER_NDR = {"train": 12, "infer": 4}
MATMUL_SIZE = 2048
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help=f"N in {QUICK_NS}, d in {QUICK_DS}, shorter measurements (about a minute on 2 CPUs)")
    parser.add_argument("--n", type=int, nargs="+", help=f"row counts (default {NS})")
    parser.add_argument("--d", type=int, nargs="+", help=f"feature sizes (default {DS})")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="dtype of both modules and of x and g (default fp32)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts (default 1 2)")
    parser.add_argument("--backend", default="auto", help="adapterfast backend (default auto)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 2)")
    parser.add_argument("--min-run-time", type=float,
                        help="seconds per provider per round and cell (default 0.2, quick 0.05)")
    parser.add_argument("--out", help="append one JSON line per cell to this file")
    allocator.add_option(parser)
    parser.add_argument("--rates", action="store_true",
                        help="add each cell's GEMM rate (GFLOP/s) and torch.matmul's at 2048^3 in the same run")
    parser.add_argument("--results", help="print the tables of a file written by --out instead of measuring")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="wall (default): wall time per call; thread: CPU time of the calling thread per "
                             "call, with --threads 1 only (on a machine shared with other jobs, wall times "
                             "mostly measure waiting for a core)")
    args = parser.parse_args(argv)
    if args.clock == "thread" and (args.device != "cpu" or any(t != 1 for t in args.threads)):
        parser.error("--clock thread measures the calling thread only: use it with --device cpu --threads 1")
    args.n = args.n or (QUICK_NS if args.quick else NS)
    args.d = args.d or (QUICK_DS if args.quick else DS)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.min_run_time = args.min_run_time or (0.05 if args.quick else 0.2)
    if args.device == "cuda":
        args.threads = [machine.cpu_count()]
    return args


class ThreadClockTimer:
    """Per-call CPU time of the calling thread (``time.thread_time``), for one-thread runs: time the
    thread spends descheduled is not counted, cache and memory contention still is."""

    def times(self, fn, min_run_time: float, min_samples: int = 5) -> list[float]:
        times: list[float] = []
        while len(times) < min_samples or sum(times) < min_run_time:
            start = time.thread_time()
            fn()
            times.append(time.thread_time() - start)
        return times


def _pair(d: int, r: int, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    eager = providers.EagerAdapter(d, r).to(device)
    import adapterfast

    fused = adapterfast.Adapter(d, r).to(device)
    fused.load_state_dict(eager.state_dict())
    return {"eager": eager.to(dtype), "adapterfast": fused.to(dtype)}


def _call(module, x, g, kind: str):
    if kind == "train":
        inputs = [x, *(p for p in module.parameters() if p.requires_grad)]
        return lambda: torch.autograd.grad(module(x), inputs, g)

    def infer():
        with torch.no_grad():
            return module(x)

    return infer


def matmul_rate(timer, device: str, dtype: torch.dtype, min_run_time: float) -> float:
    """GFLOP/s of ``torch.matmul`` on two [2048, 2048] operands in ``dtype``, median of the timer's
    samples: the rate this machine's tuned GEMM library reaches with the same threads and clock."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device).to(dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device).to(dtype)
    torch.matmul(a, b)
    seconds = summarize(timer.times(lambda: torch.matmul(a, b), min_run_time))["median_ms"] / 1e3
    return 2 * MATMUL_SIZE**3 / seconds / 1e9


def measure(args) -> list[dict]:
    import adapterfast

    rows = []
    with adapterfast.use_backend(args.backend):
        for threads in args.threads:
            timer = ThreadClockTimer() if args.clock == "thread" else make_timer(args.device, threads)
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                first = len(rows)
                ceiling_time = max(1.0, 2 * args.min_run_time)
                before = matmul_rate(timer, args.device, DTYPES[args.dtype], ceiling_time) if args.rates else None
                for d in args.d:
                    modules = _pair(d, args.r, args.device, DTYPES[args.dtype])
                    for n in args.n:
                        x = torch.randn(n, d, device=args.device).to(DTYPES[args.dtype]).requires_grad_()
                        g = torch.randn(n, d, device=args.device).to(DTYPES[args.dtype])
                        for kind in PASSES:
                            calls = {name: _call(m, x, g, kind) for name, m in modules.items()}
                            for fn in calls.values():  # warm-up (allocator, thread pool, first-call caches)
                                fn()
                            samples = {name: [] for name in calls}
                            for round_ in range(args.rounds):
                                order = list(calls) if round_ % 2 == 0 else list(reversed(calls))
                                for name in order:
                                    samples[name] += timer.times(calls[name], args.min_run_time)
                            eager_ms = summarize(samples["eager"])["median_ms"]
                            fused_ms = summarize(samples["adapterfast"])["median_ms"]
                            faults = {name: allocator.faults_per_call(fn, calls=3) for name, fn in calls.items()}
                            rows.append({"N": n, "d": d, "r": args.r, "dtype": args.dtype, "threads": threads,
                                         "pass": kind,
                                         "eager_ms": eager_ms, "adapterfast_ms": fused_ms,
                                         "ratio": eager_ms / fused_ms,
                                         "eager_faults": faults["eager"], "adapterfast_faults": faults["adapterfast"],
                                         "allocator": args.allocator_in_force,
                                         "backend": adapterfast.dispatch.select(x, args.r)})
                if args.rates:
                    after = matmul_rate(timer, args.device, DTYPES[args.dtype], ceiling_time)
                    for row in rows[first:]:
                        row.update(matmul_gflops=max(before, after), matmul_gflops_before=before,
                                   matmul_gflops_after=after)
            finally:
                torch.set_num_threads(previous)
    return rows


def _time(ms: float) -> str:
    return f"{ms * 1e3:.0f} us" if ms < 1 else f"{ms:.2f} ms"


def table(rows: list[dict]) -> str:
    """Markdown: one line per (threads, d, N), train and infer side by side."""
    lines = ["| threads | d | N | train: eager | train: adapterfast | train ratio | infer: eager "
             "| infer: adapterfast | infer ratio |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    cells = {(r["threads"], r["d"], r["N"], r["pass"]): r for r in rows}
    for threads, d, n in sorted({(r["threads"], r["d"], r["N"]) for r in rows}):
        parts = [str(threads), str(d), str(n)]
        for kind in PASSES:
            row = cells.get((threads, d, n, kind))
            parts += ([_time(row["eager_ms"]), _time(row["adapterfast_ms"]), f"{row['ratio']:.2f}x"]
                      if row else ["", "", ""])
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines)


def ratio_table(rows: list[dict]) -> str:
    """Markdown: eager / adapterfast per N (rows) and pass, d and threads (columns)."""
    columns = sorted({(r["pass"], r["threads"], r["d"]) for r in rows}, key=lambda c: (PASSES.index(c[0]), c[1], c[2]))
    cells = {(r["pass"], r["threads"], r["d"], r["N"]): r["ratio"] for r in rows}
    head = "| N | " + " | ".join(f"{p} {t}T d={d}" for p, t, d in columns) + " |"
    lines = [head, "|---:|" + "---:|" * len(columns)]
    for n in sorted({r["N"] for r in rows}):
        values = [cells.get((p, t, d, n)) for p, t, d in columns]
        lines.append(f"| {n} | " + " | ".join("" if v is None else f"{v:.2f}x" for v in values) + " |")
    return "\n".join(lines)


def rates_table(rows: list[dict]) -> str:
    """Markdown: each provider's GEMM rate per cell (the pass's matrix-product FLOP over its
    median time) and torch.matmul's at 2048^3 with the same threads (the higher of its two
    measurements)."""
    lines = ["| threads | pass | d | N | GFLOP | eager GFLOP/s | adapterfast GFLOP/s | matmul 2048^3 GFLOP/s "
             "| adapterfast / matmul |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: (r["threads"], PASSES.index(r["pass"]), r["d"], r["N"])):
        gflop = FLOP_PER_NDR[row["pass"]] * row["N"] * row["d"] * row["r"] / 1e9
        fused = gflop / (row["adapterfast_ms"] / 1e3)
        lines.append(f"| {row['threads']} | {row['pass']} | {row['d']} | {row['N']} | {gflop:.3g} "
                     f"| {gflop / (row['eager_ms'] / 1e3):.1f} | {fused:.1f} | {row['matmul_gflops']:.1f} "
                     f"| {fused / row['matmul_gflops']:.0%} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    below = [r for r in rows if r["ratio"] < 1.0]
    worst = min(rows, key=lambda r: r["ratio"])
    text = (f"{len(rows) - len(below)} of {len(rows)} cells at >= 1.0x; lowest {worst['ratio']:.2f}x "
            f"({worst['pass']}, N={worst['N']}, d={worst['d']}, {worst['threads']} thread(s))")
    for name in ("eager", "adapterfast"):
        key = f"{name}_faults"
        faulting = [r for r in rows if r.get(key, 0) >= 1]
        if faulting:
            most = max(faulting, key=lambda r: r[key])
            text += (f"\n{name}: page faults in {len(faulting)} cells, at most {most[key]:.0f} per call "
                     f"({most['pass']}, N={most['N']}, d={most['d']}, {most['threads']} thread(s))")
    return text


def _print_rates(rows: list[dict]) -> None:
    rated = [r for r in rows if "matmul_gflops" in r]
    if rated:
        print()
        print(rates_table(rated))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.results:
        with open(args.results) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        print(f"# {rows[0]['device']}, torch {rows[0]['torch']}, r={rows[0]['r']}, {rows[0].get('dtype', 'fp32')}"
              if rows else "# no rows")
        print(ratio_table(rows))
        print()
        print(table(rows))
        print(summary(rows))
        _print_rates(rows)
        return 0
    import adapterfast

    args.allocator_in_force = allocator.configure(args.allocator)
    info = machine.device_name(args.device)
    print(f"# adapterfast {adapterfast.__version__} vs the eager seed adapter, {args.dtype}, r={args.r}, {info}, "
          f"backend {args.backend}, {args.rounds} interleaved rounds x {args.min_run_time}s, {args.clock} clock, "
          f"allocator {args.allocator_in_force}",
          flush=True)
    rows = measure(args)
    print(ratio_table(rows))
    print()
    print(table(rows))
    print(summary(rows))
    _print_rates(rows)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps({**row, "device": info, "torch": torch.__version__}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
