// Fused scaled-dot-product attention on CUDA (attention_params.h): tiled online softmax,
// forward and backward, with the score matrix never in global memory.
//
// Every kernel works on square tiles of TILE query rows x TILE keys held in shared memory
// in the accumulation type (float for float32 / float16 / bfloat16, double for float64):
//
//   forward   grid (batch * heads, query tiles): the block keeps its Q tile and output
//             accumulator, streams K / V tiles, and rescales by the running row max.
//   backward  delta_i = dO_i . out_i (one thread per row); then dK / dV with grid
//             (batch * kv_heads, key tiles), looping over the group's query heads and
//             the query tiles; then dQ with grid (batch * heads, query tiles), looping over
//             key tiles. Each output element has one writer: deterministic, no atomics.
//
// This is the plain CUDA-core version (one scalar FMA per product): correct for every
// shape, and the reference for a tensor-core (mma.sync) version, which it is not yet.
// The launchers pick the largest TILE whose shared memory fits the device.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"

namespace dlcv_fast::cuda {
namespace {

constexpr int kAttnThreads = 128;

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return static_cast<A>(-INFINITY);
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Score s_ij of one query row (in shared memory) and one key row (shared), scaled and
// masked; -inf for keys past S, and for rows past L (whose mask entries do not exist).
template <typename T, typename A>
__device__ __forceinline__ A masked_score(const AttentionParams& p, const A* qrow, const A* krow,
                                          const void* mask, int64_t mask_base, int64_t i,
                                          int64_t j) {
  if (i >= p.q_len || j >= p.kv_len || (p.causal && j > i)) return neg_inf<A>();
  A s = A(0);
  for (int d = 0; d < p.head_dim; ++d) s += qrow[d] * krow[d];
  s *= static_cast<A>(p.scale);
  if (p.mask_kind != MaskKind::None) {
    const int64_t at = mask_base + i * p.mask_stride[2] + j * p.mask_stride[3];
    if (p.mask_kind == MaskKind::Bool) {
      if (!static_cast<const unsigned char*>(mask)[at]) return neg_inf<A>();
    } else {
      s += to_acc(static_cast<const T*>(mask)[at]);
    }
  }
  return s;
}

// Dropout factor z_ij: 0 or 1 / (1 - p).
template <typename A>
__device__ __forceinline__ A dropout_factor(const AttentionParams& p, uint32_t bh, int64_t i,
                                            int64_t j) {
  if (p.dropout_p <= 0) return A(1);
  const uint32_t key = dropout_row_key(p.seed, bh, static_cast<uint32_t>(i));
  const bool keep = dropout_bits(key, static_cast<uint32_t>(j)) >= p.dropout_threshold;
  return keep ? static_cast<A>(1.0 / (1.0 - p.dropout_p)) : A(0);
}

// rows x cols elements of a (batch, head) slice into shared memory as A, zero past `valid`.
template <typename T, typename A>
__device__ __forceinline__ void load_tile(A* dst, const T* src, int64_t row_stride,
                                          int64_t first_row, int rows, int64_t valid, int cols) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int r = idx / cols, c = idx % cols;
    const int64_t row = first_row + r;
    dst[idx] = row < valid ? to_acc(src[row * row_stride + c]) : A(0);
  }
}

template <typename T, int TILE>
__global__ void __launch_bounds__(kAttnThreads)
    forward_kernel(const AttentionParams p, const T* __restrict__ q, const T* __restrict__ k,
                   const T* __restrict__ v, const void* __restrict__ mask, T* __restrict__ out,
                   acc_t<T>* __restrict__ lse) {
  using A = acc_t<T>;
  unsigned char* const smem_raw = dynamic_smem();
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.v_dim);
  A* qs = reinterpret_cast<A*>(smem_raw);  // [TILE][D]
  A* ks = qs + TILE * D;                   // [TILE][D]
  A* vs = ks + TILE * D;                   // [TILE][Dv]
  A* os = vs + TILE * Dv;                  // [TILE][Dv] output accumulator
  A* ss = os + TILE * Dv;                  // [TILE][TILE] scores, then probabilities
  A* m = ss + TILE * TILE;                 // [TILE] running max
  A* l = m + TILE;                         // [TILE] running sum
  A* alpha = l + TILE;                     // [TILE] rescale of this step

  const int64_t tiles = (p.q_len + TILE - 1) / TILE;
  const int64_t bh = blockIdx.x / tiles, b = bh / p.heads, h = bh % p.heads, hk = h / p.group();
  const int64_t i0 = (blockIdx.x % tiles) * TILE;
  const T* qh = q + b * p.q_stride[0] + h * p.q_stride[1];
  const T* kh = k + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* vh = v + b * p.v_stride[0] + hk * p.v_stride[1];
  const int64_t mask_base = b * p.mask_stride[0] + h * p.mask_stride[1];

  load_tile<T, A>(qs, qh + i0 * p.q_stride[2], p.q_stride[2], 0, TILE, p.q_len - i0, D);
  for (int idx = threadIdx.x; idx < TILE * Dv; idx += blockDim.x) os[idx] = A(0);
  for (int r = threadIdx.x; r < TILE; r += blockDim.x) {
    m[r] = neg_inf<A>();
    l[r] = A(0);
  }
  const int64_t key_end = p.causal ? min64(p.kv_len, i0 + TILE) : p.kv_len;
  for (int64_t j0 = 0; j0 < key_end; j0 += TILE) {
    __syncthreads();  // the previous tile's K, V and probabilities are consumed
    load_tile<T, A>(ks, kh, p.k_stride[2], j0, TILE, p.kv_len, D);
    load_tile<T, A>(vs, vh, p.v_stride[2], j0, TILE, p.kv_len, Dv);
    __syncthreads();
    for (int idx = threadIdx.x; idx < TILE * TILE; idx += blockDim.x) {
      const int r = idx / TILE, c = idx % TILE;
      ss[idx] = masked_score<T, A>(p, qs + r * D, ks + c * D, mask, mask_base, i0 + r, j0 + c);
    }
    __syncthreads();
    for (int r = threadIdx.x; r < TILE; r += blockDim.x) {  // online softmax, one row each
      A* sr = ss + r * TILE;
      A m_new = m[r];
      // A NaN score makes the row NaN (fmax would drop it and give a finite row).
      for (int c = 0; c < TILE; ++c) m_new = sr[c] > m_new || isnan(sr[c]) ? sr[c] : m_new;
      if (m_new == neg_inf<A>()) {  // nothing visible yet: keep m, l, acc
        for (int c = 0; c < TILE; ++c) sr[c] = A(0);
        alpha[r] = A(1);
        continue;
      }
      const A a = exp_acc(m[r] - m_new);
      A sum = A(0);
      for (int c = 0; c < TILE; ++c) {
        const A e = exp_acc(sr[c] - m_new);
        sum += e;
        sr[c] = e * dropout_factor<A>(p, static_cast<uint32_t>(bh), i0 + r, j0 + c);
      }
      l[r] = l[r] * a + sum;
      m[r] = m_new;
      alpha[r] = a;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < TILE * Dv; idx += blockDim.x) {  // acc = acc a + P V
      const int r = idx / Dv, d = idx % Dv;
      A sum = A(0);
      for (int c = 0; c < TILE; ++c) sum += ss[r * TILE + c] * vs[c * Dv + d];
      os[idx] = os[idx] * alpha[r] + sum;
    }
  }
  __syncthreads();
  T* oh = out + b * p.o_stride[0] + h * p.o_stride[1];
  for (int idx = threadIdx.x; idx < TILE * Dv; idx += blockDim.x) {
    const int r = idx / Dv, d = idx % Dv;
    const int64_t i = i0 + r;
    if (i < p.q_len) {
      // A fully masked row (l = 0) gives zeros and lse = -inf, a NaN l NaN for both.
      const A inv = l[r] == A(0) ? A(0) : A(1) / l[r];
      oh[i * p.o_stride[2] + d] = from_acc<T>(os[idx] * inv);
    }
  }
  for (int r = threadIdx.x; r < TILE; r += blockDim.x) {
    const int64_t i = i0 + r;
    if (i < p.q_len) {
      lse[bh * p.q_len + i] = l[r] == A(0) ? neg_inf<A>() : m[r] + log_acc(l[r]);
    }
  }
}

// delta_i = dO_i . out_i, one thread per row (dO and out dense).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    delta_kernel(const AttentionParams p, const T* __restrict__ dout, const T* __restrict__ out,
                 acc_t<T>* __restrict__ delta) {
  using A = acc_t<T>;
  const int64_t rows = p.batch * p.heads * p.q_len;
  for (int64_t row = first_item<int64_t>(); row < rows; row += grid_step<int64_t>()) {
    const int64_t bh = row / p.q_len, i = row % p.q_len, b = bh / p.heads, h = bh % p.heads;
    const T* g = dout + b * p.do_stride[0] + h * p.do_stride[1] + i * p.do_stride[2];
    const T* o = out + b * p.o_stride[0] + h * p.o_stride[1] + i * p.o_stride[2];
    // In double: ds = p (dp - delta) cancels, and a float sum's rounding error would go
    // straight into every ds of the row.
    double sum = 0;
    for (int64_t d = 0; d < p.v_dim; ++d) {
      sum += static_cast<double>(to_acc(g[d])) * static_cast<double>(to_acc(o[d]));
    }
    delta[row] = static_cast<A>(sum);
  }
}

// For query row r (of the tile at i0) and key c (tile at j0): the probability p without
// dropout, from the saved lse (0 in a fully masked row).
template <typename T, typename A>
__device__ __forceinline__ A probability(const AttentionParams& p, const A* qrow, const A* krow,
                                         const void* mask, int64_t mask_base, int64_t i,
                                         int64_t j, A lse_i) {
  if (i >= p.q_len || lse_i == neg_inf<A>()) return A(0);
  const A s = masked_score<T, A>(p, qrow, krow, mask, mask_base, i, j);
  return s == neg_inf<A>() ? A(0) : exp_acc(s - lse_i);
}

template <typename T, int TILE>
__global__ void __launch_bounds__(kAttnThreads)
    dkdv_kernel(const AttentionParams p, const T* __restrict__ dout, const T* __restrict__ q,
                const T* __restrict__ k, const T* __restrict__ v, const void* __restrict__ mask,
                const acc_t<T>* __restrict__ lse, const acc_t<T>* __restrict__ delta,
                T* __restrict__ dk, T* __restrict__ dv) {
  using A = acc_t<T>;
  unsigned char* const smem_raw = dynamic_smem();
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.v_dim);
  A* ks = reinterpret_cast<A*>(smem_raw);  // [TILE][D]
  A* vs = ks + TILE * D;                   // [TILE][Dv]
  A* dks = vs + TILE * Dv;                 // [TILE][D]
  A* dvs = dks + TILE * D;                 // [TILE][Dv]
  A* qs = dvs + TILE * Dv;                 // [TILE][D]
  A* gs = qs + TILE * D;                   // [TILE][Dv] dO
  A* ps = gs + TILE * Dv;                  // [TILE][TILE] p z (rows: queries)
  A* dss = ps + TILE * TILE;               // [TILE][TILE] ds
  A* lse_s = dss + TILE * TILE;            // [TILE]
  A* delta_s = lse_s + TILE;               // [TILE]

  const int64_t tiles = (p.kv_len + TILE - 1) / TILE;
  const int64_t bhk = blockIdx.x / tiles, b = bhk / p.kv_heads, hk = bhk % p.kv_heads;
  const int64_t j0 = (blockIdx.x % tiles) * TILE;
  load_tile<T, A>(ks, k + b * p.k_stride[0] + hk * p.k_stride[1], p.k_stride[2], j0, TILE,
                  p.kv_len, D);
  load_tile<T, A>(vs, v + b * p.v_stride[0] + hk * p.v_stride[1], p.v_stride[2], j0, TILE,
                  p.kv_len, Dv);
  for (int idx = threadIdx.x; idx < TILE * D; idx += blockDim.x) dks[idx] = A(0);
  for (int idx = threadIdx.x; idx < TILE * Dv; idx += blockDim.x) dvs[idx] = A(0);

  const int64_t group = p.group();
  // Causal: query rows before j0 see none of these keys.
  const int64_t first = p.causal ? (min64(j0, p.q_len) / TILE) * TILE : 0;
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t bh = b * p.heads + h;
    const T* qh = q + b * p.q_stride[0] + h * p.q_stride[1];
    const T* gh = dout + b * p.do_stride[0] + h * p.do_stride[1];
    const int64_t mask_base = b * p.mask_stride[0] + h * p.mask_stride[1];
    for (int64_t i0 = first; i0 < p.q_len; i0 += TILE) {
      __syncthreads();  // the previous tile's Q, dO, p and ds are consumed
      load_tile<T, A>(qs, qh, p.q_stride[2], i0, TILE, p.q_len, D);
      load_tile<T, A>(gs, gh, p.do_stride[2], i0, TILE, p.q_len, Dv);
      for (int r = threadIdx.x; r < TILE; r += blockDim.x) {
        const int64_t i = i0 + r;
        lse_s[r] = i < p.q_len ? lse[bh * p.q_len + i] : neg_inf<A>();
        delta_s[r] = i < p.q_len ? delta[bh * p.q_len + i] : A(0);
      }
      __syncthreads();
      for (int idx = threadIdx.x; idx < TILE * TILE; idx += blockDim.x) {
        const int r = idx / TILE, c = idx % TILE;
        const int64_t i = i0 + r, j = j0 + c;
        const A pr = probability<T, A>(p, qs + r * D, ks + c * D, mask, mask_base, i, j,
                                       lse_s[r]);
        A dp = A(0);
        if (pr != A(0)) {
          for (int d = 0; d < Dv; ++d) dp += gs[r * Dv + d] * vs[c * Dv + d];
        }
        const A z = pr != A(0) ? dropout_factor<A>(p, static_cast<uint32_t>(bh), i, j) : A(0);
        ps[idx] = pr * z;
        // A masked score (p = 0) passes no gradient, even when the row's delta is NaN.
        dss[idx] = pr == A(0) ? A(0) : pr * (dp * z - delta_s[r]);
      }
      __syncthreads();
      for (int idx = threadIdx.x; idx < TILE * Dv; idx += blockDim.x) {  // dV += (p z)^T dO
        const int c = idx / Dv, d = idx % Dv;
        A sum = A(0);
        for (int r = 0; r < TILE; ++r) sum += ps[r * TILE + c] * gs[r * Dv + d];
        dvs[idx] += sum;
      }
      for (int idx = threadIdx.x; idx < TILE * D; idx += blockDim.x) {  // dK += ds^T Q
        const int c = idx / D, d = idx % D;
        A sum = A(0);
        for (int r = 0; r < TILE; ++r) sum += dss[r * TILE + c] * qs[r * D + d];
        dks[idx] += sum;
      }
    }
  }
  __syncthreads();
  const A scale = static_cast<A>(p.scale);
  const int64_t base = bhk * p.kv_len;
  for (int idx = threadIdx.x; idx < TILE * D; idx += blockDim.x) {
    const int c = idx / D, d = idx % D;
    if (j0 + c < p.kv_len) dk[(base + j0 + c) * D + d] = from_acc<T>(dks[idx] * scale);
  }
  for (int idx = threadIdx.x; idx < TILE * Dv; idx += blockDim.x) {
    const int c = idx / Dv, d = idx % Dv;
    if (j0 + c < p.kv_len) dv[(base + j0 + c) * Dv + d] = from_acc<T>(dvs[idx]);
  }
}

template <typename T, int TILE>
__global__ void __launch_bounds__(kAttnThreads)
    dq_kernel(const AttentionParams p, const T* __restrict__ dout, const T* __restrict__ q,
              const T* __restrict__ k, const T* __restrict__ v, const void* __restrict__ mask,
              const acc_t<T>* __restrict__ lse, const acc_t<T>* __restrict__ delta,
              T* __restrict__ dq) {
  using A = acc_t<T>;
  unsigned char* const smem_raw = dynamic_smem();
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.v_dim);
  A* qs = reinterpret_cast<A*>(smem_raw);  // [TILE][D]
  A* gs = qs + TILE * D;                   // [TILE][Dv] dO
  A* dqs = gs + TILE * Dv;                 // [TILE][D]
  A* ks = dqs + TILE * D;                  // [TILE][D]
  A* vs = ks + TILE * D;                   // [TILE][Dv]
  A* dss = vs + TILE * Dv;                 // [TILE][TILE]
  A* lse_s = dss + TILE * TILE;            // [TILE]
  A* delta_s = lse_s + TILE;               // [TILE]

  const int64_t tiles = (p.q_len + TILE - 1) / TILE;
  const int64_t bh = blockIdx.x / tiles, b = bh / p.heads, h = bh % p.heads, hk = h / p.group();
  const int64_t i0 = (blockIdx.x % tiles) * TILE;
  const T* kh = k + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* vh = v + b * p.v_stride[0] + hk * p.v_stride[1];
  const int64_t mask_base = b * p.mask_stride[0] + h * p.mask_stride[1];
  load_tile<T, A>(qs, q + b * p.q_stride[0] + h * p.q_stride[1], p.q_stride[2], i0, TILE,
                  p.q_len, D);
  load_tile<T, A>(gs, dout + b * p.do_stride[0] + h * p.do_stride[1], p.do_stride[2], i0, TILE,
                  p.q_len, Dv);
  for (int idx = threadIdx.x; idx < TILE * D; idx += blockDim.x) dqs[idx] = A(0);
  for (int r = threadIdx.x; r < TILE; r += blockDim.x) {
    const int64_t i = i0 + r;
    lse_s[r] = i < p.q_len ? lse[bh * p.q_len + i] : neg_inf<A>();
    delta_s[r] = i < p.q_len ? delta[bh * p.q_len + i] : A(0);
  }
  const int64_t key_end = p.causal ? min64(p.kv_len, i0 + TILE) : p.kv_len;
  for (int64_t j0 = 0; j0 < key_end; j0 += TILE) {
    __syncthreads();
    load_tile<T, A>(ks, kh, p.k_stride[2], j0, TILE, p.kv_len, D);
    load_tile<T, A>(vs, vh, p.v_stride[2], j0, TILE, p.kv_len, Dv);
    __syncthreads();
    for (int idx = threadIdx.x; idx < TILE * TILE; idx += blockDim.x) {
      const int r = idx / TILE, c = idx % TILE;
      const int64_t i = i0 + r, j = j0 + c;
      const A pr = probability<T, A>(p, qs + r * D, ks + c * D, mask, mask_base, i, j,
                                     lse_s[r]);
      A ds = A(0);
      if (pr != A(0)) {
        A dp = A(0);
        for (int d = 0; d < Dv; ++d) dp += gs[r * Dv + d] * vs[c * Dv + d];
        ds = pr * (dp * dropout_factor<A>(p, static_cast<uint32_t>(bh), i, j) - delta_s[r]);
      }
      dss[idx] = ds;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < TILE * D; idx += blockDim.x) {  // dQ += ds K
      const int r = idx / D, d = idx % D;
      A sum = A(0);
      for (int c = 0; c < TILE; ++c) sum += dss[r * TILE + c] * ks[c * D + d];
      dqs[idx] += sum;
    }
  }
  __syncthreads();
  const A scale = static_cast<A>(p.scale);
  for (int idx = threadIdx.x; idx < TILE * D; idx += blockDim.x) {
    const int r = idx / D, d = idx % D;
    if (i0 + r < p.q_len) dq[(bh * p.q_len + i0 + r) * D + d] = from_acc<T>(dqs[idx] * scale);
  }
}

// Shared memory of each kernel for a tile size, in elements of the accumulation type.
int64_t forward_smem(int tile, const AttentionParams& p) {
  return int64_t{tile} * (2 * p.head_dim + 2 * p.v_dim) + int64_t{tile} * tile + 3 * tile;
}
int64_t dkdv_smem(int tile, const AttentionParams& p) {
  return int64_t{tile} * (3 * p.head_dim + 3 * p.v_dim) + 2 * int64_t{tile} * tile + 2 * tile;
}
int64_t dq_smem(int tile, const AttentionParams& p) {
  return int64_t{tile} * (3 * p.head_dim + 2 * p.v_dim) + int64_t{tile} * tile + 2 * tile;
}

// Launches kernel<T, TILE> for the largest TILE in {32, 16, 8} whose shared memory fits, on
// a 1-D grid of heads * ceil(len / TILE) blocks, one head's tiles adjacent (a second grid
// axis would cap len at 65535 tiles).
template <typename Launch>
cudaError_t with_tile(int64_t (*smem_of)(int, const AttentionParams&), const AttentionParams& p,
                      size_t elem_bytes, int64_t len, int64_t heads, Launch&& launch) {
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  for (int tile : {32, 16, 8}) {
    const int64_t bytes = smem_of(tile, p) * static_cast<int64_t>(elem_bytes);
    const int64_t blocks = (len + tile - 1) / tile * heads;
    if (bytes > optin) continue;
    if (blocks > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidConfiguration;
    const dim3 grid_tiles(static_cast<unsigned int>(blocks));
    switch (tile) {
      case 32: return launch(std::integral_constant<int, 32>{}, grid_tiles, bytes);
      case 16: return launch(std::integral_constant<int, 16>{}, grid_tiles, bytes);
      default: return launch(std::integral_constant<int, 8>{}, grid_tiles, bytes);
    }
  }
  return cudaErrorInvalidConfiguration;  // head dims <= 256 always fit at TILE = 8
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int64_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

template <typename T>
cudaError_t forward_typed(const AttentionParams& p, const void* q, const void* k, const void* v,
                          const void* mask, void* out, void* lse, cudaStream_t stream) {
  const int64_t bh = p.batch * p.heads;
  if (bh == 0 || p.q_len == 0) return cudaSuccess;
  return with_tile(forward_smem, p, sizeof(acc_t<T>), p.q_len, bh,
                   [&](auto tile, dim3 grid, int64_t bytes) {
    constexpr int TILE = decltype(tile)::value;
    const auto kernel = forward_kernel<T, TILE>;
    cudaError_t err = allow_smem(kernel, bytes);
    if (err != cudaSuccess) return err;
    launch_kernel(kernel, grid, kAttnThreads, bytes, stream, p, static_cast<const T*>(q),
                  static_cast<const T*>(k), static_cast<const T*>(v), mask, static_cast<T*>(out),
                  static_cast<acc_t<T>*>(lse));
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t backward_typed(const AttentionParams& p, const void* dout, const void* q,
                           const void* k, const void* v, const void* out, const void* lse,
                           const void* mask, void* delta, void* dq, void* dk, void* dv,
                           cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t rows = p.batch * p.heads * p.q_len;
  if (rows > 0) {
    launch_kernel(delta_kernel<T>, blocks_for(rows), kThreads, 0, stream, p,
                  static_cast<const T*>(dout), static_cast<const T*>(out), static_cast<A*>(delta));
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int64_t bhk = p.batch * p.kv_heads;
  if (bhk > 0 && p.kv_len > 0) {
    cudaError_t err = with_tile(dkdv_smem, p, sizeof(A), p.kv_len, bhk,
                                [&](auto tile, dim3 grid, int64_t bytes) {
      constexpr int TILE = decltype(tile)::value;
      const auto kernel = dkdv_kernel<T, TILE>;
      cudaError_t e = allow_smem(kernel, bytes);
      if (e != cudaSuccess) return e;
      launch_kernel(kernel, grid, kAttnThreads, bytes, stream, p, static_cast<const T*>(dout),
                    static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                    mask, static_cast<const A*>(lse), static_cast<const A*>(delta),
                    static_cast<T*>(dk), static_cast<T*>(dv));
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  if (rows > 0) {
    return with_tile(dq_smem, p, sizeof(A), p.q_len, p.batch * p.heads,
                     [&](auto tile, dim3 grid, int64_t bytes) {
      constexpr int TILE = decltype(tile)::value;
      const auto kernel = dq_kernel<T, TILE>;
      cudaError_t e = allow_smem(kernel, bytes);
      if (e != cudaSuccess) return e;
      launch_kernel(kernel, grid, kAttnThreads, bytes, stream, p, static_cast<const T*>(dout),
                    static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                    mask, static_cast<const A*>(lse), static_cast<const A*>(delta),
                    static_cast<T*>(dq));
      return cudaGetLastError();
    });
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t attention_forward(DType dtype, const AttentionParams& p, const void* q,
                              const void* k, const void* v, const void* mask, void* out,
                              void* lse, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return forward_typed<float>(p, q, k, v, mask, out, lse, stream);
    case DType::Float64: return forward_typed<double>(p, q, k, v, mask, out, lse, stream);
    case DType::Float16: return forward_typed<__half>(p, q, k, v, mask, out, lse, stream);
    case DType::BFloat16:
      return forward_typed<__nv_bfloat16>(p, q, k, v, mask, out, lse, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t attention_backward(DType dtype, const AttentionParams& p, const void* dout,
                               const void* q, const void* k, const void* v, const void* out,
                               const void* lse, const void* mask, void* delta, void* dq,
                               void* dk, void* dv, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32:
      return backward_typed<float>(p, dout, q, k, v, out, lse, mask, delta, dq, dk, dv, stream);
    case DType::Float64:
      return backward_typed<double>(p, dout, q, k, v, out, lse, mask, delta, dq, dk, dv, stream);
    case DType::Float16:
      return backward_typed<__half>(p, dout, q, k, v, out, lse, mask, delta, dq, dk, dv, stream);
    case DType::BFloat16:
      return backward_typed<__nv_bfloat16>(p, dout, q, k, v, out, lse, mask, delta, dq, dk, dv,
                                           stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dlcv_fast::cuda
