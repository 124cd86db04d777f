"""Host overhead of the Triton launch path per call: everything ``kernels.forward``/``backward`` do but the kernels.

    TRITON_INTERPRET=1 python -m benchmarks.gpu_check_overhead [--calls 2000]

Runs ``adapterfast.kernels.forward`` and ``backward`` on small CPU tensors under the interpreter
with the kernel launches replaced by a no-op (``Launch.__call__`` and the backward's reduction
still run their Python), so the time per call is the Python around the kernels: argument
checks, configuration choice, allocation of outputs, the argument tuples and the ``Launch``
records. Then the grouped op the same way, called as users call it (``grouped_adapter``,
inference and a training step). On a GPU the launches add Triton's own ``kernel[grid](...)`` binding on top (measured by
the GPU check's CUDA-graph step). Prints microseconds per call, median of 5 rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


def measure(calls: int = 2000) -> dict:
    from adapterfast import kernels
    from adapterfast.kernels import launch

    n, d, r = 8, 64, 8
    x = torch.randn(n, d)
    wd, wu = torch.randn(r, d), torch.randn(d, r)
    bd, bu = torch.randn(r), torch.randn(d)
    g = torch.randn(n, d)
    h = torch.randn(n, r)
    original = launch.Launch.__call__
    launch.Launch.__call__ = lambda self: None
    try:
        results = {
            "forward_us": per_call_us(lambda: kernels.forward(x, wd, wu, bd, bu, "relu", 1.0, 0.0, None, None), calls),
            "forward_dropout_us": per_call_us(
                lambda: kernels.forward(x, wd, wu, bd, bu, "relu", 1.0, 0.1, 1234, None), calls),
            "backward_us": per_call_us(
                lambda: kernels.backward(g, x, wd, wu, bd, bu, h, "relu", 1.0, 0.0, None, True), calls),
        }
    finally:
        launch.Launch.__call__ = original
    results.update(measure_grouped(calls))
    return results


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def measure_grouped(calls: int = 2000) -> dict:
    """The grouped op as users call it (``grouped_adapter`` on the Triton backend, 4 adapters):
    validation, the eager autograd path, the row schedule and output allocation, kernels no-ops."""
    import adapterfast
    from adapterfast.kernels import grouped

    n, d, r, adapters = 8, 64, 8, 4
    x = torch.randn(n, d, requires_grad=True)
    wd = torch.randn(adapters, r, d, requires_grad=True)
    wu = torch.randn(adapters, d, r, requires_grad=True)
    index = torch.arange(n) % adapters
    g = torch.randn(n, d)
    names = ("grouped_forward_kernel", "grouped_backward_dx_kernel", "grouped_backward_dw_kernel")
    originals = {name: getattr(grouped, name) for name in names}

    def infer():
        with torch.no_grad():
            adapterfast.grouped_adapter(x, index, wd, wu)

    try:
        for name in names:
            setattr(grouped, name, _NoLaunch())
        with adapterfast.use_backend("triton"):
            return {
                "grouped_forward_us": per_call_us(infer, calls),
                "grouped_step_us": per_call_us(lambda: adapterfast.grouped_adapter(x, index, wd, wu).backward(g),
                                               calls),
            }
    finally:
        for name, kernel in originals.items():
            setattr(grouped, name, kernel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (5 rounds, median)")
    args = parser.parse_args()
    for name, value in measure(args.calls).items():
        print(f"{name:20s} {value:8.2f}")


if __name__ == "__main__":
    main()
