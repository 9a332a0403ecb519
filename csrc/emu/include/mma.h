// nvcuda::wmma for the CPU emulation (cuda_emu.h). Every lane of a warp holds the whole
// 16 x 16 (x K) matrix of a fragment, so mma_sync computes the full product in each lane:
// slow, but the kernel's use of fragments (load, elementwise, mma, store) means the same.
// Loads and stores check WMMA's rules: 256-bit aligned pointers, ldm a multiple of
// 16 bytes.
#pragma once

#include "../cuda_emu.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

template <typename T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int kRows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int kCols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr bool kColMajor = std::is_same_v<Layout, col_major>;
  static constexpr int num_elements = kRows * kCols;
  using element_type = typename storage<T>::type;
  element_type x[num_elements];  // row-major (r * kCols + c)
};

inline float __float_to_tf32(float x) { return ::dlcv_fast::emu::round_to_tf32(x); }

namespace detail {

template <typename E>
void check(const char* what, const void* ptr, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) {
    ::dlcv_fast::emu::fail("wmma::%s: pointer %p is not 256-bit aligned", what, ptr);
  }
  if ((ldm * sizeof(E)) % 16 != 0) {
    ::dlcv_fast::emu::fail("wmma::%s: ldm %u is not a multiple of 16 bytes", what, ldm);
  }
}

inline float value(float v) { return v; }
inline float value(__half v) { return __half2float(v); }
inline float value(__nv_bfloat16 v) { return __bfloat162float(v); }

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename L, typename E>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const E* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  detail::check<E>("load_matrix_sync", p, ldm);
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c)
      f.x[r * F::kCols + c] = F::kColMajor ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K, typename E>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const E* p, unsigned ldm,
                      layout_t layout) {
  detail::check<E>("load_matrix_sync", p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.x[r * N + c] = layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
}

template <int M, int N, int K, typename E>
void store_matrix_sync(E* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t layout) {
  detail::check<E>("store_matrix_sync", p, ldm);
  // Every lane holds the same values: lane 0 stores them all, when it gets here. Without a
  // __syncwarp between this store and other lanes' reads, those reads see stale memory in
  // one of the two thread orders, as they may on a GPU.
  if (::dlcv_fast::emu::lane() == 0) {
    for (int r = 0; r < M; ++r)
      for (int c = 0; c < N; ++c)
        (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * N + c];
  }
}

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, V v) {
  for (auto& e : f.x) e = static_cast<typename fragment<Use, M, N, K, T, L>::element_type>(v);
}

// d = a b + c, products and sums in float; computed by the first lane of the warp to make
// the call, copied by the others (their operands compared byte for byte).
template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d,
              const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  ::dlcv_fast::emu::MmaMemo& memo = ::dlcv_fast::emu::next_mma_memo();
  const size_t bytes = sizeof a.x + sizeof b.x + sizeof c.x;
  unsigned char operands[sizeof a.x + sizeof b.x + sizeof c.x];
  std::memcpy(operands, a.x, sizeof a.x);
  std::memcpy(operands + sizeof a.x, b.x, sizeof b.x);
  std::memcpy(operands + sizeof a.x + sizeof b.x, c.x, sizeof c.x);
  if (memo.operands.size() == bytes && std::memcmp(memo.operands.data(), operands, bytes) == 0) {
    std::memcpy(d.x, memo.product.data(), sizeof d.x);
    return;
  }
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.x[i * N + j];
      for (int k = 0; k < K; ++k) {
        s += detail::value(a.x[i * K + k]) * detail::value(b.x[k * N + j]);
      }
      out[i * N + j] = s;
    }
  std::memcpy(d.x, out, sizeof out);
  memo.operands.assign(operands, operands + bytes);
  memo.product.assign(out, out + M * N);
}

}  // namespace nvcuda::wmma
