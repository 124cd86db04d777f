// adapterfast_cpu::grouped: the grouped op with its derivative, as a C++
// torch::autograd::Function (as adapter_autograd.cpp does for the single-adapter op), so an eager
// training call on CPU costs one op call from Python and the autograd engine runs the backward
// (grouped_backward.cpp) without coming back to Python. Without it, torch.library's Python
// autograd wrapper, its saved-tensor unpacking and a second op call from Python cost a small
// call more than the kernels do (figures in adapterfast/grouped_cpu.py).
//
// What it does not do, grouped.py routes to the adapterfast::grouped_forward custom op instead:
// forward-mode AD, torch.func transforms, autocast, torch.compile.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "autograd_context.h"
#include "grouped_ops.h"

namespace adapterfast::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class GroupedAdapter : public torch::autograd::Function<GroupedAdapter> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& adapter_index,
                            const at::Tensor& w_down, const at::Tensor& w_up,
                            const std::optional<at::Tensor>& b_down, const std::optional<at::Tensor>& b_up,
                            c10::string_view activation, const at::Tensor& scales, double dropout_p, int64_t seed,
                            const std::optional<at::Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h] = grouped_forward(x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, dropout_p, seed,
                                  residual);
    ctx->save_for_backward({x, adapter_index, w_down, w_up, saved_form(b_down), saved_form(b_up), h, scales});
    save_constants(ctx, activation, dropout_p, seed, !residual.has_value());
    return y;
  }

  // Gradients for (x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, dropout_p,
  // seed, residual): the residual's is grad_y itself (y = residual + branch); the index and the
  // scales are constants.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const bool residual_is_x = ctx->saved_data["residual_is_x"].toBool();
    auto [dx, dw_down, db_down, dw_up, db_up] = grouped_backward(
        grads[0], saved[0], saved[1], saved[2], saved[3], optional_form(saved[4]), optional_form(saved[5]), saved[6],
        ctx->saved_data["activation"].toStringRef(), saved[7], ctx->saved_data["dropout_p"].toDouble(),
        ctx->saved_data["seed"].toInt(), residual_is_x);
    InputGradients gradients(ctx);
    at::Tensor g_x = gradients.next(true, dx);
    gradients.next(true, at::Tensor());  // adapter_index
    at::Tensor g_w_down = gradients.next(true, dw_down);
    at::Tensor g_w_up = gradients.next(true, dw_up);
    at::Tensor g_b_down = gradients.next(saved[4].defined(), db_down);
    at::Tensor g_b_up = gradients.next(saved[5].defined(), db_up);
    gradients.next(true, at::Tensor());  // scales
    at::Tensor g_residual = gradients.next(!residual_is_x, grads[0]);
    return {g_x, at::Tensor(), g_w_down, g_w_up,       g_b_down,    g_b_up,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), g_residual};
  }
};

at::Tensor grouped_autograd(const at::Tensor& x, const at::Tensor& adapter_index, const at::Tensor& w_down,
                            const at::Tensor& w_up, const std::optional<at::Tensor>& b_down,
                            const std::optional<at::Tensor>& b_up, c10::string_view activation,
                            const at::Tensor& scales, double dropout_p, int64_t seed,
                            const std::optional<at::Tensor>& residual) {
  return GroupedAdapter::apply(x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, dropout_p, seed,
                               residual);
}

at::Tensor grouped_output(const at::Tensor& x, const at::Tensor& adapter_index, const at::Tensor& w_down,
                          const at::Tensor& w_up, const std::optional<at::Tensor>& b_down,
                          const std::optional<at::Tensor>& b_up, c10::string_view activation,
                          const at::Tensor& scales, double dropout_p, int64_t seed,
                          const std::optional<at::Tensor>& residual) {
  return std::get<0>(
      grouped_forward(x, adapter_index, w_down, w_up, b_down, b_up, activation, scales, dropout_p, seed, residual));
}

}  // namespace
}  // namespace adapterfast::cpu

TORCH_LIBRARY_FRAGMENT(adapterfast_cpu, m) {
  m.def(
      "grouped(Tensor x, Tensor adapter_index, Tensor w_down, Tensor w_up, Tensor? b_down, Tensor? b_up, "
      "str activation, Tensor scales, float dropout_p, int seed, Tensor? residual) -> Tensor");
}

TORCH_LIBRARY_IMPL(adapterfast_cpu, CPU, m) { m.impl("grouped", &adapterfast::cpu::grouped_output); }

TORCH_LIBRARY_IMPL(adapterfast_cpu, Autograd, m) { m.impl("grouped", &adapterfast::cpu::grouped_autograd); }
