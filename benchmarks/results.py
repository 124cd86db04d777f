"""Result rows: JSON lines appended to ``<dir>/ops.jsonl`` (op benchmark) and ``<dir>/e2e.jsonl``.

Every row carries its run's ``run_id``, timestamp, device, versions and thread count, so one file
can hold many runs; readers pick a run (by default the latest per device).

``DEFAULT_DIR`` (``benchmarks/results``) holds the tracked results the README's figures come from;
they change only when a run is pointed there on purpose (``--out benchmarks/results``). A run
without ``--out`` writes a new file of its own under ``RUNS_DIR`` (``benchmarks/runs``, ignored
by git), named by its run id (``new_run_path``).
"""
from __future__ import annotations

import json
import math
import os

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
OPS_FILE = "ops.jsonl"
E2E_FILE = "e2e.jsonl"
RUNS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")


def new_run_path(kind: str, run_id: str, directory: str | None = None) -> str:
    """A file of its own for one run's rows: ``<directory>/<kind>-<run_id>.jsonl`` (``RUNS_DIR`` by default)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(run_id))
    return os.path.join(directory or RUNS_DIR, f"{kind}-{safe}.jsonl")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append(path: str, row: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        f.flush()


def read(path: str) -> list[dict]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a row cut short by a killed run
                    continue
    return rows


def runs(rows: list[dict]) -> list[str]:
    """Run ids, oldest first (by the first timestamp seen for each)."""
    first = {}
    for row in rows:
        first.setdefault(row.get("run_id"), row.get("timestamp") or "")
    return [run for run, _ in sorted(first.items(), key=lambda item: item[1])]


def pick(rows: list[dict], run: str | None = "latest", device: str | None = None) -> list[dict]:
    """The rows of one run: ``run`` is a run id, ``"latest"`` (per device) or ``"all"``."""
    if device:
        rows = [r for r in rows if r.get("device") == device]
    if run == "all":
        return rows
    if run and run != "latest":
        return [r for r in rows if r.get("run_id") == run]
    latest = {}
    for run_id in runs(rows):
        for r in rows:
            if r.get("run_id") == run_id:
                latest[r.get("device")] = run_id
                break
    keep = set(latest.values())
    return [r for r in rows if r.get("run_id") in keep]
