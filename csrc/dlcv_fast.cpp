// The whole C++ surface of dlcv_fast: the torch.library schema of every op (namespace
// dlcv_fast) with its CPU and CUDA implementations, and the same functions as a plain
// pybind11 module. Fake (meta) implementations and autograd formulas are registered from
// Python, next to each op (dlcv_fast/ops/), where they can use symbolic shapes.

#include <torch/extension.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(dlcv_fast, m) {
  m.def(
      "max_pool2d(Tensor self, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> (Tensor, Tensor)");
  m.def(
      "max_pool2d_backward(Tensor grad_output, Tensor self, Tensor indices, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(dlcv_fast, CPU, m) {
  m.impl("max_pool2d", &dlcv_fast::max_pool2d);
  m.impl("max_pool2d_backward", &dlcv_fast::max_pool2d_backward);
}

#ifdef DLCV_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(dlcv_fast, CUDA, m) {
  m.impl("max_pool2d", &dlcv_fast::max_pool2d);
  m.impl("max_pool2d_backward", &dlcv_fast::max_pool2d_backward);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dlcv_fast's CPU and CUDA kernels (the ops are also under torch.ops.dlcv_fast)";
  m.def("cuda_built", &dlcv_fast::cuda_built, "whether this build holds the CUDA kernels");
  m.def("max_pool2d", &dlcv_fast::max_pool2d, "max_pool2d forward: (output, indices)",
        py::arg("input"), py::arg("kernel_size"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("ceil_mode"));
  m.def("max_pool2d_backward", &dlcv_fast::max_pool2d_backward, "max_pool2d backward: grad_input",
        py::arg("grad_output"), py::arg("input"), py::arg("indices"), py::arg("kernel_size"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("ceil_mode"));
}
