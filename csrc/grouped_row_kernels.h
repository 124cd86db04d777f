#pragma once
// Block-kernel GEMMs of the grouped op that read their wide operand (x, grad_y) through a block's
// row list, where the rows lie: row i of the operand is X[rows[i] * ldx + k], scattered over an
// [N, d] tensor. The single-adapter block kernels (block_kernels.h) take that operand dense, which
// cost the grouped op a gather of every block's rows into a scratch (about half the GEMMs' time in
// the fp32 forward). The arithmetic, and so every result bit, is that of the block kernel of the
// same name on the gathered rows.
//
// The rows of a block are scattered at random, each starting on a page the hardware prefetcher
// has not seen, so the kernels prefetch rows ahead of their use themselves, into L2, under the
// FMAs: `ahead` (>= M) says how many entries of `rows` may be read, the M used and the rows the
// caller runs next (its rows left in the sorted order), which are prefetched.
//
// Each instruction set supplies a table (grouped_row_kernels.cpp: portable loops for float and
// double, and the BLAS block kernels on gathered rows; grouped_row_kernels_avx512.cpp: AVX-512 for
// float), chosen as block_kernels() chooses.
#include <cstdint>

namespace adapterfast::cpu::grouped {

template <typename acc_t>
struct RowKernels {
  const char* name;

  // C[M, N] = X[rows[0:M], 0:K] B[K, N]: block_kernels' project_in on the listed rows of X.
  void (*project_in_rows)(int64_t M, int64_t N, int64_t K, const acc_t* X, int64_t ldx, const int64_t* rows,
                          int64_t ahead, const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc);

  // C[N, K] += A[M, N]^T X[rows[0:M], 0:K], the M rows summed in order: block_kernels'
  // accumulate_outer with its B operand the listed rows of X (a block's share of dw = dh^T x).
  void (*accumulate_outer_rows)(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* X,
                                int64_t ldx, const int64_t* rows, int64_t ahead, acc_t* C, int64_t ldc);
};

namespace avx512 {
// The AVX-512 row kernels, or null when this build has none (non-x86 compiler).
const RowKernels<float>* row_kernels();
}  // namespace avx512

// The row kernels for this accumulation type: the AVX-512 ones exactly where block_kernels<float>()
// is the AVX-512 table, the gathering ones where block_kernels<acc_t>() is the BLAS table (so
// ATEN_CPU_CAPABILITY=avx2 selects BLAS for both, and ADAPTERFAST_CPU_BLAS=0 the portable loops),
// else the portable loops.
template <typename acc_t>
const RowKernels<acc_t>& row_kernels();

}  // namespace adapterfast::cpu::grouped
