#pragma once
// What the grouped backward's drivers share (grouped_backward.cpp: the entry point and the
// block-kernel driver; grouped_backward_brgemm.cpp: the 16-bit driver on brgemm): the operands,
// the unit of reduction work and the layout of its partial sums.
#include <vector>

#include <ATen/core/Tensor.h>

#include "activations.h"
#include "adapter_common.h"
#include "brgemm.h"
#include "grouped_rows.h"
#include "grouped_weights.h"

namespace adapterfast::cpu::grouped {

// One group's partial sums: dw_up^T [r, d], dw_down [r, d], db_up [d], db_down [r].
template <typename acc_t>
struct Partials {
  acc_t* dw_up_t;
  acc_t* dw_down;
  acc_t* db_up;
  acc_t* db_down;

  static int64_t size(const Dims& dims) { return 2 * dims.r * dims.d + dims.d + dims.r; }

  Partials(acc_t* row, const Dims& dims)
      : dw_up_t(row),
        dw_down(row + dims.r * dims.d),
        db_up(row + 2 * dims.r * dims.d),
        db_down(row + 2 * dims.r * dims.d + dims.d) {}
};

// A unit of backward work: a contiguous run of one adapter's blocks, summed into one partials row.
struct Group {
  int64_t adapter;
  std::vector<Block> blocks;
};

struct BackwardOperands {
  Dims dims;
  int64_t adapters;
  at::Tensor grad_y;  // columns contiguous
  at::Tensor x;
  at::Tensor w_down;  // [A, r, d], as given
  at::Tensor w_up;    // [A, d, r], as given
  at::Tensor h;       // [N, r], accumulation type, contiguous
  std::vector<double> scales;  // divided by 1 - p
  bool residual_is_x;
  Activation activation;
  double dropout_p;
  uint64_t seed;
};

// backward_blocks of grouped_backward.cpp on brgemm for 16-bit T (bfloat16, float16): the same
// groups and partials layout, gz rounded to T as the block-kernel driver rounds it.
template <typename T>
void backward_blocks_brgemm(const BackwardOperands& op, BrgemmLayout layout, const Segments& seg,
                            const std::vector<Group>& groups, at::Tensor& dx, at::Tensor& partials);

}  // namespace adapterfast::cpu::grouped
