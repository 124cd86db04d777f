#pragma once
// The forward and backward drivers for bfloat16 and float16 inputs on brgemm (adapter_brgemm.cpp):
// the same row blocks, fused epilogues and reduction groups as the fp32 drivers, with the three
// GEMMs of a block run by at::native::cpublas::brgemm on 16-bit operands (AMX tiles or AVX512
// BF16/FP16 dot products, fp32 accumulation).
#include <ATen/core/Tensor.h>

#include "adapter_operands.h"
#include "brgemm.h"

namespace adapterfast::cpu {

// The layout the 16-bit drivers run the forward (backward = false) or backward in for x of this
// dtype, or none (then the fp32 block kernels run, with operands converted to fp32). float16 takes
// the layout of its route (fp16_route): bf16's where it is split into bf16, its own where oneDNN's
// float16 kernel runs.
inline BrgemmLayout brgemm_layout_for(at::ScalarType dtype, const Dims& dims, bool backward) {
  if (dtype != at::kHalf) return brgemm_layout(dtype);
  switch (fp16_route(backward, dims.n, dims.r)) {
    case Fp16Route::bf16x3: return brgemm_layout(at::kBFloat16);
    case Fp16Route::native: return brgemm_layout(at::kHalf);
    default: return BrgemmLayout::none;
  }
}

// Whether the 16-bit drivers pack the weights straight from the given tensors, weights in x's
// dtype in the VNNI layout: bf16, or float16 split into bf16 (fp16_route), instead of reading the
// accumulation-type operands (operand_weight) and rounding them back to x's dtype. That float
// round trip (widen, transpose, round) took ~10% of a bf16 training step at N = 8, d = 768 (perf,
// Zen 4), and with the split ~12% of a float16 forward at N = 320, d = 1024, r = 64 (the Xeon).
inline bool packs_given_weights(BrgemmLayout layout, at::ScalarType x_dtype, const at::Tensor& w_down,
                                const at::Tensor& w_up, const Dims& dims, bool backward) {
  if (layout != BrgemmLayout::vnni || w_down.scalar_type() != x_dtype || w_up.scalar_type() != x_dtype) return false;
  return x_dtype == at::kBFloat16 ||
         (x_dtype == at::kHalf && fp16_route(backward, dims.n, dims.r) == Fp16Route::bf16x3);
}

// forward_blocks of adapter_forward.cpp on brgemm, in the layout of brgemm_layout_for; T is
// c10::BFloat16 or c10::Half (float16 products on oneDNN's float16 kernel, or as three bf16
// products where fp16_route says bf16x3).
template <typename T>
void forward_blocks_brgemm(const ForwardOperands& op, BrgemmLayout layout, at::Tensor& y, at::Tensor& h);

// Output columns per brgemm call: a [64, 256] fp32 product (64 KiB) stays in L2 for its epilogue.
constexpr int64_t kOutCols = 256;

// backward_blocks of adapter_backward.cpp on brgemm, one row group per row of `partials`. With
// dropout it sums dw_up = gz^T a; without, g^T a, which the caller multiplies by the scale. The
// two [r, d] sums of each row (dw_up^T, then dw_down, as Partials lays them out) are left blocked
// by column chunk, the layout brgemm accumulates them in: chunks of kOutCols columns, each a dense
// [r, nc] matrix, which the caller sums over the groups and writes the gradients from.
template <typename T>
void backward_blocks_brgemm(const BackwardOperands& op, BrgemmLayout layout, at::Tensor& dx,
                            at::Tensor& partials, at::Tensor& bias_partials);

}  // namespace adapterfast::cpu
