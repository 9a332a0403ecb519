// Host-callable CUDA launchers, declared in plain C++ so that the host entry points
// (compiled with torch headers) and the kernels (compiled without) meet here.
#pragma once

#include <cuda_runtime_api.h>

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
