// Registers the grouped op on CPU as adapterfast_cpu::grouped_forward and
// adapterfast_cpu::grouped_backward (grouped_ops.h; forward in grouped_forward.cpp, backward in
// grouped_backward.cpp, the row segments they share in grouped_rows.h, the weight operands in
// grouped_weights.h).
#include <torch/library.h>

#include "grouped_ops.h"

TORCH_LIBRARY_FRAGMENT(adapterfast_cpu, m) {
  m.def(
      "grouped_forward(Tensor x, Tensor adapter_index, Tensor w_down, Tensor w_up, Tensor? b_down, Tensor? b_up, "
      "str activation, Tensor scales, float dropout_p, int seed, Tensor? residual) -> (Tensor, Tensor)");
  m.def(
      "grouped_backward(Tensor grad_y, Tensor x, Tensor adapter_index, Tensor w_down, Tensor w_up, Tensor? b_down, "
      "Tensor? b_up, Tensor h, str activation, Tensor scales, float dropout_p, int seed, bool residual_is_x) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adapterfast_cpu, CPU, m) {
  m.impl("grouped_forward", &adapterfast::cpu::grouped_forward);
  m.impl("grouped_backward", &adapterfast::cpu::grouped_backward);
}
