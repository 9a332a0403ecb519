// CPU kernels, on raw pointers like their CUDA counterparts. Float32 and Float64 only (and
// max_pool2d's forward Int32 and Int64): the host entry points run 16-bit floats through
// Float32 and smaller integers through Int32.
#pragma once

#include <cstdint>

#include "../batch_norm_shape.h"
#include "../attention_params.h"
#include "../noise_shape.h"
#include "../pool2d_shape.h"
#include "../step_params.h"

namespace dlcv_fast::cpu {

void max_pool2d_forward(DType dtype, bool channels_last, const void* input, void* output,
                        int64_t* indices, const Pool2dShape& shape);

// The forward kernels of each instruction set (max_pool2d_impl.h), which the one above
// dispatches to (isa.h).
namespace base {
void max_pool2d_forward(DType, bool, const void*, void*, int64_t*, const Pool2dShape&);
}
namespace avx2 {
void max_pool2d_forward(DType, bool, const void*, void*, int64_t*, const Pool2dShape&);
}
namespace avx512 {
void max_pool2d_forward(DType, bool, const void*, void*, int64_t*, const Pool2dShape&);
}

// Throws if an index lies outside its input plane.
void max_pool2d_backward(DType dtype, bool channels_last, const void* grad_output,
                         const int64_t* indices, void* grad_input, const Pool2dShape& shape);

// The noise-scheduling combination (noise_shape.h), as its CUDA counterpart.
void noise_combine(DType dtype, bool table_double, NoiseKind kind, const void* x, const void* e,
                   const int64_t* timesteps, const void* table, void* out, const NoiseShape& shape);

void noise_combine_backward(DType dtype, bool table_double, NoiseKind kind, const void* grad,
                            const int64_t* timesteps, const void* table, void* grad_x,
                            void* grad_e, const NoiseShape& shape);

// One sampler step (step_params.h), as its CUDA counterpart.
void scheduler_step(DType dtype, const void* model_output, const void* sample, const void* noise,
                    const void* variance, const double* thresholds, void* prev, void* x0,
                    const StepParams& params);

// The diffusion kernels above per instruction set (diffusion_impl.h).
#define DLCV_DIFFUSION_DECLS                                                                  \
  void noise_combine(DType, bool, NoiseKind, const void*, const void*, const int64_t*,        \
                     const void*, void*, const NoiseShape&);                                  \
  void noise_combine_backward(DType, bool, NoiseKind, const void*, const int64_t*,           \
                              const void*, void*, void*, const NoiseShape&);                  \
  void scheduler_step(DType, const void*, const void*, const void*, const void*,             \
                      const double*, void*, void*, const StepParams&);
namespace base { DLCV_DIFFUSION_DECLS }
namespace avx2 { DLCV_DIFFUSION_DECLS }
namespace avx512 { DLCV_DIFFUSION_DECLS }

// Batch normalisation (batch_norm_shape.h), as its CUDA counterparts; per-channel arrays in
// the input's type. Training forward: batch statistics (save_mean, save_invstd =
// 1 / sqrt(var + eps)), running statistics (nullable) updated with momentum and the unbiased
// variance, then y.
#define DLCV_BATCH_NORM_CPU_KERNELS                                                           \
  void batch_norm_forward_train(DType dtype, const void* x, const BatchNormParams& p,         \
                                void* running_mean, void* running_var, void* save_mean,       \
                                void* save_invstd, void* y, const BatchNormShape& s,          \
                                double momentum, double eps);                                 \
  /* Per-channel mean and biased variance. */                                                 \
  void batch_norm_stats(DType dtype, const void* x, void* mean, void* var,                    \
                        const BatchNormShape& s);                                             \
  /* y from given statistics. */                                                              \
  void batch_norm_elemt(DType dtype, const void* x, const BatchNormParams& p, const void* mean, \
                        const void* invstd, void* y, const BatchNormShape& s);                \
  /* sum_dy, sum_dy_xmu. */                                                                   \
  void batch_norm_backward_reduce(DType dtype, const void* dy, const void* x,                 \
                                  const BatchNormParams& p, const void* mean,                 \
                                  const void* invstd, void* sum_dy, void* sum_dy_xmu,         \
                                  const BatchNormShape& s);                                   \
  /* dx from the sums over `count` values per channel; sum_dy null: evaluation mode. */       \
  void batch_norm_backward_elemt(DType dtype, const void* dy, const void* x,                  \
                                 const BatchNormParams& p, const void* mean,                  \
                                 const void* invstd, const void* sum_dy,                      \
                                 const void* sum_dy_xmu, int64_t count, void* dx,             \
                                 const BatchNormShape& s);                                    \
  /* Training backward: the sums, then dx unless it is null. */                               \
  void batch_norm_backward_train(DType dtype, const void* dy, const void* x,                  \
                                 const BatchNormParams& p, const void* mean,                  \
                                 const void* invstd, void* sum_dy, void* sum_dy_xmu, void* dx, \
                                 const BatchNormShape& s);

DLCV_BATCH_NORM_CPU_KERNELS
namespace base { DLCV_BATCH_NORM_CPU_KERNELS }
namespace avx2 { DLCV_BATCH_NORM_CPU_KERNELS }
namespace avx512 { DLCV_BATCH_NORM_CPU_KERNELS }
// Fused attention (attention_params.h): out and lse (B, heads, L), dense. mask is null for
// MaskKind::None.
void attention_forward(DType dtype, const AttentionParams& p, const void* q, const void* k,
                       const void* v, const void* mask, void* out, void* lse);

// dq, dk, dv dense in the shapes of q, k, v; delta is a (B, heads, L) workspace.
void attention_backward(DType dtype, const AttentionParams& p, const void* dout, const void* q,
                        const void* k, const void* v, const void* out, const void* lse,
                        const void* mask, void* delta, void* dq, void* dk, void* dv);

// The same per instruction set (attention_impl.h).
#define DLCV_ATTENTION_DECLS                                                                  \
  void attention_forward(DType, const AttentionParams&, const void*, const void*, const void*, \
                         const void*, void*, void*);                                           \
  void attention_backward(DType, const AttentionParams&, const void*, const void*, const void*, \
                          const void*, const void*, const void*, const void*, void*, void*,     \
                          void*, void*);
namespace base { DLCV_ATTENTION_DECLS }
namespace avx2 { DLCV_ATTENTION_DECLS }
namespace avx512 { DLCV_ATTENTION_DECLS }
#undef DLCV_ATTENTION_DECLS

}  // namespace dlcv_fast::cpu
