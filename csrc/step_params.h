// One denoising step of a DDPM or DDIM sampler as one elementwise pass, shared by the host
// entry points and the CPU and CUDA kernels. Plain C++: no torch header.
//
// The scheduler turns its timestep into scalar coefficients (in float64, on the host);
// per element, with s the sample, m the model output, z the noise and v the predicted
// variance (learned variance types):
//   x0  = A s + B m                          the predicted clean sample
//   eps = C s + D m                          the predicted noise
//   x0  = clamp(x0, -r, r)                   clip_sample
//       | clamp(x0, -th_b, th_b) / th_b      dynamic thresholding (th_b: per sample)
//   eps = E s + F x0                         if recompute_eps (eps from the clipped x0)
//   sigma = S | sqrt(v) | exp((f lmax + (1 - f) lmin) / 2), f = (v + 1) / 2
//   prev = P x0 + Q s + R eps + sigma z
#pragma once

#include <cstdint>

namespace dlcv_fast {

enum class StepClip : int { None = 0, Range = 1, Threshold = 2 };
enum class StepVariance : int { Scalar = 0, Learned = 1, LearnedRange = 2 };

struct StepParams {
  double a, b, c, d, e, f, p, q, r, sigma, min_log, max_log, clip_range;
  StepClip clip;
  StepVariance variance;
  bool recompute_eps;
  bool has_noise;
  int64_t batch, inner;  // samples, elements per sample

  int64_t numel() const { return batch * inner; }
};

// The coefficient list of the registered op, in this order.
constexpr int kStepCoefficients = 13;

}  // namespace dlcv_fast

#include <math.h>

#include <type_traits>

#ifdef __CUDACC__
#define DLCV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DLCV_HOST_DEVICE inline
#endif

namespace dlcv_fast {

// The parameters converted once to the arithmetic type A (float, or double for float64
// samples), outside the element loop, in a branch-free form: the clip is
// x0 = clamp(x0, lo, hi) * scale (lo, hi = -inf, inf without clipping; -th, th, 1 / th
// with thresholding, set per sample), and eps = e s + f x0 + g eps0 (g = 1, e = f = 0
// unless recompute_eps).
template <typename A>
struct StepCoef {
  A a, b, c, d, e, f, g, p, q, r, sigma, min_log, max_log, lo, hi, scale;

  DLCV_HOST_DEVICE explicit StepCoef(const StepParams& s)
      : a(A(s.a)), b(A(s.b)), c(A(s.c)), d(A(s.d)), e(A(s.recompute_eps ? s.e : 0.0)),
        f(A(s.recompute_eps ? s.f : 0.0)), g(A(s.recompute_eps ? 0.0 : 1.0)), p(A(s.p)),
        q(A(s.q)), r(A(s.r)), sigma(A(s.sigma)), min_log(A(s.min_log)), max_log(A(s.max_log)),
        lo(A(s.clip == StepClip::Range ? -s.clip_range : -INFINITY)),
        hi(A(s.clip == StepClip::Range ? s.clip_range : INFINITY)), scale(A(1)) {}

  // Thresholding: the clip of a sample with threshold th. A threshold that is not positive
  // makes the sample NaN (the value cannot be checked on the host without a synchronisation;
  // a negative one would otherwise flip the sample's sign silently).
  DLCV_HOST_DEVICE void set_threshold(A th) {
    lo = -th;
    hi = th;
    scale = th > A(0) ? A(1) / th : A(NAN);
  }
};

// The step for one element; V is the variance mode, Noise whether noise z is added (v, the
// predicted variance, is read only by the learned modes).
template <StepVariance V, bool Noise, typename A>
DLCV_HOST_DEVICE void step_element(const StepCoef<A>& k, A s, A m, A z, A v, A& prev,
                                   A& x0_out) {
  A x0 = k.a * s + k.b * m;
  const A eps0 = k.c * s + k.d * m;
  x0 = (x0 < k.lo ? k.lo : (x0 > k.hi ? k.hi : x0)) * k.scale;
  const A eps = k.e * s + k.f * x0 + k.g * eps0;
  A out = k.p * x0 + k.q * s + k.r * eps;
  if constexpr (Noise) {
    A sigma = k.sigma;
    if constexpr (V == StepVariance::Learned) {
      sigma = sqrt(v);
    } else if constexpr (V == StepVariance::LearnedRange) {
      const A f = (v + A(1)) / A(2);
      sigma = exp((f * k.max_log + (A(1) - f) * k.min_log) / A(2));
    }
    out += sigma * z;
  }
  prev = out;
  x0_out = x0;
}

// Calls f(std::integral_constant<StepVariance, V>{}, std::bool_constant<Noise>{}) for the
// modes of p: the four loops that exist (without noise the variance mode is moot).
template <typename F>
void with_step_modes(const StepParams& p, F&& f) {
  if (!p.has_noise) return f(std::integral_constant<StepVariance, StepVariance::Scalar>{},
                             std::false_type{});
  switch (p.variance) {
    case StepVariance::Learned:
      return f(std::integral_constant<StepVariance, StepVariance::Learned>{}, std::true_type{});
    case StepVariance::LearnedRange:
      return f(std::integral_constant<StepVariance, StepVariance::LearnedRange>{},
               std::true_type{});
    default:
      return f(std::integral_constant<StepVariance, StepVariance::Scalar>{}, std::true_type{});
  }
}

}  // namespace dlcv_fast
