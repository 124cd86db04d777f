// The fused backward on CPU. With keep the dropout mask, s = scale / (1 - p) (s = scale without
// dropout) and a = act(h), the chain rule through y = res + s * keep * (a Wu^T + bu) gives
//     gz      = g * keep * s            gradient at the up-projection output     [N, d]
//     db_up   = sum_rows gz             dw_up   = gz^T a                         [d, r]
//     dh      = (gz Wu) * act'(h)       gradient at the pre-activation           [N, r]
//     db_down = sum_rows dh             dw_down = dh^T x                         [r, d]
//     dx      = dh Wd  (+ g when the residual is x)
// Per block of rows, g is read from memory once (without dropout gz is g itself, read as stored,
// with s folded into the small operands; with dropout gz is formed in a block-sized scratch), dh
// and a live in [rows, r] scratch, x is read once (for dw_down) and dx is written once with + g
// fused into the tile epilogue; the [N, d] gz of the formulas never exists.
//
// The weight gradients sum over all rows. Rows are split into a fixed number of contiguous groups
// (a function of the problem size only), each group accumulates fp32 partials block after block,
// and the partials are summed in group order at the end: the result is bitwise the same for any
// thread count and any run.
#include "adapter_ops.h"

#include <algorithm>
#include <array>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>

#include "activations.h"
#include "adapter_common.h"
#include "adapter_operands.h"
#include "adapter_brgemm.h"
#include "dx_epilogue.h"
#include "gradient_writes.h"
#include "parallel_tasks.h"
#include "philox.h"
#include "scratch.h"

namespace adapterfast::cpu {
namespace {

// col_sums[k] += block_sums[k] * factor, in double.
template <typename acc_t>
void add_scaled_sums(const acc_t* __restrict block_sums, acc_t factor, int64_t d, double* __restrict col_sums) {
  for (int64_t k = 0; k < d; ++k) col_sums[k] += static_cast<double>(block_sums[k]) * static_cast<double>(factor);
}

// gz[k] = round(g[k] * factor * keep[k]), col_sums[k] += the unrounded value: one row of the
// dropout backward's gz. Restrict-qualified so the compiler vectorises it; float16 with F16C 8
// columns at a time (c10::Half's conversions are scalar bit manipulation the compiler leaves
// scalar), the same products, sums and roundings (to nearest even) as the scalar loop.
template <typename T, typename acc_t>
void scale_row(const T* __restrict g, const uint8_t* __restrict keep, acc_t factor, int64_t d,
               acc_t* __restrict gz, double* __restrict col_sums) {
  int64_t k = 0;
#if defined(__F16C__) && defined(__AVX__)
  if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<acc_t, float>) {
    const __m256 f = _mm256_set1_ps(factor);
    for (; k + 8 <= d; k += 8) {
      const __m256i kept = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(keep + k)));
      const __m256 scale = _mm256_and_ps(f, _mm256_castsi256_ps(_mm256_cmpgt_epi32(kept, _mm256_setzero_si256())));
      const __m256 v =
          _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + k))), scale);
      _mm256_storeu_pd(col_sums + k, _mm256_add_pd(_mm256_loadu_pd(col_sums + k), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
      _mm256_storeu_pd(col_sums + k + 4,
                       _mm256_add_pd(_mm256_loadu_pd(col_sums + k + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
      _mm256_storeu_ps(gz + k, _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    }
  }
#endif
  for (; k < d; ++k) {
    const acc_t v = static_cast<acc_t>(g[k]) * (keep[k] ? factor : acc_t(0));
    col_sums[k] += v;
    gz[k] = round_as<T>(v);
  }
}

// One row of the bottleneck: dh = fold * da * act'(h), summed unrounded into db_down, and dh and
// a = fold * act(h) rounded to T as matmul operands (a rounded before the fold). Restrict-qualified
// so it vectorises.
template <typename T, typename acc_t, typename Act>
void activation_backward_row(Act f, const acc_t* __restrict h, const acc_t* __restrict da, acc_t fold,
                             int64_t r, acc_t* __restrict dh, acc_t* __restrict a,
                             double* __restrict db_down) {
  for (int64_t j = 0; j < r; ++j) {
    const acc_t dh_value = backprop(f, h[j], fold * da[j]);
    db_down[j] += dh_value;
    dh[j] = dh_value;
    a[j] = f.value(h[j]);
  }
  round_row_as<T>(dh, acc_t(1), r);
  round_row_as<T>(a, fold, r);
}

// Rows per block of the block-kernel backward. Below 2 kBlockRows rows two blocks, so that a call
// of 33 to 127 rows keeps two threads busy (two reduction groups, or backward_by_columns' two bias
// sums): of half kBlockRows up to kBlockRows rows, above it half the rows each (rounded up), where
// blocks of half kBlockRows gave 65 rows a third block of one row and 96 rows a third of 32, both
// left to one thread. From 2 kBlockRows rows, balanced_block_rows (adapter_operands.h):
// kBlockRows gave 192 rows three blocks in two groups, one of 64 rows and one of 128, where
// blocks of 48 make two groups of 96. A function of the shape only.
// Each block adds a pass over the [r, d] weight-gradient sums, so one thread pays for the smaller
// blocks: training, eager adapter over adapterfast, two threads / one, blocks of kBlockRows ->
// balanced (the Xeon, `python -m benchmarks.overhead --r 64 --n 192 320 448`, the two builds
// alternately, two runs each; printed, not saved): fp32, d = 4096: N = 192 0.94x-0.97x /
// 0.96x-0.97x -> 1.07x / 0.94x, N = 320 0.95x-0.98x / 0.98x -> 0.99x / 0.98x-0.99x; d = 1024:
// N = 192 1.01x-1.03x -> 1.13x-1.14x, 320 1.10x-1.11x -> 1.15x, 448 1.15x-1.17x -> 1.23x-1.24x on
// two threads, one unchanged; float16, d = 4096, N = 192: 0.78x -> 0.88x / 0.84x-0.85x -> 0.83x.
// The brgemm driver balances its blocks from 2 kBlockRows rows the same way on AVX512-BF16 dot
// products, and keeps kBlockRows on AMX tiles (brgemm_backward_block_rows). Two blocks of half the
// rows from 33 to 127 rows, as here, made its bf16 training step slower on one thread on the
// Xeon (d = 4096, r = 64, N = 40 / 64: 803-843 / 967-1070 us -> 1060-1170 / 1160-1190 us;
// d = 1024, N = 40: 230-242 -> 289 us) and gained nothing beyond the spread on two (N = 65:
// 923-953 -> 906-950 us). On AVX512-BF16 dot products (the AMD EPYC, d = 4096, r = 64, in one
// process alternately) they gained up to 0.11x of the eager adapter's time on two threads, none
// at 64 rows, and cost up to 0.04x on one (benchmarks/results/overhead_298c1db_amd.txt): the two
// [r, d] fp32 partials they add cost about what the second thread saves. Measured again there
// as kBlockRows blocks' time over half blocks' time, in one process alternately (least and median
// round; benchmarks/results/overhead_balanced_amd.txt): two threads 0.96x-1.04x at 80-127 rows,
// 1.22x-1.43x only at 66, one thread 0.92x-1.06x. On the BLAS kernels the balanced blocks start
// from blas_block_rows (adapter_common.h).
template <typename acc_t>
int64_t backward_block_rows(const Dims& dims) {
  const int64_t n = dims.n;
  if (n < 2 * kBlockRows) return n > kBlockRows ? (n + 1) / 2 : kBlockRows / 2;
  return balanced_block_rows(dims, block_kernels<acc_t>().nt_at_full_speed ? blas_block_rows(dims) : kBlockRows);
}

// sums[k] = rows[0][k] + rows[1][k] + ... in row order, in acc_t: a block's column sums of g where
// accumulate_outer_stored does not read g as its B operand (and so cannot sum it on the way).
template <typename acc_t>
void column_sums(int64_t m, int64_t d, const acc_t* __restrict rows, int64_t ld, acc_t* __restrict sums) {
  std::fill(sums, sums + d, acc_t(0));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t k = 0; k < d; ++k) sums[k] += rows[i * ld + k];
  }
}

// Whether backward_by_columns sums dw_up as [d, r] (Partials::dw_up): where g is in the
// accumulation type the kernels can broadcast its elements against a's rows, the same products in
// the same order per element as summing dw_up^T [r, d] with g as the B operand, and no
// transposition at the end (a pass over [r, d] that was ~10% of a backward at 8 rows, d = 1024,
// r = 64). Not in backward_blocks: over many rows the tiles' strided reads of g's columns made the
// fp32 module step at N = 8192, r = 16 1.15x-1.25x slower than streaming g's rows as the B operand
// (benchmarks/results/cpu_fp32_orientation_xeon.txt). 16-bit g stays the B operand everywhere.
template <typename T, typename acc_t>
constexpr bool kUpByRows = std::is_same_v<T, acc_t>;

// The shares of m rows in dw_up and db_up, columns [k0, k0 + kc) of d: gz the rows' g (kFold: as
// stored, s folded into a) or their gz in scratch (ld_gz apart), a their [m, r] a; dw_up summed as
// [d, r] with kByRows (kUpByRows), else as dw_up^T [r, d]. up: where the share of column k0 goes
// (row k0 of [d, r] sums, or column k0 of [r, d] sums whose rows are ld_up apart).
template <typename T, typename acc_t, bool kFold, bool kByRows>
void add_up_share(const BlockKernels<acc_t>& kernels, const Dims& dims, int64_t m, int64_t k0, int64_t kc,
                  const void* gz, Kind gz_kind, int64_t ld_gz, const acc_t* a, acc_t factor, acc_t* up, int64_t ld_up,
                  double* db_up, acc_t* block_sums, bool accumulate) {
  const int64_t r = dims.r;
  const char* gz_cols = static_cast<const char*>(gz) + k0 * kind_bytes(gz_kind);
  if constexpr (kByRows) {
    static_assert(kUpByRows<T, acc_t>);
    const acc_t* rows = reinterpret_cast<const acc_t*>(gz_cols);
    kernels.accumulate_outer_stored(m, kc, r, rows, ld_gz, a, kAccKind<acc_t>, r, up, r, nullptr, accumulate);
    if constexpr (kFold) column_sums(m, kc, rows, ld_gz, block_sums + k0);
  } else {
    kernels.accumulate_outer_stored(m, r, kc, a, r, gz_cols, gz_kind, ld_gz, up, ld_up,
                                    kFold ? block_sums + k0 : nullptr, accumulate);
  }
  if constexpr (kFold) add_scaled_sums(block_sums + k0, factor, kc, db_up + k0);
}

// kFold: there is no dropout, so gz = s g with s folded into the [rows, r] operands, and g itself
// serves as gz, read as stored by the kernels (16-bit values widened as their tiles load them).
// db_up is then s times g's column sums, taken per block in the accumulation type and added in
// double, instead of a double add per element. Each group's first block writes its weight-gradient
// sums, the later ones add to them.
template <typename T, typename acc_t, bool kFold>
void backward_blocks(const BackwardOperands& op, at::Tensor& dx, const std::vector<Partials<acc_t>>& group_sums) {
  const BlockKernels<acc_t>& kernels = block_kernels<acc_t>();
  const auto [n, d, r] = op.dims;
  const RowReader<T, acc_t> x_rows(op.x);
  const Kind kind = x_rows.kind();
  const T* g_data = op.grad_y.data_ptr<T>();
  const int64_t ld_g = op.grad_y.stride(0);
  const acc_t* w_down = op.w_down.data_ptr<acc_t>();
  const acc_t* w_up = op.w_up.data_ptr<acc_t>();
  const acc_t* h_data = op.h.data_ptr<acc_t>();
  T* dx_data = dx.data_ptr<T>();
  const bool dropout = op.dropout_p > 0.0;
  const uint32_t threshold = philox::threshold(op.dropout_p);
  const acc_t factor = static_cast<acc_t>(dropout ? op.scale / (1.0 - op.dropout_p) : op.scale);
  const int64_t ld_keep = keep_row_bytes(d);
  const int64_t rows = backward_block_rows<acc_t>(op.dims);
  const int64_t blocks = (n + rows - 1) / rows;
  const int64_t groups = static_cast<int64_t>(group_sums.size());

  const OutputEpilogue<acc_t> epilogue = dx_epilogue<acc_t>(op.grad_y, ld_g, dx);

  parallel_tasks(groups, [&](TaskQueue& tasks) {
    Scratch<acc_t> gz(kFold ? 0 : rows * d);
    std::vector<acc_t> block_sums(kFold ? d : 0);
    Scratch<acc_t> x_scratch(x_rows.as_stored() ? 0 : rows * d);
    Scratch<acc_t> da(rows * r);
    Scratch<acc_t> a(rows * r);
    Scratch<acc_t> dh(rows * r);
    Scratch<uint8_t> keep(dropout ? rows * ld_keep : 0);
    OutputEpilogue<acc_t> e = epilogue;
    for (int64_t group = tasks.next(); group >= 0; group = tasks.next()) {
      const Partials<acc_t>& sums = group_sums[group];
      std::fill(sums.db_up, sums.db_up + d, 0.0);
      std::fill(sums.db_down, sums.db_down + r, 0.0);
      const int64_t first = group * blocks / groups, end = (group + 1) * blocks / groups;
      for (int64_t block = first; block < end; ++block) {
        const int64_t row0 = block * rows;
        const int64_t m = std::min(rows, n - row0);
        const T* g_rows = g_data + row0 * ld_g;
        const bool accumulate = block > first;

        // gz = g * keep * s. Without dropout (kFold) the kernels read g as stored and s is folded
        // into a and dh. With dropout gz is formed in scratch, rounded to x's dtype as a matmul
        // operand, and db_up sums it unrounded.
        acc_t fold = factor;
        if constexpr (!kFold) {
          fold = 1;
          kernels.dropout_keep(op.seed, threshold, row0, m, d, keep.data(), ld_keep);
          for (int64_t i = 0; i < m; ++i) {
            scale_row<T>(g_rows + i * ld_g, keep.data() + i * ld_keep, factor, d, gz.data() + i * d, sums.db_up);
          }
        }

        // dh = (gz Wu) * act'(h); a = act(h) recomputed from the saved pre-activation.
        if constexpr (kFold) {
          kernels.project_in_stored(m, r, d, g_rows, kind, ld_g, w_up, r, da.data(), r);
        } else {
          kernels.project_in(m, r, d, gz.data(), d, w_up, r, da.data(), r);
        }
        const acc_t* hb = h_data + row0 * r;
        visit<acc_t>(op.activation, [&](auto f) {
          for (int64_t i = 0; i < m; ++i) {
            activation_backward_row<T>(f, hb + i * r, da.data() + i * r, fold, r, dh.data() + i * r,
                                       a.data() + i * r, sums.db_down);
          }
        });

        if constexpr (kFold) {
          add_up_share<T, acc_t, true, false>(kernels, op.dims, m, 0, d, g_rows, kind, ld_g, a.data(), factor,
                                              sums.dw_up, d, sums.db_up, block_sums.data(), accumulate);
        } else {
          add_up_share<T, acc_t, false, false>(kernels, op.dims, m, 0, d, gz.data(), kAccKind<acc_t>, d, a.data(),
                                               factor, sums.dw_up, d, sums.db_up, nullptr, accumulate);
        }
        if (x_rows.as_stored()) {
          kernels.accumulate_outer_stored(m, r, d, dh.data(), r, x_rows.stored(row0), kind, x_rows.ld(), sums.dw_down,
                                          d, nullptr, accumulate);
        } else {
          const acc_t* xb = x_rows.gathered(row0, m, x_scratch.data());
          kernels.accumulate_outer_stored(m, r, d, dh.data(), r, xb, kAccKind<acc_t>, d, sums.dw_down, d, nullptr,
                                          accumulate);
        }

        e.res = op.residual_is_x ? g_data + row0 * ld_g : nullptr;
        e.out = dx_data + row0 * d;
        kernels.project_out(m, r, d, dh.data(), r, w_down, d, e);
      }
    }
  });
}

// Whether the block-kernel backward runs backward_by_columns: up to kGivenWeightMaxRows rows, and
// below 2 kBlockRows where r >= kByColumnsMinRank. There its one set of weight-gradient sums, where
// backward_blocks keeps one per block, pays off. fp32 training, eager adapter over adapterfast at
// N = 65 / 96 / 120, one thread and two, two blocks of backward_blocks -> backward_by_columns (the
// Xeon, `python -m benchmarks.overhead --n 65 96 120`, a temporary switch, two runs each; printed,
// not saved): d = 1024, r = 64: 0.94x-0.99x / 0.95x-0.96x, 0.98x-1.01x / 1.03x-1.05x,
// 1.00x-1.03x / 1.02x-1.11x -> 1.06x / 1.01x-1.18x, 1.06x / 1.00x-1.09x, 1.04x-1.05x /
// 1.08x-1.13x; d = 768, r = 64: 0.97x / 1.02x-1.03x, 1.02x-1.05x / 1.08x-1.10x, 1.02x-1.05x /
// 1.13x-1.14x -> 1.05x-1.07x / 1.14x-1.16x, 1.07x-1.08x / 1.12x-1.20x, 1.06x / 1.05x-1.22x.
// At r = 32 the columns route was faster on one thread and slower on two (d = 768 and 1024:
// 1.09x-1.16x / 1.13x-1.33x -> 1.16x-1.24x / 0.98x-1.20x), at r = 16 slower on two (d = 768:
// 1.43x-1.56x -> 1.12x-1.21x, d = 4096: 1.14x-1.30x -> 0.88x-0.94x): its first phase splits da's
// r columns over the threads. float16 at d = 1024, r = 64 was within the runs' spread (0.99x-1.11x
// either way). At d = 4096, r = 64 both routes stay under the eager adapter at 65 rows (0.87x-1.00x).
constexpr int64_t kByColumnsMinRank = 64;

bool takes_backward_by_columns(const Dims& dims) {
  if (dims.n <= 0) return false;
  return dims.n <= kGivenWeightMaxRows || (dims.n < 2 * kBlockRows && dims.r >= kByColumnsMinRank);
}

// Columns per panel of backward_by_columns' gradients: four of accumulate_outer's 48-column tiles
// (64 left a 16-column tile per panel); at r = 64 its three [r, 192] fp32 buffers take 144 KiB.
// float16 training at d = 4096, r = 64, wall time of `python -m benchmarks.overhead --n 1 64 100`
// per panel width, one thread / two, two runs (the Xeon; printed, not saved): N = 64: 64 columns
// 2.06-2.07 / 1.23-1.40 ms, 96 1.90-1.91 / 1.16-1.32, 192 1.82-1.87 / 1.25-1.27, 384 1.81-1.85 /
// 1.19-1.27; N = 100: 2.91-2.93 / 1.70-1.72, 2.68-2.71 / 1.59-1.79, 2.58-2.59 / 1.50-1.64,
// 2.58 / 1.52-1.67; N = 1 within 461-491 / 381-389 us at every width.
constexpr int64_t kGradientPanelCols = 192;

// Columns per panel of backward_by_columns on BLAS (nt_at_full_speed), where each panel is one call of
// its own (by_column_ranges' fixed units, so that no product's shape depends on the thread count): 128
// divides the usual widths (768, 1024, 4096), which 192 splits into two threads' shares of unequal
// width (d = 1024: 576 and 448 columns). fp32, r = 64, two threads, training, eager adapter over fused
// (the AMD EPYC with AVX2, one process alternating the two through a temporary switch, medians of 9
// rounds, printed, not saved), 192 -> 128: N = 64, d = 1024 1.40x -> 1.48x; N = 100, d = 1024 1.30x-1.33x
// -> 1.37x-1.38x, d = 4096 1.34x -> 1.38x, d = 768 1.35x -> 1.39x; N = 64, d = 4096 within the spread;
// one thread the same either way. (Earlier, widths of 128, 192, 256 and 512 had measured within the
// spread of each other at N = 1-100, d = 1024 and 4096, with a busier machine.)
constexpr int64_t kBlasGradientPanelCols = 128;

// The backward of a call that takes_backward_by_columns (two blocks of backward_block_rows, or
// one), in three phases that each go over the threads by columns, where
// backward_blocks would give such a call one thread per block:
//   1. da = gz Wu, by columns of da (r);
//   2. dh, a and db_down, row by row ([n, r]);
//   3. by columns of d: the blocks' shares of dw_up and db_up and of dw_down, added block after
//      block, and dx.
// block_sums has one entry per block, all with the same weight-gradient sums and each with its
// own bias row (summed by the caller). The shares are added in block order, the bias sums kept
// per block, and splitting by columns leaves each element's arithmetic as it is: bitwise the
// results of backward_blocks with one group per block, for any thread count.
// With `gradients` (16-bit x: panel_gradients), phase 3 goes by panels of kGradientPanelCols
// columns, each summed into a scratch that stays in cache and written to the gradients in their
// dtypes as soon as it is complete, and Wd is read as given (op.w_down_given, in x's dtype), each
// panel widened just before its dx product; block_sums then carry only the bias rows.
template <typename T, typename acc_t, bool kFold>
void backward_by_columns(const BackwardOperands& op, at::Tensor& dx, const std::vector<Partials<acc_t>>& block_sums,
                         WeightGradients* gradients) {
  const BlockKernels<acc_t>& kernels = block_kernels<acc_t>();
  const auto [n, d, r] = op.dims;
  const RowReader<T, acc_t> x_rows(op.x);
  const Kind kind = x_rows.kind();
  const T* g_data = op.grad_y.data_ptr<T>();
  const int64_t ld_g = op.grad_y.stride(0);
  const acc_t* w_up = op.w_up.data_ptr<acc_t>();
  const acc_t factor = static_cast<acc_t>(kFold ? op.scale : op.scale / (1.0 - op.dropout_p));
  const int64_t rows = backward_block_rows<acc_t>(op.dims);
  const int64_t blocks = static_cast<int64_t>(block_sums.size());
  const int64_t ld_keep = keep_row_bytes(d);
  const bool spread = n * d * r >= kGivenSpreadFmas;
  // On BLAS one call per panel (by_column_ranges' fixed units) of kBlasGradientPanelCols.
  const int64_t panel_cols = kernels.nt_at_full_speed ? kBlasGradientPanelCols : kGivenPanelCols;
  // Calls fn(k0, k1) for column ranges [k0, k1) of d, whole panels each, over the threads.
  const auto by_panels = [&](auto&& fn) { by_column_ranges(d, panel_cols, spread, kernels.nt_at_full_speed, fn); };
  for (const Partials<acc_t>& sums : block_sums) {
    std::fill(sums.db_up, sums.db_up + d, 0.0);
    std::fill(sums.db_down, sums.db_down + r, 0.0);
  }

  Scratch<acc_t> gz(kFold ? 0 : n * d);
  if constexpr (!kFold) {
    Scratch<uint8_t> keep(n * ld_keep);
    kernels.dropout_keep(op.seed, philox::threshold(op.dropout_p), 0, n, d, keep.data(), ld_keep);
    by_panels([&](int64_t k0, int64_t k1) {
      for (int64_t i = 0; i < n; ++i) {
        scale_row<T>(g_data + i * ld_g + k0, keep.data() + i * ld_keep + k0, factor, k1 - k0, gz.data() + i * d + k0,
                     block_sums[i / rows].db_up + k0);
      }
    });
  }

  Scratch<acc_t> da(n * r);
  by_column_slices(r, spread, kernels.nt_at_full_speed, [&](int64_t j0, int64_t j1) {
    if constexpr (kFold) {
      kernels.project_in_stored(n, j1 - j0, d, g_data, kind, ld_g, w_up + j0, r, da.data() + j0, r);
    } else {
      kernels.project_in(n, j1 - j0, d, gz.data(), d, w_up + j0, r, da.data() + j0, r);
    }
  });
  Scratch<acc_t> a(n * r);
  Scratch<acc_t> dh(n * r);
  const acc_t* h_data = op.h.data_ptr<acc_t>();
  visit<acc_t>(op.activation, [&](auto f) {
    for (int64_t i = 0; i < n; ++i) {
      activation_backward_row<T>(f, h_data + i * r, da.data() + i * r, kFold ? factor : acc_t(1), r, dh.data() + i * r,
                                 a.data() + i * r, block_sums[i / rows].db_down);
    }
  });

  Scratch<acc_t> x_scratch(x_rows.as_stored() ? 0 : n * d);
  const void* x_data = x_rows.as_stored() ? static_cast<const void*>(x_rows.stored(0)) : x_rows.gathered(0, n, x_scratch.data());
  const Kind x_kind = x_rows.as_stored() ? kind : kAccKind<acc_t>;
  const int64_t ld_x = x_rows.as_stored() ? x_rows.ld() : d;
  std::vector<acc_t> column_sums(kFold ? d : 0);
  OutputEpilogue<acc_t> e = dx_epilogue<acc_t>(op.grad_y, ld_g, dx);
  e.res = op.residual_is_x ? g_data : nullptr;
  e.out = dx.data_ptr();
  // The blocks' shares of columns [k0, k0 + kc): dw_up's into `up` (row k0 of [d, r] sums, or
  // column k0 of [r, d] sums with rows ld apart), dw_down's into `down` (column k0, rows ld apart).
  const auto add_shares = [&](int64_t k0, int64_t kc, acc_t* up, acc_t* down, int64_t ld) {
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t row0 = block * rows;
      const int64_t m = std::min(rows, n - row0);
      double* db_up = block_sums[block].db_up;
      if constexpr (kFold) {
        add_up_share<T, acc_t, true, kUpByRows<T, acc_t>>(kernels, op.dims, m, k0, kc, g_data + row0 * ld_g, kind, ld_g,
                                                          a.data() + row0 * r, factor, up, ld, db_up,
                                                          column_sums.data(), block > 0);
      } else {
        add_up_share<T, acc_t, false, kUpByRows<T, acc_t>>(kernels, op.dims, m, k0, kc, gz.data() + row0 * d,
                                                           kAccKind<acc_t>, d, a.data() + row0 * r, factor, up, ld,
                                                           db_up, nullptr, block > 0);
      }
      const char* x_cols = static_cast<const char*>(x_data) + (row0 * ld_x + k0) * kind_bytes(x_kind);
      kernels.accumulate_outer_stored(m, r, kc, dh.data() + row0 * r, r, x_cols, x_kind, ld_x, down, ld, nullptr,
                                      block > 0);
    }
  };
  by_panels([&](int64_t k0, int64_t k1) {
    if (gradients == nullptr) {
      const Partials<acc_t>& sums = block_sums[0];
      add_shares(k0, k1 - k0, kUpByRows<T, acc_t> ? sums.dw_up + k0 * r : sums.dw_up + k0, sums.dw_down + k0, d);
      kernels.project_out(n, r, k1 - k0, dh.data(), r, op.w_down.data_ptr<acc_t>() + k0, d, e.from_column(k0));
      return;
    }
    if constexpr (!kUpByRows<T, acc_t>) {
      const T* w_down = op.w_down_given.data_ptr<T>();
      Scratch<acc_t> up(r * kGradientPanelCols), down(r * kGradientPanelCols), w_panel(r * kGradientPanelCols);
      for (int64_t c0 = k0; c0 < k1; c0 += kGradientPanelCols) {
        const int64_t cc = std::min(kGradientPanelCols, k1 - c0);
        add_shares(c0, cc, up.data(), down.data(), cc);
        gradients->write(up.data(), down.data(), c0, cc);
        for (int64_t j = 0; j < r; ++j) widen_row(w_down + j * d + c0, w_panel.data() + j * cc, cc);
        kernels.project_out(n, r, cc, dh.data(), r, w_panel.data(), cc, e.from_column(c0));
      }
    }
  });
}

// parts[0][k] += parts[1][k] + ... for k < size, added in group order (parallel over elements, so
// the order per element never changes).
template <typename acc_t>
void sum_into_first(const std::vector<acc_t*>& parts, int64_t size) {
  if (parts.size() < 2) return;
  acc_t* total = parts[0];
  at::parallel_for(0, size, 4096, [&](int64_t begin, int64_t end) {
    for (size_t group = 1; group < parts.size(); ++group) {
      const acc_t* part = parts[group];
      for (int64_t k = begin; k < end; ++k) total[k] += part[k];
    }
  });
}

// Sums the groups' rows of `partials` into the first, in group order, and returns that row.
template <typename acc_t>
const acc_t* sum_partials(at::Tensor& partials) {
  std::vector<acc_t*> rows;
  for (int64_t group = 0; group < partials.size(0); ++group) {
    rows.push_back(partials.data_ptr<acc_t>() + group * partials.size(1));
  }
  sum_into_first(rows, partials.size(1));
  return rows[0];
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up,
    const std::optional<at::Tensor>& b_down, const std::optional<at::Tensor>& b_up, const at::Tensor& h,
    c10::string_view activation, double scale, double dropout_p, int64_t seed, bool residual_is_x) {
  constexpr const char* kOp = "adapterfast_cpu::backward";
  const Dims dims = check_operands(kOp, x, w_down, b_down, w_up, b_up);
  check_dropout(kOp, dropout_p);
  check_like_x(kOp, "grad_y", grad_y, dims);
  const at::ScalarType dtype = x.scalar_type();
  const at::ScalarType acc = accumulation_type(dtype);
  TORCH_CHECK_TYPE(grad_y.scalar_type() == dtype, kOp, ": grad_y must have x's dtype ", dtype,
                   ", got ", grad_y.scalar_type());
  TORCH_CHECK_VALUE(h.dim() == 2 && h.size(0) == dims.n && h.size(1) == dims.r, kOp,
                    ": h must be [", dims.n, ", ", dims.r, "], got ", h.sizes());

  const BrgemmLayout layout = dims.n == 0 ? BrgemmLayout::none : brgemm_layout_for(dtype, dims, /*backward=*/true);
  const bool given = packs_given_weights(layout, dtype, w_down, w_up, dims, /*backward=*/true);
  // A call on the block kernels' column route with 16-bit x: Wd read as given and the weight
  // gradients written panel by panel (backward_by_columns), where before both weights were widened
  // into fp32 copies and both gradients summed into fp32 [r, d] partials, rounded in another pass
  // (under perf at N = 1, d = 4096, r = 64, float16: the widening, rounding and transposing took
  // 27% of the backward's samples, its products 20%). The same bits; float16 training, eager
  // adapter over adapterfast, one thread / two, before -> after (the Xeon, `python -m
  // benchmarks.overhead --dtype fp16 --r 64 --d 4096 1024 --n 1 8 16 64 100`, the two builds
  // alternately, two runs each; printed, not saved): d = 4096: N = 1 0.73x-0.74x / 0.78x-0.79x ->
  // 0.98x-1.02x / 0.90x-0.95x, N = 16 0.86x / 1.09x-1.10x -> 1.02x-1.03x / 1.15x-1.20x, N = 64
  // 0.85x-0.86x / 0.83x-0.87x -> 0.94x-0.95x / 0.89x-1.01x, N = 100 0.87x-0.88x / 0.83x-0.90x ->
  // 0.94x-0.95x / 0.82x-0.99x; d = 1024: N = 1 1.10x-1.13x / 1.01x-1.04x -> 1.53x-1.65x /
  // 1.37x-1.44x, N = 8 1.31x-1.33x / 1.19x-1.20x -> 1.51x-1.59x / 1.86x, N = 100 1.09x / 0.99x-1.02x
  // -> 1.12x-1.14x / 1.10x-1.19x.
  const bool panel_gradients = layout == BrgemmLayout::none && acc != dtype && takes_backward_by_columns(dims);
  const auto [w_down_operand, w_up_operand] =
      given             ? std::pair<at::Tensor, at::Tensor>()
      : panel_gradients ? std::pair<at::Tensor, at::Tensor>(at::Tensor(), operand_weight(w_up, dtype, /*transpose=*/false))
                        : operand_weights(w_down, w_up, dtype, /*transpose=*/false, dims);
  BackwardOperands op{dims,
                      with_unit_column_stride(grad_y),
                      x,
                      w_down_operand,
                      w_up_operand,
                      h.to(acc).contiguous(),
                      residual_is_x,
                      parse_activation(std::string(activation)),
                      scale,
                      dropout_p,
                      static_cast<uint64_t>(seed)};
  if (given) {
    op.w_down_given = w_down.contiguous();
    op.w_up_given = w_up.contiguous();
  }
  if (panel_gradients) op.w_down_given = weight_in_x_dtype(w_down, dtype);

  at::Tensor dx = empty_output({dims.n, dims.d}, x.options());
  at::Tensor dw_down, db_down, dw_up, db_up;
  const auto options = x.options();
  const int64_t rd = dims.r * dims.d;
  dispatch_dtype(dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using acc_t = decltype(a);
    const int64_t size = Partials<acc_t>::size(dims);
    const int64_t rows = layout != BrgemmLayout::none ? brgemm_backward_block_rows(dims) : backward_block_rows<acc_t>(dims);
    const int64_t blocks = (dims.n + rows - 1) / rows;
    // A call that takes_backward_by_columns on the block kernels: backward_by_columns, with
    // the bias sums of each block kept apart as those of a group.
    const bool by_columns = layout == BrgemmLayout::none && takes_backward_by_columns(dims);
    const int64_t groups = dims.n == 0 ? 1 : by_columns ? blocks : reduction_groups(dims, blocks, size);
    at::Tensor bias_partials = at::empty({groups, Partials<acc_t>::bias_size(dims)}, options.dtype(at::kDouble));
    double* bias_rows = bias_partials.data_ptr<double>();
    // The weight-gradient sums (dw_up as [d, r] or dw_up^T [r, d]: Partials) and the factor still
    // to be applied to dw_up (see below).
    const acc_t* up_sums = nullptr;
    const acc_t* down_sums = nullptr;
    bool up_by_rows = false;
    int64_t sums_chunk = dims.d;  // the [r, d] sums' column chunks (SumChunks)
    acc_t dw_up_factor = 1;
    at::Tensor partials;
    const auto run_by_columns = [&](const std::vector<Partials<acc_t>>& sums, WeightGradients* gradients) {
      if (dropout_p == 0.0) {
        backward_by_columns<T, acc_t, true>(op, dx, sums, gradients);
      } else {
        backward_by_columns<T, acc_t, false>(op, dx, sums, gradients);
      }
    };
    if (layout != BrgemmLayout::none) {
      if constexpr (std::is_same_v<acc_t, float>) {
        // The brgemm driver sums g^T a: the factor s of gz = s g is applied once, at the end.
        if (dropout_p == 0.0) dw_up_factor = static_cast<acc_t>(scale);
        if (brgemm_backward_writes_gradients(dims, dtype)) {
          WeightGradients gradients{at::empty({dims.r, dims.d}, options.dtype(w_down.scalar_type())),
                                    at::empty({dims.d, dims.r}, options.dtype(w_up.scalar_type())), dw_up_factor};
          partials = at::empty({groups, 0}, options.dtype(acc));
          backward_blocks_brgemm<T>(op, layout, dx, partials, bias_partials, &gradients);
          dw_down = gradients.dw_down;
          dw_up = gradients.dw_up;
        } else {
          partials = empty_output({groups, size}, options.dtype(acc));
          backward_blocks_brgemm<T>(op, layout, dx, partials, bias_partials, nullptr);
          up_sums = sum_partials<acc_t>(partials);
          down_sums = up_sums + rd;
          sums_chunk = kOutCols;
        }
      }
    } else if (panel_gradients) {
      if constexpr (!kUpByRows<T, acc_t>) {
        WeightGradients gradients{at::empty({dims.r, dims.d}, options.dtype(w_down.scalar_type())),
                                  at::empty({dims.d, dims.r}, options.dtype(w_up.scalar_type()))};
        std::vector<Partials<acc_t>> block_sums;
        for (int64_t block = 0; block < blocks; ++block) {
          block_sums.emplace_back(nullptr, nullptr, bias_rows + block * bias_partials.size(1), dims);
        }
        run_by_columns(block_sums, &gradients);
        dw_down = gradients.dw_down;
        dw_up = gradients.dw_up;
      }
    } else {
      // Group 0 sums straight into the gradients that are in the accumulation type and in the
      // layout it sums them in (dw_down, and dw_up where summed as [d, r]), the other groups into
      // rows of `partials`, added to group 0's at the end. backward_by_columns adds all its blocks
      // into one set of sums.
      up_by_rows = by_columns && kUpByRows<T, acc_t>;
      const bool direct_up = up_by_rows && w_up.scalar_type() == acc;
      const bool direct_down = kUpByRows<T, acc_t> && w_down.scalar_type() == acc;
      if (direct_up) dw_up = at::empty({dims.d, dims.r}, options.dtype(acc));
      if (direct_down) dw_down = at::empty({dims.r, dims.d}, options.dtype(acc));
      // Whether the first set of sums needs a row of `partials` (a gradient not summed directly).
      const int64_t first_row = direct_up && direct_down ? 0 : 1;
      const int64_t sets = by_columns ? 1 : groups;
      partials = empty_output({sets - 1 + first_row, size}, options.dtype(acc));
      std::vector<Partials<acc_t>> group_sums;
      std::vector<acc_t*> ups, downs;
      for (int64_t group = 0; group < groups; ++group) {
        const int64_t set = by_columns ? 0 : group;
        acc_t* row = set == 0 && first_row == 0 ? nullptr : partials.data_ptr<acc_t>() + (set - 1 + first_row) * size;
        acc_t* up = set == 0 && direct_up ? dw_up.data_ptr<acc_t>() : row;
        acc_t* down = set == 0 && direct_down ? dw_down.data_ptr<acc_t>() : row + rd;
        group_sums.emplace_back(up, down, bias_rows + group * bias_partials.size(1), dims);
        if (set == group) {
          ups.push_back(up);
          downs.push_back(down);
        }
      }
      if (dims.n == 0) {
        std::fill(ups[0], ups[0] + rd, acc_t(0));
        std::fill(downs[0], downs[0] + rd, acc_t(0));
        bias_partials.zero_();
      } else if (by_columns) {
        run_by_columns(group_sums, nullptr);
      } else if (dropout_p == 0.0) {
        backward_blocks<T, acc_t, true>(op, dx, group_sums);
      } else {
        backward_blocks<T, acc_t, false>(op, dx, group_sums);
      }
      sum_into_first(ups, rd);
      sum_into_first(downs, rd);
      up_sums = ups[0];
      down_sums = downs[0];
    }
    const double* bias_total = sum_partials<double>(bias_partials);
    side_by_side(
        !dw_up.defined() && !dw_down.defined() && rd >= kSideBySideWeightElements,
        [&] {
          if (dw_up.defined()) return;
          dw_up = up_by_rows ? gradient(SumChunks<acc_t>::row_major(up_sums, dims.d, dims.r), false, dw_up_factor,
                                        w_up.scalar_type(), options)
                             : gradient(SumChunks<acc_t>{up_sums, dims.r, dims.d, sums_chunk}, true, dw_up_factor,
                                        w_up.scalar_type(), options);
        },
        [&] {
          if (dw_down.defined()) return;
          dw_down = gradient(SumChunks<acc_t>{down_sums, dims.r, dims.d, sums_chunk}, false, acc_t(1),
                             w_down.scalar_type(), options);
        });
    db_up = gradient(SumChunks<double>::row_major(bias_total, 1, dims.d), false, 1.0, w_up.scalar_type(), options)
                .view({dims.d});
    db_down = gradient(SumChunks<double>::row_major(bias_total + dims.d, 1, dims.r), false, 1.0, w_down.scalar_type(),
                       options)
                  .view({dims.r});
  });
  return {dx, dw_down, db_down, dw_up, db_up};
}

}  // namespace adapterfast::cpu
