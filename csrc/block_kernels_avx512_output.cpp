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

// The epilogue's operands with the row mapping applied: where one row's residual, keep mask and
// output start. Read out of the OutputEpilogue once per call into locals, and row pointers
// formed once per tile row: the kernel's float stores may alias the struct's fields, so fields
// read per output vector were reloaded after every store, and at r = 16 (16 FMAs per output
// vector) that bookkeeping cost about as many instructions as the products. With it hoisted,
// project_out on one 64-row block in cache (d = 768, r = 16, 1 thread, old and new kernels
// interleaved in one process) took 22% less time (49 -> 62 GFLOP/s), and 9-13% less streaming
// over N = 1024 rows; memory-bound at N = 4096, unchanged.
template <typename ResTag, typename Out>
struct EpilogueRows {
  using Res = typename Storage<ResTag>::type;
  const Res* res;
  int64_t ld_res;
  const int64_t* res_rows;
  const uint8_t* keep;
  int64_t ld_keep;
  Out* out;
  int64_t ld_out;
  const int64_t* out_rows;

  explicit EpilogueRows(const OutputEpilogue<float>& e)
      : res(static_cast<const Res*>(e.res)), ld_res(e.ld_res), res_rows(e.res_rows), keep(e.keep),
        ld_keep(e.ld_keep), out(static_cast<Out*>(e.out)), ld_out(e.ld_out), out_rows(e.out_rows) {}

  const Res* res_at(int64_t row, int64_t k0) const {
    return res + (res_rows == nullptr ? row : res_rows[row]) * ld_res + k0;
  }
  const uint8_t* keep_at(int64_t row, int64_t k0) const { return keep == nullptr ? nullptr : keep + row * ld_keep + k0; }
  Out* out_at(int64_t row, int64_t k0) const { return out + (out_rows == nullptr ? row : out_rows[row]) * ld_out + k0; }
};

// out[0 : 16 kVecs] = epilogue(acc + bias) for one row of a project_out tile, its residual, keep
// mask (null: none) and output starting at the tile's first column. kFull: every lane in use.
template <typename ResTag, typename Out, bool kStream, bool kFull, int kVecs>
ALWAYS_INLINE void finish_row(const typename Storage<ResTag>::type* res, const uint8_t* keep, Out* out,
                              const TileColumns<kVecs>& cols, const __m512 (&acc)[kVecs],
                              const __m512 (&bias)[kVecs], __m512 scale) {
  // Request the residual of this row's next tile (project_out_tiles's next step).
  if constexpr (kFull && !std::is_same_v<ResTag, NoResidual>) {
    for (int v = 0; v < kVecs; ++v) _mm_prefetch(reinterpret_cast<const char*>(res + (kVecs + v) * kLanes), _MM_HINT_T0);
  }
  for (int v = 0; v < kVecs; ++v) {
    const __mmask16 m = kFull ? __mmask16(0xFFFF) : cols.m[v];
    if (!kFull && m == 0) continue;
    __m512 factor = scale;
    if (keep != nullptr) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(keep + v * kLanes));
      factor = _mm512_maskz_mov_ps(_mm_test_epi8_mask(bytes, bytes), scale);
    }
    __m512 base = _mm512_setzero_ps();
    if constexpr (!std::is_same_v<ResTag, NoResidual>) base = load_as_float(res + v * kLanes, m);
    const __m512 y = _mm512_fmadd_ps(factor, _mm512_add_ps(acc[v], bias[v]), base);
    store_from_float<kStream>(out + v * kLanes, y, m);
  }
}

// finish_row for rows [i0, i0 + mi) of a tile at column k0.
template <typename ResTag, typename Out, bool kStream, bool kFull, int kRows, int kVecs>
ALWAYS_INLINE void finish_tile(const EpilogueRows<ResTag, Out>& rows, int64_t i0, int64_t mi, int64_t k0,
                               const TileColumns<kVecs>& cols, const Tile<kRows, kVecs>& tile,
                               const __m512 (&bias)[kVecs], __m512 scale) {
#pragma GCC unroll 8
  for (int t = 0; t < kRows; ++t) {
    if (t >= mi) break;
    const int64_t row = i0 + t;
    finish_row<ResTag, Out, kStream, kFull>(rows.res_at(row, k0), rows.keep_at(row, k0), rows.out_at(row, k0), cols,
                                            tile.acc[t], bias, scale);
  }
}

// One column step of project_out_tiles: rows [i0, i0 + mi) of the product in a kRows x 4 tile,
// finished by the epilogue straight from the registers.
template <typename ResTag, typename Out>
struct OutTileStep {
  const EpilogueRows<ResTag, Out>& rows;
  bool stream;
  int64_t N;
  const float* A;
  int64_t lda;
  const float* B;
  int64_t ldb;
  int64_t k0;
  const TileColumns<4>& cols;
  const __m512 (&bias)[4];
  __m512 scale;

  template <int kRows>
  ALWAYS_INLINE void run(int64_t i0, int64_t mi) const {
    const float* a[kRows];
    for (int t = 0; t < kRows; ++t) a[t] = A + (i0 + min64(t, mi - 1)) * lda;
    Tile<kRows, 4> tile;
    rank_update(cols, N, a, 1, B + k0, ldb, /*prefetch_next=*/false, tile);
    if (!cols.full) {
      finish_tile<ResTag, Out, false, false>(rows, i0, mi, k0, cols, tile, bias, scale);
    } else if (stream) {
      finish_tile<ResTag, Out, true, true>(rows, i0, mi, k0, cols, tile, bias, scale);
    } else {
      finish_tile<ResTag, Out, false, true>(rows, i0, mi, k0, cols, tile, bias, scale);
    }
  }
};

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
  using OutTile = OutTileStep<ResTag, Out>;
  // Streaming writes whole cache lines only: every row must start on a line (a full tile is
  // 4 lines of float or 2 of bf16).
  constexpr int64_t kLine = 64;
  const bool stream = e.stream_out && reinterpret_cast<uintptr_t>(e.out) % kLine == 0 &&
                      (e.ld_out * static_cast<int64_t>(sizeof(Out))) % kLine == 0;
  const __m512 scale = _mm512_set1_ps(e.scale);
  const float* const bias_data = e.bias;
  const EpilogueRows<ResTag, Out> rows(e);
  for (int64_t g0 = 0; g0 < M; g0 += kGroupRows) {
    const int64_t group_end = min64(M, g0 + kGroupRows);
    for (int64_t k0 = 0; k0 < K; k0 += T::kCols) {
      const TileColumns<4> cols(K, k0);
      __m512 bias[4];
      for (int v = 0; v < 4; ++v) {
        bias[v] = bias_data == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(cols.m[v], bias_data + k0 + v * kLanes);
      }
      for (int64_t i0 = g0; i0 < group_end; i0 += kRows) {
        const int64_t mi = min64(kRows, M - i0);
        const OutTile step{rows, stream, N, A, lda, B, ldb, k0, cols, bias, scale};
        if (2 * mi > kRows) {
          step.template run<kRows>(i0, mi);
        } else {  // the last rows, at most half a tile: 2- and 1-row tiles (kTailRows)
          if (mi >= 2) step.template run<2>(i0, 2);
          if (mi % 2 == 1) step.template run<1>(i0 + mi - 1, 1);
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
  const EpilogueRows<ResTag, Out> rows(e);
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
      const int64_t k = col0 + k0;
      if (!cols.full) {
        finish_row<ResTag, Out, false, false>(rows.res_at(i, k), rows.keep_at(i, k), rows.out_at(i, k), cols, acc, bias, scale);
      } else if (stream) {
        finish_row<ResTag, Out, true, true>(rows.res_at(i, k), rows.keep_at(i, k), rows.out_at(i, k), cols, acc, bias, scale);
      } else {
        finish_row<ResTag, Out, false, true>(rows.res_at(i, k), rows.keep_at(i, k), rows.out_at(i, k), cols, acc, bias, scale);
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
