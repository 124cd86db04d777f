#pragma once
// The output epilogue of the backward's dx product, dx = dh Wd (+ g when the residual is x), set
// up alike by the four backward drivers (adapter_backward.cpp, adapter_brgemm.cpp,
// grouped_backward.cpp, grouped_backward_brgemm.cpp); the per-block pointers (res, out, rows)
// are theirs to set.
#include <ATen/core/Tensor.h>

#include "adapter_common.h"
#include "block_kernels.h"

namespace adapterfast::cpu {

// g read with row stride ld_g in grad_y's kind, dx [N, d] contiguous, streamed when large.
template <typename acc_t>
OutputEpilogue<acc_t> dx_epilogue(const at::Tensor& grad_y, int64_t ld_g, const at::Tensor& dx) {
  OutputEpilogue<acc_t> e;
  e.res_kind = kind_of(grad_y.scalar_type());
  e.ld_res = ld_g;
  e.out_kind = kind_of(dx.scalar_type());
  e.ld_out = dx.size(1);
  e.stream_out = stream_output(static_cast<int64_t>(dx.nbytes()), /*training=*/true);
  return e;
}

}  // namespace adapterfast::cpu
