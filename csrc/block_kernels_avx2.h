#pragma once
// project_in and project_out for float on AVX2 register tiles, project_out with the output epilogue
// applied in the registers: what the BLAS block kernels (block_kernels_blas.cpp) run instead of sgemm
// where it measured faster (block_kernels_avx2.cpp).
#include "block_kernels.h"

namespace adapterfast::cpu::avx2 {

// Whether this build has the kernels: an x86-64 build for AVX2 and FMA (setup.py builds all of
// adapterfast's x86-64 code so).
bool available();

// Whether project_out runs this epilogue: a float output and a float residual or none, where
// available() (the 16-bit storage kinds take the BLAS product).
bool handles(const OutputEpilogue<float>& e);

// B[k, i] = A[i, k] for i < M, k < K, B dense [K, M]: block_kernels.h's transpose (the BLAS table's
// for float), and Wd into the layout project_in reads.
void transpose(int64_t M, int64_t K, const float* A, int64_t lda, float* B);

// C[M, N] = A[M, K] B[K, N], block_kernels.h's project_in.
void project_in(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                int64_t ldc);

// C[M, N] = A[M, K] W[N, K]^T from W as it is (rows ldw apart), by dot products along K, each summed in
// 8 lanes: for calls of a few rows, where transposing W for project_in costs more than the product.
// A row's bits depend on its rows of A and W alone (not on M), and differ from project_in's.
void project_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw, float* C,
                int64_t ldc);

// out[M, K] = epilogue(A[M, N] B[N, K]), block_kernels.h's project_out, for an epilogue it handles.
void project_out(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 const OutputEpilogue<float>& e);

// project_out from W [K, N] = B^T as it is (rows ldw apart): block_kernels.h's project_out_nt, float W.
void project_out_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* W, int64_t ldw,
                    const OutputEpilogue<float>& e);

}  // namespace adapterfast::cpu::avx2
