"""The demo's model, data and training loop (``python -m adapterfast.demo``; see ``demo.py``).

An encoder with adapters (``adapterfast.add_adapters``) and a linear head; tokenized, length-bucketed
batches; ``Trainer`` runs one step at a time so that ``train_together`` can interleave the fused and
the reference run step by step.
"""
from __future__ import annotations

import dataclasses
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


# ----------------------------------------------------------------------------- the model

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


def paired_speedup(fused: RunResult, reference: RunResult) -> float:
    """Median over steps of reference step time / fused step time (the first step left out).

    The two runs take turns at each step, so each ratio compares steps taken moments apart, under
    the same machine load; the median ignores the steps that another process happened to slow.
    """
    pairs = list(zip(reference.step_seconds, fused.step_seconds))
    pairs = pairs[1:] or pairs
    return statistics.median(r / f for r, f in pairs)
