#pragma once
// The grouped op on CPU: row i of x goes through adapter adapter_index[i] of a bank of A adapters
// (stacked weights), or through none when the index is -1. Semantics:
// adapterfast/grouped_reference.py. Implemented in grouped_forward.cpp and grouped_backward.cpp
// (16-bit inputs: grouped_backward_brgemm.cpp), registered in grouped_adapter.cpp.
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace adapterfast::cpu {

// Returns (y [N, d] in x's dtype, h [N, r] pre-activation in fp32, float64 for float64 x; zero on
// rows without an adapter).
std::tuple<at::Tensor, at::Tensor> grouped_forward(
    const at::Tensor& x, const at::Tensor& adapter_index, const at::Tensor& w_down, const at::Tensor& w_up,
    const std::optional<at::Tensor>& b_down, const std::optional<at::Tensor>& b_up, c10::string_view activation,
    const at::Tensor& scales, double dropout_p, int64_t seed, const std::optional<at::Tensor>& residual);

// Returns (dx, dw_down, db_down, dw_up, db_up), the weight gradients stacked [A, ...] in the
// weights' dtypes; adapters without rows get zeros.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& adapter_index, const at::Tensor& w_down,
    const at::Tensor& w_up, const std::optional<at::Tensor>& b_down, const std::optional<at::Tensor>& b_up,
    const at::Tensor& h, c10::string_view activation, const at::Tensor& scales, double dropout_p, int64_t seed,
    bool residual_is_x);

}  // namespace adapterfast::cpu
