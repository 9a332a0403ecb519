// The diffusion ops' CPU kernels, compiled once per CPU instruction set: the including file
// defines DLCV_CPU_ISA (the namespace), DLCV_CPU_VECTOR_BYTES and, for an extension of
// x86-64, DLCV_CPU_TARGET_PRAGMA. No include guard, on purpose.
//
// - noise_combine (noise_shape.h): one pass, the coefficients of each sample computed once,
//   the inner loop a plain a*x + b*y.
// - scheduler_step (step_params.h): one pass, a branch-free loop per combination of modes.
// Both loops are memory-bound with wide vectors and FMA; compiled for SSE2 alone they were
// not: the step took 6 cycles an element on one core, 0.78 ms for 64x4x64x64 in cache on
// two, as long as the memory traffic of the same step from DRAM.

#include "common.h"
#include "../noise_shape.h"
#include "../step_params.h"

#include "isa_begin.h"

namespace dlcv_fast::cpu::DLCV_CPU_ISA {
namespace {

#include "vec.h"

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

// Outputs are written with Lanes::stream (vec.h). With the compiler's full-width stores,
// add_noise of 64x4x64x64 (caches flushed, Zen 4, two cores) took 0.62-0.66 ms in the AVX-512
// build and 1.08-1.17 ms in the AVX2 build, against 0.57-0.63 ms in the 16-byte baseline.
template <typename T, typename Tab>
void combine(NoiseKind kind, const T* x, const T* e, const int64_t* t, const Tab* table, T* out,
             const NoiseShape& s) {
  for_each_sample_run<T>(kind, t, table, s, [&](int64_t first, int64_t last, T cx, T ce) {
    for_lanes<T>(first, last, [&](int64_t i, auto lanes) {
      using S = decltype(lanes);
      S::stream(out + i, S::splat(cx) * S::load(x + i) + S::splat(ce) * S::load(e + i));
    });
  });
}

template <typename T, typename Tab>
void combine_backward(NoiseKind kind, const T* g, const int64_t* t, const Tab* table, T* gx, T* ge,
                      const NoiseShape& s) {
  for_each_sample_run<T>(kind, t, table, s, [&](int64_t first, int64_t last, T cx, T ce) {
    for_lanes<T>(first, last, [&](int64_t i, auto lanes) {
      using S = decltype(lanes);
      const auto v = S::load(g + i);
      S::stream(gx + i, S::splat(cx) * v);
      S::stream(ge + i, S::splat(ce) * v);
    });
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

void scheduler_step(DType dtype, const void* m, const void* s, const void* z, const void* v,
                    const double* th, void* prev, void* x0, const StepParams& p) {
  TORCH_CHECK(dtype == DType::Float32 || dtype == DType::Float64,
              "scheduler_step (cpu kernel): float32 or float64 expected");
  dtype == DType::Float32 ? step_typed<float>(m, s, z, v, th, prev, x0, p)
                          : step_typed<double>(m, s, z, v, th, prev, x0, p);
}

}  // namespace dlcv_fast::cpu::DLCV_CPU_ISA

#include "isa_end.h"
