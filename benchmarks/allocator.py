"""What the C library's allocator does with freed memory during a benchmark, and the page faults a call takes.

glibc hands large freed blocks back to the kernel: a block above its mmap threshold is unmapped
when freed, and the top of the heap is trimmed once more than the trim threshold is free there.
The next allocation of that size then takes a page fault for every 4 KiB page, each zeroed by the
kernel. glibc moves both thresholds as the process allocates and frees, so whether a given call
pays this depends on what the process did before it. In one process on the 2-CPU AMD EPYC VM (an
ad-hoc loop), the eager adapter's bf16 training step at N = 8192, d = 128, one thread, took
2.2-3.6 ms after calls at some smaller N and 8.3-9.6 ms after others: 2016 minor page faults per
step in the slow state, none in the fast.

adapterfast's C++ backend keeps its large outputs in a cache of released buffers
(``csrc/output_buffers.cpp``), so it does not take these faults; a comparison in which only the
eager side takes them measures the allocator rather than the adapters. The benchmarks therefore
default to ``--allocator keep``: ``keep_freed_memory`` tells glibc to serve every allocation from
its heap and never to trim it, so after the warm-up calls no provider takes page faults, and each
is timed at its best. ``--allocator system`` leaves glibc's defaults, what a PyTorch process gets
unless it sets these itself or preloads another allocator; ``faults_per_call`` shows who pays what.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import resource
from typing import Callable

CHOICES = ("keep", "system")

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def add_option(parser: argparse.ArgumentParser) -> None:
    """``--allocator keep|system`` (default keep), the same option on every benchmark script."""
    parser.add_argument("--allocator", choices=CHOICES, default="keep",
                        help="keep (default): glibc keeps freed memory mapped, so no provider takes page faults "
                             "after its warm-up; system: glibc's defaults (see benchmarks/allocator.py)")


def keep_freed_memory() -> bool:
    """Freed memory stays mapped for the rest of the process: no allocation is served by its own
    mmap (``M_MMAP_MAX`` 0) and the heap's free top is never trimmed (``M_TRIM_THRESHOLD`` at
    its maximum). Irreversible within the process. False where the C library has no glibc
    ``mallopt`` (then nothing changed)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))


def configure(choice: str) -> str:
    """Applies ``--allocator`` and returns what was in force: ``keep``, ``system``, or
    ``system (keep unavailable)`` where ``keep`` was asked for and the C library cannot do it."""
    if choice not in CHOICES:
        raise ValueError(f"allocator must be one of {CHOICES}, got {choice!r}")
    if choice == "keep":
        return "keep" if keep_freed_memory() else "system (keep unavailable)"
    return "system"


def minor_faults() -> int:
    """Minor page faults of this process so far (all its threads)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def faults_per_call(fn: Callable[[], object], calls: int = 10) -> float:
    """Mean minor page faults per call of ``fn`` over ``calls`` calls after one untimed call."""
    fn()
    start = minor_faults()
    for _ in range(calls):
        fn()
    return (minor_faults() - start) / calls
