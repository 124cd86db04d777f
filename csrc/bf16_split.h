#pragma once
// float16 products on the bfloat16 matrix unit, exactly. Every float16 value v is the sum of two
// bfloat16 values, hi = bf16(v) (round to nearest even) and lo = v - hi: v has 11 significant bits,
// hi keeps 8 and the rest (at most 3 bits) is lo, and bfloat16 has float32's exponent range, so no
// float16 value (subnormals included) under- or overflows. With fp32 accumulation,
//   a . b = a_hi . b_hi + a_hi . b_lo + a_lo . b_hi + a_lo . b_lo,
// and the last term is below 2^-16 of |a| |b| (dropped: float16's own rounding is 2^-11), so one
// float16 GEMM costs three bf16 GEMMs, on AMX tiles several times faster than oneDNN's float16
// kernel on AVX512-FP16 (which converts to fp32 and multiplies in fp32) on CPUs without AMX-FP16.
// v = +-inf gives hi = v and lo = 0 (not inf - inf).
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace adapterfast::cpu {

// hi[k] + lo[k] == float(src[k]) for k < n. AVX-512 (only called where the brgemm paths run,
// which need it).
void split_half(const c10::Half* src, int64_t n, c10::BFloat16* hi, c10::BFloat16* lo);

// Rows [0, m) of src (width N, leading dimension ld_src) split into hi and lo, written straight
// as brgemm B operands in the VNNI layout (pairs of rows interleaved, ldb = N, m rounded up to even
// with a zero row): hi into hi and, when not null, hi2 as well; lo into lo.
void split_rows_vnni(int64_t m, int64_t N, const c10::Half* src, int64_t ld_src, c10::BFloat16* hi,
                     c10::BFloat16* lo, c10::BFloat16* hi2);

// The same for one value (the portable fallback of the two above): v is rounded to float16 first.
inline void split_value(float v, c10::BFloat16& hi, c10::BFloat16& lo) {
  const float v16 = static_cast<float>(static_cast<c10::Half>(v));
  hi = static_cast<c10::BFloat16>(v16);
  const float rest = v16 - static_cast<float>(hi);
  lo = static_cast<c10::BFloat16>(rest == rest ? rest : 0.0f);
}

}  // namespace adapterfast::cpu
