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
// float16 / bfloat16 with head dims that are multiples of 16 run instead on tensor cores:
// where D = Dv is 32, 64, 96 or 128 (the forward also 256) on mma.sync with the scores in
// registers (the *_mma_kernel below), else on WMMA with the scores in shared memory, the
// forward up to head dim 256, the backward up to 128 (the *_tc_kernel).

#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"
#include "mma_sync.cuh"

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

// What a block of a grid over (batch * heads) x query tiles of `rows` rows (one head's tiles
// adjacent) works on: head bh = b * heads + h, first row i0, the head's mask base, and the
// keys and values of its key/value head.
template <typename T>
struct QueryBlock {
  int64_t bh, b, h, i0, mask_base;
  const T* kh;
  const T* vh;
};

template <typename T>
__device__ __forceinline__ QueryBlock<T> query_block(const AttentionParams& p, int rows,
                                                     const T* k, const T* v) {
  const int64_t tiles = (p.q_len + rows - 1) / rows;
  const int64_t bh = blockIdx.x / tiles, b = bh / p.heads, h = bh % p.heads, hk = h / p.group();
  return {bh, b, h, (blockIdx.x % tiles) * rows, b * p.mask_stride[0] + h * p.mask_stride[1],
          k + b * p.k_stride[0] + hk * p.k_stride[1], v + b * p.v_stride[0] + hk * p.v_stride[1]};
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

  const auto [bh, b, h, i0, mask_base, kh, vh] = query_block(p, TILE, k, v);
  const T* qh = q + b * p.q_stride[0] + h * p.q_stride[1];

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

// ---- tensor cores: float16 and bfloat16, head dims multiples of 16 ----------------------
//
// A block has kTcWarps warps and works on tiles of kTcTile query rows and kTcTile keys; a
// warp owns 16 of the tile's rows (queries for scores, keys for dK and dV). Products run on
// WMMA fragments (16x16x16, float accumulators) between shared-memory tiles; the elementwise
// steps (softmax, dS) take two lanes per row, 32 keys each. P and dS enter their products in
// the element type, as FlashAttention feeds them.
//   forward  per key tile: S = Q K^T; the online softmax of each row, giving P and the
//            rescale alpha; O = O alpha + P V, with O in shared memory as float (a fragment's
//            rows are opaque, so the rescale happens between a store and a load; the
//            mma.sync kernel, which knows its fragments' rows, keeps S, P and O in
//            registers).
//   dK, dV   a block per key tile, looping over the group's heads and the query tiles:
//            S = Q K^T, dP = dO V^T, then P z and dS; dV += (P z)^T dO, dK += dS^T Q.
//   dQ       a block per query tile, looping over the key tiles: S, dP, dS; dQ += dS K.
// Warps share the tiles loaded from global memory (and, for dK and dV, the P z and dS of
// every query row); the rest is a warp's own rows, ordered by __syncwarp.
constexpr int kTcWarps = 4, kTcTile = 16 * kTcWarps;
constexpr int kTcThreads = kTcWarps * 32;

// Shared-memory offsets: each array on a 128-byte boundary (WMMA wants 32 bytes).
struct SmemPlan {
  size_t bytes = 0;
  __host__ __device__ size_t take(size_t n) {
    const size_t at = bytes;
    bytes += (n + 127) / 128 * 128;
    return at;
  }
};

// Leading dimensions (elements) of the tiles: rows padded by 16 bytes against bank
// conflicts. Q and K rows hold D elements, V and dO rows Dv, S and dP rows kTcTile floats.
struct TcLd {
  int qk, vo, s, p, acc_qk, acc_vo;  // 16-bit tiles, float tiles (S, P's elements, dQ/dK, O/dV)
  __host__ __device__ TcLd(int d, int dv)
      : qk(d + 8), vo(dv + 8), s(kTcTile + 4), p(kTcTile + 8), acc_qk(d + 4), acc_vo(dv + 4) {}
};

struct TcForwardLayout {
  TcLd ld;
  size_t q, k, v, s, p, o, stats, bytes;
  __host__ __device__ TcForwardLayout(int d, int dv, int elem) : ld(d, dv) {
    SmemPlan plan;
    q = plan.take(size_t(kTcTile) * ld.qk * elem);
    k = plan.take(size_t(kTcTile) * ld.qk * elem);
    v = plan.take(size_t(kTcTile) * ld.vo * elem);
    s = plan.take(size_t(kTcTile) * ld.s * sizeof(float));
    p = plan.take(size_t(kTcTile) * ld.p * elem);
    o = plan.take(size_t(kTcTile) * ld.acc_vo * sizeof(float));
    stats = plan.take(3 * size_t(kTcTile) * sizeof(float));  // m, l, alpha
    bytes = plan.bytes;
  }
};

// Both backward kernels: the four input tiles, S, dP, dS and the row statistics; dK and dV
// (with P z) or dQ.
struct TcBackwardLayout {
  TcLd ld;
  size_t q, g, k, v, s, dp, ds, pz, dk, dv, dq, stats, bytes;
  __host__ __device__ TcBackwardLayout(int d, int dv_, int elem, bool key_tiles) : ld(d, dv_) {
    SmemPlan plan;
    q = plan.take(size_t(kTcTile) * ld.qk * elem);
    g = plan.take(size_t(kTcTile) * ld.vo * elem);
    k = plan.take(size_t(kTcTile) * ld.qk * elem);
    v = plan.take(size_t(kTcTile) * ld.vo * elem);
    s = plan.take(size_t(kTcTile) * ld.s * sizeof(float));
    dp = plan.take(size_t(kTcTile) * ld.s * sizeof(float));
    ds = plan.take(size_t(kTcTile) * ld.p * elem);
    pz = key_tiles ? plan.take(size_t(kTcTile) * ld.p * elem) : 0;
    dk = key_tiles ? plan.take(size_t(kTcTile) * ld.acc_qk * sizeof(float)) : 0;
    dv = key_tiles ? plan.take(size_t(kTcTile) * ld.acc_vo * sizeof(float)) : 0;
    dq = key_tiles ? 0 : plan.take(size_t(kTcTile) * ld.acc_qk * sizeof(float));
    stats = plan.take(2 * size_t(kTcTile) * sizeof(float));  // lse, delta
    bytes = plan.bytes;
  }
};

// The backward's arrays in the block's shared memory (pz, dk and dv null in the dQ kernel,
// dq null in the dK / dV kernel).
template <typename T>
struct TcBackwardTiles {
  T *q, *g, *k, *v, *ds, *pz;
  float *s, *dp, *dk, *dv, *dq, *lse, *delta;
  __device__ TcBackwardTiles(unsigned char* smem, const TcBackwardLayout& lay, bool key_tiles) {
    q = reinterpret_cast<T*>(smem + lay.q);
    g = reinterpret_cast<T*>(smem + lay.g);
    k = reinterpret_cast<T*>(smem + lay.k);
    v = reinterpret_cast<T*>(smem + lay.v);
    ds = reinterpret_cast<T*>(smem + lay.ds);
    pz = key_tiles ? reinterpret_cast<T*>(smem + lay.pz) : nullptr;
    s = reinterpret_cast<float*>(smem + lay.s);
    dp = reinterpret_cast<float*>(smem + lay.dp);
    dk = key_tiles ? reinterpret_cast<float*>(smem + lay.dk) : nullptr;
    dv = key_tiles ? reinterpret_cast<float*>(smem + lay.dv) : nullptr;
    dq = key_tiles ? nullptr : reinterpret_cast<float*>(smem + lay.dq);
    lse = reinterpret_cast<float*>(smem + lay.stats);
    delta = lse + kTcTile;
  }
};

// 16-bit types and head dims that are multiples of 16; the backward's tiles fit in shared
// memory up to 128.
bool tc_head_dims(const AttentionParams& p, int64_t most) {
  return p.head_dim % 16 == 0 && p.v_dim % 16 == 0 && p.head_dim <= most && p.v_dim <= most;
}

// C (16 x n, float, shared) = [C +] A (16 x k) B (k x n) for one warp on 16x16x16 fragments.
// A and B are 16-bit tiles in shared memory, each row- or column-major.
template <typename T, typename LayoutA, typename LayoutB>
__device__ __forceinline__ void warp_gemm(float* c, int ldc, const T* a, int lda, const T* b,
                                          int ldb, int n, int k, bool accumulate) {
  namespace wmma = nvcuda::wmma;
  constexpr bool kARows = std::is_same_v<LayoutA, wmma::row_major>;
  constexpr bool kBRows = std::is_same_v<LayoutB, wmma::row_major>;
  for (int n0 = 0; n0 < n; n0 += 16) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (accumulate) {
      wmma::load_matrix_sync(acc, c + n0, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.0f);
    }
    for (int k0 = 0; k0 < k; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb;
      wmma::load_matrix_sync(fa, kARows ? a + k0 : a + k0 * lda, lda);
      wmma::load_matrix_sync(fb, kBRows ? b + k0 * ldb + n0 : b + n0 * ldb + k0, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + n0, acc, ldc, wmma::mem_row_major);
  }
}

using RowMajor = nvcuda::wmma::row_major;
using ColMajor = nvcuda::wmma::col_major;

// rows x cols elements at src (row stride `stride`) into shared memory (leading dimension
// ld), zero past row `valid`, by the block's threads: 16-byte cp.async copies where every
// row is 16-byte aligned (they land at the caller's wait), else element by element.
template <typename T>
__device__ __forceinline__ void copy_rows(T* dst, int ld, const T* src, int64_t stride,
                                          int64_t first_row, int rows, int64_t valid, int cols) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  if (cols % V == 0 && ld % V == 0 && stride % V == 0 &&
      reinterpret_cast<uintptr_t>(src) % 16 == 0) {  // the same for every thread
    const int vecs = cols / V;
    for (int idx = threadIdx.x; idx < rows * vecs; idx += blockDim.x) {
      const int r = idx / vecs, c = idx % vecs * V;
      const int64_t row = first_row + r;
      const bool ok = row < valid;
      async_copy<16>(dst + r * ld + c, ok ? src + row * stride + c : src, ok);
    }
    return;
  }
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int r = idx / cols, c = idx % cols;
    const int64_t row = first_row + r;
    dst[r * ld + c] = row < valid ? src[row * stride + c] : from_acc<T>(0.0f);
  }
}

// This thread's copies so far have landed (a barrier then shows them to the block).
__device__ __forceinline__ void copies_landed() {
  async_copy_commit();
  async_copy_wait<0>();
}

// rows x cols floats of shared memory (leading dimension ld) set to zero.
__device__ __forceinline__ void zero_rows(float* dst, int ld, int rows, int cols) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    dst[(idx / cols) * ld + idx % cols] = 0.0f;
  }
}

// NaN-propagating max (a NaN score makes its row NaN, as the reference does).
__device__ __forceinline__ float max_nan(float a, float b) { return b > a || isnan(b) ? b : a; }

template <typename T>
__global__ void __launch_bounds__(kTcThreads)
    forward_tc_kernel(const AttentionParams p, const T* __restrict__ q, const T* __restrict__ k,
                      const T* __restrict__ v, const void* __restrict__ mask,
                      T* __restrict__ out, float* __restrict__ lse) {
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.v_dim);
  const TcForwardLayout lay(D, Dv, sizeof(T));
  const TcLd& ld = lay.ld;
  unsigned char* const smem = dynamic_smem();
  T* const qs = reinterpret_cast<T*>(smem + lay.q);
  T* const ks = reinterpret_cast<T*>(smem + lay.k);
  T* const vs = reinterpret_cast<T*>(smem + lay.v);
  float* const ss = reinterpret_cast<float*>(smem + lay.s);
  T* const ps = reinterpret_cast<T*>(smem + lay.p);
  float* const os = reinterpret_cast<float*>(smem + lay.o);
  float* const m = reinterpret_cast<float*>(smem + lay.stats);
  float* const l = m + kTcTile;
  float* const alpha = l + kTcTile;

  const auto [bh, b, h, i0, mask_base, kh, vh] = query_block(p, kTcTile, k, v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int r0 = warp * 16;  // the warp's rows

  // K and V tiles take turns in flight: V lands while S = Q K^T and the softmax are
  // computed, the next K while O += P V is (the schedule of FlashAttention-2).
  const int64_t key_end = p.causal ? min64(p.kv_len, i0 + kTcTile) : p.kv_len;
  copy_rows(qs, ld.qk, q + b * p.q_stride[0] + h * p.q_stride[1], p.q_stride[2], i0, kTcTile,
            p.q_len, D);
  if (key_end > 0) copy_rows(ks, ld.qk, kh, p.k_stride[2], 0, kTcTile, p.kv_len, D);
  zero_rows(os, ld.acc_vo, kTcTile, Dv);
  for (int r = threadIdx.x; r < kTcTile; r += blockDim.x) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }
  __syncthreads();  // other warps' threads set some of this warp's rows
  // Lane 2 r' + half takes keys [32 half, 32 half + 32) of row r0 + r'.
  const int r = r0 + lane / 2, half = lane % 2;
  const int64_t i = i0 + r;
  for (int64_t j0 = 0; j0 < key_end; j0 += kTcTile) {
    copies_landed();  // this tile's K (and, the first time, Q)
    __syncthreads();  // ... seen by every warp, and every warp is done with the previous V
    copy_rows(vs, ld.vo, vh, p.v_stride[2], j0, kTcTile, p.kv_len, Dv);
    async_copy_commit();
    warp_gemm<T, RowMajor, ColMajor>(ss + r0 * ld.s, ld.s, qs + r0 * ld.qk, ld.qk, ks, ld.qk,
                                     kTcTile, D, false);  // S = Q K^T
    __syncwarp();

    float* const sr = ss + r * ld.s + half * 32;
    float row_max = -INFINITY;
    for (int c = 0; c < 32; ++c) {
      const int64_t j = j0 + half * 32 + c;
      sr[c] = visible(p, i, j) ? score<T, float>(p, sr[c], mask, mask_base, i, j) : -INFINITY;
      row_max = max_nan(row_max, sr[c]);
    }
    const float m_new = max_nan(max_nan(m[r], row_max), __shfl_xor_sync(0xffffffffu, row_max, 1));
    T* const pr = ps + r * ld.p + half * 32;
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
      os[rr * ld.acc_vo + idx % Dv] *= alpha[rr];
    }
    async_copy_wait<0>();  // this tile's V
    __syncthreads();       // ... seen by every warp, and every warp is done with this K
    if (j0 + kTcTile < key_end) {
      copy_rows(ks, ld.qk, kh, p.k_stride[2], j0 + kTcTile, kTcTile, p.kv_len, D);
    }
    async_copy_commit();
    warp_gemm<T, RowMajor, RowMajor>(os + r0 * ld.acc_vo, ld.acc_vo, ps + r0 * ld.p, ld.p, vs,
                                     ld.vo, Dv, kTcTile, true);
  }
  copies_landed();  // Q, where there was no key tile
  __syncwarp();

  T* oh = out + b * p.o_stride[0] + h * p.o_stride[1];
  for (int idx = lane; idx < 16 * Dv; idx += 32) {
    const int rr = r0 + idx / Dv, d = idx % Dv;
    const int64_t row = i0 + rr;
    if (row < p.q_len) {
      // A fully masked row (l = 0) gives zeros and lse = -inf, a NaN l NaN for both.
      const float inv = l[rr] == 0.0f ? 0.0f : 1.0f / l[rr];
      oh[row * p.o_stride[2] + d] = from_acc<T>(os[rr * ld.acc_vo + d] * inv);
    }
  }
  if (half == 0 && i < p.q_len) {
    lse[bh * p.q_len + i] = l[r] == 0.0f ? -INFINITY : m[r] + logf(l[r]);
  }
}

// ---- tensor cores on registers (mma.sync): float16 and bfloat16, D = Dv in 32..256 -------
//
// Each warp keeps its 16 rows' scores, probabilities and accumulators in registers, so S and
// P never pass through shared memory, which holds only the operand tiles. A lane holds, of
// rows g and g + 8 of its warp's 16 (lane = 4 g + t), columns 8 n + 2 t and 8 n + 2 t + 1 of
// every 8-column block n (mma_sync.cuh); two adjacent blocks of a product's accumulators,
// rounded to the element type, are the A operand of the next product.
constexpr int kMmaKeys = 64;  // columns of a score tile: 8 blocks, 32 accumulators a lane
static_assert(kMmaKeys == kTcTile, "the mma kernels' shared tiles all have kTcTile rows");

// Equal query and value head dims of 32, 64, 96, 128 (or 256, the forward's), up to `most`.
bool mma_head_dims(const AttentionParams& p, int64_t most) {
  const int64_t d = p.head_dim;
  return d == p.v_dim && d <= most && ((d % 32 == 0 && d <= 128) || d == 256);
}

// acc (16 x 8 N) += A B^T, A's 16 rows and B's 8 N rows in shared memory ([row][k], leading
// dimensions lda and ldb, K = 16 KS): S = Q K^T, dP = dO V^T, and their transposes.
template <typename T, int KS, int N>
__device__ __forceinline__ void mma_abt(float (&acc)[N][4], const T* a, int lda, const T* b,
                                        int ldb) {
#pragma unroll
  for (int kk = 0; kk < KS * 16; kk += 16) {
    uint32_t af[4];
    load_a<true>(af, a, lda, 0, kk);
#pragma unroll
    for (int n = 0; n < N; n += 2) {
      uint32_t bf[4];
      load_b2<true>(bf, b, ldb, n * 8, kk);
      mma_16816<T>(acc[n], af, {bf[0], bf[1]});
      mma_16816<T>(acc[n + 1], af, {bf[2], bf[3]});
    }
  }
}

// acc (16 x 8 N) += A B, A in registers (KA k-steps of 16), B's 16 KA rows in shared memory
// ([k][n], leading dimension ldb): O += P V, dQ += dS K, dV += (P z)^T dO, dK += dS^T Q.
template <typename T, int KA, int N>
__device__ __forceinline__ void mma_ab(float (&acc)[N][4], const uint32_t (&a)[KA][4], const T* b,
                                       int ldb) {
#pragma unroll
  for (int kk = 0; kk < KA; ++kk) {
#pragma unroll
    for (int n = 0; n < N; n += 2) {
      uint32_t bf[4];
      load_b2<false>(bf, b, ldb, n * 8, kk * 16);
      mma_16816<T>(acc[n], a[kk], {bf[0], bf[1]});
      mma_16816<T>(acc[n + 1], a[kk], {bf[2], bf[3]});
    }
  }
}

// Accumulators (16 x 8 N) as A operands (N / 2 k-steps) in the element type.
template <typename T, int N>
__device__ __forceinline__ void to_a_operand(uint32_t (&a)[N / 2][4], const float (&acc)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
    a[n / 2][(n % 2) * 2] = pack2<T>(acc[n][0], acc[n][1]);
    a[n / 2][(n % 2) * 2 + 1] = pack2<T>(acc[n][2], acc[n][3]);
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
}

// Column of accumulator c of block n of the lane (its row: g + 8 (c / 2)).
__device__ __forceinline__ int acc_col(int n, int c) {
  return n * 8 + 2 * (threadIdx.x % 4) + c % 2;
}

// The lane's accumulators of its row g + 8 x (x = 0, 1), times `scale`, into `row`.
template <typename T, int N>
__device__ __forceinline__ void store_row(T* row, const float (&acc)[N][4], int x, float scale) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
    row[acc_col(n, 0)] = from_acc<T>(acc[n][2 * x] * scale);
    row[acc_col(n, 1)] = from_acc<T>(acc[n][2 * x + 1] * scale);
  }
}

size_t mma_tile_bytes(int d, int elem) { return static_cast<size_t>(kTcTile) * (d + 8) * elem; }

// The forward: Q stays in shared memory; K and V tiles are copied by cp.async while the
// other is multiplied (V during S = Q K^T and the softmax, the next K during O += P V).
template <typename T, int D>
__global__ void __launch_bounds__(kTcThreads)
    forward_mma_kernel(const AttentionParams p, const T* __restrict__ q, const T* __restrict__ k,
                       const T* __restrict__ v, const void* __restrict__ mask, T* __restrict__ out,
                       float* __restrict__ lse) {
  constexpr int kLd = D + 8;  // 16-byte pad: an ldmatrix's 8 rows fall in distinct banks
  constexpr int kBlocks = kMmaKeys / 8;
  T* const qs = reinterpret_cast<T*>(dynamic_smem());
  T* const ks = qs + kTcTile * kLd;
  T* const vs = ks + kMmaKeys * kLd;

  const auto [bh, b, h, i0, mask_base, kh, vh] = query_block(p, kTcTile, k, v);
  const int r0 = threadIdx.x / 32 * 16, g = threadIdx.x % 32 / 4;
  const int64_t rows[2] = {i0 + r0 + g, i0 + r0 + g + 8};
  const int64_t key_end = p.causal ? min64(p.kv_len, i0 + kTcTile) : p.kv_len;
  copy_rows(qs, kLd, q + b * p.q_stride[0] + h * p.q_stride[1], p.q_stride[2], i0, kTcTile, p.q_len,
            D);
  if (key_end > 0) copy_rows(ks, kLd, kh, p.k_stride[2], 0, kMmaKeys, p.kv_len, D);

  float o[D / 8][4];
  zero(o);
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};
  for (int64_t j0 = 0; j0 < key_end; j0 += kMmaKeys) {
    copies_landed();  // this tile's K (and, the first time, Q)
    __syncthreads();  // ... seen by every warp, and every warp is done with the previous V
    copy_rows(vs, kLd, vh, p.v_stride[2], j0, kMmaKeys, p.kv_len, D);
    async_copy_commit();
    float s[kBlocks][4];
    zero(s);
    mma_abt<T, D / 16>(s, qs + r0 * kLd, kLd, ks, kLd);

    // Online softmax; a row's four lanes (the same g) combine maxima and sums by shuffles.
    float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kBlocks; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t i = rows[c / 2], j = j0 + acc_col(n, c);
        s[n][c] = visible(p, i, j) ? score<T, float>(p, s[n][c], mask, mask_base, i, j) : -INFINITY;
        row_max[c / 2] = max_nan(row_max[c / 2], s[n][c]);
      }
    float alpha[2], m_new[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      row_max[x] = max_nan(row_max[x], __shfl_xor_sync(0xffffffffu, row_max[x], 1));
      row_max[x] = max_nan(row_max[x], __shfl_xor_sync(0xffffffffu, row_max[x], 2));
      m_new[x] = max_nan(m_run[x], row_max[x]);
      alpha[x] = m_new[x] == -INFINITY ? 1.0f : expf(m_run[x] - m_new[x]);
    }
#pragma unroll
    for (int n = 0; n < kBlocks; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int x = c / 2;
        const float e = m_new[x] == -INFINITY ? 0.0f : expf(s[n][c] - m_new[x]);
        sum[x] += e;
        s[n][c] =
            e * dropout_factor<float>(p, static_cast<uint32_t>(bh), rows[x], j0 + acc_col(n, c));
      }
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      sum[x] += __shfl_xor_sync(0xffffffffu, sum[x], 1);
      sum[x] += __shfl_xor_sync(0xffffffffu, sum[x], 2);
      if (m_new[x] != -INFINITY) {
        l_run[x] = l_run[x] * alpha[x] + sum[x];
        m_run[x] = m_new[x];
      }
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) o[n][c] *= alpha[c / 2];
    uint32_t pf[kBlocks / 2][4];
    to_a_operand<T>(pf, s);

    async_copy_wait<0>();  // this tile's V
    __syncthreads();       // ... seen by every warp, and every warp is done with this K
    if (j0 + kMmaKeys < key_end) {
      copy_rows(ks, kLd, kh, p.k_stride[2], j0 + kMmaKeys, kMmaKeys, p.kv_len, D);
    }
    async_copy_commit();
    mma_ab<T>(o, pf, vs, kLd);
  }
  copies_landed();  // Q, where there was no key tile

  T* const oh = out + b * p.o_stride[0] + h * p.o_stride[1];
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    if (rows[x] >= p.q_len) continue;
    // A fully masked row (l = 0) gives zeros and lse = -inf, a NaN l NaN for both.
    store_row<T>(oh + rows[x] * p.o_stride[2], o, x, l_run[x] == 0.0f ? 0.0f : 1.0f / l_run[x]);
    if (threadIdx.x % 4 == 0) {
      lse[bh * p.q_len + rows[x]] = l_run[x] == 0.0f ? -INFINITY : m_run[x] + logf(l_run[x]);
    }
  }
}

// The backward's elementwise step for one score: from the dot product q_i . k_j (in `s`) and
// dP_ij (in `dp`) to P_ij z_ij (in `s`) and dS_ij = P_ij (dP_ij z_ij - delta_i) (in `dp`). P
// is 0 where the pair is not visible or masked, and in a fully masked row (lse = -inf).
template <typename T>
__device__ __forceinline__ void grad_score(const AttentionParams& p, const void* mask,
                                           int64_t mask_base, uint32_t bh, int64_t i, int64_t j,
                                           float lse_i, float delta_i, float& s, float& dp) {
  float pr = 0.0f;
  if (i < p.q_len && lse_i != -INFINITY && visible(p, i, j)) {
    const float x = score<T, float>(p, s, mask, mask_base, i, j);
    pr = x == -INFINITY ? 0.0f : expf(x - lse_i);
  }
  const float z = pr != 0.0f ? dropout_factor<float>(p, bh, i, j) : 0.0f;
  s = pr * z;
  // A masked score (p = 0) passes no gradient, even when the row's delta is NaN.
  dp = pr == 0.0f ? 0.0f : pr * (dp * z - delta_i);
}

// The backward's common step for one warp and a (query tile i0, key tile j0) pair: S = Q K^T
// and dP = dO V^T for the warp's 16 query rows, then, two lanes per row, P z (if sm.pz) and
// dS = p (dP z - delta) in the element type. The probability p is 0 where the pair is not
// visible or masked, and in a fully masked row (lse = -inf).
template <typename T>
__device__ __forceinline__ void tc_grad_scores(const AttentionParams& p, const TcLd& ld,
                                               const TcBackwardTiles<T>& sm, const void* mask,
                                               int64_t mask_base, uint32_t bh, int64_t i0,
                                               int64_t j0) {
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.v_dim);
  const int r0 = threadIdx.x / 32 * 16, lane = threadIdx.x % 32;
  warp_gemm<T, RowMajor, ColMajor>(sm.s + r0 * ld.s, ld.s, sm.q + r0 * ld.qk, ld.qk, sm.k, ld.qk,
                                   kTcTile, D, false);
  warp_gemm<T, RowMajor, ColMajor>(sm.dp + r0 * ld.s, ld.s, sm.g + r0 * ld.vo, ld.vo, sm.v, ld.vo,
                                   kTcTile, Dv, false);
  __syncwarp();
  const int r = r0 + lane / 2, c0 = lane % 2 * 32;
  const int64_t i = i0 + r;
  const float lse_i = sm.lse[r], delta_i = sm.delta[r];
  for (int c = c0; c < c0 + 32; ++c) {
    float pz = sm.s[r * ld.s + c], ds = sm.dp[r * ld.s + c];
    grad_score<T>(p, mask, mask_base, bh, i, j0 + c, lse_i, delta_i, pz, ds);
    if (sm.pz != nullptr) sm.pz[r * ld.p + c] = from_acc<T>(pz);
    sm.ds[r * ld.p + c] = from_acc<T>(ds);
  }
}

// lse and delta of the query tile at i0 of head bh into shared memory (-inf and 0 past L).
__device__ __forceinline__ void load_row_stats(float* lse_s, float* delta_s, const float* lse,
                                               const float* delta, int64_t bh, int64_t i0,
                                               int64_t q_len) {
  for (int r = threadIdx.x; r < kTcTile; r += blockDim.x) {
    const int64_t i = i0 + r;
    lse_s[r] = i < q_len ? lse[bh * q_len + i] : -INFINITY;
    delta_s[r] = i < q_len ? delta[bh * q_len + i] : 0.0f;
  }
}

// dQ for a block of kTcTile query rows, looping over the key tiles: S = Q K^T, dP = dO V^T,
// dS, dQ += dS K, all in registers; two K buffers, so that the next K tile and then the next
// V tile are copied while this one is used.
template <typename T, int D>
__global__ void __launch_bounds__(kTcThreads)
    dq_mma_kernel(const AttentionParams p, const T* __restrict__ dout, const T* __restrict__ q,
                  const T* __restrict__ k, const T* __restrict__ v, const void* __restrict__ mask,
                  const float* __restrict__ lse, const float* __restrict__ delta,
                  T* __restrict__ dq) {
  constexpr int kLd = D + 8, kBlocks = kMmaKeys / 8;
  T* const qs = reinterpret_cast<T*>(dynamic_smem());
  T* const gs = qs + kTcTile * kLd;
  T* const vs = gs + kTcTile * kLd;
  T* const ks = vs + kMmaKeys * kLd;  // two buffers

  const auto [bh, b, h, i0, mask_base, kh, vh] = query_block(p, kTcTile, k, v);
  const int r0 = threadIdx.x / 32 * 16, g = threadIdx.x % 32 / 4;
  const int64_t rows[2] = {i0 + r0 + g, i0 + r0 + g + 8};
  float lse_r[2], delta_r[2];
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    lse_r[x] = rows[x] < p.q_len ? lse[bh * p.q_len + rows[x]] : -INFINITY;
    delta_r[x] = rows[x] < p.q_len ? delta[bh * p.q_len + rows[x]] : 0.0f;
  }
  const int64_t key_end = p.causal ? min64(p.kv_len, i0 + kTcTile) : p.kv_len;
  copy_rows(qs, kLd, q + b * p.q_stride[0] + h * p.q_stride[1], p.q_stride[2], i0, kTcTile, p.q_len,
            D);
  copy_rows(gs, kLd, dout + b * p.do_stride[0] + h * p.do_stride[1], p.do_stride[2], i0, kTcTile,
            p.q_len, D);
  if (key_end > 0) {
    copy_rows(ks, kLd, kh, p.k_stride[2], 0, kMmaKeys, p.kv_len, D);
    copy_rows(vs, kLd, vh, p.v_stride[2], 0, kMmaKeys, p.kv_len, D);
  }

  float acc[D / 8][4];
  zero(acc);
  for (int64_t j0 = 0, t = 0; j0 < key_end; j0 += kMmaKeys, ++t) {
    const T* const kt = ks + (t % 2) * kMmaKeys * kLd;
    const bool more = j0 + kMmaKeys < key_end;
    copies_landed();  // this tile's K and V (and, the first time, Q and dO)
    __syncthreads();  // ... seen by every warp, and every warp is done with the previous tile
    if (more) {
      copy_rows(ks + ((t + 1) % 2) * kMmaKeys * kLd, kLd, kh, p.k_stride[2], j0 + kMmaKeys,
                kMmaKeys, p.kv_len, D);
    }
    async_copy_commit();
    float s[kBlocks][4], dp[kBlocks][4];
    zero(s);
    zero(dp);
    mma_abt<T, D / 16>(s, qs + r0 * kLd, kLd, kt, kLd);
    mma_abt<T, D / 16>(dp, gs + r0 * kLd, kLd, vs, kLd);
    __syncthreads();  // every warp is done with this V
    if (more) copy_rows(vs, kLd, vh, p.v_stride[2], j0 + kMmaKeys, kMmaKeys, p.kv_len, D);
    async_copy_commit();
#pragma unroll
    for (int n = 0; n < kBlocks; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        grad_score<T>(p, mask, mask_base, static_cast<uint32_t>(bh), rows[c / 2],
                      j0 + acc_col(n, c), lse_r[c / 2], delta_r[c / 2], s[n][c], dp[n][c]);
      }
    uint32_t dsf[kBlocks / 2][4];
    to_a_operand<T>(dsf, dp);
    mma_ab<T>(acc, dsf, kt, kLd);
  }
  copies_landed();  // Q and dO, where there was no key tile

#pragma unroll
  for (int x = 0; x < 2; ++x) {
    if (rows[x] < p.q_len) {
      store_row<T>(dq + (bh * p.q_len + rows[x]) * D, acc, x, static_cast<float>(p.scale));
    }
  }
}

// dK and dV for a block of kTcTile keys, looping over the group's query heads and the query
// tiles; each warp owns 16 keys and computes the transposed scores S^T = K Q^T and
// dP^T = V dO^T, so that (P z)^T and dS^T are A operands of dV += (P z)^T dO and
// dK += dS^T Q. dK and dV take 2 D / 8 accumulators a lane (128 at D = 128); above D = 64
// the query tile goes through in two halves of 32 columns, so that S^T and dP^T take 32
// accumulators instead of 64 and the whole stays within the 255 registers a thread has.
template <typename T, int D>
__global__ void __launch_bounds__(kTcThreads)
    dkdv_mma_kernel(const AttentionParams p, const T* __restrict__ dout, const T* __restrict__ q,
                    const T* __restrict__ k, const T* __restrict__ v, const void* __restrict__ mask,
                    const float* __restrict__ lse, const float* __restrict__ delta,
                    T* __restrict__ dk, T* __restrict__ dv) {
  constexpr int kLd = D + 8, kCols = D <= 64 ? kTcTile : 32, kBlocks = kCols / 8;
  T* const ks = reinterpret_cast<T*>(dynamic_smem());
  T* const vs = ks + kMmaKeys * kLd;
  T* const qs = vs + kMmaKeys * kLd;
  T* const gs = qs + kTcTile * kLd;
  float* const lse_s = reinterpret_cast<float*>(gs + kTcTile * kLd);
  float* const delta_s = lse_s + kTcTile;

  const int64_t tiles = (p.kv_len + kMmaKeys - 1) / kMmaKeys;
  const int64_t bhk = blockIdx.x / tiles, b = bhk / p.kv_heads, hk = bhk % p.kv_heads;
  const int64_t j0 = (blockIdx.x % tiles) * kMmaKeys;
  const int r0 = threadIdx.x / 32 * 16, g = threadIdx.x % 32 / 4;
  const int64_t keys[2] = {j0 + r0 + g, j0 + r0 + g + 8};
  copy_rows(ks, kLd, k + b * p.k_stride[0] + hk * p.k_stride[1], p.k_stride[2], j0, kMmaKeys,
            p.kv_len, D);
  copy_rows(vs, kLd, v + b * p.v_stride[0] + hk * p.v_stride[1], p.v_stride[2], j0, kMmaKeys,
            p.kv_len, D);

  float dk_acc[D / 8][4], dv_acc[D / 8][4];
  zero(dk_acc);
  zero(dv_acc);
  // Causal: query rows before j0 see none of these keys.
  const int64_t first = p.causal ? (min64(j0, p.q_len) / kTcTile) * kTcTile : 0;
  for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
    const int64_t bh = b * p.heads + h;
    const T* const qh = q + b * p.q_stride[0] + h * p.q_stride[1];
    const T* const gh = dout + b * p.do_stride[0] + h * p.do_stride[1];
    const int64_t mask_base = b * p.mask_stride[0] + h * p.mask_stride[1];
    for (int64_t i0 = first; i0 < p.q_len; i0 += kTcTile) {
      __syncthreads();  // every warp is done with the previous Q, dO and statistics
      copy_rows(qs, kLd, qh, p.q_stride[2], i0, kTcTile, p.q_len, D);
      copy_rows(gs, kLd, gh, p.do_stride[2], i0, kTcTile, p.q_len, D);
      load_row_stats(lse_s, delta_s, lse, delta, bh, i0, p.q_len);
      copies_landed();  // (and, the first time, K and V)
      __syncthreads();
#pragma unroll 1
      for (int c0 = 0; c0 < kTcTile; c0 += kCols) {
        float s[kBlocks][4], dp[kBlocks][4];  // transposed: rows are keys, columns queries
        zero(s);
        zero(dp);
        mma_abt<T, D / 16>(s, ks + r0 * kLd, kLd, qs + c0 * kLd, kLd);
        mma_abt<T, D / 16>(dp, vs + r0 * kLd, kLd, gs + c0 * kLd, kLd);
#pragma unroll
        for (int n = 0; n < kBlocks; ++n)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int col = c0 + acc_col(n, c);
            grad_score<T>(p, mask, mask_base, static_cast<uint32_t>(bh), i0 + col, keys[c / 2],
                          lse_s[col], delta_s[col], s[n][c], dp[n][c]);
          }
        uint32_t pf[kBlocks / 2][4], dsf[kBlocks / 2][4];
        to_a_operand<T>(pf, s);
        to_a_operand<T>(dsf, dp);
        mma_ab<T>(dv_acc, pf, gs + c0 * kLd, kLd);
        mma_ab<T>(dk_acc, dsf, qs + c0 * kLd, kLd);
      }
    }
  }
  copies_landed();  // K and V, where there was no query tile

#pragma unroll
  for (int x = 0; x < 2; ++x) {
    if (keys[x] < p.kv_len) {
      store_row<T>(dk + (bhk * p.kv_len + keys[x]) * D, dk_acc, x, static_cast<float>(p.scale));
      store_row<T>(dv + (bhk * p.kv_len + keys[x]) * D, dv_acc, x, 1.0f);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kTcThreads)
    dkdv_tc_kernel(const AttentionParams p, const T* __restrict__ dout, const T* __restrict__ q,
                   const T* __restrict__ k, const T* __restrict__ v,
                   const void* __restrict__ mask, const float* __restrict__ lse,
                   const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv) {
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.v_dim);
  const TcBackwardLayout lay(D, Dv, sizeof(T), true);
  const TcLd& ld = lay.ld;
  const TcBackwardTiles<T> sm(dynamic_smem(), lay, true);

  const int64_t tiles = (p.kv_len + kTcTile - 1) / kTcTile;
  const int64_t bhk = blockIdx.x / tiles, b = bhk / p.kv_heads, hk = bhk % p.kv_heads;
  const int64_t j0 = (blockIdx.x % tiles) * kTcTile;
  copy_rows(sm.k, ld.qk, k + b * p.k_stride[0] + hk * p.k_stride[1], p.k_stride[2], j0, kTcTile,
            p.kv_len, D);
  copy_rows(sm.v, ld.vo, v + b * p.v_stride[0] + hk * p.v_stride[1], p.v_stride[2], j0, kTcTile,
            p.kv_len, Dv);
  zero_rows(sm.dk, ld.acc_qk, kTcTile, D);
  zero_rows(sm.dv, ld.acc_vo, kTcTile, Dv);
  copies_landed();
  __syncthreads();

  const int k0 = threadIdx.x / 32 * 16;  // the warp's keys in dK and dV
  // Causal: query rows before j0 see none of these keys.
  const int64_t first = p.causal ? (min64(j0, p.q_len) / kTcTile) * kTcTile : 0;
  for (int64_t h = hk * p.group(); h < (hk + 1) * p.group(); ++h) {
    const int64_t bh = b * p.heads + h;
    const T* qh = q + b * p.q_stride[0] + h * p.q_stride[1];
    const T* gh = dout + b * p.do_stride[0] + h * p.do_stride[1];
    const int64_t mask_base = b * p.mask_stride[0] + h * p.mask_stride[1];
    for (int64_t i0 = first; i0 < p.q_len; i0 += kTcTile) {
      __syncthreads();  // the previous tile's Q, dO, P z and dS are consumed
      copy_rows(sm.q, ld.qk, qh, p.q_stride[2], i0, kTcTile, p.q_len, D);
      copy_rows(sm.g, ld.vo, gh, p.do_stride[2], i0, kTcTile, p.q_len, Dv);
      load_row_stats(sm.lse, sm.delta, lse, delta, bh, i0, p.q_len);
      copies_landed();
      __syncthreads();
      tc_grad_scores(p, ld, sm, mask, mask_base, static_cast<uint32_t>(bh), i0, j0);
      __syncthreads();  // dK and dV take every warp's rows of P z and dS
      warp_gemm<T, ColMajor, RowMajor>(sm.dv + k0 * ld.acc_vo, ld.acc_vo, sm.pz + k0, ld.p, sm.g,
                                       ld.vo, Dv, kTcTile, true);  // dV += (P z)^T dO
      warp_gemm<T, ColMajor, RowMajor>(sm.dk + k0 * ld.acc_qk, ld.acc_qk, sm.ds + k0, ld.p, sm.q,
                                       ld.qk, D, kTcTile, true);  // dK += dS^T Q
    }
  }
  __syncwarp();
  const float scale = static_cast<float>(p.scale);
  const int lane = threadIdx.x % 32;
  const int64_t base = bhk * p.kv_len + j0;
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int c = k0 + idx / D, d = idx % D;
    if (j0 + c < p.kv_len) dk[(base + c) * D + d] = from_acc<T>(sm.dk[c * ld.acc_qk + d] * scale);
  }
  for (int idx = lane; idx < 16 * Dv; idx += 32) {
    const int c = k0 + idx / Dv, d = idx % Dv;
    if (j0 + c < p.kv_len) dv[(base + c) * Dv + d] = from_acc<T>(sm.dv[c * ld.acc_vo + d]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kTcThreads)
    dq_tc_kernel(const AttentionParams p, const T* __restrict__ dout, const T* __restrict__ q,
                 const T* __restrict__ k, const T* __restrict__ v, const void* __restrict__ mask,
                 const float* __restrict__ lse, const float* __restrict__ delta,
                 T* __restrict__ dq) {
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.v_dim);
  const TcBackwardLayout lay(D, Dv, sizeof(T), false);
  const TcLd& ld = lay.ld;
  const TcBackwardTiles<T> sm(dynamic_smem(), lay, false);

  const auto [bh, b, h, i0, mask_base, kh, vh] = query_block(p, kTcTile, k, v);
  copy_rows(sm.q, ld.qk, q + b * p.q_stride[0] + h * p.q_stride[1], p.q_stride[2], i0, kTcTile,
            p.q_len, D);
  copy_rows(sm.g, ld.vo, dout + b * p.do_stride[0] + h * p.do_stride[1], p.do_stride[2], i0,
            kTcTile, p.q_len, Dv);
  load_row_stats(sm.lse, sm.delta, lse, delta, bh, i0, p.q_len);
  zero_rows(sm.dq, ld.acc_qk, kTcTile, D);

  const int r0 = threadIdx.x / 32 * 16;
  const int64_t key_end = p.causal ? min64(p.kv_len, i0 + kTcTile) : p.kv_len;
  for (int64_t j0 = 0; j0 < key_end; j0 += kTcTile) {
    __syncthreads();  // every warp is done with the previous K and V tiles
    copy_rows(sm.k, ld.qk, kh, p.k_stride[2], j0, kTcTile, p.kv_len, D);
    copy_rows(sm.v, ld.vo, vh, p.v_stride[2], j0, kTcTile, p.kv_len, Dv);
    copies_landed();  // and, the first time, Q and dO
    __syncthreads();
    tc_grad_scores(p, ld, sm, mask, mask_base, static_cast<uint32_t>(bh), i0, j0);
    __syncwarp();
    warp_gemm<T, RowMajor, RowMajor>(sm.dq + r0 * ld.acc_qk, ld.acc_qk, sm.ds + r0 * ld.p, ld.p,
                                     sm.k, ld.qk, D, kTcTile, true);  // dQ += dS K
  }
  copies_landed();  // Q and dO, where there was no key tile
  __syncthreads();  // with no key tile, other warps' threads zeroed this warp's rows
  const float scale = static_cast<float>(p.scale);
  const int lane = threadIdx.x % 32;
  for (int idx = lane; idx < 16 * D; idx += 32) {
    const int rr = r0 + idx / D, d = idx % D;
    if (i0 + rr < p.q_len) {
      dq[(bh * p.q_len + i0 + rr) * D + d] = from_acc<T>(sm.dq[rr * ld.acc_qk + d] * scale);
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

  const auto [bh, b, h, i0, mask_base, kh, vh] = query_block(p, TILE, k, v);
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

template <typename T>
constexpr bool kTensorCoreType = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// Launches kernel on one block per tile of kTcTile rows (queries or keys) of every head, if
// its `bytes` of shared memory fit the device (D = Dv = 256 needs 195 KiB in the forward,
// more than an A100 has); false in `launched` otherwise.
template <typename Kernel, typename... Args>
cudaError_t launch_tc(Kernel kernel, size_t bytes, int64_t len, int64_t heads,
                      cudaStream_t stream, bool* launched, Args... args) {
  *launched = false;
  int optin = 0;
  cudaError_t err = smem_optin(&optin);
  if (err != cudaSuccess || bytes > static_cast<size_t>(optin)) return err;
  const int64_t blocks = (len + kTcTile - 1) / kTcTile * heads;
  if (blocks > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidConfiguration;
  err = allow_smem(kernel, static_cast<int64_t>(bytes));
  if (err != cudaSuccess) return err;
  *launched = true;
  launch_kernel(kernel, dim3(static_cast<unsigned>(blocks)), kTcThreads, bytes, stream, args...);
  return cudaGetLastError();
}

// f(std::integral_constant<int, D>{}) for a head dim d that mma_head_dims(p, kMost) accepts.
template <int kMost, typename F>
cudaError_t with_mma_dim(int64_t d, F&& f) {
  if (d == 32) return f(std::integral_constant<int, 32>{});
  if constexpr (kMost >= 64) {
    if (d == 64) return f(std::integral_constant<int, 64>{});
  }
  if constexpr (kMost >= 96) {
    if (d == 96) return f(std::integral_constant<int, 96>{});
  }
  if constexpr (kMost >= 128) {
    if (d == 128) return f(std::integral_constant<int, 128>{});
  }
  if constexpr (kMost >= 256) {
    if (d == 256) return f(std::integral_constant<int, 256>{});
  }
  return cudaErrorNotSupported;
}

// launch_tc for the mma kernels, whose shared memory (at most 87 KB) fits every sm_80+ GPU.
template <typename Kernel, typename... Args>
cudaError_t launch_mma(Kernel kernel, size_t bytes, int64_t len, int64_t heads, cudaStream_t stream,
                       Args... args) {
  bool launched = false;
  const cudaError_t err = launch_tc(kernel, bytes, len, heads, stream, &launched, args...);
  return err != cudaSuccess || launched ? err : cudaErrorNotSupported;
}

template <typename T>
cudaError_t forward_typed(const AttentionParams& p, const void* q, const void* k, const void* v,
                          const void* mask, void* out, void* lse, cudaStream_t stream) {
  const int64_t bh = p.batch * p.heads;
  if (bh == 0 || p.q_len == 0) return cudaSuccess;
  if constexpr (kTensorCoreType<T>) {
    if (mma_head_dims(p, 256)) {
      // D = 256 takes 99 KB of shared memory, the most an sm_86 or sm_89 block may have;
      // launch_tc reports a device with less, and the next kernel runs instead.
      bool launched = false;
      const cudaError_t err = with_mma_dim<256>(p.head_dim, [&](auto d) {
        constexpr int D = decltype(d)::value;
        return launch_tc(forward_mma_kernel<T, D>, 3 * mma_tile_bytes(D, sizeof(T)), p.q_len, bh,
                         stream, &launched, p, static_cast<const T*>(q), static_cast<const T*>(k),
                         static_cast<const T*>(v), mask, static_cast<T*>(out),
                         static_cast<float*>(lse));
      });
      if (err != cudaSuccess || launched) return err;
    }
    if (tc_head_dims(p, 256)) {
      const TcForwardLayout lay(static_cast<int>(p.head_dim), static_cast<int>(p.v_dim),
                                sizeof(T));
      bool launched = false;
      const cudaError_t err = launch_tc(
          forward_tc_kernel<T>, lay.bytes, p.q_len, bh, stream, &launched, p,
          static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), mask,
          static_cast<T*>(out), static_cast<float*>(lse));
      if (err != cudaSuccess || launched) return err;
    }
  }
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
  const auto in = [](const void* t) { return static_cast<const T*>(t); };
  const auto acc = [](const void* t) { return static_cast<const A*>(t); };
  const int64_t rows = p.batch * p.heads * p.q_len;
  if (rows > 0) {
    launch_kernel(delta_kernel<T>, blocks_for(rows), kThreads, 0, stream, p, in(dout), in(out),
                  static_cast<A*>(delta));
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // Tensor cores where they apply and fit (launched), else the CUDA-core kernels.
  const int d = static_cast<int>(p.head_dim), dv_ = static_cast<int>(p.v_dim);
  const int64_t bhk = p.batch * p.kv_heads;
  if (bhk > 0 && p.kv_len > 0) {
    bool launched = false;
    cudaError_t err = cudaSuccess;
    if constexpr (kTensorCoreType<T>) {
      if (mma_head_dims(p, 128)) {
        launched = true;
        err = with_mma_dim<128>(d, [&](auto dim) {
          constexpr int D = decltype(dim)::value;
          return launch_mma(dkdv_mma_kernel<T, D>,
                            4 * mma_tile_bytes(D, sizeof(T)) + 2 * kTcTile * sizeof(float),
                            p.kv_len, bhk, stream, p, in(dout), in(q), in(k), in(v), mask, acc(lse),
                            acc(delta), static_cast<T*>(dk), static_cast<T*>(dv));
        });
      } else if (tc_head_dims(p, 128)) {
        err = launch_tc(dkdv_tc_kernel<T>, TcBackwardLayout(d, dv_, sizeof(T), true).bytes,
                        p.kv_len, bhk, stream, &launched, p, in(dout), in(q), in(k), in(v), mask,
                        acc(lse), acc(delta), static_cast<T*>(dk), static_cast<T*>(dv));
      }
    }
    if (err == cudaSuccess && !launched) {
      err = with_tile(dkdv_smem, p, sizeof(A), p.kv_len, bhk,
                      [&](auto tile, dim3 grid, int64_t bytes) {
        const auto kernel = dkdv_kernel<T, decltype(tile)::value>;
        cudaError_t e = allow_smem(kernel, bytes);
        if (e != cudaSuccess) return e;
        launch_kernel(kernel, grid, kAttnThreads, bytes, stream, p, in(dout), in(q), in(k),
                      in(v), mask, acc(lse), acc(delta), static_cast<T*>(dk), static_cast<T*>(dv));
        return cudaGetLastError();
      });
    }
    if (err != cudaSuccess) return err;
  }
  if (rows == 0) return cudaSuccess;
  if constexpr (kTensorCoreType<T>) {
    if (mma_head_dims(p, 128)) {
      return with_mma_dim<128>(d, [&](auto dim) {
        constexpr int D = decltype(dim)::value;
        return launch_mma(dq_mma_kernel<T, D>, 5 * mma_tile_bytes(D, sizeof(T)), p.q_len,
                          p.batch * p.heads, stream, p, in(dout), in(q), in(k), in(v), mask,
                          acc(lse), acc(delta), static_cast<T*>(dq));
      });
    }
    if (tc_head_dims(p, 128)) {
      bool launched = false;
      const cudaError_t err =
          launch_tc(dq_tc_kernel<T>, TcBackwardLayout(d, dv_, sizeof(T), false).bytes, p.q_len,
                    p.batch * p.heads, stream, &launched, p, in(dout), in(q), in(k), in(v), mask,
                    acc(lse), acc(delta), static_cast<T*>(dq));
      if (err != cudaSuccess || launched) return err;
    }
  }
  return with_tile(dq_smem, p, sizeof(A), p.q_len, p.batch * p.heads,
                   [&](auto tile, dim3 grid, int64_t bytes) {
    const auto kernel = dq_kernel<T, decltype(tile)::value>;
    cudaError_t e = allow_smem(kernel, bytes);
    if (e != cudaSuccess) return e;
    launch_kernel(kernel, grid, kAttnThreads, bytes, stream, p, in(dout), in(q), in(k), in(v),
                  mask, acc(lse), acc(delta), static_cast<T*>(dq));
    return cudaGetLastError();
  });
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
    default: break;
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
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace dlcv_fast::cuda
