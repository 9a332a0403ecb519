// Host entry points of every op: what torch.library and the pybind11 module both expose.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace dlcv_fast {

// Returns (output, indices). indices[n, c, oh, ow] = h * W + w of the window's max.
std::tuple<at::Tensor, at::Tensor> max_pool2d(const at::Tensor& self, at::IntArrayRef kernel_size,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, bool ceil_mode);

at::Tensor max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& self,
                               const at::Tensor& indices, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool ceil_mode);

// Whether this build holds the CUDA kernels.
bool cuda_built();

}  // namespace dlcv_fast
