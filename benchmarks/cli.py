"""The command-line options the measuring scripts share (``python -m benchmarks`` and ``benchmarks.e2e``)."""
from __future__ import annotations

import argparse

from . import allocator


def parser(prog: str, description: str, *, quick: str, rounds: str, min_run_time: str) -> argparse.ArgumentParser:
    """A parser with ``--device``, ``--quick``, ``--threads``, ``--rounds``, ``--min-run-time``, ``--seed``
    and ``--allocator``; the strings are the help of the options whose defaults differ between the scripts."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--threads", type=int, help="CPU threads (default: every CPU this process may use)")
    p.add_argument("--rounds", type=int, help=rounds)
    p.add_argument("--min-run-time", type=float, help=min_run_time)
    p.add_argument("--seed", type=int, default=0)
    allocator.add_option(p)
    return p


def names(parser: argparse.ArgumentParser, text: str, known, option: str = "provider") -> list[str]:
    """The comma list ``text`` as names, each one of ``known`` (else a usage error naming the unknown ones)."""
    chosen = [name for name in text.replace(" ", "").split(",") if name]
    unknown = [name for name in chosen if name not in known]
    if unknown:
        parser.error(f"unknown {option}(s) {unknown}; choose from {', '.join(known)}")
    return chosen
