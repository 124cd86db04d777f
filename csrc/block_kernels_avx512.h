#pragma once
// What the AVX-512 block kernels share (block_kernels_avx512*.cpp): masked vector loads and
// stores, the epilogue's storage conversions, the register tile and its rank update. Included only
// between block_kernels_avx512_begin.h and _end.h (it includes nothing itself: its users include
// <cstdint> and <type_traits> before the region).
#ifdef ADAPTERFAST_AVX512_KERNELS

namespace adapterfast::cpu::avx512 {

// The kernels of the other files of the table (external, not inline: compiled once, for AVX-512).
namespace detail {
void project_out(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, const OutputEpilogue<float>& e);
void dropout_keep(uint64_t seed, uint32_t threshold, int64_t row0, int64_t M, int64_t d,
                  uint8_t* keep, int64_t ld_keep);
}  // namespace detail

namespace {

constexpr int64_t kLanes = 16;
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Whether rows row_bytes apart put 8 or more of a 16-row tile's reads in the same L1 sets: a row
// stride that is a multiple of 2 KiB (float rows of d = 1024, 1536, 2048, 4096, ...; 16-bit rows of
// d = 1024, 2048, ...), whether the rows are
// consecutive or the grouped op's scattered ones. An L1 set is chosen by address bits 6-11 (4 KiB
// per way), so such rows share at most two set ranges, and the tile's runs of 16 rows need 8 to 16
// ways of a set where the Zen 4 L1D has 8 (the Xeon's 12): lines of x are evicted between the
// broadcasts of their floats and come again from L2.
inline bool rows_share_l1_sets(int64_t row_bytes) { return row_bytes % 2048 == 0; }

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

// Stores 16 packed 16-bit values (bf16 or fp16 bits).
template <bool kStream>
ALWAYS_INLINE void store_packed(void* p, __m256i packed, __mmask16 m) {
  if constexpr (kStream) {
    _mm256_stream_si256(static_cast<__m256i*>(p), packed);
  } else if (m == 0xFFFF) {
    _mm256_storeu_si256(static_cast<__m256i*>(p), packed);
  } else {
    _mm256_mask_storeu_epi16(p, m, packed);
  }
}

template <bool kStream>
ALWAYS_INLINE void store_from_float(uint16_t* p, __m512 v, __mmask16 m) {
  store_packed<kStream>(p, round_to_bf16(v), m);
}

template <bool kStream>
ALWAYS_INLINE void store_from_float(HalfBits* p, __m512 v, __mmask16 m) {
  store_packed<kStream>(p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), m);
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
// The tile a kRows-row kernel hands its last rows to when they fill at most half a tile (4, then
// 2, then 1 rows): a tile computes all its rows, so one row in an 8-row tile costs the FMAs of
// eight, which was most of a one-row call's product time. More than half a tile's rows stay in
// one partial tile of kRows.
template <int kRows>
constexpr int kTailRows = kRows > 4 ? 4 : kRows > 2 ? 2 : 1;

// How many of `rows` rows a kRows-row kernel covers with its own tiles; the rest go to
// kTailRows<kRows>-row tiles.
template <int kRows>
inline int64_t rows_in_own_tiles(int64_t rows) {
  const int64_t rest = rows % kRows;
  return kRows == 1 || 2 * rest > kRows ? rows : rows - rest;
}

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

// A vector of a GEMM's B operand as float: all 16 lanes (kFull) or those of m.
template <bool kFull>
ALWAYS_INLINE __m512 load_b(const float* p, __mmask16 m) {
  return kFull ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}

template <bool kFull, typename Tb>
ALWAYS_INLINE __m512 load_b(const Tb* p, __mmask16 m) {
  return load_as_float(p, kFull ? __mmask16(0xFFFF) : m);
}

// acc[t][v] += sum_s a[t][s * a_step] * b[s * ldb + 16 v : +16] for s in [0, S): a rank-S update
// of the tile. With kPrefetch, each row of b's next tile of columns is requested too, so the
// next tile's operand (often still in memory: accumulate_outer walks its rows in column slices)
// arrives while this one runs. With kSums, b's rows are also added into sums (in row order, as
// sum_rows does): three more registers beside the tile's 24 and three adds per 24 FMAs.
// b is float, or 16-bit storage (uint16_t: bf16, HalfBits: float16) widened as it is loaded.
template <bool kFull, bool kPrefetch, bool kSums = false, int kRows, int kVecs, typename Tb>
ALWAYS_INLINE void rank_update(int64_t S, const float* const (&a)[kRows], int64_t a_step, const Tb* b,
                               int64_t ldb, const __mmask16 (&m)[kVecs], Tile<kRows, kVecs>& tile,
                               __m512* sums = nullptr) {
  for (int64_t s = 0; s < S; ++s) {
    const Tb* row = b + s * ldb;
    if constexpr (kPrefetch) {
      for (int v = 0; v < kVecs; ++v) {
        _mm_prefetch(reinterpret_cast<const char*>(row + (kVecs + v) * kLanes), _MM_HINT_T0);
      }
    }
    __m512 vb[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      vb[v] = load_b<kFull>(row + v * kLanes, m[v]);
      if constexpr (kSums) sums[v] = _mm512_add_ps(sums[v], vb[v]);
    }
    for (int t = 0; t < kRows; ++t) {
      const __m512 va = _mm512_set1_ps(a[t][s * a_step]);
      for (int v = 0; v < kVecs; ++v) tile.acc[t][v] = _mm512_fmadd_ps(va, vb[v], tile.acc[t][v]);
    }
  }
}

// The tile zeroed, then the rank-S update for its columns (partial or full, prefetching or not).
template <bool kSums = false, int kRows, int kVecs, typename Tb>
ALWAYS_INLINE void rank_update(const TileColumns<kVecs>& cols, int64_t S, const float* const (&a)[kRows],
                               int64_t a_step, const Tb* b, int64_t ldb, bool prefetch_next,
                               Tile<kRows, kVecs>& tile, __m512* sums = nullptr) {
  for (auto& row : tile.acc) {
    for (auto& v : row) v = _mm512_setzero_ps();
  }
  if (!cols.full) {
    rank_update<false, false, kSums>(S, a, a_step, b, ldb, cols.m, tile, sums);
  } else if (prefetch_next) {
    rank_update<true, true, kSums>(S, a, a_step, b, ldb, cols.m, tile, sums);
  } else {
    rank_update<true, false, kSums>(S, a, a_step, b, ldb, cols.m, tile, sums);
  }
}

// C[t][0:kVecs * 16] += tile.acc[t] for the tile's first `rows` rows, C's rows ldc apart, masked to
// the tile's columns (accumulate_outer's store of its [r, K] tiles). Unrolled, so that the
// accumulators are only indexed by constants and stay in registers.
// With kStore, C = tile instead (a group's first block: no zeroed C to read).
template <bool kStore = false, int kRows, int kVecs>
ALWAYS_INLINE void add_tile(const Tile<kRows, kVecs>& tile, const TileColumns<kVecs>& cols, int64_t rows, float* C,
                            int64_t ldc) {
#pragma GCC unroll 16
  for (int t = 0; t < kRows; ++t) {
    if (t >= rows) break;
    float* c = C + t * ldc;
    for (int v = 0; v < kVecs; ++v) {
      if (cols.m[v] == 0) continue;
      const __m512 sum = kStore ? tile.acc[t][v] : _mm512_add_ps(load(c + v * kLanes, cols.m[v]), tile.acc[t][v]);
      store(c + v * kLanes, sum, cols.m[v]);
    }
  }
}

// Rows of B (columns of A) that project_in contracts per pass over the block: a [1024, 64] slice
// of B (256 KiB) stays in L2 while every row tile of the block streams past it.
constexpr int64_t kInChunk = 1024;

// Products project_in sums in registers before adding them to C: K is summed blockwise, so the
// rounding error grows with kSumRun + K / kSumRun rather than with K (a plain running sum over
// d = 777 products gave 20x eager's error in an ill-conditioned row). The extra load, add and
// store of the tile per run cost ~3% at kSumRun = 64.
constexpr int64_t kSumRun = 64;

// Lines of a run of kSumRun floats.
constexpr int kRunLines = kSumRun * 4 / 64;

// C[0:mi, cols] (+)= x[t][0:K] B[0:K, cols] for one tile of project_in (block_kernels_avx512.cpp)
// or of the grouped op's project_in_rows, x[t] the start of the tile's row t: per k, kVecs vectors
// of B's row k and one broadcast per row. A's rows are read once, mostly from memory (x in the
// forward), so each row's next run (kLinesAhead lines) is requested while this one is summed, which
// the hardware prefetcher does not do for kRows interleaved streams (~15% at N = 4096, d = 768).
// With `next` (the grouped op's rows in a random order, each starting with a full memory latency),
// the same run of the next tile's rows is requested into L2 as well, a whole tile of FMAs ahead.
// x's rows are float, or 16-bit storage (uint16_t: bf16, HalfBits: float16), whose run of each row
// is widened into a [kRows, kSumRun] float buffer before its FMAs: 16 conversions per 16 kVecs
// FMAs, where widening whole rows into scratch first was a pass over the block of its own.
template <bool kFull, int kRows, int kVecs, typename Ta>
void project_in_tile(int64_t mi, int64_t K, const Ta* const (&x)[kRows], const float* const* next, const float* B,
                     int64_t ldb, const TileColumns<kVecs>& cols, float* C, int64_t ldc, bool accumulate) {
  constexpr bool kWiden = !std::is_same_v<Ta, float>;
  constexpr int kLinesAhead = kRunLines * static_cast<int>(sizeof(Ta)) / 4;
  alignas(64) float widened[kWiden ? kRows : 1][kSumRun];
  for (int64_t s0 = 0; s0 < K; s0 += kSumRun) {
    const int64_t run_length = min64(kSumRun, K - s0);
    if (s0 + kSumRun < K) {
      for (int t = 0; t < kRows; ++t) {
        const char* run = reinterpret_cast<const char*>(x[t] + s0 + kSumRun);
        for (int line = 0; line < kLinesAhead; ++line) _mm_prefetch(run + 64 * line, _MM_HINT_T0);
      }
    }
    const float* a[kRows];
    if constexpr (kWiden) {
      for (int t = 0; t < kRows; ++t) {
        for (int64_t v = 0; v < run_length; v += kLanes) {
          _mm512_store_ps(widened[t] + v, load_as_float(x[t] + s0 + v, lanes(run_length - v)));
        }
        a[t] = widened[t];
      }
    } else {
      for (int t = 0; t < kRows; ++t) a[t] = x[t] + s0;
    }
    Tile<kRows, kVecs> tile;
    for (auto& row : tile.acc) {
      for (auto& v : row) v = _mm512_setzero_ps();
    }
    if (next != nullptr) {
      for (int t = 0; t < kRows; ++t) {
        if (next[t] == nullptr) break;
        const char* run = reinterpret_cast<const char*>(next[t] + s0);
        const int lines = static_cast<int>(min64(kRunLines, ((K - s0) * 4 + 63) / 64));
        for (int line = 0; line < lines; ++line) _mm_prefetch(run + 64 * line, _MM_HINT_T1);
      }
    }
    rank_update<kFull, false>(run_length, a, 1, B + s0 * ldb, ldb, cols.m, tile);
    const bool add = accumulate || s0 > 0;
#pragma GCC unroll 16
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

}  // namespace
}  // namespace adapterfast::cpu::avx512

#endif
