// Block kernels whose products run on PyTorch's BLAS (the Fortran sgemm_ that its CPU library
// exports: MKL's in PyTorch's x86 builds), for CPUs where PyTorch itself runs below AVX-512 and
// adapterfast has no hand-tiled kernels. The eager adapter's GEMMs run on the same BLAS, so the
// fused op matches them product for product and wins by what it does not do: the [N, d] passes of
// the bias, the residual add and the gradient accumulation, which run here on the block while it
// is in cache. The portable loops' products (block_kernels_generic.cpp) ran 0.14x-0.80x the eager
// adapter on an AMD EPYC with AVX2 (benchmarks/results/cpu_avx2_epyc.txt). The transposes, the
// dropout mask and the epilogue's loops are the portable ones.
//
// BLAS is column-major: a row-major [R, C] operand with leading dimension ld is the column-major
// [C, R] operand with the same ld, so each row-major product C = A B runs as C^T = B^T A^T.
// Operands stored in 16 bits are widened into a per-thread scratch buffer first (a block's rows,
// or a weight's), since sgemm reads only float.
#include "block_kernels.h"
#include "convert_rows.h"

#include <algorithm>
#include <climits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// Weak, so that a libtorch without it still loads this module, which then keeps the portable
// loops (kernels() returns null). at::native::cpublas::gemm, which calls it, is not exported.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL's thread count for the calling thread, returning the previous one (0: the global count,
// which 0 restores); the C entry point that mkl_service.h names mkl_set_num_threads_local. Each
// sgemm here runs on one thread, so that its result depends only on its operands and shape, never
// on the thread count: the drivers go over the threads themselves, with shapes that do not depend
// on it (BlockKernels::nt_at_full_speed). Without MKL, sgemm_ is called as it is.
extern "C" int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));

namespace adapterfast::cpu::blas {
namespace {

// colmajor_gemm's arguments as loops, for operands too large for BLAS's 32-bit integers.
void portable_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
                   const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      float sum = 0;
      for (int64_t l = 0; l < k; ++l) {
        sum += (trans_a ? A[l + i * lda] : A[i + l * lda]) * (trans_b ? B[j + l * ldb] : B[l + j * ldb]);
      }
      C[i + j * ldc] = beta == 0.0f ? sum : beta * C[i + j * ldc] + sum;
    }
  }
}

// A per-thread float buffer of at least n values, reused from call to call.
float* scratch(std::vector<float>& buffer, int64_t n) {
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(static_cast<size_t>(n));
  return buffer.data();
}

thread_local std::vector<float> t_dense_a;  // colmajor_gemm's operands with rows closer than BLAS allows
thread_local std::vector<float> t_dense_b;

// The column-major [rows, cols] operand X as one BLAS can read: X itself where ld >= rows, else a
// dense copy in `buffer` (ld below rows: an expanded x, whose rows are 0 elements apart); *ld is
// set to the result's leading dimension.
const float* readable(const float* X, int64_t* ld, int64_t rows, int64_t cols, std::vector<float>& buffer) {
  if (*ld >= rows) return X;
  float* out = scratch(buffer, rows * cols);
  for (int64_t j = 0; j < cols; ++j) std::copy(X + j * *ld, X + j * *ld + rows, out + j * rows);
  *ld = rows;
  return out;
}

// C = beta C + op(A) op(B), column-major, C [m, n]: sgemm_ with its arguments checked for BLAS's
// 32-bit integers. The leading dimension of an operand of one column is never read and may be
// anything a caller had at hand: it is raised to what BLAS requires; an operand of more columns
// whose columns overlap (an expanded x) is copied first. Dimensions past 2^31 (a row stride of
// 2^31 elements: an operand of several GiB) take portable_gemm instead.
void colmajor_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* A, int64_t lda,
                   const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const int64_t a_rows = trans_a ? k : m, a_cols = trans_a ? m : k;
  const int64_t b_rows = trans_b ? n : k, b_cols = trans_b ? k : n;
  if (a_cols <= 1) lda = std::max(lda, a_rows);
  if (b_cols <= 1) ldb = std::max(ldb, b_rows);
  A = readable(A, &lda, a_rows, a_cols, t_dense_a);
  B = readable(B, &ldb, b_rows, b_cols, t_dense_b);
  if (n <= 1) ldc = std::max(ldc, m);
  lda = std::max<int64_t>(lda, 1);
  ldb = std::max<int64_t>(ldb, 1);
  ldc = std::max<int64_t>(ldc, 1);
  if (std::max({m, n, k, lda, ldb, ldc}) > INT_MAX) {
    portable_gemm(trans_a, trans_b, m, n, k, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  const float one = 1.0f;
  const int threads = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
  sgemm_(trans_a ? "T" : "N", trans_b ? "T" : "N", &im, &in, &ik, &one, A, &ilda, B, &ildb, &beta, C, &ildc);
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(threads);
}

// C[M, N] = A[M, K] op(B) (+ C with beta 1) for row-major operands, op(B) = B [K, N] or, with
// b_transposed, B^T for B [N, K]: as column-major, C^T = op(B)^T A^T.
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
          bool b_transposed, float beta, float* C, int64_t ldc) {
  colmajor_gemm(b_transposed, false, N, M, K, B, ldb, A, lda, beta, C, ldc);
}

// C[N, K] = A[M, N]^T B[M, K] (+ C with beta 1) for row-major operands: C^T = B^T A, column-major.
void gemm_tn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float beta,
             float* C, int64_t ldc) {
  colmajor_gemm(false, true, K, N, M, B, ldb, A, lda, beta, C, ldc);
}


// The [M, K] operand A as floats: A itself when it is stored as float, else widened into `buffer`
// (leading dimension K); *ld is set to the result's leading dimension.
const float* as_float(const void* A, Kind kind, int64_t lda, int64_t M, int64_t K, std::vector<float>& buffer,
                      int64_t* ld) {
  if (kind == Kind::f32) {
    *ld = lda;
    return static_cast<const float*>(A);
  }
  float* out = scratch(buffer, M * K);
  for (int64_t i = 0; i < M; ++i) {
    if (kind == Kind::bf16) {
      widen_row(static_cast<const c10::BFloat16*>(A) + i * lda, out + i * K, K);
    } else {
      widen_row(static_cast<const c10::Half*>(A) + i * lda, out + i * K, K);
    }
  }
  *ld = K;
  return out;
}

thread_local std::vector<float> t_operand;  // a widened block of rows
thread_local std::vector<float> t_weight;   // a widened weight
thread_local std::vector<float> t_product;  // project_out's product columns, before the epilogue
thread_local std::vector<float> t_share;    // accumulate_outer_stored's block share, before it is added

void project_in(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                int64_t ldc) {
  gemm(M, N, K, A, lda, B, ldb, false, 0.0f, C, ldc);
}

void accumulate_outer(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                      float* C, int64_t ldc) {
  gemm_tn(M, N, K, A, lda, B, ldb, 1.0f, C, ldc);
}

// out[:, cols] = epilogue(A op(B)[:, cols]) in column chunks of kOutCols; op(B) is B [N, K] or,
// for b_transposed, B^T with B [K, N] (project_out_nt's weight as given).
void project_out_chunks(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                        bool b_transposed, const OutputEpilogue<float>& e) {
  const int64_t chunk = std::min(K, kOutCols);
  float* u = scratch(t_product, M * chunk);
  for (int64_t col0 = 0; col0 < K; col0 += chunk) {
    const int64_t cols = std::min(chunk, K - col0);
    const float* b = b_transposed ? B + col0 * ldb : B + col0;
    gemm(M, cols, N, A, lda, b, ldb, b_transposed, 0.0f, u, cols);
    generic::finish_rows(M, cols, u, cols, col0, e);
  }
}

void project_out(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 const OutputEpilogue<float>& e) {
  project_out_chunks(M, N, K, A, lda, B, ldb, false, e);
}

void project_in_stored(int64_t M, int64_t N, int64_t K, const void* A, Kind a_kind, int64_t lda, const float* B,
                       int64_t ldb, float* C, int64_t ldc) {
  int64_t ld = 0;
  const float* a = as_float(A, a_kind, lda, M, K, t_operand, &ld);
  project_in(M, N, K, a, ld, B, ldb, C, ldc);
}

// The block's share is formed from zero and then added to C (as the other tables do), so a sum
// over blocks is the same whether they were accumulated into one C or summed apart and added.
// sgemm with beta 1 adding into C directly was 5-15% faster in the backward at d = 4096, r = 64
// (the AMD EPYC with AVX2), but its results then differed in the last bits between calls of
// different column ranges, which broke the results' independence of the thread count.
void accumulate_outer_stored(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const void* B,
                             Kind b_kind, int64_t ldb, float* C, int64_t ldc, float* sums, bool accumulate) {
  int64_t ld = 0;
  const float* b = as_float(B, b_kind, ldb, M, K, t_operand, &ld);
  float* share = accumulate ? scratch(t_share, N * K) : C;
  const int64_t ld_share = accumulate ? K : ldc;
  gemm_tn(M, N, K, A, lda, b, ld, 0.0f, share, ld_share);
  if (accumulate) {
    for (int64_t j = 0; j < N; ++j) {
      float* c = C + j * ldc;
      const float* s = share + j * K;
      for (int64_t k = 0; k < K; ++k) c[k] += s[k];
    }
  }
  if (sums != nullptr) {
    std::fill(sums, sums + K, 0.0f);
    for (int64_t i = 0; i < M; ++i) {
      const float* row = b + i * ld;
      for (int64_t k = 0; k < K; ++k) sums[k] += row[k];
    }
  }
}

void project_nt(int64_t M, int64_t N, int64_t K, const void* A, Kind a_kind, int64_t lda, const void* B, Kind b_kind,
                int64_t ldb, float* C, int64_t ldc) {
  int64_t ld_a = 0, ld_b = 0;
  const float* a = as_float(A, a_kind, lda, M, K, t_operand, &ld_a);
  const float* b = as_float(B, b_kind, ldb, N, K, t_weight, &ld_b);
  gemm(M, N, K, a, ld_a, b, ld_b, true, 0.0f, C, ldc);
}

void project_out_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const void* B, Kind b_kind,
                    int64_t ldb, const OutputEpilogue<float>& e) {
  int64_t ld_b = 0;
  const float* b = as_float(B, b_kind, ldb, K, N, t_weight, &ld_b);
  project_out_chunks(M, N, K, A, lda, b, ld_b, true, e);
}

}  // namespace

const BlockKernels<float>* kernels() {
  if (sgemm_ == nullptr) return nullptr;
  static const BlockKernels<float> table = [] {
    BlockKernels<float> t = generic::kernels<float>();
    t.name = "blas";
    t.project_in = &project_in;
    t.accumulate_outer = &accumulate_outer;
    t.project_out = &project_out;
    t.project_in_stored = &project_in_stored;
    t.accumulate_outer_stored = &accumulate_outer_stored;
    t.project_nt = &project_nt;
    t.project_out_nt = &project_out_nt;
    t.nt_at_full_speed = true;
    return t;
  }();
  return &table;
}

}  // namespace adapterfast::cpu::blas
