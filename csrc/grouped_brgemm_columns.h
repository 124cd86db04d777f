#pragma once
// The brgemm products over d output columns that the grouped forward and backward 16-bit drivers
// (grouped_forward.cpp, grouped_backward_brgemm.cpp) share: C = A B taken kOutCols columns at a
// time, either finished by the output epilogue (y, dx) or accumulated into fp32 sums (dW).
#include <algorithm>
#include <cstdint>

#include "block_kernels.h"
#include "brgemm.h"

namespace adapterfast::cpu::grouped {

// Output columns per brgemm call: a [64, 256] fp32 product (64 KiB) stays in L2 for its epilogue.
constexpr int64_t kOutCols = 256;

inline int64_t even(int64_t v) { return v + (v & 1); }

// epilogue(A[M, K] B[K, d]) per chunk of kOutCols columns, the product held in `chunk`
// ([M, kOutCols] fp32); B packed with ldb = d, K even.
template <typename T>
void finish_by_columns(BrgemmLayout layout, int64_t M, int64_t K, int64_t d, const T* A, int64_t lda, const T* B,
                       float* chunk, const OutputEpilogue<float>& e) {
  for (int64_t n0 = 0; n0 < d; n0 += kOutCols) {
    const int64_t nc = std::min(kOutCols, d - n0);
    at::native::cpublas::brgemm(M, nc, K, lda, d, nc, false, A, B + b_column(layout, n0), chunk,
                                layout == BrgemmLayout::vnni);
    avx512::finish_rows(M, nc, chunk, nc, n0, e);
  }
}

// C[M, d] (+)= A[M, K] B[K, d] in column chunks of kOutCols, B packed with ldb = d, C with ldc = d;
// `add` false overwrites C (a group's first run: its sums need no zeroing first).
template <typename T>
void accumulate_by_columns(BrgemmLayout layout, int64_t M, int64_t K, int64_t d, const T* A, int64_t lda,
                           const T* B, float* C, bool add) {
  for (int64_t n0 = 0; n0 < d; n0 += kOutCols) {
    const int64_t nc = std::min(kOutCols, d - n0);
    at::native::cpublas::brgemm(M, nc, K, lda, d, d, add, A, B + b_column(layout, n0), C + n0,
                                layout == BrgemmLayout::vnni);
  }
}

}  // namespace adapterfast::cpu::grouped
