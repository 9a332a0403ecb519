// max_pool2d on the CPU: the forward kernels of every instruction set (max_pool2d_impl.h,
// chosen at run time: isa.h) and the backward kernels.
//
// Backward scatters grad_output through the indices; each plane (NCHW) or image (NHWC) is
// owned by one thread and visited in output order, so the sum is deterministic.
// Unlike PyTorch's CPU kernel, an output whose window lies wholly in the padding (possible
// with dilation) passes no gradient: PyTorch adds it at its index, outside the window.

#include "common.h"
#include "isa.h"
#include "kernels.h"

#define DLCV_CPU_ISA base
#define DLCV_CPU_VECTOR_BYTES 16
#include "max_pool2d_impl.h"
#undef DLCV_CPU_ISA
#undef DLCV_CPU_VECTOR_BYTES

namespace dlcv_fast::cpu {
namespace {

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
void backward_typed(bool channels_last, const void* grad_output, const int64_t* indices,
                    void* grad_input, const Pool2dShape& s) {
  const T* gout = static_cast<const T*>(grad_output);
  T* gin = static_cast<T*>(grad_input);
  channels_last ? backward_nhwc(gout, indices, gin, s) : backward_nchw(gout, indices, gin, s);
}

}  // namespace

void max_pool2d_forward(DType dtype, bool channels_last, const void* input, void* output,
                        int64_t* indices, const Pool2dShape& shape) {
  TORCH_CHECK(dtype == DType::Float32 || dtype == DType::Float64 || dtype == DType::Int32 ||
                  dtype == DType::Int64,
              "max_pool2d (cpu kernel): float32, float64, int32 or int64 expected");
  DLCV_CPU_DISPATCH(max_pool2d_forward, dtype, channels_last, input, output, indices, shape);
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
