// AVX-512 dropout_keep (contract in block_kernels.h): the Philox4x32-10 mask of
// adapterfast/dropout.py for 16 elements per step, bit for bit as philox.h computes one.
#include "block_kernels.h"

#include <cstdint>

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

// philox::first_word for 16 counters (c0 low words, c1 high words) with precomputed round keys.
inline __m512i philox_first_word(__m512i c0, __m512i c1, const uint32_t (&k0)[philox::kRounds],
                                 const uint32_t (&k1)[philox::kRounds]) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(philox::kM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(philox::kM1));
  __m512i c2 = _mm512_setzero_si512();
  __m512i c3 = _mm512_setzero_si512();
  for (int round = 0; round < philox::kRounds; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo(m0, c0, hi0, lo0);
    mulhilo(m1, c2, hi1, lo1);
    constexpr int kXor3 = 0x96;
    c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(k0[round])), kXor3);
    c1 = lo1;
    c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1[round])), kXor3);
    c3 = lo0;
  }
  return c0;
}

}  // namespace

namespace detail {

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
    const uint64_t row_base = static_cast<uint64_t>(row0 + i) * static_cast<uint64_t>(d);
    for (int64_t k = 0; k < d; k += kLanes) {
      const uint64_t first = row_base + static_cast<uint64_t>(k);
      const __m512i lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first)));
      const __m512i hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
      const __m512i c0 = _mm512_add_epi32(lo, iota);
      const __mmask16 carry = _mm512_cmp_epu32_mask(c0, lo, _MM_CMPINT_LT);
      const __m512i c1 = _mm512_mask_add_epi32(hi, carry, hi, _mm512_set1_epi32(1));
      const __mmask16 kept = _mm512_cmp_epu32_mask(philox_first_word(c0, c1, k0, k1), bound, _MM_CMPINT_NLT);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(keep + i * ld_keep + k), _mm_maskz_set1_epi8(kept, 1));
    }
  }
}

}  // namespace detail
}  // namespace adapterfast::cpu::avx512

#endif
#include "block_kernels_avx512_end.h"
