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
  // The forward of a training step (its y feeds a backward): see stream_block_output.
  bool training = false;
};

// The forward's output epilogue for y without the per-block pointers (keep, res, out): bias,
// the branch factor scale / (1 - p), the residual's kind and stride, streaming for large y.
template <typename acc_t>
OutputEpilogue<acc_t> forward_epilogue(const ForwardOperands& op, const at::Tensor& y) {
  OutputEpilogue<acc_t> e;
  const bool dropout = op.dropout_p > 0.0;
  e.bias = op.b_up ? op.b_up->data_ptr<acc_t>() : nullptr;
  e.scale = static_cast<acc_t>(dropout ? op.scale / (1.0 - op.dropout_p) : op.scale);
  e.out_kind = kind_of(y.scalar_type());
  e.ld_out = op.dims.d;
  e.ld_keep = keep_row_bytes(op.dims.d);
  e.stream_out = y.nbytes() >= kStreamOutputBytes;
  if (op.residual) {
    e.res_kind = kind_of(op.residual->scalar_type());
    e.ld_res = op.residual->stride(0);
  }
  return e;
}

// Whether the block-kernel drivers (adapter_forward.cpp, adapter_backward.cpp; fp32, and 16-bit
// dtypes where brgemm does not run) write an output of `bytes` with non-temporal stores, instead
// of from kStreamOutputBytes as the brgemm drivers do: from kStreamTrainingBytes for the outputs
// of a training step (y of a forward whose y feeds a backward, and dx), from kStreamInferenceBytes
// for y of an inference forward.
//
// Measured on an AMD EPYC (Zen 4, 1 MiB L2 per core, 32 MiB L3 shared with the VM's other core),
// d = 768, r = 16, fp32, 1 thread, thread CPU time, medians, processes alternated, 3 rounds each,
// load 1.6-2.4 (benchmarks/results/overhead_mid11_amd.txt): with outputs streamed from 2 MiB, the
// step adapter(x).backward(g) at N = 1024 / 2048 / 4096 (y and dx 3 / 6 / 12 MiB) took
// 2.30-2.99 / 4.93-5.20 / 9.64-12.4 ms against 2.80-2.91 / 5.85-6.69 / 12.1-12.5 ms streaming from
// 16 MiB, and with y read once after the forward (y.sum() in the step) 2.53-3.03 / 5.18-5.82 /
// 10.1-12.6 against 2.79-3.31 / 6.14-6.64 / 12.8-13.7 ms; below 2 MiB (N = 512, 1.5 MiB; a 1 MiB
// threshold) streaming gained nothing once y was read. An inference forward followed by a
// read of y (y.sum()) lost 8-10% with y streamed at 1.5-4.5 MiB (N = 512-1536), was even at
// 6 MiB (N = 2048; the forward alone 1.14-1.23 against 1.55-1.67 ms) and gained at 12 MiB
// (2.97-3.83 against 3.8-4.7 ms): its next reader finds y in L3, while (presumably) a training
// step's cached outputs evict the inputs the rest of the step reads (x, g, then x.grad).
constexpr int64_t kStreamTrainingBytes = int64_t(2) << 20;
constexpr int64_t kStreamInferenceBytes = int64_t(6) << 20;

inline bool stream_block_output(int64_t bytes, bool training) {
  return bytes >= (training ? kStreamTrainingBytes : kStreamInferenceBytes);
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
};

// One row group's partial sums: the weight gradients in the accumulation type (rows of the
// `partials` tensor) and the bias gradients in float64 (rows of `bias_partials`). The bias sums
// add one value per row, so in fp32 their error would grow with the rows a group holds (one
// group sums all N rows when N is small: 323 ulps at N = 1024); in float64 it stays below
// fp32's last bit for any N this op sees.
template <typename acc_t>
struct Partials {
  acc_t* dw_up_t;   // [r, d]
  acc_t* dw_down;   // [r, d]
  double* db_up;    // [d]
  double* db_down;  // [r]

  static int64_t size(const Dims& dims) { return (2 * dims.r * dims.d + 15) / 16 * 16; }
  static int64_t bias_size(const Dims& dims) { return dims.d + dims.r; }

  Partials(acc_t* row, double* bias_row, const Dims& dims)
      : dw_up_t(row), dw_down(row + dims.r * dims.d), db_up(bias_row), db_down(bias_row + dims.d) {}
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

}  // namespace adapterfast::cpu
