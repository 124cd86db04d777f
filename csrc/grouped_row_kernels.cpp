// Portable row kernels (contract in grouped_row_kernels.h): the loops of the portable block
// kernels (block_kernels_generic.cpp) with the wide operand read through a row list, for float64
// and for float where the AVX-512 kernels do not run; and the choice of table.
#include "grouped_row_kernels.h"

#include <algorithm>
#include <cstring>

#include "block_kernels.h"

namespace adapterfast::cpu::grouped {
namespace {

template <typename acc_t>
void project_in_rows(int64_t M, int64_t N, int64_t K, const acc_t* X, int64_t ldx, const int64_t* rows, int64_t,
                     const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    const acc_t* x = X + rows[i] * ldx;
    acc_t* c = C + i * ldc;
    std::fill(c, c + N, acc_t(0));
    for (int64_t k = 0; k < K; ++k) {
      const acc_t a = x[k];
      const acc_t* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

template <typename acc_t>
void accumulate_outer_rows(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* X, int64_t ldx,
                           const int64_t* rows, int64_t, acc_t* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    const acc_t* b = X + rows[i] * ldx;
    for (int64_t j = 0; j < N; ++j) {
      const acc_t a = A[i * lda + j];
      acc_t* c = C + j * ldc;
      for (int64_t k = 0; k < K; ++k) c[k] += a * b[k];
    }
  }
}

template <typename acc_t>
const RowKernels<acc_t>& portable() {
  static const RowKernels<acc_t> table{"generic", &project_in_rows<acc_t>, &accumulate_outer_rows<acc_t>};
  return table;
}

}  // namespace

template <>
const RowKernels<float>& row_kernels<float>() {
  static const RowKernels<float>* const chosen = [] {
    const RowKernels<float>* fast = avx512::row_kernels();
    const bool avx512_blocks = std::strcmp(block_kernels<float>().name, "avx512") == 0;
    return fast != nullptr && avx512_blocks ? fast : &portable<float>();
  }();
  return *chosen;
}

template <>
const RowKernels<double>& row_kernels<double>() {
  return portable<double>();
}

}  // namespace adapterfast::cpu::grouped
