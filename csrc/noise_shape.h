// The fused noise-scheduling combination, shared by the host entry points and the CPU and
// CUDA kernels. Plain C++: no torch header.
//
// For sample b at timestep t = timesteps[b], with a = alphas_cumprod[t]:
//   add_noise:     out = sqrt(a) * x + sqrt(1 - a) * e     (x: clean sample, e: noise)
//   get_velocity:  out = sqrt(a) * e - sqrt(1 - a) * x     (the v-prediction target)
// Both are out = cx * x + ce * e; the backward pass is gx = cx * g, ge = ce * g.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace dlcv_fast {

enum class NoiseKind { AddNoise, Velocity };

struct NoiseShape {
  int64_t batch;       // samples; timesteps[b] belongs to elements [b * inner, (b + 1) * inner)
  int64_t inner;       // elements per sample

  int64_t numel() const { return batch * inner; }
};

}  // namespace dlcv_fast
