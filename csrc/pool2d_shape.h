// Shapes and parameters of a 2-D pooling window, shared by the host entry points and the
// CPU and CUDA kernels. Plain C++: no torch header, so .cu files can include it.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace dlcv_fast {

struct Pool2dShape {
  int64_t batch, channels;
  int64_t in_h, in_w;
  int64_t out_h, out_w;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dilation_h, dilation_w;

  int64_t input_numel() const { return batch * channels * in_h * in_w; }
  int64_t output_numel() const { return batch * channels * out_h * out_w; }
};

// floor(a / b) for b > 0 and any sign of a.
inline int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// torch.nn.functional.max_pool2d's output size along one dimension:
//   floor((in + 2p - d(k-1) - 1) / s) + 1, rounded up instead with ceil_mode, where a
//   window that would start past the input and its left padding is dropped.
inline int64_t pool_output_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad,
                                int64_t dilation, bool ceil_mode) {
  const int64_t span = in + 2 * pad - dilation * (kernel - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  int64_t out = floor_div(span, stride) + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

}  // namespace dlcv_fast
