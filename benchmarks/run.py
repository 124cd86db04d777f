"""``python -m benchmarks``: the adapter op, provider against provider, shape by shape.

For each shape every provider (see ``providers.py``) gets the same weights, input ``x`` (which
requires grad, as inside a model) and output gradient ``g``, and is measured in three passes:

- ``fwd``: ``y = adapter(x)`` with autograd recording (a training forward);
- ``bwd``: ``torch.autograd.grad(y, [x, *params], g)`` on a fresh graph (see ``timing.py``);
- ``full``: both, one training step of the layer.

Providers are interleaved: each pass runs ``--rounds`` rounds, and each round measures every
provider in turn (order rotated between rounds), so a burst of load on a shared machine hits all
of them; samples are pooled and summarised as median and IQR. Each result row also gives the
peak memory (``memory.py``), the ratio to eager and to torch.compile, and the fraction of the
bandwidth floor achieved: the bytes the pass must move over ``[N, d]`` tensors (fwd reads x and
writes y: 2*N*d elements; bwd reads g and x and writes dx: 3*N*d; full: 5*N*d) divided by the
copy bandwidth measured at the start of the same run. ``--allocator keep`` (the default) keeps
freed memory mapped, so no provider takes page faults after its warm-up (``allocator.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

from . import allocator, cli, machine, memory, providers, results, shapes
from .timing import make_timer, summarize

PASSES = ("fwd", "bwd", "full")
FLOOR_ELEMENTS = {"fwd": 2, "bwd": 3, "full": 5}  # [N, d] tensors that must cross DRAM/HBM
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(
        "python -m benchmarks",
        "The adapter op, provider against provider (eager, torch.compile, AdapterHub, adapterfast), "
        "shape by shape: forward, backward and full step; time, peak memory, ratios, bandwidth floor.",
        quick="a subset of shapes and shorter measurements",
        rounds="interleaved rounds per pass (default 2 quick, 3 full)",
        min_run_time="seconds of timed runs per provider per round (default CPU 0.25 quick / 1.0; CUDA 0.1 / 0.3)")
    parser.add_argument("--shapes", nargs="+", metavar="N,d,r[,act]",
                        help="shapes to measure instead of the preset, e.g. --shapes 8192,768,16 8192,4096,64,gelu")
    parser.add_argument("--dtype", help="comma list of fp32, bf16, fp16 (default: the preset's; fp32 on CPU and "
                                        "bf16 on CUDA with --shapes)")
    parser.add_argument("--activation", help="comma list of relu, gelu (default: the preset's; relu with --shapes)")
    parser.add_argument("--providers", help=f"comma list from {', '.join(providers.ORDER)} (default: all that apply; "
                                            "compile_max_autotune only on CUDA without --quick)")
    parser.add_argument("--passes", default=",".join(PASSES), help="comma list of fwd, bwd, full")
    parser.add_argument("--out", default=None,
                        help="directory whose ops.jsonl the rows are appended to; --out benchmarks/results updates "
                             "the tracked results the README quotes (default: a new file "
                             "benchmarks/runs/ops-<run id>.jsonl, ignored by git)")
    parser.add_argument("--time-budget", type=float,
                        help="stop starting new shapes after this many seconds (rows so far are kept)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--verbose", action="store_true",
                        help="keep what PyTorch's C++ side writes to stderr (the profiler's USDT lines, allocator "
                             "warnings); hidden by default")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.min_run_time is None:
        args.min_run_time = {("cpu", True): 0.25, ("cpu", False): 1.0,
                             ("cuda", True): 0.1, ("cuda", False): 0.3}[(args.device, args.quick)]
    if args.providers:
        args.providers = cli.names(parser, args.providers, providers.ORDER)
    else:
        args.providers = [p for p in providers.ORDER
                          if p != "compile_max_autotune" or (args.device == "cuda" and not args.quick)]
    args.passes = [p for p in args.passes.replace(" ", "").split(",") if p]
    if not args.passes or any(p not in PASSES for p in args.passes):
        parser.error(f"--passes takes a comma list from {', '.join(PASSES)}")
    try:
        args.points = shapes.select(args.device, args.quick, args.shapes, args.dtype, args.activation)
    except ValueError as error:
        parser.error(str(error))
    return args


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return ((got.float() - want).norm() / want.norm().clamp_min(1e-30)).item()


def _weight_grads(provider: providers.Provider, grads, d: int, r: int):
    """(dW_down, dW_up) among ``grads[1:]`` (aligned with ``provider.params``), found by shape."""
    shaped = list(zip(provider.params, grads[1:]))
    down = next((g for p, g in shaped if tuple(p.shape) == (r, d)), None)
    up = next((g for p, g in reversed(shaped) if tuple(p.shape) == (d, r)), None)
    return down, up


class _Calls:
    """The three passes of one provider as closures over the shared inputs."""

    def __init__(self, provider: providers.Provider, x: torch.Tensor, g: torch.Tensor):
        self.module, self.inputs, self.g, self.x = provider.module, [x] + provider.params, g, x
        # CUDA graphs (max-autotune) need to be told where an iteration starts; a no-op elsewhere.
        self.begin = torch.compiler.cudagraph_mark_step_begin if provider.name == "compile_max_autotune" else None

    def fwd(self):
        if self.begin is not None:
            self.begin()
        return self.module(self.x)

    def bwd(self, y):
        return torch.autograd.grad(y, self.inputs, self.g)

    def full(self):
        return torch.autograd.grad(self.fwd(), self.inputs, self.g)


def measure_point(point: shapes.Point, args, timer, device: str, bar=None) -> dict:
    """Times and memory of every provider at one shape: ``{provider: {"passes": {...}, ...}}``."""
    torch._dynamo.reset()  # each shape compiles afresh; no recompile limits carried between shapes
    dtype = point.torch_dtype
    built = providers.build(args.providers, point.d, point.r, point.activation, dtype, device, args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn(point.N, point.d, device=device, dtype=dtype, generator=generator).requires_grad_()
    g = torch.randn(point.N, point.d, device=device, dtype=dtype, generator=generator)

    found, live, reference = {}, [], None
    for provider in built:
        entry = found.setdefault(provider.name, {"provider": provider, "passes": {}})
        if provider.skip:
            entry["skipped"] = provider.skip
            continue
        calls = _Calls(provider, x, g)
        try:
            if bar is not None:
                bar.set_postfix_str(f"{provider.name} warm-up")
            started = time.perf_counter()
            y = calls.fwd()
            grads = calls.bwd(y)
            timer.sync()
            entry["first_call_s"] = time.perf_counter() - started
            # copies: a CUDA-graph replay may overwrite the outputs of the previous call
            outputs = tuple(None if t is None else t.detach().clone()
                            for t in (y, grads[0], *_weight_grads(provider, grads, point.d, point.r)))
            calls.bwd(calls.fwd())  # second warm-up (compiled backward, allocator caches)
            timer.sync()
            if reference is None and provider.name == "eager":
                reference = outputs
            elif reference is not None:
                errors = [_rel_err(a, b) for a, b in zip(outputs, reference) if a is not None and b is not None]
                entry["max_rel_err_vs_eager"] = max(errors) if errors else None
                entry["check"] = "ok" if errors and max(errors) <= TOLERANCE[point.dtype] else "MISMATCH"
            if provider.name == "adapterfast":
                entry["backend"] = providers.adapterfast_backend(x, point.r)
            del y, grads, outputs
        except providers.PROVIDER_ERRORS as error:
            entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
            continue
        live.append((provider, calls))

    for pass_ in args.passes:
        samples = {provider.name: [] for provider, _ in live}
        for round_ in range(args.rounds):
            shift = round_ % max(len(live), 1)
            for provider, calls in live[shift:] + live[:shift]:
                if "error" in found[provider.name]["passes"].get(pass_, {}):
                    continue
                if bar is not None:
                    bar.set_postfix_str(f"{provider.name} {pass_} {round_ + 1}/{args.rounds}")
                try:
                    if pass_ == "bwd":
                        samples[provider.name] += timer.times_after(calls.fwd, calls.bwd, args.min_run_time)
                    else:
                        samples[provider.name] += timer.times(getattr(calls, pass_), args.min_run_time)
                except providers.PROVIDER_ERRORS as error:
                    found[provider.name]["passes"][pass_] = {"error": f"{type(error).__name__}: {error}"[:300]}
        for provider, calls in live:
            stats = found[provider.name]["passes"].setdefault(pass_, {})
            if "error" in stats:
                continue
            stats.update(summarize(samples[provider.name]))
            try:
                if pass_ == "bwd":
                    y = calls.fwd()
                    stats.update(memory.peak(device, lambda: calls.bwd(y)))
                    del y
                else:
                    stats.update(memory.peak(device, getattr(calls, pass_)))
            except providers.PROVIDER_ERRORS as error:
                stats["mem_error"] = f"{type(error).__name__}: {error}"[:300]
    del x, g
    return found


def rows_for_point(point: shapes.Point, found: dict, info: dict, bandwidth: float, args) -> list[dict]:
    """One row per provider and pass, with the ratios to eager/compile and the floor fraction."""
    element = torch.empty((), dtype=point.torch_dtype).element_size()

    def median(name, pass_):
        return found.get(name, {}).get("passes", {}).get(pass_, {}).get("median_ms")

    def peak(name, pass_):
        return found.get(name, {}).get("passes", {}).get(pass_, {}).get("peak_bytes")

    rows = []
    for name, entry in found.items():
        provider = entry["provider"]
        for pass_ in args.passes:
            stats = dict(entry["passes"].get(pass_, {}))
            floor_bytes = FLOOR_ELEMENTS[pass_] * point.N * point.d * element
            floor_ms = floor_bytes / bandwidth * 1e3
            t = stats.get("median_ms")

            def ratio(base):
                return base / t if (base and t) else None

            mem_eager, mem = peak("eager", pass_), stats.get("peak_bytes")
            rows.append({
                **info,
                "kind": "op",
                "N": point.N, "d": point.d, "r": point.r, "activation": point.activation, "dtype": point.dtype,
                "provider": name, "label": provider.label, "pass": pass_,
                "median_ms": t, "q25_ms": stats.get("q25_ms"), "q75_ms": stats.get("q75_ms"),
                "iqr_ms": stats.get("iqr_ms"), "min_ms": stats.get("min_ms"), "samples": stats.get("samples"),
                "peak_bytes": mem, "retained_bytes": stats.get("retained_bytes"),
                "mem_method": memory.METHOD[info["device"]],
                "mem_vs_eager": (mem / mem_eager) if (mem is not None and mem_eager) else None,
                "floor_bytes": floor_bytes, "floor_ms": floor_ms,
                "floor_fraction": (floor_ms / t) if t else None,
                "copy_bw_gbs": bandwidth / 1e9,
                "speedup_vs_eager": ratio(median("eager", pass_)),
                "speedup_vs_compile": ratio(median("compile", pass_)),
                "speedup_vs_compile_max_autotune": ratio(median("compile_max_autotune", pass_)),
                "first_call_s": entry.get("first_call_s"),
                "max_rel_err_vs_eager": entry.get("max_rel_err_vs_eager"),
                "check": entry.get("check"),
                "backend": entry.get("backend"),
                "note": provider.note,
                "skipped": entry.get("skipped"),
                "error": entry.get("error") or stats.get("error"),
                "mem_error": stats.get("mem_error"),
                "quick": args.quick, "rounds": args.rounds, "min_run_time_s": args.min_run_time,
            })
    return rows


def _progress(iterable, total: int, disable: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="shapes", unit="shape", disable=disable, dynamic_ncols=True,
                file=sys.stderr)


@contextlib.contextmanager
def native_stderr_silenced(enabled: bool = True):
    """Sends what C++ code writes to file descriptor 2 to /dev/null (the CPU memory measurement runs
    ``torch.profiler``, whose kineto backend prints two USDT lines per call), while Python's
    ``sys.stderr`` (messages, the progress bar, warnings) still reaches the terminal through a copy
    of the original descriptor."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        sys.stderr.close()
        sys.stderr = python_stderr


def main(argv=None) -> int:
    args = parse_args(argv)
    with native_stderr_silenced(not args.verbose):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("python -m benchmarks: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    threads = args.threads or machine.cpu_count()
    torch.set_num_threads(threads)
    machine.quiet_compile_workers(device)
    if device == "cuda":
        torch.cuda.init()
    info = machine.describe(device, threads)
    info["allocator"] = allocator.configure(args.allocator)
    timer = make_timer(device, threads)
    started = time.perf_counter()
    bandwidth = timer.copy_bandwidth(min_run_time=0.5 if args.quick else 2.0)
    out_path = (results.new_run_path("ops", info["run_id"]) if args.out is None
                else os.path.join(args.out, results.OPS_FILE))
    print(f"adapterfast benchmarks on {info['device_name']}: torch {info['torch']}, triton {info['triton']}, "
          f"{threads} threads, copy bandwidth {bandwidth / 1e9:.1f} GB/s, allocator {info['allocator']}; "
          f"{len(args.points)} shapes x {len(args.providers)} providers x {len(args.passes)} passes -> {out_path}",
          file=sys.stderr)
    written, stopped = [], None
    bar = _progress(args.points, len(args.points), args.no_progress)
    for point in bar:
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            stopped = point
            break
        if hasattr(bar, "set_description"):
            bar.set_description(str(point))
        found = measure_point(point, args, timer, device, bar if hasattr(bar, "set_postfix_str") else None)
        for row in rows_for_point(point, found, info, bandwidth, args):
            results.append(out_path, row)
            written.append(row)
    if hasattr(bar, "close"):
        bar.close()
    elapsed = time.perf_counter() - started
    from . import table

    print(table.ops_markdown(written))
    if stopped is not None:
        print(f"\nStopped at the time budget ({args.time_budget:.0f} s) before {stopped}; "
              f"{len(written)} rows written.", file=sys.stderr)
    print(f"\n{len(written)} rows appended to {out_path} (run {info['run_id']}) in {elapsed:.0f} s", file=sys.stderr)
    if args.out is None:
        print("(the tracked results in benchmarks/results are unchanged; rerun with --out benchmarks/results to "
              "update them)", file=sys.stderr)
    return 0
