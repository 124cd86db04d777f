// Picks the block kernels once per process (see block_kernels.h).
#include "block_kernels.h"

#include <ATen/Version.h>

namespace adapterfast::cpu {

template <>
const BlockKernels<float>& block_kernels<float>() {
  static const BlockKernels<float>* const chosen = [] {
    const BlockKernels<float>* fast = avx512::kernels();
    return fast != nullptr && at::get_cpu_capability() == "AVX512" ? fast : &generic::kernels<float>();
  }();
  return *chosen;
}

template <>
const BlockKernels<double>& block_kernels<double>() {
  return generic::kernels<double>();
}

}  // namespace adapterfast::cpu
