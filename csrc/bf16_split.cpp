// split_half and split_rows_vnni (bf16_split.h): AVX-512, 16 values per step with the tail under a
// mask, in the AVX-512 region of block_kernels_avx512_begin.h (called only on the brgemm paths,
// which need AVX-512); a scalar loop on other targets.
#include "bf16_split.h"

#include "block_kernels_avx512_begin.h"
#ifdef ADAPTERFAST_AVX512_KERNELS
namespace adapterfast::cpu {
namespace {

// 16 float16 values (those of mask) as fp32 bit patterns of hi and lo, each with its low 16 bits
// zero (lo has at most 3 significant bits, so dropping them is exact).
ALWAYS_INLINE void split16(__mmask16 mask, const c10::Half* src, __m512i& hi, __m512i& lo) {
  const __m512 v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, src));
  const __m512i bits = _mm512_castps_si512(v);
  // Round to nearest even at bit 16 (v is never a NaN with only low mantissa bits: it came from
  // float16, whose mantissa lands in the top 10 bits of fp32's).
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  hi = _mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), top);
  const __m512 rest = _mm512_sub_ps(v, _mm512_castsi512_ps(hi));
  lo = _mm512_and_si512(_mm512_castps_si512(_mm512_maskz_mov_ps(~_mm512_fpclass_ps_mask(v, 0x18), rest)), top);
}

inline __mmask16 lanes(int64_t left) { return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1); }

}  // namespace

void split_half(const c10::Half* src, int64_t n, c10::BFloat16* hi, c10::BFloat16* lo) {
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mask = lanes(n - k);
    __m512i h, l;
    split16(mask, src + k, h, l);
    _mm256_mask_storeu_epi16(hi + k, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16)));
    _mm256_mask_storeu_epi16(lo + k, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(l, 16)));
  }
}

void split_rows_vnni(int64_t m, int64_t N, const c10::Half* src, int64_t ld_src, c10::BFloat16* hi,
                     c10::BFloat16* lo, c10::BFloat16* hi2) {
  for (int64_t i = 0; i < m; i += 2) {
    const c10::Half* r0 = src + i * ld_src;
    const c10::Half* r1 = i + 1 < m ? r0 + ld_src : nullptr;
    // 32-bit words (row i's value in the low half, row i + 1's in the high half)
    auto* hi_out = reinterpret_cast<int32_t*>(hi + i * N);
    auto* lo_out = reinterpret_cast<int32_t*>(lo + i * N);
    auto* hi2_out = hi2 != nullptr ? reinterpret_cast<int32_t*>(hi2 + i * N) : nullptr;
    for (int64_t n = 0; n < N; n += 16) {
      const __mmask16 mask = lanes(N - n);
      __m512i h0, l0, h1 = _mm512_setzero_si512(), l1 = _mm512_setzero_si512();
      split16(mask, r0 + n, h0, l0);
      if (r1 != nullptr) split16(mask, r1 + n, h1, l1);
      const __m512i h = _mm512_or_si512(_mm512_srli_epi32(h0, 16), h1);
      _mm512_mask_storeu_epi32(hi_out + n, mask, h);
      _mm512_mask_storeu_epi32(lo_out + n, mask, _mm512_or_si512(_mm512_srli_epi32(l0, 16), l1));
      if (hi2_out != nullptr) _mm512_mask_storeu_epi32(hi2_out + n, mask, h);
    }
  }
}
}  // namespace adapterfast::cpu
#endif
#include "block_kernels_avx512_end.h"

#ifndef ADAPTERFAST_AVX512_KERNELS
namespace adapterfast::cpu {

void split_half(const c10::Half* src, int64_t n, c10::BFloat16* hi, c10::BFloat16* lo) {
  for (int64_t k = 0; k < n; ++k) split_value(static_cast<float>(src[k]), hi[k], lo[k]);
}

void split_rows_vnni(int64_t m, int64_t N, const c10::Half* src, int64_t ld_src, c10::BFloat16* hi,
                     c10::BFloat16* lo, c10::BFloat16* hi2) {
  for (int64_t i = 0; i < m + (m & 1); ++i) {
    for (int64_t n = 0; n < N; ++n) {
      c10::BFloat16 h(0.0f), l(0.0f);
      if (i < m) split_value(static_cast<float>(src[i * ld_src + n]), h, l);
      const int64_t at = (i >> 1) * N * 2 + n * 2 + (i & 1);
      hi[at] = h;
      lo[at] = l;
      if (hi2 != nullptr) hi2[at] = h;
    }
  }
}
}  // namespace adapterfast::cpu
#endif
