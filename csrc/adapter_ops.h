#pragma once
// The two ops the CPU backend exposes (registered in bindings.cpp as adapterfast_cpu::forward and
// adapterfast_cpu::backward). Semantics: adapterfast.reference.forward / .backward.
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace adapterfast::cpu {

// Returns (y [N, d] in x's dtype, h [N, r] pre-activation in fp32, float64 for float64 x).
std::tuple<at::Tensor, at::Tensor> adapter_forward(
    const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up,
    const std::optional<at::Tensor>& b_down, const std::optional<at::Tensor>& b_up,
    c10::string_view activation, double scale, double dropout_p, int64_t seed,
    const std::optional<at::Tensor>& residual);

// adapter_forward, with `training` true for the forward of a training step, whose y feeds a
// backward (adapterfast_cpu::fused, adapter_autograd.cpp): the same values; such a y is written
// with non-temporal stores from a smaller size (stream_output, adapter_common.h).
std::tuple<at::Tensor, at::Tensor> adapter_forward_as(
    const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up,
    const std::optional<at::Tensor>& b_down, const std::optional<at::Tensor>& b_up,
    c10::string_view activation, double scale, double dropout_p, int64_t seed,
    const std::optional<at::Tensor>& residual, bool training);

// Returns (dx, dw_down, db_down, dw_up, db_up); weight and bias gradients in the weights' dtypes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up,
    const std::optional<at::Tensor>& b_down, const std::optional<at::Tensor>& b_up, const at::Tensor& h,
    c10::string_view activation, double scale, double dropout_p, int64_t seed, bool residual_is_x);

// What runs the GEMMs for inputs of this dtype here: "brgemm-amx" or "brgemm-avx512" (16-bit
// dtypes on oneDNN's ukernel), else the name of the block kernels of its accumulation type:
// "avx512", "blas" or "generic" (float64: "blas" or "generic").
std::string kernel_isa(at::ScalarType dtype);

}  // namespace adapterfast::cpu
