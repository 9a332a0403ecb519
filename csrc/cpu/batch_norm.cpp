// batch_norm on the CPU: the kernels of every instruction set (batch_norm_impl.h), chosen at
// run time (isa.h).

#include "common.h"
#include "isa.h"
#include "kernels.h"

#define DLCV_CPU_ISA base
#define DLCV_CPU_VECTOR_BYTES 16
#include "batch_norm_impl.h"
#undef DLCV_CPU_ISA
#undef DLCV_CPU_VECTOR_BYTES

namespace dlcv_fast::cpu {

void batch_norm_forward_train(DType dtype, const void* x, const BatchNormParams& p,
                              void* running_mean, void* running_var, void* save_mean,
                              void* save_invstd, void* y, const BatchNormShape& s,
                              double momentum, double eps) {
  DLCV_CPU_DISPATCH(batch_norm_forward_train, dtype, x, p, running_mean, running_var, save_mean,
                    save_invstd, y, s, momentum, eps);
}

void batch_norm_stats(DType dtype, const void* x, void* mean, void* var, const BatchNormShape& s) {
  DLCV_CPU_DISPATCH(batch_norm_stats, dtype, x, mean, var, s);
}

void batch_norm_elemt(DType dtype, const void* x, const BatchNormParams& p, const void* mean,
                      const void* invstd, void* y, const BatchNormShape& s) {
  DLCV_CPU_DISPATCH(batch_norm_elemt, dtype, x, p, mean, invstd, y, s);
}

void batch_norm_backward_reduce(DType dtype, const void* dy, const void* x,
                                const BatchNormParams& p, const void* mean, const void* invstd,
                                void* sum_dy, void* sum_dy_xmu, const BatchNormShape& s) {
  DLCV_CPU_DISPATCH(batch_norm_backward_reduce, dtype, dy, x, p, mean, invstd, sum_dy, sum_dy_xmu,
                    s);
}

void batch_norm_backward_elemt(DType dtype, const void* dy, const void* x,
                               const BatchNormParams& p, const void* mean, const void* invstd,
                               const void* sum_dy, const void* sum_dy_xmu, int64_t count,
                               void* dx, const BatchNormShape& s) {
  DLCV_CPU_DISPATCH(batch_norm_backward_elemt, dtype, dy, x, p, mean, invstd, sum_dy, sum_dy_xmu,
                    count, dx, s);
}

void batch_norm_backward_train(DType dtype, const void* dy, const void* x,
                               const BatchNormParams& p, const void* mean, const void* invstd,
                               void* sum_dy, void* sum_dy_xmu, void* dx, const BatchNormShape& s) {
  DLCV_CPU_DISPATCH(batch_norm_backward_train, dtype, dy, x, p, mean, invstd, sum_dy, sum_dy_xmu,
                    dx, s);
}

}  // namespace dlcv_fast::cpu
