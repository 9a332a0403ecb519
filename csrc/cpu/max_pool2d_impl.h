// max_pool2d's forward kernels, compiled once per CPU instruction set: the including file
// defines DLCV_CPU_ISA (the namespace), DLCV_CPU_VECTOR_BYTES and, for an extension of
// x86-64, DLCV_CPU_TARGET_PRAGMA. No include guard, on purpose.
//
// Each window is scanned in PyTorch's order with PyTorch's comparison
// (`v > best || isnan(v)`), so values and indices match it exactly, branch-free on vectors:
// across channels in NHWC, across neighbouring outputs in NCHW. float32, float64, int32 and
// int64 (the argmax lanes are as wide as the values).

#include "common.h"

#include "isa_begin.h"

namespace dlcv_fast::cpu::DLCV_CPU_ISA {
namespace {

// L lanes of T in one vector of Bytes (GCC/Clang vector extensions), with argmax lanes I as
// wide as T so that one compare mask selects both the max and its index.
template <typename T, int Bytes = DLCV_CPU_VECTOR_BYTES>
struct Simd {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  static constexpr int L = Bytes / sizeof(T);
  typedef T V __attribute__((vector_size(Bytes)));
  typedef I M __attribute__((vector_size(Bytes)));

  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static V splat(T x) { return V{} + x; }
  static M splat_index(I x) { return M{} + x; }
  // PyTorch's update `if (v > best || isnan(v))`, branch-free: on random data `v > best` is a
  // coin flip, and as a branch its mispredictions cost more than the loads.
  static void update(V v, M at, V& best, M& best_at) {
    const M take = (v > best) | (v != v);
    best = take ? v : best;
    best_at = take ? at : best_at;
  }
  // The argmax widened to int64 as one vector conversion (not L scalar stores).
  typedef int64_t W __attribute__((vector_size(8 * L)));
  static void store(V best, M best_at, T* out, int64_t* idx) {
    std::memcpy(out, &best, sizeof best);
    const W wide = __builtin_convertvector(best_at, W);
    std::memcpy(idx, &wide, sizeof wide);
  }
};

// The max's starting value: -inf, or an integer type's lowest value (what PyTorch gives a
// window that lies wholly in the padding).
template <typename T>
constexpr T lowest() {
  if constexpr (std::is_floating_point_v<T>) {
    return -std::numeric_limits<T>::infinity();
  } else {
    return std::numeric_limits<T>::lowest();
  }
}

template <typename T>
inline bool is_nan(T v) {
  if constexpr (std::is_floating_point_v<T>) {
    return std::isnan(v);
  } else {
    return false;
  }
}

// Scalar max over one window (borders, remainders, and planes too large for 32-bit lanes).
template <typename T>
inline void pool_scalar(const T* x, int64_t stride_hw, int64_t in_w, int64_t h0, int64_t h1,
                        int64_t dh, int64_t w0, int64_t w1, int64_t dw, T& out, int64_t& idx) {
  T best = lowest<T>();
  int64_t best_at = h0 * in_w + w0;
  for (int64_t h = h0; h < h1; h += dh) {
    for (int64_t w = w0; w < w1; w += dw) {
      const T v = x[(h * in_w + w) * stride_hw];
      if (v > best || is_nan(v)) {
        best = v;
        best_at = h * in_w + w;
      }
    }
  }
  out = best;
  idx = best_at;
}

// Plane offsets fit the 32-bit argmax lanes used for float.
inline bool lanes_fit(const Pool2dShape& s) {
  return s.in_h * s.in_w <= std::numeric_limits<int32_t>::max();
}

// Outputs [lo, hi) along one dimension whose whole window lies inside the input.
inline void interior(int64_t out, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation,
                     int64_t size, int64_t& lo, int64_t& hi) {
  lo = std::min(out, (pad + stride - 1) / stride);
  const int64_t last = size - 1 + pad - (kernel - 1) * dilation;  // o * stride <= last
  hi = last < 0 ? lo : std::max(lo, std::min(out, last / stride + 1));
}

// NCHW: a row of outputs at a time. Inside the input, L neighbouring outputs of the row
// form the lanes of one vector (each lane loads its own tap: a strided gather); the borders
// go through the scalar path. At most 32-byte vectors: 16 lanes would leave most of a
// 27-wide row (AlexNet) to the scalar path (measured 1.8x slower with AVX-512 there).
template <typename T>
void forward_nchw(const T* input, T* output, int64_t* indices, const Pool2dShape& shape) {
  using S = Simd<T, (DLCV_CPU_VECTOR_BYTES < 32 ? DLCV_CPU_VECTOR_BYTES : 32)>;
  const Pool2dShape s = shape;  // a local copy: the loops then keep it in registers
  using I = typename S::I;
  const bool vector = lanes_fit(s);
  int64_t ow_lo, ow_hi;
  interior(s.out_w, s.kernel_w, s.stride_w, s.pad_w, s.dilation_w, s.in_w, ow_lo, ow_hi);
  const int64_t rows = s.batch * s.channels * s.out_h;
  at::parallel_for(0, rows, grain(s.out_w * s.kernel_h * s.kernel_w), [=](int64_t begin, int64_t end) {
    typename S::M lane_offset;
    for (int j = 0; j < S::L; ++j) lane_offset[j] = static_cast<I>(j * s.stride_w);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t oh = row % s.out_h;
      const T* x = input + (row / s.out_h) * s.in_h * s.in_w;
      T* out = output + row * s.out_w;
      int64_t* idx = indices + row * s.out_w;
      int64_t h0, h1;
      window(oh, s.kernel_h, s.stride_h, s.pad_h, s.dilation_h, s.in_h, h0, h1);
      int64_t ow = 0;
      const auto scalar_until = [&](int64_t stop) {
        for (; ow < stop; ++ow) {
          int64_t w0, w1;
          window(ow, s.kernel_w, s.stride_w, s.pad_w, s.dilation_w, s.in_w, w0, w1);
          pool_scalar(x, 1, s.in_w, h0, h1, s.dilation_h, w0, w1, s.dilation_w, out[ow], idx[ow]);
        }
      };
      if (vector) {
        scalar_until(ow_lo);
        for (; ow + S::L <= ow_hi; ow += S::L) {
          const int64_t w_begin = ow * s.stride_w - s.pad_w;
          typename S::V best = S::splat(lowest<T>());
          typename S::M best_at = S::splat_index(static_cast<I>(h0 * s.in_w + w_begin)) + lane_offset;
          for (int64_t h = h0; h < h1; h += s.dilation_h) {
            for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
              const int64_t at = h * s.in_w + w_begin + kw * s.dilation_w;
              typename S::V v;
              for (int j = 0; j < S::L; ++j) v[j] = x[at + j * s.stride_w];
              S::update(v, S::splat_index(static_cast<I>(at)) + lane_offset, best, best_at);
            }
          }
          S::store(best, best_at, out + ow, idx + ow);
        }
      }
      scalar_until(s.out_w);
    }
  });
}

// U vectors of channels of one output pixel: U independent max/argmax chains held in
// registers across the whole window. x points at channel c of pixel (0, 0).
template <typename T, int U>
inline void pool_vectors(const T* x, int64_t C, int64_t in_w, int64_t h0, int64_t h1, int64_t dh,
                         int64_t w0, int64_t w1, int64_t dw, T* out, int64_t* idx) {
  using S = Simd<T>;
  using I = typename S::I;
  typename S::V best[U];
  typename S::M best_at[U];
  for (int u = 0; u < U; ++u) {
    best[u] = S::splat(lowest<T>());
    best_at[u] = S::splat_index(static_cast<I>(h0 * in_w + w0));
  }
  for (int64_t h = h0; h < h1; h += dh) {
    for (int64_t w = w0; w < w1; w += dw) {
      const int64_t at = h * in_w + w;
      const T* v = x + at * C;
      const typename S::M at_v = S::splat_index(static_cast<I>(at));
      for (int u = 0; u < U; ++u) S::update(S::load(v + u * S::L), at_v, best[u], best_at[u]);
    }
  }
  for (int u = 0; u < U; ++u) S::store(best[u], best_at[u], out + u * S::L, idx + u * S::L);
}

// The first vc channels (whole vectors) of one output pixel, taps outer and channels inner:
// each tap is one contiguous run of channels, and the running max and argmax stay in out and
// a 32-bit buffer (in L1) until the argmax is widened into idx.
template <typename T>
inline void pool_runs(const T* x, int64_t vc, int64_t C, int64_t in_w, int64_t h0, int64_t h1,
                      int64_t dh, int64_t w0, int64_t w1, int64_t dw, T* out, int64_t* idx,
                      typename Simd<T>::I* buf) {
  using S = Simd<T>;
  using I = typename S::I;
  const auto load_at = [&](int64_t c) {
    typename S::M v;
    std::memcpy(&v, buf + c, sizeof v);
    return v;
  };
  const typename S::M first = S::splat_index(static_cast<I>(h0 * in_w + w0));
  for (int64_t c = 0; c < vc; c += S::L) {
    const typename S::V start = S::splat(lowest<T>());
    std::memcpy(out + c, &start, sizeof start);
    std::memcpy(buf + c, &first, sizeof first);
  }
  for (int64_t h = h0; h < h1; h += dh) {
    for (int64_t w = w0; w < w1; w += dw) {
      const int64_t at = h * in_w + w;
      const T* v = x + at * C;
      const typename S::M at_v = S::splat_index(static_cast<I>(at));
      for (int64_t c = 0; c < vc; c += S::L) {
        typename S::V best = S::load(out + c);
        typename S::M best_at = load_at(c);
        S::update(S::load(v + c), at_v, best, best_at);
        std::memcpy(out + c, &best, sizeof best);
        std::memcpy(buf + c, &best_at, sizeof best_at);
      }
    }
  }
  for (int64_t c = 0; c < vc; c += S::L) {
    const typename S::W wide = __builtin_convertvector(load_at(c), typename S::W);
    std::memcpy(idx + c, &wide, sizeof wide);
  }
}

// NHWC: one output pixel at a time. Up to U vectors of channels: U max/argmax chains in
// registers (pool_vectors), then single vectors, then scalars. More channels: pool_runs, then
// scalars. Blocks of U vectors visited tap by tap read each tap's channels in pieces of U
// vectors, jumping between the taps' pixels; on VGG-16's 2x2 pools of 128-512 channels (batch
// 8, cold caches, 2 cores, AVX-512) that ran at 0.61x-0.92x PyTorch, pool_runs at 0.95x-1.04x.
template <typename T>
void forward_nhwc(const T* input, T* output, int64_t* indices, const Pool2dShape& shape) {
  using S = Simd<T>;
  constexpr int U = 4;
  const Pool2dShape s = shape;  // a local copy: the loops then keep it in registers
  const int64_t C = s.channels;
  const int64_t vector_c = lanes_fit(s) ? C - C % S::L : 0;
  const int64_t block_c = vector_c - vector_c % (U * S::L);
  const bool runs = vector_c > U * S::L;
  const int64_t pixels = s.batch * s.out_h * s.out_w;
  at::parallel_for(0, pixels, grain(C * s.kernel_h * s.kernel_w), [=](int64_t begin, int64_t end) {
    std::vector<typename S::I> buf(runs ? vector_c : 0);
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t ow = pixel % s.out_w;
      const int64_t oh = (pixel / s.out_w) % s.out_h;
      const int64_t n = pixel / (s.out_w * s.out_h);
      int64_t h0, h1, w0, w1;
      window(oh, s.kernel_h, s.stride_h, s.pad_h, s.dilation_h, s.in_h, h0, h1);
      window(ow, s.kernel_w, s.stride_w, s.pad_w, s.dilation_w, s.in_w, w0, w1);
      const T* x = input + n * s.in_h * s.in_w * C;
      T* out = output + pixel * C;
      int64_t* idx = indices + pixel * C;
      int64_t c = 0;
      if (runs) {
        pool_runs(x, vector_c, C, s.in_w, h0, h1, s.dilation_h, w0, w1, s.dilation_w, out, idx,
                  buf.data());
        c = vector_c;
      }
      for (; c < block_c; c += U * S::L) {
        pool_vectors<T, U>(x + c, C, s.in_w, h0, h1, s.dilation_h, w0, w1, s.dilation_w, out + c, idx + c);
      }
      for (; c < vector_c; c += S::L) {
        pool_vectors<T, 1>(x + c, C, s.in_w, h0, h1, s.dilation_h, w0, w1, s.dilation_w, out + c, idx + c);
      }
      for (; c < C; ++c) {
        pool_scalar(x + c, C, s.in_w, h0, h1, s.dilation_h, w0, w1, s.dilation_w, out[c], idx[c]);
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

}  // namespace

void max_pool2d_forward(DType dtype, bool channels_last, const void* input, void* output,
                        int64_t* indices, const Pool2dShape& shape) {
  switch (dtype) {
    case DType::Float32: return forward_typed<float>(channels_last, input, output, indices, shape);
    case DType::Float64: return forward_typed<double>(channels_last, input, output, indices, shape);
    case DType::Int32: return forward_typed<int32_t>(channels_last, input, output, indices, shape);
    case DType::Int64: return forward_typed<int64_t>(channels_last, input, output, indices, shape);
    default: break;  // checked by the caller
  }
}

}  // namespace dlcv_fast::cpu::DLCV_CPU_ISA

#include "isa_end.h"
