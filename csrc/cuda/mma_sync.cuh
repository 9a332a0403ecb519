// Warp-level tensor-core products on registers (mma.sync.m16n8k16, sm_80 and newer) and the
// shared-memory loads that feed them (ldmatrix), for kernels that keep their tiles in
// registers. Fragment layouts (PTX ISA), with lane = 4 g + t (g = lane / 4, t = lane % 4) and
// two 16-bit elements per 32-bit register, the lower at the lower column (or k):
//   A (16 x 16, row-major)  a[0] = A[g][2t, 2t+1]    a[1] = A[g+8][2t, 2t+1]
//                           a[2] = A[g][2t+8, 2t+9]  a[3] = A[g+8][2t+8, 2t+9]
//   B (16 x 8, k x n)       b[0] = B[2t, 2t+1][g]    b[1] = B[2t+8, 2t+9][g]
//   C (16 x 8, float)       c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// The C layout of two adjacent n-tiles is the A layout of one k-step: a product's
// accumulators become the next product's A operand without leaving the registers.
#pragma once

#include <cstring>

#include "common.cuh"

namespace dlcv_fast::cuda {

// Two elements as one register, `lo` in the lower half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T l = from_acc<T>(lo), h = from_acc<T>(hi);
  uint16_t lb, hb;
  memcpy(&lb, &l, 2);
  memcpy(&hb, &h, 2);
  return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
}

#ifdef DLCV_FAST_CUDA_EMU
namespace emu_mma {
template <typename T>
inline float half_of(uint32_t reg, int upper) {
  const uint16_t bits = static_cast<uint16_t>(upper ? reg >> 16 : reg);
  T v;
  memcpy(&v, &bits, 2);
  return to_acc(v);
}

// The four 8 x 8 matrices of ldmatrix.x4 from the rows that the warp's lanes point at.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
    emu::fail("ldmatrix: row address %p is not 16-byte aligned", row);
  }
  const void* rows[32];
  emu::warp_exchange(&row, rows, sizeof(row));
  const int l = emu::lane(), g = l / 4, t = l % 4;
  for (int j = 0; j < 4; ++j) {
    uint16_t e[2];
    for (int k = 0; k < 2; ++k) {
      const auto* p = static_cast<const uint16_t*>(rows[j * 8 + (trans ? 2 * t + k : g)]);
      e[k] = p[trans ? g : 2 * t + k];
    }
    r[j] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
}

// d += a b for the calling lane's four accumulators, from every lane's a and b.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]}, all[32][6];
  emu::warp_exchange(mine, all, sizeof(mine));
  const int l = emu::lane(), g = l / 4, t = l % 4;
  for (int c = 0; c < 4; ++c) {
    const int m = g + 8 * (c / 2), n = 2 * t + c % 2;
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) {
      const int holder = (k % 8) / 2;  // t of the lanes that hold column (or row) k
      const float av = half_of<T>(all[4 * (m % 8) + holder][(m / 8) + 2 * (k / 8)], k % 2);
      const float bv = half_of<T>(all[4 * n + holder][4 + k / 8], k % 2);
      sum += av * bv;
    }
    d[c] += sum;
  }
}
}  // namespace emu_mma
#endif

// r[j] = the fragment of matrix j (8 x 8 16-bit elements, rows of 16 bytes) whose row
// `lane % 8` the lane points at with `row`, for j = lane / 8: lane l gets row l / 4,
// elements 2 (l % 4) and 2 (l % 4) + 1 (kTrans: the same of the transposed matrix). As an A
// operand: rows 0-7 | 8-15 of columns 0-7, then of 8-15; as B operands of two n-tiles from
// [n][k] rows: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
template <bool kTrans = false>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef DLCV_FAST_CUDA_EMU
  emu_mma::ldmatrix_x4(r, row, kTrans);
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
  }
#endif
}

// Operands from 16-bit matrices in shared memory (rows 16-byte aligned, leading dimension
// ld), stored with k contiguous (kKContiguous: A as [m][k], B as [n][k]; plain ldmatrix) or
// with m / n contiguous (A as [k][m], B as [k][n]; ldmatrix .trans).

// The A operand of rows m0..m0+15, columns k0..k0+15.
template <bool kKContiguous, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* s, int ld, int m0, int k0) {
  const int lane = threadIdx.x % 32, mat = lane / 8, r = lane % 8;
  if constexpr (kKContiguous) {
    ldmatrix_x4(a, s + (m0 + (mat % 2) * 8 + r) * ld + k0 + (mat / 2) * 8);
  } else {
    ldmatrix_x4<true>(a, s + (k0 + (mat / 2) * 8 + r) * ld + m0 + (mat % 2) * 8);
  }
}

// The B operands of columns n0..n0+7 (b[0], b[1]) and n0+8..n0+15 (b[2], b[3]), rows
// k0..k0+15.
template <bool kKContiguous, typename T>
__device__ __forceinline__ void load_b2(uint32_t (&b)[4], const T* s, int ld, int n0, int k0) {
  const int lane = threadIdx.x % 32, mat = lane / 8, r = lane % 8;
  if constexpr (kKContiguous) {
    ldmatrix_x4(b, s + (n0 + (mat / 2) * 8 + r) * ld + k0 + (mat % 2) * 8);
  } else {
    ldmatrix_x4<true>(b, s + (k0 + (mat % 2) * 8 + r) * ld + n0 + (mat / 2) * 8);
  }
}

// d += a b (float accumulators; T = __half or __nv_bfloat16).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
#ifdef DLCV_FAST_CUDA_EMU
  emu_mma::mma_16816<T>(d, a, b);
#else
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

}  // namespace dlcv_fast::cuda
