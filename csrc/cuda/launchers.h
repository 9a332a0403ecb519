// Host-callable CUDA launchers, declared in plain C++ so that the host entry points
// (compiled with torch headers) and the kernels (compiled without) meet here.
#pragma once

#include <cuda_runtime_api.h>

#include "../conv2d_shape.h"
#include "../batch_norm_shape.h"
#include "../attention_params.h"
#include "../noise_shape.h"
#include "../pool2d_shape.h"
#include "../step_params.h"

namespace dlcv_fast::cuda {

// Each launcher enqueues its kernel on `stream` and returns the launch status.
// Tensors are dense in NCHW (channels_last = false) or NHWC (channels_last = true) order.

// output[n,c,oh,ow] = max over the window; indices = h * in_w + w of the max (int64).
cudaError_t max_pool2d_forward(DType dtype, bool channels_last, const void* input,
                               void* output, int64_t* indices, const Pool2dShape& shape,
                               cudaStream_t stream);

// grad_input[n,c,h,w] = sum of grad_output over the windows whose max was (h, w).
cudaError_t max_pool2d_backward(DType dtype, bool channels_last, const void* grad_output,
                                const int64_t* indices, void* grad_input,
                                const Pool2dShape& shape, cudaStream_t stream);

// out = cx * x + ce * e per noise_shape.h. Tensors are dense with the batch outermost;
// `table` (alphas_cumprod) is float64 if table_double, else float32.
cudaError_t noise_combine(DType dtype, bool table_double, NoiseKind kind, const void* x,
                          const void* e, const int64_t* timesteps, const void* table, void* out,
                          const NoiseShape& shape, cudaStream_t stream);

// grad_x = cx * grad, grad_e = ce * grad.
cudaError_t noise_combine_backward(DType dtype, bool table_double, NoiseKind kind,
                                   const void* grad, const int64_t* timesteps, const void* table,
                                   void* grad_x, void* grad_e, const NoiseShape& shape,
                                   cudaStream_t stream);

// One sampler step (step_params.h): prev and x0 from model_output and sample, with noise,
// predicted variance and per-sample thresholds where the parameters ask for them (else
// null). Tensors dense with the batch outermost.
cudaError_t scheduler_step(DType dtype, const void* model_output, const void* sample,
                           const void* noise, const void* variance, const double* thresholds,
                           void* prev, void* x0, const StepParams& params, cudaStream_t stream);

// --- conv2d (conv2d_shape.h; tensors of any strides, given per tensor) -------------------
// Accumulation in float32 (float64 for float64). For float32, tf32 = true allows TF32
// tensor cores (as torch.backends.cudnn.allow_tf32 does for PyTorch's convolution).

// y = conv(x, w) + bias (bias: O contiguous elements, or null), then max(y, 0) if relu.
cudaError_t conv2d_forward(DType dtype, const void* x, Strides4 xs, const void* w, Strides4 ws,
                           const void* bias, void* y, Strides4 ys, const Conv2dShape& shape,
                           bool relu, bool tf32, cudaStream_t stream);

// grad_x (dgrad): every element of grad_x is written.
cudaError_t conv2d_backward_input(DType dtype, const void* gy, Strides4 gys, const void* w,
                                  Strides4 ws, void* gx, Strides4 gxs, const Conv2dShape& shape,
                                  bool tf32, cudaStream_t stream);

// Why the GEMM kernels above cannot run this geometry (a grid or index limit), or null.
const char* conv2d_unsupported(const Conv2dShape& shape);

// float32 elements of scratch memory conv2d_backward_weight needs (split-K partial sums).
int64_t conv2d_backward_weight_workspace(const Conv2dShape& shape);

// grad_w (wgrad), summed over the batch and the output positions; `workspace` holds
// conv2d_backward_weight_workspace(shape) floats. Deterministic.
cudaError_t conv2d_backward_weight(DType dtype, const void* gy, Strides4 gys, const void* x,
                                   Strides4 xs, void* gw, Strides4 gws, float* workspace,
                                   const Conv2dShape& shape, bool tf32, cudaStream_t stream);

// The gradient that reaches the convolution from bias and ReLU: g = gy * (y > 0) if y is
// given (relu), else gy. Writes g to g_out if not null (same strides as gy: gys) and
// grad_bias[o] = sum over n, oh, ow of g (O contiguous elements) if not null, through
// `workspace` (conv2d_bias_relu_backward_workspace bytes, where grad_bias is wanted).
// Deterministic.
cudaError_t conv2d_bias_relu_backward(DType dtype, const void* gy, Strides4 gys, const void* y,
                                      Strides4 ys, void* g_out, void* grad_bias, void* workspace,
                                      const Conv2dShape& shape, cudaStream_t stream);
int64_t conv2d_bias_relu_backward_workspace(DType dtype, Strides4 gys, const Conv2dShape& shape);
// Why conv2d_bias_relu_backward cannot run this output shape (n, o, oh, ow), or null.
const char* conv2d_bias_relu_unsupported(const Conv2dShape& shape);

// Depthwise convolution (groups == C, one input channel per group, O = multiplier * C) by
// direct kernels (conv2d_depthwise.cu): the GEMM above would use one column of its tiles.
// Same contracts as the launchers above; every element of y / gx / gw is written.
cudaError_t conv2d_depthwise_forward(DType dtype, const void* x, Strides4 xs, const void* w,
                                     Strides4 ws, const void* bias, void* y, Strides4 ys,
                                     const Conv2dShape& shape, bool relu, cudaStream_t stream);
cudaError_t conv2d_depthwise_backward_input(DType dtype, const void* gy, Strides4 gys,
                                            const void* w, Strides4 ws, void* gx, Strides4 gxs,
                                            const Conv2dShape& shape, cudaStream_t stream);
// grad_w, through `workspace`: conv2d_depthwise_backward_weight_workspace bytes (the
// positions are split over blocks when channels x taps alone give too few).
cudaError_t conv2d_depthwise_backward_weight(DType dtype, const void* gy, Strides4 gys,
                                             const void* x, Strides4 xs, void* gw, Strides4 gws,
                                             void* workspace, const Conv2dShape& shape,
                                             cudaStream_t stream);
int64_t conv2d_depthwise_backward_weight_workspace(DType dtype, Strides4 xs,
                                                  const Conv2dShape& shape);
// Why the depthwise kernels cannot run this geometry (an index or grid limit), or null.
const char* conv2d_depthwise_unsupported(const Conv2dShape& shape);
// Batch normalisation (batch_norm_shape.h). Per-channel arrays in the accumulation type
// (float; double for float64 inputs). The reductions write per-split partial results to
// `workspace`, which holds batch_norm_workspace_bytes(dtype, shape) bytes.
size_t batch_norm_workspace_bytes(DType dtype, const BatchNormShape& shape);

// Training forward: batch statistics (save_mean, save_invstd = 1 / sqrt(var + eps)), the
// running statistics (nullable) updated with momentum and the unbiased variance, then y.
cudaError_t batch_norm_forward_train(DType dtype, const void* x, const BatchNormParams& p,
                                     void* running_mean, void* running_var, void* save_mean,
                                     void* save_invstd, void* y, const BatchNormShape& shape,
                                     double momentum, double eps, void* workspace,
                                     cudaStream_t stream);

// Per-channel mean and biased variance.
cudaError_t batch_norm_stats(DType dtype, const void* x, void* mean, void* var,
                             const BatchNormShape& shape, void* workspace, cudaStream_t stream);

// y from given statistics.
cudaError_t batch_norm_elemt(DType dtype, const void* x, const BatchNormParams& p,
                             const void* mean, const void* invstd, void* y,
                             const BatchNormShape& shape, cudaStream_t stream);

// sum_dy and sum_dy_xmu.
cudaError_t batch_norm_backward_reduce(DType dtype, const void* dy, const void* x,
                                       const BatchNormParams& p, const void* mean,
                                       const void* invstd, void* sum_dy, void* sum_dy_xmu,
                                       const BatchNormShape& shape, void* workspace,
                                       cudaStream_t stream);

// dx from the sums over `count` values per channel; sum_dy null: evaluation mode.
cudaError_t batch_norm_backward_elemt(DType dtype, const void* dy, const void* x,
                                      const BatchNormParams& p, const void* mean,
                                      const void* invstd, const void* sum_dy,
                                      const void* sum_dy_xmu, int64_t count, void* dx,
                                      const BatchNormShape& shape, cudaStream_t stream);

// Training backward: the sums, then dx unless it is null.
cudaError_t batch_norm_backward_train(DType dtype, const void* dy, const void* x,
                                      const BatchNormParams& p, const void* mean,
                                      const void* invstd, void* sum_dy, void* sum_dy_xmu,
                                      void* dx, const BatchNormShape& shape, void* workspace,
                                      cudaStream_t stream);
// Fused attention (attention_params.h): out (dense, p.o_stride) and lse (B, heads, L; float
// for 16-bit and float32 inputs, double for float64).
cudaError_t attention_forward(DType dtype, const AttentionParams& p, const void* q,
                              const void* k, const void* v, const void* mask, void* out,
                              void* lse, cudaStream_t stream);

// dq, dk, dv dense in the shapes of q, k, v; delta a (B, heads, L) workspace of lse's type.
cudaError_t attention_backward(DType dtype, const AttentionParams& p, const void* dout,
                               const void* q, const void* k, const void* v, const void* out,
                               const void* lse, const void* mask, void* delta, void* dq,
                               void* dk, void* dv, cudaStream_t stream);

}  // namespace dlcv_fast::cuda
