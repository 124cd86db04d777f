// AVX-512 dropout_keep (contract in block_kernels.h): the Philox4x32-10 mask of
// adapterfast/dropout.py for 64 elements (16 Philox calls) per step, bit for bit as philox.h
// computes it.
#include "block_kernels.h"

#include <cstdint>
#include <type_traits>

#include "philox.h"

#include "block_kernels_avx512_begin.h"
#ifdef ADAPTERFAST_AVX512_KERNELS
#include "block_kernels_avx512.h"

namespace adapterfast::cpu::avx512 {
namespace {

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

}  // namespace

namespace detail {

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

}  // namespace detail
}  // namespace adapterfast::cpu::avx512

#endif
#include "block_kernels_avx512_end.h"
