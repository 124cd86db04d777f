// Picks the block kernels once per process (see block_kernels.h).
#include "block_kernels.h"

#include <ATen/Version.h>

#include "env.h"

namespace adapterfast::cpu {

template <>
const BlockKernels<float>& block_kernels<float>() {
  static const BlockKernels<float>* const chosen = [] {
    const BlockKernels<float>* fast = avx512::kernels();
    if (fast != nullptr && at::get_cpu_capability() == "AVX512") return fast;
    const BlockKernels<float>* blas = blas::kernels();
    return blas == nullptr || env_is("ADAPTERFAST_CPU_BLAS", "0") ? &generic::kernels<float>() : blas;
  }();
  return *chosen;
}

template <>
const BlockKernels<double>& block_kernels<double>() {
  return generic::kernels<double>();
}

}  // namespace adapterfast::cpu
