// AVX-512 row kernels for float (contract in grouped_row_kernels.h): project_in_rows and
// accumulate_outer_rows, the AVX-512 project_in and accumulate_outer of block_kernels_avx512.cpp
// (same K chunks, summation runs and tiles, so the same bits) with each row of the wide operand
// read where it lies in x (or grad_y), on the register tile of block_kernels_avx512.h.
#include "block_kernels.h"
#include "grouped_row_kernels.h"

#include <cstdint>
#include <type_traits>

#include "block_kernels_avx512_begin.h"
#ifdef ADAPTERFAST_AVX512_KERNELS
#include "block_kernels_avx512.h"

namespace adapterfast::cpu::avx512 {
namespace {

// Rows [i0, M) of the list in tiles of kRows (a last tile of at most half its rows in smaller ones,
// kTailRows), columns [n0, n0 + kVecs * 16) of C; x[rows[i]] + k0
// is row i's part of this K chunk. Rows up to `ahead` entries of the list are prefetched one tile
// ahead when `prefetch` (the first column tile: later ones find the rows in cache).
template <int kRows, int kVecs>
void tiles_rows(int64_t i_begin, int64_t M, int64_t N, int64_t n0, int64_t K, const float* X, int64_t ldx,
                const int64_t* rows, int64_t ahead, bool prefetch, const float* B, int64_t ldb, float* C, int64_t ldc,
                bool accumulate) {
  const TileColumns<kVecs> cols(N, n0);
  const int64_t own = i_begin + rows_in_own_tiles<kRows>(M - i_begin);
  for (int64_t i0 = i_begin; i0 < own; i0 += kRows) {
    const int64_t mi = min64(kRows, own - i0);
    const float* x[kRows];
    const float* next[kRows];
    for (int t = 0; t < kRows; ++t) {
      x[t] = X + rows[i0 + min64(t, mi - 1)] * ldx;
      const int64_t j = i0 + kRows + t;
      next[t] = prefetch && j < ahead ? X + rows[j] * ldx : nullptr;
    }
    float* c = C + (i0 - i_begin) * ldc + n0;
    if (cols.full) {
      project_in_tile<true, kRows>(mi, K, x, next, B + n0, ldb, cols, c, ldc, accumulate);
    } else {
      project_in_tile<false, kRows>(mi, K, x, next, B + n0, ldb, cols, c, ldc, accumulate);
    }
  }
  if (own < M) {
    tiles_rows<kTailRows<kRows>, kVecs>(own, M, N, n0, K, X, ldx, rows, ahead, prefetch, B, ldb,
                                        C + (own - i_begin) * ldc, ldc, accumulate);
  }
}

// project_in's tiling (block_kernels_avx512.cpp) over the listed rows.
void project_in_rows(int64_t M, int64_t N, int64_t K, const float* X, int64_t ldx, const int64_t* rows, int64_t ahead,
                     const float* B, int64_t ldb, float* C, int64_t ldc) {
  for (int64_t k0 = 0; k0 < K; k0 += kInChunk) {
    const int64_t kc = min64(kInChunk, K - k0);
    const float* x = X + k0;
    const float* b = B + k0 * ldb;
    for (int64_t n0 = 0; n0 < N; n0 += 4 * kLanes) {
      const bool prefetch = n0 == 0;
      switch ((min64(N - n0, 4 * kLanes) + kLanes - 1) / kLanes) {
        case 1: {
          const int64_t full = rows_share_l1_sets(ldx * static_cast<int64_t>(sizeof(float))) ? 0 : M / 16 * 16;
          tiles_rows<16, 1>(0, full, N, n0, kc, x, ldx, rows, ahead, prefetch, b, ldb, C, ldc, k0 > 0);
          tiles_rows<8, 1>(full, M, N, n0, kc, x, ldx, rows, ahead, prefetch, b, ldb, C + full * ldc, ldc, k0 > 0);
          break;
        }
        case 2: tiles_rows<8, 2>(0, M, N, n0, kc, x, ldx, rows, ahead, prefetch, b, ldb, C, ldc, k0 > 0); break;
        case 3: tiles_rows<8, 3>(0, M, N, n0, kc, x, ldx, rows, ahead, prefetch, b, ldb, C, ldc, k0 > 0); break;
        default: tiles_rows<6, 4>(0, M, N, n0, kc, x, ldx, rows, ahead, prefetch, b, ldb, C, ldc, k0 > 0); break;
      }
    }
  }
}

// tile.acc[t][v] += sum_s a[t][s * lda] * b_s[16 v : +16] for s in [0, S), b_s = X[rows[s]] + k0:
// block_kernels_avx512.h's rank update with row s of its B operand found through the row list.
// With kPrefetch, each row's next tile of columns is requested into L1 and, with `far`, the tile
// after it into L2.
template <bool kFull, bool kPrefetch, int kRows, int kVecs>
ALWAYS_INLINE void rank_update_rows(int64_t S, const float* const (&a)[kRows], int64_t lda, const float* X,
                                    int64_t ldx, const int64_t* rows, int64_t k0, const __mmask16 (&m)[kVecs],
                                    Tile<kRows, kVecs>& tile, bool far = false) {
  for (int64_t s = 0; s < S; ++s) {
    const float* row = X + rows[s] * ldx + k0;
    if constexpr (kPrefetch) {
      for (int v = 0; v < kVecs; ++v) {
        _mm_prefetch(reinterpret_cast<const char*>(row + (kVecs + v) * kLanes), _MM_HINT_T0);
        if (far) _mm_prefetch(reinterpret_cast<const char*>(row + (2 * kVecs + v) * kLanes), _MM_HINT_T1);
      }
    }
    __m512 vb[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      vb[v] = kFull ? _mm512_loadu_ps(row + v * kLanes) : _mm512_maskz_loadu_ps(m[v], row + v * kLanes);
    }
    for (int t = 0; t < kRows; ++t) {
      const __m512 va = _mm512_set1_ps(a[t][s * lda]);
      for (int v = 0; v < kVecs; ++v) tile.acc[t][v] = _mm512_fmadd_ps(va, vb[v], tile.acc[t][v]);
    }
  }
}

// accumulate_outer's tiling (block_kernels_avx512.cpp: 8 x 3 tiles over [N, K], the M rows summed
// in registers, then added to C) over the listed rows. The operand (x in the backward) comes from
// memory in a random row order: M rows at once, more pages than the hardware prefetcher tracks,
// each row visited once per 48-column tile. So the kernel streams them itself: the first pass over
// each tile requests, per row, the next tile into L1 and the one after into L2 (rank_update_rows),
// and the first tile's pass also requests the first two tiles of the `ahead` rows that follow
// (the caller's next block) into L2.
void accumulate_outer_rows(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* X, int64_t ldx,
                           const int64_t* rows, int64_t ahead, float* C, int64_t ldc) {
  using T = Tile<8, 3>;
  for (int64_t k0 = 0; k0 < K; k0 += T::kCols) {
    const TileColumns<3> cols(K, k0);
    if (k0 == 0) {
      const int64_t lines = min64(6, (K * 4 + 63) / 64);
      for (int64_t j = M; j < min64(ahead, 2 * M); ++j) {
        const char* p = reinterpret_cast<const char*>(X + rows[j] * ldx);
        for (int64_t line = 0; line < lines; ++line) _mm_prefetch(p + 64 * line, _MM_HINT_T1);
      }
    }
    for (int64_t j0 = 0; j0 < N; j0 += 8) {
      const int64_t nj = min64(8, N - j0);
      const float* a[8];
      for (int t = 0; t < 8; ++t) a[t] = A + j0 + min64(t, nj - 1);
      T tile;
      for (auto& row : tile.acc) {
        for (auto& v : row) v = _mm512_setzero_ps();
      }
      if (!cols.full) {
        rank_update_rows<false, false>(M, a, lda, X, ldx, rows, k0, cols.m, tile);
      } else if (j0 == 0 && k0 + T::kCols < K) {
        rank_update_rows<true, true>(M, a, lda, X, ldx, rows, k0, cols.m, tile, k0 + 2 * T::kCols < K);
      } else {
        rank_update_rows<true, false>(M, a, lda, X, ldx, rows, k0, cols.m, tile);
      }
      add_tile(tile, cols, nj, C + j0 * ldc + k0, ldc);
    }
  }
}

}  // namespace
}  // namespace adapterfast::cpu::avx512

namespace adapterfast::cpu::grouped::avx512 {

const RowKernels<float>* row_kernels() {
  static const RowKernels<float> table{"avx512", &cpu::avx512::project_in_rows, &cpu::avx512::accumulate_outer_rows};
  return &table;
}

}  // namespace adapterfast::cpu::grouped::avx512

#endif
#include "block_kernels_avx512_end.h"

#ifndef ADAPTERFAST_AVX512_KERNELS
namespace adapterfast::cpu::grouped::avx512 {

const RowKernels<float>* row_kernels() { return nullptr; }

}  // namespace adapterfast::cpu::grouped::avx512
#endif
