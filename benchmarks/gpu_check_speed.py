"""The GPU check's speed steps: parallel warm-up, per-kernel timings, op-level providers, ncu target.

    python -m benchmarks.gpu_check_speed warm|kernels|ops|ncu_target

- ``warm``: every kernel variant the run needs, launched once at a small N (same d, r, dtypes,
  flags and divisibility, so the same JIT specialisation) in a pool of processes sharing
  Triton's disk cache: compilation runs in parallel up front instead of inside the timings.
- ``kernels``: forward, backward-dh, backward-dxdw and the partial-sum reduction, each timed alone
  (``triton.testing.do_bench``), at N=16384 d=4096 r=64 and N=8192 d=768 r=16; bf16 with
  dropout 0 and 0.1, fp32 ieee, tf32 and tf32x3, bf16 x with fp32 weights. Each is reported with its
  bytes model (``hbm_bytes`` next to each kernel) and the fraction of the copy-bandwidth floor
  (model bytes / measured copy bandwidth / time), and the whole step against the fused floor
  (2 passes forward, 3 backward).
- ``ops``: forward and forward+backward of the seed's eager adapter, a cuBLAS ``addmm`` adapter
  (residual folded into the GEMM), ``torch.compile`` default and max-autotune without CUDA graphs (skipped with a
  note when the time left is short), and ``adapterfast.Adapter``; plus the fused op replayed as a
  CUDA graph at the small shape against its eager call (the difference is host overhead); then
  the grouped op (issue 18: 32 adapters, N=8192, d=768, r=16) against the loop of
  ``fused_adapter`` calls over each adapter's rows and one adapter over all rows.
- ``ncu_target``: one forward and backward at the large shape, for ``ncu`` to count DRAM bytes.
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from .gpu_check import DRY, GROUPED_SHAPE, TIMING_SHAPES, bench_ms, device, guarded, read_records, record, run_step

SEED = 0x5EED_0123_4567
WARM_N = 64


def _variants():
    """``(name, N, d, r, x dtype, weight dtype, p, fp32 precision)`` of every kernel timing."""
    bf16 = torch.float32 if DRY else torch.bfloat16  # the interpreter's bf16 dot is wrong, but it runs
    (n1, d1, r1), (n2, d2, r2) = TIMING_SHAPES
    return [
        ("bf16 p=0", n1, d1, r1, bf16, bf16, 0.0, "ieee"),
        ("bf16 p=0.1", n1, d1, r1, bf16, bf16, 0.1, "ieee"),
        ("fp32 ieee", n1, d1, r1, torch.float32, torch.float32, 0.0, "ieee"),
        ("fp32 tf32", n1, d1, r1, torch.float32, torch.float32, 0.0, "tf32"),
        ("fp32 tf32x3", n1, d1, r1, torch.float32, torch.float32, 0.0, "tf32x3"),
        ("bf16 x fp32 w", n1, d1, r1, bf16, torch.float32, 0.0, "ieee"),
        ("bf16 p=0", n2, d2, r2, bf16, bf16, 0.0, "ieee"),
        ("bf16 p=0.1", n2, d2, r2, bf16, bf16, 0.1, "ieee"),
    ]


def _tensors(n, d, r, dtype, wdtype):
    dev = device()
    return dict(x=torch.randn(n, d, device=dev, dtype=dtype), g=torch.randn(n, d, device=dev, dtype=dtype),
                w_down=(torch.randn(r, d, device=dev) * d**-0.5).to(wdtype),
                w_up=(torch.randn(d, r, device=dev) * r**-0.5).to(wdtype))


def _set_precision(precision: str) -> None:
    """fp32 dots: "ieee", "tf32" (torch's flag) or "tf32x3" (``ADAPTERFAST_TF32X3=1`` with the flag off)."""
    from adapterfast.kernels.launch import TF32X3_ENV

    on = precision == "tf32"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = on
    if precision == "tf32x3":
        os.environ[TF32X3_ENV] = "1"
    else:
        os.environ.pop(TF32X3_ENV, None)


def _launches(t, p, activation="relu"):
    """The forward launch, then backward-dh and backward-dxdw, with the reduction as a callable."""
    from adapterfast.kernels import backward_kernels, forward_kernel

    seed = SEED if p > 0 else None
    _, h, fwd = forward_kernel.plan(t["x"], t["w_down"], t["w_up"], None, None, activation, 1.0, p, seed, None)
    fwd()
    _, dh, parts, (dh_kernel, dxdw) = backward_kernels.plan(t["g"], t["x"], t["w_down"], t["w_up"], h, activation,
                                                            1.0, p, seed, True)

    def reduce():
        return backward_kernels.reduce(parts, dh, t["w_down"].dtype, t["w_up"].dtype)

    return fwd, dh_kernel, dxdw, reduce


def _warm_one(variant) -> str:
    _, _, d, r, dtype, wdtype, p, precision = variant
    _set_precision(precision)
    t = _tensors(WARM_N, d, r, dtype, wdtype)
    for launch in _launches(t, p):
        launch()
    if not DRY:
        torch.cuda.synchronize()
    return f"{variant[0]} {d} r{r}"


def _warm_init() -> None:
    if DRY:
        os.environ["TRITON_INTERPRET"] = "1"


def warm() -> None:
    """Compiles every timed variant in parallel processes (Triton's disk cache is shared)."""
    started = time.monotonic()
    variants = _variants()
    workers = 2 if DRY else min(8, len(variants))
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_warm_init) as pool:
        for variant, future in [(v, pool.submit(_warm_one, v)) for v in variants]:
            guarded("warm", variant[0], lambda f=future: record("warm", name=f.result(),
                                                                seconds=round(time.monotonic() - started, 1)))
    record("warm", name="all", variants=len(variants), workers=workers, seconds=round(time.monotonic() - started, 1))


def _bandwidth() -> float | None:
    for row in read_records():
        if row.get("name") == "copy_bandwidth":
            return row["gb_per_s"] * 1e9
    return None


def kernels() -> None:
    from adapterfast.kernels import backward_kernels, forward_kernel

    bandwidth = _bandwidth()
    for name, n, d, r, dtype, wdtype, p, precision in _variants():
        def one():
            _set_precision(precision)
            t = _tensors(n, d, r, dtype, wdtype)
            fwd, dh_kernel, dxdw, reduce = _launches(t, p)
            elem = t["x"].element_size()
            model = {"forward": forward_kernel.hbm_bytes(n, d, r, elem), **backward_kernels.hbm_bytes(n, d, r, elem)}
            times = {"forward": bench_ms(fwd), "backward_dh": bench_ms(dh_kernel), "backward_dxdw": bench_ms(dxdw),
                     "reduce": bench_ms(reduce)}
            for kernel, ms in times.items():
                floor = model[kernel] / bandwidth * 1e3 if bandwidth else None
                record("kernels", name=name, shape=f"{n}x{d} r{r}", kernel=kernel, ms=ms, model_bytes=model[kernel],
                       of_floor=floor / ms if floor else None)
            backward_ms = times["backward_dh"] + times["backward_dxdw"] + times["reduce"]
            design = {"forward": 2 * n * d * elem, "backward": 3 * n * d * elem}
            record("kernels", name=name, shape=f"{n}x{d} r{r}", kernel="step", forward_ms=times["forward"],
                   backward_ms=backward_ms,
                   forward_of_design_floor=design["forward"] / bandwidth * 1e3 / times["forward"] if bandwidth else None,
                   backward_of_design_floor=design["backward"] / bandwidth * 1e3 / backward_ms if bandwidth else None)
        guarded("kernels", f"{name} {n}x{d}", one)
    _set_precision("ieee")


class _Addmm(torch.nn.Module):
    """The cuBLAS baseline of fused-LoRA libraries: ``addmm(x, relu(x Wd^T), Wu^T)``, residual in the GEMM."""

    def __init__(self, seed_module):
        super().__init__()
        self.down, self.up = seed_module.down, seed_module.up

    def forward(self, x):
        return torch.addmm(x, torch.relu(x @ self.down.weight.t()), self.up.weight.t())


def _providers(d, r, dtype, deadline):
    import adapterfast
    from benchmarks.providers import EagerAdapter

    seed = EagerAdapter(d, r).to(device=device(), dtype=dtype)
    fused = adapterfast.Adapter(d, r).to(device=device(), dtype=dtype)
    fused.load_state_dict(seed.state_dict())
    yield "eager", seed
    yield "addmm", _Addmm(seed)
    yield "adapterfast", fused
    backend = "eager" if DRY else "inductor"
    yield "compile", torch.compile(seed, backend=backend)
    if DRY or time.monotonic() < deadline - 100:
        # Without CUDA graphs, like every other provider here (the first GPU run's "max-autotune"
        # replayed graphs, whose outputs the next call overwrote under the timing loop).
        yield "compile_max_autotune", (torch.compile(seed, backend="eager") if DRY
                                       else torch.compile(seed, mode="max-autotune-no-cudagraphs"))
    else:
        record("ops", name="compile_max_autotune", skipped="less than 100 s left for its compile")


def ops() -> None:
    import adapterfast

    limit = float(os.environ.get("STEP_LIMIT", "300"))
    deadline = time.monotonic() + limit
    dtype = torch.float32 if DRY else torch.bfloat16
    for n, d, r in TIMING_SHAPES:
        x = torch.randn(n, d, device=device(), dtype=dtype)
        g = torch.randn(n, d, device=device(), dtype=dtype)
        times = {}
        for name, module in _providers(d, r, dtype, deadline):
            def one():
                xg = x.detach().requires_grad_()
                if DRY and name == "adapterfast":
                    ctx = adapterfast.use_backend("triton")
                else:
                    ctx = torch.enable_grad()
                with ctx:
                    with torch.no_grad():
                        forward_ms = bench_ms(lambda: module(x))
                    step_ms = bench_ms(lambda: module(xg).backward(g))
                times[name] = step_ms
                record("ops", name=name, shape=f"{n}x{d} r{r}", forward_ms=forward_ms, step_ms=step_ms,
                       step_vs_eager=times["eager"] / step_ms if "eager" in times else None)
            guarded("ops", f"{name} {n}x{d}", one)
    guarded("ops", "cuda_graph", cuda_graph)
    if DRY or time.monotonic() < deadline - 30:
        guarded("ops", "grouped", grouped)
    else:
        record("ops", name="grouped", skipped="less than 30 s left")


def grouped() -> None:
    """The grouped op (issue 18) at its benchmark's shape: 32 adapters, rows assigned at random,
    forward and forward+backward, against the loop of ``fused_adapter`` calls over each adapter's
    rows (what users write without it) and one adapter over all rows (the floor)."""
    import adapterfast

    n, d, r = GROUPED_SHAPE
    adapters = 32
    dtype = torch.float32 if DRY else torch.bfloat16
    g = torch.Generator(device=device()).manual_seed(0)
    x = torch.randn(n, d, generator=g, device=device()).to(dtype)
    grad = torch.randn(n, d, generator=g, device=device()).to(dtype)
    wd = (torch.randn(adapters, r, d, generator=g, device=device()) * d**-0.5).to(dtype).requires_grad_()
    wu = (torch.randn(adapters, d, r, generator=g, device=device()) * r**-0.5).to(dtype).requires_grad_()
    index = torch.randint(0, adapters, (n,), generator=g, device=device())

    def grouped_call(xx):
        return adapterfast.grouped_adapter(xx, index, wd, wu)

    def loop_call(xx):
        y = xx.clone()
        for a in range(adapters):
            rows = torch.nonzero(index == a).flatten()
            y = y.index_copy(0, rows, adapterfast.fused_adapter(xx[rows], wd[a], wu[a]))
        return y

    def single_call(xx):
        return adapterfast.fused_adapter(xx, wd[0], wu[0])

    times = {}
    with adapterfast.use_backend("triton"):
        for name, call in (("grouped", grouped_call), ("loop", loop_call), ("single", single_call)):
            xg = x.detach().requires_grad_()
            with torch.no_grad():
                forward_ms = bench_ms(lambda: call(x))
            times[name] = step_ms = bench_ms(lambda: call(xg).backward(grad))
            record("ops", name=f"grouped_{name}", shape=f"{n}x{d} r{r}", adapters=adapters, forward_ms=forward_ms,
                   step_ms=step_ms)
    record("ops", name="grouped", shape=f"{n}x{d} r{r}", adapters=adapters,
           loop_over_grouped=times["loop"] / times["grouped"], grouped_over_single=times["grouped"] / times["single"])


def cuda_graph() -> None:
    """The fused forward (no grad) at the small shape: eager call vs CUDA-graph replay = host overhead."""
    import adapterfast

    n, d, r = TIMING_SHAPES[-1]
    dtype = torch.float32 if DRY else torch.bfloat16
    module = adapterfast.Adapter(d, r).to(device=device(), dtype=dtype)
    x = torch.randn(n, d, device=device(), dtype=dtype)
    ctx = adapterfast.use_backend("triton")
    with ctx, torch.no_grad():
        eager_ms = bench_ms(lambda: module(x))
        if DRY:
            record("ops", name="cuda_graph", skipped="dry run: no CUDA graphs", eager_ms=eager_ms)
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                module(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            module(x)
        replay_ms = bench_ms(graph.replay)
    record("ops", name="cuda_graph", shape=f"{n}x{d} r{r}", eager_ms=eager_ms, replay_ms=replay_ms,
           host_overhead_us=(eager_ms - replay_ms) * 1e3)


def ncu_target() -> None:
    n, d, r = TIMING_SHAPES[0]
    dtype = torch.float32 if DRY else torch.bfloat16
    t = _tensors(n, d, r, dtype, dtype)
    for launch in _launches(t, 0.1):
        launch()
    if not DRY:
        torch.cuda.synchronize()


def main(argv: list[str]) -> int:
    steps = {"warm": warm, "kernels": kernels, "ops": ops, "ncu_target": ncu_target}
    return run_step("benchmarks.gpu_check_speed", steps, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
