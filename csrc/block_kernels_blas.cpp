// Block kernels whose products run on PyTorch's BLAS (the Fortran sgemm_ and dgemm_ that its CPU
// library exports: MKL's in PyTorch's x86 builds): float's on CPUs where PyTorch itself runs
// below AVX-512 and adapterfast has no hand-tiled kernels, and double's on every CPU. The eager
// adapter's GEMMs run on the same BLAS, so the fused op matches them product for product and wins
// by what it does not do: the [N, d] passes of the bias, the residual add and the gradient
// accumulation, which run here on the block while it is in cache. The portable loops' products
// (block_kernels_generic.cpp) ran 0.14x-0.80x the eager adapter in float and 0.22x-0.72x in double
// on an AMD EPYC with AVX2 (benchmarks/results/cpu_avx2_epyc.txt). The dropout mask, 16-bit
// weights' transposes and the epilogue's loops are the portable ones. float's project_out, where its
// output and residual are float, runs on AVX2 register tiles instead (block_kernels_avx2.cpp), the
// epilogue in the registers, and so do its project_in and project_nt up to r = 32 (kAvx2InMaxRank)
// and its weight transposes.
//
// BLAS is column-major: a row-major [R, C] operand with leading dimension ld is the column-major
// [C, R] operand with the same ld, so each row-major product C = A B runs as C^T = B^T A^T.
// Operands stored in another type than the accumulation type (16-bit rows and weights for float)
// are widened into a per-thread scratch buffer first (a block's rows, or a weight's), since each
// gemm reads only its own type.
#include "block_kernels.h"
#include "convert_rows.h"
#include "block_kernels_avx2.h"

#include <algorithm>
#include <climits>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// Weak, so that a libtorch without them still loads this module, which then keeps the portable
// loops (kernels() returns null). at::native::cpublas::gemm, which calls them, is not exported.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
extern "C" void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                       const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's thread count for the calling thread, returning the previous one (0: the global count,
// which 0 restores); the C entry point that mkl_service.h names mkl_set_num_threads_local. Each
// gemm here runs on one thread, so that its result depends only on its operands and shape, never
// on the thread count: the drivers go over the threads themselves, with shapes that do not depend
// on it (BlockKernels::nt_at_full_speed). Without MKL, the gemm is called as it is.
extern "C" int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));

namespace adapterfast::cpu::blas {
namespace {

// The Fortran gemm of acc_t.
void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                  const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                  const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
                  const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
                  const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// colmajor_gemm's arguments as loops, for operands too large for BLAS's 32-bit integers.
template <typename acc_t>
void portable_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const acc_t* A, int64_t lda,
                   const acc_t* B, int64_t ldb, acc_t beta, acc_t* C, int64_t ldc) {
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      acc_t sum = 0;
      for (int64_t l = 0; l < k; ++l) {
        sum += (trans_a ? A[l + i * lda] : A[i + l * lda]) * (trans_b ? B[j + l * ldb] : B[l + j * ldb]);
      }
      C[i + j * ldc] = beta == acc_t(0) ? sum : beta * C[i + j * ldc] + sum;
    }
  }
}

// Per-thread buffers of acc_t, reused from call to call.
template <typename acc_t>
struct Buffers {
  static inline thread_local std::vector<acc_t> dense_a;  // colmajor_gemm's operands with rows closer than BLAS allows
  static inline thread_local std::vector<acc_t> dense_b;
  static inline thread_local std::vector<acc_t> operand;  // a widened block of rows
  static inline thread_local std::vector<acc_t> weight;   // a widened weight
  static inline thread_local std::vector<acc_t> product;  // project_out's product columns, before the epilogue
  static inline thread_local std::vector<acc_t> share;    // accumulate_outer_stored's block share, before it is added
};

// `buffer` with room for at least n values.
template <typename acc_t>
acc_t* scratch(std::vector<acc_t>& buffer, int64_t n) {
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(static_cast<size_t>(n));
  return buffer.data();
}

// The column-major [rows, cols] operand X as one BLAS can read: X itself where ld >= rows, else a
// dense copy in `buffer` (ld below rows: an expanded x, whose rows are 0 elements apart); *ld is
// set to the result's leading dimension.
template <typename acc_t>
const acc_t* readable(const acc_t* X, int64_t* ld, int64_t rows, int64_t cols, std::vector<acc_t>& buffer) {
  if (*ld >= rows) return X;
  acc_t* out = scratch(buffer, rows * cols);
  for (int64_t j = 0; j < cols; ++j) std::copy(X + j * *ld, X + j * *ld + rows, out + j * rows);
  *ld = rows;
  return out;
}

// C = beta C + op(A) op(B), column-major, C [m, n]: the Fortran gemm with its arguments checked for
// BLAS's 32-bit integers. The leading dimension of an operand of one column is never read and may
// be anything a caller had at hand: it is raised to what BLAS requires; an operand of more columns
// whose columns overlap (an expanded x) is copied first. Dimensions past 2^31 (a row stride of
// 2^31 elements: an operand of several GiB) take portable_gemm instead.
template <typename acc_t>
void colmajor_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const acc_t* A, int64_t lda,
                   const acc_t* B, int64_t ldb, acc_t beta, acc_t* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const int64_t a_rows = trans_a ? k : m, a_cols = trans_a ? m : k;
  const int64_t b_rows = trans_b ? n : k, b_cols = trans_b ? k : n;
  if (a_cols <= 1) lda = std::max(lda, a_rows);
  if (b_cols <= 1) ldb = std::max(ldb, b_rows);
  A = readable(A, &lda, a_rows, a_cols, Buffers<acc_t>::dense_a);
  B = readable(B, &ldb, b_rows, b_cols, Buffers<acc_t>::dense_b);
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
  const acc_t one = 1;
  const int threads = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
  fortran_gemm(trans_a ? "T" : "N", trans_b ? "T" : "N", &im, &in, &ik, &one, A, &ilda, B, &ildb, &beta, C, &ildc);
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(threads);
}

// C[M, N] = A[M, K] op(B) (+ C with beta 1) for row-major operands, op(B) = B [K, N] or, with
// b_transposed, B^T for B [N, K]: as column-major, C^T = op(B)^T A^T.
template <typename acc_t>
void gemm(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb,
          bool b_transposed, acc_t beta, acc_t* C, int64_t ldc) {
  colmajor_gemm(b_transposed, false, N, M, K, B, ldb, A, lda, beta, C, ldc);
}

// C[N, K] = A[M, N]^T B[M, K] (+ C with beta 1) for row-major operands: C^T = B^T A, column-major.
template <typename acc_t>
void gemm_tn(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb, acc_t beta,
             acc_t* C, int64_t ldc) {
  colmajor_gemm(false, true, K, N, M, B, ldb, A, lda, beta, C, ldc);
}

// The [M, K] operand A as acc_t: A itself when it is stored as acc_t, else widened into `buffer`
// (leading dimension K); *ld is set to the result's leading dimension.
template <typename acc_t>
const acc_t* as_acc(const void* A, Kind kind, int64_t lda, int64_t M, int64_t K, std::vector<acc_t>& buffer,
                    int64_t* ld) {
  if (kind == kAccKind<acc_t>) {
    *ld = lda;
    return static_cast<const acc_t*>(A);
  }
  acc_t* out = scratch(buffer, M * K);
  for (int64_t i = 0; i < M; ++i) {
    switch (kind) {
      case Kind::bf16: widen_row(static_cast<const c10::BFloat16*>(A) + i * lda, out + i * K, K); break;
      case Kind::f16: widen_row(static_cast<const c10::Half*>(A) + i * lda, out + i * K, K); break;
      case Kind::f32: widen_row(static_cast<const float*>(A) + i * lda, out + i * K, K); break;
      case Kind::f64: widen_row(static_cast<const double*>(A) + i * lda, out + i * K, K); break;
    }
  }
  *ld = K;
  return out;
}

// Bottleneck widths up to which float's project_in runs on AVX2 register tiles (avx2::project_in)
// instead of sgemm, whose kernels for such narrow products (MKL's "pst" at 8 columns) ran the
// down-projection of a 64-row block at about half the rate of one call over all rows: at r = 8 the
// fused forward took 0.77x-0.80x the eager adapter's time. On the AMD EPYC with AVX2 (eager over fused,
// one process alternating the two through a temporary switch, 5 rounds, thread CPU time, one
// thread; printed, not saved), sgemm -> AVX2 tiles, inference / training:
//   r = 8: N = 1024, d = 1024 0.77x -> 1.50x / 1.74x -> 2.48x; N = 2048, d = 768 0.80x -> 2.21x /
//     1.57x -> 2.77x; N = 8192, d = 1024 1.02x -> 1.57x / 2.20x -> 3.13x;
//   r = 16: N = 1024, d = 1024 1.17x -> 1.23x / 1.16x -> 1.28x; N = 2048, d = 768 1.28x -> 1.65x /
//     1.35x -> 1.48x; two threads, N = 1024, d = 768 1.14x -> 1.29x / 1.27x -> 1.35x;
//   r = 32: N = 1024, d = 1024 0.97x -> 1.10x / 1.05x -> 1.11x; N = 2048, d = 4096 1.12x -> 1.17x /
//     1.12x -> 1.14x;
//   r = 48: d = 768 1.07x -> 1.15x / 1.06x -> 1.12x, but d = 4096 1.10x -> 1.11x / 1.22x -> 1.16x;
//   r = 64: within the spread at d = 768 and 1024, d = 4096 1.03x -> 0.97x / 1.05x -> 0.94x.
// project_nt (the forward of up to kBlasGivenForwardMaxRows rows, x Wd^T from Wd as given) too, from Wd
// transposed per call, r = 16, inference, one thread / two: N = 320, d = 384 1.21x -> 1.34x / 1.04x
// -> 1.08x; d = 768 1.16x -> 1.24x / 1.75x -> 2.00x; N = 64, d = 768 1.22x -> 1.24x / 1.56x ->
// 1.64x; N = 8, d = 768 1.35x -> 1.30x (one thread).
constexpr int64_t kAvx2InMaxRank = 32;

// Rows from which project_nt (x Wd^T in the forward of up to kBlasGivenForwardMaxRows rows, from Wd
// as given) runs on the tiles, from Wd transposed for avx2::project_in. Calls of fewer rows take dot
// products along Wd's rows (avx2::project_nt), which read Wd once as it is where the tiles first
// wrote its transpose (as many bytes again, read back). Their bits differ from the tiles': a row of
// h in a call of fewer rows may differ in the last bits from the same row in a larger call, as in
// eager PyTorch (GEMV against GEMM). The forward splits x Wd^T over threads in ranges of at least
// this many rows (nt_by_rows_min_rows), so its bits do not depend on the thread count.
// One thread, inference, eager adapter over fused, Wd's 8 x 8 blocks transposed in registers ->
// dot products (one process alternating the two through a temporary switch, medians of 9 rounds,
// printed, not saved): r = 16, d = 4096: N = 1 1.24x -> 1.49x, N = 4 1.34x -> 1.69x; d = 768, N = 8
// 1.53x -> 1.73x; r = 64, d = 4096, N = 4 1.17x -> 1.54x; dot products at every row count instead
// lost from 64 rows (N = 64, d = 768 1.43x -> 1.36x; N = 320, d = 4096 1.30x -> 1.12x).
constexpr int64_t kAvx2NtMinRows = 8;

// Whether project_out_nt (y in that forward, from Wu as given) computes its product by dot products
// along Wu's rows (avx2::project_nt, then the portable epilogue), reading Wu once as it is, instead of
// on the tiles from panels of Wu^T made from it: for one row, or up to r / 16 rows (fewer than
// kAvx2NtMinRows), where the panels cost more than the dot products' sums across lanes (one per
// output element and row). Same measurements, panels -> dot products: r = 64, d = 4096: N = 1 0.85x ->
// 1.31x, N = 2 1.18x -> 1.68x, N = 4 1.53x -> 1.66x, N = 6 1.53x -> 1.47x; r = 32, d = 4096: N = 2
// 1.40x -> 1.80x, N = 4 1.52x -> 1.49x; r = 16, d = 4096: N = 1 1.32x -> 1.54x, N = 2 1.54x -> 1.30x;
// r = 8, d = 4096: N = 1 1.44x -> 1.60x, N = 2 1.72x -> 1.63x. A row's y in such a call may differ in
// the last bits from the same row in a larger call, as h's.
inline bool out_by_dots(int64_t M, int64_t r) { return M < kAvx2NtMinRows && (M == 1 || 16 * M <= r); }

template <typename acc_t>
void project_in(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb, acc_t* C,
                int64_t ldc) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx2::available() && N <= kAvx2InMaxRank) return avx2::project_in(M, N, K, A, lda, B, ldb, C, ldc);
  }
  gemm(M, N, K, A, lda, B, ldb, false, acc_t(0), C, ldc);
}

template <typename acc_t>
void accumulate_outer(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb,
                      acc_t* C, int64_t ldc) {
  gemm_tn(M, N, K, A, lda, B, ldb, acc_t(1), C, ldc);
}

// out[:, cols] = epilogue(product) for the K output columns in chunks of kOutCols:
// product(col0, cols, u) writes the chunk's [M, cols] product to u (leading dimension cols).
template <typename acc_t, typename Product>
void finish_in_chunks(int64_t M, int64_t K, const OutputEpilogue<acc_t>& e, Product&& product) {
  const int64_t chunk = std::min(K, kOutCols);
  acc_t* u = scratch(Buffers<acc_t>::product, M * chunk);
  for (int64_t col0 = 0; col0 < K; col0 += chunk) {
    const int64_t cols = std::min(chunk, K - col0);
    product(col0, cols, u);
    generic::finish_rows(M, cols, u, cols, col0, e);
  }
}

// out[:, cols] = epilogue(A op(B)[:, cols]) on sgemm / dgemm; op(B) is B [N, K] or, for
// b_transposed, B^T with B [K, N] (project_out_nt's weight as given).
template <typename acc_t>
void project_out_chunks(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb,
                        bool b_transposed, const OutputEpilogue<acc_t>& e) {
  finish_in_chunks(M, K, e, [&](int64_t col0, int64_t cols, acc_t* u) {
    const acc_t* b = b_transposed ? B + col0 * ldb : B + col0;
    gemm(M, cols, N, A, lda, b, ldb, b_transposed, acc_t(0), u, cols);
  });
}

// float with a float output and residual: avx2::project_out, the product in registers and the epilogue
// applied there, where sgemm zeroed, filled and handed back a [M, 256] buffer per chunk for the
// epilogue's own pass, and packed both operands in every call (together with that pass, about 40% of
// an inference call's samples at N = 1024, d = 768, r = 16, where the product's FMAs are 28%). On the
// AMD EPYC with AVX2 (eager adapter over fused, one process alternating the two routes through a
// temporary switch, 5 rounds, thread CPU time, one thread; printed, not saved; the grids before and
// after are in benchmarks/results/cpu_avx2_epyc.txt section 8), sgemm -> AVX2 tiles:
//   r = 16, d = 768: N = 320 inference 0.89x -> 1.10x, training 0.95x -> 1.11x; N = 1024 0.88x ->
//     1.07x / 1.09x -> 1.24x; N = 2048 0.92x -> 1.16x / 1.11x -> 1.28x; d = 384, N = 1024 0.88x ->
//     1.11x / 0.96x -> 1.12x; d = 128, N = 4096 0.93x -> 1.15x / 1.01x -> 1.18x;
//   r = 64, d = 1024: N = 320 0.92x -> 0.99x / 0.96x -> 1.02x, N = 1024 0.84x -> 0.93x / 1.02x ->
//     1.05x; d = 768, N = 320 0.90x -> 0.98x / 0.95x -> 1.00x;
//   N = 2048-8192 at d = 1024 and 4096 (r = 16 and 64): within this machine's spread (+-7%) either way.
// bf16 and float16 outputs or residuals keep sgemm and the portable epilogue.
template <typename acc_t>
void project_out(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb,
                 const OutputEpilogue<acc_t>& e) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx2::handles(e)) return avx2::project_out(M, N, K, A, lda, B, ldb, e);
  }
  project_out_chunks(M, N, K, A, lda, B, ldb, false, e);
}

template <typename acc_t>
void project_in_stored(int64_t M, int64_t N, int64_t K, const void* A, Kind a_kind, int64_t lda, const acc_t* B,
                       int64_t ldb, acc_t* C, int64_t ldc) {
  int64_t ld = 0;
  const acc_t* a = as_acc(A, a_kind, lda, M, K, Buffers<acc_t>::operand, &ld);
  project_in(M, N, K, a, ld, B, ldb, C, ldc);
}

// The block's share is formed from zero and then added to C (as the other tables do), so a sum
// over blocks is the same whether they were accumulated into one C or summed apart and added.
// sgemm with beta 1 adding into C directly was 5-15% faster in the backward at d = 4096, r = 64
// (the AMD EPYC with AVX2), but its results then differed in the last bits between calls of
// different column ranges, which broke the results' independence of the thread count.
template <typename acc_t>
void accumulate_outer_stored(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const void* B,
                             Kind b_kind, int64_t ldb, acc_t* C, int64_t ldc, acc_t* sums, bool accumulate) {
  int64_t ld = 0;
  const acc_t* b = as_acc(B, b_kind, ldb, M, K, Buffers<acc_t>::operand, &ld);
  acc_t* share = accumulate ? scratch(Buffers<acc_t>::share, N * K) : C;
  const int64_t ld_share = accumulate ? K : ldc;
  gemm_tn(M, N, K, A, lda, b, ld, acc_t(0), share, ld_share);
  if (accumulate) {
    for (int64_t j = 0; j < N; ++j) {
      acc_t* c = C + j * ldc;
      const acc_t* s = share + j * K;
      for (int64_t k = 0; k < K; ++k) c[k] += s[k];
    }
  }
  if (sums != nullptr) {
    std::fill(sums, sums + K, acc_t(0));
    for (int64_t i = 0; i < M; ++i) {
      const acc_t* row = b + i * ld;
      for (int64_t k = 0; k < K; ++k) sums[k] += row[k];
    }
  }
}

template <typename acc_t>
void project_nt(int64_t M, int64_t N, int64_t K, const void* A, Kind a_kind, int64_t lda, const void* B, Kind b_kind,
                int64_t ldb, acc_t* C, int64_t ldc) {
  int64_t ld_a = 0, ld_b = 0;
  const acc_t* a = as_acc(A, a_kind, lda, M, K, Buffers<acc_t>::operand, &ld_a);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx2::available() && N <= kAvx2InMaxRank) {  // as project_in, from Wd transposed once per call
      const acc_t* b = as_acc(B, b_kind, ldb, N, K, Buffers<acc_t>::weight, &ld_b);
      if (M < kAvx2NtMinRows) return avx2::project_nt(M, N, K, a, ld_a, b, ld_b, C, ldc);
      acc_t* b_t = scratch(Buffers<acc_t>::product, N * K);
      avx2::transpose(N, K, b, ld_b, b_t);
      return avx2::project_in(M, N, K, a, ld_a, b_t, N, C, ldc);
    }
  }
  const acc_t* b = as_acc(B, b_kind, ldb, N, K, Buffers<acc_t>::weight, &ld_b);
  gemm(M, N, K, a, ld_a, b, ld_b, true, acc_t(0), C, ldc);
}

template <typename acc_t>
void project_out_nt(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const void* B, Kind b_kind,
                    int64_t ldb, const OutputEpilogue<acc_t>& e) {
  int64_t ld_w = 0;
  const acc_t* w = as_acc(B, b_kind, ldb, K, N, Buffers<acc_t>::weight, &ld_w);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx2::available() && out_by_dots(M, N)) {
      return finish_in_chunks(M, K, e, [&](int64_t col0, int64_t cols, acc_t* u) {
        avx2::project_nt(M, cols, N, A, lda, w + col0 * ld_w, ld_w, u, cols);
      });
    }
    if (avx2::handles(e)) return avx2::project_out_nt(M, N, K, A, lda, w, ld_w, e);  // as in project_out
  }
  project_out_chunks(M, N, K, A, lda, w, ld_w, true, e);
}

// Whether PyTorch's library exports the Fortran gemm of acc_t.
template <typename acc_t>
bool exported() {
  if constexpr (std::is_same_v<acc_t, float>) {
    return sgemm_ != nullptr;
  } else {
    return dgemm_ != nullptr;
  }
}

}  // namespace

template <typename acc_t>
const BlockKernels<acc_t>* kernels() {
  if (!exported<acc_t>()) return nullptr;
  static const BlockKernels<acc_t> table = [] {
    BlockKernels<acc_t> t = generic::kernels<acc_t>();
    t.name = "blas";
    t.project_in = &project_in<acc_t>;
    t.accumulate_outer = &accumulate_outer<acc_t>;
    t.project_out = &project_out<acc_t>;
    t.project_in_stored = &project_in_stored<acc_t>;
    t.accumulate_outer_stored = &accumulate_outer_stored<acc_t>;
    t.project_nt = &project_nt<acc_t>;
    t.project_out_nt = &project_out_nt<acc_t>;
    t.nt_at_full_speed = true;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (avx2::available()) {
        t.transpose = &avx2::transpose;
        t.nt_by_rows_max_cols = kAvx2InMaxRank;
        t.nt_by_rows_min_rows = kAvx2NtMinRows;
      }
    }
    return t;
  }();
  return &table;
}

template const BlockKernels<float>* kernels<float>();
template const BlockKernels<double>* kernels<double>();

}  // namespace adapterfast::cpu::blas
