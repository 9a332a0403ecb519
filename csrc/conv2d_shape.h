// The geometry of one 2-D convolution, shared by the host entry points and the CPU and
// CUDA kernels (plain C++: no torch headers).
//
// y[n, o, i, j] = bias[o] + sum_{c, r, s} x[n, g*C/G + c, i*sh - ph + r*dh, j*sw - pw + s*dw]
//                                        * w[o, c, r, s],        g = o / (O/G)
// with x taken as zero outside [0, H) x [0, W). ph and pw pad the top and the left; the
// output size (oh, ow) is given, so asymmetric padding ('same' with an even kernel) needs
// nothing more.
#pragma once

#include <cstdint>

namespace dlcv_fast {

struct Conv2dShape {
  int64_t n, c, h, w;  // input (N, C, H, W)
  int64_t o, kh, kw;   // weight (O, C / groups, KH, KW)
  int64_t oh, ow;      // output (N, O, OH, OW)
  int64_t groups;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;

  int64_t c_per_group() const { return c / groups; }
  int64_t o_per_group() const { return o / groups; }
};

// Element strides of a tensor indexed as (n, c, h, w) (a weight: (o, c, kh, kw)). Any
// layout: NCHW, channels_last, or a strided view.
struct Strides4 {
  int64_t n, c, h, w;
};

}  // namespace dlcv_fast
