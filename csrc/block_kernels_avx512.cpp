// AVX-512 block kernels for float (contract in block_kernels.h): register-tiled micro-kernels for
// the adapter's three skinny GEMM shapes, the output epilogue fused into the tile that produces
// it, and a 16-lane Philox for the dropout mask.
//
// The file is compiled for the baseline target, with AVX-512 enabled only for the code between
// the target pragmas. That code includes no headers and keeps its functions in an anonymous
// namespace, so the linker can never hand an AVX-512 instance of a shared inline function to
// baseline callers. `kernels()` is called only once block_kernels.cpp saw that the CPU runs
// AVX-512.
#include "block_kernels.h"

#include <cstdint>
#include <type_traits>

#include "philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ADAPTERFAST_AVX512_KERNELS 1
#include <immintrin.h>
#endif

#ifdef ADAPTERFAST_AVX512_KERNELS

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
// GCC's own intrinsic headers trip these (their `__m512 __Y = __Y;` idiom for undefined vectors).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define ALWAYS_INLINE inline __attribute__((always_inline))

namespace adapterfast::cpu::avx512 {
namespace {

constexpr int64_t kLanes = 16;
// Rows of B (columns of A) that project_in contracts per pass over the block: a [1024, 64] slice
// of B (256 KiB) stays in L2 while every row tile of the block streams past it.
constexpr int64_t kInChunk = 1024;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Lanes [0, n) for n in [0, 16]; more than 16 means all.
inline __mmask16 lanes(int64_t n) {
  return n >= kLanes ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

ALWAYS_INLINE __m512 load(const float* p, __mmask16 m) {
  return m == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}

ALWAYS_INLINE void store(float* p, __m512 v, __mmask16 m) {
  if (m == 0xFFFF) {
    _mm512_storeu_ps(p, v);
  } else {
    _mm512_mask_storeu_ps(p, m, v);
  }
}

// Storage tags for the epilogue's residual and output.
struct NoResidual {};
struct Bf16 {};
struct F16 {};
// An IEEE half as stored (its own type, so that loads and stores overload on it).
struct HalfBits {
  uint16_t bits;
};

ALWAYS_INLINE __m512 load_as_float(const float* p, __mmask16 m) { return load(p, m); }

ALWAYS_INLINE __m512 load_as_float(const uint16_t* p, __mmask16 m) {
  const __m256i raw = m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                  : _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

ALWAYS_INLINE __m512 load_as_float(const HalfBits* p, __mmask16 m) {
  const __m256i raw = m == 0xFFFF ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                  : _mm256_maskz_loadu_epi16(m, p);
  return _mm512_cvtph_ps(raw);
}

// bf16 bits of v, rounded to nearest even, NaN as 0x7FC0 (what c10::BFloat16 does).
ALWAYS_INLINE __m256i round_to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i upper = _mm512_mask_mov_epi32(_mm512_srli_epi32(rounded, 16), nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(upper);
}

// kStream: a non-temporal store, for full vectors at 64-byte (float) or 32-byte (bf16) aligned
// addresses only.
template <bool kStream>
ALWAYS_INLINE void store_from_float(float* p, __m512 v, __mmask16 m) {
  if constexpr (kStream) {
    _mm512_stream_ps(p, v);
  } else {
    store(p, v, m);
  }
}

template <bool kStream>
ALWAYS_INLINE void store_from_float(uint16_t* p, __m512 v, __mmask16 m) {
  const __m256i packed = round_to_bf16(v);
  if constexpr (kStream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), packed);
  } else if (m == 0xFFFF) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  } else {
    _mm256_mask_storeu_epi16(p, m, packed);
  }
}

template <bool kStream>
ALWAYS_INLINE void store_from_float(HalfBits* p, __m512 v, __mmask16 m) {
  const __m256i packed = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if constexpr (kStream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), packed);
  } else if (m == 0xFFFF) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
  } else {
    _mm256_mask_storeu_epi16(p, m, packed);
  }
}

template <typename Tag> struct Storage { using type = float; };
template <> struct Storage<Bf16> { using type = uint16_t; };
template <> struct Storage<F16> { using type = HalfBits; };
template <> struct Storage<NoResidual> { using type = float; };

// A register tile of kRows rows by kVecs vectors of 16 columns: the accumulators of all three
// GEMMs. Per step of their inner loop, a tile loads kVecs vectors and broadcasts kRows scalars
// for kRows * kVecs FMAs. Vector loads, not broadcasts, are what limits
// that loop here, so tiles are tall: 8 x 3 and 6 x 4 keep it on the FMA units, where 4 x 4 (twice
// the loads per FMA) measured ~25% slower.
template <int kRows, int kVecs>
struct Tile {
  static constexpr int64_t kCols = kVecs * kLanes;
  __m512 acc[kRows][kVecs];
};

// The lanes of the vectors of a tile that starts at column k0 of K.
template <int kVecs>
struct TileColumns {
  __mmask16 m[kVecs];
  bool full;
  TileColumns(int64_t K, int64_t k0) : full(K - k0 >= kVecs * kLanes) {
    for (int v = 0; v < kVecs; ++v) m[v] = lanes(K - k0 - v * kLanes);
  }
};

// acc[t][v] += sum_s a[t][s * a_step] * b[s * ldb + 16 v : +16] for s in [0, S): a rank-S update
// of the tile. With kPrefetch, each row of b's next tile of columns is requested too, so the
// next tile's operand (often still in memory: accumulate_outer walks its rows in column slices)
// arrives while this one runs.
template <bool kFull, bool kPrefetch, int kRows, int kVecs>
ALWAYS_INLINE void rank_update(int64_t S, const float* const (&a)[kRows], int64_t a_step, const float* b,
                               int64_t ldb, const __mmask16 (&m)[kVecs], Tile<kRows, kVecs>& tile) {
  for (int64_t s = 0; s < S; ++s) {
    const float* row = b + s * ldb;
    if constexpr (kPrefetch) {
      for (int v = 0; v < kVecs; ++v) {
        _mm_prefetch(reinterpret_cast<const char*>(row + (kVecs + v) * kLanes), _MM_HINT_T0);
      }
    }
    __m512 vb[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      vb[v] = kFull ? _mm512_loadu_ps(row + v * kLanes) : _mm512_maskz_loadu_ps(m[v], row + v * kLanes);
    }
    for (int t = 0; t < kRows; ++t) {
      const __m512 va = _mm512_set1_ps(a[t][s * a_step]);
      for (int v = 0; v < kVecs; ++v) tile.acc[t][v] = _mm512_fmadd_ps(va, vb[v], tile.acc[t][v]);
    }
  }
}

template <int kRows, int kVecs>
ALWAYS_INLINE void rank_update(const TileColumns<kVecs>& cols, int64_t S, const float* const (&a)[kRows],
                               int64_t a_step, const float* b, int64_t ldb, bool prefetch_next,
                               Tile<kRows, kVecs>& tile) {
  for (auto& row : tile.acc) {
    for (auto& v : row) v = _mm512_setzero_ps();
  }
  if (!cols.full) {
    rank_update<false, false>(S, a, a_step, b, ldb, cols.m, tile);
  } else if (prefetch_next) {
    rank_update<true, true>(S, a, a_step, b, ldb, cols.m, tile);
  } else {
    rank_update<true, false>(S, a, a_step, b, ldb, cols.m, tile);
  }
}

// Products project_in sums in registers before adding them to C: K is summed blockwise, so the
// rounding error grows with kSumRun + K / kSumRun rather than with K (a plain running sum over
// d = 777 products gave 20x eager's error in an ill-conditioned row). The extra load, add and
// store of the tile per run cost ~3% at kSumRun = 64.
constexpr int64_t kSumRun = 64;

// C[0:mi, cols] (+)= A[0:mi, 0:K] B[0:K, cols] for one tile: per k, kVecs vectors of B's row k
// and one broadcast per row of A.
template <bool kFull, int kRows, int kVecs>
void project_in_tile(int64_t mi, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                     const TileColumns<kVecs>& cols, float* C, int64_t ldc, bool accumulate) {
  for (int64_t s0 = 0; s0 < K; s0 += kSumRun) {
    const float* a[kRows];
    for (int t = 0; t < kRows; ++t) a[t] = A + min64(t, mi - 1) * lda + s0;
    Tile<kRows, kVecs> tile;
    for (auto& row : tile.acc) {
      for (auto& v : row) v = _mm512_setzero_ps();
    }
    rank_update<kFull, false>(min64(kSumRun, K - s0), a, 1, B + s0 * ldb, ldb, cols.m, tile);
    const bool add = accumulate || s0 > 0;
#pragma GCC unroll 8
    for (int t = 0; t < kRows; ++t) {
      if (t >= mi) break;
      float* c = C + t * ldc;
      for (int v = 0; v < kVecs; ++v) {
        const __m512 sum = add ? _mm512_add_ps(load(c + v * kLanes, cols.m[v]), tile.acc[t][v]) : tile.acc[t][v];
        store(c + v * kLanes, sum, cols.m[v]);
      }
    }
  }
}

template <int kRows, int kVecs>
void project_in_tiles(int64_t M, int64_t N, int64_t n0, int64_t K, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  const TileColumns<kVecs> cols(N, n0);
  for (int64_t i0 = 0; i0 < M; i0 += kRows) {
    const int64_t mi = min64(kRows, M - i0);
    if (cols.full) {
      project_in_tile<true, kRows>(mi, K, A + i0 * lda, lda, B + n0, ldb, cols, C + i0 * ldc + n0, ldc, accumulate);
    } else {
      project_in_tile<false, kRows>(mi, K, A + i0 * lda, lda, B + n0, ldb, cols, C + i0 * ldc + n0, ldc, accumulate);
    }
  }
}

// Outer products, like the other two GEMMs (a dot-product form with horizontal sums measured
// 20-40% slower): a row tile broadcasts A's elements, so it also reads A (x, straight from memory
// in the forward) as kRows sequential streams. Columns go in tiles of up to 4 vectors (r <= 64
// is one tile), with 8 rows per tile, or 6 for 4 vectors, to keep 8 to 24 accumulators busy.
void project_in(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                int64_t ldb, float* C, int64_t ldc) {
  for (int64_t k0 = 0; k0 < K; k0 += kInChunk) {
    const int64_t kc = min64(kInChunk, K - k0);
    const float* a = A + k0;
    const float* b = B + k0 * ldb;
    for (int64_t n0 = 0; n0 < N; n0 += 4 * kLanes) {
      switch ((min64(N - n0, 4 * kLanes) + kLanes - 1) / kLanes) {
        case 1: project_in_tiles<8, 1>(M, N, n0, kc, a, lda, b, ldb, C, ldc, k0 > 0); break;
        case 2: project_in_tiles<8, 2>(M, N, n0, kc, a, lda, b, ldb, C, ldc, k0 > 0); break;
        case 3: project_in_tiles<8, 3>(M, N, n0, kc, a, lda, b, ldb, C, ldc, k0 > 0); break;
        default: project_in_tiles<6, 4>(M, N, n0, kc, a, lda, b, ldb, C, ldc, k0 > 0); break;
      }
    }
  }
}

// 8 x 3 tiles over [r, K] (8 divides typical bottleneck widths): the M rows of A and B are summed
// in registers, then added to C. A tile's missing rows repeat its last one and are not stored.
void accumulate_outer(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                      int64_t ldb, float* C, int64_t ldc) {
  using T = Tile<8, 3>;
  for (int64_t k0 = 0; k0 < K; k0 += T::kCols) {
    const TileColumns<3> cols(K, k0);
    for (int64_t j0 = 0; j0 < N; j0 += 8) {
      const int64_t nj = min64(8, N - j0);
      const float* a[8];
      for (int t = 0; t < 8; ++t) a[t] = A + j0 + min64(t, nj - 1);
      T tile;
      rank_update(cols, M, a, lda, B + k0, ldb, /*prefetch_next=*/j0 == 0 && k0 + T::kCols < K, tile);
      // Unrolled, so that the accumulators are only indexed by constants and stay in registers.
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        if (t >= nj) break;
        float* c = C + (j0 + t) * ldc + k0;
        for (int v = 0; v < 3; ++v) {
          if (cols.m[v] != 0) store(c + v * kLanes, _mm512_add_ps(load(c + v * kLanes, cols.m[v]), tile.acc[t][v]), cols.m[v]);
        }
      }
    }
  }
}

// out[row, k0 : k0 + 16 kVecs] = epilogue(acc) for one row of a project_out tile.
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
      // This row's next tile is due after the block's other rows: request its residual now.
      if (cols.full) _mm_prefetch(reinterpret_cast<const char*>(res + kVecs * kLanes), _MM_HINT_T0);
      base = load_as_float(res, cols.m[v]);
    }
    const __m512 y = _mm512_fmadd_ps(factor, _mm512_add_ps(acc[v], bias[v]), base);
    store_from_float<kStream>(out + v * kLanes, y, cols.m[v]);
  }
}

// 6 x 4 tiles over the [M, K] output, each finished by the epilogue straight from the registers.
// The [r, 64] column slice of B stays in L1 while the block's rows pass.
template <typename ResTag, typename OutTag>
void project_out_tiles(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                       int64_t ldb, const OutputEpilogue<float>& e) {
  using Out = typename Storage<OutTag>::type;
  using T = Tile<6, 4>;
  // Streaming writes whole cache lines only: every row must start on a line (a full tile is
  // 4 lines of float or 2 of bf16).
  constexpr int64_t kLine = 64;
  const bool stream = e.stream_out && reinterpret_cast<uintptr_t>(e.out) % kLine == 0 &&
                      (e.ld_out * static_cast<int64_t>(sizeof(Out))) % kLine == 0;
  const __m512 scale = _mm512_set1_ps(e.scale);
  for (int64_t k0 = 0; k0 < K; k0 += T::kCols) {
    const TileColumns<4> cols(K, k0);
    __m512 bias[4];
    for (int v = 0; v < 4; ++v) {
      bias[v] = e.bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(cols.m[v], e.bias + k0 + v * kLanes);
    }
    for (int64_t i0 = 0; i0 < M; i0 += 6) {
      const int64_t mi = min64(6, M - i0);
      const float* a[6];
      for (int t = 0; t < 6; ++t) a[t] = A + (i0 + min64(t, mi - 1)) * lda;
      T tile;
      rank_update(cols, N, a, 1, B + k0, ldb, /*prefetch_next=*/false, tile);
#pragma GCC unroll 6
      for (int t = 0; t < 6; ++t) {
        if (t >= mi) break;
        if (stream && cols.full) {
          finish_row<ResTag, Out, true>(e, i0 + t, k0, cols, tile.acc[t], bias, scale);
        } else {
          finish_row<ResTag, Out, false>(e, i0 + t, k0, cols, tile.acc[t], bias, scale);
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

// High and low 32 bits of m * c in each of the 16 lanes (two 8-lane widening multiplies).
inline void mulhilo(__m512i m, __m512i c, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(c, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// philox::words for 16 counters (c0, c1, c2, 0) with precomputed round keys; the words land in c.
inline void philox_words(__m512i (&c)[4], const uint32_t (&k0)[philox::kRounds],
                         const uint32_t (&k1)[philox::kRounds]) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(philox::kM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(philox::kM1));
  for (int round = 0; round < philox::kRounds; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo(m0, c[0], hi0, lo0);
    mulhilo(m1, c[2], hi1, lo1);
    constexpr int kXor3 = 0x96;
    c[0] = _mm512_ternarylogic_epi32(hi1, c[1], _mm512_set1_epi32(static_cast<int>(k0[round])), kXor3);
    c[1] = lo1;
    c[2] = _mm512_ternarylogic_epi32(hi0, c[3], _mm512_set1_epi32(static_cast<int>(k1[round])), kXor3);
    c[3] = lo0;
  }
}

// 16 Philox calls cover 64 columns of a row (quads k/4 .. k/4 + 15). Lane l's word j decides
// column k + 4 l + j, which is byte j of dword l: each word's comparison sets its byte of the
// dwords, and the 64 bytes store in column order (ld_keep is a multiple of 64, so whole stores
// stay inside the row).
void dropout_keep(uint64_t seed, uint32_t threshold, int64_t row0, int64_t M, int64_t d,
                  uint8_t* keep, int64_t ld_keep) {
  uint32_t k0[philox::kRounds];
  uint32_t k1[philox::kRounds];
  k0[0] = static_cast<uint32_t>(seed);
  k1[0] = static_cast<uint32_t>(seed >> 32);
  for (int round = 1; round < philox::kRounds; ++round) {
    k0[round] = k0[round - 1] + philox::kW0;
    k1[round] = k1[round - 1] + philox::kW1;
  }
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i bound = _mm512_set1_epi32(static_cast<int>(threshold));
  for (int64_t i = 0; i < M; ++i) {
    const uint64_t row = static_cast<uint64_t>(row0 + i);
    const __m512i row_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(row)));
    const __m512i row_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(row >> 32)));
    for (int64_t k = 0; k < d; k += 4 * kLanes) {
      __m512i c[4] = {_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(k / 4)), iota), row_lo, row_hi,
                      _mm512_setzero_si512()};
      philox_words(c, k0, k1);
      __m512i bytes = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {
        const __mmask16 kept = _mm512_cmp_epu32_mask(c[j], bound, _MM_CMPINT_NLT);
        bytes = _mm512_mask_or_epi32(bytes, kept, bytes, _mm512_set1_epi32(1 << (8 * j)));
      }
      _mm512_storeu_si512(keep + i * ld_keep + k, bytes);
    }
  }
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

void transpose(int64_t M, int64_t K, const float* A, int64_t lda, float* B) {
  const int64_t ldb = M;
  for (int64_t i0 = 0; i0 < M; i0 += kLanes) {
    const int64_t mi = min64(kLanes, M - i0);
    const __mmask16 row_mask = lanes(mi);
    for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
      const int64_t kc = min64(kLanes, K - k0);
      const __mmask16 col_mask = lanes(kc);
      __m512 r[kLanes];
      for (int t = 0; t < kLanes; ++t) {
        r[t] = t < mi ? load(A + (i0 + t) * lda + k0, col_mask) : _mm512_setzero_ps();
      }
      transpose_tile(r);
      for (int t = 0; t < kc; ++t) store(B + (k0 + t) * ldb + i0, r[t], row_mask);
    }
  }
}

}  // namespace
}  // namespace adapterfast::cpu::avx512

#undef ALWAYS_INLINE

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace adapterfast::cpu::avx512 {

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

const BlockKernels<float>* kernels() {
  static const BlockKernels<float> table{"avx512", &project_in, &accumulate_outer, &project_out,
                                         &transpose, &dropout_keep};
  return &table;
}

}  // namespace adapterfast::cpu::avx512

#else

namespace adapterfast::cpu::avx512 {

const BlockKernels<float>* kernels() { return nullptr; }

void finish_rows(int64_t, int64_t, const float*, int64_t, int64_t, const OutputEpilogue<float>&) {}

}  // namespace adapterfast::cpu::avx512

#endif
