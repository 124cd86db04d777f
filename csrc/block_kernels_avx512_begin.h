// Opens the region of a translation unit compiled for AVX-512 (include it after all other headers
// and close it with block_kernels_avx512_end.h). The file is compiled for the baseline target;
// only the code between these two headers gets AVX-512. That code includes no headers but
// block_kernels_avx512.h and keeps its inline functions in an anonymous namespace, so the linker
// can never hand an AVX-512 instance of a shared inline function to baseline callers. The
// kernels run only once block_kernels.cpp saw that the CPU runs AVX-512.
//
// Defines ADAPTERFAST_AVX512_KERNELS where the compiler can target AVX-512 (x86-64 GCC or Clang).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ADAPTERFAST_AVX512_KERNELS 1
#include <immintrin.h>

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
#endif
