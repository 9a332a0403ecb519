// Fused attention on the CPU (attention_params.h), compiled once per instruction set: the
// including file defines DLCV_CPU_ISA (the namespace) and, for an extension of x86-64,
// DLCV_CPU_TARGET_PRAGMA. No include guard, on purpose.
//
// The same blocked online softmax as the GPU kernels, as plain loops:
//
//   forward, per (batch, head, block of kQ query rows):
//     m = -inf, l = 0, acc = 0
//     for each tile of kK keys:
//       s = scale * Q K^T + mask                       (kQ x kK, never the whole row)
//       m' = max(m, rowmax s);  p = exp(s - m')
//       l = l exp(m - m') + rowsum p;  acc = acc exp(m - m') + (p * z) V;  m = m'
//     out = acc / l,  lse = m + log l
//
//   backward: delta = rowsum(dO * out); then, recomputing p = exp(s - lse) from the saved
//   lse, one pass per (batch, kv head, key tile) for dK and dV (summing over the query
//   heads of the group) and one per (batch, head, query block) for dQ; or, when there are
//   enough (batch, kv head) pairs for the threads, one pass per pair for all three. Each
//   output element is owned by one task: no atomics, the same result on every run.
//
// Inner loops run along a contiguous dimension (keys of a transposed K tile, or the head
// dimension) so that the compiler vectorises them; arithmetic is in T (float or double).

#include <algorithm>
#include <limits>
#include <memory>

#include "common.h"
#include "../attention_params.h"

#include "isa_begin.h"

namespace dlcv_fast::cpu::DLCV_CPU_ISA {
namespace {

constexpr int64_t kQ = 32;  // query rows per task: Q block and acc stay in L1/L2
constexpr int64_t kK = 64;  // keys per tile: the score tile is kQ x kK

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// exp(x) for x <= 0 (every exponent here is a score minus a row maximum or the row's lse).
// double: the C library. float: exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln(2) / 2,
// exp(r) by its degree-7 Taylor polynomial (truncation below 1e-8, under float rounding),
// branch-free so that the compiler vectorises the loops that call it (the C library's expf
// is scalar, and there is one exp per score: as many as the multiply-adds of a head dim 8).
inline double exp_nonpositive(double x) { return std::exp(x); }

inline float exp_nonpositive(float x) {
  // 2^n stays a normal float. Ternaries, no std::floor and no float-to-int conversion: each
  // of those keeps GCC from vectorising (references, and possible floating-point traps).
  const float xc = x < -87.0f ? -87.0f : (x > 0.0f ? 0.0f : x);
  // Adding 1.5 * 2^23 rounds to an integer n, held in the low mantissa bits of t.
  const float t = xc * 1.44269504f + 12582912.0f;
  const float n = t - 12582912.0f;
  const float r = (xc - n * 0.693145752f) - n * 1.42860682e-6f;  // ln 2 in two parts
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t n_int = __builtin_bit_cast(int32_t, t) - 0x4B400000;
  const float scale = __builtin_bit_cast(float, (n_int + 127) << 23);  // 2^n
  return x < -87.0f ? 0.0f : p * scale;  // exp(-inf) = 0 exactly
}

// Sum and maximum of kK values in kLanes independent partial results: a plain loop-carried
// float reduction may not be reordered (hence vectorised) without -ffast-math.
constexpr int64_t kLanes = 16;

template <typename T>
T sum_row(const T* x) {
  T part[kLanes] = {};
  for (int64_t c = 0; c < kK; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) part[l] += x[c + l];
  }
  T sum = T(0);
  for (int64_t l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

template <typename T>
T max_row(const T* x, T init) {
  T part[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) part[l] = init;
  for (int64_t c = 0; c < kK; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) part[l] = part[l] > x[c + l] ? part[l] : x[c + l];
  }
  T m = init;
  for (int64_t l = 0; l < kLanes; ++l) m = m > part[l] ? m : part[l];
  return m;
}

// Transposes rows [j0, j0 + cols) of a (rows, n) slice into t[d * kK + c], zero-padded to
// kK columns, so that products with it run along keys.
template <typename T>
void transpose_tile(const T* x, int64_t stride, int64_t j0, int64_t cols, int64_t n, T* t) {
  for (int64_t d = 0; d < n; ++d) {
    for (int64_t c = 0; c < cols; ++c) t[d * kK + c] = x[(j0 + c) * stride + d];
    for (int64_t c = cols; c < kK; ++c) t[d * kK + c] = T(0);
  }
}

// out[c] = sum_d x[d] t[d * kK + c] for the kK keys of a transposed tile, for two rows x0
// and x1 at once (x1 may be null): the 2 kK partial sums live in registers across d (a
// running sum in memory would wait on its own store), and two rows give the multiply-adds
// enough independent chains to hide their latency.
template <typename T>
void rows_times_tile(const T* x0, const T* x1, int64_t n, const T* t, T* out0, T* out1) {
  T acc0[kK] = {}, acc1[kK] = {};
  if (x1 == nullptr) {
    for (int64_t d = 0; d < n; ++d) {
      for (int64_t c = 0; c < kK; ++c) acc0[c] += x0[d] * t[d * kK + c];
    }
  } else {
    for (int64_t d = 0; d < n; ++d) {
      for (int64_t c = 0; c < kK; ++c) {
        acc0[c] += x0[d] * t[d * kK + c];
        acc1[c] += x1[d] * t[d * kK + c];
      }
    }
    for (int64_t c = 0; c < kK; ++c) out1[c] = acc1[c];
  }
  for (int64_t c = 0; c < kK; ++c) out0[c] = acc0[c];
}

// Rows of a tile product computed together where the vector registers hold them: 4 rows of kK
// float partial sums are 16 of AVX-512's 32 registers (4 loads of t feed 16 multiply-adds); 16
// AVX2 registers, or doubles, leave room for 2 rows (the two-row functions above).
#if defined(DLCV_CPU_VECTOR_BYTES) && DLCV_CPU_VECTOR_BYTES >= 64
template <typename T>
constexpr int kRows = sizeof(T) == 4 ? 4 : 2;
#else
template <typename T>
constexpr int kRows = 2;
#endif

// out[r * kK + c] = sum_d x[r * x_stride + d] t[d * kK + c] for R rows at once.
template <typename T, int R>
void rows_times_tile_n(const T* x, int64_t x_stride, int64_t n, const T* t, T* out) {
  T acc[R][kK] = {};
  for (int64_t d = 0; d < n; ++d) {
    const T* td = t + d * kK;
    for (int r = 0; r < R; ++r) {
      const T xr = x[r * x_stride + d];
      for (int64_t c = 0; c < kK; ++c) acc[r][c] += xr * td[c];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t c = 0; c < kK; ++c) out[r * kK + c] = acc[r][c];
  }
}

// rows_times_tile over `rows` rows of x (row stride x_stride) into out[r * kK + c].
template <typename T>
void tile_product(const T* x, int64_t x_stride, int64_t rows, int64_t n, const T* t, T* out) {
  int64_t r = 0;
  if constexpr (kRows<T> > 2) {
    for (; r + kRows<T> <= rows; r += kRows<T>) {
      rows_times_tile_n<T, kRows<T>>(x + r * x_stride, x_stride, n, t, out + r * kK);
    }
  }
  for (; r + 2 <= rows; r += 2) {
    rows_times_tile(x + r * x_stride, x + (r + 1) * x_stride, n, t, out + r * kK,
                    out + (r + 1) * kK);
  }
  if (r < rows) rows_times_tile<T>(x + r * x_stride, nullptr, n, t, out + r * kK, nullptr);
}

// out[0, n) += sum_c w[c * w_stride] rows[c * stride + (0, n)] for c < count: a weighted
// sum of rows, in chunks of W columns whose partial sums stay in registers across c
// (64 floats: four AVX-512 registers, four independent chains of multiply-adds).
template <typename T, int64_t W>
void accumulate_chunk(T* out, const T* w, int64_t w_stride, int64_t count, const T* rows,
                      int64_t stride) {
  T acc[W] = {};  // from zero, then added: a sum per tile, then across tiles (less error)
  for (int64_t c = 0; c < count; ++c) {
    const T wc = w[c * w_stride];
    const T* row = rows + c * stride;
    for (int64_t l = 0; l < W; ++l) acc[l] += wc * row[l];
  }
  for (int64_t l = 0; l < W; ++l) out[l] += acc[l];
}

template <typename T>
void accumulate_rows(T* out, int64_t n, const T* w, int64_t w_stride, int64_t count,
                     const T* rows, int64_t stride) {
  int64_t d = 0;
  for (; d + 64 <= n; d += 64) {
    accumulate_chunk<T, 64>(out + d, w, w_stride, count, rows + d, stride);
  }
  for (; d + 32 <= n; d += 32) {
    accumulate_chunk<T, 32>(out + d, w, w_stride, count, rows + d, stride);
  }
  for (; d + 8 <= n; d += 8) accumulate_chunk<T, 8>(out + d, w, w_stride, count, rows + d, stride);
  for (; d < n; ++d) accumulate_chunk<T, 1>(out + d, w, w_stride, count, rows + d, stride);
}

// The same for two outputs at once, out0 += sum_c w0[c] rows[c], out1 += sum_c w1[c]
// rows[c]: each row of `rows` is loaded once for both, and the two give twice as many
// independent chains of multiply-adds.
template <typename T, int64_t W>
void accumulate_chunk2(T* out0, T* out1, const T* w0, const T* w1, int64_t count,
                       const T* rows, int64_t stride) {
  T acc0[W] = {}, acc1[W] = {};
  for (int64_t c = 0; c < count; ++c) {
    const T a = w0[c], b = w1[c];
    const T* row = rows + c * stride;
    for (int64_t l = 0; l < W; ++l) {
      acc0[l] += a * row[l];
      acc1[l] += b * row[l];
    }
  }
  for (int64_t l = 0; l < W; ++l) {
    out0[l] += acc0[l];
    out1[l] += acc1[l];
  }
}

// out[r * out_stride + (0, n)] += sum_c w[r * kK + c] rows[c * stride + (0, n)] for
// r < nrows, c < count: the P V and dS K products, two output rows at a time.
// out[r * out_stride + (0, W)] += sum_c w[r * w_row + c * w_col] rows[c * stride + (0, W)]
// for R output rows at once: the P V, dS K (w_row = kK, w_col = 1) and the P^T dO, dS^T Q
// (w_row = 1, w_col = kK) products.
template <typename T, int R, int64_t W>
void accumulate_chunk_n(T* out, int64_t out_stride, const T* w, int64_t w_row, int64_t w_col,
                        int64_t count, const T* rows, int64_t stride) {
  T acc[R][W] = {};
  for (int64_t c = 0; c < count; ++c) {
    const T* row = rows + c * stride;
    for (int r = 0; r < R; ++r) {
      const T a = w[r * w_row + c * w_col];
      for (int64_t l = 0; l < W; ++l) acc[r][l] += a * row[l];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t l = 0; l < W; ++l) out[r * out_stride + l] += acc[r][l];
  }
}

template <typename T, int R>
void accumulate_block(T* out, int64_t out_stride, int64_t n, const T* w, int64_t w_row,
                      int64_t w_col, int64_t count, const T* rows, int64_t stride) {
  int64_t d = 0;
  for (; d + 64 <= n; d += 64) {
    accumulate_chunk_n<T, R, 64>(out + d, out_stride, w, w_row, w_col, count, rows + d, stride);
  }
  for (; d + 16 <= n; d += 16) {
    accumulate_chunk_n<T, R, 16>(out + d, out_stride, w, w_row, w_col, count, rows + d, stride);
  }
  for (; d < n; ++d) {
    accumulate_chunk_n<T, R, 1>(out + d, out_stride, w, w_row, w_col, count, rows + d, stride);
  }
}

template <typename T>
void tile_times_rows(T* out, int64_t out_stride, int64_t nrows, int64_t n, const T* w,
                     int64_t count, const T* rows, int64_t stride) {
  int64_t r = 0;
  if constexpr (kRows<T> > 2) {
    for (; r + kRows<T> <= nrows; r += kRows<T>) {
      accumulate_block<T, kRows<T>>(out + r * out_stride, out_stride, n, w + r * kK, kK, 1,
                                    count, rows, stride);
    }
  }
  for (; r + 2 <= nrows; r += 2) {
    T* o0 = out + r * out_stride;
    T* o1 = o0 + out_stride;
    const T* w0 = w + r * kK;
    const T* w1 = w0 + kK;
    int64_t d = 0;
    for (; d + 64 <= n; d += 64) {  // 8 chains of AVX-512 multiply-adds
      accumulate_chunk2<T, 64>(o0 + d, o1 + d, w0, w1, count, rows + d, stride);
    }
    for (; d + 32 <= n; d += 32) {
      accumulate_chunk2<T, 32>(o0 + d, o1 + d, w0, w1, count, rows + d, stride);
    }
    for (; d + 8 <= n; d += 8) {
      accumulate_chunk2<T, 8>(o0 + d, o1 + d, w0, w1, count, rows + d, stride);
    }
    for (; d < n; ++d) accumulate_chunk2<T, 1>(o0 + d, o1 + d, w0, w1, count, rows + d, stride);
  }
  if (r < nrows) accumulate_rows(out + r * out_stride, n, w + r * kK, 1, count, rows, stride);
}

// Pointers to one (batch, head) of every tensor, and the row-level view of the mask.
template <typename T>
struct Head {
  const T* q;
  const T* k;
  const T* v;
  const uint8_t* mask_bool;
  const T* mask_add;
  int64_t mask_row, mask_col;  // strides of the mask along i and j
  uint32_t bh;                 // b * heads + h: the dropout key
  const T* kt;                 // this kv head's key tiles, transposed (transposed_tiles)
  const T* vt;                 // and its value tiles (backward only)
};

template <typename T>
Head<T> head_of(const AttentionParams& p, const T* q, const T* k, const T* v, const void* mask,
                const T* kt_all, const T* vt_all, int64_t b, int64_t h) {
  const int64_t hk = h / p.group();
  Head<T> r{};
  r.q = q + b * p.q_stride[0] + h * p.q_stride[1];
  r.k = k + b * p.k_stride[0] + hk * p.k_stride[1];
  r.v = v + b * p.v_stride[0] + hk * p.v_stride[1];
  const int64_t mask_off = b * p.mask_stride[0] + h * p.mask_stride[1];
  if (p.mask_kind == MaskKind::Bool) r.mask_bool = static_cast<const uint8_t*>(mask) + mask_off;
  if (p.mask_kind == MaskKind::Additive) r.mask_add = static_cast<const T*>(mask) + mask_off;
  r.mask_row = p.mask_stride[2];
  r.mask_col = p.mask_stride[3];
  r.bh = static_cast<uint32_t>(b * p.heads + h);
  const int64_t tiles = (p.kv_len + kK - 1) / kK;
  r.kt = kt_all + (b * p.kv_heads + hk) * tiles * p.head_dim * kK;
  r.vt = vt_all == nullptr ? nullptr : vt_all + (b * p.kv_heads + hk) * tiles * p.v_dim * kK;
  return r;
}

// Every kK-key tile of every (batch, kv head) of x (k or v, n columns) transposed once,
// tile t of pair bhk at (bhk * tiles + t) * n * kK, zero-padded: every query block then
// reads its tiles instead of transposing them again (a strided gather as costly as half
// the multiply-adds of a 32-row block).
template <typename T>
std::unique_ptr<T[]> transposed_tiles(const AttentionParams& p, const T* x,
                                      const int64_t* stride, int64_t n) {
  const int64_t tiles = (p.kv_len + kK - 1) / kK;
  // new T[]: not zero-filled first (every element is written below)
  std::unique_ptr<T[]> out(new T[p.batch * p.kv_heads * tiles * n * kK]);
  at::parallel_for(0, p.batch * p.kv_heads * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bhk = task / tiles, j0 = (task % tiles) * kK;
      const int64_t b = bhk / p.kv_heads, hk = bhk % p.kv_heads;
      transpose_tile(x + b * stride[0] + hk * stride[1], stride[2], j0,
                     std::min(kK, p.kv_len - j0), n, out.get() + task * n * kK);
    }
  });
  return out;
}

// Scores s[r * kK + c] of query rows [i0, i0 + rows) against keys [j0, j0 + cols), masked:
// -inf where the mask or causality excludes the pair, and in the padding c >= cols.
// The key tile comes transposed (kt[d * kK + c] = k[j0 + c][d]) so that the innermost loop
// runs over keys.
template <typename T>
void scores(const AttentionParams& p, const Head<T>& hd, int64_t i0, int64_t rows, int64_t j0,
            int64_t cols, T* s) {
  const T* kt = hd.kt + (j0 / kK) * p.head_dim * kK;
  const T scale = static_cast<T>(p.scale);
  tile_product(hd.q + i0 * p.q_stride[2], p.q_stride[2], rows, p.head_dim, kt, s);
  for (int64_t r = 0; r < rows; ++r) {
    T* sr = s + r * kK;
    for (int64_t c = 0; c < kK; ++c) sr[c] *= scale;
    const int64_t i = i0 + r;
    if (hd.mask_add != nullptr) {
      const T* m = hd.mask_add + i * hd.mask_row + j0 * hd.mask_col;
      for (int64_t c = 0; c < cols; ++c) sr[c] += m[c * hd.mask_col];
    } else if (hd.mask_bool != nullptr) {
      const uint8_t* m = hd.mask_bool + i * hd.mask_row + j0 * hd.mask_col;
      for (int64_t c = 0; c < cols; ++c) sr[c] = m[c * hd.mask_col] ? sr[c] : neg_inf<T>();
    }
    // Causal (top-left aligned, as PyTorch): key j is visible to query i when j <= i.
    const int64_t visible = p.causal ? std::min(cols, std::max<int64_t>(i - j0 + 1, 0)) : cols;
    for (int64_t c = visible; c < kK; ++c) sr[c] = neg_inf<T>();
  }
}

// Multiplies p[r * kK + c] (already exp'ed) by the dropout factor z of (i0 + r, j0 + c): a
// product even where z = 0, so that a NaN stays NaN as in the formula (and CUDA, Triton).
template <typename T>
void apply_dropout(const AttentionParams& p, const Head<T>& hd, int64_t i0, int64_t rows,
                   int64_t j0, int64_t cols, T* s) {
  const T keep_scale = static_cast<T>(1.0 / (1.0 - p.dropout_p));
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t key = dropout_row_key(p.seed, hd.bh, static_cast<uint32_t>(i0 + r));
    for (int64_t c = 0; c < cols; ++c) {
      const bool keep = dropout_bits(key, static_cast<uint32_t>(j0 + c)) >= p.dropout_threshold;
      s[r * kK + c] *= keep ? keep_scale : T(0);
    }
  }
}

// Keys that query rows [i0, i0 + rows) can see: all of them, or up to the last row's
// diagonal when causal.
inline int64_t key_end(const AttentionParams& p, int64_t i0, int64_t rows) {
  return p.causal ? std::min(p.kv_len, i0 + rows) : p.kv_len;
}

template <typename T>
void forward_impl(const AttentionParams& p, const T* q, const T* k, const T* v, const void* mask,
                  T* out, T* lse) {
  const int64_t blocks = (p.q_len + kQ - 1) / kQ;
  const int64_t Dv = p.v_dim;
  const std::unique_ptr<T[]> kt_all = transposed_tiles(p, k, p.k_stride, p.head_dim);
  at::parallel_for(0, p.batch * p.heads * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(kQ * kK), acc(kQ * Dv), m(kQ), l(kQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, i0 = (task % blocks) * kQ;
      const int64_t b = bh / p.heads, h = bh % p.heads;
      const int64_t rows = std::min(kQ, p.q_len - i0);
      const Head<T> hd = head_of(p, q, k, v, mask, kt_all.get(), static_cast<const T*>(nullptr),
                                 b, h);
      std::fill(m.begin(), m.end(), neg_inf<T>());
      std::fill(l.begin(), l.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t j0 = 0; j0 < key_end(p, i0, rows); j0 += kK) {
        const int64_t cols = std::min(kK, p.kv_len - j0);
        scores(p, hd, i0, rows, j0, cols, s.data());
        for (int64_t r = 0; r < rows; ++r) {
          T* sr = s.data() + r * kK;
          // max_row may drop a NaN score; then exp(NaN - m_new) makes l NaN, unless no
          // other score is visible: such a row is NaN, not masked.
          T m_new = max_row(sr, m[r]);
          if (m_new == neg_inf<T>()) {
            if (std::none_of(sr, sr + kK, [](T x) { return x != x; })) {
              // nothing visible yet: exp(-inf - -inf) would be NaN
              for (int64_t c = 0; c < kK; ++c) sr[c] = T(0);
              continue;
            }
            m_new = std::numeric_limits<T>::quiet_NaN();
          }
          const T alpha = exp_nonpositive(m[r] - m_new);  // 0 while m was -inf
          for (int64_t c = 0; c < kK; ++c) sr[c] = exp_nonpositive(sr[c] - m_new);
          l[r] = l[r] * alpha + sum_row(sr);
          m[r] = m_new;
          T* ar = acc.data() + r * Dv;
          for (int64_t d = 0; d < Dv; ++d) ar[d] *= alpha;
        }
        if (p.dropout_p > 0) apply_dropout(p, hd, i0, rows, j0, cols, s.data());
        // acc += p V
        tile_times_rows(acc.data(), Dv, rows, Dv, s.data(), cols, hd.v + j0 * p.v_stride[2],
                        p.v_stride[2]);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        T* o = out + b * p.o_stride[0] + h * p.o_stride[1] + i * p.o_stride[2];
        // A fully masked row (l = 0) gives zeros and lse = -inf; a NaN l (a NaN or +inf
        // score) gives NaN for both.
        const T inv = l[r] == T(0) ? T(0) : T(1) / l[r];
        for (int64_t d = 0; d < Dv; ++d) o[d] = acc[r * Dv + d] * inv;
        lse[bh * p.q_len + i] = l[r] == T(0) ? neg_inf<T>() : m[r] + std::log(l[r]);
      }
    }
  });
}

// p = exp(s - lse) in place for rows [i0, i0 + rows); rows with lse = -inf (fully masked)
// give 0, and so do masked scores (s = -inf) in a row whose lse is NaN.
template <typename T>
void probabilities(const T* lse_rows, int64_t rows, T* s) {
  for (int64_t r = 0; r < rows; ++r) {
    const T lr = lse_rows[r];
    T* sr = s + r * kK;
    if (lr == neg_inf<T>()) {
      for (int64_t c = 0; c < kK; ++c) sr[c] = T(0);
    } else if (lr != lr) {
      for (int64_t c = 0; c < kK; ++c) sr[c] = sr[c] == neg_inf<T>() ? T(0) : lr;
    } else {
      for (int64_t c = 0; c < kK; ++c) sr[c] = exp_nonpositive(sr[c] - lr);
    }
  }
}

// dp[r * kK + c] = dO_(i0 + r) . v_(j0 + c), then ds = p (dp z - delta), in place of dp.
// p holds the probabilities without dropout. Where p = 0 (masked) ds is 0 even when the
// row's delta is NaN: a masked score passes no gradient, as through masked_fill.
template <typename T>
void score_grads(const AttentionParams& p, const Head<T>& hd, const T* dout, const T* delta,
                 int64_t i0, int64_t rows, int64_t j0, int64_t cols, const T* prob, T* ds) {
  const T* vt = hd.vt + (j0 / kK) * p.v_dim * kK;
  tile_product(dout + i0 * p.do_stride[2], p.do_stride[2], rows, p.v_dim, vt, ds);
  if (p.dropout_p > 0) apply_dropout(p, hd, i0, rows, j0, cols, ds);
  for (int64_t r = 0; r < rows; ++r) {
    const T dr = delta[i0 + r];
    if (dr != dr) {
      for (int64_t c = 0; c < kK; ++c) ds[r * kK + c] = prob[r * kK + c] == T(0) ? T(0) : dr;
      continue;
    }
    for (int64_t c = 0; c < kK; ++c) {
      ds[r * kK + c] = prob[r * kK + c] * (ds[r * kK + c] - dr);
    }
  }
}

template <typename T>
void backward_impl(const AttentionParams& p, const T* dout, const T* q, const T* k, const T* v,
                   const T* out, const T* lse, const void* mask, T* delta, T* dq, T* dk, T* dv) {
  const int64_t D = p.head_dim, Dv = p.v_dim, L = p.q_len, S = p.kv_len;
  // delta_i = dO_i . out_i
  at::parallel_for(0, p.batch * p.heads * L, grain(Dv), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bh = row / L, i = row % L, b = bh / p.heads, h = bh % p.heads;
      const T* g = dout + b * p.do_stride[0] + h * p.do_stride[1] + i * p.do_stride[2];
      const T* o = out + b * p.o_stride[0] + h * p.o_stride[1] + i * p.o_stride[2];
      // In double: ds = p (dp - delta) cancels, and a float sum of Dv products would put
      // its rounding error (a few units of |delta|) straight into every ds of the row.
      double sum = 0;
      for (int64_t d = 0; d < Dv; ++d) sum += static_cast<double>(g[d]) * o[d];
      delta[row] = static_cast<T>(sum);
    }
  });

  // dK, dV: one task per (batch, kv head, key tile), looping over the group's query heads.
  // With enough (batch, kv head) pairs to keep every thread busy, one task per pair walks
  // all its key tiles and accumulates dQ too (it owns the group's dQ rows), which saves
  // recomputing the probabilities in a second pass. Either way each element has one
  // writer, so the result is the same from run to run (for a given thread count).
  const std::unique_ptr<T[]> kt_all = transposed_tiles(p, k, p.k_stride, D);
  const std::unique_ptr<T[]> vt_all = transposed_tiles(p, v, p.v_stride, Dv);
  const bool fuse_dq = p.batch * p.kv_heads >= 4 * at::get_num_threads();
  const int64_t key_tiles = (S + kK - 1) / kK;
  const int64_t split = fuse_dq ? 1 : key_tiles;  // tasks per (batch, kv head)
  const T scale = static_cast<T>(p.scale);
  at::parallel_for(0, p.batch * p.kv_heads * split, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(kQ * kK), pd(kQ * kK), ds(kQ * kK), dk_acc(kK * D), dv_acc(kK * Dv);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bhk = task / split, b = bhk / p.kv_heads, hk = bhk % p.kv_heads;
      const int64_t h_begin = hk * p.group(), h_end = (hk + 1) * p.group();
      T* dq_group = dq + (b * p.heads + h_begin) * L * D;  // the group's heads are adjacent
      if (fuse_dq) std::fill(dq_group, dq_group + p.group() * L * D, T(0));
      const int64_t tile_begin = fuse_dq ? 0 : task % split;
      const int64_t tile_end = fuse_dq ? key_tiles : tile_begin + 1;
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t j0 = tile * kK, cols = std::min(kK, S - j0);
        std::fill(dk_acc.begin(), dk_acc.end(), T(0));
        std::fill(dv_acc.begin(), dv_acc.end(), T(0));
        for (int64_t h = h_begin; h < h_end; ++h) {
          const Head<T> hd = head_of(p, q, k, v, mask, kt_all.get(), vt_all.get(), b, h);
          const T* lse_h = lse + (b * p.heads + h) * L;
          const T* delta_h = delta + (b * p.heads + h) * L;
          const T* dout_h = dout + b * p.do_stride[0] + h * p.do_stride[1];
          // Causal: rows i < j0 see none of these keys.
          const int64_t first = p.causal ? (std::min(j0, L) / kQ) * kQ : 0;
          for (int64_t i0 = first; i0 < L; i0 += kQ) {
            const int64_t rows = std::min(kQ, L - i0);
            scores(p, hd, i0, rows, j0, cols, s.data());
            probabilities(lse_h + i0, rows, s.data());
            std::copy(s.begin(), s.end(), pd.begin());
            if (p.dropout_p > 0) apply_dropout(p, hd, i0, rows, j0, cols, pd.data());
            score_grads(p, hd, dout_h, delta_h, i0, rows, j0, cols, s.data(), ds.data());
            int64_t c = 0;  // dv += (p z)^T dO, dk += ds^T Q
            if constexpr (kRows<T> > 2) {
              for (; c + kRows<T> <= cols; c += kRows<T>) {
                accumulate_block<T, kRows<T>>(dv_acc.data() + c * Dv, Dv, Dv, pd.data() + c, 1,
                                              kK, rows, dout_h + i0 * p.do_stride[2],
                                              p.do_stride[2]);
                accumulate_block<T, kRows<T>>(dk_acc.data() + c * D, D, D, ds.data() + c, 1, kK,
                                              rows, hd.q + i0 * p.q_stride[2], p.q_stride[2]);
              }
            }
            for (; c < cols; ++c) {
              accumulate_rows(dv_acc.data() + c * Dv, Dv, pd.data() + c, kK, rows,
                              dout_h + i0 * p.do_stride[2], p.do_stride[2]);
              accumulate_rows(dk_acc.data() + c * D, D, ds.data() + c, kK, rows,
                              hd.q + i0 * p.q_stride[2], p.q_stride[2]);
            }
            if (fuse_dq) {  // dq += ds K
              tile_times_rows(dq + ((b * p.heads + h) * L + i0) * D, D, rows, D, ds.data(),
                              cols, hd.k + j0 * p.k_stride[2], p.k_stride[2]);
            }
          }
        }
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t j = j0 + c;
          T* dkj = dk + ((b * p.kv_heads + hk) * S + j) * D;
          T* dvj = dv + ((b * p.kv_heads + hk) * S + j) * Dv;
          for (int64_t d = 0; d < D; ++d) dkj[d] = dk_acc[c * D + d] * scale;
          for (int64_t d = 0; d < Dv; ++d) dvj[d] = dv_acc[c * Dv + d];
        }
      }
      if (fuse_dq) {
        for (int64_t e = 0; e < p.group() * L * D; ++e) dq_group[e] *= scale;
      }
    }
  });
  if (fuse_dq) return;

  // dQ: one task per (batch, head, query block), looping over the key tiles it sees.
  const int64_t blocks = (L + kQ - 1) / kQ;
  at::parallel_for(0, p.batch * p.heads * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s(kQ * kK), ds(kQ * kK), dq_acc(kQ * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, i0 = (task % blocks) * kQ;
      const int64_t b = bh / p.heads, h = bh % p.heads;
      const int64_t rows = std::min(kQ, L - i0);
      const Head<T> hd = head_of(p, q, k, v, mask, kt_all.get(), vt_all.get(), b, h);
      const T* dout_h = dout + b * p.do_stride[0] + h * p.do_stride[1];
      std::fill(dq_acc.begin(), dq_acc.end(), T(0));
      for (int64_t j0 = 0; j0 < key_end(p, i0, rows); j0 += kK) {
        const int64_t cols = std::min(kK, S - j0);
        scores(p, hd, i0, rows, j0, cols, s.data());
        probabilities(lse + bh * L + i0, rows, s.data());
        score_grads(p, hd, dout_h, delta + bh * L, i0, rows, j0, cols, s.data(), ds.data());
        // dq += ds K
        tile_times_rows(dq_acc.data(), D, rows, D, ds.data(), cols, hd.k + j0 * p.k_stride[2],
                        p.k_stride[2]);
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* dqi = dq + (bh * L + i0 + r) * D;
        for (int64_t d = 0; d < D; ++d) dqi[d] = dq_acc[r * D + d] * scale;
      }
    }
  });
}

}  // namespace

void attention_forward(DType dtype, const AttentionParams& p, const void* q, const void* k,
                       const void* v, const void* mask, void* out, void* lse) {
  if (dtype == DType::Float64) {
    forward_impl(p, static_cast<const double*>(q), static_cast<const double*>(k),
                 static_cast<const double*>(v), mask, static_cast<double*>(out),
                 static_cast<double*>(lse));
  } else {
    forward_impl(p, static_cast<const float*>(q), static_cast<const float*>(k),
                 static_cast<const float*>(v), mask, static_cast<float*>(out),
                 static_cast<float*>(lse));
  }
}

void attention_backward(DType dtype, const AttentionParams& p, const void* dout, const void* q,
                        const void* k, const void* v, const void* out, const void* lse,
                        const void* mask, void* delta, void* dq, void* dk, void* dv) {
  if (dtype == DType::Float64) {
    using T = double;
    backward_impl(p, static_cast<const T*>(dout), static_cast<const T*>(q),
                  static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(out),
                  static_cast<const T*>(lse), mask, static_cast<T*>(delta), static_cast<T*>(dq),
                  static_cast<T*>(dk), static_cast<T*>(dv));
  } else {
    using T = float;
    backward_impl(p, static_cast<const T*>(dout), static_cast<const T*>(q),
                  static_cast<const T*>(k), static_cast<const T*>(v), static_cast<const T*>(out),
                  static_cast<const T*>(lse), mask, static_cast<T*>(delta), static_cast<T*>(dq),
                  static_cast<T*>(dk), static_cast<T*>(dv));
  }
}

}  // namespace dlcv_fast::cpu::DLCV_CPU_ISA

#include "isa_end.h"
