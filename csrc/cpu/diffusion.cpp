// The diffusion ops on the CPU (add_noise, get_velocity, their backward, the sampler step):
// the kernels of every instruction set (diffusion_impl.h), chosen at run time (isa.h).

#include "common.h"
#include "isa.h"
#include "kernels.h"

#define DLCV_CPU_ISA base
#define DLCV_CPU_VECTOR_BYTES 16
#include "diffusion_impl.h"
#undef DLCV_CPU_ISA
#undef DLCV_CPU_VECTOR_BYTES

namespace dlcv_fast::cpu {

void noise_combine(DType dtype, bool table_double, NoiseKind kind, const void* x, const void* e,
                   const int64_t* timesteps, const void* table, void* out, const NoiseShape& s) {
  DLCV_CPU_DISPATCH(noise_combine, dtype, table_double, kind, x, e, timesteps, table, out,
                    s);
}

void noise_combine_backward(DType dtype, bool table_double, NoiseKind kind, const void* grad,
                            const int64_t* timesteps, const void* table, void* grad_x,
                            void* grad_e, const NoiseShape& s) {
  DLCV_CPU_DISPATCH(noise_combine_backward, dtype, table_double, kind, grad, timesteps,
                    table, grad_x, grad_e, s);
}

void scheduler_step(DType dtype, const void* m, const void* s, const void* z, const void* v,
                    const double* th, void* prev, void* x0, const StepParams& p) {
  DLCV_CPU_DISPATCH(scheduler_step, dtype, m, s, z, v, th, prev, x0, p);
}

}  // namespace dlcv_fast::cpu
