// Batch normalisation's view of its input, shared by the host entry points and the CPU and
// CUDA kernels. Plain C++: no torch header.
//
// An input of shape (N, C, *spatial) is seen as (batch, channels, inner), inner the product
// of the spatial sizes, dense in one of two layouts:
//   NCHW:          element (n, c, s) at (n * C + c) * inner + s   (planes of `inner`)
//   channels_last: element (n, c, s) at (n * inner + s) * C + c   (rows of C channels)
// A 2-D input (N, C), and any input with inner = 1, is channels_last.
//
// With xhat = (x - mean) * invstd, the forward pass is y = xhat * w + b (then max(y, 0) with
// relu); per-channel arrays (weight, bias, mean, invstd, running stats, sums) are in the
// accumulation type: float32, float64 for float64 inputs. Training backward, with
// g = dy masked by y > 0 under relu and M = batch * inner values per channel:
//   sum_dy = sum(g), sum_dy_xmu = sum(g * (x - mean)),
//   dx = w * invstd * (g - sum_dy / M - (x - mean) * invstd^2 * sum_dy_xmu / M),
//   grad_weight = sum_dy_xmu * invstd, grad_bias = sum_dy;
// in evaluation mode (mean, invstd from the running statistics) dx = w * invstd * g.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace dlcv_fast {

struct BatchNormShape {
  int64_t batch;
  int64_t channels;
  int64_t inner;
  bool channels_last;

  int64_t numel() const { return batch * channels * inner; }
  int64_t count() const { return batch * inner; }  // values per channel
};

// The per-channel arrays of one call: null where absent (weight: 1, bias: 0).
struct BatchNormParams {
  const void* weight;
  const void* bias;
  bool relu;
};

}  // namespace dlcv_fast
