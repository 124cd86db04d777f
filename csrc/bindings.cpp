// Registers the CPU ops as torch.ops.adapterfast_cpu.{forward, backward, kernel_isa} (fused, the
// differentiable op, registers itself in adapter_autograd.cpp), and makes the library importable
// as the Python module adapterfast._C (importing it registers the ops).
#include <Python.h>

#include <torch/library.h>

#include "adapter_ops.h"
#include "block_kernels.h"
#include "brgemm.h"

namespace adapterfast::cpu {

std::string kernel_isa(at::ScalarType dtype) {
  if (const std::string name = brgemm_kernel_name(dtype); !name.empty()) return name;
  return dtype == at::kDouble ? block_kernels<double>().name : block_kernels<float>().name;
}

}  // namespace adapterfast::cpu

TORCH_LIBRARY(adapterfast_cpu, m) {
  m.def(
      "forward(Tensor x, Tensor w_down, Tensor w_up, Tensor? b_down, Tensor? b_up, str activation, "
      "float scale, float dropout_p, int seed, Tensor? residual) -> (Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_y, Tensor x, Tensor w_down, Tensor w_up, Tensor? b_down, Tensor? b_up, "
      "Tensor h, str activation, float scale, float dropout_p, int seed, bool residual_is_x) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("kernel_isa(ScalarType dtype) -> str", &adapterfast::cpu::kernel_isa);
}

TORCH_LIBRARY_IMPL(adapterfast_cpu, CPU, m) {
  m.impl("forward", &adapterfast::cpu::adapter_forward);
  m.impl("backward", &adapterfast::cpu::adapter_backward);
}

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
