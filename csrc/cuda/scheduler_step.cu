// One DDPM or DDIM sampler step (step_params.h) on CUDA: one thread per element, reading
// model_output, sample and, when needed, noise and predicted variance once, writing the
// previous sample and the predicted clean sample.

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace dlcv_fast::cuda {
namespace {

template <typename T, StepVariance V, bool Noise, typename I>
__global__ void __launch_bounds__(kThreads)
    step(const T* __restrict__ model_output, const T* __restrict__ sample,
         const T* __restrict__ noise, const T* __restrict__ variance,
         const double* __restrict__ thresholds, T* __restrict__ prev, T* __restrict__ x0,
         const StepParams p, const I total) {
  using A = acc_t<T>;
  StepCoef<A> k(p);
  const bool threshold = p.clip == StepClip::Threshold;
  for (I i = first_item<I>(); i < total; i += grid_step<I>()) {
    if (threshold) k.set_threshold(A(thresholds[i / p.inner]));
    const A z = Noise ? to_acc(noise[i]) : A(0);
    const A v = V != StepVariance::Scalar ? to_acc(variance[i]) : A(0);
    A out, clean;
    step_element<V, Noise>(k, to_acc(sample[i]), to_acc(model_output[i]), z, v, out, clean);
    prev[i] = from_acc<T>(out);
    x0[i] = from_acc<T>(clean);
  }
}

template <typename T>
cudaError_t step_typed(const void* m, const void* s, const void* z, const void* v,
                       const double* th, void* prev, void* x0, const StepParams& p,
                       cudaStream_t stream) {
  with_index_type(p.numel(), [&](auto index_tag) {
    using I = decltype(index_tag);
    with_step_modes(p, [&](auto mode, auto has_noise) {
      launch_kernel(step<T, decltype(mode)::value, decltype(has_noise)::value, I>,
                    blocks_for(p.numel()), kThreads, 0, stream, static_cast<const T*>(m),
                    static_cast<const T*>(s), static_cast<const T*>(z), static_cast<const T*>(v),
                    th, static_cast<T*>(prev), static_cast<T*>(x0), p, static_cast<I>(p.numel()));
    });
  });
  return cudaGetLastError();
}

}  // namespace

cudaError_t scheduler_step(DType dtype, const void* m, const void* s, const void* z,
                           const void* v, const double* th, void* prev, void* x0,
                           const StepParams& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return step_typed<float>(m, s, z, v, th, prev, x0, p, stream);
    case DType::Float64: return step_typed<double>(m, s, z, v, th, prev, x0, p, stream);
    case DType::Float16: return step_typed<__half>(m, s, z, v, th, prev, x0, p, stream);
    case DType::BFloat16: return step_typed<__nv_bfloat16>(m, s, z, v, th, prev, x0, p, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace dlcv_fast::cuda
