// split_half (bf16_split.h) with AVX-512: 16 values per step, the tail under a mask.
#include "bf16_split.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ADAPTERFAST_SPLIT_AVX512 1
#endif

namespace adapterfast::cpu {

#if defined(ADAPTERFAST_SPLIT_AVX512)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void split_half(const c10::Half* src, int64_t n,
                                                                               c10::BFloat16* hi,
                                                                               c10::BFloat16* lo) {
  const __m512i round_bias = _mm512_set1_epi32(0x7fff);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mask = n - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - k)) - 1);
    const __m512 v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, src + k));
    const __m512i bits = _mm512_castps_si512(v);
    // Round to nearest even at bit 16 (v is never a NaN with only low mantissa bits: it came from
    // float16, whose mantissa lands in the top 10 bits of fp32's).
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
    const __m512i hi_bits = _mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(round_bias, lsb)), top);
    __m512 rest = _mm512_sub_ps(v, _mm512_castsi512_ps(hi_bits));
    rest = _mm512_maskz_mov_ps(~_mm512_fpclass_ps_mask(v, 0x18), rest);  // 0x18: +inf, -inf
    const __m256i hi16 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(hi_bits, 16));
    const __m256i lo16 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rest), 16));
    _mm256_mask_storeu_epi16(hi + k, mask, hi16);
    _mm256_mask_storeu_epi16(lo + k, mask, lo16);
  }
}
#else
void split_half(const c10::Half* src, int64_t n, c10::BFloat16* hi, c10::BFloat16* lo) {
  for (int64_t k = 0; k < n; ++k) split_value(static_cast<float>(src[k]), hi[k], lo[k]);
}
#endif

}  // namespace adapterfast::cpu
