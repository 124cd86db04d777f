#pragma once
// The three small GEMMs the fused adapter is made of, on one block of rows held in cache, and the
// dropout mask of that block. The forward and backward drivers (adapter_forward.cpp,
// adapter_backward.cpp) are written once against this table; each instruction set supplies its
// own table (block_kernels_generic.cpp: portable loops for float and double;
// block_kernels_blas.cpp: the portable table with its products on PyTorch's BLAS, for float below
// AVX-512 (where its narrow products and project_out run on AVX2 register tiles:
// block_kernels_avx2.cpp) and for double;
// block_kernels_avx512.cpp: AVX-512 micro-kernels for float).
//
// Operands are row-major views: element (i, k) of an operand with leading dimension ld is
// ptr[i * ld + k]. project_in takes its weight as [d, r] and project_out as [r, d], so the
// drivers hold each weight in the layout its GEMM streams through contiguously.
#include <cstdint>

namespace adapterfast::cpu {

// Storage type of a tensor the kernels read or write element by element.
enum class Kind : uint8_t { f32, bf16, f16, f64 };

// The Kind of the accumulation type's own values (float or double).
template <typename acc_t>
constexpr Kind kAccKind = sizeof(acc_t) == 8 ? Kind::f64 : Kind::f32;

constexpr int64_t kind_bytes(Kind kind) { return kind == Kind::f64 ? 8 : kind == Kind::f32 ? 4 : 2; }

// What project_out does with each product u[i, k] = sum_j A[i, j] B[j, k]:
//     out[i, k] = res[i, k] + factor[i, k] * (u[i, k] + bias[k])
// factor is `scale` where keep[i, k] != 0 and 0 where it is 0 (multiplied, not selected, so a
// NaN in u still propagates as in eager); without keep, factor is `scale`. A null res or bias
// is absent. res and out are converted from/to their kinds (bf16 rounds to nearest even).
template <typename acc_t>
struct OutputEpilogue {
  const void* res = nullptr;
  Kind res_kind = Kind::f32;
  int64_t ld_res = 0;
  const acc_t* bias = nullptr;
  acc_t scale = 1;
  const uint8_t* keep = nullptr;  // rows padded to ld_keep, a multiple of kKeepAlign
  int64_t ld_keep = 0;
  void* out = nullptr;
  Kind out_kind = Kind::f32;
  int64_t ld_out = 0;
  // The output is far larger than the caches and this op does not read it back: kernels may
  // write it with non-temporal stores (no read-for-ownership, no eviction of the block's inputs).
  bool stream_out = false;
  // Row i of the product reads res row res_rows[i] and writes out row out_rows[i] where these are
  // set (the grouped op's rows, scattered over [N, d] tensors), else row i.
  const int64_t* res_rows = nullptr;
  const int64_t* out_rows = nullptr;

  int64_t res_row(int64_t i) const { return res_rows == nullptr ? i : res_rows[i]; }
  int64_t out_row(int64_t i) const { return out_rows == nullptr ? i : out_rows[i]; }

  // The epilogue of columns [col0, ...) of the same rows, for a product of those columns alone.
  OutputEpilogue from_column(int64_t col0) const;
  // The epilogue of rows [row0, ...) of the same columns, for a product of those rows alone.
  OutputEpilogue from_row(int64_t row0) const;
};

template <typename acc_t>
OutputEpilogue<acc_t> OutputEpilogue<acc_t>::from_column(int64_t col0) const {
  OutputEpilogue e = *this;
  if (res != nullptr) e.res = static_cast<const char*>(res) + col0 * kind_bytes(res_kind);
  if (out != nullptr) e.out = static_cast<char*>(out) + col0 * kind_bytes(out_kind);
  if (bias != nullptr) e.bias += col0;
  if (keep != nullptr) e.keep += col0;
  return e;
}

template <typename acc_t>
OutputEpilogue<acc_t> OutputEpilogue<acc_t>::from_row(int64_t row0) const {
  OutputEpilogue e = *this;
  if (res_rows != nullptr) {
    e.res_rows += row0;
  } else if (res != nullptr) {
    e.res = static_cast<const char*>(res) + row0 * ld_res * kind_bytes(res_kind);
  }
  if (out_rows != nullptr) {
    e.out_rows += row0;
  } else if (out != nullptr) {
    e.out = static_cast<char*>(out) + row0 * ld_out * kind_bytes(out_kind);
  }
  if (keep != nullptr) e.keep += row0 * ld_keep;
  return e;
}

// Rows of the keep-mask buffer are padded to this many bytes, so vector code may read a whole
// vector at a row's end.
constexpr int64_t kKeepAlign = 64;

template <typename acc_t>
struct BlockKernels {
  const char* name;

  // C[M, N] = A[M, K] B[K, N]: rows of width d projected to the bottleneck (x Wd^T, gz Wu).
  void (*project_in)(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* B,
                     int64_t ldb, acc_t* C, int64_t ldc);

  // C[N, K] += A[M, N]^T B[M, K], the M rows summed in order: one block's share of a weight
  // gradient (a^T gz, dh^T x).
  void (*accumulate_outer)(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda,
                           const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc);

  // out[M, K] = epilogue(A[M, N] B[N, K]): bottleneck rows projected back to width d.
  void (*project_out)(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const acc_t* B,
                      int64_t ldb, const OutputEpilogue<acc_t>& epilogue);

  // B[k, i] = A[i, k] for i < M, k < K, B dense [K, M]: a weight into the layout the other GEMM
  // streams through (every forward call transposes both weights; at a few rows that costs as
  // much as the GEMMs).
  void (*transpose)(int64_t M, int64_t K, const acc_t* A, int64_t lda, acc_t* B);

  // keep[i, k] = 1 if element (row0 + i, k) of an [*, d] output survives dropout, else 0, with
  // the Philox mask of adapterfast/dropout.py.
  void (*dropout_keep)(uint64_t seed, uint32_t threshold, int64_t row0, int64_t M, int64_t d,
                       uint8_t* keep, int64_t ld_keep);

  // project_in and accumulate_outer with the d-wide operand (g or x rows) in its storage type
  // `kind` (f32, bf16 or f16 for float; f64 for double), 16-bit values widened exactly as they
  // are loaded: the backward reads a 16-bit g and x straight from memory, half the bytes of float,
  // instead of first widening the block's rows into scratch (a pass of its own that stalled on
  // the rows' first loads).
  void (*project_in_stored)(int64_t M, int64_t N, int64_t K, const void* A, Kind a_kind, int64_t lda,
                            const acc_t* B, int64_t ldb, acc_t* C, int64_t ldc);
  // With sums (not null; N >= 1), also sums[k] = B[0, k] + B[1, k] + ... + B[M - 1, k] for k < K, in that
  // order, in acc_t, from the same pass over B: a block's share of db_up (the sum over rows of g),
  // added by the caller to its running total (so the rounding error grows with the block's rows,
  // not with N), from the sweep over g that dw_up makes anyway instead of a pass of its own.
  // Without accumulate, C = A^T B: a reduction group's first block writes its partial sums instead of
  // adding them to zeroed ones (a memset and a read of C fewer; at 8 rows, d = 1024, r = 64 those
  // two [r, d] partials were most of the backward's fixed cost).
  void (*accumulate_outer_stored)(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda,
                                  const void* B, Kind b_kind, int64_t ldb, acc_t* C, int64_t ldc, acc_t* sums,
                                  bool accumulate);

  // transpose with A in its storage type `a_kind`, widened exactly as it is loaded: a 16-bit
  // weight as the fp32 kernels' operand in one pass, where widening its rows and then transposing
  // them was two (together ~17% of a fp16 forward at 64 x 1024, r = 64).
  void (*widen_transposed)(int64_t M, int64_t K, const void* A, Kind a_kind, int64_t lda, acc_t* B);

  // C[M, N] = A[M, K] B[N, K]^T, both operands in their storage types, as dot products along K:
  // x Wd^T from the [r, d] weight as it is, for calls of a few rows (given_forward_max_rows,
  // adapter_common.h), where transposing the weight into project_in's [d, r] operand costs more
  // than the product. Each dot product sums its K products in 16 lanes, not in order as
  // project_in does, so h (and y) of a call that reads the weights as given may differ in the
  // last bits from the same rows' h in a larger call.
  void (*project_nt)(int64_t M, int64_t N, int64_t K, const void* A, Kind a_kind, int64_t lda, const void* B,
                     Kind b_kind, int64_t ldb, acc_t* C, int64_t ldc);

  // out[M, K] = epilogue(A[M, N] B[K, N]^T), B in its storage type `b_kind`: project_out from the
  // [d, r] weight Wu as it is, as project_nt's dot products along N, for calls of a few rows
  // (kGivenOutNtMaxRows, adapter_common.h), where widening and transposing Wu into project_out's
  // [r, d] operand costs more than the product. Sums in lanes as project_nt does, so y of such a
  // call may differ in the last bits from the same rows' y in a larger call.
  void (*project_out_nt)(int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t lda, const void* B,
                         Kind b_kind, int64_t ldb, const OutputEpilogue<acc_t>& epilogue);

  // Whether project_nt and project_out_nt run as fast as project_in and project_out at any row
  // count and width (BLAS packs either layout of its operands): the forward reads the weights as
  // given up to more rows (given_forward_max_rows) and computes all their output columns by
  // project_out_nt from Wu as given, instead of widening and transposing Wu panel by panel.
  // Such kernels' results for a row may also depend on the shape of the call that computes it
  // (sgemm picks its kernels by shape), so the drivers give them only shapes that do not depend
  // on the thread count: fixed blocks of rows and fixed slices of columns.
  bool nt_at_full_speed = false;

  // Up to this many columns (N), project_nt computes each row of C from that row of A alone, with
  // the same bits whatever the call's other rows, in every call of at least nt_by_rows_min_rows
  // rows: the forward may then split x Wd^T over the threads by rows in ranges of that many rows or
  // more (forward_given, adapter_forward.cpp). 0: no such bound is promised.
  int64_t nt_by_rows_max_cols = 0;
  int64_t nt_by_rows_min_rows = 1;
};

namespace generic {
template <typename acc_t>
const BlockKernels<acc_t>& kernels();

// out[i, col0 + k] = epilogue(u[i, k]) for i < M, k < K: project_out's epilogue on a product
// computed elsewhere (by BLAS, block_kernels_blas.cpp), as portable loops.
template <typename acc_t>
void finish_rows(int64_t M, int64_t K, const acc_t* u, int64_t ldu, int64_t col0, const OutputEpilogue<acc_t>& e);
}  // namespace generic

namespace blas {
// The portable table with its products on PyTorch's BLAS (sgemm for float, below AVX-512; dgemm
// for double), or null when PyTorch's library exports no such gemm.
template <typename acc_t>
const BlockKernels<acc_t>* kernels();

// Columns of project_out's product that one sgemm call computes before the epilogue reads them:
// the [M, kOutCols] product stays in L1/L2 between the two. The forward's panels of y on these
// kernels are as wide (forward_given, adapter_forward.cpp), so each is one call.
constexpr int64_t kOutCols = 256;
}

namespace avx512 {
// The AVX-512 kernels, or null when this build has none (non-x86 compiler).
const BlockKernels<float>* kernels();

// out[i, col0 + k] = epilogue(u[i, k]) for i < M, k < K (u fp32, leading dimension ldu): the
// epilogue of project_out on a product computed elsewhere (by brgemm, adapter_brgemm.cpp, which
// runs only where these kernels are in use).
void finish_rows(int64_t M, int64_t K, const float* u, int64_t ldu, int64_t col0,
                 const OutputEpilogue<float>& e);
}

// The kernels used for this accumulation type on this machine. float: AVX-512 where PyTorch
// itself dispatches to AVX-512, else BLAS (so ATEN_CPU_CAPABILITY=avx2 or =default selects the
// BLAS ones), or the portable loops with ADAPTERFAST_CPU_BLAS=0. double: BLAS, or the portable
// loops with ADAPTERFAST_CPU_BLAS=0.
template <typename acc_t>
const BlockKernels<acc_t>& block_kernels();

}  // namespace adapterfast::cpu
