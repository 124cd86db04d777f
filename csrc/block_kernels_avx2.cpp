// project_in, project_nt and project_out for float on AVX2 register tiles (block_kernels.h's
// contract), for the BLAS block kernels (block_kernels_blas.cpp, which says where each runs instead
// of sgemm), and the weight transpose they read.
// project_out: the [M, r] x [r, K] product with the output epilogue applied to each tile as it
// leaves the registers, where sgemm writes the product to a buffer that the epilogue then reads
// back (and first zeroes it, and packs both operands, in every call). At r <= 64 the product is a
// few FMAs per output element, so on the eager adapter's footing (the same sgemm) the fused op wins
// only by what it does around the product. project_in: the [M, d] x [d, r] product of narrow r,
// where sgemm's kernels for narrow products ran at half their rate.
//
// project_nt: the same product as project_in from W = B^T as it is, by dot products along K, for
// calls of a few rows, where transposing W costs more than the product.
//
// Each output element of project_out sums its r products in order, from zero; each of project_in sums
// its products in runs of kSumRun, and each of project_nt in 8 lanes: whatever the tile, its bits
// depend on its row of A and column of B only, never on the call's shape or the thread count (but
// project_nt's differ from project_in's).
#include "block_kernels_avx2.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ADAPTERFAST_AVX2_KERNELS 1
// Inlined with their loops unrolled, so that the accumulators are indexed by constants only and
// stay in registers (without, GCC kept the tile on the stack and stored it back at every step).
#define ALWAYS_INLINE inline __attribute__((always_inline))
#endif

namespace adapterfast::cpu::avx2 {

#ifdef ADAPTERFAST_AVX2_KERNELS
namespace {

constexpr int64_t kLanes = 8;
// A tile is kRows rows by two vectors (16 columns, one 64-byte line of a float row): 12 of the 16
// registers accumulate at six rows, with two for B's row and one for A's broadcast element, so
// each step of the product issues two loads of B and six broadcasts for twelve FMAs.
constexpr int kVecs = 2;
constexpr int64_t kTileCols = kVecs * kLanes;
constexpr int kRows = 6;
// Rows whose tiles walk each column slice one after the other: their residual and output rows
// are walked left to right (24 sequential streams the prefetchers follow), and B's [r, 16] slice
// comes from L1 for all but the group's first tile.
constexpr int64_t kGroupRows = 4 * kRows;

// The lane mask of the first n lanes (n clamped to [0, 8]).
inline __m256i lanes(int64_t n) {
  alignas(32) static const int32_t table[2 * kLanes] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  n = std::clamp<int64_t>(n, 0, kLanes);
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + kLanes - n));
}

// The lanes of a tile's two vectors that fall inside the n columns left from its first one.
struct Columns {
  __m256i m[kVecs];
  bool full;
  explicit Columns(int64_t n) : full(n >= kTileCols) {
    for (int v = 0; v < kVecs; ++v) m[v] = lanes(n - v * kLanes);
  }
};

template <bool kFull>
ALWAYS_INLINE __m256 load(const float* p, __m256i m) {
  return kFull ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m);
}

// The epilogue's operands read out of the OutputEpilogue once: the kernel's float stores may alias
// the struct's fields, which would otherwise be reloaded after every store.
struct Rows {
  const float* res;
  int64_t ld_res;
  const int64_t* res_rows;
  const uint8_t* keep;
  int64_t ld_keep;
  float* out;
  int64_t ld_out;
  const int64_t* out_rows;

  explicit Rows(const OutputEpilogue<float>& e)
      : res(static_cast<const float*>(e.res)), ld_res(e.ld_res), res_rows(e.res_rows), keep(e.keep),
        ld_keep(e.ld_keep), out(static_cast<float*>(e.out)), ld_out(e.ld_out), out_rows(e.out_rows) {}

  const float* res_at(int64_t row, int64_t k0) const {
    return res + (res_rows == nullptr ? row : res_rows[row]) * ld_res + k0;
  }
  const uint8_t* keep_at(int64_t row, int64_t k0) const { return keep == nullptr ? nullptr : keep + row * ld_keep + k0; }
  float* out_at(int64_t row, int64_t k0) const { return out + (out_rows == nullptr ? row : out_rows[row]) * ld_out + k0; }
};

// acc[t][v] += a[t lda] b[v] for the kTile rows of a tile: one step of its rank update (one broadcast
// per row, kV FMAs each).
template <int kTile, int kV>
ALWAYS_INLINE void rank_one(const float* a, int64_t lda, const __m256 (&b)[kV], __m256 (&acc)[kTile][kV]) {
#pragma GCC unroll 12
  for (int t = 0; t < kTile; ++t) {
    const __m256 x = _mm256_broadcast_ss(a + t * lda);
#pragma GCC unroll 2
    for (int v = 0; v < kV; ++v) acc[t][v] = _mm256_fmadd_ps(x, b[v], acc[t][v]);
  }
}

// What one tile needs besides its rows: the product's operands and the epilogue of its columns.
struct Step {
  const Rows& rows;
  int64_t N;
  const float* A;
  int64_t lda;
  const float* B;  // B's columns [k0, k0 + 16): N rows of 16, ldb apart (a panel: 16, zero past K)
  int64_t ldb;
  int64_t k0;
  const Columns& cols;
  __m256 bias[kVecs];
  __m256 scale;
};

// out = res + factor * (acc + bias) for one row's two vectors, factor = scale where keep is set.
// kStream: non-temporal stores (full tiles of 32-byte aligned rows only).
template <bool kRes, bool kFull, bool kStream>
ALWAYS_INLINE void finish_row(const Step& s, int64_t row, const __m256 (&acc)[kVecs]) {
  const float* res = kRes ? s.rows.res_at(row, s.k0) : nullptr;
  const uint8_t* keep = s.rows.keep_at(row, s.k0);
  float* out = s.rows.out_at(row, s.k0);
#pragma GCC unroll 2
  for (int v = 0; v < kVecs; ++v) {
    __m256 factor = s.scale;
    if (keep != nullptr) {
      // keep's rows are padded to kKeepAlign bytes, so a partial tile may read its 16 bytes whole.
      const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(keep + v * kLanes)));
      const __m256 dropped = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bytes, _mm256_setzero_si256()));
      factor = _mm256_andnot_ps(dropped, factor);
    }
    const __m256 base = kRes ? load<kFull>(res + v * kLanes, s.cols.m[v]) : _mm256_setzero_ps();
    const __m256 y = _mm256_fmadd_ps(factor, _mm256_add_ps(acc[v], s.bias[v]), base);
    if constexpr (kStream) {
      _mm256_stream_ps(out + v * kLanes, y);
    } else if constexpr (kFull) {
      _mm256_storeu_ps(out + v * kLanes, y);
    } else {
      _mm256_maskstore_ps(out + v * kLanes, s.cols.m[v], y);
    }
  }
}

// Rows [i0, i0 + kTile) of the product's columns [k0, k0 + 16), finished from the registers.
template <int kTile, bool kRes, bool kFull, bool kStream>
ALWAYS_INLINE void tile(const Step& s, int64_t i0) {
  __m256 acc[kTile][kVecs];
#pragma GCC unroll 6
  for (int t = 0; t < kTile; ++t) {
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v) acc[t][v] = _mm256_setzero_ps();
  }
  const float* a = s.A + i0 * s.lda;
  const int64_t lda = s.lda;
  const float* b_row = s.B;
  for (int64_t j = 0; j < s.N; ++j, b_row += s.ldb) {
    __m256 b[kVecs];
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v) b[v] = load<kFull>(b_row + v * kLanes, s.cols.m[v]);
    rank_one(a + j, lda, b, acc);
  }
#pragma GCC unroll 6
  for (int t = 0; t < kTile; ++t) finish_row<kRes, kFull, kStream>(s, i0 + t, acc[t]);
}

// Rows [i0, i1) in tiles of 6, the last 1 to 5 rows in tiles of 4, 2 and 1 (a tile computes all its rows).
template <bool kRes, bool kFull, bool kStream>
void tiles(const Step& s, int64_t i0, int64_t i1) {
  for (; i0 + kRows <= i1; i0 += kRows) tile<kRows, kRes, kFull, kStream>(s, i0);
  if (i0 + 4 <= i1) {
    tile<4, kRes, kFull, kStream>(s, i0);
    i0 += 4;
  }
  if (i0 + 2 <= i1) {
    tile<2, kRes, kFull, kStream>(s, i0);
    i0 += 2;
  }
  if (i0 < i1) tile<1, kRes, kFull, kStream>(s, i0);
}

// The 8 x 8 tile in r transposed: r[c] becomes column c (unpack pairs of rows, then pairs of
// pairs, then swap 128-bit halves).
ALWAYS_INLINE void transpose8(__m256 (&r)[kLanes]) {
  __m256 t[kLanes], u[kLanes];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int q = 0; q < 2; ++q) {
    u[4 * q + 0] = _mm256_shuffle_ps(t[4 * q], t[4 * q + 2], 0x44);
    u[4 * q + 1] = _mm256_shuffle_ps(t[4 * q], t[4 * q + 2], 0xEE);
    u[4 * q + 2] = _mm256_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0x44);
    u[4 * q + 3] = _mm256_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[c + 4] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

// B [N, K] (rows ldb apart) as panels of 16 columns, each N rows of 16 contiguous floats, zero past
// K. The tiles read a panel row by row: from B itself, a row stride that is a multiple of 4 KiB
// (d = 1024, 4096, ...) put all of a panel's N lines in one L1 set, and at d = 4096, r = 64 the
// product ran at 0.73x the eager adapter's (N = 2048, inference, one thread) against sgemm's 1.07x.
thread_local std::vector<float> panels_buffer;

const float* panels(int64_t N, int64_t K, const float* B, int64_t ldb) {
  const int64_t count = (K + kTileCols - 1) / kTileCols;
  if (static_cast<int64_t>(panels_buffer.size()) < count * N * kTileCols) {
    panels_buffer.resize(static_cast<size_t>(count * N * kTileCols));
  }
  float* out = panels_buffer.data();
  for (int64_t p = 0; p < count; ++p) {
    const int64_t k0 = p * kTileCols;
    const Columns cols(K - k0);
    for (int64_t j = 0; j < N; ++j) {
      float* row = out + (p * N + j) * kTileCols;
      for (int v = 0; v < kVecs; ++v) {
        _mm256_storeu_ps(row + v * kLanes, load<false>(B + j * ldb + k0 + v * kLanes, cols.m[v]));
      }
    }
  }
  return out;
}

// panels of B = W^T from W [K, N] as it is (rows ldw apart), in one pass: 8 x 8 tiles of W transposed
// in registers. Transposing W first and packing that was two passes over the weight, which at one
// row, d = 4096, r = 16 made the forward 0.91x the eager adapter.
void transposed_panel(int64_t N, int64_t K, const float* W, int64_t ldw, int64_t p0, float* panel) {
  for (int64_t half = 0; half < kTileCols; half += kLanes) {
    const int64_t k0 = p0 + half;
    const int64_t kc = std::clamp<int64_t>(K - k0, 0, kLanes);
    for (int64_t j0 = 0; j0 < N; j0 += kLanes) {
      const int64_t nj = std::min(kLanes, N - j0);
      const __m256i cols = lanes(nj);
      __m256 r[kLanes];
      for (int t = 0; t < kLanes; ++t) r[t] = t < kc ? load<false>(W + (k0 + t) * ldw + j0, cols) : _mm256_setzero_ps();
      transpose8(r);
      for (int64_t c = 0; c < nj; ++c) _mm256_storeu_ps(panel + (j0 + c) * kTileCols + half, r[c]);
    }
  }
}

const float* panels_of_transposed(int64_t N, int64_t K, const float* W, int64_t ldw) {
  const int64_t count = (K + kTileCols - 1) / kTileCols;
  if (static_cast<int64_t>(panels_buffer.size()) < count * N * kTileCols) {
    panels_buffer.resize(static_cast<size_t>(count * N * kTileCols));
  }
  float* out = panels_buffer.data();
  for (int64_t p = 0; p < count; ++p) transposed_panel(N, K, W, ldw, p * kTileCols, out + p * N * kTileCols);
  return out;
}

// Where project_out_as reads B's columns [k0, k0 + 16): from panels packed before the product; made
// from W = B^T into `one` (in L1) just before their tiles, for a call of one row group, which reads
// each panel once; or from B itself, for a call of one row tile, which reads each line of B once
// (the panels are for the tiles after the first: rows of B a multiple of 4 KiB apart share L1 sets).
// Either of the latter spares packing all panels first, which wrote them out and read them back
// (1 MiB at d = 4096, r = 64). Eager adapter over fused, one thread, one process alternating the two
// (medians of 9 rounds, printed, not saved), all packed -> panel by panel, inference: r = 64, d = 4096,
// N = 16 1.08x -> 1.10x, N = 24 1.05x -> 1.06x; d = 1024, N = 8 1.22x -> 1.24x; r = 16, d = 768, N = 16
// 1.48x -> 1.52x (small, but in every cell measured); packed -> B itself, training (dx = dh Wd,
// medians of 9): r = 64, d = 4096, N = 1 0.98x -> 1.02x, N = 4 1.13x -> 1.16x; d = 1024, N = 1 1.17x ->
// 1.20x, N = 6 1.27x -> 1.30x; r = 16, d = 4096, N = 1 1.23x -> 1.27x; d = 768, N = 6 1.32x -> 1.34x.
struct PanelSource {
  const float* packed = nullptr;
  const float* W = nullptr;
  int64_t ldw = 0;
  float* one = nullptr;
  const float* B = nullptr;
  int64_t ldb = 0;

  static PanelSource of_packed(const float* packed) { return {packed}; }
  static PanelSource made_from(const float* W, int64_t ldw, float* one) { return {nullptr, W, ldw, one}; }
  static PanelSource of_b(const float* B, int64_t ldb) { return {nullptr, nullptr, 0, nullptr, B, ldb}; }

  const float* at(int64_t N, int64_t K, int64_t k0) const {
    if (packed != nullptr) return packed + k0 * N;
    if (B != nullptr) return B + k0;
    transposed_panel(N, K, W, ldw, k0, one);
    return one;
  }
  int64_t stride() const { return B != nullptr ? ldb : kTileCols; }
};

template <bool kRes>
void project_out_as(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const PanelSource& panels,
                    const OutputEpilogue<float>& e) {
  const Rows rows(e);
  const bool stream = e.stream_out && reinterpret_cast<uintptr_t>(e.out) % 32 == 0 && e.ld_out % kLanes == 0;
  for (int64_t g0 = 0; g0 < M; g0 += kGroupRows) {
    const int64_t g1 = std::min(M, g0 + kGroupRows);
    for (int64_t k0 = 0; k0 < K; k0 += kTileCols) {
      const Columns cols(K - k0);
      Step s{rows, N, A, lda, panels.at(N, K, k0), panels.stride(), k0, cols, {}, _mm256_set1_ps(e.scale)};
      for (int v = 0; v < kVecs; ++v) {
        s.bias[v] = e.bias == nullptr ? _mm256_setzero_ps() : load<false>(e.bias + k0 + v * kLanes, cols.m[v]);
      }
      if (!cols.full) {
        tiles<kRes, false, false>(s, g0, g1);
      } else if (stream) {
        tiles<kRes, true, true>(s, g0, g1);
      } else {
        tiles<kRes, true, false>(s, g0, g1);
      }
    }
  }
  if (stream) _mm_sfence();
}

// Products project_in sums in registers before adding them to C: K is summed blockwise, so the
// rounding error grows with kSumRun + K / kSumRun rather than with K, as in the AVX-512 kernels.
constexpr int64_t kSumRun = 64;

// Where B is larger than kInWholeBBytes, project_in walks K in chunks of about kInChunkBytes of B,
// each chunk for all row tiles, so that B's rows come from L2: row tile after row tile over all of
// B read it from L3 (1 MiB at d = 4096, r = 64, against this AMD EPYC's 512 KiB of L2). A chunk is
// whole runs, so every element's sums and their order stay as they were. One thread, GFLOP/s of
// the kernel alone, whole B -> chunks (sgemm in brackets; an ad-hoc C++ loop, printed, not saved):
// M = 320, d = 4096, r = 64 52 -> 70 (74); M = 128, d = 4096, r = 32 73 -> 83 (76); at d = 1024,
// r = 64 (256 KiB of B) within the spread. The forward's inference, eager adapter over fused (one
// process alternating the two, medians of 11 rounds), r = 32, d = 4096: N = 64 1.00x -> 1.07x,
// N = 128 1.09x -> 1.14x, N = 200 1.12x -> 1.20x, N = 1024 1.33x -> 1.40x.
constexpr int64_t kInChunkBytes = 64 << 10;
constexpr int64_t kInWholeBBytes = 256 << 10;

// The columns of K per chunk for B of N columns: K itself, or whole runs of `run` products.
inline int64_t k_chunk(int64_t N, int64_t K, int64_t run) {
  const int64_t row_bytes = N * static_cast<int64_t>(sizeof(float));
  if (K * row_bytes <= kInWholeBBytes) return K;
  return std::max<int64_t>(1, kInChunkBytes / row_bytes / run) * run;
}

// C[0:kTile, 0:8 kInVecs] += A[0:kTile, k_begin:K] B[k_begin:K, 0:8 kInVecs] for one tile (A, C at its
// first row, B, C at its first column; lanes m; C is set, not added to, by the run at k = 0), per k
// one row of B and one broadcast of each row's element.
// A's rows (x, mostly from memory) are read once, as kTile interleaved streams the prefetchers do
// not follow: each row's next run is requested while this one is summed.
template <int kTile, int kInVecs, bool kFull>
ALWAYS_INLINE void in_tile(int64_t k_begin, int64_t K, const float* A, int64_t lda, const float* B,
                           int64_t ldb, const __m256i (&m)[kInVecs], float* C, int64_t ldc) {
  for (int64_t s0 = k_begin; s0 < K; s0 += kSumRun) {
    const int64_t s1 = std::min(K, s0 + kSumRun);
    if (s1 < K) {
#pragma GCC unroll 12
      for (int t = 0; t < kTile; ++t) {
        const char* next = reinterpret_cast<const char*>(A + t * lda + s1);
        for (int line = 0; line < 4; ++line) _mm_prefetch(next + 64 * line, _MM_HINT_T0);
      }
    }
    __m256 acc[kTile][kInVecs];
#pragma GCC unroll 12
    for (int t = 0; t < kTile; ++t) {
#pragma GCC unroll 2
      for (int v = 0; v < kInVecs; ++v) acc[t][v] = _mm256_setzero_ps();
    }
    for (int64_t k = s0; k < s1; ++k) {
      __m256 b[kInVecs];
#pragma GCC unroll 2
      for (int v = 0; v < kInVecs; ++v) b[v] = load<kFull>(B + k * ldb + v * kLanes, m[v]);
      rank_one(A + k, lda, b, acc);
    }
#pragma GCC unroll 12
    for (int t = 0; t < kTile; ++t) {
#pragma GCC unroll 2
      for (int v = 0; v < kInVecs; ++v) {
        float* c = C + t * ldc + v * kLanes;
        const __m256 sum = s0 == 0 ? acc[t][v] : _mm256_add_ps(load<kFull>(c, m[v]), acc[t][v]);
        if constexpr (kFull) {
          _mm256_storeu_ps(c, sum);
        } else {
          _mm256_maskstore_ps(c, m[v], sum);
        }
      }
    }
  }
}

// One row tile of kTile rows over all N columns, 8 kInVecs at a time, for K's chunk [k_begin, K).
template <int kTile, int kInVecs>
void in_row_tile(int64_t N, int64_t k_begin, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += kInVecs * kLanes) {
    __m256i m[kInVecs];
    for (int v = 0; v < kInVecs; ++v) m[v] = lanes(N - n0 - v * kLanes);
    if (N - n0 >= kInVecs * kLanes) {
      in_tile<kTile, kInVecs, true>(k_begin, K, A, lda, B + n0, ldb, m, C + n0, ldc);
    } else {
      in_tile<kTile, kInVecs, false>(k_begin, K, A, lda, B + n0, ldb, m, C + n0, ldc);
    }
  }
}

// Rows in tiles of kTile, the rest in tiles of half as many, down to one (a tile computes all its rows).
template <int kTile, int kInVecs>
void in_rows(int64_t M, int64_t N, int64_t k_begin, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + kTile <= M; i += kTile) {
    in_row_tile<kTile, kInVecs>(N, k_begin, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc);
  }
  if constexpr (kTile > 1) {
    if (i < M) in_rows<kTile / 2, kInVecs>(M - i, N, k_begin, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc);
  }
}

// project_nt's tiles: kNtRows rows of A by kNtCols rows of W, one accumulator per dot product,
// each lane of which sums every 8th product of it; 6 loads per 8 FMAs.
constexpr int kNtRows = 2;
constexpr int kNtCols = 4;
// Products per lane summed in registers before a run's dot products are reduced and added to the
// total, as project_in's runs: the error grows with kSumRun + K / kNtRun.
constexpr int64_t kNtRun = kSumRun * kLanes;

// The sums of the 8 accumulators, v[i] in lane i: pairs of lanes, pairs of pairs, then the halves.
ALWAYS_INLINE __m256 sum_each_lanes(const __m256 (&v)[kNtRows * kNtCols]) {
  const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}

// acc[t kNtCols + c] += a[t][k0 : k0 + 8] w[c][k0 : k0 + 8] for the tile's kR rows, lanes m.
template <int kR, bool kFull>
ALWAYS_INLINE void dot_step(const float* const (&a)[kR], const float* const (&w)[kNtCols], int64_t k0, __m256i m,
                            __m256 (&acc)[kNtRows * kNtCols]) {
  __m256 vw[kNtCols];
#pragma GCC unroll 4
  for (int c = 0; c < kNtCols; ++c) vw[c] = load<kFull>(w[c] + k0, m);
#pragma GCC unroll 2
  for (int t = 0; t < kR; ++t) {
    const __m256 va = load<kFull>(a[t] + k0, m);
#pragma GCC unroll 4
    for (int c = 0; c < kNtCols; ++c) acc[t * kNtCols + c] = _mm256_fmadd_ps(va, vw[c], acc[t * kNtCols + c]);
  }
}

// C[t, 0:nj] (+)= the dot products of rows a[t] of A and rows [0, nj) of W over K's chunk [k_begin,
// K), for one tile (C at its first row and column; set where k_begin = 0, else added to). A tile of
// fewer than kNtCols rows of W repeats its last one and does not store it.
template <int kR>
ALWAYS_INLINE void nt_tile(int64_t k_begin, int64_t K, const float* const (&a)[kR], const float* W, int64_t ldw,
                           int64_t nj, float* C, int64_t ldc) {
  const float* w[kNtCols];
  for (int c = 0; c < kNtCols; ++c) w[c] = W + std::min<int64_t>(c, nj - 1) * ldw;
  const __m128i cols = _mm256_castsi256_si128(lanes(nj));
  __m128 row_totals[kNtRows] = {_mm_setzero_ps(), _mm_setzero_ps()};
  if (k_begin > 0) {
    for (int t = 0; t < kR; ++t) row_totals[t] = _mm_maskload_ps(C + t * ldc, cols);
  }
  __m256 total = _mm256_set_m128(row_totals[1], row_totals[0]);
  const __m256i all = lanes(kLanes);
  for (int64_t s0 = k_begin; s0 < K; s0 += kNtRun) {
    const int64_t end = std::min(K, s0 + kNtRun);
    __m256 acc[kNtRows * kNtCols];
    for (auto& v : acc) v = _mm256_setzero_ps();
    int64_t k = s0;
    for (; k + kLanes <= end; k += kLanes) dot_step<kR, true>(a, w, k, all, acc);
    if (k < end) dot_step<kR, false>(a, w, k, lanes(end - k), acc);
    total = _mm256_add_ps(total, sum_each_lanes(acc));
  }
  _mm_maskstore_ps(C, cols, _mm256_castps256_ps128(total));
  if (kR > 1) _mm_maskstore_ps(C + ldc, cols, _mm256_extractf128_ps(total, 1));
}


}  // namespace

bool available() { return true; }

void project_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw, float* C,
                int64_t ldc) {
  const int64_t chunk = k_chunk(N, K, kNtRun);  // as project_in's, of W
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const int64_t k1 = std::min(K, k0 + chunk);
    int64_t i = 0;
    for (; i + kNtRows <= M; i += kNtRows) {
      const float* const a[kNtRows] = {A + i * lda, A + (i + 1) * lda};
      for (int64_t j0 = 0; j0 < N; j0 += kNtCols) {
        nt_tile<kNtRows>(k0, k1, a, W + j0 * ldw, ldw, std::min<int64_t>(kNtCols, N - j0), C + i * ldc + j0, ldc);
      }
    }
    if (i < M) {
      const float* const a[1] = {A + i * lda};
      for (int64_t j0 = 0; j0 < N; j0 += kNtCols) {
        nt_tile<1>(k0, k1, a, W + j0 * ldw, ldw, std::min<int64_t>(kNtCols, N - j0), C + i * ldc + j0, ldc);
      }
    }
  }
}

void transpose(int64_t M, int64_t K, const float* A, int64_t lda, float* B) {
  const int64_t ldb = M;
  for (int64_t i0 = 0; i0 < M; i0 += kLanes) {
    const int64_t mi = std::min(kLanes, M - i0);
    for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
      const int64_t kc = std::min(kLanes, K - k0);
      const __m256i cols = lanes(kc);
      __m256 r[kLanes];
      for (int t = 0; t < kLanes; ++t) {
        r[t] = t < mi ? (kc == kLanes ? _mm256_loadu_ps(A + (i0 + t) * lda + k0)
                                      : _mm256_maskload_ps(A + (i0 + t) * lda + k0, cols))
                      : _mm256_setzero_ps();
      }
      transpose8(r);
      const __m256i rows = lanes(mi);
      for (int c = 0; c < kc; ++c) {
        float* b = B + (k0 + c) * ldb + i0;
        if (mi == kLanes) {
          _mm256_storeu_ps(b, r[c]);
        } else {
          _mm256_maskstore_ps(b, rows, r[c]);
        }
      }
    }
  }
}

// Up to 8 columns (r <= 8) in tiles of 12 rows by one vector: 12 accumulators, one load of B and 12
// broadcasts per 12 FMAs; wider in project_out's 6 x 2 tiles, over all columns per row tile, so that
// the tile's rows of x stay in L1 for every 16 columns after the first.
void project_in(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                int64_t ldc) {
  const int64_t chunk = k_chunk(N, K, kSumRun);
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const int64_t k1 = std::min(K, k0 + chunk);
    if (N <= kLanes) {
      in_rows<12, 1>(M, N, k0, k1, A, lda, B, ldb, C, ldc);
    } else {
      in_rows<kRows, kVecs>(M, N, k0, k1, A, lda, B, ldb, C, ldc);
    }
  }
}

bool handles(const OutputEpilogue<float>& e) {
  return e.out_kind == Kind::f32 && (e.res == nullptr || e.res_kind == Kind::f32);
}

namespace {

void project_out_from(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const PanelSource& panels,
                      const OutputEpilogue<float>& e) {
  if (e.res == nullptr) {
    project_out_as<false>(M, N, K, A, lda, panels, e);
  } else {
    project_out_as<true>(M, N, K, A, lda, panels, e);
  }
}

}  // namespace

void project_out(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 const OutputEpilogue<float>& e) {
  if (M <= kRows) return project_out_from(M, N, K, A, lda, PanelSource::of_b(B, ldb), e);
  project_out_from(M, N, K, A, lda, PanelSource::of_packed(panels(N, K, B, ldb)), e);
}

void project_out_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw,
                    const OutputEpilogue<float>& e) {
  if (M > kGroupRows) {
    return project_out_from(M, N, K, A, lda, PanelSource::of_packed(panels_of_transposed(N, K, W, ldw)), e);
  }
  if (static_cast<int64_t>(panels_buffer.size()) < N * kTileCols) {
    panels_buffer.resize(static_cast<size_t>(N * kTileCols));
  }
  project_out_from(M, N, K, A, lda, PanelSource::made_from(W, ldw, panels_buffer.data()), e);
}

#else

bool available() { return false; }

void project_nt(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t) {}

void transpose(int64_t, int64_t, const float*, int64_t, float*) {}

void project_in(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t) {}

bool handles(const OutputEpilogue<float>&) { return false; }

void project_out(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, const OutputEpilogue<float>&) {}

void project_out_nt(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                    const OutputEpilogue<float>&) {}

#endif

}  // namespace adapterfast::cpu::avx2
