// AVX-512 block kernels for float (contract in block_kernels.h), the GEMMs that produce a
// block's bottleneck rows and weight-gradient shares (project_in, accumulate_outer, and their forms
// that read 16-bit operands as stored) and the weight transpose, plus the table of all of them;
// project_out and its fused epilogue are in block_kernels_avx512_output.cpp, the dropout mask in
// block_kernels_avx512_dropout.cpp.
#include "block_kernels.h"

#include <cstdint>
#include <type_traits>

#include "block_kernels_avx512_begin.h"
#ifdef ADAPTERFAST_AVX512_KERNELS
#include "block_kernels_avx512.h"

namespace adapterfast::cpu::avx512 {
namespace {

// Calls fn(p) with p the pointer of the 16-bit or float storage type the AVX-512 kernels load for
// `kind` (float64 is not one of them).
template <typename Fn>
void with_stored(const void* p, Kind kind, Fn&& fn) {
  switch (kind) {
    case Kind::bf16: return fn(static_cast<const uint16_t*>(p));
    case Kind::f16: return fn(static_cast<const HalfBits*>(p));
    case Kind::f32: return fn(static_cast<const float*>(p));
    case Kind::f64: break;
  }
}

template <int kRows, int kVecs, typename Ta>
void project_in_tiles(int64_t M, int64_t N, int64_t n0, int64_t K, const Ta* A, int64_t lda,
                      const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const TileColumns<kVecs> cols(N, n0);
  const int64_t own = rows_in_own_tiles<kRows>(M);
  for (int64_t i0 = 0; i0 < own; i0 += kRows) {
    const int64_t mi = min64(kRows, own - i0);
    const Ta* x[kRows];
    for (int t = 0; t < kRows; ++t) x[t] = A + (i0 + min64(t, mi - 1)) * lda;
    if (cols.full) {
      project_in_tile<true, kRows>(mi, K, x, nullptr, B + n0, ldb, cols, C + i0 * ldc + n0, ldc, accumulate);
    } else {
      project_in_tile<false, kRows>(mi, K, x, nullptr, B + n0, ldb, cols, C + i0 * ldc + n0, ldc, accumulate);
    }
  }
  if (own < M) {
    project_in_tiles<kTailRows<kRows>, kVecs>(M - own, N, n0, K, A + own * lda, lda, B, ldb, C + own * ldc, ldc,
                                              accumulate);
  }
}

// Outer products, like the other two GEMMs (a dot-product form with horizontal sums measured
// 20-40% slower): a row tile broadcasts A's elements, so it also reads A (x, straight from memory
// in the forward) as kRows sequential streams. Columns go in tiles of up to 4 vectors (r <= 64
// is one tile), with 8 rows per tile, or 6 for 4 vectors, to keep 8 to 24 accumulators busy;
// one vector (r <= 16) takes 16 rows, so that each load of B serves 16 FMAs (on a core with two
// 512-bit FMA units an 8 x 1 tile issues 9 loads per 8 FMAs), except where A's row stride maps
// the 16 rows onto the same L1 sets (rows_share_l1_sets). There 16-row tiles measured 1.2-1.35x
// the forward time of 8-row ones (AMD EPYC Zen 4, 1 thread, least thread time, N = 8192, r = 16,
// processes alternated, 3 rounds, load 1.1-1.6; fwd ms 16-row / 8-row: d = 1024 9.1-10.6 / 7.0-8.6,
// d = 2048 18.1-19.0 / 13.5-14.6, d = 4096 50.6-53.8 / 40.1-46.2; d = 1536 10.4-12.5 / 10.1-10.3;
// d = 768, whose rows spread over four set ranges, 5.3-6.4 / 5.0-5.1; raw figures and commands in
// benchmarks/results/cpu_fp32_zen4.txt). d = 768 keeps 16 rows for the Xeon's load-bound loop.
// A is float, or 16-bit storage widened run by run in the tiles (project_in_stored).
template <typename Ta>
void project_in_impl(int64_t M, int64_t N, int64_t K, const Ta* A, int64_t lda, const float* B,
                     int64_t ldb, float* C, int64_t ldc) {
  const bool tall_r16 = !rows_share_l1_sets(lda * static_cast<int64_t>(sizeof(Ta)));
  for (int64_t k0 = 0; k0 < K; k0 += kInChunk) {
    const int64_t kc = min64(kInChunk, K - k0);
    const Ta* a = A + k0;
    const float* b = B + k0 * ldb;
    const bool add = k0 > 0;
    for (int64_t n0 = 0; n0 < N; n0 += 4 * kLanes) {
      switch ((min64(N - n0, 4 * kLanes) + kLanes - 1) / kLanes) {
        case 1: {
          // 16-row tiles, the last rows (fewer than 16) in 8-row ones: a tile computes all its
          // rows, so a one-row call in a 16-row tile would cost twice an 8-row one.
          const int64_t full = tall_r16 ? M / 16 * 16 : 0;
          project_in_tiles<16, 1>(full, N, n0, kc, a, lda, b, ldb, C, ldc, add);
          project_in_tiles<8, 1>(M - full, N, n0, kc, a + full * lda, lda, b, ldb, C + full * ldc, ldc, add);
          break;
        }
        case 2: project_in_tiles<8, 2>(M, N, n0, kc, a, lda, b, ldb, C, ldc, add); break;
        case 3: project_in_tiles<8, 3>(M, N, n0, kc, a, lda, b, ldb, C, ldc, add); break;
        default: project_in_tiles<6, 4>(M, N, n0, kc, a, lda, b, ldb, C, ldc, add); break;
      }
    }
  }
}

void project_in(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                int64_t ldb, float* C, int64_t ldc) {
  project_in_impl(M, N, K, A, lda, B, ldb, C, ldc);
}

void project_in_stored(int64_t M, int64_t N, int64_t K, const void* A, Kind a_kind, int64_t lda, const float* B,
                       int64_t ldb, float* C, int64_t ldc) {
  with_stored(A, a_kind, [&](auto a) { project_in_impl(M, N, K, a, lda, B, ldb, C, ldc); });
}

// 8 x 3 tiles over [r, K] (8 divides typical bottleneck widths): the M rows of A and B are summed
// in registers, then added to C (stored, without accumulate). A tile's missing rows repeat its
// last one and are not stored.
// With sums, the first row tile of each column tile also sums B's rows.
// B is float, or 16-bit storage (uint16_t: bf16, HalfBits: float16) widened as the tiles load it
// (accumulate_outer_stored): each element is converted N / 8 times, and yet that measured as fast
// as widening each [64, 48] slice of B once into an L1 slab for the tiles to read at r = 64, and
// 1.2x faster at d = 4096, r = 16 (fp16 backward, N = 8192, 2 threads, on the Xeon).
template <typename Tb>
void accumulate_outer_impl(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const Tb* B,
                           int64_t ldb, float* C, int64_t ldc, float* sums, bool accumulate) {
  using T = Tile<8, 3>;
  for (int64_t k0 = 0; k0 < K; k0 += T::kCols) {
    const TileColumns<3> cols(K, k0);
    for (int64_t j0 = 0; j0 < N; j0 += 8) {
      const int64_t nj = min64(8, N - j0);
      const float* a[8];
      for (int t = 0; t < 8; ++t) a[t] = A + j0 + min64(t, nj - 1);
      T tile;
      const bool prefetch_next = j0 == 0 && k0 + T::kCols < K;
      if (sums != nullptr && j0 == 0) {
        __m512 col_sums[3];
        for (auto& v : col_sums) v = _mm512_setzero_ps();
        rank_update<true>(cols, M, a, lda, B + k0, ldb, prefetch_next, tile, col_sums);
        for (int v = 0; v < 3; ++v) {
          if (cols.m[v] != 0) store(sums + k0 + v * kLanes, col_sums[v], cols.m[v]);
        }
      } else {
        rank_update(cols, M, a, lda, B + k0, ldb, prefetch_next, tile);
      }
      if (accumulate) {
        add_tile(tile, cols, nj, C + j0 * ldc + k0, ldc);
      } else {
        add_tile</*kStore=*/true>(tile, cols, nj, C + j0 * ldc + k0, ldc);
      }
    }
  }
}

void accumulate_outer(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                      int64_t ldb, float* C, int64_t ldc) {
  accumulate_outer_impl(M, N, K, A, lda, B, ldb, C, ldc, nullptr, /*accumulate=*/true);
}

void accumulate_outer_stored(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const void* B,
                             Kind b_kind, int64_t ldb, float* C, int64_t ldc, float* sums, bool accumulate) {
  with_stored(B, b_kind, [&](auto b) { accumulate_outer_impl(M, N, K, A, lda, b, ldb, C, ldc, sums, accumulate); });
}

// Lane t of the result is the sum of the 16 lanes of v[t]: pairs of vectors added interleaved
// (unpack_ps), then pairs of pairs (unpack_pd), which leaves in 128-bit lane L of w[q] the sums
// over lane L of v[4q..4q+3]; two rounds of 128-bit lane shuffles add each vector's four lanes.
// 30 shuffles and 15 adds for 16 dot products.
ALWAYS_INLINE __m512 sum_each_lanes(const __m512 (&v)[kLanes]) {
  __m512 s[8];
  for (int i = 0; i < 8; ++i) {
    s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  __m512 w[4];
  for (int q = 0; q < 4; ++q) {
    const __m512d a = _mm512_castps_pd(s[2 * q]), b = _mm512_castps_pd(s[2 * q + 1]);
    w[q] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xdd));
  const __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88), _mm512_shuffle_f32x4(w[2], w[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x88), _mm512_shuffle_f32x4(x0, x1, 0xdd));
}

// acc[t * kCols + c] += a[t][k0 : k0 + 16] * b[c][k0 : k0 + 16], lanes m.
template <int kRows, int kCols, typename Ta, typename Tb>
ALWAYS_INLINE void dot_step(const Ta* const (&a)[kRows], const Tb* const (&b)[kCols], int64_t k0, __mmask16 m,
                            __m512 (&acc)[kLanes]) {
  __m512 vb[kCols];
  for (int c = 0; c < kCols; ++c) vb[c] = load_as_float(b[c] + k0, m);
  for (int t = 0; t < kRows; ++t) {
    const __m512 va = load_as_float(a[t] + k0, m);
    for (int c = 0; c < kCols; ++c) acc[t * kCols + c] = _mm512_fmadd_ps(va, vb[c], acc[t * kCols + c]);
  }
}

// One tile of project_nt: kRows rows of A by kCols = 16 / kRows rows of B, 16 accumulators each
// lane of which sums every 16th product of one dot product. K goes in runs of kSumRun products
// per lane, each run's 16 dot products reduced (sum_each_lanes) and added to the running total,
// so the rounding error grows as in project_in (with kSumRun + K / kSumRun). A tile's missing
// columns repeat its last one and are not stored.
template <int kRows, typename Ta, typename Tb>
void project_nt_tile(int64_t nj, int64_t K, const Ta* const (&a)[kRows], const Tb* B, int64_t ldb, int64_t j0,
                     float* C, int64_t ldc) {
  constexpr int kCols = kLanes / kRows;
  const Tb* b[kCols];
  for (int c = 0; c < kCols; ++c) b[c] = B + (j0 + min64(c, nj - 1)) * ldb;
  constexpr int64_t kRun = kSumRun * kLanes;
  __m512 total = _mm512_setzero_ps();
  for (int64_t s0 = 0; s0 < K; s0 += kRun) {
    const int64_t end = min64(K, s0 + kRun);
    __m512 acc[kLanes];
    for (auto& v : acc) v = _mm512_setzero_ps();
    int64_t k = s0;
    for (; k + kLanes <= end; k += kLanes) dot_step<kRows, kCols>(a, b, k, __mmask16(0xFFFF), acc);
    if (k < end) dot_step<kRows, kCols>(a, b, k, lanes(end - k), acc);
    total = _mm512_add_ps(total, sum_each_lanes(acc));
  }
  alignas(64) float sums[kLanes];
  _mm512_store_ps(sums, total);
  for (int t = 0; t < kRows; ++t) {
    for (int64_t c = 0; c < nj; ++c) C[t * ldc + j0 + c] = sums[t * kCols + c];
  }
}

// Rows in tiles of 4 (4 x 4 dot products: 8 loads per 16 FMAs), the last 1 to 3 in tiles of 2
// and 1 (2 x 8, 1 x 16), so a one-row call (a decoding step) computes one row, not four.
template <int kRows, typename Ta, typename Tb>
void project_nt_rows(int64_t M, int64_t N, int64_t K, const Ta* A, int64_t lda, const Tb* B, int64_t ldb, float* C,
                     int64_t ldc) {
  constexpr int kCols = kLanes / kRows;
  const int64_t own = M / kRows * kRows;
  for (int64_t i0 = 0; i0 < own; i0 += kRows) {
    const Ta* a[kRows];
    for (int t = 0; t < kRows; ++t) a[t] = A + (i0 + t) * lda;
    for (int64_t j0 = 0; j0 < N; j0 += kCols) {
      project_nt_tile<kRows>(min64(kCols, N - j0), K, a, B, ldb, j0, C + i0 * ldc, ldc);
    }
  }
  if constexpr (kRows > 1) {
    if (own < M) project_nt_rows<kRows / 2>(M - own, N, K, A + own * lda, lda, B, ldb, C + own * ldc, ldc);
  }
}

void project_nt(int64_t M, int64_t N, int64_t K, const void* A, Kind a_kind, int64_t lda, const void* B, Kind b_kind,
                int64_t ldb, float* C, int64_t ldc) {
  with_stored(A, a_kind, [&](auto a) {
    with_stored(B, b_kind, [&](auto b) { project_nt_rows<4>(M, N, K, a, lda, b, ldb, C, ldc); });
  });
}

// project_nt into a stack tile of kNtOutRows rows by kNtOutCols columns at a time, each finished
// (finish_rows) while it is in L1.
constexpr int64_t kNtOutRows = 16;
constexpr int64_t kNtOutCols = 64;

void project_out_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const void* B, Kind b_kind,
                    int64_t ldb, const OutputEpilogue<float>& e) {
  alignas(64) float u[kNtOutRows * kNtOutCols];
  with_stored(B, b_kind, [&](auto b) {
    for (int64_t i0 = 0; i0 < M; i0 += kNtOutRows) {
      const int64_t mi = min64(kNtOutRows, M - i0);
      const OutputEpilogue<float> rows = e.from_row(i0);
      for (int64_t k0 = 0; k0 < K; k0 += kNtOutCols) {
        const int64_t kc = min64(kNtOutCols, K - k0);
        project_nt_rows<4>(mi, kc, N, A + i0 * lda, lda, b + k0 * ldb, ldb, u, kNtOutCols);
        finish_rows(mi, kc, u, kNtOutCols, k0, rows);
      }
    }
  });
}

// r[c] = column c of the 16 x 16 tile whose rows r held: pairs of rows interleaved (unpack_ps),
// then pairs of pairs (unpack_pd), which leaves in 128-bit lane L of u[4 q + c] rows 4q..4q+3 of
// column 4L + c; two rounds of 128-bit lane shuffles gather each column's four lanes.
ALWAYS_INLINE void transpose_tile(__m512 (&r)[kLanes]) {
  __m512 t[kLanes];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 u[kLanes];
  for (int q = 0; q < 4; ++q) {
    const __m512d a = _mm512_castps_pd(t[4 * q]), b = _mm512_castps_pd(t[4 * q + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * q + 1]), e = _mm512_castps_pd(t[4 * q + 3]);
    u[4 * q + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, e));
    u[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, e));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 p0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
    const __m512 p1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);
    const __m512 q0 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 q1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_f32x4(p0, q0, 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(p0, q0, 0xdd);
    r[c + 4] = _mm512_shuffle_f32x4(p1, q1, 0x88);
    r[c + 12] = _mm512_shuffle_f32x4(p1, q1, 0xdd);
  }
}

// B[k, i] = A[i, k] for a whole 16 x 16 tile: loads, shuffles and stores with no masks or
// per-row tests, unrolled. The masked form (transpose_impl's edge tiles) spilled its row pointers
// and tested each row's bounds, which made the forward's two weight transposes cost as much as a
// GEMM of 128 rows (float16, d = 1024, r = 64: ~17% of the samples of an inference call, perf).
template <typename Ta>
ALWAYS_INLINE void transpose_full_tile(const Ta* A, int64_t lda, float* B, int64_t ldb) {
  __m512 r[kLanes];
#pragma GCC unroll 16
  for (int t = 0; t < kLanes; ++t) r[t] = load_as_float(A + t * lda, __mmask16(0xFFFF));
  transpose_tile(r);
#pragma GCC unroll 16
  for (int t = 0; t < kLanes; ++t) _mm512_storeu_ps(B + t * ldb, r[t]);
}

// A is float, or 16-bit storage widened as it is loaded (widen_transposed).
template <typename Ta>
void transpose_impl(int64_t M, int64_t K, const Ta* A, int64_t lda, float* B) {
  const int64_t ldb = M;
  for (int64_t i0 = 0; i0 < M; i0 += kLanes) {
    const int64_t mi = min64(kLanes, M - i0);
    const __mmask16 row_mask = lanes(mi);
    for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
      const int64_t kc = min64(kLanes, K - k0);
      if (mi == kLanes && kc == kLanes) {
        transpose_full_tile(A + i0 * lda + k0, lda, B + k0 * ldb + i0, ldb);
        continue;
      }
      const __mmask16 col_mask = lanes(kc);
      __m512 r[kLanes];
      for (int t = 0; t < kLanes; ++t) {
        r[t] = t < mi ? load_as_float(A + (i0 + t) * lda + k0, col_mask) : _mm512_setzero_ps();
      }
      transpose_tile(r);
      for (int t = 0; t < kc; ++t) store(B + (k0 + t) * ldb + i0, r[t], row_mask);
    }
  }
}

void transpose(int64_t M, int64_t K, const float* A, int64_t lda, float* B) { transpose_impl(M, K, A, lda, B); }

void widen_transposed(int64_t M, int64_t K, const void* A, Kind a_kind, int64_t lda, float* B) {
  with_stored(A, a_kind, [&](auto a) { transpose_impl(M, K, a, lda, B); });
}

}  // namespace

const BlockKernels<float>* kernels() {
  static const BlockKernels<float> table{"avx512", &project_in, &accumulate_outer, &detail::project_out,
                                         &transpose, &detail::dropout_keep, &project_in_stored,
                                         &accumulate_outer_stored, &widen_transposed, &project_nt,
                                         &project_out_nt};
  return &table;
}

}  // namespace adapterfast::cpu::avx512

#endif
#include "block_kernels_avx512_end.h"

#ifndef ADAPTERFAST_AVX512_KERNELS
namespace adapterfast::cpu::avx512 {

const BlockKernels<float>* kernels() { return nullptr; }

void finish_rows(int64_t, int64_t, const float*, int64_t, int64_t, const OutputEpilogue<float>&) {}

}  // namespace adapterfast::cpu::avx512
#endif
