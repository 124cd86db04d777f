// The row kernels other than AVX-512's (contract in grouped_row_kernels.h): the portable block
// kernels (block_kernels_generic.cpp) called per listed row, where they are the block kernels; the
// BLAS block kernels (block_kernels_blas.cpp: float below AVX-512, and float64) called once on the
// listed rows gathered into a dense block; and the choice of table.
#include "grouped_row_kernels.h"

#include <cstring>
#include <vector>

#include "block_kernels.h"

namespace adapterfast::cpu::grouped {
namespace {

// The portable kernels one row of the list at a time: their rows are independent in project_in
// and summed in row order in accumulate_outer, so the bits are those of one call on the gathered
// rows.
template <typename acc_t>
void project_in_rows(int64_t M, int64_t N, int64_t K, const acc_t* X, int64_t ldx, const int64_t* rows, int64_t,
                     const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc) {
  const BlockKernels<acc_t>& kernels = block_kernels<acc_t>();
  for (int64_t i = 0; i < M; ++i) kernels.project_in(1, N, K, X + rows[i] * ldx, ldx, B, ldb, C + i * ldc, ldc);
}

template <typename acc_t>
void accumulate_outer_rows(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* X, int64_t ldx,
                           const int64_t* rows, int64_t, acc_t* C, int64_t ldc) {
  const BlockKernels<acc_t>& kernels = block_kernels<acc_t>();
  for (int64_t i = 0; i < M; ++i) kernels.accumulate_outer(1, N, K, A + i * lda, lda, X + rows[i] * ldx, ldx, C, ldc);
}

template <typename acc_t>
const RowKernels<acc_t>& portable() {
  static const RowKernels<acc_t> table{"generic", &project_in_rows<acc_t>, &accumulate_outer_rows<acc_t>};
  return table;
}

// X's listed rows [rows[0:M], 0:K] as a dense [M, K] block in a per-thread buffer.
template <typename acc_t>
const acc_t* gather_rows(int64_t M, int64_t K, const acc_t* X, int64_t ldx, const int64_t* rows) {
  thread_local std::vector<acc_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < M * K) buffer.resize(static_cast<size_t>(M * K));
  for (int64_t i = 0; i < M; ++i) std::memcpy(buffer.data() + i * K, X + rows[i] * ldx, sizeof(acc_t) * K);
  return buffer.data();
}

// The BLAS kernels on the gathered rows: one gemm per block, where a gemm per row (as the portable
// table calls its loops) paid BLAS's per-call cost on every row. On the AMD EPYC with AVX2 (one
// thread, thread CPU time, N = 8192, d = 768, r = 16, 2-32 adapters; in one process alternating the
// two) the grouped op took 1.43x-1.91x the time of one adapter's fused call over the same rows in
// fp32 with a gemm per row, 1.12x-1.25x gathered; float64 1.11x-1.59x -> 1.07x-1.20x.
template <typename acc_t>
void project_in_gathered(int64_t M, int64_t N, int64_t K, const acc_t* X, int64_t ldx, const int64_t* rows, int64_t,
                         const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc) {
  block_kernels<acc_t>().project_in(M, N, K, gather_rows(M, K, X, ldx, rows), K, B, ldb, C, ldc);
}

template <typename acc_t>
void accumulate_outer_gathered(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* X,
                               int64_t ldx, const int64_t* rows, int64_t, acc_t* C, int64_t ldc) {
  block_kernels<acc_t>().accumulate_outer(M, N, K, A, lda, gather_rows(M, K, X, ldx, rows), K, C, ldc);
}

// The gathering table where block_kernels<acc_t>() is the BLAS one, else the portable loops.
template <typename acc_t>
const RowKernels<acc_t>& blas_or_portable() {
  static const RowKernels<acc_t> gathered{"blas", &project_in_gathered<acc_t>, &accumulate_outer_gathered<acc_t>};
  return std::strcmp(block_kernels<acc_t>().name, "blas") == 0 ? gathered : portable<acc_t>();
}

}  // namespace

template <>
const RowKernels<float>& row_kernels<float>() {
  static const RowKernels<float>* const chosen = [] {
    const RowKernels<float>* fast = avx512::row_kernels();
    const bool avx512_blocks = std::strcmp(block_kernels<float>().name, "avx512") == 0;
    return fast != nullptr && avx512_blocks ? fast : &blas_or_portable<float>();
  }();
  return *chosen;
}

template <>
const RowKernels<double>& row_kernels<double>() {
  static const RowKernels<double>* const chosen = &blas_or_portable<double>();
  return *chosen;
}

}  // namespace adapterfast::cpu::grouped
