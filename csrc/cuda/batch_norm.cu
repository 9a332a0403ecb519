// Batch normalisation on CUDA (batch_norm_shape.h). Statistics and sums in float32 (float64
// for float64 inputs) whatever the element type.
//
// Reductions are two kernels. The first gives each (channel or channel group, split) block
// a share of the channel's values and writes one partial result per channel and split to
// the workspace: Welford's (count, mean, m2) of x - shift for the statistics (shift: the
// channel's first value, so values near 1e4 with unit variance normalise right), with blocks
// merged by Chan's formula, or
// the plain sums (sum g, sum g (x - mean)) for the backward pass. The second kernel, one
// thread per channel, merges a channel's splits in a fixed order (deterministic) and
// finishes: save_mean, save_invstd and the running statistics, or the sums.
//   NCHW: block (c, split) walks the split's values of channel c, V elements per load.
//   channels_last: a block is (bx channel groups of V channels) x (by rows); each thread
//   keeps V states, merged over the block's rows in shared memory.
// Splits are chosen so that about kTargetBlocks blocks run (enough for any GPU) and each
// thread still visits several vectors (kMinPerSplit, kMinRowsPerThread).
//
// The elementwise kernels (normalise, gradient) are grid-stride loops moving V elements as
// one 16-byte vector where the layout allows: V divides `inner` (NCHW) or C (channels_last).
// Under relu the gradient is masked by z = (x - mean) * w * invstd + b > 0, recomputed from
// the input exactly as the forward kernel computes it.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace dlcv_fast::cuda {
namespace {

constexpr int64_t kTargetBlocks = 1024;
constexpr int64_t kMinPerSplit = 4096;  // NCHW: values per block, 16 per thread
constexpr int64_t kMinRowsPerThread = 8;  // channels_last
constexpr int kMaxSplits = 256;

template <typename A>
struct Welford {
  A n, mean, m2;
};

template <typename A>
struct Sums {
  A a, b;  // sum g, sum g * (x - mean)
};

__device__ __forceinline__ float divide(float a, float b) { return __fdividef(a, b); }
__device__ __forceinline__ double divide(double a, double b) { return a / b; }

template <typename A>
__device__ __forceinline__ void add(Welford<A>& s, A v) {
  s.n += A(1);
  const A d = v - s.mean;
  s.mean += divide(d, s.n);
  s.m2 += d * (v - s.mean);
}

template <typename A>
__device__ __forceinline__ Welford<A> merge(const Welford<A>& a, const Welford<A>& b) {
  if (b.n == A(0)) return a;
  if (a.n == A(0)) return b;
  const A n = a.n + b.n;
  const A fb = b.n / n;
  const A d = b.mean - a.mean;
  return {n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb};
}

template <typename A>
__device__ __forceinline__ Sums<A> merge(const Sums<A>& x, const Sums<A>& y) {
  return {x.a + y.a, x.b + y.b};
}

// z = (x - mean) * scale + bias for one channel, scale = w * invstd.
template <typename A>
struct Affine {
  A mean, scale, bias;
};

template <typename A>
__device__ __forceinline__ Affine<A> affine(const A* mean, const A* invstd, const A* w,
                                            const A* b, int64_t c) {
  const A is = invstd[c];
  return {mean[c], w ? w[c] * is : is, b ? b[c] : A(0)};
}

// A channel's first value, x[c * channel_step] (channel_step: inner for NCHW, 1 for
// channels_last). The statistics accumulate x - shift: near 1e4, float32 resolves a mean only
// to 1e-3, so a Welford mean of the raw values drifts by several of those steps through the
// updates and merges, while the shifted values keep their small steps (the shift is exact:
// Sterbenz).
template <typename T>
struct Shift {
  const T* x;
  int64_t channel_step;
  __device__ acc_t<T> operator()(int64_t c) const { return to_acc(x[c * channel_step]); }
};

// What a reduction accumulates per element.
template <typename T>
struct StatsOp {
  using A = acc_t<T>;
  using State = Welford<A>;  // of x - shift
  using Const = A;           // the shift
  Shift<T> shift;

  __device__ State init() const { return {A(0), A(0), A(0)}; }
  __device__ Const constants(int64_t c) const { return shift(c); }
  template <int V>
  __device__ void load(int64_t off, Vec<T, V>& xv, Vec<T, V>&) const {
    xv = *reinterpret_cast<const Vec<T, V>*>(shift.x + off);
  }
  __device__ void visit(State& s, const Const& k, T xv, T) const { add(s, to_acc(xv) - k); }
};

template <typename T, bool Relu>
struct GradOp {
  using A = acc_t<T>;
  using State = Sums<A>;
  using Const = Affine<A>;
  const T* dy;
  const T* x;
  const A* mean;
  const A* invstd;
  const A* weight;
  const A* bias;

  __device__ State init() const { return {A(0), A(0)}; }
  __device__ Const constants(int64_t c) const { return affine(mean, invstd, weight, bias, c); }
  template <int V>
  __device__ void load(int64_t off, Vec<T, V>& xv, Vec<T, V>& gv) const {
    xv = *reinterpret_cast<const Vec<T, V>*>(x + off);
    gv = *reinterpret_cast<const Vec<T, V>*>(dy + off);
  }
  __device__ void visit(State& s, const Const& k, T xv, T gv) const {
    const A xm = to_acc(xv) - k.mean;
    const A g = (!Relu || xm * k.scale + k.bias > A(0)) ? to_acc(gv) : A(0);
    s.a += g;
    s.b += g * xm;
  }
};

// NCHW partial reduction: block (c, split), V-element vectors within planes (V | inner).
template <typename T, typename Op, int V>
__global__ void __launch_bounds__(kThreads)
    partial_nchw(Op op, int64_t channels, int64_t inner, int64_t count, int splits,
                 typename Op::State* __restrict__ ws) {
  using State = typename Op::State;
  const int64_t c = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t inner_v = inner / V, count_v = count / V;
  const int64_t begin = count_v * split / splits, end = count_v * (split + 1) / splits;
  const auto k = op.constants(c);
  State st = op.init();
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const int64_t n = j / inner_v;
    const int64_t off = ((n * channels + c) * inner_v + (j - n * inner_v)) * V;
    Vec<T, V> xv, gv;
    op.template load<V>(off, xv, gv);
#pragma unroll
    for (int e = 0; e < V; ++e) op.visit(st, k, xv.v[e], gv.v[e]);
  }
  __shared__ State smem[kThreads];
  smem[threadIdx.x] = st;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) {
      smem[threadIdx.x] = merge(smem[threadIdx.x], smem[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) ws[static_cast<int64_t>(split) * channels + c] = smem[0];
}

// channels_last partial reduction: thread (tx, ty) of block (gx, split) owns channels
// [(gx * bx + tx) * V, + V) and visits rows ty, ty + by, ... of the split (V | C).
template <typename T, typename Op, int V>
__global__ void __launch_bounds__(kThreads)
    partial_cl(Op op, int64_t channels, int64_t rows, int splits,
               typename Op::State* __restrict__ ws) {
  using State = typename Op::State;
  const int bx = blockDim.x, by = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * bx + tx;
  const bool live = group * V < channels;
  const int split = blockIdx.y;
  const int64_t begin = rows * split / splits, end = rows * (split + 1) / splits;
  State st[V];
  typename Op::Const k[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    st[e] = op.init();
    k[e] = op.constants(live ? group * V + e : 0);
  }
  if (live) {
    for (int64_t r = begin + ty; r < end; r += by) {
      Vec<T, V> xv, gv;
      op.template load<V>(r * channels + group * V, xv, gv);
#pragma unroll
      for (int e = 0; e < V; ++e) op.visit(st[e], k[e], xv.v[e], gv.v[e]);
    }
  }
  __shared__ State smem[kThreads * V];
  const int me = (ty * bx + tx) * V;
#pragma unroll
  for (int e = 0; e < V; ++e) smem[me + e] = st[e];
  __syncthreads();
  for (int stride = by / 2; stride > 0; stride >>= 1) {
    if (ty < stride) {
      const int other = ((ty + stride) * bx + tx) * V;
#pragma unroll
      for (int e = 0; e < V; ++e) smem[me + e] = merge(smem[me + e], smem[other + e]);
    }
    __syncthreads();
  }
  if (ty == 0 && live) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      ws[static_cast<int64_t>(split) * channels + group * V + e] = smem[tx * V + e];
    }
  }
}

// One thread per channel: merge the splits, then finish.
template <typename T>
struct StatsFinish {
  using A = acc_t<T>;
  Shift<T> shift;
  A* mean;           // save_mean, or the mean (stats only)
  A* invstd_or_var;  // save_invstd (train), or the biased variance (stats only)
  A* running_mean;
  A* running_var;
  double momentum, eps;
  bool train;

  __device__ void operator()(int64_t c, const Welford<A>& s) const {
    const A var = s.m2 / s.n;
    const A mu = shift(c) + s.mean;
    mean[c] = mu;
    if (!train) {
      invstd_or_var[c] = var;
      return;
    }
    invstd_or_var[c] = A(1) / sqrt(var + A(eps));
    const A m = A(momentum);
    if (running_mean) running_mean[c] = m * mu + (A(1) - m) * running_mean[c];
    if (running_var) {
      const A unbiased = s.n > A(1) ? s.m2 / (s.n - A(1)) : var;
      running_var[c] = m * unbiased + (A(1) - m) * running_var[c];
    }
  }
};

template <typename A>
struct SumsFinish {
  A* sum_dy;
  A* sum_dy_xmu;
  __device__ void operator()(int64_t c, const Sums<A>& s) const {
    sum_dy[c] = s.a;
    sum_dy_xmu[c] = s.b;
  }
};

template <typename State, typename Finish>
__global__ void __launch_bounds__(kThreads)
    merge_splits(const State* __restrict__ ws, int64_t channels, int splits, Finish finish) {
  for (int64_t c = first_item<int64_t>(); c < channels; c += grid_step<int64_t>()) {
    State acc = ws[c];
    for (int s = 1; s < splits; ++s) acc = merge(acc, ws[static_cast<int64_t>(s) * channels + c]);
    finish(c, acc);
  }
}

// Geometry of a reduction.
struct Plan {
  int v;          // vector width
  int bx, by;     // channels_last block shape
  int64_t groups; // channels_last: blocks along the channels
  int splits;
};

template <typename T>
Plan plan(const BatchNormShape& s, std::initializer_list<const void*> data) {
  Plan p{};
  const int64_t count = s.count();
  if (s.channels_last) {
    p.v = vector_width<T>(s.channels, data);
    const int64_t groups = (s.channels + p.v - 1) / p.v;
    p.bx = 1;
    while (p.bx < 32 && p.bx < groups) p.bx *= 2;
    p.by = kThreads / p.bx;
    p.groups = (groups + p.bx - 1) / p.bx;
    const int64_t want = std::max<int64_t>(1, kTargetBlocks / p.groups);
    const int64_t most = std::max<int64_t>(1, count / (kMinRowsPerThread * p.by));
    p.splits = static_cast<int>(std::min<int64_t>({want, most, kMaxSplits}));
  } else {
    p.v = vector_width<T>(s.inner, data);
    p.bx = kThreads;
    p.by = 1;
    p.groups = s.channels;
    const int64_t want = std::max<int64_t>(1, kTargetBlocks / s.channels);
    const int64_t most = std::max<int64_t>(1, count / kMinPerSplit);
    p.splits = static_cast<int>(std::min<int64_t>({want, most, kMaxSplits}));
  }
  return p;
}

// The splits of a reduction depend only on the shape (and the widest vector): the workspace
// is sized for the widest vector's plan, which has the most splits.
int64_t max_splits(const BatchNormShape& s) {
  const int64_t count = s.count();
  const int64_t most = std::max<int64_t>(1, count / 4);
  return std::min<int64_t>(most, kMaxSplits);
}

// Runs the partial kernel and the merge for Op, then `finish`.
template <typename T, typename Op, typename Finish>
cudaError_t reduce(const Op& op, const BatchNormShape& s, std::initializer_list<const void*> data,
                   void* workspace, const Finish& finish, cudaStream_t stream) {
  using State = typename Op::State;
  const Plan p = plan<T>(s, data);
  auto* ws = static_cast<State*>(workspace);
  with_vector_width<T>(p.v, [&](auto width) {
    constexpr int V = decltype(width)::value;
    if (s.channels_last) {
      const dim3 grid(static_cast<unsigned>(p.groups), static_cast<unsigned>(p.splits));
      launch_kernel(partial_cl<T, Op, V>, grid, dim3(p.bx, p.by), 0, stream, op, s.channels,
                    s.count(), p.splits, ws);
    } else {
      const dim3 grid(static_cast<unsigned>(s.channels), static_cast<unsigned>(p.splits));
      launch_kernel(partial_nchw<T, Op, V>, grid, kThreads, 0, stream, op, s.channels, s.inner,
                    s.count(), p.splits, ws);
    }
  });
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  launch_kernel(merge_splits<State, Finish>, blocks_for(s.channels), kThreads, 0, stream, ws,
                s.channels, p.splits, finish);
  return cudaGetLastError();
}

// --- elementwise ------------------------------------------------------------------------

// Channel of the vector starting at element i.
template <typename I>
__device__ __forceinline__ I channel_of(I i, bool channels_last, I channels, I inner) {
  return channels_last ? i % channels : (i / inner) % channels;
}

template <typename T, int V, typename I, bool Relu>
__global__ void __launch_bounds__(kThreads)
    normalize(const T* __restrict__ x, T* __restrict__ y, const acc_t<T>* __restrict__ mean,
              const acc_t<T>* __restrict__ invstd, const acc_t<T>* __restrict__ w,
              const acc_t<T>* __restrict__ b, bool channels_last, I channels, I inner,
              I vectors) {
  using A = acc_t<T>;
  for (I i = first_item<I>(); i < vectors; i += grid_step<I>()) {
    const I c0 = channel_of<I>(i * V, channels_last, channels, inner);
    const Vec<T, V> xv = reinterpret_cast<const Vec<T, V>*>(x)[i];
    Vec<T, V> out;
    Affine<A> k = affine(mean, invstd, w, b, c0);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (channels_last && e > 0) k = affine(mean, invstd, w, b, c0 + e);
      A z = (to_acc(xv.v[e]) - k.mean) * k.scale + k.bias;
      if (Relu) z = z < A(0) ? A(0) : z;  // NaN passes, as in torch.relu
      out.v[e] = from_acc<T>(z);
    }
    reinterpret_cast<Vec<T, V>*>(y)[i] = out;
  }
}

// dx = k g - kx (x - mean) - k0 (training) or k g (evaluation: sum_dy null).
template <typename T, int V, typename I, bool Relu>
__global__ void __launch_bounds__(kThreads)
    grad_input(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
               const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ invstd,
               const acc_t<T>* __restrict__ w, const acc_t<T>* __restrict__ b,
               const acc_t<T>* __restrict__ sum_dy, const acc_t<T>* __restrict__ sum_dy_xmu,
               acc_t<T> inv_count, bool channels_last, I channels, I inner, I vectors) {
  using A = acc_t<T>;
  for (I i = first_item<I>(); i < vectors; i += grid_step<I>()) {
    const I c0 = channel_of<I>(i * V, channels_last, channels, inner);
    const Vec<T, V> xv = reinterpret_cast<const Vec<T, V>*>(x)[i];
    const Vec<T, V> gv = reinterpret_cast<const Vec<T, V>*>(dy)[i];
    Vec<T, V> out;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const I c = channels_last ? c0 + e : c0;
      const Affine<A> k = affine(mean, invstd, w, b, c);
      const A xm = to_acc(xv.v[e]) - k.mean;
      const A g = (!Relu || xm * k.scale + k.bias > A(0)) ? to_acc(gv.v[e]) : A(0);
      A r = k.scale * g;
      if (sum_dy != nullptr) {
        const A is = invstd[c];
        r -= k.scale * (sum_dy[c] * inv_count + xm * is * is * sum_dy_xmu[c] * inv_count);
      }
      out.v[e] = from_acc<T>(r);
    }
    reinterpret_cast<Vec<T, V>*>(dx)[i] = out;
  }
}

template <typename T>
int elementwise_width(const BatchNormShape& s, std::initializer_list<const void*> data) {
  return vector_width<T>(s.channels_last ? s.channels : s.inner, data);
}

template <typename T>
cudaError_t elemt_typed(const void* x, const BatchNormParams& p, const void* mean,
                        const void* invstd, void* y, const BatchNormShape& s,
                        cudaStream_t stream) {
  using A = acc_t<T>;
  const int v = elementwise_width<T>(s, {x, y});
  with_index_type(s.numel(), [&](auto index_tag) {
    using I = decltype(index_tag);
    with_vector_width<T>(v, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t vectors = s.numel() / V;
      const auto launch = [&](auto relu) {
        launch_kernel(normalize<T, V, I, decltype(relu)::value>, blocks_for(vectors), kThreads, 0,
                      stream, static_cast<const T*>(x), static_cast<T*>(y),
                      static_cast<const A*>(mean), static_cast<const A*>(invstd),
                      static_cast<const A*>(p.weight), static_cast<const A*>(p.bias),
                      s.channels_last, static_cast<I>(s.channels), static_cast<I>(s.inner),
                      static_cast<I>(vectors));
      };
      p.relu ? launch(std::true_type{}) : launch(std::false_type{});
    });
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t grad_typed(const void* dy, const void* x, const BatchNormParams& p, const void* mean,
                       const void* invstd, const void* sum_dy, const void* sum_dy_xmu,
                       int64_t count, void* dx, const BatchNormShape& s, cudaStream_t stream) {
  using A = acc_t<T>;
  const int v = elementwise_width<T>(s, {dy, x, dx});
  with_index_type(s.numel(), [&](auto index_tag) {
    using I = decltype(index_tag);
    with_vector_width<T>(v, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t vectors = s.numel() / V;
      const auto launch = [&](auto relu) {
        launch_kernel(grad_input<T, V, I, decltype(relu)::value>, blocks_for(vectors), kThreads, 0,
                      stream, static_cast<const T*>(dy), static_cast<const T*>(x),
                      static_cast<T*>(dx), static_cast<const A*>(mean),
                      static_cast<const A*>(invstd), static_cast<const A*>(p.weight),
                      static_cast<const A*>(p.bias), static_cast<const A*>(sum_dy),
                      static_cast<const A*>(sum_dy_xmu), A(1) / A(count), s.channels_last,
                      static_cast<I>(s.channels), static_cast<I>(s.inner), static_cast<I>(vectors));
      };
      p.relu ? launch(std::true_type{}) : launch(std::false_type{});
    });
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t grad_sums_typed(const void* dy, const void* x, const BatchNormParams& p,
                            const void* mean, const void* invstd, void* sum_dy, void* sum_dy_xmu,
                            const BatchNormShape& s, void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  const SumsFinish<A> finish{static_cast<A*>(sum_dy), static_cast<A*>(sum_dy_xmu)};
  const auto run = [&](auto relu) {
    const GradOp<T, decltype(relu)::value> op{
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const A*>(mean),
        static_cast<const A*>(invstd), static_cast<const A*>(p.weight),
        static_cast<const A*>(p.bias)};
    return reduce<T>(op, s, {dy, x}, workspace, finish, stream);
  };
  return p.relu ? run(std::true_type{}) : run(std::false_type{});
}

template <typename T>
cudaError_t stats_typed(const void* x, void* mean, void* second, void* running_mean,
                        void* running_var, const BatchNormShape& s, double momentum, double eps,
                        bool train, void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  const Shift<T> shift{static_cast<const T*>(x), s.channels_last ? 1 : s.inner};
  const StatsOp<T> op{shift};
  const StatsFinish<T> finish{shift, static_cast<A*>(mean), static_cast<A*>(second),
                              static_cast<A*>(running_mean), static_cast<A*>(running_var),
                              momentum, eps, train};
  return reduce<T>(op, s, {x}, workspace, finish, stream);
}

// Calls f(T{}) for the element type.
template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace

size_t batch_norm_workspace_bytes(DType dtype, const BatchNormShape& s) {
  // The largest state: Welford's three accumulators.
  const size_t acc = dtype == DType::Float64 ? sizeof(double) : sizeof(float);
  return static_cast<size_t>(max_splits(s)) * static_cast<size_t>(s.channels) * 3 * acc;
}

cudaError_t batch_norm_forward_train(DType dtype, const void* x, const BatchNormParams& p,
                                     void* running_mean, void* running_var, void* save_mean,
                                     void* save_invstd, void* y, const BatchNormShape& s,
                                     double momentum, double eps, void* workspace,
                                     cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const cudaError_t err = stats_typed<T>(x, save_mean, save_invstd, running_mean, running_var,
                                           s, momentum, eps, true, workspace, stream);
    if (err != cudaSuccess) return err;
    return elemt_typed<T>(x, p, save_mean, save_invstd, y, s, stream);
  });
}

cudaError_t batch_norm_stats(DType dtype, const void* x, void* mean, void* var,
                             const BatchNormShape& s, void* workspace, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    return stats_typed<T>(x, mean, var, nullptr, nullptr, s, 0.0, 0.0, false, workspace, stream);
  });
}

cudaError_t batch_norm_elemt(DType dtype, const void* x, const BatchNormParams& p,
                             const void* mean, const void* invstd, void* y,
                             const BatchNormShape& s, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    return elemt_typed<decltype(tag)>(x, p, mean, invstd, y, s, stream);
  });
}

cudaError_t batch_norm_backward_reduce(DType dtype, const void* dy, const void* x,
                                       const BatchNormParams& p, const void* mean,
                                       const void* invstd, void* sum_dy, void* sum_dy_xmu,
                                       const BatchNormShape& s, void* workspace,
                                       cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    return grad_sums_typed<decltype(tag)>(dy, x, p, mean, invstd, sum_dy, sum_dy_xmu, s,
                                          workspace, stream);
  });
}

cudaError_t batch_norm_backward_elemt(DType dtype, const void* dy, const void* x,
                                      const BatchNormParams& p, const void* mean,
                                      const void* invstd, const void* sum_dy,
                                      const void* sum_dy_xmu, int64_t count, void* dx,
                                      const BatchNormShape& s, cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    return grad_typed<decltype(tag)>(dy, x, p, mean, invstd, sum_dy, sum_dy_xmu, count, dx, s,
                                     stream);
  });
}

cudaError_t batch_norm_backward_train(DType dtype, const void* dy, const void* x,
                                      const BatchNormParams& p, const void* mean,
                                      const void* invstd, void* sum_dy, void* sum_dy_xmu,
                                      void* dx, const BatchNormShape& s, void* workspace,
                                      cudaStream_t stream) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    const cudaError_t err =
        grad_sums_typed<T>(dy, x, p, mean, invstd, sum_dy, sum_dy_xmu, s, workspace, stream);
    if (err != cudaSuccess || dx == nullptr) return err;
    return grad_typed<T>(dy, x, p, mean, invstd, sum_dy, sum_dy_xmu, s.count(), dx, s, stream);
  });
}

}  // namespace dlcv_fast::cuda
