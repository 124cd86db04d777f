"""The GPU check's host-cost and device-time step: where a training step's time goes.

    python -m benchmarks.gpu_check_host host

A module step is bound either by the host (Python, dispatch and launches) or by the GPU (the
kernels); timing it end to end cannot say which. This step separates the two, per shape
(``HOST_SHAPES``), for the eager adapter and ``adapterfast.Adapter`` on the Triton backend:

- ``device_us``: the GPU's busy time per call, the sum of the CUDA kernels' durations in a
  ``torch.profiler`` trace of ``PROFILED_CALLS`` calls (forward under no_grad, and a training
  step ``module(x).backward(g)``): what the op costs once the host keeps up;
- ``host_us``: the host's time per call, measured in a loop that never synchronises: at the
  small shape the GPU finishes each call long before the host issues the next, so the loop runs
  at the host's pace (``wall_us`` reports the synchronised time per call beside it);
- for adapterfast, the layers of a call one by one: ``kernels.forward`` / ``kernels.backward``
  without autograd or the module, the pre-planned launches alone (Triton's own
  ``kernel[grid](...)`` binding), and the backward's partial-sum reduction alone;
- a ``cProfile`` of adapterfast's training step at the small shape: the 25 functions with the
  most own time go to ``logs/host_profile.txt`` and the top 10 into the records.

In a dry run (CPU, interpreter) the launches are real interpreter runs and the profiler has no
CUDA activity, so ``device_us`` is None: the dry run checks that the step runs, not its figures.
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time

import torch

from .gpu_check import DRY, OUT_DIR, device, guarded, record, run_step, sync

HOST_SHAPES = [(16, 48, 4), (48, 64, 8)] if DRY else [(8192, 768, 16), (16384, 4096, 64), (65536, 4096, 64)]
PROFILED_CALLS = 2 if DRY else 20
HOST_CALLS = 3 if DRY else 300


def _host_us(fn, calls: int = HOST_CALLS) -> tuple[float, float]:
    """``(host_us, wall_us)`` per call: an unsynchronised loop, then the same loop synchronised at its end."""
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    sync()
    wall = (time.perf_counter() - start) / calls * 1e6
    return host, wall


def _device_us(fn) -> float | None:
    """The CUDA kernels' summed duration per call over ``PROFILED_CALLS`` profiled calls (None on CPU)."""
    if DRY:
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            fn()
        sync()
    total = sum(e.device_time_total for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    return total / PROFILED_CALLS


def _modules(d: int, r: int, dtype: torch.dtype):
    import adapterfast
    from benchmarks.providers import EagerAdapter

    eager = EagerAdapter(d, r).to(device=device(), dtype=dtype)
    fused = adapterfast.Adapter(d, r).to(device=device(), dtype=dtype)
    fused.load_state_dict(eager.state_dict())
    return {"eager": eager, "adapterfast": fused}


def _calls(module, x, xg, g):
    def forward():
        with torch.no_grad():
            module(x)

    def step():
        module(xg).backward(g)

    return {"forward": forward, "step": step}


def _layers(module, x, g):
    """adapterfast's layers below the module: the kernels entry points, the launches, the reduction."""
    from adapterfast import kernels
    from adapterfast.kernels import backward_kernels, forward_kernel

    wd, wu = module.down.weight.detach(), module.up.weight.detach()
    _, h = kernels.forward(x, wd, wu, None, None, "relu", 1.0, 0.0, None, None)
    _, _, fwd = forward_kernel.plan(x, wd, wu, None, None, "relu", 1.0, 0.0, None, None)
    _, dh, parts, (dh_launch, dxdw_launch) = backward_kernels.plan(g, x, wd, wu, h, "relu", 1.0, 0.0, None, True)

    return {
        "kernels.forward": lambda: kernels.forward(x, wd, wu, None, None, "relu", 1.0, 0.0, None, None),
        "kernels.backward": lambda: kernels.backward(g, x, wd, wu, None, None, h, "relu", 1.0, 0.0, None, True),
        "launch forward": fwd,
        "launch backward_dh": dh_launch,
        "launch backward_dxdw": dxdw_launch,
        "reduce": lambda: backward_kernels.reduce(parts, dh, wd.dtype, wu.dtype),
    }


def _profile_step(step) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(HOST_CALLS):
        step()
    profiler.disable()
    sync()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
    stats.print_stats(25)
    with open(os.path.join(OUT_DIR, "logs", "host_profile.txt"), "w") as f:
        f.write(text.getvalue())
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:10]
    for (path, line, name), (_, calls, own, cumulative, _) in rows:
        record("host", name="profile", function=f"{os.path.basename(path)}:{line}({name})",
               own_us_per_step=own / HOST_CALLS * 1e6, cumulative_us_per_step=cumulative / HOST_CALLS * 1e6,
               calls_per_step=calls / HOST_CALLS)


def host() -> None:
    """Step ``host``: device time and host time per call, per shape and provider, then adapterfast's layers."""
    import adapterfast

    dtype = torch.float32 if DRY else torch.bfloat16
    for n, d, r in HOST_SHAPES:
        shape = f"{n}x{d} r{r}"
        x = torch.randn(n, d, device=device(), dtype=dtype)
        g = torch.randn(n, d, device=device(), dtype=dtype)
        xg = x.detach().requires_grad_()
        modules = _modules(d, r, dtype)
        with adapterfast.use_backend("triton"):
            for provider, module in modules.items():
                for call, fn in _calls(module, x, xg, g).items():
                    def one():
                        host_us, wall_us = _host_us(fn)
                        record("host", name=provider, call=call, shape=shape, device_us=_device_us(fn),
                               host_us=host_us, wall_us=wall_us)
                    guarded("host", f"{provider} {call} {shape}", one)
            if (n, d, r) == HOST_SHAPES[0]:
                for layer, fn in _layers(modules["adapterfast"], x, g).items():
                    def one_layer():
                        host_us, wall_us = _host_us(fn)
                        record("host", name="adapterfast layer", call=layer, shape=shape, host_us=host_us,
                               wall_us=wall_us)
                    guarded("host", f"{layer} {shape}", one_layer)
                step = _calls(modules["adapterfast"], x, xg, g)["step"]
                guarded("host", "profile", _profile_step, step)


def main(argv: list[str]) -> int:
    return run_step("benchmarks.gpu_check_host", {"host": host}, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
