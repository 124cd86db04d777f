"""``python -m benchmarks.profile_call``: where one small forward + backward spends its time.

Runs ``--steps`` forward + backward calls of the eager seed adapter and of ``adapterfast.Adapter``
(same weights, default ``[8, 64]``, r = 8, fp32, 1 thread) under cProfile and prints, per call,
the time spent in Python code (functions defined in ``.py`` files: module ``__call__``, autograd
wrappers, validation, dispatch) and in native code (kernels, the autograd engine, tensor
methods), then the top functions of each. cProfile slows Python code down more than native code,
so compare the two providers with each other, not with untimed runs.

Then, without the profiler, the wall time per call of each, and of adapterfast's step through the
Python ``autograd.FusedAdapter`` instead of the backend's native differentiable op (the C++
backend's ``adapterfast_cpu::fused``): interleaved batches, the fastest batch of each kept (the
least disturbed by other load), to show what moving the autograd node into C++ saves.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch

from .providers import EagerAdapter


def profile(module, x, g, steps: int) -> tuple[float, float, str]:
    """(Python seconds per call, native seconds per call, top-15 listing)."""
    for _ in range(50):
        module(x).backward(g)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        module(x).backward(g)
    profiler.disable()
    stats = pstats.Stats(profiler)
    python = native = 0.0
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():
        if filename.endswith(".py") and "benchmarks/profile_call.py" not in filename:
            python += tottime
        else:
            native += tottime
    listing = io.StringIO()
    pstats.Stats(profiler, stream=listing).sort_stats("tottime").print_stats(15)
    return python / steps, native / steps, listing.getvalue()


class PythonAutogradAdapter(torch.nn.Module):
    """``adapterfast.Adapter``'s forward through ``autograd.FusedAdapter`` on the same backend."""

    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, x):
        from adapterfast import autograd, dispatch

        a = self.adapter
        kernels = dispatch.kernels(dispatch.select(x, a.down.weight.shape[0]))
        y, _ = autograd.apply_fast(x, a.down.weight, a.up.weight, a.down.bias, a.up.bias, a.activation, a.scale, 0.0,
                                   0, None, kernels)
        return y


def fastest_batches(modules: dict, x, g, batches: int = 300, per_batch: int = 10) -> dict:
    """Seconds per forward + backward of each module: the fastest of ``batches`` interleaved batches."""
    best = dict.fromkeys(modules, float("inf"))
    for module in modules.values():
        for _ in range(50):
            module(x).backward(g)
    for _ in range(batches):
        for name, module in modules.items():
            start = time.perf_counter()
            for _ in range(per_batch):
                module(x).backward(g)
            best[name] = min(best[name], (time.perf_counter() - start) / per_batch)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_call", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--listing", action="store_true", help="also print the top functions of each")
    args = parser.parse_args(argv)
    import adapterfast

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    eager = EagerAdapter(args.d, args.r)
    fused = adapterfast.Adapter(args.d, args.r)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(args.n, args.d, requires_grad=True)
    g = torch.randn(args.n, args.d)
    print(f"forward + backward of [{args.n}, {args.d}], r={args.r}, fp32, {args.threads} thread(s), "
          f"{args.steps} calls under cProfile (per call):")
    for name, module in (("eager seed adapter", eager), ("adapterfast", fused)):
        python, native, listing = profile(module, x, g, args.steps)
        print(f"  {name:20s} python {python * 1e6:7.1f} us   native {native * 1e6:7.1f} us")
        if args.listing:
            print(listing)
    timed = fastest_batches({"eager seed adapter": eager, "adapterfast": fused,
                             "adapterfast, Python autograd.Function": PythonAutogradAdapter(fused)}, x, g)
    print("wall time per call, fastest of 300 interleaved batches of 10 (no profiler):")
    for name, seconds in timed.items():
        print(f"  {name:38s} {seconds * 1e6:7.1f} us   eager / this {timed['eager seed adapter'] / seconds:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
