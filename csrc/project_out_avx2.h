#pragma once
// project_out for float on AVX2 register tiles, with the output epilogue applied in the registers:
// the BLAS block kernels' project_out where it handles the epilogue (project_out_avx2.cpp).
#include "block_kernels.h"

namespace adapterfast::cpu::avx2 {

// Whether project_out runs this epilogue: a float output and a float residual or none, in a build
// for AVX2 and FMA (x86-64 builds of adapterfast are; the 16-bit storage kinds take the BLAS product).
bool handles(const OutputEpilogue<float>& e);

// out[M, K] = epilogue(A[M, N] B[N, K]), block_kernels.h's project_out, for an epilogue it handles.
void project_out(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 const OutputEpilogue<float>& e);

}  // namespace adapterfast::cpu::avx2
