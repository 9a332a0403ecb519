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
// These are the plain CUDA-core kernels (one scalar FMA per product): correct for every
// shape and dtype; the launchers pick the largest TILE whose shared memory fits the device.
// The float16 / bfloat16 forward with head dims that are multiples of 16 runs instead on
// tensor cores (forward_tc_kernel, below); the backward has no tensor-core version yet.

#include <cuda_runtime.h>
#include <mma.h>

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

// Whether query i sees key j: false for keys past S, rows past L (whose mask entries do not
// exist) and, under causal, keys after the query.
__device__ __forceinline__ bool visible(const AttentionParams& p, int64_t i, int64_t j) {
  return i < p.q_len && j < p.kv_len && !(p.causal && j > i);
}

// Score s_ij from the dot product q_i . k_j of a visible pair: scaled, then masked.
template <typename T, typename A>
__device__ __forceinline__ A score(const AttentionParams& p, A dot, const void* mask,
                                   int64_t mask_base, int64_t i, int64_t j) {
  A s = dot * static_cast<A>(p.scale);
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

// Score s_ij of one query row (in shared memory) and one key row (shared); -inf where not
// visible.
template <typename T, typename A>
__device__ __forceinline__ A masked_score(const AttentionParams& p, const A* qrow, const A* krow,
                                          const void* mask, int64_t mask_base, int64_t i,
                                          int64_t j) {
  if (!visible(p, i, j)) return neg_inf<A>();
  A dot = A(0);
  for (int d = 0; d < p.head_dim; ++d) dot += qrow[d] * krow[d];
  return score<T, A>(p, dot, mask, mask_base, i, j);
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

// ---- tensor-core forward: float16 and bfloat16, head dims multiples of 16 ---------------
//
// A block of kTcWarps warps owns kTcRows query rows, 16 per warp, and streams the keys in
// tiles of kTcKeys. Per key tile, each warp: S = Q K^T for its 16 rows on WMMA (16x16x16,
// float accumulators) into shared memory; the online softmax of its rows, two lanes per row,
// writing P in the element type (as FlashAttention feeds P V) and each row's rescale alpha;
// then O = O alpha + P V, O in shared memory as float (a WMMA accumulator's rows are opaque,
// so the rescale happens there, between a store and a load). The warps share only the K and
// V tiles; everything else is a warp's own rows, ordered by __syncwarp.
constexpr int kTcWarps = 4, kTcRows = 16 * kTcWarps, kTcKeys = 64;

// Shared-memory layout of the tensor-core forward, in bytes; rows padded by 16 bytes (8 or
// 4 elements) against bank conflicts, arrays on 128-byte boundaries (WMMA wants 32).
struct TcLayout {
  int ldq, ldv, lds, ldp, ldo;  // leading dimensions (elements) of Q/K, V, S, P, O
  size_t q, k, v, s, p, o, stats, bytes;

  __host__ __device__ TcLayout(int d, int dv, int elem) {
    ldq = d + 8;
    ldv = dv + 8;
    lds = kTcKeys + 4;
    ldp = kTcKeys + 8;
    ldo = dv + 4;
    size_t at = 0;
    const auto take = [&at](size_t n) {
      const size_t here = at;
      at += (n + 127) / 128 * 128;
      return here;
    };
    q = take(size_t(kTcRows) * ldq * elem);
    k = take(size_t(kTcKeys) * ldq * elem);
    v = take(size_t(kTcKeys) * ldv * elem);
    s = take(size_t(kTcRows) * lds * sizeof(float));
    p = take(size_t(kTcRows) * ldp * elem);
    o = take(size_t(kTcRows) * ldo * sizeof(float));
    stats = take(3 * size_t(kTcRows) * sizeof(float));  // m, l, alpha
    bytes = at;
  }
};

bool tc_forward_fits(const AttentionParams& p) {
  return p.head_dim % 16 == 0 && p.v_dim % 16 == 0 && p.head_dim <= 256 && p.v_dim <= 256;
}

// rows x cols elements at src (row stride `stride`) into shared memory (leading dimension
// ld), zero past row `valid`: the block's threads, consecutive ones along a row.
template <typename T>
__device__ __forceinline__ void load_rows(T* dst, int ld, const T* src, int64_t stride,
                                          int64_t first_row, int rows, int64_t valid, int cols) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int r = idx / cols, c = idx % cols;
    const int64_t row = first_row + r;
    dst[r * ld + c] = row < valid ? src[row * stride + c] : from_acc<T>(0.0f);
  }
}

// NaN-propagating max (a NaN score makes its row NaN, as the reference does).
__device__ __forceinline__ float max_nan(float a, float b) { return b > a || isnan(b) ? b : a; }

template <typename T>
__global__ void __launch_bounds__(kTcWarps * 32)
    forward_tc_kernel(const AttentionParams p, const T* __restrict__ q, const T* __restrict__ k,
                      const T* __restrict__ v, const void* __restrict__ mask,
                      T* __restrict__ out, float* __restrict__ lse) {
  namespace wmma = nvcuda::wmma;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragKt = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
  using FragV = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.v_dim);
  const TcLayout lay(D, Dv, sizeof(T));
  unsigned char* const smem = dynamic_smem();
  T* const qs = reinterpret_cast<T*>(smem + lay.q);
  T* const ks = reinterpret_cast<T*>(smem + lay.k);
  T* const vs = reinterpret_cast<T*>(smem + lay.v);
  float* const ss = reinterpret_cast<float*>(smem + lay.s);
  T* const ps = reinterpret_cast<T*>(smem + lay.p);
  float* const os = reinterpret_cast<float*>(smem + lay.o);
  float* const m = reinterpret_cast<float*>(smem + lay.stats);
  float* const l = m + kTcRows;
  float* const alpha = l + kTcRows;

  const int64_t tiles = (p.q_len + kTcRows - 1) / kTcRows;
  const int64_t bh = blockIdx.x / tiles, b = bh / p.heads, h = bh % p.heads, hk = h / p.group();
  const int64_t i0 = (blockIdx.x % tiles) * kTcRows;
  const T* kh = k + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* vh = v + b * p.v_stride[0] + hk * p.v_stride[1];
  const int64_t mask_base = b * p.mask_stride[0] + h * p.mask_stride[1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r0 = warp * 16;  // the warp's rows

  load_rows(qs, lay.ldq, q + b * p.q_stride[0] + h * p.q_stride[1], p.q_stride[2], i0, kTcRows,
            p.q_len, D);
  for (int idx = threadIdx.x; idx < kTcRows * Dv; idx += blockDim.x) {
    os[(idx / Dv) * lay.ldo + idx % Dv] = 0.0f;
  }
  for (int r = threadIdx.x; r < kTcRows; r += blockDim.x) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  __syncthreads();  // other warps' threads set some of this warp's rows
  // Two lanes per row: lane 2r' + half takes keys [half * 32, half * 32 + 32) of row r0 + r'.
  const int r = r0 + lane / 2, half = lane % 2;
  const int64_t i = i0 + r;
  const int64_t key_end = p.causal ? min64(p.kv_len, i0 + kTcRows) : p.kv_len;
  for (int64_t j0 = 0; j0 < key_end; j0 += kTcKeys) {
    __syncthreads();  // every warp is done with the previous K and V tiles
    load_rows(ks, lay.ldq, kh, p.k_stride[2], j0, kTcKeys, p.kv_len, D);
    load_rows(vs, lay.ldv, vh, p.v_stride[2], j0, kTcKeys, p.kv_len, Dv);
    __syncthreads();

    for (int n = 0; n < kTcKeys / 16; ++n) {  // S = Q K^T, the warp's 16 rows
      FragC acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int kk = 0; kk < D; kk += 16) {
        FragA a;
        FragKt bt;
        wmma::load_matrix_sync(a, qs + r0 * lay.ldq + kk, lay.ldq);
        wmma::load_matrix_sync(bt, ks + n * 16 * lay.ldq + kk, lay.ldq);
        wmma::mma_sync(acc, a, bt, acc);
      }
      wmma::store_matrix_sync(ss + r0 * lay.lds + n * 16, acc, lay.lds, wmma::mem_row_major);
    }
    __syncwarp();

    float* const sr = ss + r * lay.lds + half * 32;
    float row_max = -INFINITY;
    for (int c = 0; c < 32; ++c) {
      const int64_t j = j0 + half * 32 + c;
      sr[c] = visible(p, i, j) ? score<T, float>(p, sr[c], mask, mask_base, i, j) : -INFINITY;
      row_max = max_nan(row_max, sr[c]);
    }
    const float m_new = max_nan(max_nan(m[r], row_max), __shfl_xor_sync(0xffffffffu, row_max, 1));
    T* const pr = ps + r * lay.ldp + half * 32;
    float sum = 0.0f, a = 1.0f;
    if (m_new == -INFINITY) {  // nothing visible yet: keep m, l and O
      for (int c = 0; c < 32; ++c) pr[c] = from_acc<T>(0.0f);
    } else {
      a = expf(m[r] - m_new);
      for (int c = 0; c < 32; ++c) {
        const float e = expf(sr[c] - m_new);
        sum += e;
        pr[c] = from_acc<T>(e * dropout_factor<float>(p, static_cast<uint32_t>(bh), i,
                                                      j0 + half * 32 + c));
      }
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    __syncwarp();  // both lanes of the row have read m[r]
    if (half == 0) {
      if (m_new != -INFINITY) {
        l[r] = l[r] * a + sum;
        m[r] = m_new;
      }
      alpha[r] = a;
    }
    __syncwarp();

    for (int idx = lane; idx < 16 * Dv; idx += 32) {  // O = O alpha + P V
      const int rr = r0 + idx / Dv;
      os[rr * lay.ldo + idx % Dv] *= alpha[rr];
    }
    __syncwarp();
    for (int n = 0; n < Dv / 16; ++n) {
      FragC acc;
      wmma::load_matrix_sync(acc, os + r0 * lay.ldo + n * 16, lay.ldo, wmma::mem_row_major);
      for (int kk = 0; kk < kTcKeys; kk += 16) {
        FragA a;
        FragV bv;
        wmma::load_matrix_sync(a, ps + r0 * lay.ldp + kk, lay.ldp);
        wmma::load_matrix_sync(bv, vs + kk * lay.ldv + n * 16, lay.ldv);
        wmma::mma_sync(acc, a, bv, acc);
      }
      wmma::store_matrix_sync(os + r0 * lay.ldo + n * 16, acc, lay.ldo, wmma::mem_row_major);
    }
  }
  __syncwarp();

  T* oh = out + b * p.o_stride[0] + h * p.o_stride[1];
  for (int idx = lane; idx < 16 * Dv; idx += 32) {
    const int rr = r0 + idx / Dv, d = idx % Dv;
    const int64_t row = i0 + rr;
    if (row < p.q_len) {
      // A fully masked row (l = 0) gives zeros and lse = -inf, a NaN l NaN for both.
      const float inv = l[rr] == 0.0f ? 0.0f : 1.0f / l[rr];
      oh[row * p.o_stride[2] + d] = from_acc<T>(os[rr * lay.ldo + d] * inv);
    }
  }
  if (half == 0 && i < p.q_len) {
    lse[bh * p.q_len + i] = l[r] == 0.0f ? -INFINITY : m[r] + logf(l[r]);
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
// The shared memory a block may have on the current device, opted in.
cudaError_t smem_optin(int* bytes) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
}

template <typename Launch>
cudaError_t with_tile(int64_t (*smem_of)(int, const AttentionParams&), const AttentionParams& p,
                      size_t elem_bytes, int64_t len, int64_t heads, Launch&& launch) {
  int optin = 0;
  const cudaError_t err = smem_optin(&optin);
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

// The tensor-core forward where it applies (16-bit types, head dims multiples of 16, its
// shared memory within the device's: D = Dv = 256 needs 195 KiB, more than an A100 has);
// false in `launched` otherwise.
template <typename T>
cudaError_t forward_tc(const AttentionParams& p, const void* q, const void* k, const void* v,
                       const void* mask, void* out, void* lse, cudaStream_t stream,
                       bool* launched) {
  *launched = false;
  if constexpr (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) {
    if (!tc_forward_fits(p)) return cudaSuccess;
    const TcLayout lay(static_cast<int>(p.head_dim), static_cast<int>(p.v_dim), sizeof(T));
    int optin = 0;
    cudaError_t err = smem_optin(&optin);
    if (err != cudaSuccess || lay.bytes > static_cast<size_t>(optin)) return err;
    const int64_t blocks = (p.q_len + kTcRows - 1) / kTcRows * p.batch * p.heads;
    if (blocks > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidConfiguration;
    const auto kernel = forward_tc_kernel<T>;
    err = allow_smem(kernel, static_cast<int64_t>(lay.bytes));
    if (err != cudaSuccess) return err;
    *launched = true;
    launch_kernel(kernel, dim3(static_cast<unsigned>(blocks)), kTcWarps * 32, lay.bytes, stream,
                  p, static_cast<const T*>(q), static_cast<const T*>(k),
                  static_cast<const T*>(v), mask, static_cast<T*>(out), static_cast<float*>(lse));
    return cudaGetLastError();
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t forward_typed(const AttentionParams& p, const void* q, const void* k, const void* v,
                          const void* mask, void* out, void* lse, cudaStream_t stream) {
  const int64_t bh = p.batch * p.heads;
  if (bh == 0 || p.q_len == 0) return cudaSuccess;
  bool launched = false;
  const cudaError_t err = forward_tc<T>(p, q, k, v, mask, out, lse, stream, &launched);
  if (err != cudaSuccess || launched) return err;
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
