#include "brgemm.h"

#include <limits>

#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "block_kernels.h"

namespace adapterfast::cpu {

namespace {

bool brgemm_enabled() {
  return !env_is("ADAPTERFAST_CPU_BRGEMM", "0") && avx512::kernels() != nullptr &&
         std::string(block_kernels<float>().name) == "avx512";
}

// C = A B for A = [1 2 3 4] and a 4x2 B packed in `layout`; true if brgemm gives the product.
template <typename T>
bool computes_in(BrgemmLayout layout) {
  const float b[4][2] = {{1, -2}, {3, 5}, {-7, 11}, {13, 17}};
  const T a[4] = {T(1.0f), T(2.0f), T(3.0f), T(4.0f)};
  const Scratch<T> packed = pack_b<T>(layout, 4, 2, &b[0][0], 2);
  float c[2] = {0, 0};
  try {
    at::native::cpublas::brgemm(1, 2, 4, 4, 2, 2, false, a, packed.data(), c, true);
    at::native::cpublas::brgemm_release(true);
  } catch (const std::exception&) {  // c10::Error, or dnnl::error from kernel creation
    return false;
  }
  return c[0] == 1 + 6 - 21 + 52 && c[1] == -2 + 10 + 33 + 68;
}

template <typename T>
BrgemmLayout probe() {
  if (!brgemm_enabled()) return BrgemmLayout::none;
  if (computes_in<T>(BrgemmLayout::vnni)) return BrgemmLayout::vnni;
  if (computes_in<T>(BrgemmLayout::plain)) return BrgemmLayout::plain;
  return BrgemmLayout::none;
}

}  // namespace

BrgemmLayout brgemm_layout(at::ScalarType dtype) {
  static const BrgemmLayout bf16 = probe<c10::BFloat16>();
  static const BrgemmLayout f16 = probe<c10::Half>();
  // fp32 stays on the hand-tiled AVX-512 kernels (block_kernels_avx512.cpp). Measured with
  // `python -m benchmarks.cpu_paths --dtype fp32 --paths default,fp32-brgemm` (N = 8192, relu,
  // fwd + bwd; Intel Xeon with AMX-BF16, AVX512-BF16/FP16 on a loaded 2-core VM, so ratios only;
  // one thread, though the script's default asked for two: until b347683 its wall-clock timer ran
  // on one), brgemm's fp32 kernel took 1.2x to 1.9x the time: d=1024 r=64 225 ms vs 350 ms (and
  // 322 / 424 ms vs 568 / 500 ms in two earlier runs), d=4096 r=16 650 / 913 ms vs 1252 / 1319 ms.
  // Without a matrix unit for fp32, oneDNN's ukernel only adds per-call overhead on these skinny
  // GEMMs. On AVX-512 without AMX (AMD EPYC, Zen 4: AVX-512 and AVX512-BF16, 2-core VM shared
  // with other jobs, commit c7cc731), the same command with `--threads 1 --clock thread --calls 8
  // --repeats 3` and then `--threads 2 --repeats 2`, at N = 8192 (fwd+bwd ms, default / brgemm,
  // 3 rounds of least thread time at 1 thread, load 1.8-2.0, then 2 rounds of wall time, also on
  // one thread: see above):
  // d=768 r=16 21.0/19.8, 21.5/23.5, 18.2/19.4 and 21.4/20.9, 20.7/21.7 (a tie); d=768 r=64
  // 50.7/57.0, 52.1/53.6, 53.9/58.4 and 58.1/59.8, 57.2/60.7; d=1024 r=16 28.0/30.2, 28.6/34.1,
  // 25.7/34.3 and 30.9/32.6, 28.3/38.8; d=1024 r=64 72.8/70.5, 71.2/72.3, 68.1/72.3 and 77.0/103.5,
  // 84.2/83.5 (a tie); d=4096 r=16 123/181, 138/191, 125/197 and 134/185, 140/194; d=4096 r=64
  // 323/489, 346/479, 357/454 and 404/550, 401/561. brgemm wins nowhere clearly and loses by
  // 1.35-1.5x at d = 4096, so fp32 stays on the block kernels there too (raw output in
  // benchmarks/results/cpu_fp32_zen4.txt). ADAPTERFAST_CPU_FP32_BRGEMM=1 routes fp32 to brgemm to
  // repeat the comparison.
  static const BrgemmLayout f32 =
      brgemm_enabled() && env_is("ADAPTERFAST_CPU_FP32_BRGEMM", "1") ? BrgemmLayout::plain : BrgemmLayout::none;
  switch (dtype) {
    case at::kBFloat16: return bf16;
    case at::kHalf: return f16;
    case at::kFloat: return f32;
    default: return BrgemmLayout::none;
  }
}

std::string brgemm_unit(at::ScalarType dtype) {
  return dtype != at::kFloat && at::native::cpublas::could_pack(dtype) ? "amx" : "avx512";
}

bool bf16_on_amx_tiles() {
  static const bool amx = brgemm_unit(at::kBFloat16) == "amx";
  return amx;
}

// float16 on AMX-BF16 without AMX-FP16 (Intel Xeon, Sapphire Rapids class, with AVX512-FP16; a
// 2-core VM, load average 0.3-1.7), commit a1691af, 2026-12-03: `python -m benchmarks.cpu_paths
// --dtype fp16 --paths eager,default,brgemm-off,fp16-native --repeats 4 --shapes 8192,768,16
// 8192,768,64 8192,1024,16 8192,1024,64 8192,4096,16 8192,4096,64` (2 threads, median wall time;
// default was then the split forward with the backward on oneDNN's float16 kernel) and again with
// `--paths brgemm-off,fp16-bf16x3,default --repeats 3` at r = 32 (output in
// benchmarks/results/cpu_16bit/amx_fp16_paths_a1691af.txt). Medians in ms, fp32 kernels (brgemm-off)
// / oneDNN's float16 kernel (fp16-native) / split (bf16x3):
//   backward: (768, 16) 7.1 / 8.6 / 9.1; (768, 64) 19.3 / 23.1 / 23.3; (1024, 16) 9.1 / 10.8 / 10.5;
//     (1024, 64) 27.4 / 32.3 / 31.9 (29.4 in the second run); (4096, 16) 46.2 / 53.7 / 64.4;
//     (4096, 64) 153 / 172 / 167; r = 32: (768) 12.3 / - / 13.3, (1024) 16.9 / - / 21.7, (4096)
//     102 / - / 111. The fp32 kernels win every backward; oneDNN's float16 kernel (AVX512-FP16)
//     never beats them, in either pass, so the single op runs it only where it is on AMX tiles
//     (AMX-FP16, not measured: no such CPU was available) or when forced. The grouped op keeps
//     it (brgemm_layout(kHalf)): its fp32 row kernels are slower, and `python -m benchmarks.grouped
//     --dtypes float16 --adapters 8 32 --threads 2 --rounds 3 --no-save` read, with the fp32
//     kernels / with oneDNN's float16 kernel, 5.90 / 5.43 ms forward and 24.9 / 20.2 ms
//     fwd+bwd at A = 8, 6.95 / 5.27 and 27.7 / 19.8 ms at A = 32 (N = 8192, d = 768, r = 16).
//   forward: (768, 16) 3.0 / 4.1 / 3.3; (1024, 16) 3.9 / 5.1 / 4.3 (4.1 / - / 4.5); (4096, 16)
//     18.0 / 22.5 / 20.8; r = 32: (768) 4.6 / - / 4.2, (1024) 6.5 / - / 5.9, (4096) 33.5 / - / 27.2;
//     r = 64: (768) 8.1 / 10.9 / 6.3, (1024) 11.2 / 14.6 / 8.7 (12.0 / - / 10.4), (4096) 54.5 /
//     61.2 / 44.2. The split wins from r = 32 (three bf16 AMX products against one fp32 one pay
//     off once the products outweigh splitting the x rows), the fp32 kernels at r = 16; r between
//     16 and 32 was not measured. Hence kFp16SplitMinRank.
//   forward at few rows, r = 64, weights in float16 (given: packs_given_weights), commit 8155f08
//     with one forward thread per 64 rows: `python -m benchmarks.cpu_paths --dtype fp16 --weights
//     x --paths eager,brgemm-off,fp16-bf16x3-fwd --repeats 2 --shapes 16,1024,64 64,1024,64
//     128,1024,64 256,1024,64 512,1024,64 128,768,64 256,768,64 512,768,64` (medians in ms, eager /
//     fp32 kernels / split; benchmarks/results/cpu_16bit/amx_fp16_rows_8155f08.txt): d = 1024: N =
//     16 0.145 / 0.125 / 0.140, 64 0.215 / 0.205 / 0.260, 128 0.305 / 0.325 / 0.340, 256 0.465 /
//     0.435 / 0.455, 512 0.860 / 0.725 / 0.710; d = 768: 128 0.255 / 0.215 / 0.205, 256 0.390 /
//     0.320 / 0.305, 512 0.695 / 0.500 / 0.580. The split's fixed cost (splitting both weights,
//     six products) loses below a few hundred rows and wins by 20-30% at N = 8192 (above); the
//     two are within 5% at 256 and 512. Hence kFp16SplitMinRows.
// float16 on AVX512-BF16 without AMX and without AVX512-FP16 (AMD EPYC, Zen 4 class; oneDNN has no
// float16 brgemm there): the split runs each product as three bf16 products on `vdpbf16ps`, whose
// rate (about 215 GFLOP/s a core, `python -m benchmarks.brgemm_calls`) is only twice fp32's, so
// three of them cost more than one fp32 product. Measured with `python -m benchmarks.cpu_paths
// --dtype fp16 --paths eager,default,fp16-bf16x3 --threads 1 --clock thread --shapes 8192,768,16
// 8192,768,64 8192,1024,64 8192,4096,16` (least thread time of 5 calls, load average 1.8;
// benchmarks/results/cpu_16bit/avx512bf16_fp16_paths.txt), fwd+bwd, fp32 kernels vs split: 36.9 vs
// 33.4 ms (d=768 r=16), 65.7 vs 85.0 (768, 64), 96.0 vs 131.1 (1024, 64), 204.0 vs 232.6 (4096,
// 16); forwards alone 10.7/9.5, 19.8/26.3, 28.6/45.5, 59.9/58.9. The split wins 9% at one shape and
// loses 14-37% at the others, so without AMX float16 stays off the split unless forced.
Fp16Route fp16_route(bool backward, int64_t n, int64_t r) {
  enum class Forced : uint8_t { none, native, bf16x3, bf16x3_fwd };
  static const Forced forced = env_is("ADAPTERFAST_CPU_FP16", "native")       ? Forced::native
                               : env_is("ADAPTERFAST_CPU_FP16", "bf16x3")     ? Forced::bf16x3
                               : env_is("ADAPTERFAST_CPU_FP16", "bf16x3-fwd") ? Forced::bf16x3_fwd
                                                                              : Forced::none;
  static const bool bf16 = brgemm_layout(at::kBFloat16) != BrgemmLayout::none;
  static const bool bf16_amx = bf16 && bf16_on_amx_tiles();
  static const bool f16 = brgemm_layout(at::kHalf) != BrgemmLayout::none;
  if (f16 && (forced == Forced::native || brgemm_unit(at::kHalf) == "amx")) return Fp16Route::native;
  if (bf16 && (forced == Forced::bf16x3 || (forced == Forced::bf16x3_fwd && !backward))) return Fp16Route::bf16x3;
  if (forced == Forced::none && bf16_amx && !backward && r >= kFp16SplitMinRank && n >= kFp16SplitMinRows) {
    return Fp16Route::bf16x3;
  }
  return Fp16Route::fp32_kernels;
}

std::string brgemm_kernel_name(at::ScalarType dtype) {
  constexpr int64_t kAny = std::numeric_limits<int64_t>::max();
  if (dtype == at::kHalf) {
    switch (fp16_route(false, kAny, kAny)) {
      case Fp16Route::bf16x3:
        return "brgemm-" + brgemm_unit(at::kBFloat16) + "-bf16x3" +
               (fp16_route(true, kAny, kAny) == Fp16Route::bf16x3 ? "" : "-fwd");
      case Fp16Route::native: return "brgemm-" + brgemm_unit(at::kHalf);
      default: return "";
    }
  }
  if (brgemm_layout(dtype) == BrgemmLayout::none) return "";
  return "brgemm-" + brgemm_unit(dtype);
}

}  // namespace adapterfast::cpu

#include "block_kernels_avx512_begin.h"
namespace adapterfast::cpu {
namespace {

#ifdef ADAPTERFAST_AVX512_KERNELS
// The 16 x 16 tile of 32-bit words in r transposed in place (r[c] becomes column c): pairs of
// rows interleaved (32-bit), then pairs of pairs (64-bit), then 128-bit lanes gathered twice.
ALWAYS_INLINE void transpose_words(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int q = 0; q < 16; q += 4) {
    r[q] = _mm512_unpacklo_epi64(t[q], t[q + 2]);
    r[q + 1] = _mm512_unpackhi_epi64(t[q], t[q + 2]);
    r[q + 2] = _mm512_unpacklo_epi64(t[q + 1], t[q + 3]);
    r[q + 3] = _mm512_unpackhi_epi64(t[q + 1], t[q + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_i32x4(r[c], r[c + 4], 0x88);
    t[c + 4] = _mm512_shuffle_i32x4(r[c], r[c + 4], 0xdd);
    t[c + 8] = _mm512_shuffle_i32x4(r[c + 8], r[c + 12], 0x88);
    t[c + 12] = _mm512_shuffle_i32x4(r[c + 8], r[c + 12], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0x88);
    r[c + 4] = _mm512_shuffle_i32x4(t[c + 4], t[c + 12], 0x88);
    r[c + 8] = _mm512_shuffle_i32x4(t[c], t[c + 8], 0xdd);
    r[c + 12] = _mm512_shuffle_i32x4(t[c + 4], t[c + 12], 0xdd);
  }
}

// Rows [0, mi) and columns [0, nj) of a 16 x 16 tile of 16-bit values (mi, nj <= 16), widened to
// 32-bit lanes for transpose_words (the rest zero), stored as columns [0, mi) of rows [0, nj).
ALWAYS_INLINE void transpose_tile16(const uint16_t* src, int64_t ld_src, uint16_t* dst, int64_t ld_dst, int64_t mi,
                                    int64_t nj) {
  const __mmask16 cols = static_cast<__mmask16>((1u << nj) - 1);
  const __mmask16 rows = static_cast<__mmask16>((1u << mi) - 1);
  __m512i r[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = i < mi ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(cols, src + i * ld_src)) : _mm512_setzero_si512();
  }
  transpose_words(r);
  for (int c = 0; c < nj; ++c) _mm256_mask_storeu_epi16(dst + c * ld_dst, rows, _mm512_cvtepi32_epi16(r[c]));
}

// The same for 32-bit words.
ALWAYS_INLINE void transpose_tile32(const uint32_t* src, int64_t ld_src, uint32_t* dst, int64_t ld_dst, int64_t mi,
                                    int64_t nj) {
  const __mmask16 cols = static_cast<__mmask16>((1u << nj) - 1);
  const __mmask16 rows = static_cast<__mmask16>((1u << mi) - 1);
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = i < mi ? _mm512_maskz_loadu_epi32(cols, src + i * ld_src) : _mm512_setzero_si512();
  transpose_words(r);
  for (int c = 0; c < nj; ++c) _mm512_mask_storeu_epi32(dst + c * ld_dst, rows, r[c]);
}

// Rows r0 and r1 (r1 null: a zero row) of 16-bit values, columns [n, n + 16) as 16 32-bit words
// (r0's value low, r1's high); with sums, their values added to sums[n ...] in row order.
template <bool kHalf>
ALWAYS_INLINE void interleave_16(const uint16_t* r0, const uint16_t* r1, uint16_t* out, float* sums, __mmask16 m) {
  const __m512i w0 = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r0));
  const __m512i w1 = r1 == nullptr ? _mm512_setzero_si512() : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, r1));
  const __m512i hi = _mm512_slli_epi32(w1, 16);
  _mm512_mask_storeu_epi32(out, m, _mm512_or_si512(w0, hi));
  if (sums == nullptr) return;
  __m512 s = _mm512_maskz_loadu_ps(m, sums);
  if constexpr (kHalf) {
    s = _mm512_add_ps(s, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(w0)));
    if (r1 != nullptr) s = _mm512_add_ps(s, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(w1)));
  } else {
    s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)));
    if (r1 != nullptr) s = _mm512_add_ps(s, _mm512_castsi512_ps(hi));
  }
  _mm512_mask_storeu_ps(sums, m, s);
}

// One row of 16-bit values copied, columns [n, n + 32), and added to sums in order.
template <bool kHalf>
ALWAYS_INLINE void copy_16(const uint16_t* src, uint16_t* out, float* sums, __mmask32 m) {
  const __m512i v = _mm512_maskz_loadu_epi16(m, src);
  _mm512_mask_storeu_epi16(out, m, v);
  if (sums == nullptr) return;
  const __m256i halves[2] = {_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)};
  for (int h = 0; h < 2; ++h) {
    const __mmask16 mh = static_cast<__mmask16>(m >> (16 * h));
    if (mh == 0) break;
    const __m512 f = kHalf ? _mm512_cvtph_ps(halves[h])
                           : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves[h]), 16));
    _mm512_mask_storeu_ps(sums + 16 * h, mh, _mm512_add_ps(_mm512_maskz_loadu_ps(mh, sums + 16 * h), f));
  }
}

// rows_as_b_16bit (brgemm.h) for bf16 (kHalf false) or float16 values.
template <bool kHalf>
void rows_as_b_16bit_as(bool vnni, int64_t m, int64_t N, const uint16_t* src, int64_t ld_src, uint16_t* dst,
                        int64_t ldb, const int64_t* rows, float* sums) {
  auto row = [&](int64_t i) { return src + (rows == nullptr ? i : rows[i]) * ld_src; };
  const int64_t m_even = m + (m & 1);
  if (vnni) {
    for (int64_t i = 0; i < m_even; i += 2) {
      const uint16_t* r0 = row(i);
      const uint16_t* r1 = i + 1 < m ? row(i + 1) : nullptr;
      uint16_t* out = dst + i * ldb;
      int64_t n = 0;
      for (; n + 16 <= N; n += 16) {
        interleave_16<kHalf>(r0 + n, r1 ? r1 + n : nullptr, out + 2 * n, sums ? sums + n : nullptr, 0xFFFF);
      }
      if (n < N) interleave_16<kHalf>(r0 + n, r1 ? r1 + n : nullptr, out + 2 * n, sums ? sums + n : nullptr,
                                        static_cast<__mmask16>((1u << (N - n)) - 1));
    }
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    const uint16_t* r = row(i);
    uint16_t* out = dst + i * ldb;
    for (int64_t n = 0; n < N; n += 32) {
      const __mmask32 mk = N - n >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << (N - n)) - 1);
      copy_16<kHalf>(r + n, out + n, sums ? sums + n : nullptr, mk);
    }
  }
  if (m_even != m) std::fill(dst + m * ldb, dst + m * ldb + N, uint16_t(0));
}
#endif

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < m, j < n (16- or 32-bit values), in 16 x 16
// tiles in registers, masked at the edges (the grouped op's up-weights transposed as words are
// [d, r / 2]: all edge at r = 16).
template <typename V>
void transpose_by_tiles(int64_t m, int64_t n, const V* src, int64_t ld_src, V* dst, int64_t ld_dst) {
  static_assert(sizeof(V) == 2 || sizeof(V) == 4);
#ifdef ADAPTERFAST_AVX512_KERNELS
  for (int64_t i = 0; i < m; i += 16) {
    const int64_t mi = std::min<int64_t>(16, m - i);
    for (int64_t j = 0; j < n; j += 16) {
      const int64_t nj = std::min<int64_t>(16, n - j);
      if constexpr (sizeof(V) == 2) {
        transpose_tile16(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst, mi, nj);
      } else {
        transpose_tile32(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst, mi, nj);
      }
    }
  }
#else
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) dst[j * ld_dst + i] = src[i * ld_src + j];
  }
#endif
}

}  // namespace

void transpose_16bit(int64_t m, int64_t n, const uint16_t* src, int64_t ld_src, uint16_t* dst, int64_t ld_dst) {
  transpose_by_tiles(m, n, src, ld_src, dst, ld_dst);
}

void weight_as_b_16bit(bool vnni, int64_t P, int64_t Q, const uint16_t* w, bool transpose, uint16_t* dst,
                       int64_t ldb, bool half) {
  if (!transpose) return rows_as_b_16bit(vnni, P, Q, w, Q, dst, ldb, nullptr, nullptr, half);
  const int64_t N = P;
  if (!vnni) {
    transpose_16bit(P, Q, w, Q, dst, ldb);
    if (Q % 2 == 1) std::fill(dst + Q * ldb, dst + Q * ldb + N, uint16_t(0));
    return;
  }
  if (Q % 2 == 0) {
    transpose_by_tiles(P, Q / 2, reinterpret_cast<const uint32_t*>(w), Q / 2, reinterpret_cast<uint32_t*>(dst), ldb);
    return;
  }
  uint32_t* words = reinterpret_cast<uint32_t*>(dst);
  for (int64_t j = 0; 2 * j < Q; ++j) {
    for (int64_t n = 0; n < N; ++n) {
      const uint32_t hi = 2 * j + 1 < Q ? w[n * Q + 2 * j + 1] : 0;
      words[j * ldb + n] = uint32_t(w[n * Q + 2 * j]) | (hi << 16);
    }
  }
}

void rows_as_b_16bit(bool vnni, int64_t m, int64_t N, const uint16_t* src, int64_t ld_src, uint16_t* dst,
                     int64_t ldb, const int64_t* rows, float* sums, bool half) {
#ifdef ADAPTERFAST_AVX512_KERNELS
  if (half) {
    rows_as_b_16bit_as<true>(vnni, m, N, src, ld_src, dst, ldb, rows, sums);
  } else {
    rows_as_b_16bit_as<false>(vnni, m, N, src, ld_src, dst, ldb, rows, sums);
  }
#else
  TORCH_CHECK(false, "adapterfast: rows_as_b_16bit needs the AVX-512 kernels");
#endif
}

}  // namespace adapterfast::cpu
#include "block_kernels_avx512_end.h"
