// Small device helpers shared by the kernels: element-type traits, vector access and
// launch geometry. No torch headers (see DESIGN.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>

namespace dlcv_fast::cuda {

// kernel<<<grid, block, smem, stream>>>(args...), whose status cudaGetLastError returns.
// A function, not the launch syntax, so that the kernels also build for the CPU emulation
// that tests them without a GPU (csrc/emu).
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, Args&&... args) {
#ifdef DLCV_FAST_CUDA_EMU
  (void)stream;
  emu::launch(kernel, grid, block, smem, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
#endif
}

// The block's dynamic shared memory (the launch's `smem` bytes), 128-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef DLCV_FAST_CUDA_EMU
  return emu::dynamic_smem();
#else
  extern __shared__ __align__(128) unsigned char smem[];
  return smem;
#endif
}

// Asynchronous copies from global to shared memory (cp.async, sm_80 and newer): `Bytes`
// (4, 8 or 16, aligned to them at both ends) from src to dst, or zeros where !valid (src is
// then not read, but must still be an aligned address). A thread's copies form a group at
// async_copy_commit; async_copy_wait<N> returns once at most N of its groups are in flight.
// Other threads see the bytes only after a barrier that follows their copier's wait.
template <int Bytes>
__device__ __forceinline__ void async_copy(void* dst, const void* src, bool valid) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  const int src_bytes = valid ? Bytes : 0;
#ifdef DLCV_FAST_CUDA_EMU
  emu::async_copy(dst, src, src_bytes, Bytes);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  if constexpr (Bytes == 16) {  // .cg: straight to shared memory, not kept in L1
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src),
                 "r"(src_bytes)
                 : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(s), "l"(src), "n"(Bytes),
                 "r"(src_bytes)
                 : "memory");
  }
#endif
}

__device__ __forceinline__ void async_copy_commit() {
#ifdef DLCV_FAST_CUDA_EMU
  emu::async_copy_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void async_copy_wait() {
#ifdef DLCV_FAST_CUDA_EMU
  emu::async_copy_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Arithmetic type of an element type: float for the 16-bit types, else itself.
// Conversions are spelled out because torch builds with __CUDA_NO_HALF_CONVERSIONS__.
template <typename T> struct Acc { using type = T; };
template <> struct Acc<__half> { using type = float; };
template <> struct Acc<__nv_bfloat16> { using type = float; };
template <typename T> using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
__device__ __forceinline__ T to_acc(T v) {
  return v;
}

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// V consecutive elements moved as one aligned access (V * sizeof(T) <= 16 bytes).
template <typename T, int V> struct alignas(sizeof(T) * V) Vec { T v[V]; };

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n items, at most 2^20: more buy nothing on any GPU, and
// the grid's thread count then stays far below 2^31.
inline unsigned int blocks_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
}

// This thread's first item and the grid-stride step, in the kernel's index type (the
// built-in variables are 32-bit unsigned: their product must not be formed in that type).
template <typename I>
__device__ __forceinline__ I first_item() {
  return static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x);
}
template <typename I>
__device__ __forceinline__ I grid_step() {
  return static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
}

// A long reduction over `items` split into slices along grid.y, so that `blocks` blocks per
// slice make about kSliceTargetBlocks in all (few output blocks alone would leave most of
// the GPU idle): at least `min_items` items per slice (one slice if there are fewer), at
// most 65535 slices, none left empty. The slice count depends on the shape only, so the
// slices' partial sums, added in slice order, give the same bits on every GPU.
constexpr int64_t kSliceTargetBlocks = 528;  // 4 per SM on a 132-SM H100

struct Slices {
  int64_t count, per;
};
inline Slices slices_for(int64_t items, int64_t blocks, int64_t min_items) {
  int64_t count = blocks > 0 ? (kSliceTargetBlocks + blocks - 1) / blocks : 1;
  if (count > items / min_items) count = items / min_items;
  if (count > 65535) count = 65535;
  if (count < 1) count = 1;
  const int64_t per = (items + count - 1) / count;
  if (per == 0) return {1, 1};
  return {(items + per - 1) / per, per};
}

// sums[0 * stride + idx] + sums[1 * stride + idx] + ... over the slices, in slice order.
template <typename A>
__device__ __forceinline__ A sum_slices(const A* __restrict__ sums, int64_t slices,
                                        int64_t stride, int64_t idx) {
  A total = A(0);
  for (int64_t k = 0; k < slices; ++k) total += sums[k * stride + idx];
  return total;
}

inline bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Widest V in {16 bytes / sizeof(T), ..., 1} that divides `channels` and keeps every
// pointer in `data` aligned to V elements and `index` (int64, if any) to 16 bytes, so that
// rows of V elements and of V indices move as whole vectors.
template <typename T>
inline int vector_width(int64_t channels, std::initializer_list<const void*> data,
                        const int64_t* index = nullptr) {
  for (int v = static_cast<int>(16 / sizeof(T)); v > 1; v /= 2) {
    bool ok = channels % v == 0 && aligned(index, 16);
    for (const void* p : data) ok = ok && aligned(p, v * sizeof(T));
    if (ok) return v;
  }
  return 1;
}

// V int64 indices at p (16-byte aligned when V is even) as pairs.
template <int V>
__device__ __forceinline__ void load_indices(const int64_t* p, int64_t (&out)[V]) {
  if constexpr (V % 2 == 0) {
#pragma unroll
    for (int j = 0; j < V; j += 2) {
      const Vec<int64_t, 2> q = *reinterpret_cast<const Vec<int64_t, 2>*>(p + j);
      out[j] = q.v[0];
      out[j + 1] = q.v[1];
    }
  } else {
    out[0] = p[0];
  }
}

template <int V>
__device__ __forceinline__ void store_indices(int64_t* p, const int64_t (&in)[V]) {
  if constexpr (V % 2 == 0) {
#pragma unroll
    for (int j = 0; j < V; j += 2) {
      *reinterpret_cast<Vec<int64_t, 2>*>(p + j) = Vec<int64_t, 2>{{in[j], in[j + 1]}};
    }
  } else {
    p[0] = in[0];
  }
}

// 32-bit index arithmetic (cheaper division) when every flat offset and the grid-stride
// step stay below 2^31.
inline bool fits_int32(int64_t largest_numel) {
  return largest_numel <= std::numeric_limits<int32_t>::max() / 2;
}

// Calls f(I{}) with I = int32_t when every offset fits in 32 bits, else int64_t.
template <typename F>
void with_index_type(int64_t largest_numel, F&& f) {
  if (fits_int32(largest_numel)) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

// Calls f(std::integral_constant<int, V>{}) for the runtime vector width v.
template <typename T, typename F>
void with_vector_width(int v, F&& f) {
  constexpr int widest = 16 / sizeof(T);
  if constexpr (widest >= 16) {
    if (v == 16) return f(std::integral_constant<int, 16>{});
  }
  if constexpr (widest >= 8) {
    if (v == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (widest >= 4) {
    if (v == 4) return f(std::integral_constant<int, 4>{});
  }
  if (v == 2) return f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 1>{});
}

}  // namespace dlcv_fast::cuda
