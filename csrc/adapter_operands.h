#pragma once
// The operands of one forward or backward call as the block drivers read them (prepared once by
// adapter_forward / adapter_backward), and the layout of the backward's per-group partial sums.
// Shared by the fp32 block-kernel drivers and the brgemm drivers of adapter_brgemm.cpp.
#include <optional>

#include <ATen/core/Tensor.h>

#include "activations.h"
#include "adapter_common.h"

namespace adapterfast::cpu {

struct ForwardOperands {
  Dims dims;
  at::Tensor x;
  at::Tensor w_down_t;  // [d, r], accumulation type
  at::Tensor w_up_t;    // [r, d], accumulation type
  std::optional<at::Tensor> b_down;
  std::optional<at::Tensor> b_up;
  std::optional<at::Tensor> residual;  // columns contiguous
  Activation activation;
  double scale;
  double dropout_p;
  uint64_t seed;
  // The forward of a training step (its y feeds a backward): see stream_output (adapter_common.h).
  bool training = false;
  // The weights as given (contiguous), where the brgemm driver packs them itself
  // (packs_given_weights, adapter_brgemm.h) or the block kernels read them as they are
  // (given_forward_max_rows, in x's dtype); w_down_t and w_up_t are then
  // undefined.
  at::Tensor w_down_given;  // [r, d]
  at::Tensor w_up_given;    // [d, r]
};

// The forward's output epilogue for y without the per-block pointers (keep, res, out): bias,
// the branch factor scale / (1 - p), the residual's kind and stride, streaming (stream_output).
template <typename acc_t>
OutputEpilogue<acc_t> forward_epilogue(const ForwardOperands& op, const at::Tensor& y) {
  OutputEpilogue<acc_t> e;
  const bool dropout = op.dropout_p > 0.0;
  e.bias = op.b_up ? op.b_up->data_ptr<acc_t>() : nullptr;
  e.scale = static_cast<acc_t>(dropout ? op.scale / (1.0 - op.dropout_p) : op.scale);
  e.out_kind = kind_of(y.scalar_type());
  e.ld_out = op.dims.d;
  e.ld_keep = keep_row_bytes(op.dims.d);
  e.stream_out = stream_output(static_cast<int64_t>(y.nbytes()), op.training);
  if (op.residual) {
    e.res_kind = kind_of(op.residual->scalar_type());
    e.ld_res = op.residual->stride(0);
  }
  return e;
}

struct BackwardOperands {
  Dims dims;
  at::Tensor grad_y;  // columns contiguous
  at::Tensor x;
  at::Tensor w_down;  // [r, d], accumulation type
  at::Tensor w_up;    // [d, r], accumulation type
  at::Tensor h;       // [N, r], accumulation type, contiguous
  bool residual_is_x;
  Activation activation;
  double scale;
  double dropout_p;
  uint64_t seed;
  // As in ForwardOperands: set where the brgemm driver packs the bf16 weights itself, and then
  // w_down and w_up are undefined.
  at::Tensor w_down_given;  // [r, d]
  at::Tensor w_up_given;    // [d, r]
};

// One row group's partial sums: the weight gradients in the accumulation type (rows of the
// `partials` tensor) and the bias gradients in float64 (rows of `bias_partials`). The bias sums
// add one value per row, so in fp32 their error would grow with the rows a group holds (one
// group sums all N rows when N is small: 323 ulps at N = 1024); in float64 it stays below
// fp32's last bit for any N this op sees.
template <typename acc_t>
struct Partials {
  // dw_up^T [r, d] where the driver reads g as its B operand (16-bit g, brgemm), dw_up [d, r]
  // where the block kernels broadcast g's elements (g in the accumulation type: backward_blocks).
  acc_t* dw_up;
  acc_t* dw_down;   // [r, d]
  double* db_up;    // [d]
  double* db_down;  // [r]

  static int64_t size(const Dims& dims) { return (2 * dims.r * dims.d + 15) / 16 * 16; }
  static int64_t bias_size(const Dims& dims) { return dims.d + dims.r; }

  Partials(acc_t* row, double* bias_row, const Dims& dims)
      : Partials(row, row + dims.r * dims.d, bias_row, dims) {}
  Partials(acc_t* up, acc_t* down, double* bias_row, const Dims& dims)
      : dw_up(up), dw_down(down), db_up(bias_row), db_down(bias_row + dims.d) {}
};

// Groups per backward: a power of two, at most 32 and the number of blocks, and small enough
// that all partials together stay under a quarter of x's size, but two wherever there are two
// blocks (so a small call still keeps two threads busy; the extra partial costs about 5% of a
// one-thread call). A function of the shape only, so the summation order never depends on the
// thread count.
inline int64_t reduction_groups(const Dims& dims, int64_t blocks, int64_t partial_size) {
  constexpr int64_t kMaxGroups = 32;
  const int64_t by_memory = std::max<int64_t>(2, dims.n * dims.d / 4 / partial_size);
  const int64_t cap = std::min({kMaxGroups, blocks, by_memory});
  int64_t groups = 1;
  while (groups * 2 <= cap) groups *= 2;
  return groups;
}

// The smallest block size balanced_block_rows considers. A floor of 40 rows (320 rows in 8 blocks
// of 40, not 6 of 56) made one fp32 thread at N = 320, d = 4096 0.99x-1.01x -> 0.92x-0.94x of the
// eager adapter's speed (the Xeon): each block adds a pass over the [r, d] weight-gradient sums.
constexpr int64_t kMinBalancedBlockRows = 48;

// Rows per backward block for a call of 2 kBlockRows rows or more: of the block sizes from
// `largest` (kBlockRows, or twice that on the BLAS kernels: adapter_backward.cpp) down to
// largest * kMinBalancedBlockRows / kBlockRows in steps of 8, the one whose largest reduction
// group (reduction_groups) holds the fewest rows, the largest size among equals. Blocks of
// kBlockRows give 192 rows three blocks in two groups, of 64 and 128 rows; blocks of 48 two groups
// of 96. A function of the shape only, so the summation order never depends on the thread count.
inline int64_t balanced_block_rows(const Dims& dims, int64_t largest = kBlockRows) {
  int64_t best = largest;
  int64_t best_load = dims.n + 1;
  for (int64_t rows = largest; rows >= largest * kMinBalancedBlockRows / kBlockRows; rows -= 8) {
    const int64_t blocks = (dims.n + rows - 1) / rows;
    const int64_t groups = reduction_groups(dims, blocks, Partials<float>::size(dims));
    int64_t load = 0;
    for (int64_t group = 0; group < groups; ++group) {
      const int64_t first = group * blocks / groups, end = (group + 1) * blocks / groups;
      load = std::max(load, std::min(dims.n, end * rows) - first * rows);
    }
    if (load < best_load) {
      best = rows;
      best_load = load;
    }
  }
  return best;
}

}  // namespace adapterfast::cpu
