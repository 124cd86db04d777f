"""Which shapes are measured: presets from real models, and ``--shapes`` parsing.

A point is ``(N, d, r, activation, dtype)``: N tokens (the flattened leading dims), model width d,
bottleneck r. Widths: BERT-base 768, BERT-large 1024, Llama-7B 4096, Llama-70B 8192.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclasses.dataclass(frozen=True)
class Point:
    N: int
    d: int
    r: int
    activation: str = "relu"
    dtype: str = "fp32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def __str__(self) -> str:
        return f"N={self.N} d={self.d} r={self.r} {self.activation} {self.dtype}"


def _grid(ns, ds, rs, acts, dtypes):
    return [Point(n, d, r, a, t) for t, a, n, d, r in itertools.product(dtypes, acts, ns, ds, rs)]


def preset(device: str, quick: bool) -> list[Point]:
    """The shapes measured by default (the CPU speed-target grid; BERT to Llama-70B widths on CUDA)."""
    if device == "cpu":
        if quick:
            return _grid([8192], [768, 1024, 4096], [16, 64], ["relu"], ["fp32"]) + [
                Point(8192, 1024, 64, "relu", "bf16"),
                Point(8192, 1024, 64, "gelu", "fp32"),
            ]
        return _grid([2048, 8192, 32768], [768, 1024, 4096], [16, 64, 256], ["relu", "gelu"], ["fp32", "bf16"])
    if quick:
        return _grid([16384], [768, 1024, 4096, 8192], [16, 64], ["relu"], ["bf16"]) + [
            Point(16384, 4096, 64, "relu", "fp16"),
            Point(16384, 4096, 64, "gelu", "bf16"),
        ]
    return (_grid([4096, 16384, 65536], [768, 1024, 4096, 8192], [16, 64, 256], ["relu"], ["bf16", "fp16"])
            + _grid([16384], [768, 1024, 4096, 8192], [16, 64, 256], ["gelu"], ["bf16"]))


def parse_dtypes(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = []
    for item in text.replace(" ", "").split(","):
        if item not in DTYPES:
            raise ValueError(f"unknown dtype {item!r}; choose from fp32, bf16, fp16")
        names.append(DTYPE_NAMES[DTYPES[item]])
    return list(dict.fromkeys(names))


def parse_activations(text: str | None) -> list[str] | None:
    if not text:
        return None
    acts = [a for a in text.replace(" ", "").split(",") if a]
    for a in acts:
        if a not in ("relu", "gelu"):
            raise ValueError(f"unknown activation {a!r}; the benchmarks measure relu and gelu")
    return acts


def parse_shape(text: str) -> tuple[int, int, int, str | None]:
    """``"N,d,r"`` or ``"N,d,r,activation"`` (also accepts ``x`` as the separator)."""
    parts = [p for p in text.replace("x", ",").split(",") if p]
    if len(parts) not in (3, 4):
        raise ValueError(f"a shape is N,d,r or N,d,r,activation; got {text!r}")
    try:
        n, d, r = (int(p) for p in parts[:3])
    except ValueError:
        raise ValueError(f"N, d and r must be integers; got {text!r}") from None
    if min(n, d, r) < 1:
        raise ValueError(f"N, d and r must be >= 1; got {text!r}")
    act = parts[3] if len(parts) == 4 else None
    if act is not None:
        parse_activations(act)
    return n, d, r, act


def select(device: str, quick: bool, shapes: list[str] | None, dtypes: str | None,
           activations: str | None) -> list[Point]:
    """The points to measure: ``--shapes`` (crossed with ``--dtype``/``--activation``) or the preset.

    Without ``--shapes``, ``--dtype``/``--activation`` replace the preset's dtypes/activations.
    """
    dts = parse_dtypes(dtypes)
    acts = parse_activations(activations)
    if shapes:
        specs = [parse_shape(s) for item in shapes for s in item.replace(";", " ").split()]
        default_dtype = "fp32" if device == "cpu" else "bf16"
        points = [Point(n, d, r, a, t) for (n, d, r, own_act) in specs
                  for a in ([own_act] if own_act else (acts or ["relu"]))
                  for t in (dts or [default_dtype])]
    else:
        points = preset(device, quick)
        if dts:
            points = [dataclasses.replace(p, dtype=t) for p in points for t in dts]
        if acts:
            points = [dataclasses.replace(p, activation=a) for p in points for a in acts]
    return list(dict.fromkeys(points))
