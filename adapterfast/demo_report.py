"""The demo's outputs and measurements: saved adapters, the loss plot, speed ratios, the op alone."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

import adapterfast

from .demo_train import Classifier, RunResult


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
