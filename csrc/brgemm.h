#pragma once
// PyTorch's batch-reduce GEMM micro-kernel (at::native::cpublas::brgemm: oneDNN's ukernel, on AMX
// tiles or AVX512-BF16/FP16 dot products, fp32 accumulation) for the 16-bit paths: which layout
// its B operand needs on this machine, and packing operands into it.
//
// The layout is found by running a 1x2x4 product once per process and dtype, not by reading CPU
// flags: oneDNN decides (bf16 wants pairs of K rows interleaved, "VNNI", on AMX and on
// AVX512-BF16; fp16 wants plain rows on AVX512-FP16 and VNNI on AMX-FP16), and the probe also
// honours what caps oneDNN (ONEDNN_MAX_CPU_ISA, torch.backends.mkldnn disabled). Where the
// ukernel is unavailable the layout is `none` and the drivers use the fp32 block kernels.
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#endif

#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/core/ScalarType.h>

#include "bf16_split.h"
#include "convert_rows.h"
#include "env.h"
#include "scratch.h"

namespace adapterfast::cpu {

enum class BrgemmLayout : uint8_t { none, vnni, plain };

// The B layout brgemm uses for a 16-bit dtype here; `none` also when ADAPTERFAST_CPU_BRGEMM=0
// or when the AVX-512 epilogues are not in use (ATEN_CPU_CAPABILITY below AVX512); the grouped op
// runs in it, the single op as fp16_route says for float16. For float32,
// `plain` only with ADAPTERFAST_CPU_FP32_BRGEMM=1 (for measuring it against the AVX-512 kernels;
// the measurement that keeps fp32 off brgemm is at its definition in brgemm.cpp), else none.
BrgemmLayout brgemm_layout(at::ScalarType dtype);

// "amx" when oneDNN packs this dtype for AMX tiles, else "avx512" (for the report in kernel_isa).
std::string brgemm_unit(at::ScalarType dtype);

// Whether bf16 brgemm runs on AMX tiles here (brgemm_unit of bf16, once per process): the drivers'
// block sizes, threads and B padding differ between AMX and AVX512-BF16 dot products.
bool bf16_on_amx_tiles();

// How one pass of the single-adapter op runs its float16 products: on the fp32 block kernels with
// float16 converted on load and store (fp32_kernels), on oneDNN's float16 brgemm kernel (native),
// or as three bfloat16 products (bf16x3, bf16_split.h). By default: native where that kernel runs
// on AMX tiles (AMX-FP16); the forward split at r >= kFp16SplitMinRank and n >= kFp16SplitMinRows
// rows where bf16 runs on AMX tiles and float16 does not; fp32_kernels otherwise. The
// measurements behind this are at the definition. ADAPTERFAST_CPU_FP16=native forces native
// (where oneDNN has a float16 kernel, else fp32_kernels), =bf16x3 the split in both passes at every
// n and r, =bf16x3-fwd the split forward at every n and r with the default backward (wherever bf16
// brgemm runs; for tests and measurements).
enum class Fp16Route : uint8_t { fp32_kernels, native, bf16x3 };
constexpr int64_t kFp16SplitMinRank = 32;
constexpr int64_t kFp16SplitMinRows = 256;
Fp16Route fp16_route(bool backward, int64_t n, int64_t r);

// What runs the GEMMs of the 16-bit drivers for inputs of dtype, for kernel_isa: "brgemm-amx",
// "brgemm-avx512", "brgemm-amx-bf16x3" / "brgemm-avx512-bf16x3" (float16 split into bf16 in both
// passes; "-bf16x3-fwd" when only the forward is, at the ranks and rows fp16_route splits), or ""
// when no brgemm path runs.
std::string brgemm_kernel_name(at::ScalarType dtype);

// Index of element (k, n) of a B operand with leading dimension ldb (in N positions).
inline int64_t b_index(BrgemmLayout layout, int64_t k, int64_t n, int64_t ldb) {
  return layout == BrgemmLayout::vnni ? (k >> 1) * ldb * 2 + n * 2 + (k & 1) : k * ldb + n;
}

// Offset of column n0 of a B operand (for a product over columns [n0, n0 + nc)).
inline int64_t b_column(BrgemmLayout layout, int64_t n0) {
  return layout == BrgemmLayout::vnni ? 2 * n0 : n0;
}

// The float16 rounding of src (K x N, as for pack_b) split into bf16 hi + lo (bf16_split.h), as
// the B operand [hi; lo; hi] of 3 even(K) rows with ldb = N: multiplied by an A of rows
// [a_hi | a_hi | a_lo] (K = 3 even(K)) it gives the float16 product in one call; its first
// 2 even(K) rows, [hi; lo], serve products taken as separate calls.
// Only in the VNNI layout, bf16's on every ISA. The rows are rounded 8 values per instruction
// (narrow_row), then split and paired 16 columns at a time (split_rows_vnni): the element-by-
// element loop this replaced, run on every forward, made a float16 forward at N = 320, d = 1024,
// r = 64 take 1.7x eager's (python -m benchmarks.overhead --dtype fp16 --r 64; Intel Xeon, AMX).
inline Scratch<c10::BFloat16> pack_b_split(BrgemmLayout layout, int64_t K, int64_t N, const float* src,
                                           int64_t ld_k) {
  TORCH_CHECK(layout == BrgemmLayout::vnni, "adapterfast: the float16 split needs bf16's VNNI layout");
  const int64_t k_even = K + (K & 1);
  Scratch<c10::Half> rows(K * N);
  for (int64_t k = 0; k < K; ++k) narrow_row(src + k * ld_k, 1.0f, rows.data() + k * N, N);
  Scratch<c10::BFloat16> out(3 * k_even * N);
  split_rows_vnni(K, N, rows.data(), N, out.data(), out.data() + k_even * N, out.data() + 2 * k_even * N);
  return out;
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < m, j < n (16-bit values): a block's rows of
// a and dh as columns of the weight-gradient products' A operands, which contract over rows.
// AVX-512 16 x 16 tiles (only called on the brgemm paths, which need AVX-512), scalar at the edges.
void transpose_16bit(int64_t m, int64_t n, const uint16_t* src, int64_t ld_src, uint16_t* dst, int64_t ld_dst);

// The same for T: transpose_16bit on the bits of 16-bit T, a plain loop for fp32 (the
// measurement-only fp32 brgemm path). Used by the single-adapter and grouped 16-bit backwards.
template <typename T>
void transpose_rows(int64_t m, int64_t n, const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  if constexpr (sizeof(T) == 2) {
    transpose_16bit(m, n, reinterpret_cast<const uint16_t*>(src), ld_src, reinterpret_cast<uint16_t*>(dst), ld_dst);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = 0; i < m; ++i) dst[j * ld_dst + i] = src[i * ld_src + j];
    }
  }
}

// sum[k] += float(g[k]) for k < d: column sums of 16-bit rows (a bias gradient), used by both
// 16-bit drivers. c10::Half's conversion is scalar bit manipulation (column sums
// of 8M fp16 values took ~15 ms of one core here); with F16C, 8 at a time (exact: the same sums).
template <typename T>
inline void add_to_sums(const T* __restrict g, float* __restrict sum, int64_t d) {
  int64_t k = 0;
#if defined(__F16C__) && defined(__AVX__)
  if constexpr (std::is_same_v<T, c10::Half>) {
    for (; k + 8 <= d; k += 8) {
      const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g + k)));
      _mm256_storeu_ps(sum + k, _mm256_add_ps(_mm256_loadu_ps(sum + k), v));
    }
  }
#endif
  for (; k < d; ++k) sum[k] += static_cast<float>(g[k]);
}

// rows_as_b for 16-bit values (AVX-512; only called on the brgemm paths, which need it): VNNI
// pairs built 16 columns at a time, or a plain copy; where sums is set, sums[n] += float(row's
// value) for every copied row in row order (bf16 values, or float16 ones with half), so that the
// pass that repacks a block's g rows also takes db_up's column sums (the same fp32 additions in
// the same order as a separate loop over the rows, without a second read of g). dst has
// ldb >= N (its pad columns are not written).
void rows_as_b_16bit(bool vnni, int64_t m, int64_t N, const uint16_t* src, int64_t ld_src, uint16_t* dst,
                     int64_t ldb, const int64_t* rows, float* sums, bool half);

// dst = rows [0, m) of src (leading dimension ld_src, width N) as a B operand with ldb = N (or
// the given ldb >= N; its pad columns are not written) and m rounded up to even with a zero row:
// interleaved pairs of rows (VNNI) or a plain copy. With `rows`, row i is src's row rows[i] (the
// grouped op's rows, scattered over an [N, d] tensor).
template <typename T>
void rows_as_b(BrgemmLayout layout, int64_t m, int64_t N, const T* src, int64_t ld_src, T* dst,
               const int64_t* rows = nullptr, int64_t ldb = 0) {
  if (ldb == 0) ldb = N;
  if constexpr (sizeof(T) == 2) {
    rows_as_b_16bit(layout == BrgemmLayout::vnni, m, N, reinterpret_cast<const uint16_t*>(src), ld_src,
                    reinterpret_cast<uint16_t*>(dst), ldb, rows, nullptr, std::is_same_v<T, c10::Half>);
  } else {
    const int64_t m_even = m + (m & 1);
    for (int64_t i = 0; i < m; ++i) {
      const T* row = src + (rows == nullptr ? i : rows[i]) * ld_src;
      std::copy(row, row + N, dst + i * ldb);
    }
    if (m_even != m) std::fill(dst + m * ldb, dst + m * ldb + N, T(0.0f));
  }
}

// The weight w [P, Q] of 16-bit values (contiguous) as the B operand of a product with K rows and
// N columns, ldb >= N (its pad columns are not written), K rounded up to even with a zero row:
// B[k, n] = w[k, n] (K = P; rows_as_b_16bit) or, with `transpose`, w[n, k] (K = Q). Transposed
// into the VNNI layout, a word of B holds B[2j, n] and B[2j + 1, n], which is w's 32-bit word j
// of row n: for even Q the operand is w's words transposed, 16 x 16 at a time (bit-exact; the
// element-by-element loop it replaced was half of a grouped bf16 forward at 16 rows over 32
// adapters, perf on Zen 4). The weights of both 16-bit drivers, every call.
void weight_as_b_16bit(bool vnni, int64_t P, int64_t Q, const uint16_t* w, bool transpose, uint16_t* dst,
                       int64_t ldb, bool half);

template <typename T>
void weight_as_b(BrgemmLayout layout, int64_t P, int64_t Q, const T* w, bool transpose, T* dst, int64_t ldb) {
  static_assert(sizeof(T) == 2);
  weight_as_b_16bit(layout == BrgemmLayout::vnni, P, Q, reinterpret_cast<const uint16_t*>(w), transpose,
                    reinterpret_cast<uint16_t*>(dst), ldb, std::is_same_v<T, c10::Half>);
}

// rows_as_b that also adds the rows to column sums, sums[n] += float(src(i, n)) in row order
// (in the same pass for 16-bit rows, rows_as_b_16bit; a second loop for fp32).
template <typename T>
void rows_as_b_summed(BrgemmLayout layout, int64_t m, int64_t N, const T* src, int64_t ld_src, T* dst, float* sums,
                      int64_t ldb = 0) {
  if (ldb == 0) ldb = N;
  if constexpr (sizeof(T) == 2) {
    rows_as_b_16bit(layout == BrgemmLayout::vnni, m, N, reinterpret_cast<const uint16_t*>(src), ld_src,
                    reinterpret_cast<uint16_t*>(dst), ldb, nullptr, sums, std::is_same_v<T, c10::Half>);
  } else {
    rows_as_b(layout, m, N, src, ld_src, dst, nullptr, ldb);
    for (int64_t i = 0; i < m; ++i) add_to_sums(src + i * ld_src, sums, N);
  }
}

// src (K x N, element (k, n) at src[k * ld_k + n]) as a B operand of T with ldb = N (or the given
// ldb >= N, the pad columns zero) and K rounded up to even with zero rows (both layouts need an
// even K). float weights into 16-bit T (the drivers' weights, every call): rows rounded 8 values
// per instruction (narrow_row, c10's rounding), then paired 16 columns at a time (rows_as_b); an
// element-by-element loop with c10's scalar conversion took about a tenth of a bf16 training
// step at N = 8, d = 768 (perf, Zen 4).
template <typename T, typename S>
Scratch<T> pack_b(BrgemmLayout layout, int64_t K, int64_t N, const S* src, int64_t ld_k, int64_t ldb = 0) {
  if (ldb == 0) ldb = N;
  const int64_t k_even = K + (K & 1);
  Scratch<T> out = Scratch<T>::zeroed(k_even * ldb);
  if constexpr (sizeof(T) == 2 && std::is_same_v<S, float>) {
    Scratch<T> rows(K * N);
    for (int64_t k = 0; k < K; ++k) narrow_row(src + k * ld_k, 1.0f, rows.data() + k * N, N);
    rows_as_b(layout, K, N, rows.data(), N, out.data(), nullptr, ldb);
    return out;
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t n = 0; n < N; ++n) out[b_index(layout, k, n, ldb)] = static_cast<T>(src[k * ld_k + n]);
  }
  return out;
}

}  // namespace adapterfast::cpu
