// Closes the AVX-512 region opened by block_kernels_avx512_begin.h.
#ifdef ADAPTERFAST_AVX512_KERNELS
#undef ALWAYS_INLINE
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
#endif
