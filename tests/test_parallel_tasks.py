"""The CPU drivers' scheduler (csrc/parallel_tasks.h): every task runs exactly once, a slow thread's
tasks move to the others (work stealing), ADAPTERFAST_CPU_STEAL=0 keeps at::parallel_for's equal
shares, and the ops' results are bitwise the same with and without stealing.

adapterfast_cpu::parallel_tasks_trace runs the scheduler on empty tasks and reports which thread
(share) ran each; the thread of share 0 sleeps slow_us per task, standing in for a core that other
load slows down.
"""
import os
import subprocess
import sys

import pytest
import torch

from adapterfast import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU backend not built: {cpu.unavailable_reason()}")


def trace(tasks, slow_us=0):
    import adapterfast._C  # noqa: F401  (registers the op)

    return torch.ops.adapterfast_cpu.parallel_tasks_trace(tasks, slow_us)


@pytest.fixture
def threads():
    previous = torch.get_num_threads()

    def set_threads(n):
        torch.set_num_threads(n)

    yield set_threads
    torch.set_num_threads(previous)


@pytest.mark.parametrize("n_threads", [1, 2, 4, 12])
@pytest.mark.parametrize("tasks", [0, 1, 2, 3, 7, 64, 1000])
def test_every_task_runs_once(threads, n_threads, tasks):
    threads(n_threads)
    out = trace(tasks, slow_us=50 if tasks <= 64 else 0)
    assert out.shape == (tasks, 2)
    assert torch.equal(out[:, 1], torch.ones(tasks, dtype=torch.long))
    assert ((out[:, 0] >= 0) & (out[:, 0] < max(1, min(tasks, n_threads)))).all()


def test_slow_threads_tasks_are_stolen(threads):
    threads(2)
    out = trace(64, slow_us=2000)
    owners = out[:, 0]
    # Without stealing share 0 is tasks 0-31; its thread sleeps 2 ms per task while the other
    # thread's tasks take microseconds, so the other thread ends up with nearly all of them (all
    # of them if it gets there before share 0's thread starts).
    assert (owners == 0).sum().item() < 16, owners.tolist()
    assert (owners[32:] == 1).all(), owners.tolist()


def test_no_steal_keeps_equal_shares():
    code = (
        "import torch, adapterfast._C\n"
        "torch.set_num_threads(2)\n"
        "print(torch.ops.adapterfast_cpu.parallel_tasks_trace(64, 2000)[:, 0].tolist())\n"
    )
    env = dict(os.environ, ADAPTERFAST_CPU_STEAL="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    owners = eval(done.stdout.strip().splitlines()[-1])
    assert owners == [0] * 32 + [1] * 32


_OPS = r"""
import sys, torch
from adapterfast import cpu
torch.manual_seed(0)
torch.set_num_threads(2)
n, d, r = 3000, 200, 24
out = {}
for dtype in (torch.float32, torch.bfloat16):
    x, g = torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype)
    wd, wu = torch.randn(r, d) / d**0.5, torch.randn(d, r) / r**0.5
    bd, bu = torch.randn(r) * 0.1, torch.randn(d) * 0.1
    y, h = cpu.forward(x, wd, wu, bd, bu, "gelu", 0.9, 0.2, 7, None)
    grads = cpu.backward(g, x, wd, wu, bd, bu, h, "gelu", 0.9, 0.2, 7, True)
    out[str(dtype)] = [y, h, *grads]
    index = torch.randint(0, 5, (n,))
    wds, wus = torch.randn(5, r, d) / d**0.5, torch.randn(5, d, r) / r**0.5
    bds, bus, scales = torch.randn(5, r) * 0.1, torch.randn(5, d) * 0.1, torch.rand(5) + 0.5
    ops = torch.ops.adapterfast_cpu
    y, h = ops.grouped_forward(x, index, wds, wus, bds, bus, "relu", scales, 0.1, 3, None)
    grads = ops.grouped_backward(g, x, index, wds, wus, bds, bus, h, "relu", scales, 0.1, 3, True)
    out["grouped " + str(dtype)] = [y, h, *grads]
torch.save(out, sys.argv[1])
"""


def test_results_identical_with_and_without_stealing(tmp_path):
    results = {}
    for steal in ("1", "0"):
        path = tmp_path / f"steal{steal}.pt"
        env = dict(os.environ, ADAPTERFAST_CPU_STEAL=steal)
        done = subprocess.run([sys.executable, "-c", _OPS, str(path)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[steal] = torch.load(path)
    assert results["1"].keys() == results["0"].keys() and len(results["1"]) == 4
    for key, tensors in results["1"].items():
        for a, b in zip(tensors, results["0"][key], strict=True):
            assert torch.equal(a, b), key
