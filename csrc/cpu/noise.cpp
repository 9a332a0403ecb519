// The fused noise-scheduling combination (noise_shape.h) on the CPU: one pass, the
// coefficients of each sample computed once, the inner loop a plain a*x + b*y that the
// compiler vectorises.

#include "common.h"
#include "kernels.h"
#include "../noise_shape.h"

namespace dlcv_fast::cpu {
namespace {

// (cx, ce) of out = cx * x + ce * e for the sample at timestep t, computed in the wider of
// the table's type and T (a float64 table keeps 1 - a accurate near t = 0).
template <typename T, typename Tab>
void coefficients(NoiseKind kind, const Tab* table, int64_t t, T& cx, T& ce) {
  using C = std::conditional_t<(sizeof(Tab) > sizeof(T)), Tab, T>;
  const C a = table[t];
  const C signal = std::sqrt(a), noise = std::sqrt(C(1) - a);
  cx = static_cast<T>(kind == NoiseKind::AddNoise ? signal : -noise);
  ce = static_cast<T>(kind == NoiseKind::AddNoise ? noise : signal);
}

// Calls f(first, last, cx, ce) for each run of elements of one sample within [begin, end).
template <typename T, typename Tab, typename F>
void for_each_sample_run(NoiseKind kind, const int64_t* timesteps, const Tab* table,
                         const NoiseShape& s, F&& f) {
  at::parallel_for(0, s.numel(), 32768, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / s.inner;
      const int64_t stop = std::min(end, (b + 1) * s.inner);
      T cx, ce;
      coefficients<T>(kind, table, timesteps[b], cx, ce);
      f(i, stop, cx, ce);
      i = stop;
    }
  });
}

template <typename T, typename Tab>
void combine(NoiseKind kind, const T* x, const T* e, const int64_t* t, const Tab* table, T* out,
             const NoiseShape& s) {
  for_each_sample_run<T>(kind, t, table, s, [&](int64_t first, int64_t last, T cx, T ce) {
    for (int64_t i = first; i < last; ++i) out[i] = cx * x[i] + ce * e[i];
  });
}

template <typename T, typename Tab>
void combine_backward(NoiseKind kind, const T* g, const int64_t* t, const Tab* table, T* gx, T* ge,
                      const NoiseShape& s) {
  for_each_sample_run<T>(kind, t, table, s, [&](int64_t first, int64_t last, T cx, T ce) {
    for (int64_t i = first; i < last; ++i) {
      gx[i] = cx * g[i];
      ge[i] = ce * g[i];
    }
  });
}

// Calls f(T{}, Tab{}) for float32/float64 samples and a float32/float64 table.
template <typename F>
void dispatch(const char* op, DType dtype, bool table_double, F&& f) {
  TORCH_CHECK(dtype == DType::Float32 || dtype == DType::Float64, op,
              " (cpu kernel): float32 or float64 expected");
  const auto with_table = [&](auto tag) {
    table_double ? f(tag, double{}) : f(tag, float{});
  };
  dtype == DType::Float32 ? with_table(float{}) : with_table(double{});
}

}  // namespace

void noise_combine(DType dtype, bool table_double, NoiseKind kind, const void* x, const void* e,
                   const int64_t* timesteps, const void* table, void* out, const NoiseShape& s) {
  dispatch("noise_combine", dtype, table_double, [&](auto t_tag, auto tab_tag) {
    using T = decltype(t_tag);
    using Tab = decltype(tab_tag);
    combine(kind, static_cast<const T*>(x), static_cast<const T*>(e), timesteps,
            static_cast<const Tab*>(table), static_cast<T*>(out), s);
  });
}

void noise_combine_backward(DType dtype, bool table_double, NoiseKind kind, const void* grad,
                            const int64_t* timesteps, const void* table, void* grad_x,
                            void* grad_e, const NoiseShape& s) {
  dispatch("noise_combine_backward", dtype, table_double, [&](auto t_tag, auto tab_tag) {
    using T = decltype(t_tag);
    using Tab = decltype(tab_tag);
    combine_backward(kind, static_cast<const T*>(grad), timesteps, static_cast<const Tab*>(table),
                     static_cast<T*>(grad_x), static_cast<T*>(grad_e), s);
  });
}

}  // namespace dlcv_fast::cpu
