// The fused noise-scheduling combination (noise_shape.h) on the CPU: one pass, the
// coefficients of each sample computed once, the inner loop a plain a*x + b*y that the
// compiler vectorises.

#include "common.h"
#include "kernels.h"
#include "../noise_shape.h"

namespace dlcv_fast::cpu {
namespace {

// (cx, ce) of out = cx * x + ce * e for the sample at timestep t.
template <typename T>
void coefficients(NoiseKind kind, const T* table, int64_t t, T& cx, T& ce) {
  const T signal = std::sqrt(table[t]), noise = std::sqrt(T(1) - table[t]);
  cx = kind == NoiseKind::AddNoise ? signal : -noise;
  ce = kind == NoiseKind::AddNoise ? noise : signal;
}

// Calls f(first, last, cx, ce) for each run of elements of one sample within [begin, end).
template <typename T, typename F>
void for_each_sample_run(NoiseKind kind, const int64_t* timesteps, const T* table,
                         const NoiseShape& s, F&& f) {
  at::parallel_for(0, s.numel(), 32768, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / s.inner;
      const int64_t stop = std::min(end, (b + 1) * s.inner);
      T cx, ce;
      coefficients(kind, table, timesteps[b], cx, ce);
      f(i, stop, cx, ce);
      i = stop;
    }
  });
}

template <typename T>
void combine(NoiseKind kind, const T* x, const T* e, const int64_t* t, const T* table, T* out,
             const NoiseShape& s) {
  for_each_sample_run(kind, t, table, s, [&](int64_t first, int64_t last, T cx, T ce) {
    for (int64_t i = first; i < last; ++i) out[i] = cx * x[i] + ce * e[i];
  });
}

template <typename T>
void combine_backward(NoiseKind kind, const T* g, const int64_t* t, const T* table, T* gx, T* ge,
                      const NoiseShape& s) {
  for_each_sample_run(kind, t, table, s, [&](int64_t first, int64_t last, T cx, T ce) {
    for (int64_t i = first; i < last; ++i) {
      gx[i] = cx * g[i];
      ge[i] = ce * g[i];
    }
  });
}

}  // namespace

void noise_combine(DType dtype, NoiseKind kind, const void* x, const void* e,
                   const int64_t* timesteps, const void* table, void* out, const NoiseShape& s) {
  TORCH_CHECK(dtype == DType::Float32 || dtype == DType::Float64,
              "noise_combine (cpu kernel): float32 or float64 expected");
  if (dtype == DType::Float32) {
    combine(kind, static_cast<const float*>(x), static_cast<const float*>(e), timesteps,
            static_cast<const float*>(table), static_cast<float*>(out), s);
  } else {
    combine(kind, static_cast<const double*>(x), static_cast<const double*>(e), timesteps,
            static_cast<const double*>(table), static_cast<double*>(out), s);
  }
}

void noise_combine_backward(DType dtype, NoiseKind kind, const void* grad,
                            const int64_t* timesteps, const void* table, void* grad_x,
                            void* grad_e, const NoiseShape& s) {
  TORCH_CHECK(dtype == DType::Float32 || dtype == DType::Float64,
              "noise_combine_backward (cpu kernel): float32 or float64 expected");
  if (dtype == DType::Float32) {
    combine_backward(kind, static_cast<const float*>(grad), timesteps,
                     static_cast<const float*>(table), static_cast<float*>(grad_x),
                     static_cast<float*>(grad_e), s);
  } else {
    combine_backward(kind, static_cast<const double*>(grad), timesteps,
                     static_cast<const double*>(table), static_cast<double*>(grad_x),
                     static_cast<double*>(grad_e), s);
  }
}

}  // namespace dlcv_fast::cpu
