#pragma once
// What the ops' C++ autograd Functions (adapter_autograd.cpp, grouped_autograd.cpp) share: the
// constants a forward keeps for its backward, optional tensors through save_for_backward (which
// stores an absent one as an undefined tensor), and the gradient list a backward returns.
#include <optional>
#include <string>

#include <torch/csrc/autograd/custom_function.h>

namespace adapterfast::cpu {

// The constants both ops' backwards read: ctx->saved_data["activation"], ["dropout_p"], ["seed"],
// ["residual_is_x"].
inline void save_constants(torch::autograd::AutogradContext* ctx, c10::string_view activation, double dropout_p,
                           int64_t seed, bool residual_is_x) {
  ctx->saved_data["activation"] = std::string(activation);
  ctx->saved_data["dropout_p"] = dropout_p;
  ctx->saved_data["seed"] = seed;
  ctx->saved_data["residual_is_x"] = residual_is_x;
}

inline at::Tensor saved_form(const std::optional<at::Tensor>& t) { return t.value_or(at::Tensor()); }

inline std::optional<at::Tensor> optional_form(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// A backward's gradients, input by input: next(passed, grad) is grad where the next tensor input
// was passed and needs a gradient, else undefined. needs_input_grad counts only the tensors
// passed (absent optionals have no edge), so every tensor input, needed or not, takes its turn.
class InputGradients {
 public:
  explicit InputGradients(torch::autograd::AutogradContext* ctx) : ctx_(ctx) {}

  at::Tensor next(bool passed, const at::Tensor& grad) {
    if (!passed) return at::Tensor();
    return ctx_->needs_input_grad(edge_++) ? grad : at::Tensor();
  }

 private:
  torch::autograd::AutogradContext* ctx_;
  int64_t edge_ = 0;
};

}  // namespace adapterfast::cpu
