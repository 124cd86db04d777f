#pragma once
// Weight and bias gradients written from the drivers' fp32 (or float64) sums, in the parameters'
// dtypes: scaled, rounded, and for dw_up transposed from the [r, d] sums the drivers keep. Used by
// adapter_backward.cpp for whole gradients, by the block kernels' column route and by the brgemm
// driver's one-run backward for panels of them (WeightGradients).
#include <algorithm>
#include <cstdint>

#include <ATen/core/Tensor.h>

namespace adapterfast::cpu {

// Weight- or bias-gradient sums as the drivers leave them: consecutive chunks of `chunk` columns,
// each a dense [rows, nc] matrix (nc = min(chunk, cols - c0) for the chunk from column c0). The
// brgemm driver's are column-blocked (kOutCols); the block kernels' row-major (chunk = cols).
template <typename acc_t>
struct SumChunks {
  const acc_t* data;
  int64_t rows, cols, chunk;

  static SumChunks row_major(const acc_t* data, int64_t rows, int64_t cols) { return {data, rows, cols, cols}; }

  // fn(src, c0, nc) for each chunk, src its [rows, nc] sums.
  template <typename Fn>
  void each(Fn&& fn) const {
    for (int64_t c0 = 0; c0 < cols; c0 += chunk) fn(data + rows * c0, c0, std::min(chunk, cols - c0));
  }
};

// The [rows, cols] sums (transposed with `transpose`), each multiplied by `factor` in the sums'
// type first, written in out's dtype into out from its column col0 (with `transpose`, from its row
// col0): the whole of a gradient (gradient) or a panel of one (backward_by_columns). One pass over
// the sums: no row-major or transposed fp32 copy first (the column-blocked sums' copy into row
// order, the [d, r] transposition and the rounding were three passes over 256 KiB each, together
// ~17% of the bf16 training step at N = 1, d = 1024, r = 64 under perf on the Xeon).
template <typename acc_t>
void write_gradient(const SumChunks<acc_t>& sums, bool transpose, acc_t factor, at::Tensor& out, int64_t col0);

// A weight or bias gradient in dtype from the [rows, cols] sums (write_gradient).
template <typename acc_t>
at::Tensor gradient(const SumChunks<acc_t>& sums, bool transpose, acc_t factor, at::ScalarType dtype,
                    const at::TensorOptions& options);

// The two weight gradients in the weights' dtypes, dw_down [r, d] and dw_up [d, r], written panel
// by panel from [r, nc] fp32 sums (dw_up's as dw_up^T, multiplied by up_factor): by
// backward_by_columns (panel_gradients) and by the brgemm driver's backward of one run, each panel
// while its sums are still in cache. Panels of different columns may be written concurrently.
struct WeightGradients {
  at::Tensor dw_down, dw_up;
  float up_factor = 1.0f;

  void write(const float* up, const float* down, int64_t c0, int64_t nc) {
    write_up(up, c0, nc);
    write_down(down, c0, nc);
  }
  void write_up(const float* up, int64_t c0, int64_t nc);
  void write_down(const float* down, int64_t c0, int64_t nc);
};

}  // namespace adapterfast::cpu
