// AVX-512 project_out (contract in block_kernels.h): the [rows, r] x [r, d] product with the
// output epilogue (bias, dropout mask, scale, residual, conversion to the output's dtype) applied
// to each register tile as it leaves the registers, and the same epilogue over a product computed
// elsewhere (finish_rows, for the brgemm drivers).
#include "block_kernels.h"

#include <cstdint>
#include <type_traits>

#include "block_kernels_avx512_begin.h"
#ifdef ADAPTERFAST_AVX512_KERNELS
#include "block_kernels_avx512.h"

namespace adapterfast::cpu::avx512 {
namespace {

// out[row, k0 : k0 + 16 kVecs] = epilogue(acc + bias) for one row of a project_out tile.
template <typename ResTag, typename Out, bool kStream, int kVecs>
ALWAYS_INLINE void finish_row(const OutputEpilogue<float>& e, int64_t row, int64_t k0, const TileColumns<kVecs>& cols,
                              const __m512 (&acc)[kVecs], const __m512 (&bias)[kVecs], __m512 scale) {
  using Res = typename Storage<ResTag>::type;
  Out* out = static_cast<Out*>(e.out) + e.out_row(row) * e.ld_out + k0;
  for (int v = 0; v < kVecs; ++v) {
    if (cols.m[v] == 0) continue;
    __m512 factor = scale;
    if (e.keep != nullptr) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(e.keep + row * e.ld_keep + k0 + v * kLanes));
      factor = _mm512_maskz_mov_ps(_mm_test_epi8_mask(bytes, bytes), scale);
    }
    __m512 base = _mm512_setzero_ps();
    if constexpr (!std::is_same_v<ResTag, NoResidual>) {
      const Res* res = static_cast<const Res*>(e.res) + e.res_row(row) * e.ld_res + k0 + v * kLanes;
      // Request the residual of this row's next tile (project_out_tiles's next step).
      if (cols.full) _mm_prefetch(reinterpret_cast<const char*>(res + kVecs * kLanes), _MM_HINT_T0);
      base = load_as_float(res, cols.m[v]);
    }
    const __m512 y = _mm512_fmadd_ps(factor, _mm512_add_ps(acc[v], bias[v]), base);
    store_from_float<kStream>(out + v * kLanes, y, cols.m[v]);
  }
}

// 6 x 4 tiles over the [M, K] output, each finished by the epilogue straight from the registers.
// Rows in groups of kGroupTiles tiles, each group walked left to right by column slices, the
// group's tiles one after the other per slice: its rows of residual and output are walked left to
// right, 24 sequential streams the hardware prefetchers follow, where column slices outer over
// the whole block (64 rows) walked them in 256-byte pieces 6 rows apart, every piece a miss of its
// own; the output (dx in the backward, y in the forward) is rarely in cache, and that order made
// the backward's project_out ~2.6x project_in's time for the same FLOPs (perf, N = 1024, d = 768,
// r = 16). B's [r, 64] slice (4 KiB at r = 16), rows ldb apart, comes from L2 for the group's
// first tile and from L1 for the others: with one tile per group (B, 48 KiB at d = 768, read
// from L2 once per row tile) the loop waited on those strided loads, 55 GFLOP/s in cache against
// project_in's 90 at N = 64, d = 768, r = 16 (a project_out microbenchmark, 1 thread).
// (At r = 16 a 4 x 4 tile, and accumulators started at the bias, measured no faster.)
template <typename ResTag, typename OutTag>
void project_out_tiles(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                       int64_t ldb, const OutputEpilogue<float>& e) {
  using Out = typename Storage<OutTag>::type;
  constexpr int kRows = 6;
  constexpr int64_t kGroupRows = 4 * kRows;
  using T = Tile<kRows, 4>;
  // Streaming writes whole cache lines only: every row must start on a line (a full tile is
  // 4 lines of float or 2 of bf16).
  constexpr int64_t kLine = 64;
  const bool stream = e.stream_out && reinterpret_cast<uintptr_t>(e.out) % kLine == 0 &&
                      (e.ld_out * static_cast<int64_t>(sizeof(Out))) % kLine == 0;
  const __m512 scale = _mm512_set1_ps(e.scale);
  for (int64_t g0 = 0; g0 < M; g0 += kGroupRows) {
    const int64_t group_end = min64(M, g0 + kGroupRows);
    for (int64_t k0 = 0; k0 < K; k0 += T::kCols) {
      const TileColumns<4> cols(K, k0);
      __m512 bias[4];
      for (int v = 0; v < 4; ++v) {
        bias[v] = e.bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(cols.m[v], e.bias + k0 + v * kLanes);
      }
      for (int64_t i0 = g0; i0 < group_end; i0 += kRows) {
        const int64_t mi = min64(kRows, M - i0);
        const float* a[kRows];
        for (int t = 0; t < kRows; ++t) a[t] = A + (i0 + min64(t, mi - 1)) * lda;
        T tile;
        rank_update(cols, N, a, 1, B + k0, ldb, /*prefetch_next=*/false, tile);
#pragma GCC unroll 6
        for (int t = 0; t < kRows; ++t) {
          if (t >= mi) break;
          if (stream && cols.full) {
            finish_row<ResTag, Out, true>(e, i0 + t, k0, cols, tile.acc[t], bias, scale);
          } else {
            finish_row<ResTag, Out, false>(e, i0 + t, k0, cols, tile.acc[t], bias, scale);
          }
        }
      }
    }
  }
  if (stream) _mm_sfence();
}

template <typename ResTag>
void project_out_to(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, const OutputEpilogue<float>& e) {
  if (e.out_kind == Kind::bf16) {
    project_out_tiles<ResTag, Bf16>(M, N, K, A, lda, B, ldb, e);
  } else if (e.out_kind == Kind::f16) {
    project_out_tiles<ResTag, F16>(M, N, K, A, lda, B, ldb, e);
  } else {
    project_out_tiles<ResTag, float>(M, N, K, A, lda, B, ldb, e);
  }
}

// The epilogue of project_out_tiles over a product already in memory, 4 vectors per step.
template <typename ResTag, typename OutTag>
void finish_rows_as(int64_t M, int64_t K, const float* u, int64_t ldu, int64_t col0,
                    const OutputEpilogue<float>& e) {
  using Out = typename Storage<OutTag>::type;
  constexpr int64_t kLine = 64;
  const bool stream = e.stream_out && reinterpret_cast<uintptr_t>(e.out) % kLine == 0 &&
                      (e.ld_out * static_cast<int64_t>(sizeof(Out))) % kLine == 0 &&
                      (col0 * static_cast<int64_t>(sizeof(Out))) % kLine == 0;
  const __m512 scale = _mm512_set1_ps(e.scale);
  for (int64_t k0 = 0; k0 < K; k0 += 4 * kLanes) {
    const TileColumns<4> cols(K, k0);
    __m512 bias[4];
    for (int v = 0; v < 4; ++v) {
      bias[v] = e.bias == nullptr ? _mm512_setzero_ps()
                                  : _mm512_maskz_loadu_ps(cols.m[v], e.bias + col0 + k0 + v * kLanes);
    }
    for (int64_t i = 0; i < M; ++i) {
      __m512 acc[4];
      for (int v = 0; v < 4; ++v) acc[v] = _mm512_maskz_loadu_ps(cols.m[v], u + i * ldu + k0 + v * kLanes);
      if (stream && cols.full) {
        finish_row<ResTag, Out, true>(e, i, col0 + k0, cols, acc, bias, scale);
      } else {
        finish_row<ResTag, Out, false>(e, i, col0 + k0, cols, acc, bias, scale);
      }
    }
  }
  if (stream) _mm_sfence();
}

template <typename ResTag>
void finish_rows_to(int64_t M, int64_t K, const float* u, int64_t ldu, int64_t col0,
                    const OutputEpilogue<float>& e) {
  if (e.out_kind == Kind::bf16) {
    finish_rows_as<ResTag, Bf16>(M, K, u, ldu, col0, e);
  } else if (e.out_kind == Kind::f16) {
    finish_rows_as<ResTag, F16>(M, K, u, ldu, col0, e);
  } else {
    finish_rows_as<ResTag, float>(M, K, u, ldu, col0, e);
  }
}

}  // namespace

namespace detail {

void project_out(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, const OutputEpilogue<float>& e) {
  if (e.res == nullptr) {
    project_out_to<NoResidual>(M, N, K, A, lda, B, ldb, e);
  } else if (e.res_kind == Kind::bf16) {
    project_out_to<Bf16>(M, N, K, A, lda, B, ldb, e);
  } else if (e.res_kind == Kind::f16) {
    project_out_to<F16>(M, N, K, A, lda, B, ldb, e);
  } else {
    project_out_to<float>(M, N, K, A, lda, B, ldb, e);
  }
}

}  // namespace detail

void finish_rows(int64_t M, int64_t K, const float* u, int64_t ldu, int64_t col0,
                 const OutputEpilogue<float>& e) {
  if (e.res == nullptr) {
    finish_rows_to<NoResidual>(M, K, u, ldu, col0, e);
  } else if (e.res_kind == Kind::bf16) {
    finish_rows_to<Bf16>(M, K, u, ldu, col0, e);
  } else if (e.res_kind == Kind::f16) {
    finish_rows_to<F16>(M, K, u, ldu, col0, e);
  } else {
    finish_rows_to<float>(M, K, u, ldu, col0, e);
  }
}

}  // namespace adapterfast::cpu::avx512

#endif
#include "block_kernels_avx512_end.h"
