"""``python -m benchmarks.e2e``: one adapter-training step of a BERT-base-sized encoder, tokens/s.

The model is a stack of ``nn.TransformerEncoderLayer`` (d_model 768, 12 heads, FFN 3072, GELU,
post-norm, dropout 0.1: BERT-base's layer) with an adapter after every layer. The base is frozen;
a step is forward, backward (through every layer, since the adapters of early layers need the
gradient) and an AdamW step on the adapter parameters, as in adapter fine-tuning. Providers:
``eager`` (the seed's adapter), ``adapterfast`` (``adapterfast.Adapter``, same weights) and, with
``--providers``, ``compile`` (each seed adapter wrapped in ``torch.compile``). Steps are timed in
interleaved rounds like the op benchmark; rows go to ``<out>/e2e.jsonl``.

    python -m benchmarks.e2e --device cpu --quick     # 2 layers, batch 8 x seq 128, fp32
    python -m benchmarks.e2e --device cuda            # 12 layers, batch 32 x seq 512, bf16
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn as nn

from . import allocator, cli, machine, memory, results
from .providers import LABELS, PROVIDER_ERRORS, EagerAdapter
from .shapes import DTYPES, DTYPE_NAMES
from .timing import make_timer, summarize

E2E_PROVIDERS = ("eager", "compile", "adapterfast")


class AdaptedEncoder(nn.Module):
    """Frozen encoder layers, each followed by a trainable adapter."""

    def __init__(self, layers: nn.ModuleList, adapters: nn.ModuleList):
        super().__init__()
        self.layers, self.adapters = layers, adapters

    def forward(self, x):
        for layer, adapter in zip(self.layers, self.adapters):
            x = adapter(layer(x))
        return x


def build(provider: str, layers: nn.ModuleList, d: int, r: int, dtype, device, seed: int) -> AdaptedEncoder:
    """The model for one provider: the shared frozen base, adapters with identical initial weights."""
    torch.manual_seed(seed)
    seeds = nn.ModuleList(EagerAdapter(d, r) for _ in layers)
    if provider == "eager":
        adapters = seeds
    elif provider == "compile":
        adapters = nn.ModuleList(torch.compile(copy.deepcopy(a), dynamic=False) for a in seeds)
    elif provider == "adapterfast":
        import adapterfast

        adapters = nn.ModuleList()
        for a in seeds:
            fast = adapterfast.Adapter(d, r)
            fast.load_state_dict(a.state_dict())
            adapters.append(fast)
    else:
        raise ValueError(f"unknown e2e provider {provider!r}; choose from {', '.join(E2E_PROVIDERS)}")
    return AdaptedEncoder(layers, adapters.to(device=device, dtype=dtype)).train()


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.parser(
        "python -m benchmarks.e2e",
        "One adapter-training step of a BERT-base-sized encoder with adapters: tokens/s, eager vs adapterfast.",
        quick="fewer layers, a smaller batch and shorter measurements",
        rounds="interleaved rounds (default 2 quick / 3)",
        min_run_time="seconds of timed steps per provider per round")
    parser.add_argument("--layers", type=int, help="encoder layers (default 2 quick / 12)")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, help="attention heads (default d_model / 64)")
    parser.add_argument("--seq", type=int, help="sequence length (default CPU 128; CUDA 512)")
    parser.add_argument("--batch", type=int, help="batch size (default CPU 8 quick / 32; CUDA 16 quick / 32)")
    parser.add_argument("--r", type=int, default=64, help="adapter bottleneck size")
    parser.add_argument("--dtype", help="fp32, bf16 or fp16 (default fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--providers", default="eager,adapterfast", help=f"comma list from {', '.join(E2E_PROVIDERS)}")
    parser.add_argument("--out", default=results.DEFAULT_DIR)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.layers = args.layers or (2 if args.quick else 12)
    args.heads = args.heads or max(args.d_model // 64, 1)
    args.seq = args.seq or (512 if cuda else 128)
    args.batch = args.batch or ((16 if args.quick else 32) if cuda else (8 if args.quick else 32))
    args.dtype = DTYPE_NAMES[DTYPES[args.dtype or ("bf16" if cuda else "fp32")]]
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.min_run_time = args.min_run_time or ((0.3 if cuda else 1.0) if args.quick else (1.0 if cuda else 3.0))
    args.providers = cli.names(parser, args.providers, E2E_PROVIDERS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("python -m benchmarks.e2e: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    threads = args.threads or machine.cpu_count()
    torch.set_num_threads(threads)
    machine.quiet_compile_workers(device)
    dtype = DTYPES[args.dtype]
    info = machine.describe(device, threads)
    info["allocator"] = allocator.configure(args.allocator)
    timer = make_timer(device, threads)
    torch.manual_seed(args.seed)
    d = args.d_model
    layers = nn.ModuleList(
        nn.TransformerEncoderLayer(d, args.heads, dim_feedforward=4 * d, dropout=0.1, activation="gelu",
                                   batch_first=True, norm_first=False)
        for _ in range(args.layers)
    ).to(device=device, dtype=dtype)
    layers.requires_grad_(False)
    x = torch.randn(args.batch, args.seq, d, device=device, dtype=dtype)
    tokens = args.batch * args.seq

    steps = {}
    for name in args.providers:
        model = build(name, layers, d, args.r, dtype, device, args.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss = model(x).float().pow(2).mean()
            loss.backward()
            optimizer.step()
            return loss

        started = time.perf_counter()
        try:
            step()
            step()
            timer.sync()
            steps[name] = {"step": step, "first_calls_s": time.perf_counter() - started,
                           "trainable": sum(p.numel() for p in params)}
        except PROVIDER_ERRORS as error:
            steps[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
    live = [n for n in args.providers if "step" in steps[n]]
    print(f"e2e on {info['device_name']}: {args.layers} layers d={d}, batch {args.batch} x seq {args.seq}, "
          f"r={args.r}, {args.dtype}, {threads} threads; providers {', '.join(live)}", file=sys.stderr)
    samples = {n: [] for n in live}
    for round_ in range(args.rounds):
        shift = round_ % max(len(live), 1)
        for name in live[shift:] + live[:shift]:
            samples[name] += timer.times(steps[name]["step"], args.min_run_time, min_samples=2)
    out_path = os.path.join(args.out, results.E2E_FILE)
    stats = {n: summarize(samples[n]) for n in live}
    eager_ms = stats.get("eager", {}).get("median_ms")
    for name in args.providers:
        entry = steps[name]
        row = {**info, "kind": "e2e", "provider": name, "label": LABELS.get(name, name), "layers": args.layers,
               "d_model": d, "heads": args.heads, "seq": args.seq, "batch": args.batch, "tokens": tokens,
               "r": args.r, "dtype": args.dtype, "quick": args.quick, "rounds": args.rounds,
               "min_run_time_s": args.min_run_time, "error": entry.get("error")}
        if name in stats:
            s = stats[name]
            row.update(s)
            row["tokens_per_s"] = tokens / (s["median_ms"] / 1e3)
            row["speedup_vs_eager"] = eager_ms / s["median_ms"] if eager_ms else None
            row["first_calls_s"] = entry["first_calls_s"]
            row["trainable_params"] = entry["trainable"]
            row.update(memory.peak(device, entry["step"]))
            row["mem_method"] = memory.METHOD[device]
        if name == "adapterfast" and "step" in entry:
            from .providers import adapterfast_backend

            row["backend"] = adapterfast_backend(x.reshape(-1, d), args.r)
        results.append(out_path, row)
        if "tokens_per_s" in row:
            print(f"{LABELS.get(name, name):>22}: {row['median_ms']:8.1f} ms/step (IQR {row['iqr_ms']:.1f}), "
                  f"{row['tokens_per_s']:9,.0f} tokens/s, {row['speedup_vs_eager'] or float('nan'):.2f}x eager")
        else:
            print(f"{LABELS.get(name, name):>22}: {row['error']}")
    print(f"rows appended to {out_path} (run {info['run_id']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
