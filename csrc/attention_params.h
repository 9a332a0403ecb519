// Fused scaled-dot-product attention, shared by the host entry points and the CPU and CUDA
// kernels. Plain C++: no torch header.
//
// For batch b, query head h (key/value head h / (heads / kv_heads)), query row i, key j:
//   s_ij = scale * q_i . k_j + mask_ij      (bool mask: 0 where true, -inf where false;
//                                            causal: -inf where j > i)
//   lse_i = log sum_j exp(s_ij),  p_ij = exp(s_ij - lse_i)
//   out_i = sum_j p_ij z_ij v_j             (z_ij = keep_ij / (1 - dropout_p), else 1)
// A row whose every s_ij is -inf gives out_i = 0, lse_i = -inf and no gradient.
//
// Backward, with delta_i = dO_i . out_i:
//   dv_j = sum_i p_ij z_ij dO_i,   dp_ij = z_ij dO_i . v_j,   ds_ij = p_ij (dp_ij - delta_i)
//   dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i   (summed over a GQA group)
#pragma once

#include <cstdint>

#include "dtype.h"

#if defined(__CUDACC__)
#define DLCV_FAST_HD __host__ __device__ __forceinline__
#else
#define DLCV_FAST_HD inline
#endif

namespace dlcv_fast {

enum class MaskKind : int32_t { None = 0, Bool = 1, Additive = 2 };

struct AttentionParams {
  int64_t batch, heads, kv_heads;  // heads % kv_heads == 0
  int64_t q_len, kv_len;           // L, S
  int64_t head_dim, v_dim;         // D (query, key), Dv (value, output)
  // Element strides of (batch, head, row) of each tensor; the last dimension is dense.
  int64_t q_stride[3], k_stride[3], v_stride[3];
  int64_t o_stride[3];   // out, and grad_out in the backward pass (host makes both dense)
  int64_t do_stride[3];
  // Element strides of the mask over (batch, head, row, key); 0 along broadcast dims.
  int64_t mask_stride[4];
  MaskKind mask_kind;    // Bool: 1-byte bools; Additive: the inputs' element type
  bool causal;
  double scale;
  // Dropout: element (b, h, i, j) is kept where keep_bits(...) >= dropout_threshold, with
  // dropout_threshold = round(dropout_p * 2^24); kept values are scaled by 1 / (1 - p).
  double dropout_p;
  uint32_t dropout_threshold;
  uint32_t seed;

  DLCV_FAST_HD int64_t group() const { return heads / kv_heads; }
};

// The dropout hash: 32-bit integer arithmetic, identical in C++, CUDA and Triton (and in the
// torch formula of dlcv_fast.ops.attention.dropout_keep_mask). murmur3's finaliser mixes.

DLCV_FAST_HD uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// Per (seed, b * heads + h, i): the row's key; then per key j: 24 random bits.
DLCV_FAST_HD uint32_t dropout_row_key(uint32_t seed, uint32_t bh, uint32_t i) {
  return fmix32(fmix32(seed + 0x9E3779B9u * (bh + 1u)) ^ i);
}

DLCV_FAST_HD uint32_t dropout_bits(uint32_t row_key, uint32_t j) {
  return fmix32(row_key + 0x27D4EB2Fu * (j + 1u)) >> 8;
}

#undef DLCV_FAST_HD

}  // namespace dlcv_fast
