// Picks the block kernels once per process (see block_kernels.h).
#include "block_kernels.h"

#include <ATen/Version.h>

#include "env.h"

namespace adapterfast::cpu {
namespace {

// The BLAS kernels, or the portable ones where PyTorch exports no such gemm or
// ADAPTERFAST_CPU_BLAS=0.
template <typename acc_t>
const BlockKernels<acc_t>* blas_or_generic() {
  const BlockKernels<acc_t>* blas = blas::kernels<acc_t>();
  return blas == nullptr || env_is("ADAPTERFAST_CPU_BLAS", "0") ? &generic::kernels<acc_t>() : blas;
}

}  // namespace

template <>
const BlockKernels<float>& block_kernels<float>() {
  static const BlockKernels<float>* const chosen = [] {
    const BlockKernels<float>* fast = avx512::kernels();
    if (fast != nullptr && at::get_cpu_capability() == "AVX512") return fast;
    return blas_or_generic<float>();
  }();
  return *chosen;
}

template <>
const BlockKernels<double>& block_kernels<double>() {
  static const BlockKernels<double>* const chosen = blas_or_generic<double>();
  return *chosen;
}

}  // namespace adapterfast::cpu
