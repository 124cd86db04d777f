"""How time is measured: per-run samples, pooled over interleaved rounds, summarised by median/IQR.

CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (with the run's thread count; the Timer's
default is one thread). CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run).

A backward alone is timed with a fresh forward before every sample, outside the timed region, and
the caches flushed in between (in training the backward runs long after the forward, so its
inputs are not in cache). It is not timed by re-running ``backward(retain_graph=True)`` on one
graph: with torch 2.13 a compiled (inductor) backward run a second time on a retained graph
returns wrong gradients, so it would not be the same computation.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.utils.benchmark as tbench

from .machine import cpu_count


def summarize(times_s: list[float]) -> dict:
    """Median, quartiles and IQR in milliseconds of per-run times given in seconds."""
    if not times_s:
        return {"median_ms": None, "q25_ms": None, "q75_ms": None, "iqr_ms": None, "min_ms": None, "samples": 0}
    ordered = sorted(times_s)

    def quantile(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    q25, q50, q75 = (quantile(q) * 1e3 for q in (0.25, 0.5, 0.75))
    return {"median_ms": q50, "q25_ms": q25, "q75_ms": q75, "iqr_ms": q75 - q25, "min_ms": ordered[0] * 1e3,
            "samples": len(ordered)}


def _l3_bytes() -> int:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        return int(text.rstrip("KMG")) * scale
    except (OSError, ValueError):
        return 32 << 20


class CpuTimer:
    """Per-run CPU times with ``torch.utils.benchmark`` at a fixed thread count."""

    def __init__(self, threads: int):
        self.threads = threads
        self._flush = None

    def times(self, fn: Callable[[], object], min_run_time: float, min_samples: int = 5) -> list[float]:
        """``blocked_autorange`` samples, topped up to ``min_samples`` blocks when a call is slow
        (on a loaded machine one stall can otherwise leave a single sample for the round)."""
        timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=self.threads)
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
        times = list(measurement.times)
        started = time.perf_counter()
        while len(times) < min_samples and time.perf_counter() - started < 4 * min_run_time + 1:
            times.extend(timer.timeit(measurement.number_per_run).times)
        return times

    def flush(self) -> None:
        """Evicts the last-level cache by writing a buffer twice its size."""
        if self._flush is None:
            size = min(max(2 * _l3_bytes(), 32 << 20), 256 << 20)
            self._flush = torch.empty(size // 4, dtype=torch.float32)
        self._flush.fill_(1.0)

    def times_after(self, prepare: Callable[[], object], fn: Callable[[object], object], min_run_time: float,
                    max_samples: int = 200) -> list[float]:
        """Times ``fn(prepare())`` excluding ``prepare`` (and a cache flush) from each sample."""
        samples, spent, started = [], 0.0, time.perf_counter()
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            while len(samples) < max_samples:
                state = prepare()
                self.flush()
                t0 = time.perf_counter()
                out = fn(state)
                t1 = time.perf_counter()
                del out, state
                samples.append(t1 - t0)
                spent += t1 - t0
                overdue = time.perf_counter() - started > 8 * min_run_time + 2
                if len(samples) >= 3 and (spent >= min_run_time or overdue):
                    break
        finally:
            torch.set_num_threads(previous)
        return samples

    def copy_bandwidth(self, nbytes: int = 256 << 20, min_run_time: float = 1.0) -> float:
        """Bytes/s of ``dst.copy_(src)`` into a preallocated tensor (read + write counted)."""
        src = torch.ones(nbytes // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        started = time.perf_counter()
        while time.perf_counter() - started < 0.3:  # warm-up: page in both, start the thread pool
            dst.copy_(src)
        torch.set_num_threads(previous)
        times = self.times(lambda: dst.copy_(src), min_run_time)
        return 2 * nbytes / (summarize(times)["median_ms"] / 1e3)

    def sync(self) -> None:
        pass


class CudaTimer:
    """Per-run CUDA times from ``triton.testing.do_bench`` (CUDA events, L2 flushed per run)."""

    def __init__(self):
        import triton.testing

        self._do_bench = triton.testing.do_bench
        self._cache = None

    def times(self, fn: Callable[[], object], min_run_time: float, min_samples: int = 5) -> list[float]:
        rep_ms = max(int(min_run_time * 1e3), 20)
        warmup_ms = max(rep_ms // 4, 10)
        try:
            ms = self._do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        except (AssertionError, TypeError, ValueError):  # a Triton whose do_bench has no "all":
            # its 5%, 10%, ..., 95% quantiles stand in for the samples
            ms = self._do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[i / 20 for i in range(1, 20)])
        if isinstance(ms, (int, float)):
            ms = [ms]
        return [t / 1e3 for t in ms]

    def flush(self) -> None:
        """Evicts L2 the way ``do_bench`` does (writing a buffer larger than L2)."""
        try:
            from triton import runtime

            if self._cache is None:
                self._cache = runtime.driver.active.get_empty_cache_for_benchmark()
            runtime.driver.active.clear_cache(self._cache)
        except (ImportError, AttributeError, RuntimeError):  # no Triton, or a driver without the cache API
            if self._cache is None or not isinstance(self._cache, torch.Tensor):
                self._cache = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
            self._cache.zero_()

    def times_after(self, prepare: Callable[[], object], fn: Callable[[object], object], min_run_time: float,
                    max_samples: int = 500) -> list[float]:
        """Times ``fn(prepare())`` with CUDA events around ``fn`` only, L2 flushed before each sample."""
        fn(prepare())  # warm-up
        torch.cuda.synchronize()
        events, started = [], time.perf_counter()
        while len(events) < max_samples:
            state = prepare()
            self.flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(state)
            end.record()
            del out, state
            events.append((start, end))
            if len(events) >= 10 and time.perf_counter() - started >= min_run_time:
                break
        torch.cuda.synchronize()
        return [s.elapsed_time(e) / 1e3 for s, e in events]

    def copy_bandwidth(self, nbytes: int = 1 << 30, min_run_time: float = 0.5) -> float:
        """Bytes/s of a device-to-device ``dst.copy_(src)`` into a preallocated tensor (read + write)."""
        src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        times = self.times(lambda: dst.copy_(src), min_run_time)
        del src, dst
        return 2 * nbytes / (summarize(times)["median_ms"] / 1e3)

    def sync(self) -> None:
        torch.cuda.synchronize()


def make_timer(device: str, threads: int | None):
    if device == "cuda":
        return CudaTimer()
    return CpuTimer(threads or cpu_count())
