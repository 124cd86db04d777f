#pragma once
// Rows converted between the 16-bit storage types and float: widen_row (bf16/float16 -> float,
// exact) and narrow_row (float -> bf16/float16, scaled, rounded to nearest even as c10 rounds),
// 8 values per instruction with F16C (float16) or AVX2 (bf16), plain loops otherwise. Shared by
// the drivers (x and grad_y rows, weights, weight gradients) and the grouped op's weights.
#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace adapterfast::cpu {

// dst[k] = float(src[k]) for k < n. c10::Half's conversion is scalar bit manipulation that the
// compiler does not vectorise (with scale_row's, in adapter_backward.cpp, ~16% of the samples of
// a fp16 step at N = 8192, d = 768, r = 16 on Zen 4); with F16C, 8 values per instruction, and
// bf16 as a 16-bit shift, 8 at a time (both exact, so the same values).
template <typename T, typename acc_t>
inline void widen_row(const T* __restrict src, acc_t* __restrict dst, int64_t n) {
  int64_t k = 0;
#if defined(__F16C__) && defined(__AVX__)
  if constexpr (std::is_same_v<T, c10::Half> && std::is_same_v<acc_t, float>) {
    for (; k + 8 <= n; k += 8) {
      _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
    }
  }
#endif
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    for (; k + 8 <= n; k += 8) {
      const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k)));
      _mm256_storeu_ps(dst + k, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
    }
  }
#endif
  for (; k < n; ++k) dst[k] = static_cast<acc_t>(src[k]);
}

// dst[k] = T(src[k] * factor) for k < n: the product in float, then c10's rounding to T (nearest
// even; NaN stays NaN). For float16 with F16C and bf16 with AVX2, 8 values at a time (the weight
// gradients of every call: c10::Half's scalar conversion made them and the weights' conversion
// a quarter of a fp16 call at N = 1, d = 768, where the fused op was slower than eager).
template <typename T>
inline void narrow_row(const float* __restrict src, float factor, T* __restrict dst, int64_t n) {
  int64_t k = 0;
#if defined(__F16C__) && defined(__AVX__)
  if constexpr (std::is_same_v<T, c10::Half>) {
    const __m256 f = _mm256_set1_ps(factor);
    for (; k + 8 <= n; k += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(src + k), f);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
#endif
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256 f = _mm256_set1_ps(factor);
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF), nan = _mm256_set1_epi32(0x7FC0);
    for (; k + 8 <= n; k += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(src + k), f);
      const __m256i bits = _mm256_castps_si256(v);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
      __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(bias, odd)), 16);
      rounded = _mm256_blendv_epi8(rounded, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), _mm256_castsi256_si128(packed));
    }
  }
#endif
  for (; k < n; ++k) dst[k] = static_cast<T>(src[k] * factor);
}

}  // namespace adapterfast::cpu
