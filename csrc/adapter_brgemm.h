#pragma once
// The forward and backward drivers for bfloat16 and float16 inputs on brgemm (adapter_brgemm.cpp):
// the same row blocks, fused epilogues and reduction groups as the fp32 drivers, with the three
// GEMMs of a block run by at::native::cpublas::brgemm on 16-bit operands (AMX tiles or AVX512
// BF16/FP16 dot products, fp32 accumulation).
#include <ATen/core/Tensor.h>

#include "adapter_operands.h"
#include "brgemm.h"
#include "gradient_writes.h"

namespace adapterfast::cpu {

// Rows up to which a bf16 forward runs on the block kernels, which read the weights as given
// (forward_given), instead of on brgemm, which first packs both weights into its B layout: at a
// few rows the packing is most of the call. kBf16GivenForwardMaxRows, and twice as many for weights
// of kBf16GivenForwardLargeWeight elements or more. bf16 inference, eager adapter over adapterfast,
// one / two threads, brgemm -> block kernels (the Xeon, `python -m benchmarks.overhead --dtype bf16
// --n ...` with ADAPTERFAST_CPU_BRGEMM=1 and =0, one run each; printed, not saved; brgemm packing
// on the calling thread in the first list, side by side, packs_side_by_side, in the second):
//   d = 1024, r = 64: N = 1 1.78x / 2.38x -> 2.91x / 2.77x, N = 4 1.83x / 2.39x -> 2.17x / 2.68x,
//     N = 8 1.87x / 2.36x -> 1.64x / 2.25x;
//   d = 768, r = 16: N = 1 3.40x / 3.59x -> 3.97x / 3.96x, N = 4 3.36x / 3.51x -> 3.61x / 3.73x,
//     N = 8 3.27x / 3.38x -> 3.15x / 3.48x;
//   d = 4096, r = 16: N = 1 2.16x / 2.50x -> 2.76x / 2.70x, N = 4 2.15x / 2.67x -> 2.39x / 3.08x;
//   d = 4096, r = 64: N = 1 0.81x / 0.92x -> 2.26x / 2.75x, N = 4 1.18x / 0.55x -> 1.50x / 1.71x;
//   r d >= 2^17, N = 8 / 12 / 16: d = 4096, r = 64: 0.88x / 0.83x, 0.85x / 0.90x, 1.01x / 0.80x ->
//     1.09x / 1.22x, 0.98x / 1.03x, 0.87x / 1.00x; d = 2048, r = 64: 1.07x / 1.25x, 1.27x / 1.34x,
//     1.37x / 1.15x -> 1.31x / 1.85x, 1.12x / 1.49x, 0.93x / 1.44x; d = 4096, r = 32: 1.44x / 1.18x,
//     1.25x / 1.00x, 1.34x / 1.01x -> 1.41x / 1.91x, 1.22x / 1.67x, 1.14x / 1.47x.
// From 8 rows brgemm wins at d = 1024 on one thread and the two are close at d = 768; with larger
// weights the block kernels win at 8 rows and lose on one thread from 12.
constexpr int64_t kBf16GivenForwardMaxRows = 4;
constexpr int64_t kBf16GivenForwardLargeWeight = int64_t(1) << 17;

inline bool bf16_forward_on_block_kernels(const Dims& dims) {
  const int64_t bound = dims.r * dims.d >= kBf16GivenForwardLargeWeight ? 2 * kBf16GivenForwardMaxRows
                                                                         : kBf16GivenForwardMaxRows;
  return dims.n <= bound;
}

// Rows up to which a bf16 backward with weights of kSideBySideWeightElements (2^18) elements or
// more runs on the block kernels' column route (backward_by_columns: bf16 rows read as stored, Wd
// as given, the weight gradients written by panel) instead of on brgemm, which packs both weights,
// sums both gradients into fp32 [r, d] partials and rounds them in another pass. bf16 training,
// wall time of the module step, brgemm -> block kernels, one thread / two (the Xeon, `python -m
// benchmarks.overhead --dtype bf16 --r R --d 4096 --n 1 4 8 16`, the two builds alternately, two
// runs each; printed, not saved):
//   d = 4096, r = 64: N = 1 547-548 / 422-426 us -> 501-505 / 380-387, N = 4 573-574 / 436-458 ->
//     559-563 / 400, N = 8 597-641 / 456-492 -> 636-640 / 458-485, N = 16 647-724 / 551-554 ->
//     776-793 / 611-634;
//   d = 4096, r = 16 (2^16): N = 1 147-148 / 155-157 -> 150 / 154-155, N = 8 192-194 / 206-207 ->
//     204-209 / 201-205, N = 16 250-253 / 250-252 -> 260 / 266-267.
// The backward alone (`python -m benchmarks.cpu_paths --dtype bf16 --weights x --paths
// default,brgemm-off`) had the block kernels ahead at d = 4096 up to 16 rows on two threads (0.44
// -> 0.35 ms at r = 64, N = 16); in the module step they are from 8 rows not.
constexpr int64_t kBf16BlockBackwardMaxRows = 4;

inline bool bf16_backward_on_block_kernels(const Dims& dims) {
  return dims.r * dims.d >= kSideBySideWeightElements && dims.n <= kBf16BlockBackwardMaxRows;
}

// The layout the 16-bit drivers run the forward (backward = false) or backward in for x of this
// dtype, or none (then the fp32 block kernels run, with operands converted to fp32). float16 takes
// the layout of its route (fp16_route): bf16's where it is split into bf16, its own where oneDNN's
// float16 kernel runs.
inline BrgemmLayout brgemm_layout_for(at::ScalarType dtype, const Dims& dims, bool backward) {
  if (dtype == at::kBFloat16 && !backward && bf16_forward_on_block_kernels(dims)) return BrgemmLayout::none;
  if (dtype == at::kBFloat16 && backward && bf16_backward_on_block_kernels(dims)) return BrgemmLayout::none;
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

// Whether backward_blocks_brgemm writes the weight gradients itself: a backward of one block (one
// reduction group, one weight-gradient run), except for float16 split into bf16 (fp16_route),
// whose products take three calls per chunk.
bool brgemm_backward_writes_gradients(const Dims& dims, at::ScalarType dtype);

// Rows per block of backward_blocks_brgemm, which the caller needs for its reduction groups:
// kBlockRows, or balanced_block_rows where brgemm runs on AVX512-BF16 dot products.
int64_t brgemm_backward_block_rows(const Dims& dims);

// backward_blocks of adapter_backward.cpp on brgemm, one row group per row of `partials`. With
// dropout it sums dw_up = gz^T a; without, g^T a, which the caller multiplies by the scale. The
// two [r, d] sums of each row (dw_up^T, then dw_down, as Partials lays them out) are left blocked
// by column chunk, the layout brgemm accumulates them in: chunks of kOutCols columns, each a dense
// [r, nc] matrix, which the caller sums over the groups and writes the gradients from.
// Where brgemm_backward_writes_gradients, the caller passes the gradients instead, and it writes
// them itself, chunk by chunk from its products while they are in L2; `partials` is then not read
// or written (it may be empty).
template <typename T>
void backward_blocks_brgemm(const BackwardOperands& op, BrgemmLayout layout, at::Tensor& dx,
                            at::Tensor& partials, at::Tensor& bias_partials, WeightGradients* gradients);

}  // namespace adapterfast::cpu
