"""Peak memory of one call, in bytes above what was allocated when it started.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

CPU has no allocator statistics, and peak RSS is not an honest measure of one call (glibc keeps
freed memory mapped, and RSS counts everything else in the process). Instead the call runs once
under ``torch.profiler`` with ``profile_memory=True``, which records every allocation and free
made through PyTorch's CPU allocator (every tensor, including those made inside C++ extensions
and inductor-generated code), and the running sum of those events gives the peak. Memory taken
outside PyTorch's allocator (``malloc``/``std::vector`` scratch inside a kernel, oneDNN's own
scratchpads) is not seen, so the CPU figure is the tensor memory of the call.

Both report ``peak`` (the high-water mark above the start) and ``retained`` (what is still
allocated when the call returns, e.g. the output and the tensors saved for backward).
"""
from __future__ import annotations

from typing import Callable

import torch

METHOD = {
    "cpu": "torch.profiler CPU allocator events (tensor memory)",
    "cuda": "torch.cuda.max_memory_allocated",
}


def _allocation_events(prof) -> list[tuple[int, int]]:
    from torch._C._profiler import _EventType

    found = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            found.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    return sorted(found)


def cpu_peak(fn: Callable[[], object]) -> dict:
    """Runs ``fn`` once under the profiler; returns peak/retained bytes and keeps nothing alive."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        del out
        events = _allocation_events(prof)
    except (AttributeError, KeyError, TypeError, RuntimeError) as error:  # a torch whose profiler internals differ
        return {"peak_bytes": None, "retained_bytes": None, "mem_error": f"{type(error).__name__}: {error}"}
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return {"peak_bytes": peak, "retained_bytes": current}


def cuda_peak(fn: Callable[[], object]) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    result = {"peak_bytes": torch.cuda.max_memory_allocated() - base,
              "retained_bytes": torch.cuda.memory_allocated() - base}
    del out
    return result


def peak(device: str, fn: Callable[[], object]) -> dict:
    return cuda_peak(fn) if device == "cuda" else cpu_peak(fn)
