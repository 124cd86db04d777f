// adapterfast_cpu::fused: the CPU op with its derivative, as a C++ torch::autograd::Function
// (the way torchvision registers its CPU ops), so an eager training step on CPU costs one op
// call from Python: the forward saves what the backward needs, and the autograd engine runs the
// backward below without coming back to Python. Derivative: adapter_backward.cpp.
//
// What it does not do, functional.py routes to the Python autograd.Function instead: forward-mode
// AD (jvp), torch.func transforms, autocast, torch.compile.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "adapter_ops.h"
#include "autograd_context.h"

namespace adapterfast::cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class FusedAdapter : public torch::autograd::Function<FusedAdapter> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_down,
                            const at::Tensor& w_up, const std::optional<at::Tensor>& b_down,
                            const std::optional<at::Tensor>& b_up, c10::string_view activation, double scale,
                            double dropout_p, int64_t seed, const std::optional<at::Tensor>& residual,
                            bool training) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h] =
        adapter_forward_as(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual, training);
    ctx->save_for_backward({x, w_down, w_up, saved_form(b_down), saved_form(b_up), h});
    ctx->saved_data["scale"] = scale;
    save_constants(ctx, activation, dropout_p, seed, !residual.has_value());
    return y;
  }

  // Gradients for (x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual,
  // training): the residual's is grad_y itself (y = residual + branch).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad_y = grads[0];
    const bool residual_is_x = ctx->saved_data["residual_is_x"].toBool();
    auto [dx, dw_down, db_down, dw_up, db_up] = adapter_backward(
        grad_y, saved[0], saved[1], saved[2], optional_form(saved[3]), optional_form(saved[4]), saved[5],
        ctx->saved_data["activation"].toStringRef(), ctx->saved_data["scale"].toDouble(),
        ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["seed"].toInt(), residual_is_x);
    InputGradients gradients(ctx);
    at::Tensor g_x = gradients.next(true, dx);
    at::Tensor g_w_down = gradients.next(true, dw_down);
    at::Tensor g_w_up = gradients.next(true, dw_up);
    at::Tensor g_b_down = gradients.next(saved[3].defined(), db_down);
    at::Tensor g_b_up = gradients.next(saved[4].defined(), db_up);
    at::Tensor g_residual = gradients.next(!residual_is_x, grad_y);
    return {g_x,          g_w_down,     g_w_up,       g_b_down,   g_b_up, at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), g_residual, at::Tensor()};
  }
};

at::Tensor fused_autograd(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up,
                          const std::optional<at::Tensor>& b_down, const std::optional<at::Tensor>& b_up,
                          c10::string_view activation, double scale, double dropout_p, int64_t seed,
                          const std::optional<at::Tensor>& residual) {
  // Whether autograd records this call (what Function::apply decides; its forward runs with grad
  // mode off, so it is decided here): then y feeds a backward, and the forward writes it as a
  // training step's output (adapter_forward_as).
  const auto wants_grad = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); };
  const bool training = at::GradMode::is_enabled() && (x.requires_grad() || w_down.requires_grad() ||
                                                       w_up.requires_grad() || wants_grad(b_down) ||
                                                       wants_grad(b_up) || wants_grad(residual));
  return FusedAdapter::apply(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual, training);
}

at::Tensor fused_forward(const at::Tensor& x, const at::Tensor& w_down, const at::Tensor& w_up,
                         const std::optional<at::Tensor>& b_down, const std::optional<at::Tensor>& b_up,
                         c10::string_view activation, double scale, double dropout_p, int64_t seed,
                         const std::optional<at::Tensor>& residual) {
  return std::get<0>(adapter_forward(x, w_down, w_up, b_down, b_up, activation, scale, dropout_p, seed, residual));
}

}  // namespace
}  // namespace adapterfast::cpu

TORCH_LIBRARY_FRAGMENT(adapterfast_cpu, m) {
  m.def(
      "fused(Tensor x, Tensor w_down, Tensor w_up, Tensor? b_down, Tensor? b_up, str activation, "
      "float scale, float dropout_p, int seed, Tensor? residual) -> Tensor");
}

TORCH_LIBRARY_IMPL(adapterfast_cpu, CPU, m) { m.impl("fused", &adapterfast::cpu::fused_forward); }

TORCH_LIBRARY_IMPL(adapterfast_cpu, Autograd, m) { m.impl("fused", &adapterfast::cpu::fused_autograd); }
