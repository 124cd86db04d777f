"""Soak: many forward+backward steps of ``Adapter(1024, 64)`` on ``[2048, 1024]``, eager and compiled,
with resident memory (RSS) flat from step 100 to the end.

The default run is short (``ADAPTERFAST_SOAK_STEPS``, default 300 steps, ~1 min on 2 cores); the
full soak is ``ADAPTERFAST_SOAK_STEPS=5000``. RSS is read from ``/proc/self/statm``; "flat" allows
64 MiB of growth (allocator noise: glibc arenas, the compiled graph's first caches), far below
what a per-step leak of one [2048, 1024] fp32 tensor (8 MiB) over the run would add.
``python tests/test_soak.py [steps]`` prints RSS at step 100 and at the end for both modes.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from adapterfast import Adapter

STEPS = int(os.environ.get("ADAPTERFAST_SOAK_STEPS", "300"))
BASELINE_STEP = 100
ALLOWED_GROWTH = 64 * 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak(compiled: bool, steps: int) -> tuple[int, int]:
    """Trains ``Adapter(1024, 64)`` with SGD for ``steps`` steps; returns RSS at step 100 and at the end."""
    torch.manual_seed(0)
    module = Adapter(1024, 64, bias=True, activation="gelu")
    run = torch.compile(module, fullgraph=True) if compiled else module
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-4)
    x = torch.randn(2048, 1024, requires_grad=True)
    at_baseline = None
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        loss = run(x).square().mean()
        loss.backward()
        optimizer.step()
        if step == BASELINE_STEP:
            at_baseline = rss_bytes()
    assert torch.isfinite(loss)
    return at_baseline, rss_bytes()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_resident_memory_is_flat(compiled):
    assert STEPS > BASELINE_STEP
    start, end = soak(compiled, STEPS)
    assert end - start <= ALLOWED_GROWTH, f"RSS grew {(end - start) / 2**20:.1f} MiB from step {BASELINE_STEP} to {STEPS}"


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else STEPS
    for compiled in (False, True):
        start, end = soak(compiled, steps)
        print(f"{'compiled' if compiled else 'eager'}: RSS {start / 2**20:.1f} MiB at step {BASELINE_STEP}, "
              f"{end / 2**20:.1f} MiB at step {steps} ({(end - start) / 2**20:+.1f} MiB)", flush=True)
