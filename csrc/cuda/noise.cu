// The fused noise-scheduling combination (noise_shape.h) on CUDA: one pass over x and e,
// the per-sample coefficients gathered from alphas_cumprod inside the kernel, arithmetic in
// float32 (float64 for float64 samples) and one rounding at the end.
//
// Each thread moves V elements as one 16-byte vector when the sample size and the pointers
// allow (then a vector never straddles two samples), else single elements.

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace dlcv_fast::cuda {
namespace {

// (cx, ce) of out = cx * x + ce * e at alpha_bar a.
template <typename A>
__device__ __forceinline__ void coefficients(NoiseKind kind, A a, A& cx, A& ce) {
  const A signal = sqrt(a), noise = sqrt(A(1) - a);
  cx = kind == NoiseKind::AddNoise ? signal : -noise;
  ce = kind == NoiseKind::AddNoise ? noise : signal;
}

template <typename T, int V, typename I>
__global__ void __launch_bounds__(kThreads)
    combine(NoiseKind kind, const T* __restrict__ x, const T* __restrict__ e,
            const int64_t* __restrict__ timesteps, const acc_t<T>* __restrict__ table,
            T* __restrict__ out, const I inner, const I vectors) {
  using A = acc_t<T>;
  for (I i = first_item<I>(); i < vectors; i += grid_step<I>()) {
    A cx, ce;
    coefficients(kind, table[timesteps[i * V / inner]], cx, ce);
    const Vec<T, V> xv = reinterpret_cast<const Vec<T, V>*>(x)[i];
    const Vec<T, V> ev = reinterpret_cast<const Vec<T, V>*>(e)[i];
    Vec<T, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) o.v[j] = from_acc<T>(cx * to_acc(xv.v[j]) + ce * to_acc(ev.v[j]));
    reinterpret_cast<Vec<T, V>*>(out)[i] = o;
  }
}

template <typename T, int V, typename I>
__global__ void __launch_bounds__(kThreads)
    combine_backward(NoiseKind kind, const T* __restrict__ grad,
                     const int64_t* __restrict__ timesteps, const acc_t<T>* __restrict__ table,
                     T* __restrict__ grad_x, T* __restrict__ grad_e, const I inner,
                     const I vectors) {
  using A = acc_t<T>;
  for (I i = first_item<I>(); i < vectors; i += grid_step<I>()) {
    A cx, ce;
    coefficients(kind, table[timesteps[i * V / inner]], cx, ce);
    const Vec<T, V> g = reinterpret_cast<const Vec<T, V>*>(grad)[i];
    Vec<T, V> gx, ge;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      gx.v[j] = from_acc<T>(cx * to_acc(g.v[j]));
      ge.v[j] = from_acc<T>(ce * to_acc(g.v[j]));
    }
    reinterpret_cast<Vec<T, V>*>(grad_x)[i] = gx;
    reinterpret_cast<Vec<T, V>*>(grad_e)[i] = ge;
  }
}

template <typename T>
cudaError_t combine_typed(NoiseKind kind, const void* x, const void* e, const int64_t* t,
                          const void* table, void* out, const NoiseShape& s, cudaStream_t stream) {
  const int v = vector_width<T>(s.inner, {x, e, out});
  with_index_type(s.numel(), [&](auto index_tag) {
    using I = decltype(index_tag);
    with_vector_width<T>(v, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t vectors = s.numel() / V;
      combine<T, V, I><<<blocks_for(vectors), kThreads, 0, stream>>>(
          kind, static_cast<const T*>(x), static_cast<const T*>(e), t,
          static_cast<const acc_t<T>*>(table), static_cast<T*>(out), static_cast<I>(s.inner),
          static_cast<I>(vectors));
    });
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t combine_backward_typed(NoiseKind kind, const void* grad, const int64_t* t,
                                   const void* table, void* grad_x, void* grad_e,
                                   const NoiseShape& s, cudaStream_t stream) {
  const int v = vector_width<T>(s.inner, {grad, grad_x, grad_e});
  with_index_type(s.numel(), [&](auto index_tag) {
    using I = decltype(index_tag);
    with_vector_width<T>(v, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t vectors = s.numel() / V;
      combine_backward<T, V, I><<<blocks_for(vectors), kThreads, 0, stream>>>(
          kind, static_cast<const T*>(grad), t, static_cast<const acc_t<T>*>(table),
          static_cast<T*>(grad_x), static_cast<T*>(grad_e), static_cast<I>(s.inner),
          static_cast<I>(vectors));
    });
  });
  return cudaGetLastError();
}

}  // namespace

cudaError_t noise_combine(DType dtype, NoiseKind kind, const void* x, const void* e,
                          const int64_t* t, const void* table, void* out, const NoiseShape& s,
                          cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return combine_typed<float>(kind, x, e, t, table, out, s, stream);
    case DType::Float64: return combine_typed<double>(kind, x, e, t, table, out, s, stream);
    case DType::Float16: return combine_typed<__half>(kind, x, e, t, table, out, s, stream);
    case DType::BFloat16: return combine_typed<__nv_bfloat16>(kind, x, e, t, table, out, s, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t noise_combine_backward(DType dtype, NoiseKind kind, const void* grad, const int64_t* t,
                                   const void* table, void* grad_x, void* grad_e,
                                   const NoiseShape& s, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return combine_backward_typed<float>(kind, grad, t, table, grad_x, grad_e, s, stream);
    case DType::Float64: return combine_backward_typed<double>(kind, grad, t, table, grad_x, grad_e, s, stream);
    case DType::Float16: return combine_backward_typed<__half>(kind, grad, t, table, grad_x, grad_e, s, stream);
    case DType::BFloat16: return combine_backward_typed<__nv_bfloat16>(kind, grad, t, table, grad_x, grad_e, s, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dlcv_fast::cuda
