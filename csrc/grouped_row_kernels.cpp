// Portable row kernels (contract in grouped_row_kernels.h): the portable block kernels
// (block_kernels_generic.cpp) called per listed row, for float64 and for float where the AVX-512
// kernels do not run; and the choice of table.
#include "grouped_row_kernels.h"

#include <cstring>

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
