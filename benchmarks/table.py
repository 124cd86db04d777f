"""``python -m benchmarks.table``: markdown tables of a benchmark run, ready to paste in the README.

    python -m benchmarks.table                        # latest run per device in benchmarks/results/
    python -m benchmarks.table --results DIR --run ID --device cpu

Prints, per device and pass, one table (times are the median ± half the IQR, in ms), the CPU speed
targets checked against the CPU rows, and the end-to-end training-step table if there is one.
``--stat min`` uses each provider's fastest sample instead of the median for the times, ratios and
floor fractions: on a loaded machine the minimum is the less disturbed estimate (say so if you
publish it).
"""
from __future__ import annotations

import argparse
import os
from collections import OrderedDict

from . import results
from .providers import LABELS, ORDER

PASS_TITLES = {"fwd": "forward", "bwd": "backward", "full": "full step (forward + backward)"}
# The CPU speed targets (fp32, N = 8192): fwd+bwd >= 3x eager and >= 2x torch.compile, forward >= 3x eager,
# peak memory <= eager, for d in {768, 1024, 4096} and r in {16, 64}.
TARGET_SHAPES = [(8192, d, r) for d in (768, 1024, 4096) for r in (16, 64)]


STAT = {"field": "median_ms"}  # set by --stat


def _t(row: dict | None):
    return None if not row else row.get(STAT["field"])


def _ratio(base: dict | None, row: dict | None):
    a, b = _t(base), _t(row)
    return a / b if (a and b) else None


def _ms(row: dict | None) -> str:
    if row is None:
        return "–"
    t = _t(row)
    if t is None:
        return "skipped" if row.get("skipped") else "error"
    digits = 3 if t < 1 else 2 if t < 10 else 1
    if STAT["field"] != "median_ms":
        return f"{t:.{digits}f}"
    return f"{t:.{digits}f} ± {(row.get('iqr_ms') or 0.0) / 2:.{digits}f}"


def _stat_caption() -> str:
    return "median ± IQR/2" if STAT["field"] == "median_ms" else "fastest sample"


def _x(value) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _mib(value) -> str:
    return "–" if value is None else f"{value / 2**20:.1f}"


def _shape_key(row: dict) -> tuple:
    return (row["dtype"], row["activation"], row["N"], row["d"], row["r"])


def _shape_label(key: tuple) -> str:
    dtype, act, n, d, r = key
    return f"{n} × {d}, r={r}, {act}, {dtype}"


def _header(rows: list[dict]) -> str:
    first = rows[0]
    threads = f", {first['threads']} threads" if first.get("device") == "cpu" else ""
    bw = first.get("copy_bw_gbs")
    bw_text = f", copy bandwidth {bw:.1f} GB/s" if bw else ""
    backends = sorted({r["backend"] for r in rows if r.get("provider") == "adapterfast" and r.get("backend")})
    backend_text = f"; adapterfast backend: {', '.join(backends)}" if backends else ""
    return (f"{first.get('device_name')}{threads}{bw_text}; torch {first.get('torch')}, triton {first.get('triton')}, "
            f"adapterfast {first.get('adapterfast')} ({first.get('git_commit')}){backend_text}; "
            f"{first.get('timestamp')}{' (quick)' if first.get('quick') else ''}, run {first.get('run_id')}")


def _runs(rows: list[dict]) -> list[list[dict]]:
    """The rows of each run, runs in order of first appearance."""
    by_run = OrderedDict()
    for row in rows:
        by_run.setdefault(row.get("run_id"), []).append(row)
    return list(by_run.values())


def ops_markdown(rows: list[dict]) -> str:
    """Tables for op rows (one run per device expected; rows of several runs are kept apart)."""
    rows = [r for r in rows if r.get("kind", "op") == "op"]
    if not rows:
        return "(no op benchmark rows)"
    out = []
    for run_rows in _runs(rows):
        present = [p for p in ORDER if any(r["provider"] == p for r in run_rows)]
        out.append(f"**{run_rows[0].get('device', '?').upper()}**: {_header(run_rows)}\n")
        for pass_ in ("fwd", "bwd", "full"):
            pass_rows = [r for r in run_rows if r.get("pass") == pass_]
            if not pass_rows:
                continue
            cells = OrderedDict()
            for row in pass_rows:
                cells.setdefault(_shape_key(row), {})[row["provider"]] = row
            ratio_cols = [("eager", "vs eager")]
            if "compile" in present:
                ratio_cols.append(("compile", "vs compile"))
            if "compile_max_autotune" in present:
                ratio_cols.append(("compile_max_autotune", "vs max-autotune"))
            head = (["shape (N × d, r)"] + [f"{LABELS[p]} ms" for p in present]
                    + [f"adapterfast {label}" for _, label in ratio_cols]
                    + ["floor ms", "adapterfast % of floor", "peak MiB eager → adapterfast"])
            out.append(f"{PASS_TITLES[pass_]} ({_stat_caption()})\n")
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")
            for key, by_provider in cells.items():
                fast = by_provider.get("adapterfast", {})
                eager = by_provider.get("eager", {})
                any_row = next(iter(by_provider.values()))
                frac = (any_row["floor_ms"] / _t(fast)) if (_t(fast) and any_row.get("floor_ms")) else None
                line = ([_shape_label(key)] + [_ms(by_provider.get(p)) for p in present]
                        + [_x(_ratio(by_provider.get(base), fast)) for base, _ in ratio_cols]
                        + [f"{any_row.get('floor_ms', 0):.2f}", "–" if frac is None else f"{100 * frac:.0f}%",
                           f"{_mib(eager.get('peak_bytes'))} → {_mib(fast.get('peak_bytes'))}"])
                out.append("| " + " | ".join(line) + " |")
            out.append("")
        notes = _notes(run_rows)
        if notes:
            out.extend(notes + [""])
    return "\n".join(out)


def _notes(rows: list[dict]) -> list[str]:
    notes = OrderedDict()
    for row in rows:
        label = LABELS.get(row["provider"], row["provider"])
        if row.get("skipped"):
            notes[f"{label} skipped: {row['skipped']}"] = None
        if row.get("error"):
            notes[f"{label} failed at {_shape_label(_shape_key(row))}: {row['error']}"] = None
        if row.get("check") == "MISMATCH":
            notes[f"{label} does not match eager at {_shape_label(_shape_key(row))} "
                  f"(max relative error {row.get('max_rel_err_vs_eager'):.2e})"] = None
        if row["provider"] == "adapterfast" and row.get("device") == "cpu" and row.get("backend") == "reference":
            notes["adapterfast ran on its eager reference backend (the C++ CPU backend was not built)"] = None
    return [f"- {n}" for n in notes]


def targets_markdown(rows: list[dict]) -> str:
    """The CPU speed targets, checked shape by shape against the fp32 relu rows at N = 8192."""
    cpu = [r for r in rows if r.get("device") == "cpu" and r.get("kind", "op") == "op"
           and r.get("dtype") == "fp32" and r.get("activation") == "relu"]
    index = {(r["provider"], r["N"], r["d"], r["r"], r["pass"]): r for r in cpu}
    if not any(("adapterfast", n, d, r, "full") in index for n, d, r in TARGET_SHAPES):
        return ""
    threads = sorted({r.get("threads") for r in cpu})

    def check(value, target, higher=True):
        if value is None:
            return "–"
        ok = value >= target if higher else value <= target
        return f"{value:.2f}{'x' if higher else ''} {'✅' if ok else '❌'}"

    lines = [f"CPU speed targets, fp32 relu, N = 8192, threads {threads} (targets are for 2 threads), "
             f"{_stat_caption().split(' ±')[0]} times\n",
             "| d, r | fwd+bwd vs eager (≥ 3x) | fwd+bwd vs torch.compile (≥ 2x) | forward vs eager (≥ 3x) "
             "| peak memory vs eager (≤ 1) |",
             "|---|---:|---:|---:|---:|"]
    for n, d, r in TARGET_SHAPES:
        def get(provider, pass_):
            return index.get((provider, n, d, r, pass_))

        full, fwd = get("adapterfast", "full"), get("adapterfast", "fwd")
        if not full and not fwd:
            continue
        lines.append(f"| {d}, {r} | {check(_ratio(get('eager', 'full'), full), 3)} | "
                     f"{check(_ratio(get('compile', 'full'), full), 2)} | "
                     f"{check(_ratio(get('eager', 'fwd'), fwd), 3)} | "
                     f"{check((full or {}).get('mem_vs_eager'), 1.0, higher=False)} |")
    return "\n".join(lines) + "\n"


def e2e_markdown(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("kind") == "e2e"]
    if not rows:
        return ""
    out = []
    for run_rows in _runs(rows):
        first = run_rows[0]
        out.append(f"End-to-end training step, {first['layers']} encoder layers d={first['d_model']} "
                   f"(batch {first['batch']} × seq {first['seq']}, adapters r={first['r']} after each layer, "
                   f"base frozen, AdamW on adapters, {first['dtype']}): {_header(run_rows)}\n")
        out.append(f"| provider | step ms ({_stat_caption()}) | tokens/s | vs eager | peak MiB |")
        out.append("|---|---:|---:|---:|---:|")
        eager = next((r for r in run_rows if r["provider"] == "eager"), None)
        for row in run_rows:
            out.append(f"| {LABELS.get(row['provider'], row['provider'])} | {_ms(row)} | "
                       f"{row['tokens'] / _t(row) * 1e3:,.0f} | {_x(_ratio(eager, row))} | "
                       f"{_mib(row.get('peak_bytes'))} |"
                       if _t(row) else
                       f"| {LABELS.get(row['provider'], row['provider'])} | {row.get('error') or 'skipped'} "
                       "| – | – | – |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.table",
        description="Markdown tables of a benchmark run, ready to paste in the README.")
    parser.add_argument("--results", default=results.DEFAULT_DIR, help="directory holding ops.jsonl / e2e.jsonl")
    parser.add_argument("--run", default="latest", help="run id, 'latest' (per device, default) or 'all'")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="which time to tabulate (default median; min = fastest sample)")
    args = parser.parse_args(argv)
    STAT["field"] = f"{args.stat}_ms"
    ops = results.pick(results.read(os.path.join(args.results, results.OPS_FILE)), args.run, args.device)
    e2e = results.pick(results.read(os.path.join(args.results, results.E2E_FILE)), args.run, args.device)
    if not ops and not e2e:
        print(f"no results in {args.results}")
        return 1
    if ops:
        print(ops_markdown(ops))
        targets = targets_markdown(ops)
        if targets:
            print(targets)
    if e2e:
        print(e2e_markdown(e2e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
