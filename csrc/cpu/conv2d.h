// conv2d on the CPU: im2col + GEMM through ATen (BLAS), in NCHW or NHWC order. Unlike the
// other CPU kernels these take tensors: the GEMMs are ATen's. float32 and float64; 16-bit
// tensors are computed in float32.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "../conv2d_shape.h"

namespace dlcv_fast::cpu {

// y = conv(x, w) + bias, then max(y, 0) if relu. y is allocated, in x's memory format.
void conv2d_forward(const at::Tensor& x, const at::Tensor& w,
                    const std::optional<at::Tensor>& bias, at::Tensor& y,
                    const Conv2dShape& shape, bool relu);

// gx (allocated, any layout) = the gradient of the input.
void conv2d_backward_input(const at::Tensor& gy, const at::Tensor& w, at::Tensor& gx,
                           const Conv2dShape& shape);

// gw (allocated, any layout) = the gradient of the weight, summed over the batch.
void conv2d_backward_weight(const at::Tensor& gy, const at::Tensor& x, at::Tensor& gw,
                            const Conv2dShape& shape);

// g = gy * (y > 0) into g when y is defined; grad_bias[o] = sum of g (or gy) over n, i, j
// when grad_bias is defined.
void conv2d_bias_relu_backward(const at::Tensor& gy, const at::Tensor& y, const at::Tensor& g,
                               const at::Tensor& grad_bias, const Conv2dShape& shape);

}  // namespace dlcv_fast::cpu
