"""Host overhead of the Triton launch path per call: everything ``kernels.forward``/``backward`` do but the kernels.

    TRITON_INTERPRET=1 python -m benchmarks.gpu_check_overhead [--calls 2000]

Runs ``adapterfast.kernels.forward`` and ``backward`` on small CPU tensors under the interpreter
with the kernel launches replaced by a no-op (``Launch.__call__`` and the backward's reduction
still run their Python), so the time per call is the Python around the kernels: argument
checks, configuration choice, allocation of outputs, the argument tuples and the ``Launch``
records. On a GPU the launches add Triton's own ``kernel[grid](...)`` binding on top (measured by
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
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per round (5 rounds, median)")
    args = parser.parse_args()
    for name, value in measure(args.calls).items():
        print(f"{name:20s} {value:8.2f}")


if __name__ == "__main__":
    main()
