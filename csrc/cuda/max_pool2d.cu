// max_pool2d forward and backward on CUDA.
//
// Forward: one thread per output element (NCHW) or per V adjacent channels of one output
// pixel (NHWC, V * sizeof(T) <= 16 bytes, so a warp reads whole 16-byte vectors along C).
// The scan order over the window and the comparison `v > best || isnan(v)` are PyTorch's,
// so values and indices match it exactly, ties (first max wins) and NaN (last NaN wins)
// included. Integer types (the forward only) start from their lowest value instead of -inf.
//
// Backward is a gather: each thread owns input elements and sums grad_output over the
// windows that hold it as a tap and whose saved index points at it. No atomics, so the
// result is deterministic, and overlapping windows (stride < kernel) lose no update.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"

namespace dlcv_fast::cuda {
namespace {

// The window of output o covers taps o * stride - pad + k * dilation, k in [0, kernel):
// `first` is the first in-bounds tap (PyTorch's initial argmax), `end` bounds the last.
template <typename I>
__device__ __forceinline__ void window(I o, I kernel, I stride, I pad, I dilation, I size,
                                       I& first, I& end) {
  const I begin = o * stride - pad;
  end = begin + (kernel - 1) * dilation + 1;
  if (end > size) end = size;
  first = begin >= 0 ? begin : begin + ((dilation - 1 - begin) / dilation) * dilation;
}

// Outputs o in [lo, hi) whose window span [o*stride - pad, o*stride - pad + (kernel-1)*dilation]
// contains position x. With dilation > 1, x is a tap of o only if is_tap(...) also holds.
template <typename I>
__device__ __forceinline__ void windows_over(I x, I kernel, I stride, I pad, I dilation, I out,
                                             I& lo, I& hi) {
  const I from = x + pad - (kernel - 1) * dilation;
  lo = from <= 0 ? 0 : (from - 1) / stride + 1;  // ceil(from / stride), no overflow
  hi = (x + pad) / stride + 1;
  if (hi > out) hi = out;
}

template <typename I>
__device__ __forceinline__ bool is_tap(I x, I o, I stride, I pad, I dilation) {
  return (x + pad - o * stride) % dilation == 0;
}

// The max's starting value: -inf, or an integer type's lowest value (what PyTorch gives a
// window that lies wholly in the padding).
template <typename A>
__device__ __forceinline__ A lowest() {
  if constexpr (std::is_floating_point_v<A>) {
    return -INFINITY;
  } else {
    return std::numeric_limits<A>::lowest();
  }
}

template <typename A>
__device__ __forceinline__ bool is_nan(A v) {
  if constexpr (std::is_floating_point_v<A>) {
    return isnan(v);
  } else {
    return false;
  }
}

// Pooling parameters narrowed to the index type once, outside the loops.
template <typename I>
struct Params {
  I channels, in_h, in_w, out_h, out_w, kh, kw, sh, sw, ph, pw, dh, dw;
  explicit Params(const Pool2dShape& s)
      : channels(s.channels), in_h(s.in_h), in_w(s.in_w), out_h(s.out_h), out_w(s.out_w),
        kh(s.kernel_h), kw(s.kernel_w), sh(s.stride_h), sw(s.stride_w), ph(s.pad_h),
        pw(s.pad_w), dh(s.dilation_h), dw(s.dilation_w) {}
};

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    forward_nchw(const T* __restrict__ input, T* __restrict__ output,
                 int64_t* __restrict__ indices, const Params<I> p, const I total) {
  using A = acc_t<T>;
  for (I i = first_item<I>(); i < total; i += grid_step<I>()) {
    const I ow = i % p.out_w;
    const I oh = (i / p.out_w) % p.out_h;
    const I plane = i / (p.out_w * p.out_h);
    I h0, h1, w0, w1;
    window(oh, p.kh, p.sh, p.ph, p.dh, p.in_h, h0, h1);
    window(ow, p.kw, p.sw, p.pw, p.dw, p.in_w, w0, w1);
    const T* x = input + plane * p.in_h * p.in_w;
    A best = lowest<A>();
    I best_at = h0 * p.in_w + w0;
    for (I h = h0; h < h1; h += p.dh) {
      for (I w = w0; w < w1; w += p.dw) {
        const A v = to_acc(x[h * p.in_w + w]);
        if (v > best || is_nan(v)) {
          best = v;
          best_at = h * p.in_w + w;
        }
      }
    }
    output[i] = from_acc<T>(best);
    indices[i] = best_at;
  }
}

// Item i covers channels [c, c + V) of output pixel (n, oh, ow); since C % V == 0 its
// first output element sits at i * V.
template <typename T, int V, typename I>
__global__ void __launch_bounds__(kThreads)
    forward_nhwc(const T* __restrict__ input, T* __restrict__ output,
                 int64_t* __restrict__ indices, const Params<I> p, const I total) {
  using A = acc_t<T>;
  const I groups = p.channels / V;
  for (I i = first_item<I>(); i < total; i += grid_step<I>()) {
    const I c = (i % groups) * V;
    const I pixel = i / groups;
    const I ow = pixel % p.out_w;
    const I oh = (pixel / p.out_w) % p.out_h;
    const I n = pixel / (p.out_w * p.out_h);
    I h0, h1, w0, w1;
    window(oh, p.kh, p.sh, p.ph, p.dh, p.in_h, h0, h1);
    window(ow, p.kw, p.sw, p.pw, p.dw, p.in_w, w0, w1);
    const T* x = input + n * p.in_h * p.in_w * p.channels + c;
    A best[V];
    int64_t best_at[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      best[j] = lowest<A>();
      best_at[j] = h0 * p.in_w + w0;
    }
    for (I h = h0; h < h1; h += p.dh) {
      for (I w = w0; w < w1; w += p.dw) {
        const Vec<T, V> v = *reinterpret_cast<const Vec<T, V>*>(x + (h * p.in_w + w) * p.channels);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A a = to_acc(v.v[j]);
          if (a > best[j] || is_nan(a)) {
            best[j] = a;
            best_at[j] = h * p.in_w + w;
          }
        }
      }
    }
    Vec<T, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) out.v[j] = from_acc<T>(best[j]);
    *reinterpret_cast<Vec<T, V>*>(output + i * V) = out;
    store_indices<V>(indices + static_cast<int64_t>(i) * V, best_at);
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    backward_nchw(const T* __restrict__ grad_output, const int64_t* __restrict__ indices,
                  T* __restrict__ grad_input, const Params<I> p, const I total) {
  using A = acc_t<T>;
  for (I i = first_item<I>(); i < total; i += grid_step<I>()) {
    const I w = i % p.in_w;
    const I h = (i / p.in_w) % p.in_h;
    const I plane = i / (p.in_w * p.in_h);
    I oh0, oh1, ow0, ow1;
    windows_over(h, p.kh, p.sh, p.ph, p.dh, p.out_h, oh0, oh1);
    windows_over(w, p.kw, p.sw, p.pw, p.dw, p.out_w, ow0, ow1);
    const int64_t here = h * p.in_w + w;
    const I base = plane * p.out_h * p.out_w;
    A sum = 0;
    // Only windows that hold (h, w) as a tap: an output whose window lies wholly in the
    // padding keeps PyTorch's index (which may name an element outside the window) but
    // passes no gradient.
    for (I oh = oh0; oh < oh1; ++oh) {
      if (!is_tap(h, oh, p.sh, p.ph, p.dh)) continue;
      for (I ow = ow0; ow < ow1; ++ow) {
        if (!is_tap(w, ow, p.sw, p.pw, p.dw)) continue;
        const I o = base + oh * p.out_w + ow;
        if (indices[o] == here) sum += to_acc(grad_output[o]);
      }
    }
    grad_input[i] = from_acc<T>(sum);
  }
}

template <typename T, int V, typename I>
__global__ void __launch_bounds__(kThreads)
    backward_nhwc(const T* __restrict__ grad_output, const int64_t* __restrict__ indices,
                  T* __restrict__ grad_input, const Params<I> p, const I total) {
  using A = acc_t<T>;
  const I groups = p.channels / V;
  for (I i = first_item<I>(); i < total; i += grid_step<I>()) {
    const I c = (i % groups) * V;
    const I pixel = i / groups;
    const I w = pixel % p.in_w;
    const I h = (pixel / p.in_w) % p.in_h;
    const I n = pixel / (p.in_w * p.in_h);
    I oh0, oh1, ow0, ow1;
    windows_over(h, p.kh, p.sh, p.ph, p.dh, p.out_h, oh0, oh1);
    windows_over(w, p.kw, p.sw, p.pw, p.dw, p.out_w, ow0, ow1);
    const int64_t here = h * p.in_w + w;
    const I base = n * p.out_h * p.out_w * p.channels + c;
    A sum[V];
#pragma unroll
    for (int j = 0; j < V; ++j) sum[j] = 0;
    for (I oh = oh0; oh < oh1; ++oh) {
      if (!is_tap(h, oh, p.sh, p.ph, p.dh)) continue;
      for (I ow = ow0; ow < ow1; ++ow) {
        if (!is_tap(w, ow, p.sw, p.pw, p.dw)) continue;
        const I o = base + (oh * p.out_w + ow) * p.channels;
        int64_t at[V];
        load_indices<V>(indices + o, at);
        const Vec<T, V> g = *reinterpret_cast<const Vec<T, V>*>(grad_output + o);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (at[j] == here) sum[j] += to_acc(g.v[j]);
        }
      }
    }
    Vec<T, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) out.v[j] = from_acc<T>(sum[j]);
    *reinterpret_cast<Vec<T, V>*>(grad_input + i * V) = out;
  }
}

// A bound on every offset and window coordinate the kernels compute, including the tap
// one dilation past a window's last, where a loop stops (with kernel 1 and a dilation
// near 2^31 it would wrap a 32-bit index).
int64_t largest_offset(const Pool2dShape& s) {
  const auto span = [](int64_t in, int64_t out, int64_t k, int64_t st, int64_t p, int64_t d) {
    return in + 2 * p + k * d + out * st;
  };
  int64_t largest = s.input_numel() > s.output_numel() ? s.input_numel() : s.output_numel();
  const int64_t h = span(s.in_h, s.out_h, s.kernel_h, s.stride_h, s.pad_h, s.dilation_h);
  const int64_t w = span(s.in_w, s.out_w, s.kernel_w, s.stride_w, s.pad_w, s.dilation_w);
  if (h > largest) largest = h;
  if (w > largest) largest = w;
  return largest;
}

template <typename T>
cudaError_t forward_typed(bool channels_last, const void* input, void* output, int64_t* indices,
                          const Pool2dShape& s, cudaStream_t stream) {
  const T* in = static_cast<const T*>(input);
  T* out = static_cast<T*>(output);
  with_index_type(largest_offset(s), [&](auto index_tag) {
    using I = decltype(index_tag);
    const Params<I> p(s);
    if (!channels_last) {
      const int64_t total = s.output_numel();
      launch_kernel(forward_nchw<T, I>, blocks_for(total), kThreads, 0, stream, in, out, indices, p,
                    static_cast<I>(total));
      return;
    }
    with_vector_width<T>(vector_width<T>(s.channels, {in, out}, indices), [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t total = s.output_numel() / V;
      launch_kernel(forward_nhwc<T, V, I>, blocks_for(total), kThreads, 0, stream, in, out, indices,
                    p, static_cast<I>(total));
    });
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(bool channels_last, const void* grad_output, const int64_t* indices,
                           void* grad_input, const Pool2dShape& s, cudaStream_t stream) {
  const T* gout = static_cast<const T*>(grad_output);
  T* gin = static_cast<T*>(grad_input);
  with_index_type(largest_offset(s), [&](auto index_tag) {
    using I = decltype(index_tag);
    const Params<I> p(s);
    if (!channels_last) {
      const int64_t total = s.input_numel();
      launch_kernel(backward_nchw<T, I>, blocks_for(total), kThreads, 0, stream, gout, indices, gin,
                    p, static_cast<I>(total));
      return;
    }
    with_vector_width<T>(vector_width<T>(s.channels, {gout, gin}, indices), [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t total = s.input_numel() / V;
      launch_kernel(backward_nhwc<T, V, I>, blocks_for(total), kThreads, 0, stream, gout, indices,
                    gin, p, static_cast<I>(total));
    });
  });
  return cudaGetLastError();
}

}  // namespace

cudaError_t max_pool2d_forward(DType dtype, bool channels_last, const void* input, void* output,
                               int64_t* indices, const Pool2dShape& shape, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return forward_typed<float>(channels_last, input, output, indices, shape, stream);
    case DType::Float64: return forward_typed<double>(channels_last, input, output, indices, shape, stream);
    case DType::Float16: return forward_typed<__half>(channels_last, input, output, indices, shape, stream);
    case DType::BFloat16: return forward_typed<__nv_bfloat16>(channels_last, input, output, indices, shape, stream);
    case DType::UInt8: return forward_typed<uint8_t>(channels_last, input, output, indices, shape, stream);
    case DType::Int8: return forward_typed<int8_t>(channels_last, input, output, indices, shape, stream);
    case DType::Int16: return forward_typed<int16_t>(channels_last, input, output, indices, shape, stream);
    case DType::Int32: return forward_typed<int32_t>(channels_last, input, output, indices, shape, stream);
    case DType::Int64: return forward_typed<int64_t>(channels_last, input, output, indices, shape, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t max_pool2d_backward(DType dtype, bool channels_last, const void* grad_output,
                                const int64_t* indices, void* grad_input,
                                const Pool2dShape& shape, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return backward_typed<float>(channels_last, grad_output, indices, grad_input, shape, stream);
    case DType::Float64: return backward_typed<double>(channels_last, grad_output, indices, grad_input, shape, stream);
    case DType::Float16: return backward_typed<__half>(channels_last, grad_output, indices, grad_input, shape, stream);
    case DType::BFloat16: return backward_typed<__nv_bfloat16>(channels_last, grad_output, indices, grad_input, shape, stream);
    default: break;  // no gradient for integers
  }
  return cudaErrorInvalidValue;
}

}  // namespace dlcv_fast::cuda
