"""Ahead-of-time compilation of the grouped op's Triton kernels for sm_80/sm_90, without a GPU.

    python -m adapterfast.grouped_compile_check [--dtypes bf16 fp16 fp32] [--ranks 16 64 256]

The launchers of ``adapterfast.kernels.grouped`` run on CPU tensors with their kernels replaced by
recorders, so exactly the argument lists and constexprs they produce are compiled (with
``adapterfast.compile_check``'s signature rules). Reports shared memory per kernel and whether its
dots use tensor cores (``mma``/``wgmma`` in the PTX); exits non-zero when a kernel fails to compile.
Run it with ``TRITON_INTERPRET`` unset (the interpreter replaces the kernels with Python objects).
"""
from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KERNELS = ("grouped_forward_kernel", "grouped_backward_dx_kernel", "grouped_backward_dw_kernel")


class _Recorder:
    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion")}
            self.launches.append(SimpleNamespace(kernel=self.kernel, args=args, constexprs=kwargs, options=options))
        return record


def launches(dtype: torch.dtype, r: int, dropout: bool = True) -> list:
    """The three kernel launches of one forward and backward, as the launchers build them."""
    from adapterfast.kernels import grouped

    recorded: list = []
    originals = {name: getattr(grouped, name) for name in KERNELS}
    try:
        for name, kernel in originals.items():
            setattr(grouped, name, _Recorder(kernel, recorded))
        n, d, adapters = 64, 96, 3
        x = torch.randn(n, d).to(dtype)
        w_down, w_up = torch.randn(adapters, r, d), torch.randn(adapters, d, r)
        b_down, b_up = torch.randn(adapters, r), torch.randn(adapters, d)
        scales = torch.ones(adapters, dtype=torch.float64)
        index = torch.randint(-1, adapters, (n,))
        p, seed = (0.1, 1234) if dropout else (0.0, None)
        grouped.forward(x, index, w_down, w_up, b_down, b_up, "gelu", scales, p, seed, None)
        grouped.backward(x, x, index, w_down, w_up, b_down, b_up, torch.zeros(n, r), "gelu", scales, p, seed, True)
    finally:
        for name, kernel in originals.items():
            setattr(grouped, name, kernel)
    return recorded


def compile_launch(launch, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    from adapterfast.compile_check import _source

    compiled = triton.compile(_source(launch), target=GPUTarget("cuda", arch, 32), options=launch.options)
    ptx = compiled.asm["ptx"]
    return {"kernel": launch.kernel.__name__, "arch": arch, "block_r": launch.constexprs["BLOCK_R"],
            "shared": compiled.metadata.shared, "tensor_cores": "mma" in ptx}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--archs", nargs="+", type=int, default=[80, 90])
    args = parser.parse_args(argv)
    failed = 0
    for dtype in args.dtypes:
        for r in args.ranks:
            for launch in launches(DTYPES[dtype], r):
                for arch in args.archs:
                    try:
                        row = compile_launch(launch, arch)
                    except Exception as error:  # a compile error is the finding, reported per kernel
                        row = {"kernel": launch.kernel.__name__, "arch": arch, "error": str(error)[:500]}
                        failed += 1
                    print(json.dumps({"dtype": dtype, "r": r, **row}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
