// max_pool2d on the CPU, parallel with at::parallel_for.
//
// Forward scans each window in PyTorch's order with PyTorch's comparison
// (`v > best || isnan(v)`), so values and indices match it exactly. NCHW works a row of
// outputs at a time; NHWC works one output pixel at a time with the channel loop innermost,
// written branch-free so that the compiler vectorises it.
//
// Backward scatters grad_output through the indices; each plane (NCHW) or image (NHWC) is
// owned by one thread and visited in output order, so the sum is deterministic.
// Unlike PyTorch's CPU kernel, an output whose window lies wholly in the padding (possible
// with dilation) passes no gradient: PyTorch adds it at its index, outside the window.

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"

namespace dlcv_fast::cpu {
namespace {

// Taps o * stride - pad + k * dilation in [first, end), as in the CUDA kernel.
inline void window(int64_t o, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation,
                   int64_t size, int64_t& first, int64_t& end) {
  const int64_t begin = o * stride - pad;
  end = std::min(begin + (kernel - 1) * dilation + 1, size);
  first = begin >= 0 ? begin : begin + ((dilation - 1 - begin) / dilation) * dilation;
}

// Work items per task so that each task does about 32768 element visits (ATen's grain).
inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, int64_t{32768} / std::max<int64_t>(1, work_per_item));
}

template <typename T>
void forward_nchw(const T* input, T* output, int64_t* indices, const Pool2dShape& s) {
  const int64_t rows = s.batch * s.channels * s.out_h;
  const int64_t taps = s.kernel_h * s.kernel_w;
  at::parallel_for(0, rows, grain(s.out_w * taps), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t oh = row % s.out_h;
      const T* x = input + (row / s.out_h) * s.in_h * s.in_w;
      T* out = output + row * s.out_w;
      int64_t* idx = indices + row * s.out_w;
      int64_t h0, h1;
      window(oh, s.kernel_h, s.stride_h, s.pad_h, s.dilation_h, s.in_h, h0, h1);
      for (int64_t ow = 0; ow < s.out_w; ++ow) {
        int64_t w0, w1;
        window(ow, s.kernel_w, s.stride_w, s.pad_w, s.dilation_w, s.in_w, w0, w1);
        T best = -std::numeric_limits<T>::infinity();
        int64_t best_at = h0 * s.in_w + w0;
        for (int64_t h = h0; h < h1; h += s.dilation_h) {
          for (int64_t w = w0; w < w1; w += s.dilation_w) {
            const T v = x[h * s.in_w + w];
            if (v > best || std::isnan(v)) {
              best = v;
              best_at = h * s.in_w + w;
            }
          }
        }
        out[ow] = best;
        idx[ow] = best_at;
      }
    }
  });
}

template <typename T>
void forward_nhwc(const T* input, T* output, int64_t* indices, const Pool2dShape& s) {
  const int64_t C = s.channels;
  const int64_t pixels = s.batch * s.out_h * s.out_w;
  at::parallel_for(0, pixels, grain(C * s.kernel_h * s.kernel_w), [&](int64_t begin, int64_t end) {
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t ow = pixel % s.out_w;
      const int64_t oh = (pixel / s.out_w) % s.out_h;
      const int64_t n = pixel / (s.out_w * s.out_h);
      int64_t h0, h1, w0, w1;
      window(oh, s.kernel_h, s.stride_h, s.pad_h, s.dilation_h, s.in_h, h0, h1);
      window(ow, s.kernel_w, s.stride_w, s.pad_w, s.dilation_w, s.in_w, w0, w1);
      T* __restrict__ out = output + pixel * C;
      int64_t* __restrict__ idx = indices + pixel * C;
      std::fill(out, out + C, -std::numeric_limits<T>::infinity());
      std::fill(idx, idx + C, h0 * s.in_w + w0);
      for (int64_t h = h0; h < h1; h += s.dilation_h) {
        for (int64_t w = w0; w < w1; w += s.dilation_w) {
          const T* __restrict__ x = input + ((n * s.in_h + h) * s.in_w + w) * C;
          const int64_t at = h * s.in_w + w;
          for (int64_t c = 0; c < C; ++c) {
            const T v = x[c];
            const bool take = (v > out[c]) | (v != v);
            out[c] = take ? v : out[c];
            idx[c] = take ? at : idx[c];
          }
        }
      }
    }
  });
}

[[noreturn]] void bad_index(int64_t index, const Pool2dShape& s) {
  TORCH_CHECK_INDEX(false, "max_pool2d_backward: indices holds ", index,
                    ", outside an input plane of ", s.in_h, " x ", s.in_w,
                    " elements; indices must come from max_pool2d's forward");
}

// live[o] = whether output o's window holds an in-bounds tap along one dimension. An output
// whose window lies wholly in the padding keeps PyTorch's index (which may name an element
// outside the window, or outside the plane) but passes no gradient.
inline std::vector<char> live_windows(int64_t out, int64_t kernel, int64_t stride, int64_t pad,
                                      int64_t dilation, int64_t size) {
  std::vector<char> live(out);
  for (int64_t o = 0; o < out; ++o) {
    int64_t first, end;
    window(o, kernel, stride, pad, dilation, size, first, end);
    live[o] = first < end;
  }
  return live;
}

template <typename T>
void backward_nchw(const T* grad_output, const int64_t* indices, T* grad_input,
                   const Pool2dShape& s) {
  const int64_t plane_in = s.in_h * s.in_w;
  const auto live_h = live_windows(s.out_h, s.kernel_h, s.stride_h, s.pad_h, s.dilation_h, s.in_h);
  const auto live_w = live_windows(s.out_w, s.kernel_w, s.stride_w, s.pad_w, s.dilation_w, s.in_w);
  at::parallel_for(0, s.batch * s.channels, grain(plane_in + s.out_h * s.out_w), [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      T* gin = grad_input + plane * plane_in;
      std::fill(gin, gin + plane_in, T(0));
      for (int64_t oh = 0; oh < s.out_h; ++oh) {
        if (!live_h[oh]) continue;
        const int64_t row = (plane * s.out_h + oh) * s.out_w;
        for (int64_t ow = 0; ow < s.out_w; ++ow) {
          if (!live_w[ow]) continue;
          const int64_t at = indices[row + ow];
          if (at < 0 || at >= plane_in) bad_index(at, s);
          gin[at] += grad_output[row + ow];
        }
      }
    }
  });
}

template <typename T>
void backward_nhwc(const T* grad_output, const int64_t* indices, T* grad_input,
                   const Pool2dShape& s) {
  const int64_t C = s.channels;
  const int64_t plane_in = s.in_h * s.in_w;
  const auto live_h = live_windows(s.out_h, s.kernel_h, s.stride_h, s.pad_h, s.dilation_h, s.in_h);
  const auto live_w = live_windows(s.out_w, s.kernel_w, s.stride_w, s.pad_w, s.dilation_w, s.in_w);
  at::parallel_for(0, s.batch, grain((plane_in + s.out_h * s.out_w) * C), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* gin = grad_input + n * plane_in * C;
      std::fill(gin, gin + plane_in * C, T(0));
      for (int64_t oh = 0; oh < s.out_h; ++oh) {
        if (!live_h[oh]) continue;
        for (int64_t ow = 0; ow < s.out_w; ++ow) {
          if (!live_w[ow]) continue;
          const int64_t pixel = (n * s.out_h + oh) * s.out_w + ow;
          const T* gout = grad_output + pixel * C;
          const int64_t* idx = indices + pixel * C;
          for (int64_t c = 0; c < C; ++c) {
            const int64_t at = idx[c];
            if (at < 0 || at >= plane_in) bad_index(at, s);
            gin[at * C + c] += gout[c];
          }
        }
      }
    }
  });
}

template <typename T>
void forward_typed(bool channels_last, const void* input, void* output, int64_t* indices,
                   const Pool2dShape& s) {
  const T* in = static_cast<const T*>(input);
  T* out = static_cast<T*>(output);
  channels_last ? forward_nhwc(in, out, indices, s) : forward_nchw(in, out, indices, s);
}

template <typename T>
void backward_typed(bool channels_last, const void* grad_output, const int64_t* indices,
                    void* grad_input, const Pool2dShape& s) {
  const T* gout = static_cast<const T*>(grad_output);
  T* gin = static_cast<T*>(grad_input);
  channels_last ? backward_nhwc(gout, indices, gin, s) : backward_nchw(gout, indices, gin, s);
}

}  // namespace

void max_pool2d_forward(DType dtype, bool channels_last, const void* input, void* output,
                        int64_t* indices, const Pool2dShape& shape) {
  TORCH_CHECK(dtype == DType::Float32 || dtype == DType::Float64,
              "max_pool2d (cpu kernel): float32 or float64 expected");
  dtype == DType::Float32 ? forward_typed<float>(channels_last, input, output, indices, shape)
                          : forward_typed<double>(channels_last, input, output, indices, shape);
}

void max_pool2d_backward(DType dtype, bool channels_last, const void* grad_output,
                         const int64_t* indices, void* grad_input, const Pool2dShape& shape) {
  TORCH_CHECK(dtype == DType::Float32 || dtype == DType::Float64,
              "max_pool2d_backward (cpu kernel): float32 or float64 expected");
  dtype == DType::Float32
      ? backward_typed<float>(channels_last, grad_output, indices, grad_input, shape)
      : backward_typed<double>(channels_last, grad_output, indices, grad_input, shape);
}

}  // namespace dlcv_fast::cpu
