// One DDPM or DDIM sampler step (step_params.h) on the CPU: one parallel pass.

#include "common.h"
#include "kernels.h"

namespace dlcv_fast::cpu {
namespace {

// Runs of one sample at a time (its threshold set once per run), each a branch-free loop
// for one combination of modes, which the compiler vectorises.
template <typename T, StepVariance V, bool Noise>
void step(const T* __restrict__ m, const T* __restrict__ s, const T* __restrict__ z,
          const T* __restrict__ v, const double* th, T* __restrict__ prev, T* __restrict__ x0,
          const StepParams& p) {
  const StepCoef<T> base(p);
  const bool threshold = p.clip == StepClip::Threshold;
  const int64_t inner = p.inner;
  at::parallel_for(0, p.numel(), 32768, [=](int64_t begin, int64_t end) {
    StepCoef<T> k = base;
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / inner;
      const int64_t stop = std::min(end, (b + 1) * inner);
      if (threshold) k.set_threshold(T(th[b]));
      // Restrict-qualified locals: the outputs alias no input, so the loop vectorises.
      const T* __restrict__ sr = s;
      const T* __restrict__ mr = m;
      const T* __restrict__ zr = z;
      const T* __restrict__ vr = v;
      T* __restrict__ pr = prev;
      T* __restrict__ xr = x0;
      for (; i < stop; ++i) {
        step_element<V, Noise>(k, sr[i], mr[i], Noise ? zr[i] : T(0),
                               V != StepVariance::Scalar ? vr[i] : T(0), pr[i], xr[i]);
      }
    }
  });
}

template <typename T>
void step_typed(const void* m, const void* s, const void* z, const void* v, const double* th,
                void* prev, void* x0, const StepParams& p) {
  with_step_modes(p, [&](auto mode, auto noise) {
    step<T, decltype(mode)::value, decltype(noise)::value>(
        static_cast<const T*>(m), static_cast<const T*>(s), static_cast<const T*>(z),
        static_cast<const T*>(v), th, static_cast<T*>(prev), static_cast<T*>(x0), p);
  });
}

}  // namespace

void scheduler_step(DType dtype, const void* m, const void* s, const void* z, const void* v,
                    const double* th, void* prev, void* x0, const StepParams& p) {
  TORCH_CHECK(dtype == DType::Float32 || dtype == DType::Float64,
              "scheduler_step (cpu kernel): float32 or float64 expected");
  dtype == DType::Float32 ? step_typed<float>(m, s, z, v, th, prev, x0, p)
                          : step_typed<double>(m, s, z, v, th, prev, x0, p);
}

}  // namespace dlcv_fast::cpu
