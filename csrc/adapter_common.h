#pragma once
// What the forward and backward drivers share: operand checks, the precision rules of
// adapterfast/reference.py (matmul operands rounded to x's dtype, fp32/float64 accumulation),
// the row-block size, and reading a block of x (or grad_y) rows in the accumulation type.
#include <algorithm>
#include <bit>
#include <cstdint>
#include <optional>
#include <utility>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "block_kernels.h"
#include "convert_rows.h"
#include "matrix_copy.h"

namespace adapterfast::cpu {

// Rows per block: a [64, d] block of x, its output rows and the scratch derived from them stay in
// L2 (d <= 1024) or L3 while the three GEMMs of the block run, and the weights' cache traffic is
// amortised over 64 rows. Fixed, so the backward's reduction order never depends on threads.
constexpr int64_t kBlockRows = 64;

// Rows per forward block: the multiple of `granule` (the rows of the kernels' tiles: 8 for the
// block kernels, 16 for AMX) from kBlockRows down to 16 that gives the thread with the most blocks
// the fewest rows, the largest such, over at most one thread per min_rows_per_thread rows
// (kMinForwardRowsPerThread; fewer for bf16 on AVX-512 dot products: adapter_brgemm.cpp). A
// call with few blocks per thread then has no thread waiting a whole block for another: 320 rows
// were 5 blocks of 64 over 2 threads (3 : 2, with a fifth of the call in OpenMP waits), now 8 of
// 40 or 10 of 32. Each row's result is the same in any block, so unlike the backward's reduction
// groups this may depend on the thread count.
int64_t forward_block_rows(int64_t n, int64_t granule, int64_t min_rows_per_thread);

// Rows a forward thread needs before a second one pays: each thread reads both weights (converted
// per call by the calling thread, so the others fetch them from its cache). Inference, 2 threads
// against 1 on the Xeon (median wall time, fused forward): 32 rows, d = 768, r = 16, fp32: 54.5
// against 31.2 us; 64 rows: 55.2 against 42.0 (fp32), 56.3 against 49.9 (fp16), and d = 1024,
// r = 64, fp32: 219.6 against 187.6; 128 rows, d = 768, r = 16: 78.9 against 80.9.
constexpr int64_t kMinForwardRowsPerThread = 64;

// Whether the single-adapter drivers (every dtype, block kernels and brgemm) write an output of
// `bytes` with non-temporal stores (OutputEpilogue::stream_out): from kStreamTrainingBytes for
// the outputs of a training step (y of a forward whose y feeds a backward, and dx), from
// kStreamInferenceBytes for y of an inference forward. Both were 16 MiB before.
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
// bf16 on the brgemm drivers, same CPU, the module step (autograd.grad of y over x) against the
// 16 MiB threshold, processes alternated, 2 rounds, least wall time: d = 768, r = 16, N = 8192
// (y and dx 12 MiB) 13.1 / 13.8 -> 12.2 / 11.8 ms on 1 thread and 7.5 / 6.7 -> 6.2 / 5.7 ms on
// 2; N = 4096, 2 threads, 3.5 / 3.4 -> 2.8 / 2.5 ms; d = 768, r = 64, N = 4096 15.1 -> 14.2 ms.
constexpr int64_t kStreamTrainingBytes = int64_t(2) << 20;
constexpr int64_t kStreamInferenceBytes = int64_t(6) << 20;

inline bool stream_output(int64_t bytes, bool training) {
  return bytes >= (training ? kStreamTrainingBytes : kStreamInferenceBytes);
}

struct Dims {
  int64_t n;  // rows (tokens)
  int64_t d;  // model width
  int64_t r;  // bottleneck width
};

// Checks x [n, d], w_down [r, d], w_up [d, r] and the optional biases [r], [d]: 2-D x, CPU
// tensors, float32/bfloat16/float16/float64 dtypes (TypeError) and matching shapes (ValueError).
Dims check_operands(const char* op, const at::Tensor& x, const at::Tensor& w_down,
                    const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                    const std::optional<at::Tensor>& b_up);

// Checks a tensor that must be [n, d] like x (residual, grad_y).
void check_like_x(const char* op, const char* name, const at::Tensor& t, const Dims& dims);

// The residual as the forward's epilogue reads it (checked to be [n, d] like x): itself when its
// columns are contiguous, else a copy; a float64 residual of float x is read as fp32 (the float
// kernels read fp32, bf16 and fp16 residuals).
std::optional<at::Tensor> residual_operand(const char* op, const std::optional<at::Tensor>& residual,
                                           const Dims& dims, at::ScalarType acc);

// Checks 0 <= dropout_p < 1.
void check_dropout(const char* op, double dropout_p);

inline at::ScalarType accumulation_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline Kind kind_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return Kind::bf16;
    case at::kHalf: return Kind::f16;
    case at::kDouble: return Kind::f64;
    default: return Kind::f32;
  }
}

// A weight as a matmul operand: rounded to x's dtype (as autocast does), then held in the
// accumulation type, contiguous; `transpose` gives w^T (see block_kernels.h for the layouts).
// w itself when it already is that; a copy by copy_matrix for w in x's dtype or fp32.
at::Tensor operand_weight(const at::Tensor& w, at::ScalarType x_dtype, bool transpose);

constexpr int64_t kParallelWeightElements = int64_t(1) << 15;

// Weight elements (r d each) from which a call's two per-weight passes run side by side on two
// threads even in a call of one row block, whose other thread would otherwise wait for them:
// operand_weights' copies, the brgemm drivers' packs (packs_side_by_side, adapter_brgemm.cpp, with
// the measurements) and the weight gradients written from the sums (adapter_backward.cpp). At
// d = 4096, r = 64 (2^18) each pass reads or writes 0.5-1 MiB. Training on two threads there,
// eager adapter over adapterfast at N = 1 / 8 / 64, the packs alone side by side -> the copies and
// gradients as well (the Xeon, `python -m benchmarks.overhead --r 64 --d 4096 --threads 2`, the two
// builds alternately, two runs each; printed, not saved): float16 0.59x-0.62x / 0.82x / 0.80x-0.81x
// -> 0.75x / 1.02x-1.04x / 0.95x-0.97x; bf16 0.97x-1.00x / 0.82x-0.84x / 0.82x-0.83x ->
// 1.12x-1.15x / 0.96x-0.97x / 0.91x-0.92x; fp32 (no copies, gradients summed in place) unchanged.
constexpr int64_t kSideBySideWeightElements = int64_t(1) << 18;

// f0() and f1(): side by side on two threads of a parallel region of their own where `parallel`
// and there are two threads to spare (not already inside a parallel region), else one after the
// other on the calling thread.
template <typename F0, typename F1>
void side_by_side(bool parallel, F0&& f0, F1&& f1) {
  if (!parallel || at::get_num_threads() < 2 || at::in_parallel_region()) {
    f0();
    f1();
    return;
  }
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) i == 0 ? f0() : f1();
  });
}

// operand_weight of w_down and of w_up. The two copies run side by side on two threads where the
// call has more than one row block (so a parallel region of its own, whose threads would otherwise
// wait for them) and weights of at least kParallelWeightElements elements each, or one block and
// weights of kSideBySideWeightElements. Side by side they took float16 inference at N = 128,
// d = 1024, r = 64 on two threads from 0.77x-0.81x the eager adapter to 0.93x-0.95x, and training
// at N = 320 from 0.96x-0.97x to 1.01x-1.03x (overhead grid, the Xeon; one after the other the two
// widening transposes were ~18% of the samples of that inference call). A call of one block with
// smaller weights would wake the threads for the copies alone: bf16 inference at N = 1-64,
// d = 1024, r = 64 went from 23-43 us to 54-68 us when the brgemm drivers' packing was made side
// by side for every size (a one-block call now packs side by side only from that bound too).
std::pair<at::Tensor, at::Tensor> operand_weights(const at::Tensor& w_down, const at::Tensor& w_up,
                                                  at::ScalarType x_dtype, bool transpose, const Dims& dims);

// Rows up to which the block-kernel backward reads the weights as given and splits its GEMMs by
// columns (backward_by_columns; up to 127 rows at r >= 64: takes_backward_by_columns in
// adapter_backward.cpp), and up to which the forward first did (now kGivenForwardMaxRows):
// reading the weights in x's dtype (project_nt for x Wd^T, project_out on [r, kGivenPanelCols]
// panels of Wu^T widened and transposed as each is needed) instead of converting both into
// transposed accumulation-type copies first. At a few rows those copies are most of the call: at
// 8 rows, d = 1024, r = 64, fp32, the two 256 KiB transposes took ~30 us of a ~100 us inference
// step whose products took ~20 us (perf, the Xeon).
constexpr int64_t kGivenWeightMaxRows = kBlockRows;
constexpr int64_t kGivenPanelCols = 64;

// Rows up to which the block-kernel forward reads both weights as given (forward_given); the
// backward's column-split route (backward_by_columns) stops at kGivenWeightMaxRows. From 65 to
// 128 rows the block route gave each of two threads one or two blocks after making both
// transposed copies. Measured on the Xeon (`python -m benchmarks.overhead --n 65 96 128`, two
// runs each, that route / as given, eager over adapterfast; printed, not saved):
//   fp32 inference, two threads: d = 1024, r = 64: 0.59x-0.84x / 1.24x-1.29x; d = 768, r = 16:
//     0.83x-1.22x / 1.70x-1.86x;
//   fp32 training, two threads: d = 1024, r = 64: 0.75x-1.01x / 0.95x-1.10x; d = 768, r = 16:
//     1.16x-1.73x / 1.40x-1.54x (lower at 128 rows, 1.72x -> 1.53x, still above eager);
//   float16 (d = 1024, r = 64), two threads: inference 0.77x-0.96x / 1.14x-1.36x, training
//     0.85x-1.05x / 1.00x-1.10x; one thread: inference 1.15x-1.24x / 0.97x-1.15x (project_nt
//     widens both 16-bit operands in every tile; 0.97x-1.00x at 128 rows), training unchanged;
//   d = 768, r = 16: float16 on two threads 1.14x-1.42x / 1.98x-2.57x inference, the rest within
//     a few percent.
// Past 128 rows fp32 training on two threads lost (d = 768, r = 16, N = 192-256: 1.60x-1.83x ->
// 1.35x-1.50x), so the block route stays there.
constexpr int64_t kGivenForwardMaxRows = 2 * kBlockRows;

// Rows up to which the block-kernel forward reads the weights as given: kGivenForwardMaxRows, and
// twice as many for weights of kSideBySideWeightElements or more, whose two transposed copies
// (1 MiB each in fp32 at d = 4096, r = 64) cost the block route more. d = 4096, r = 64, the Xeon,
// eager over adapterfast, training 1T / 2T, inference 1T / 2T, block route -> as given up to 512
// rows (`python -m benchmarks.overhead --r 64 --d 4096 --n 192 256 320 512`, a temporary switch,
// two runs each; printed, not saved):
//   fp32: N = 192 0.95x / 0.87x-0.88x / 1.00x / 0.89x-0.91x -> 0.97x-0.98x / 0.93x-0.94x /
//     1.06x-1.08x / 1.14x-1.15x; N = 256 0.96x-0.97x / 1.03x-1.05x / 1.00x-1.02x / 0.90x-0.92x ->
//     0.97x-0.98x / 1.09x-1.10x / 1.03x-1.04x / 1.06x-1.09x; N = 320 within the spread; N = 512
//     inference 1.02x / 1.06x -> 0.93x-0.96x / 0.98x-0.99x;
//   float16 at N = 192 (from 256 rows it takes the split forward): inference 0.93x-0.95x / 0.83x
//     -> 0.88x-0.89x / 0.97x-1.00x, training within the spread.
//
// On kernels with nt_at_full_speed (BLAS, below AVX-512), kBlasGivenForwardMaxRows instead: there
// the block forward pays the two transposed weight copies and, in every block, sgemm's repacking
// of both weights, while forward_given reads them as given in one product each. On the AMD EPYC
// with AVX2 (fp32, r = 64, relu; eager adapter over fused forward, least time per call over 7
// rounds alternating the two bounds in one process; 400 routes every N measured as 384 does;
// before h's columns went over the threads in fixed slices), bound 128 -> 400: d = 1024, one
// thread: N = 129 0.87x -> 1.01x, 192 0.86x -> 1.00x, 320 1.02x -> 1.04x; two threads: 129 0.65x
// -> 0.87x, 192 0.70x -> 0.93x, 320 1.31x -> 1.40x; d = 4096, two threads: 129 0.71x -> 1.23x, 320
// 0.97x -> 1.02x. At N = 512 and 1024 (d = 1024) the blocks won: 0.97x / 1.04x against 0.91x /
// 0.87x on one thread, 1.21x / 1.16x against 1.11x / 1.13x on two. Checked again against blocks
// of 128 rows (blas_block_rows; inference, r = 64, thread CPU time on one thread), bound 100 -> 400:
// d = 4096: N = 192 0.92x / 1.42x -> 1.10x / 1.49x, N = 320 1.16x / 1.12x -> 1.24x / 1.28x;
// d = 1024: N = 192 0.91x / 1.24x -> 1.07x / 1.09x, N = 320 0.94x / 1.12x -> 1.05x / 1.02x.
constexpr int64_t kBlasGivenForwardMaxRows = 6 * kBlockRows;

// Rows per forward block, and the largest backward block (balanced_block_rows, adapter_operands.h),
// on kernels with nt_at_full_speed (BLAS): 2 kBlockRows from r = kBlasLongBlockMinRank, else
// kBlockRows. Every block makes sgemm pack both weights again, and in the backward adds its two
// [r, d] weight-gradient shares to the sums in a pass of their own, with products whose reduction
// runs over the block's rows only; at d = 4096 a block of 64 fp32 rows (1 MiB) already leaves a
// 512 KiB L2, so larger blocks lose little locality. On the AMD EPYC with AVX2 (fp32; eager time
// over fused, one process alternating the block sizes, thread CPU time on one thread / wall time
// on two; printed, not saved), blocks of at most 64 -> 128 rows:
//   backward of a training step, r = 64: d = 4096, N = 320: 0.86x-0.91x / 0.98x-1.02x ->
//     1.01x-1.03x / 1.29x-1.34x; N = 2048: 1.00x-1.12x / 1.03x-1.05x -> 1.12x-1.28x / 1.17x-1.18x;
//     d = 1024, N = 2048: 1.15x / 1.17x -> 1.53x / 1.26x;
//   r = 16 and 32 either way within the spread or worse on two threads (d = 1024, r = 16,
//     N = 8192: 2.00x-2.01x / 2.02x-2.10x -> 1.94x / 1.87x-1.93x; d = 768, N = 2048: 1.58x / 1.60x
//     -> 1.72x / 1.47x; d = 1024, r = 32, N = 2048: 1.43x / 1.54x -> 1.36x / 1.60x);
//   inference, r = 64: N = 8192, d = 4096: 1.09x / 1.36x -> 1.27x / 1.59x; d = 1024: 1.34x / 1.90x
//     -> 1.46x / 1.96x; N = 512, d = 4096: 0.93x / 1.24x-1.30x -> 1.06x / 1.25x-1.27x; r = 16
//     (N = 2048, d = 1024): 2.43x / 2.87x -> 2.40x / 2.85x.
constexpr int64_t kBlasLongBlockMinRank = 64;

inline int64_t blas_block_rows(const Dims& dims) {
  return dims.r >= kBlasLongBlockMinRank ? 2 * kBlockRows : kBlockRows;
}

// Columns per slice of the r-wide products by_column_slices gives kernels with nt_at_full_speed.
constexpr int64_t kBlasSliceCols = 32;

// at::parallel_for's grain where forward_given splits x Wd^T over the threads by rows
// (BlockKernels::nt_by_rows_max_cols; ranges of at least nt_by_rows_min_rows rows, which give the same
// bits however the rows are split): at r <= kBlasSliceCols the
// column slices are one, which left the product on one thread. On the AMD EPYC with AVX2 (fp32, r = 16, two threads, eager adapter
// over fused, one process alternating the routes, printed, not saved), column slice -> rows:
// N = 320, d = 384 inference 1.08x -> 1.30x, training 1.01x -> 1.22x; d = 768 2.00x -> 2.26x /
// 1.72x -> 1.78x; N = 64, d = 768 1.64x -> 1.66x / 1.56x -> 1.57x.
constexpr int64_t kGivenRowGrain = 16;

// Calls fn(c0, c1) for ranges [c0, c1) of `cols` columns, made of whole units of `unit` columns:
// where `spread`, over the threads (at::parallel_for's ranges of units or, with fixed_units, one
// call per unit), else once, fn(0, cols), on the calling thread. `spread` is a function of the
// call's shape, so with fixed_units no product's shape depends on the thread count: kernels with
// nt_at_full_speed (BLAS) need that, since their results for a column may depend on the columns
// computed with it (MKL's dgemm on the AMD EPYC with AVX2 gave some columns other bits in a call
// of 64 columns than in one of their 32).
template <typename Fn>
void by_column_ranges(int64_t cols, int64_t unit, bool spread, bool fixed_units, Fn&& fn) {
  if (!spread) return fn(int64_t(0), cols);
  const int64_t units = (cols + unit - 1) / unit;
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    if (!fixed_units) return fn(u0 * unit, std::min(cols, u1 * unit));
    for (int64_t u = u0; u < u1; ++u) fn(u * unit, std::min(cols, (u + 1) * unit));
  });
}

// by_column_ranges over the r columns of a bottleneck product: ranges of single columns, or with
// fixed_slices (kernels with nt_at_full_speed) one call per slice of kBlasSliceCols.
template <typename Fn>
void by_column_slices(int64_t r, bool spread, bool fixed_slices, Fn&& fn) {
  by_column_ranges(r, fixed_slices ? kBlasSliceCols : 1, spread, fixed_slices, fn);
}

inline int64_t given_forward_max_rows(const Dims& dims, bool nt_at_full_speed) {
  if (nt_at_full_speed) return kBlasGivenForwardMaxRows;
  return dims.r * dims.d >= kSideBySideWeightElements ? 2 * kGivenForwardMaxRows : kGivenForwardMaxRows;
}

// Rows up to which forward_given computes y's columns by project_out_nt, dot products along r
// with the rows of Wu as given, instead of widening and transposing each panel of Wu for
// project_out: kGivenOutNtMaxRows, and twice as many at r >= kGivenOutNtLongRank, where each dot
// product is four or more vectors long. At one row, d = 4096, r = 64, fp32, the transposes took
// 46% of an inference call's samples and project_out 7% (perf, the AMD EPYC). Eager adapter over
// adapterfast, one thread / two, transposed panels -> dot products (the AMD EPYC, in one process
// alternating the two per round, five rounds):
//   fp32 inference: d = 4096, r = 64: N = 1 0.70x / 1.16x -> 1.15x / 1.74x, N = 4 1.29x / 2.13x ->
//     1.78x / 2.82x, N = 8 1.21x / 1.99x -> 1.42x / 2.65x, N = 16 1.19x / 1.84x -> 1.08x / 1.64x;
//     d = 1024, r = 64: N = 1 0.99x / 0.81x -> 1.36x / 1.37x, N = 8 1.46x / 1.91x -> 1.55x /
//     2.12x; d = 768, r = 16: N = 1 1.47x / 1.44x -> 1.60x / 1.61x, N = 4 within 0.05x, N = 8
//     1.48x / 1.65x -> 1.20x / 1.37x (hence 4 rows below kGivenOutNtLongRank);
//   fp32 training, d = 4096, r = 64: N = 1 0.78x / 1.56x -> 0.75x-0.93x / 1.72x-1.75x (two columns
//     of the route at N = 1: the spread of this comparison);
//   bf16 inference, d = 4096, r = 64 (on the block kernels up to 8 rows): N = 1 1.52x / 2.19x ->
//     2.24x / 3.14x, N = 8 0.93x / 1.31x -> 0.98x / 1.51x; d = 1024, r = 64: N = 1 2.39x / 3.02x ->
//     3.09x-3.29x / 4.34x-4.41x.
// From 16 rows the transposed panels win at every shape measured (the figures, with the command's
// description: benchmarks/results/overhead_298c1db_amd.txt).
constexpr int64_t kGivenOutNtMaxRows = 4;
constexpr int64_t kGivenOutNtLongRank = 64;

inline bool forward_out_by_dots(const Dims& dims) {
  return dims.n <= (dims.r >= kGivenOutNtLongRank ? 2 * kGivenOutNtMaxRows : kGivenOutNtMaxRows);
}

// Products (n d r FMAs per GEMM) from which forward_given and backward_by_columns spread each
// GEMM over the threads by columns: an OpenMP region costs a few microseconds to start. Forward,
// inference, 2 threads, median wall time of the module call, spread from 1 product on against
// never (the Xeon, fp32, ad-hoc loop): d = 1024, r = 64: 2 rows 26 / 26 us, 4 rows 28 / 30, 8 rows
// 32 / 41, 16 rows 44 / 71; d = 768, r = 16: 8 rows 20 / 17, 16 rows 24 / 24.
constexpr int64_t kGivenSpreadFmas = int64_t(1) << 18;

// A weight in x's dtype with contiguous rows, as the forward reads the weights as given: itself,
// or rounded to x's dtype (an fp32 weight of 16-bit x: the operand rounding of operand_weight).
at::Tensor weight_in_x_dtype(const at::Tensor& w, at::ScalarType x_dtype);

// A bias in the accumulation type, contiguous (biases are added to fp32 sums unrounded).
std::optional<at::Tensor> operand_bias(const std::optional<at::Tensor>& b, at::ScalarType x_dtype);

// A new contiguous tensor for an [N, d]-sized output (or partial-sum buffer), from
// output_allocator() (output_buffers.h): a buffer of the same size released by an earlier output
// is reused instead of paying the page faults of fresh memory, and a fresh buffer spanning two or
// more 2 MiB pages is advised to use transparent huge pages (ADAPTERFAST_CPU_HUGE_PAGES=0: not).
// Poisoned like Scratch under ADAPTERFAST_CPU_POISON_SCRATCH=1 (scratch.h): every element must be
// written by the op.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// t itself if its columns are contiguous, else a contiguous copy (the one copy non-contiguous
// residuals and gradients cost; x itself is read strided instead).
at::Tensor with_unit_column_stride(const at::Tensor& t);

// Bytes of the dropout keep-mask rows for width d.
inline int64_t keep_row_bytes(int64_t d) { return (d + kKeepAlign - 1) / kKeepAlign * kKeepAlign; }

// v rounded to bfloat16 and back: nearest even, NaN as 0x7FC0 (the value c10::BFloat16 gives),
// written without branches so that loops over it vectorise.
inline float round_to_bfloat16(float v) {
  const uint32_t bits = std::bit_cast<uint32_t>(v);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  return std::bit_cast<float>(v != v ? 0x7FC00000u : rounded);
}

// v rounded to the storage type T (a no-op unless T is narrower than acc_t).
template <typename T, typename acc_t>
inline acc_t round_as(acc_t v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return round_to_bfloat16(v);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return static_cast<float>(c10::Half(v));
  } else {
    return v;
  }
}

// v[k] = round_as<T>(v[k]) * factor for k < n: a row of matmul operands rounded to x's dtype,
// then scaled in acc_t. round_as<Half> is c10::Half's scalar conversion, which does not
// vectorise (the scalar loop was ~5% of a fp16 backward at N = 8192, d = 1024, r = 64), so
// float16 with F16C goes 8 values per instruction, with the same rounding (nearest even).
template <typename T, typename acc_t>
inline void round_row_as(acc_t* __restrict v, acc_t factor, int64_t n) {
  int64_t k = 0;
#if defined(__F16C__) && defined(__AVX__)
  if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<acc_t, float>) {
    const __m256 f = _mm256_set1_ps(factor);
    for (; k + 8 <= n; k += 8) {
      const __m128i half = _mm256_cvtps_ph(_mm256_loadu_ps(v + k), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm256_storeu_ps(v + k, _mm256_mul_ps(_mm256_cvtph_ps(half), f));
    }
  }
#endif
  for (; k < n; ++k) v[k] = round_as<T>(v[k]) * factor;
}


// Rows of a 2-D tensor of T as the block kernels read them: as stored where its columns are
// contiguous (the kernels' *_stored forms widen 16-bit values as they load them), else gathered
// and converted block by block into a scratch buffer.
template <typename T, typename acc_t>
class RowReader {
 public:
  explicit RowReader(const at::Tensor& t)
      : data_(t.data_ptr<T>()),
        row_stride_(t.stride(0)),
        col_stride_(t.size(1) == 1 ? 1 : t.stride(1)),
        width_(t.size(1)),
        kind_(kind_of(t.scalar_type())) {}

  bool as_stored() const { return col_stride_ == 1; }
  Kind kind() const { return kind_; }
  int64_t ld() const { return row_stride_; }
  const T* stored(int64_t row0) const { return data_ + row0 * row_stride_; }

  // Rows [row0, row0 + m) gathered into scratch (m * width values, leading dimension width).
  const acc_t* gathered(int64_t row0, int64_t m, acc_t* scratch) const {
    for (int64_t i = 0; i < m; ++i) {
      const T* src = stored(row0 + i);
      acc_t* dst = scratch + i * width_;
      for (int64_t k = 0; k < width_; ++k) dst[k] = static_cast<acc_t>(src[k * col_stride_]);
    }
    return scratch;
  }

 private:
  const T* data_;
  int64_t row_stride_;
  int64_t col_stride_;
  int64_t width_;
  Kind kind_;
};

// Calls fn(T{}, acc_t{}) for x's dtype: (float, float), (BFloat16, float), (Half, float) or
// (double, double).
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{}, float{});
    case at::kBFloat16: return fn(c10::BFloat16{}, float{});
    case at::kHalf: return fn(c10::Half{}, float{});
    case at::kDouble: return fn(double{}, double{});
    default: TORCH_CHECK_TYPE(false, "adapterfast CPU kernels: unsupported dtype ", dtype);
  }
}

}  // namespace adapterfast::cpu
