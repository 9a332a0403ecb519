// The fused noise-scheduling combination (noise_shape.h) on CUDA: one pass over x and e,
// the per-sample coefficients gathered from alphas_cumprod inside the kernel, arithmetic in
// float32 (float64 for float64 samples) and one rounding at the end. The coefficients are
// computed in the table's precision when that is float64: near t = 0, 1 - a is tiny and
// rounding a to float32 first would cost it most of its digits.
//
// Each thread moves V elements as one 16-byte vector when the sample size and the pointers
// allow (then a vector never straddles two samples), else single elements.

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"

namespace dlcv_fast::cuda {
namespace {

// (cx, ce) of out = cx * x + ce * e at alpha_bar a, computed in Tab (or A, if wider).
template <typename A, typename Tab>
__device__ __forceinline__ void coefficients(NoiseKind kind, Tab a_entry, A& cx, A& ce) {
  using C = std::conditional_t<(sizeof(Tab) > sizeof(A)), Tab, A>;
  const C a = a_entry;
  const C signal = sqrt(a), noise = sqrt(C(1) - a);
  cx = static_cast<A>(kind == NoiseKind::AddNoise ? signal : -noise);
  ce = static_cast<A>(kind == NoiseKind::AddNoise ? noise : signal);
}

template <typename T, typename Tab, int V, typename I>
__global__ void __launch_bounds__(kThreads)
    combine(NoiseKind kind, const T* __restrict__ x, const T* __restrict__ e,
            const int64_t* __restrict__ timesteps, const Tab* __restrict__ table,
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

template <typename T, typename Tab, int V, typename I>
__global__ void __launch_bounds__(kThreads)
    combine_backward(NoiseKind kind, const T* __restrict__ grad,
                     const int64_t* __restrict__ timesteps, const Tab* __restrict__ table,
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

template <typename T, typename Tab>
cudaError_t combine_typed(NoiseKind kind, const void* x, const void* e, const int64_t* t,
                          const void* table, void* out, const NoiseShape& s, cudaStream_t stream) {
  const int v = vector_width<T>(s.inner, {x, e, out});
  with_index_type(s.numel(), [&](auto index_tag) {
    using I = decltype(index_tag);
    with_vector_width<T>(v, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t vectors = s.numel() / V;
      launch_kernel(combine<T, Tab, V, I>, blocks_for(vectors), kThreads, 0, stream, kind,
                    static_cast<const T*>(x), static_cast<const T*>(e), t,
                    static_cast<const Tab*>(table), static_cast<T*>(out), static_cast<I>(s.inner),
                    static_cast<I>(vectors));
    });
  });
  return cudaGetLastError();
}

template <typename T, typename Tab>
cudaError_t combine_backward_typed(NoiseKind kind, const void* grad, const int64_t* t,
                                   const void* table, void* grad_x, void* grad_e,
                                   const NoiseShape& s, cudaStream_t stream) {
  const int v = vector_width<T>(s.inner, {grad, grad_x, grad_e});
  with_index_type(s.numel(), [&](auto index_tag) {
    using I = decltype(index_tag);
    with_vector_width<T>(v, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t vectors = s.numel() / V;
      launch_kernel(combine_backward<T, Tab, V, I>, blocks_for(vectors), kThreads, 0, stream, kind,
                    static_cast<const T*>(grad), t, static_cast<const Tab*>(table),
                    static_cast<T*>(grad_x), static_cast<T*>(grad_e), static_cast<I>(s.inner),
                    static_cast<I>(vectors));
    });
  });
  return cudaGetLastError();
}

// Instantiates f<T, Tab> for the sample dtype and a float32 or float64 table.
template <template <typename, typename> class F, typename... Args>
cudaError_t dispatch(DType dtype, bool table_double, Args... args) {
  const auto with_table = [&](auto tag) {
    using T = decltype(tag);
    return table_double ? F<T, double>::run(args...) : F<T, float>::run(args...);
  };
  switch (dtype) {
    case DType::Float32: return with_table(float{});
    case DType::Float64: return with_table(double{});
    case DType::Float16: return with_table(__half{});
    case DType::BFloat16: return with_table(__nv_bfloat16{});
    default: break;
  }
  return cudaErrorInvalidValue;
}

template <typename T, typename Tab>
struct Combine {
  template <typename... Args>
  static cudaError_t run(Args... args) { return combine_typed<T, Tab>(args...); }
};

template <typename T, typename Tab>
struct CombineBackward {
  template <typename... Args>
  static cudaError_t run(Args... args) { return combine_backward_typed<T, Tab>(args...); }
};

}  // namespace

cudaError_t noise_combine(DType dtype, bool table_double, NoiseKind kind, const void* x,
                          const void* e, const int64_t* t, const void* table, void* out,
                          const NoiseShape& s, cudaStream_t stream) {
  return dispatch<Combine>(dtype, table_double, kind, x, e, t, table, out, s, stream);
}

cudaError_t noise_combine_backward(DType dtype, bool table_double, NoiseKind kind,
                                   const void* grad, const int64_t* t, const void* table,
                                   void* grad_x, void* grad_e, const NoiseShape& s,
                                   cudaStream_t stream) {
  return dispatch<CombineBackward>(dtype, table_double, kind, grad, t, table, grad_x, grad_e, s,
                                   stream);
}

}  // namespace dlcv_fast::cuda
