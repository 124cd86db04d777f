"""``python -m benchmarks.grouped``: many adapters in one batch, on CPU (issue 18).

A mixed batch of N rows, each randomly assigned one of A adapters (d, r fixed), run by:

- ``grouped``: ``AdapterBank`` (the grouped op, one call);
- ``grouped_presorted``: the same on the same rows already sorted by adapter (forward only): what
  the op's row gather/scatter costs over rows that arrive in contiguous runs;
- ``loop``: what users write today: group the rows, one ``fused_adapter`` call per adapter on
  its subset, results scattered back;
- ``single``: one ``fused_adapter`` over all N rows (the floor the grouped op is held to);
- ``peft_lora``: PEFT's mixed-batch LoRA (``model(x, adapter_names=[...])``) at the same r on an
  ``nn.Linear(d, d)``, which includes the base layer's matmul; ``base_linear`` times that layer
  alone, so ``peft_lora - base_linear`` is the LoRA share;
- ``stack``: what adapterfast's own PEFT mixed-batch path (``integrations/peft_mixed.py``) adds
  per adapter site and call before its grouped op: stacking the A adapters' separate
  ``nn.Linear`` weights into ``[A, r, d]`` and ``[A, d, r]`` (forward only).

Forward in inference (``no_grad``, eval) for all providers, and forward+backward (x requiring
grad, adapter weights trainable) for grouped, loop and single. Providers are timed in
interleaved rounds within one process and compared by ratio; medians of
``torch.utils.benchmark`` samples (``--clock wall``) or of per-call CPU time (``--clock cpu``, see
``sample``). Results are printed as a table and appended to
``benchmarks/results/grouped.jsonl`` with the machine, versions and CPU flags. Freed memory stays
mapped (``--allocator keep``, the default since 2026-12-03; ``allocator.py``), so no provider
takes page faults once warm; earlier rows ran under glibc's defaults.

    python -m benchmarks.grouped --threads 1 --clock cpu       # the README figures
    python -m benchmarks.grouped [--adapters 2 8 32] [--rows 8192] [--d 768] [--r 16] [--rounds 3] [--threads T]
                                [--clock wall|cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import adapterfast
from adapterfast import AdapterBank, fused_adapter

from . import allocator
from .machine import cpu_flags, cpu_name
from .timing import CpuTimer

RESULTS = Path(__file__).parent / "results" / "grouped.jsonl"


def loop_forward(bank: AdapterBank, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One fused_adapter call per adapter on its rows, as a user would write it without the grouped op."""
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=bank.num_adapters).tolist()
    y = torch.empty_like(x)
    for a, rows in enumerate(torch.split(order, counts)):
        if len(rows) == 0:
            continue
        y[rows] = fused_adapter(x[rows], bank.down_weight[a], bank.up_weight[a], activation=bank.activation,
                                scale=float(bank.scales[a]))
    return y


class _Linear(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return self.lin(x)


def peft_lora(adapters: int, d: int, r: int, dtype):
    """A PEFT LoRA model with ``adapters`` adapters at rank r on one nn.Linear(d, d), or None without PEFT."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    config = LoraConfig(r=r, lora_alpha=r, target_modules=["lin"])
    model = get_peft_model(_Linear(d), config, adapter_name="a0")
    for a in range(1, adapters):
        model.add_adapter(f"a{a}", config)
    for module in model.modules():
        if hasattr(module, "lora_B"):
            for linear in module.lora_B.values():
                nn.init.normal_(linear.weight, std=0.02)
    return model.to(dtype).eval()


def measure(adapters: int, n: int, d: int, r: int, dtype, rounds: int, timer: CpuTimer, min_run_time: float):
    torch.manual_seed(0)
    bank = AdapterBank(adapters, d, r, dtype=dtype)
    x = torch.randn(n, d, dtype=dtype)
    index = torch.randint(0, adapters, (n,))
    w_down, w_up = bank.down_weight[0].detach(), bank.up_weight[0].detach()
    downs = [bank.down_weight[a].detach().clone() for a in range(adapters)]
    ups = [bank.up_weight[a].detach().clone() for a in range(adapters)]
    lora = peft_lora(adapters, d, r, dtype)
    names = [f"a{a}" for a in index.tolist()]
    x3 = x.view(n, 1, d)

    with torch.no_grad():
        got, want = bank(x, index), loop_forward(bank, x, index)
        # fp32 agrees to rounding; 16-bit outputs to a few units in their last place (float16's
        # is 2e-3 at magnitude 2-4, where the grouped and the single op may round apart).
        tolerance = {torch.bfloat16: 2e-2, torch.float16: 1e-2}.get(dtype, 1e-4)
        assert (got.float() - want.float()).abs().max() <= tolerance

    xg = x.clone().requires_grad_()
    grad = torch.randn_like(x)

    def train(fn):
        def step():
            xg.grad = None
            bank.zero_grad(set_to_none=True)
            fn().backward(grad)
        return step

    order = torch.argsort(index, stable=True)
    x_sorted, index_sorted = x[order].contiguous(), index[order].contiguous()
    fwd = {
        "grouped": lambda: bank(x, index),
        "grouped_presorted": lambda: bank(x_sorted, index_sorted),
        "loop": lambda: loop_forward(bank, x, index),
        "single": lambda: fused_adapter(x, w_down, w_up),
        "stack": lambda: (torch.stack(downs), torch.stack(ups)),
    }
    if lora is not None:
        fwd["peft_lora"] = lambda: lora(x3, adapter_names=names)
        fwd["base_linear"] = lambda: lora.base_model.model.lin.base_layer(x3)
    step = {
        "grouped": train(lambda: bank(xg, index)),
        "loop": train(lambda: loop_forward(bank, xg, index)),
        "single": train(lambda: fused_adapter(xg, bank.down_weight[0], bank.up_weight[0])),
    }
    samples = {("forward", k): [] for k in fwd} | {("fwd+bwd", k): [] for k in step}
    for _ in range(rounds):
        with torch.no_grad():
            for name, fn in fwd.items():
                fn()
                samples[("forward", name)] += sample(fn, timer, min_run_time)
        for name, fn in step.items():
            fn()
            samples[("fwd+bwd", name)] += sample(fn, timer, min_run_time)
    return {key: statistics.median(v) * 1e3 for key, v in samples.items()}


def sample(fn, timer, min_run_time: float) -> list[float]:
    """Seconds per call: wall-clock samples from ``torch.utils.benchmark`` (``timer``), or with
    ``timer=None`` the CPU time of this thread, averaged over calls adding up to ``min_run_time``.

    CPU time is the measure on a shared machine with one thread (``--threads 1``): every op then
    runs on the calling thread, and time spent descheduled while other processes run is not
    counted (cache and memory-bandwidth contention still are)."""
    if timer is not None:
        return timer.times(fn, min_run_time, min_samples=3)
    calls, spent = 0, 0.0
    while spent < min_run_time or calls == 0:
        start = time.thread_time()
        fn()
        spent += time.thread_time() - start
        calls += 1
    return [spent / calls]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads (default: torch's); 1 avoids OpenMP barrier stalls on a shared machine")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: torch.utils.benchmark; cpu: this thread's CPU time (needs --threads 1)")
    allocator.add_option(parser)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    threads = args.threads
    if args.clock == "cpu" and threads != 1:
        parser.error("--clock cpu measures one thread: use it with --threads 1")
    torch.set_num_threads(threads)
    timer = CpuTimer(threads) if args.clock == "wall" else None
    machine = {"cpu": cpu_name(), "flags": " ".join(cpu_flags()), "threads": threads, "clock": args.clock,
               "allocator": allocator.configure(args.allocator), "torch": torch.__version__,
               "adapterfast": adapterfast.__version__, "isa": adapterfast.cpu.kernel_isa()
               if adapterfast.backends()["cpu"].available else "none"}
    print(f"# {machine}")
    print(f"# N={args.rows} d={args.d} r={args.r}; median ms; ratios: loop/grouped and grouped/single")
    print(f"{'dtype':9} {'A':>3} {'pass':8} {'grouped':>8} {'presort':>8} {'loop':>8} {'single':>8} {'peft_lora':>9} "
          f"{'base_lin':>8} {'stack':>6} {'loop/grp':>8} {'grp/single':>10}")
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for adapters in args.adapters:
            ms = measure(adapters, args.rows, args.d, args.r, dtype, args.rounds, timer, args.min_run_time)
            for kind in ("forward", "fwd+bwd"):
                get = lambda name: ms.get((kind, name))  # noqa: E731
                row = {"dtype": dtype_name, "adapters": adapters, "pass": kind, "rows": args.rows, "d": args.d,
                       "r": args.r, **{name: get(name) for name in ("grouped", "grouped_presorted", "loop", "single",
                                                                    "peft_lora", "base_linear", "stack")}}
                row["loop_over_grouped"] = row["loop"] / row["grouped"]
                row["grouped_over_single"] = row["grouped"] / row["single"]
                rows.append(row)
                fmt = lambda v, w: f"{v:{w}.2f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
                print(f"{dtype_name:9} {adapters:>3} {kind:8} {fmt(row['grouped'], 8)} "
                      f"{fmt(row['grouped_presorted'], 8)} {fmt(row['loop'], 8)} "
                      f"{fmt(row['single'], 8)} {fmt(row['peft_lora'], 9)} {fmt(row['base_linear'], 8)} "
                      f"{fmt(row['stack'], 6)} {row['loop_over_grouped']:8.2f}x {row['grouped_over_single']:9.2f}x", flush=True)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            for row in rows:
                f.write(json.dumps({**machine, **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
