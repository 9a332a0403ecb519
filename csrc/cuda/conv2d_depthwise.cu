// Depthwise conv2d on CUDA (groups == C, one input channel per group, O = multiplier * C):
// direct kernels. Output channel o reads input channel o / multiplier only, so each output
// element is a KH x KW dot product; the implicit GEMM of conv2d.cu would use one column of
// its tiles for it.
//
//   forward  one thread per y element: the taps that fall inside the image, then bias, ReLU
//   dgrad    one thread per gx element, a gather: for each of its channel's multiplier
//            outputs and each tap, the output position that read it, if the stride divides
//            the distance and the position is in range. No atomics: deterministic.
//   wgrad    one block per (tap, block of output channels, slice of the N * OH * OW
//            positions): the block's threads stride over the slice, then a fixed
//            shared-memory tree adds their sums. With several slices (few channels x taps
//            would leave the GPU idle) their sums go to a workspace and a second kernel adds
//            them in slice order. Deterministic.
//
// Flat element indices run with the channel fastest when the tensor written is channels_last
// (threads of a warp then read and write adjacent channels) and with the width fastest
// otherwise (adjacent output columns). wgrad's blocks are 32 channels x 16 position lanes for
// channels_last and 1 x 256 position lanes for NCHW, for the same reason. The taps of a
// channel are re-read by every thread that needs them; they are few and stay in L1.
// Block shapes were chosen by reasoning, not yet measured on a GPU.
//
// Index arithmetic is 32-bit when every flat index and every offset of every tensor stays
// below 2^30 (common.cuh's fits_int32), else 64-bit. The element bodies are host-callable
// for float and double so that their index math can be checked on a CPU.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common.cuh"
#include "launchers.h"

namespace dlcv_fast::cuda {
namespace {

// Element loads and stores in the accumulation type (host-callable for float and double).
__host__ __device__ __forceinline__ float dw_load(const float* p) { return *p; }
__host__ __device__ __forceinline__ double dw_load(const double* p) { return *p; }
__device__ __forceinline__ float dw_load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float dw_load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__host__ __device__ __forceinline__ void dw_store(float* p, float v) { *p = v; }
__host__ __device__ __forceinline__ void dw_store(double* p, double v) { *p = v; }
__device__ __forceinline__ void dw_store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void dw_store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Sizes and parameters as int (the host checks they fit), strides in the index type I.
struct DwGeo {
  int n, c, h, w, o, kh, kw, oh, ow, mult;
  int sh, sw, ph, pw, dh, dw;
};

template <typename I>
struct DwStrides {
  I n, c, h, w;
  __host__ __device__ I at(I a, I b, I c_, I d) const { return a * n + b * c + c_ * h + d * w; }
};

template <typename I>
DwStrides<I> dw_strides(Strides4 s) {
  return {static_cast<I>(s.n), static_cast<I>(s.c), static_cast<I>(s.h), static_cast<I>(s.w)};
}

// (n, ch, i, j) of a flat index over (N, CH, HH, WW), channel fastest or width fastest.
template <typename I, bool kChannelsFast>
__host__ __device__ __forceinline__ void dw_split(I idx, int ch_count, int hh, int ww, I& n,
                                                  I& ch, I& i, I& j) {
  if (kChannelsFast) {
    ch = idx % ch_count;
    I q = idx / ch_count;
    j = q % ww;
    q /= ww;
    i = q % hh;
    n = q / hh;
  } else {
    j = idx % ww;
    I q = idx / ww;
    i = q % hh;
    q /= hh;
    ch = q % ch_count;
    n = q / ch_count;
  }
}

// ---- forward -------------------------------------------------------------------------------

template <typename T, typename I>
struct DwForwardArgs {
  const T* x;
  const T* w;
  const T* bias;
  T* y;
  DwStrides<I> xs, ws, ys;
  DwGeo g;
  bool relu;
};

template <typename T, typename I, bool kChannelsFast>
__host__ __device__ __forceinline__ void dw_forward_at(const DwForwardArgs<T, I>& a, I idx) {
  using A = acc_t<T>;
  const DwGeo& g = a.g;
  I n, o, i, j;
  dw_split<I, kChannelsFast>(idx, g.o, g.oh, g.ow, n, o, i, j);
  const T* xp = a.x + n * a.xs.n + (o / g.mult) * a.xs.c;
  const T* wp = a.w + o * a.ws.n;
  const int h0 = static_cast<int>(i) * g.sh - g.ph;
  const int w0 = static_cast<int>(j) * g.sw - g.pw;
  A acc = A(0);
  for (int r = 0; r < g.kh; ++r) {
    const int h = h0 + r * g.dh;
    if (static_cast<unsigned>(h) >= static_cast<unsigned>(g.h)) continue;
    const T* xrow = xp + static_cast<I>(h) * a.xs.h;
    const T* wrow = wp + static_cast<I>(r) * a.ws.h;
    for (int s = 0; s < g.kw; ++s) {
      const int w = w0 + s * g.dw;
      if (static_cast<unsigned>(w) >= static_cast<unsigned>(g.w)) continue;
      acc += dw_load(xrow + static_cast<I>(w) * a.xs.w) *
             dw_load(wrow + static_cast<I>(s) * a.ws.w);
    }
  }
  if (a.bias != nullptr) acc += dw_load(a.bias + o);
  if (a.relu && acc < A(0)) acc = A(0);  // keeps NaN, as torch.relu does
  dw_store(a.y + a.ys.at(n, o, i, j), acc);
}

template <typename T, typename I, bool kChannelsFast>
__global__ void __launch_bounds__(kThreads)
    dw_forward_kernel(const DwForwardArgs<T, I> a, I total) {
  for (I idx = first_item<I>(); idx < total; idx += grid_step<I>()) {
    dw_forward_at<T, I, kChannelsFast>(a, idx);
  }
}

// ---- dgrad ---------------------------------------------------------------------------------

template <typename T, typename I>
struct DwDgradArgs {
  const T* gy;
  const T* w;
  T* gx;
  DwStrides<I> gys, ws, gxs;
  DwGeo g;
};

template <typename T, typename I, bool kChannelsFast>
__host__ __device__ __forceinline__ void dw_dgrad_at(const DwDgradArgs<T, I>& a, I idx) {
  using A = acc_t<T>;
  const DwGeo& g = a.g;
  I n, c, h, w;
  dw_split<I, kChannelsFast>(idx, g.c, g.h, g.w, n, c, h, w);
  const int hp = static_cast<int>(h) + g.ph, wp = static_cast<int>(w) + g.pw;
  A acc = A(0);
  for (int m = 0; m < g.mult; ++m) {
    const I o = c * g.mult + m;
    const T* gyp = a.gy + n * a.gys.n + o * a.gys.c;
    const T* wo = a.w + o * a.ws.n;
    // Output row i read input row h through tap r when i * sh = h + ph - r * dh.
    for (int r = 0; r < g.kh; ++r) {
      const int th = hp - r * g.dh;
      if (th < 0) break;  // only decreases with r
      const int i = static_cast<int>(static_cast<unsigned>(th) / static_cast<unsigned>(g.sh));
      if (i * g.sh != th || i >= g.oh) continue;
      const T* gyrow = gyp + static_cast<I>(i) * a.gys.h;
      const T* wrow = wo + static_cast<I>(r) * a.ws.h;
      for (int s = 0; s < g.kw; ++s) {
        const int tw = wp - s * g.dw;
        if (tw < 0) break;
        const int j = static_cast<int>(static_cast<unsigned>(tw) / static_cast<unsigned>(g.sw));
        if (j * g.sw != tw || j >= g.ow) continue;
        acc += dw_load(gyrow + static_cast<I>(j) * a.gys.w) *
               dw_load(wrow + static_cast<I>(s) * a.ws.w);
      }
    }
  }
  dw_store(a.gx + a.gxs.at(n, c, h, w), acc);
}

template <typename T, typename I, bool kChannelsFast>
__global__ void __launch_bounds__(kThreads)
    dw_dgrad_kernel(const DwDgradArgs<T, I> a, I total) {
  for (I idx = first_item<I>(); idx < total; idx += grid_step<I>()) {
    dw_dgrad_at<T, I, kChannelsFast>(a, idx);
  }
}

// ---- wgrad ---------------------------------------------------------------------------------

template <typename T, typename I>
struct DwWgradArgs {
  const T* gy;
  const T* x;
  T* gw;
  DwStrides<I> gys, xs, gws;
  DwGeo g;
};

// Sum over positions q = first, first + step, ... < end (of N * OH * OW) of gy * x for
// channel o and tap (r, s): one thread's share of a block's reduction.
template <typename T, typename I>
__host__ __device__ __forceinline__ acc_t<T> dw_wgrad_partial(const DwWgradArgs<T, I>& a, I o,
                                                              int r, int s, I first, I end,
                                                              I step) {
  using A = acc_t<T>;
  const DwGeo& g = a.g;
  const T* gyp = a.gy + o * a.gys.c;
  const T* xp = a.x + (o / g.mult) * a.xs.c;
  const int dh = r * g.dh - g.ph, dw = s * g.dw - g.pw;
  A acc = A(0);
  for (I q = first; q < end; q += step) {
    const I j = q % g.ow;
    const I t = q / g.ow;
    const I i = t % g.oh;
    const I n = t / g.oh;
    const int h = static_cast<int>(i) * g.sh + dh;
    const int w = static_cast<int>(j) * g.sw + dw;
    if (static_cast<unsigned>(h) >= static_cast<unsigned>(g.h) ||
        static_cast<unsigned>(w) >= static_cast<unsigned>(g.w)) {
      continue;
    }
    acc += dw_load(gyp + n * a.gys.n + i * a.gys.h + j * a.gys.w) *
           dw_load(xp + n * a.xs.n + static_cast<I>(h) * a.xs.h + static_cast<I>(w) * a.xs.w);
  }
  return acc;
}

// Block (kLanes channels) x (kRows position lanes); blockIdx.x = tap * channel_blocks + block,
// blockIdx.y = slice of `per` positions. With one slice the block stores gw; with more it
// stores its sum to sums[(slice * O + o) * taps + tap] for dw_wgrad_reduce.
template <typename T, typename I, int kLanes, int kRows>
__global__ void __launch_bounds__(kLanes * kRows)
    dw_wgrad_kernel(const DwWgradArgs<T, I> a, int channel_blocks, I per,
                    acc_t<T>* __restrict__ sums) {
  using A = acc_t<T>;
  const int tap = static_cast<int>(blockIdx.x) / channel_blocks;
  const int block = static_cast<int>(blockIdx.x) - tap * channel_blocks;
  const int r = tap / a.g.kw, s = tap - r * a.g.kw;
  const int lane = static_cast<int>(threadIdx.x) % kLanes;
  const int row = static_cast<int>(threadIdx.x) / kLanes;
  const I o = static_cast<I>(block) * kLanes + lane;
  const bool live = o < a.g.o;
  const I total = static_cast<I>(a.g.n) * a.g.oh * a.g.ow;
  const I q0 = static_cast<I>(blockIdx.y) * per;  // < total: no slice is empty
  const I q1 = per < total - q0 ? q0 + per : total;
  __shared__ A partial[kRows][kLanes];
  partial[row][lane] = live ? dw_wgrad_partial<T, I>(a, o, r, s, q0 + static_cast<I>(row), q1,
                                                     static_cast<I>(kRows))
                            : A(0);
  __syncthreads();
  // Fixed tree over the rows: the same order on every run.
#pragma unroll
  for (int half = kRows / 2; half > 0; half /= 2) {
    if (row < half) partial[row][lane] += partial[row + half][lane];
    __syncthreads();
  }
  if (row == 0 && live) {
    if (sums == nullptr) {
      dw_store(a.gw + a.gws.at(o, 0, r, s), partial[0][lane]);
    } else {
      const int64_t taps = int64_t{a.g.kh} * a.g.kw;
      sums[(static_cast<int64_t>(blockIdx.y) * a.g.o + o) * taps + tap] = partial[0][lane];
    }
  }
}

// gw[o][tap] = the slices' sums added in slice order (deterministic).
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    dw_wgrad_reduce(const DwWgradArgs<T, I> a, const acc_t<T>* __restrict__ sums,
                    int64_t slices) {
  using A = acc_t<T>;
  const int64_t taps = int64_t{a.g.kh} * a.g.kw, count = a.g.o * taps;
  for (int64_t idx = first_item<int64_t>(); idx < count; idx += grid_step<int64_t>()) {
    const A total = sum_slices<A>(sums, slices, count, idx);
    const int tap = static_cast<int>(idx % taps);
    const int r = tap / a.g.kw, s = tap - r * a.g.kw;
    dw_store(a.gw + a.gws.at(static_cast<I>(idx / taps), 0, r, s), total);
  }
}

// ---- host side -----------------------------------------------------------------------------

DwGeo dw_geo(const Conv2dShape& s) {
  return {int(s.n), int(s.c), int(s.h), int(s.w), int(s.o), int(s.kh), int(s.kw), int(s.oh),
          int(s.ow), int(s.o / s.c), int(s.stride_h), int(s.stride_w), int(s.pad_h),
          int(s.pad_w), int(s.dil_h), int(s.dil_w)};
}

// One past the largest element offset of a tensor (or its element count, if larger).
int64_t dw_extent(Strides4 st, int64_t a, int64_t b, int64_t c, int64_t d) {
  if (a == 0 || b == 0 || c == 0 || d == 0) return 0;
  const int64_t span = 1 + (a - 1) * st.n + (b - 1) * st.c + (c - 1) * st.h + (d - 1) * st.w;
  return std::max(span, a * b * c * d);
}

// The tensor written is channels_last when its channel stride is the smallest.
bool dw_channels_fast(Strides4 st) { return st.c < st.w; }

template <typename T>
cudaError_t dw_forward_typed(const void* x, Strides4 xs, const void* w, Strides4 ws,
                             const void* bias, void* y, Strides4 ys, const Conv2dShape& s,
                             bool relu, cudaStream_t stream) {
  if (conv2d_depthwise_unsupported(s) != nullptr) return cudaErrorInvalidValue;
  const int64_t total = s.n * s.o * s.oh * s.ow;
  if (total == 0) return cudaSuccess;
  const int64_t largest = std::max({total, dw_extent(xs, s.n, s.c, s.h, s.w),
                                    dw_extent(ws, s.o, 1, s.kh, s.kw),
                                    dw_extent(ys, s.n, s.o, s.oh, s.ow)});
  const bool fast = dw_channels_fast(ys);
  cudaError_t err = cudaSuccess;
  with_index_type(largest, [&](auto index) {
    using I = decltype(index);
    const DwForwardArgs<T, I> a{static_cast<const T*>(x), static_cast<const T*>(w),
                                static_cast<const T*>(bias), static_cast<T*>(y),
                                dw_strides<I>(xs), dw_strides<I>(ws), dw_strides<I>(ys),
                                dw_geo(s), relu};
    if (fast) {
      launch_kernel(dw_forward_kernel<T, I, true>, blocks_for(total), kThreads, 0, stream, a,
                    I(total));
    } else {
      launch_kernel(dw_forward_kernel<T, I, false>, blocks_for(total), kThreads, 0, stream, a,
                    I(total));
    }
    err = cudaGetLastError();
  });
  return err;
}

template <typename T>
cudaError_t dw_backward_input_typed(const void* gy, Strides4 gys, const void* w, Strides4 ws,
                                    void* gx, Strides4 gxs, const Conv2dShape& s,
                                    cudaStream_t stream) {
  if (conv2d_depthwise_unsupported(s) != nullptr) return cudaErrorInvalidValue;
  const int64_t total = s.n * s.c * s.h * s.w;
  if (total == 0) return cudaSuccess;
  const int64_t largest = std::max({total, dw_extent(gys, s.n, s.o, s.oh, s.ow),
                                    dw_extent(ws, s.o, 1, s.kh, s.kw),
                                    dw_extent(gxs, s.n, s.c, s.h, s.w)});
  const bool fast = dw_channels_fast(gxs);
  cudaError_t err = cudaSuccess;
  with_index_type(largest, [&](auto index) {
    using I = decltype(index);
    const DwDgradArgs<T, I> a{static_cast<const T*>(gy), static_cast<const T*>(w),
                              static_cast<T*>(gx), dw_strides<I>(gys), dw_strides<I>(ws),
                              dw_strides<I>(gxs), dw_geo(s)};
    if (fast) {
      launch_kernel(dw_dgrad_kernel<T, I, true>, blocks_for(total), kThreads, 0, stream, a,
                    I(total));
    } else {
      launch_kernel(dw_dgrad_kernel<T, I, false>, blocks_for(total), kThreads, 0, stream, a,
                    I(total));
    }
    err = cudaGetLastError();
  });
  return err;
}

// wgrad's blocks: 32 channels x 16 position lanes when x is channels_last, else 1 x 256.
constexpr int kDwFastLanes = 32, kDwFastRows = 16, kDwLanes = 1, kDwRows = 256;

// Slices of the N * OH * OW positions for wgrad (common.cuh): blocks of (lanes channels, a
// tap) per slice, at least 64 positions per position lane in a slice.
Slices dw_slices(Strides4 xs, const Conv2dShape& s) {
  const bool fast = dw_channels_fast(xs);
  const int64_t lanes = fast ? kDwFastLanes : kDwLanes, rows = fast ? kDwFastRows : kDwRows;
  return slices_for(s.n * s.oh * s.ow, (s.o + lanes - 1) / lanes * s.kh * s.kw, rows * 64);
}

template <typename T>
cudaError_t dw_backward_weight_typed(const void* gy, Strides4 gys, const void* x, Strides4 xs,
                                     void* gw, Strides4 gws, void* workspace,
                                     const Conv2dShape& s, cudaStream_t stream) {
  if (conv2d_depthwise_unsupported(s) != nullptr) return cudaErrorInvalidValue;
  const int64_t taps = s.kh * s.kw;
  if (s.o == 0 || taps == 0) return cudaSuccess;
  const int64_t largest = std::max({s.n * s.o * s.oh * s.ow, dw_extent(gys, s.n, s.o, s.oh, s.ow),
                                    dw_extent(xs, s.n, s.c, s.h, s.w),
                                    dw_extent(gws, s.o, 1, s.kh, s.kw)});
  const bool fast = dw_channels_fast(xs);
  const Slices sl = dw_slices(xs, s);
  if (sl.count > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  using A = acc_t<T>;
  A* sums = sl.count > 1 ? static_cast<A*>(workspace) : nullptr;
  cudaError_t err = cudaSuccess;
  with_index_type(largest, [&](auto index) {
    using I = decltype(index);
    const DwWgradArgs<T, I> a{static_cast<const T*>(gy), static_cast<const T*>(x),
                              static_cast<T*>(gw), dw_strides<I>(gys), dw_strides<I>(xs),
                              dw_strides<I>(gws), dw_geo(s)};
    const auto launch = [&](auto lanes, auto rows) {
      constexpr int kLanes = decltype(lanes)::value, kRows = decltype(rows)::value;
      const int64_t channel_blocks = (s.o + kLanes - 1) / kLanes;
      if (channel_blocks * taps > std::numeric_limits<int32_t>::max()) {
        err = cudaErrorInvalidValue;
        return;
      }
      const dim3 grid(static_cast<unsigned>(channel_blocks * taps),
                      static_cast<unsigned>(sl.count));
      launch_kernel(dw_wgrad_kernel<T, I, kLanes, kRows>, grid, kLanes * kRows, 0, stream, a,
                    static_cast<int>(channel_blocks), static_cast<I>(sl.per), sums);
      err = cudaGetLastError();
      if (err != cudaSuccess || sums == nullptr) return;
      launch_kernel(dw_wgrad_reduce<T, I>, blocks_for(s.o * taps), kThreads, 0, stream, a, sums,
                    sl.count);
      err = cudaGetLastError();
    };
    if (fast) {
      launch(std::integral_constant<int, kDwFastLanes>{},
             std::integral_constant<int, kDwFastRows>{});
    } else {
      launch(std::integral_constant<int, kDwLanes>{}, std::integral_constant<int, kDwRows>{});
    }
  });
  return err;
}

}  // namespace

// Sizes within int range with room for the index arithmetic of the kernels (i * sh etc.),
// and a wgrad grid (at most one block per output channel and tap) within 2^31 - 1 blocks.
const char* conv2d_depthwise_unsupported(const Conv2dShape& s) {
  constexpr int64_t kLimit = int64_t{1} << 28;
  if (s.groups != s.c || s.c <= 0 || s.o % s.c != 0) {
    return "not a depthwise convolution (groups == C, O a multiple of C)";
  }
  const int64_t values[] = {s.n, s.c, s.o, s.h + s.pad_h, s.w + s.pad_w,
                            s.oh * s.stride_h, s.ow * s.stride_w, s.kh * s.kw,
                            (s.kh - 1) * s.dil_h + 1, (s.kw - 1) * s.dil_w + 1,
                            s.pad_h + 1, s.pad_w + 1, s.stride_h, s.stride_w, s.dil_h, s.dil_w};
  for (int64_t v : values) {
    if (v < 0 || v >= kLimit) {
      return "an image, kernel, padding, stride or dilation dimension of 2^28 or more";
    }
  }
  if (s.o * s.kh * s.kw > std::numeric_limits<int32_t>::max()) {
    return "output channels x kernel taps of 2^31 or more (one wgrad block each)";
  }
  return nullptr;
}

cudaError_t conv2d_depthwise_forward(DType dtype, const void* x, Strides4 xs, const void* w,
                                     Strides4 ws, const void* bias, void* y, Strides4 ys,
                                     const Conv2dShape& shape, bool relu, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return dw_forward_typed<float>(x, xs, w, ws, bias, y, ys, shape, relu, stream);
    case DType::Float64: return dw_forward_typed<double>(x, xs, w, ws, bias, y, ys, shape, relu, stream);
    case DType::Float16: return dw_forward_typed<__half>(x, xs, w, ws, bias, y, ys, shape, relu, stream);
    case DType::BFloat16: return dw_forward_typed<__nv_bfloat16>(x, xs, w, ws, bias, y, ys, shape, relu, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t conv2d_depthwise_backward_input(DType dtype, const void* gy, Strides4 gys,
                                            const void* w, Strides4 ws, void* gx, Strides4 gxs,
                                            const Conv2dShape& shape, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return dw_backward_input_typed<float>(gy, gys, w, ws, gx, gxs, shape, stream);
    case DType::Float64: return dw_backward_input_typed<double>(gy, gys, w, ws, gx, gxs, shape, stream);
    case DType::Float16: return dw_backward_input_typed<__half>(gy, gys, w, ws, gx, gxs, shape, stream);
    case DType::BFloat16: return dw_backward_input_typed<__nv_bfloat16>(gy, gys, w, ws, gx, gxs, shape, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

int64_t conv2d_depthwise_backward_weight_workspace(DType dtype, Strides4 xs,
                                                  const Conv2dShape& shape) {
  if (conv2d_depthwise_unsupported(shape) != nullptr || shape.o == 0) return 0;
  const Slices sl = dw_slices(xs, shape);
  if (sl.count <= 1) return 0;
  const int64_t acc_bytes = dtype == DType::Float64 ? 8 : 4;
  return sl.count * shape.o * shape.kh * shape.kw * acc_bytes;
}

cudaError_t conv2d_depthwise_backward_weight(DType dtype, const void* gy, Strides4 gys,
                                             const void* x, Strides4 xs, void* gw, Strides4 gws,
                                             void* workspace, const Conv2dShape& shape,
                                             cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return dw_backward_weight_typed<float>(gy, gys, x, xs, gw, gws, workspace, shape, stream);
    case DType::Float64: return dw_backward_weight_typed<double>(gy, gys, x, xs, gw, gws, workspace, shape, stream);
    case DType::Float16: return dw_backward_weight_typed<__half>(gy, gys, x, xs, gw, gws, workspace, shape, stream);
    case DType::BFloat16: return dw_backward_weight_typed<__nv_bfloat16>(gy, gys, x, xs, gw, gws, workspace, shape, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace dlcv_fast::cuda
