"""at::native::cpublas::brgemm alone, per call shape: what the 16-bit CPU drivers' GEMMs can reach.

Compiles a small C++ extension (torch.utils.cpp_extension, a few minutes) that times brgemm on
hot operands with the calling thread's CPU time (least of ``--trials``), 1 thread. Rows:

- ``L1`` products (operands in L1): the kernel's own rate on this machine;
- ``same kernel`` / ``two kernels``: the per-call cost, and the cost of switching between two
  kernels (ATen loads the new kernel's AMX tile configuration whenever the kernel changes);
- the call shapes of adapter_brgemm.cpp at N = 8192 row blocks of 64 for ``--shapes d,r``:
  h / da (M = 64, N = r, K = d), u / dx (M = 64, K = r, per 256 columns on B with ldb = d, all d
  columns in one call, or per 64-column panel with ldb = 64) and the weight gradients (M = r, K = 256 rows, per 256 columns).

Compare with ``python -m benchmarks.cpu_paths --ceiling`` (oneDNN's whole matmul in bf16).

    python -m benchmarks.brgemm_calls --dtype bf16 --shapes 1024,64 4096,16 768,64
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from . import machine

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
#include <time.h>
#include <random>
#include <vector>

namespace {
double now() { timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

template <typename T>
double least_seconds(const std::vector<std::vector<int64_t>>& calls, int64_t reps, int64_t trials) {
  int64_t a_size = 64, b_size = 64, c_size = 64;
  for (const auto& c : calls) {
    a_size = std::max(a_size, c[7] + c[0] * c[3] + 64);
    b_size = std::max(b_size, c[8] + c[2] * c[4] * 2 + 64);
    c_size = std::max(c_size, c[9] + c[0] * c[5] + 64);
  }
  std::vector<T> A(a_size), B(b_size);
  std::vector<float> C(c_size);
  std::mt19937 gen(0);
  std::uniform_real_distribution<float> u(-1, 1);
  for (auto& v : A) v = T(u(gen));
  for (auto& v : B) v = T(u(gen));
  auto pass = [&] {
    for (const auto& c : calls)
      at::native::cpublas::brgemm(c[0], c[1], c[2], c[3], c[4], c[5], c[6] != 0, A.data() + c[7], B.data() + c[8],
                                  C.data() + c[9], true);
  };
  pass();
  double best = 1e30;
  for (int64_t t = 0; t < trials; ++t) {
    const double start = now();
    for (int64_t i = 0; i < reps; ++i) pass();
    best = std::min(best, (now() - start) / reps);
  }
  at::native::cpublas::brgemm_release(true);
  return best;
}
}  // namespace

// calls: [M, N, K, lda, ldb, ldc, add_C, a_offset, b_offset, c_offset] each; seconds per pass.
double seconds(std::vector<std::vector<int64_t>> calls, int64_t reps, int64_t trials, bool half) {
  return half ? least_seconds<c10::Half>(calls, reps, trials) : least_seconds<c10::BFloat16>(calls, reps, trials);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("seconds", &seconds); }
"""


def _call(M, N, K, lda, ldb, ldc, add=False, a_off=0, b_off=0, c_off=0):
    return [M, N, K, lda, ldb, ldc, int(add), a_off, b_off, c_off]


def _cases(d: int, r: int):
    blocks = 8
    yield f"h/da  M=64 N={r} K={d} lda={d}, {blocks} row blocks", [
        _call(64, r, d, d, r, r, a_off=i * 64 * d) for i in range(blocks)]
    yield f"u/dx  M=64 K={r}, 256 columns per call, ldb={d}", [
        _call(64, min(256, d - n0), r, r, d, 256, b_off=2 * n0) for n0 in range(0, d, 256)]
    yield f"u/dx  M=64 K={r}, all {d} columns in one call", [_call(64, d, r, r, d, d)]
    yield f"u/dx  M=64 K={r}, 64-column panels, ldb=64", [
        _call(64, min(64, d - n0), r, r, min(64, d - n0), 64, b_off=n0 * r) for n0 in range(0, d, 64)]
    yield f"dW    M={r} K=256, 256 columns per call, ldb={d}", [
        _call(r, min(256, d - n0), 256, 256, d, 256, True, b_off=2 * n0, c_off=r * n0) for n0 in range(0, d, 256)]
    # The same B operands with their rows padded by 16 columns (pairs of rows 4 d + 64 bytes
    # apart): at d = 1024 or 4096 the unpadded pairs of rows are a multiple of 4 KiB apart, so
    # the kernel's B loads along K all fall on one L1 set.
    ldp = d + 16
    yield f"u/dx  M=64 K={r}, 256 columns per call, ldb={ldp}", [
        _call(64, min(256, d - n0), r, r, ldp, 256, b_off=2 * n0) for n0 in range(0, d, 256)]
    yield f"dW    M={r} K=256, 256 columns per call, ldb={ldp}", [
        _call(r, min(256, d - n0), 256, 256, ldp, 256, True, b_off=2 * n0, c_off=r * n0) for n0 in range(0, d, 256)]
    yield f"h/da  M=64 N={r} K={d} lda={ldp}, {blocks} row blocks", [
        _call(64, r, d, ldp, r, r, a_off=i * 64 * ldp) for i in range(blocks)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--shapes", nargs="+", default=["1024,64", "4096,16", "768,64"], metavar="d,r")
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args(argv)
    from torch.utils import cpp_extension

    torch.set_num_threads(1)
    build = os.path.join(tempfile.gettempdir(), "adapterfast_brgemm_calls")
    os.makedirs(build, exist_ok=True)
    ext = cpp_extension.load_inline("adapterfast_brgemm_calls", cpp_sources=[_SOURCE], extra_cflags=["-O2"],
                                    build_directory=build)
    half = args.dtype == "fp16"
    print(f"{machine.cpu_name()}, flags {' '.join(machine.cpu_flags())}, 1 thread, {args.dtype}, "
          f"least thread CPU time of {args.trials} trials")

    def row(name, calls, reps=20):
        t = ext.seconds(calls, reps, args.trials, half)
        flops = sum(2 * c[0] * c[1] * c[2] for c in calls)
        print(f"{name:52s} {len(calls):3d} calls {t * 1e6 / len(calls):8.2f} us/call {flops / t / 1e9:7.1f} GFLOP/s",
              flush=True)

    row("L1  M=32 N=32 K=256", [_call(32, 32, 256, 256, 32, 32)], 200)
    row("L1  M=64 N=64 K=128", [_call(64, 64, 128, 128, 64, 64)], 200)
    row("same kernel: M=16 N=16 K=32", [_call(16, 16, 32, 32, 16, 16)], 2000)
    row("two kernels alternating: 16x16x32, 16x32x32", [_call(16, 16, 32, 32, 16, 16), _call(16, 32, 32, 32, 32, 32)],
        1000)
    for shape in args.shapes:
        d, r = (int(v) for v in shape.split(","))
        for name, calls in _cases(d, r):
            row(name, calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
