"""``python -m benchmarks.plot``: PNG charts of a benchmark run (latest per device by default).

    python -m benchmarks.plot [--results DIR] [--out DIR] [--run ID] [--device cpu]

Writes, per device, ``speedup_<device>.png`` (each provider's speedup over eager, and
adapterfast's over torch.compile, by shape, for forward / backward / full step),
``memory_<device>.png`` (peak memory of the full step, and the memory a forward keeps for the
backward), ``floor_<device>.png`` (fraction of the bandwidth floor reached) and, with e2e rows,
``e2e_<device>.png`` (tokens/s of the training step).
"""
from __future__ import annotations

import argparse
import os
from collections import OrderedDict

from . import results
from .providers import LABELS, ORDER

COLORS = {"eager": "#9e9e9e", "compile": "#1f77b4", "compile_max_autotune": "#17becf",
          "adapterhub": "#ff7f0e", "adapterfast": "#2ca02c"}
PASS_TITLES = {"fwd": "forward", "bwd": "backward", "full": "full step (fwd + bwd)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _shape_label(row: dict) -> str:
    return f"{row['N']}×{row['d']} r{row['r']} {row['activation']} {row['dtype']}"


def _index(rows):
    """{shape label: {(provider, pass): row}}, shapes in run order."""
    table = OrderedDict()
    for row in rows:
        table.setdefault(_shape_label(row), {})[(row["provider"], row["pass"])] = row
    return table


def _title(rows, what: str) -> str:
    first = rows[0]
    threads = f", {first.get('threads')} threads" if first.get("device") == "cpu" else ""
    backend = next((r.get("backend") for r in rows if r.get("provider") == "adapterfast" and r.get("backend")), None)
    backend_text = f", adapterfast backend: {backend}" if backend else ""
    return (f"{what}: {first.get('device_name')}{threads}\ntorch {first.get('torch')}{backend_text}, "
            f"{first.get('timestamp', '')[:16]}{' (quick)' if first.get('quick') else ''}")


def _hbars(ax, labels, series: dict, xlabel: str, log: bool = False, ref: float | None = None, target=None):
    """Horizontal grouped bars: one group per label, one bar per series (provider)."""
    import numpy as np

    names = [n for n in series if any(v is not None for v in series[n])]
    if not names:
        ax.set_visible(False)
        return
    y = np.arange(len(labels))
    height = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [v if v is not None else 0.0 for v in series[name]]
        positions = y - 0.4 + height * (i + 0.5)
        ax.barh(positions, values, height=height, color=COLORS.get(name, None), label=LABELS.get(name, name))
        for pos, v in zip(positions, series[name]):
            if v is not None and len(labels) * len(names) <= 60:
                ax.text(v, pos, f" {v:.2f}" if v < 10 else f" {v:.0f}", va="center", fontsize=6)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first shape on top (set, not inverted: axes share y)
    shown = [v for name in names for v in series[name] if v]
    if log or (shown and max(shown) / min(shown) > 30):
        ax.set_xscale("log")
    if ref is not None:
        ax.axvline(ref, color="black", linewidth=0.8)
    if target is not None:
        ax.axvline(target, color="red", linewidth=0.8, linestyle="--", label=f"target {target:g}x")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)


def _legend(axes) -> dict:
    """One legend entry per provider (in ORDER), then the target lines."""
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    rank = {LABELS[p]: i for i, p in enumerate(ORDER)}
    return dict(sorted(handles.items(), key=lambda item: rank.get(item[0], len(rank))))


def _save(plt, fig, axes, title: str, path: str, rect=(0, 0.05, 1, 0.95)) -> str:
    """Adds the shared legend (below the panels) and the title, lays the panels out in ``rect``, writes ``path``."""
    handles = _legend(axes)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_speedup(rows, path: str) -> str:
    plt = _plt()
    table = _index(rows)
    labels = list(table)
    passes = [p for p in ("fwd", "bwd", "full") if any(r["pass"] == p for r in rows)]
    others = [p for p in ORDER if p != "eager" and any(r["provider"] == p for r in rows)]
    cpu = rows[0].get("device") == "cpu"
    fig, axes = plt.subplots(2, len(passes), figsize=(5.2 * len(passes), 1.2 + 0.55 * len(labels) * 2),
                             squeeze=False, sharey=True)
    for col, pass_ in enumerate(passes):
        vs_eager = {p: [table[s].get((p, pass_), {}).get("speedup_vs_eager") for s in labels] for p in others}
        _hbars(axes[0][col], labels, vs_eager, "speedup over eager (×, higher is better)", ref=1.0,
               target=3.0 if cpu and pass_ in ("fwd", "full") else None)
        axes[0][col].set_title(f"{PASS_TITLES[pass_]}: vs eager", fontsize=9)
        vs_compile = {p: [table[s].get((p, pass_), {}).get("speedup_vs_compile") for s in labels]
                      for p in others if p != "compile"}
        vs_compile = {p: v for p, v in vs_compile.items() if p in ("adapterfast", "compile_max_autotune")}
        _hbars(axes[1][col], labels, vs_compile, "speedup over torch.compile (×)", ref=1.0,
               target=2.0 if cpu and pass_ == "full" else None)
        axes[1][col].set_title(f"{PASS_TITLES[pass_]}: vs torch.compile", fontsize=9)
    return _save(plt, fig, axes, _title(rows, "Bottleneck adapter op, speedup"), path, (0, 0.04, 1, 0.97))


def plot_memory(rows, path: str) -> str:
    plt = _plt()
    table = _index(rows)
    labels = list(table)
    present = [p for p in ORDER if any(r["provider"] == p for r in rows)]
    mib = 2.0 ** 20
    panels = [("full", "peak_bytes", "full step: peak memory above inputs (MiB)"),
              ("fwd", "retained_bytes", "forward: memory kept for backward, incl. output (MiB)")]
    panels = [p for p in panels if any(r["pass"] == p[0] for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 1.4 + 0.45 * len(labels)), squeeze=False,
                             sharey=True)
    for ax, (pass_, field, title) in zip(axes[0], panels):
        series = {p: [(table[s].get((p, pass_), {}).get(field) or 0) / mib or None for s in labels] for p in present}
        _hbars(ax, labels, series, "MiB (lower is better)")
        ax.set_title(title, fontsize=9)
    method = rows[0].get("mem_method", "")
    return _save(plt, fig, axes, _title(rows, f"Memory, measured with {method}"), path)


def plot_floor(rows, path: str) -> str:
    plt = _plt()
    table = _index(rows)
    labels = list(table)
    passes = [p for p in ("fwd", "bwd", "full") if any(r["pass"] == p for r in rows)]
    present = [p for p in ORDER if any(r["provider"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(passes), figsize=(5.2 * len(passes), 1.4 + 0.45 * len(labels)), squeeze=False,
                             sharey=True)
    for ax, pass_ in zip(axes[0], passes):
        series = {p: [(lambda v: None if v is None else 100 * v)(table[s].get((p, pass_), {}).get("floor_fraction"))
                      for s in labels] for p in present}
        _hbars(ax, labels, series, "% of the bandwidth floor (100% = moves only the bytes it must)", ref=100.0)
        ax.set_title(PASS_TITLES[pass_], fontsize=9)
    bw = rows[0].get("copy_bw_gbs")
    return _save(plt, fig, axes, _title(rows, f"Fraction of the bandwidth floor (copy bandwidth {bw:.1f} GB/s)"),
                 path)


def plot_e2e(rows, path: str) -> str:
    plt = _plt()
    rows = [r for r in rows if r.get("tokens_per_s")]
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.5 * len(rows)))
    names = [LABELS.get(r["provider"], r["provider"]) for r in rows]
    values = [r["tokens_per_s"] for r in rows]
    ax.barh(names, values, color=[COLORS.get(r["provider"]) for r in rows])
    for i, r in enumerate(rows):
        ax.text(values[i], i, f" {values[i]:,.0f} tok/s ({r.get('speedup_vs_eager') or 0:.2f}x)", va="center",
                fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens / s (higher is better)", fontsize=8)
    ax.set_xlim(0, max(values) * 1.35)
    first = rows[0]
    ax.set_title(_title(rows, f"Training step, {first['layers']} layers d={first['d_model']}, "
                              f"{first['batch']}×{first['seq']} tokens, r={first['r']}, {first['dtype']}"), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def make_all(results_dir: str, out_dir: str, run: str = "latest", device: str | None = None) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    written = []
    ops = results.pick(results.read(os.path.join(results_dir, results.OPS_FILE)), run, device)
    e2e = results.pick(results.read(os.path.join(results_dir, results.E2E_FILE)), run, device)
    for dev in sorted({r.get("device") for r in ops}):
        rows = [r for r in ops if r.get("device") == dev and r.get("pass")]
        if not rows:
            continue
        written.append(plot_speedup(rows, os.path.join(out_dir, f"speedup_{dev}.png")))
        written.append(plot_memory(rows, os.path.join(out_dir, f"memory_{dev}.png")))
        written.append(plot_floor(rows, os.path.join(out_dir, f"floor_{dev}.png")))
    for dev in sorted({r.get("device") for r in e2e}):
        rows = [r for r in e2e if r.get("device") == dev]
        if any(r.get("tokens_per_s") for r in rows):
            written.append(plot_e2e(rows, os.path.join(out_dir, f"e2e_{dev}.png")))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plot",
        description="PNG charts of a benchmark run (speedup, memory, bandwidth floor, e2e).")
    parser.add_argument("--results", default=results.DEFAULT_DIR, help="directory holding ops.jsonl / e2e.jsonl")
    parser.add_argument("--out", help="where to write the PNGs (default: the results directory)")
    parser.add_argument("--run", default="latest", help="run id, 'latest' (per device, default) or 'all'")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    written = make_all(args.results, args.out or args.results, args.run, args.device)
    if not written:
        print(f"no results to plot in {args.results}")
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
