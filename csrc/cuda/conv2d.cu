// conv2d on CUDA: forward, grad input (dgrad), grad weight (wgrad) and the bias/ReLU backward.
//
// The three convolutions are one implicit GEMM, C[m][n] = sum_k A[m][k] * B[n][k], that never
// builds the im2col matrix: a "problem" maps GEMM coordinates to tensor elements.
//
//   forward  A = x gathered per output pixel   m = (n, i, j)   k = (r, s, c)   n = o
//            B = w                                                             C = y
//   dgrad    A = gy gathered per input pixel   m = (n, h, w)   k = (r, s, o)   n = c
//            (taps whose (h + pad - r * dil) is not a multiple of the stride are zero)
//            B = w                                                             C = gx
//   wgrad    A = gy                            m = o   k = (n, i, j)   n = (r, s, c)
//            B = x gathered per weight tap                                     C = gw
//
// One group per blockIdx.z (wgrad: split * groups + group). The channel index is the fastest
// part of k (and of wgrad's n), so on channels_last tensors 16-byte vectors run along it.
//
// A block computes a kM x kN tile of C with 256 threads, multiplying k tiles (kK deep) of A
// and B in shared memory. Where the gather moves 4 bytes or more per vector (channels_last,
// or any float32/float64 tensor), the tiles go straight from global to shared memory by
// cp.async, in a 3-stage ring: two tiles are in flight while the third is multiplied, and
// one barrier per k tile orders it all. 16-bit tensors without channel vectors (2-byte
// gathers, which cp.async cannot do) go through registers into two buffers instead: the
// next tile's loads are issued before the current tile's products. 16-bit types multiply on
// tensor cores (mma.sync 16 x 8 x 16 on ldmatrix operands, float accumulators), float32 on
// TF32 tensor cores through WMMA when allowed, else (and float64) with FMAs. The epilogue
// goes through shared memory: the tile is stored there, then written with bias, ReLU and
// the element type's rounding by coalesced strided stores.
//
// Operands sit in shared memory either "k-major" ([row][k], the gather runs along k) or
// "row-major" ([k][row], the gather runs along rows), whichever dimension is the channel
// one in memory: forward A and B and dgrad A are k-major; dgrad B and both wgrad operands
// are row-major. Rows are padded by 16 bytes: conflict-free 16-byte stores, ldmatrix and WMMA
// loads.
//
// wgrad's K (N * OH * OW) is long and its M x N often small, so K is split over blocks; the
// float32 partial sums go to a workspace [splits][G][M][N] and a second kernel adds them in
// split order (deterministic) and rounds to gw's type. float64 never splits (the workspace is
// float32).
//
// Tile sizes and the stage count were chosen by reasoning, not measured (constexpr below, to
// be tuned on a GPU): 128 x 64 x 32 for 16-bit keeps 8 warps at 32 x 32 each (per 16-deep
// step, 8 MMAs of 16 x 8 x 16 on 4 ldmatrix loads). A stage is 13-15 KB (16-bit; float32 at
// kK = 16 the same; float64 at 64 x 64 x 16, 18 KB), so 3 stages take 39-54 KB of dynamic
// shared memory, which the 34 KB float tile of the epilogue reuses. __launch_bounds__(256,
// 2) caps registers at 128 so that two blocks (16 warps) share an SM and one's barrier hides
// behind the other's MMAs; two blocks' shared memory (about 100 KB) is less than half of an
// H100 SM's 228 KB.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"
#include "mma_sync.cuh"

namespace dlcv_fast::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kGemmThreads = 256;
// A row index far outside any image: every tap computed from it fails the bounds test.
constexpr int kFar = -(1 << 30);

// Division by a runtime constant as multiply-high, add and shift, exact for n < 2^31
// (round-up method with a 33-bit multiplier: m = floor(2^(32+l) / d) + 1, l = ceil(log2 d)).
struct FastDiv {
  uint32_t mul = 1, shift = 0;
  FastDiv() = default;
  explicit FastDiv(int64_t d) {
    if (d < 1) d = 1;  // a size-0 dimension: nothing is divided, but keep the setup defined
    while ((int64_t{1} << shift) < d) ++shift;
    mul = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ int div(int n) const {
    const uint32_t u = static_cast<uint32_t>(n);
    return static_cast<int>((__umulhi(u, mul) + u) >> shift);
  }
};

// (r, s, ch) of k = (r * kw + s) * chans + ch.
struct TapDiv {
  FastDiv by_chans, by_kw;
  int chans, kw;
  TapDiv() = default;
  TapDiv(int64_t chans_, int64_t kw_) : by_chans(chans_), by_kw(kw_), chans(int(chans_)), kw(int(kw_)) {}
  __device__ __forceinline__ void split(int k, int& r, int& s, int& ch) const {
    const int rs = by_chans.div(k);
    ch = k - rs * chans;
    r = by_kw.div(rs);
    s = rs - r * kw;
  }
};

// (n, i, j) of a flat pixel index p = (n * h + i) * w + j, 64-bit when it must be.
struct PixelDiv {
  FastDiv by_w, by_h;
  int h, w;
  PixelDiv() = default;
  PixelDiv(int64_t h_, int64_t w_) : by_w(w_), by_h(h_), h(int(h_)), w(int(w_)) {}
  __device__ __forceinline__ void split(int64_t p, int64_t& n, int& i, int& j) const {
    if (p < std::numeric_limits<int32_t>::max()) {
      const int q = by_w.div(static_cast<int>(p));
      j = static_cast<int>(p) - q * w;
      const int nn = by_h.div(q);
      i = q - nn * h;
      n = nn;
    } else {
      const int64_t q = p / w;
      j = static_cast<int>(p - q * w);
      n = q / h;
      i = static_cast<int>(q - n * h);
    }
  }
};

// Per-row part of a gather (kept in shared memory for the block's rows) and per-k part.
struct RowInfo {
  int64_t base;
  int a, b;
};
struct KInfo {
  int64_t off;
  int p, q;
  bool ok;
};

// x[base + koff + (a + p) * sh + (b + q) * sw] if (a + p, b + q) lies in the image.
__device__ __forceinline__ bool image_at(const RowInfo& r, const KInfo& k, const Strides4& st,
                                         int h, int w, int64_t& off) {
  const int y = r.a + k.p, x = r.b + k.q;
  if (!k.ok || static_cast<unsigned>(y) >= static_cast<unsigned>(h) ||
      static_cast<unsigned>(x) >= static_cast<unsigned>(w)) {
    return false;
  }
  off = r.base + k.off + y * st.h + x * st.w;
  return true;
}

// Element base + koff when both row (a == 0) and k are valid.
__device__ __forceinline__ bool plain_at(const RowInfo& r, const KInfo& k, int64_t& off) {
  if (!k.ok || r.a != 0) return false;
  off = r.base + k.off;
  return true;
}

// Geometry every problem needs, narrowed to int once (the host checks that it fits).
struct Geometry {
  int h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, cpg, opg;
  Geometry() = default;
  explicit Geometry(const Conv2dShape& s)
      : h(int(s.h)), w(int(s.w)), oh(int(s.oh)), ow(int(s.ow)), kh(int(s.kh)), kw(int(s.kw)),
        sh(int(s.stride_h)), sw(int(s.stride_w)), ph(int(s.pad_h)), pw(int(s.pad_w)),
        dh(int(s.dil_h)), dw(int(s.dil_w)), cpg(int(s.c_per_group())), opg(int(s.o_per_group())) {}
};

// ---- forward -------------------------------------------------------------------------------

template <typename T>
struct FwdX {  // A: rows = output pixels, k = (r, s, c)
  const T* ptr;
  Strides4 st;
  Geometry geo;
  int64_t rows;
  PixelDiv pix;
  TapDiv tap;
  __device__ RowInfo row(int, int64_t m) const {
    RowInfo r{0, kFar, 0};
    if (m < rows) {
      int64_t n;
      int i, j;
      pix.split(m, n, i, j);
      r.base = n * st.n;
      r.a = i * geo.sh - geo.ph;
      r.b = j * geo.sw - geo.pw;
    }
    return r;
  }
  __device__ KInfo col(int g, int64_t k, int64_t kend) const {
    KInfo q{0, 0, 0, k < kend};
    if (q.ok) {
      int r, s, c;
      tap.split(static_cast<int>(k), r, s, c);
      q.off = (static_cast<int64_t>(g) * geo.cpg + c) * st.c;
      q.p = r * geo.dh;
      q.q = s * geo.dw;
    }
    return q;
  }
  __device__ bool at(const RowInfo& r, const KInfo& k, int64_t& off) const {
    return image_at(r, k, st, geo.h, geo.w, off);
  }
};

template <typename T>
struct FwdW {  // B: rows = output channels of the group, k = (r, s, c)
  const T* ptr;
  Strides4 st;
  int opg;
  TapDiv tap;
  __device__ RowInfo row(int g, int64_t o) const {
    RowInfo r{0, kFar, 0};
    if (o < opg) {
      r.base = (static_cast<int64_t>(g) * opg + o) * st.n;
      r.a = 0;
    }
    return r;
  }
  __device__ KInfo col(int, int64_t k, int64_t kend) const {
    KInfo q{0, 0, 0, k < kend};
    if (q.ok) {
      int r, s, c;
      tap.split(static_cast<int>(k), r, s, c);
      q.off = c * st.c + r * st.h + s * st.w;
    }
    return q;
  }
  __device__ bool at(const RowInfo& r, const KInfo& k, int64_t& off) const {
    return plain_at(r, k, off);
  }
};

template <typename T>
struct FwdY {  // C: y + bias, ReLU
  T* ptr;
  Strides4 st;
  const T* bias;
  int64_t rows;
  int opg;
  bool relu, rows_first, vec_cols;
  PixelDiv pix;
  __device__ int64_t row(int, int, int64_t m) const {
    if (m >= rows) return -1;
    int64_t n;
    int i, j;
    pix.split(m, n, i, j);
    return n * st.n + i * st.h + j * st.w;
  }
  __device__ bool col(int g, int o, int64_t& off) const {
    off = (static_cast<int64_t>(g) * opg + o) * st.c;
    return o < opg;
  }
  __device__ acc_t<T> finish(acc_t<T> v, int g, int o) const {
    if (bias != nullptr) v += to_acc(bias[static_cast<int64_t>(g) * opg + o]);
    if (relu && v < acc_t<T>(0)) v = acc_t<T>(0);  // keeps NaN, as torch.relu does
    return v;
  }
  __device__ void store(int64_t off, int g, int o, acc_t<T> v) const {
    ptr[off] = from_acc<T>(finish(v, g, o));
  }
  // Channels o .. o + V - 1, adjacent in memory (vec_cols).
  template <int V>
  __device__ void store_vec(int64_t off, int g, int o, const acc_t<T> (&v)[V]) const {
    Vec<T, V> out;
#pragma unroll
    for (int e = 0; e < V; ++e) out.v[e] = from_acc<T>(finish(v[e], g, o + e));
    *reinterpret_cast<Vec<T, V>*>(ptr + off) = out;
  }
};

// ---- dgrad ---------------------------------------------------------------------------------

template <typename T>
struct DgradGy {  // A: rows = input pixels, k = (r, s, o)
  const T* ptr;
  Strides4 st;
  Geometry geo;
  int64_t rows;
  PixelDiv pix;  // over (h, w)
  TapDiv tap;    // over (kw, opg)
  FastDiv by_sh, by_sw;
  __device__ RowInfo row(int, int64_t m) const {
    RowInfo r{0, kFar, 0};
    if (m < rows) {
      int64_t n;
      int y, x;
      pix.split(m, n, y, x);
      r.base = n * st.n;
      r.a = y + geo.ph;
      r.b = x + geo.pw;
    }
    return r;
  }
  __device__ KInfo col(int g, int64_t k, int64_t kend) const {
    KInfo q{0, 0, 0, k < kend};
    if (q.ok) {
      int r, s, o;
      tap.split(static_cast<int>(k), r, s, o);
      q.off = (static_cast<int64_t>(g) * geo.opg + o) * st.c;
      q.p = r * geo.dh;
      q.q = s * geo.dw;
    }
    return q;
  }
  // gy[n, o, i, j] with i * sh = h + ph - r * dh (and the same for j), if integral and in range.
  __device__ bool at(const RowInfo& r, const KInfo& k, int64_t& off) const {
    const int ti = r.a - k.p, tj = r.b - k.q;
    if (!k.ok || ti < 0 || tj < 0) return false;
    const int i = by_sh.div(ti), j = by_sw.div(tj);
    if (i * geo.sh != ti || j * geo.sw != tj || i >= geo.oh || j >= geo.ow) return false;
    off = r.base + k.off + i * st.h + j * st.w;
    return true;
  }
};

template <typename T>
struct DgradW {  // B: rows = input channels of the group, k = (r, s, o)
  const T* ptr;
  Strides4 st;
  int cpg, opg;
  TapDiv tap;  // over (kw, opg)
  __device__ RowInfo row(int, int64_t c) const {
    RowInfo r{0, kFar, 0};
    if (c < cpg) {
      r.base = c * st.c;
      r.a = 0;
    }
    return r;
  }
  __device__ KInfo col(int g, int64_t k, int64_t kend) const {
    KInfo q{0, 0, 0, k < kend};
    if (q.ok) {
      int r, s, o;
      tap.split(static_cast<int>(k), r, s, o);
      q.off = (static_cast<int64_t>(g) * opg + o) * st.n + r * st.h + s * st.w;
    }
    return q;
  }
  __device__ bool at(const RowInfo& r, const KInfo& k, int64_t& off) const {
    return plain_at(r, k, off);
  }
};

template <typename T>
struct DgradGx {  // C
  T* ptr;
  Strides4 st;
  int64_t rows;
  int cpg;
  bool rows_first, vec_cols;
  PixelDiv pix;
  __device__ int64_t row(int, int, int64_t m) const {
    if (m >= rows) return -1;
    int64_t n;
    int y, x;
    pix.split(m, n, y, x);
    return n * st.n + y * st.h + x * st.w;
  }
  __device__ bool col(int g, int c, int64_t& off) const {
    off = (static_cast<int64_t>(g) * cpg + c) * st.c;
    return c < cpg;
  }
  __device__ void store(int64_t off, int, int, acc_t<T> v) const { ptr[off] = from_acc<T>(v); }
  template <int V>
  __device__ void store_vec(int64_t off, int, int, const acc_t<T> (&v)[V]) const {
    Vec<T, V> out;
#pragma unroll
    for (int e = 0; e < V; ++e) out.v[e] = from_acc<T>(v[e]);
    *reinterpret_cast<Vec<T, V>*>(ptr + off) = out;
  }
};

// ---- wgrad ---------------------------------------------------------------------------------

template <typename T>
struct WgradGy {  // A: rows = output channels of the group, k = (n, i, j)
  const T* ptr;
  Strides4 st;
  int opg;
  PixelDiv pix;  // over (oh, ow)
  __device__ RowInfo row(int g, int64_t o) const {
    RowInfo r{0, kFar, 0};
    if (o < opg) {
      r.base = (static_cast<int64_t>(g) * opg + o) * st.c;
      r.a = 0;
    }
    return r;
  }
  __device__ KInfo col(int, int64_t k, int64_t kend) const {
    KInfo q{0, 0, 0, k < kend};
    if (q.ok) {
      int64_t n;
      int i, j;
      pix.split(k, n, i, j);
      q.off = n * st.n + i * st.h + j * st.w;
    }
    return q;
  }
  __device__ bool at(const RowInfo& r, const KInfo& k, int64_t& off) const {
    return plain_at(r, k, off);
  }
};

template <typename T>
struct WgradX {  // B: rows = weight taps (r, s, c), k = (n, i, j)
  const T* ptr;
  Strides4 st;
  Geometry geo;
  int taps;  // (C / G) * KH * KW
  PixelDiv pix;  // over (oh, ow)
  TapDiv tap;    // over (kw, cpg)
  __device__ RowInfo row(int g, int64_t t) const {
    RowInfo r{0, kFar, 0};
    if (t < taps) {
      int rr, s, c;
      tap.split(static_cast<int>(t), rr, s, c);
      r.base = (static_cast<int64_t>(g) * geo.cpg + c) * st.c;
      r.a = rr * geo.dh;
      r.b = s * geo.dw;
    }
    return r;
  }
  __device__ KInfo col(int, int64_t k, int64_t kend) const {
    KInfo q{0, 0, 0, k < kend};
    if (q.ok) {
      int64_t n;
      int i, j;
      pix.split(k, n, i, j);
      q.off = n * st.n;
      q.p = i * geo.sh - geo.ph;
      q.q = j * geo.sw - geo.pw;
    }
    return q;
  }
  __device__ bool at(const RowInfo& r, const KInfo& k, int64_t& off) const {
    return image_at(r, k, st, geo.h, geo.w, off);
  }
};

// C of wgrad: gw itself (kPartial = false) or the float32 partial sums of one split.
template <typename T, bool kPartial>
struct WgradOut {
  using Out = std::conditional_t<kPartial, float, T>;
  Out* ptr;
  Strides4 st;  // gw's (unused for partial sums)
  int opg, taps, groups;
  bool rows_first, vec_cols;  // both false: columns (r, s, c) are written one by one
  TapDiv tap;  // over (kw, cpg)
  __device__ int64_t row(int g, int split, int64_t o) const {
    if (o >= opg) return -1;
    if constexpr (kPartial) {
      return ((static_cast<int64_t>(split) * groups + g) * opg + o) * taps;
    } else {
      return (static_cast<int64_t>(g) * opg + o) * st.n;
    }
  }
  __device__ bool col(int, int t, int64_t& off) const {
    if (t >= taps) return false;
    if constexpr (kPartial) {
      off = t;
    } else {
      int r, s, c;
      tap.split(t, r, s, c);
      off = c * st.c + r * st.h + s * st.w;
    }
    return true;
  }
  __device__ void store(int64_t off, int, int, acc_t<T> v) const {
    if constexpr (kPartial) {
      ptr[off] = v;
    } else {
      ptr[off] = from_acc<T>(v);
    }
  }
  template <int V>
  __device__ void store_vec(int64_t, int, int, const acc_t<T> (&)[V]) const {}  // not used
};

// A GEMM problem: operands, output, sizes, and which operands are row-major in shared memory.
template <class A_, class B_, class C_, bool kARows, bool kBRows>
struct Problem {
  static constexpr bool kARowMajor = kARows, kBRowMajor = kBRows;
  A_ a;
  B_ b;
  C_ c;
  int groups;
  int64_t k_total, k_per_split;
};

// ---- tiles ---------------------------------------------------------------------------------

enum class Math { Mma16, Tf32, Fma };

template <typename T_, Math kMath_, int M, int N, int K>
struct Tiles {
  using T = T_;
  static constexpr Math kMath = kMath_;
  static constexpr int kM = M, kN = N, kK = K;
};

// Which tiles and which math for an element type (see the file comment for the sizes).
template <typename T, typename F>
cudaError_t with_tiles(bool tf32, F&& f) {
  if constexpr (std::is_same_v<T, double>) {
    return f(Tiles<double, Math::Fma, 64, 64, 16>{});
  } else if constexpr (std::is_same_v<T, float>) {
    if (tf32) return f(Tiles<float, Math::Tf32, 128, 64, 16>{});
    return f(Tiles<float, Math::Fma, 128, 64, 16>{});
  } else {
    return f(Tiles<T, Math::Mma16, 128, 64, 32>{});
  }
}

// One operand's k tile: R rows by BK, moved as vectors of V elements along the dimension
// that is contiguous in shared memory. Thread t takes position t % kLanes along that
// dimension and lines t / kLanes + l * kLines across it.
template <typename T, int R, int BK, int V, bool kRowMajor>
struct TileLoad {
  static constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  static constexpr int kLd = (kRowMajor ? R : BK) + kPad;
  static constexpr int kElems = (kRowMajor ? BK : R) * kLd;
  static constexpr int kLanes = (kRowMajor ? R : BK) / V;
  static constexpr int kLines = kGemmThreads / kLanes;
  static constexpr int kLoads = (kRowMajor ? BK : R) / kLines;
  static_assert((kRowMajor ? R : BK) % V == 0 && kGemmThreads % kLanes == 0 &&
                    (kRowMajor ? BK : R) % kLines == 0,
                "tile does not divide among the threads");

  // Calls f(l, valid, element offset) for each of the thread's kLoads vectors.
  template <class Op, class F>
  __device__ __forceinline__ static void gather(const Op& op, const RowInfo* rows, int g,
                                                int64_t k0, int64_t kend, int tid, F&& f) {
    const int lane = tid % kLanes, line = tid / kLanes;
    int64_t off = 0;
    if constexpr (!kRowMajor) {
      // One k position (V of them) per thread: its decomposition serves all its rows.
      const KInfo k = op.col(g, k0 + lane * V, kend);
#pragma unroll
      for (int l = 0; l < kLoads; ++l) {
        const bool ok = op.at(rows[line + l * kLines], k, off);
        f(l, ok, off);
      }
    } else {
      // V adjacent rows (all valid or all padding, as the host ensures when V > 1).
      const RowInfo r = rows[lane * V];
#pragma unroll
      for (int l = 0; l < kLoads; ++l) {
        const bool ok = op.at(r, op.col(g, k0 + line + l * kLines, kend), off);
        f(l, ok, off);
      }
    }
  }

  __device__ __forceinline__ static T* at(T* s, int tid, int l) {
    return s + (tid / kLanes + l * kLines) * kLd + (tid % kLanes) * V;
  }

  // Straight into shared memory `s` by cp.async (zeros where the gather falls outside).
  template <class Op>
  __device__ __forceinline__ static void copy(const Op& op, const RowInfo* rows, int g, int64_t k0,
                                              int64_t kend, int tid, T* s) {
    gather(op, rows, g, k0, kend, tid, [&](int l, bool ok, int64_t off) {
      async_copy<V * sizeof(T)>(at(s, tid, l), ok ? op.ptr + off : op.ptr, ok);
    });
  }

  // Through registers (vectors too narrow for cp.async): load, then store once the
  // buffer is free.
  Vec<T, V> v[kLoads];

  template <class Op>
  __device__ __forceinline__ void load(const Op& op, const RowInfo* rows, int g, int64_t k0,
                                       int64_t kend, int tid) {
    gather(op, rows, g, k0, kend, tid, [&](int l, bool ok, int64_t off) {
      if (ok) {
        v[l] = *reinterpret_cast<const Vec<T, V>*>(op.ptr + off);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) v[l].v[e] = from_acc<T>(acc_t<T>(0));
      }
    });
  }

  __device__ __forceinline__ void store(T* s, int tid) const {
#pragma unroll
    for (int l = 0; l < kLoads; ++l) *reinterpret_cast<Vec<T, V>*>(at(s, tid, l)) = v[l];
  }
};

// The block's C tile accumulated in registers from A and B tiles in shared memory (A
// [row][k] or, kARows, [k][row]; B likewise), then stored to shared memory `sc` (float
// rows of kLdC) for the epilogue.

// FMAs: 16 x 16 threads, each owning rows ty + 16 i and columns tx + 16 j of the tile.
template <class Cfg, bool kARows, bool kBRows>
struct FmaTile {
  using T = typename Cfg::T;
  using Acc = acc_t<T>;
  static constexpr int TM = Cfg::kM / 16, TN = Cfg::kN / 16;
  Acc acc[TM][TN];

  __device__ __forceinline__ FmaTile() {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);
  }

  template <int kLdA, int kLdB>
  __device__ __forceinline__ void multiply(const T* A, const T* B, int tid) {
    const int tx = tid % 16, ty = tid / 16;
#pragma unroll
    for (int kk = 0; kk < Cfg::kK; ++kk) {
      Acc av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int m = ty + 16 * i;
        av[i] = to_acc(kARows ? A[kk * kLdA + m] : A[m * kLdA + kk]);
      }
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int n = tx + 16 * j;
        bv[j] = to_acc(kBRows ? B[kk * kLdB + n] : B[n * kLdB + kk]);
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
    }
  }

  template <int kLdC>
  __device__ __forceinline__ void store(Acc* sc, int tid) const {
    const int tx = tid % 16, ty = tid / 16;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) sc[(ty + 16 * i) * kLdC + tx + 16 * j] = acc[i][j];
  }
};

// 16-bit types on mma.sync (16 x 8 x 16): 8 warps as 4 (m) x 2 (n), each a (BM / 4) x (BN / 2)
// block of 16 x 8 accumulator tiles, its operands loaded by ldmatrix.
template <class Cfg, bool kARows, bool kBRows>
struct MmaTile {
  using T = typename Cfg::T;
  static constexpr int WM = Cfg::kM / 4, WN = Cfg::kN / 2, FM = WM / 16, FN = WN / 8;
  static_assert(WM % 16 == 0 && WN % 16 == 0 && Cfg::kK % 16 == 0, "bad warp tiling");
  float acc[FM][FN][4];

  __device__ __forceinline__ MmaTile() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;
  }

  template <int kLdA, int kLdB>
  __device__ __forceinline__ void multiply(const T* A, const T* B, int tid) {
    const int warp = tid / 32, m0 = warp % 4 * WM, n0 = warp / 4 * WN;
#pragma unroll
    for (int kk = 0; kk < Cfg::kK; kk += 16) {
      uint32_t a[FM][4];
#pragma unroll
      for (int i = 0; i < FM; ++i) load_a<!kARows>(a[i], A, kLdA, m0 + i * 16, kk);
#pragma unroll
      for (int j = 0; j < FN; j += 2) {
        uint32_t b[4];
        load_b2<!kBRows>(b, B, kLdB, n0 + j * 8, kk);
#pragma unroll
        for (int i = 0; i < FM; ++i) {
          mma_16816<T>(acc[i][j], a[i], {b[0], b[1]});
          mma_16816<T>(acc[i][j + 1], a[i], {b[2], b[3]});
        }
      }
    }
  }

  // Accumulator c of tile (i, j) is row m0 + 16 i + g + 8 (c / 2), column n0 + 8 j + 2 t + c % 2.
  template <int kLdC>
  __device__ __forceinline__ void store(float* sc, int tid) const {
    const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int m0 = warp % 4 * WM, n0 = warp / 4 * WN;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          sc[(m0 + i * 16 + g + 8 * (c / 2)) * kLdC + n0 + j * 8 + 2 * t + c % 2] = acc[i][j][c];
        }
  }
};

// TF32 tensor cores through WMMA (16 x 16 x 8): 8 warps as 4 (m) x 2 (n), each a
// (BM / 4) x (BN / 2) block of 16 x 16 fragments.
template <class Cfg, bool kARows, bool kBRows>
struct WmmaTile {
  using T = typename Cfg::T;
  static_assert(Cfg::kMath == Math::Tf32, "16-bit types take MmaTile");
  static constexpr int KS = 8;
  static constexpr int WM = Cfg::kM / 4, WN = Cfg::kN / 2, FM = WM / 16, FN = WN / 16;
  static_assert(WM % 16 == 0 && WN % 16 == 0 && Cfg::kK % KS == 0, "bad warp tiling");
  using LayoutA = std::conditional_t<kARows, wmma::col_major, wmma::row_major>;
  using LayoutB = std::conditional_t<kBRows, wmma::row_major, wmma::col_major>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, KS, wmma::precision::tf32, LayoutA>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, KS, wmma::precision::tf32, LayoutB>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, KS, float>;
  FragC acc[FM][FN];

  __device__ __forceinline__ WmmaTile() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }

  template <class Frag>
  __device__ __forceinline__ static void to_tf32(Frag& f) {
#pragma unroll
    for (int e = 0; e < f.num_elements; ++e) f.x[e] = wmma::__float_to_tf32(f.x[e]);
  }

  template <int kLdA, int kLdB>
  __device__ __forceinline__ void multiply(const T* A, const T* B, int tid) {
    const int warp = tid / 32, wm = warp % 4, wn = warp / 4;
#pragma unroll
    for (int kk = 0; kk < Cfg::kK; kk += KS) {
      FragA fa[FM];
      FragB fb[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int m = wm * WM + i * 16;
        wmma::load_matrix_sync(fa[i], kARows ? A + kk * kLdA + m : A + m * kLdA + kk, kLdA);
        to_tf32(fa[i]);
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        const int n = wn * WN + j * 16;
        wmma::load_matrix_sync(fb[j], kBRows ? B + kk * kLdB + n : B + n * kLdB + kk, kLdB);
        to_tf32(fb[j]);
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }

  template <int kLdC>
  __device__ __forceinline__ void store(float* sc, int tid) const {
    const int warp = tid / 32, wm = warp % 4, wn = warp / 4;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        wmma::store_matrix_sync(sc + (wm * WM + i * 16) * kLdC + wn * WN + j * 16, acc[i][j], kLdC,
                                wmma::mem_row_major);
      }
  }
};

// The pipeline over k tiles. With vectors of 4 bytes or more the tiles move by cp.async
// into kAsyncStages shared buffers: tiles t + 1 .. t + kAsyncStages - 1 are in flight while
// tile t is multiplied, with one barrier per tile. Narrower vectors (16-bit types without
// channel vectors) go through registers into two buffers: tile t + 1's loads are issued
// before tile t's products and stored after them.
constexpr int kAsyncStages = 3;

template <typename T, int V>
constexpr bool kAsyncTiles = V * sizeof(T) >= 4;

template <class Cfg, class P, int V>
struct GemmSmem {
  using T = typename Cfg::T;
  using ALoad = TileLoad<T, Cfg::kM, Cfg::kK, V, P::kARowMajor>;
  using BLoad = TileLoad<T, Cfg::kN, Cfg::kK, V, P::kBRowMajor>;
  static constexpr int kStages = kAsyncTiles<T, V> ? kAsyncStages : 2;
  static constexpr int kLdC = Cfg::kN + 16 / static_cast<int>(sizeof(acc_t<T>));
  static constexpr size_t kStaging =
      static_cast<size_t>(kStages) * (ALoad::kElems + BLoad::kElems) * sizeof(T);
  static constexpr size_t kEpilogue = static_cast<size_t>(Cfg::kM) * kLdC * sizeof(acc_t<T>);
  // Dynamic: [A stages][B stages], reused by the epilogue's C tile once the loop is done.
  static constexpr size_t kBytes = kStaging > kEpilogue ? kStaging : kEpilogue;
};

template <class Cfg, class P, int V>
__global__ void __launch_bounds__(kGemmThreads, 2) implicit_gemm(const P p) {
  using T = typename Cfg::T;
  using Acc = acc_t<T>;
  using S = GemmSmem<Cfg, P, V>;
  using ALoad = typename S::ALoad;
  using BLoad = typename S::BLoad;
  constexpr int BM = Cfg::kM, BN = Cfg::kN, BK = Cfg::kK, kStages = S::kStages;
  using Product = std::conditional_t<
      Cfg::kMath == Math::Fma, FmaTile<Cfg, P::kARowMajor, P::kBRowMajor>,
      std::conditional_t<Cfg::kMath == Math::Mma16, MmaTile<Cfg, P::kARowMajor, P::kBRowMajor>,
                         WmmaTile<Cfg, P::kARowMajor, P::kBRowMajor>>>;

  __shared__ RowInfo a_rows[BM];
  __shared__ RowInfo b_rows[BN];
  __shared__ int64_t c_rows[BM];
  T* const sa = reinterpret_cast<T*>(dynamic_smem());
  T* const sb = sa + kStages * ALoad::kElems;

  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int n0 = static_cast<int>(blockIdx.y) * BN;
  const int g = static_cast<int>(blockIdx.z % p.groups);
  const int split = static_cast<int>(blockIdx.z / p.groups);

  for (int r = tid; r < BM; r += kGemmThreads) {
    a_rows[r] = p.a.row(g, m0 + r);
    c_rows[r] = p.c.row(g, split, m0 + r);
  }
  for (int r = tid; r < BN; r += kGemmThreads) b_rows[r] = p.b.row(g, n0 + r);
  __syncthreads();

  const int64_t kb = static_cast<int64_t>(split) * p.k_per_split;
  const int64_t ke = kb + p.k_per_split < p.k_total ? kb + p.k_per_split : p.k_total;
  const int64_t tiles = kb < ke ? (ke - kb + BK - 1) / BK : 0;
  Product product;

  if constexpr (kAsyncTiles<T, V>) {
    const auto copy = [&](int64_t t) {
      const int s = static_cast<int>(t % kStages);
      ALoad::copy(p.a, a_rows, g, kb + t * BK, ke, tid, sa + s * ALoad::kElems);
      BLoad::copy(p.b, b_rows, g, kb + t * BK, ke, tid, sb + s * BLoad::kElems);
    };
    // One commit group per tile, empty past the last, so that group t is tile t's.
    for (int t = 0; t < kStages - 1; ++t) {
      if (t < tiles) copy(t);
      async_copy_commit();
    }
    for (int64_t t = 0; t < tiles; ++t) {
      async_copy_wait<kStages - 2>();  // this thread's part of tile t has landed
      __syncthreads();  // everyone's has, and everyone is done with tile t - 1's buffer
      if (t + kStages - 1 < tiles) copy(t + kStages - 1);  // into tile t - 1's buffer
      async_copy_commit();
      const int s = static_cast<int>(t % kStages);
      product.template multiply<ALoad::kLd, BLoad::kLd>(sa + s * ALoad::kElems,
                                                        sb + s * BLoad::kElems, tid);
    }
    async_copy_wait<0>();  // only empty groups are left
  } else {
    ALoad la;
    BLoad lb;
    if (tiles > 0) {
      la.load(p.a, a_rows, g, kb, ke, tid);
      lb.load(p.b, b_rows, g, kb, ke, tid);
      la.store(sa, tid);
      lb.store(sb, tid);
    }
    __syncthreads();
    for (int64_t t = 0; t < tiles; ++t) {
      const int cur = static_cast<int>(t & 1);
      const bool more = t + 1 < tiles;
      if (more) {
        la.load(p.a, a_rows, g, kb + (t + 1) * BK, ke, tid);
        lb.load(p.b, b_rows, g, kb + (t + 1) * BK, ke, tid);
      }
      product.template multiply<ALoad::kLd, BLoad::kLd>(sa + cur * ALoad::kElems,
                                                        sb + cur * BLoad::kElems, tid);
      if (more) {
        la.store(sa + (cur ^ 1) * ALoad::kElems, tid);
        lb.store(sb + (cur ^ 1) * BLoad::kElems, tid);
      }
      __syncthreads();
    }
  }
  __syncthreads();  // the staging buffers become the C tile
  constexpr int kLdC = S::kLdC;
  Acc* const sc = reinterpret_cast<Acc*>(dynamic_smem());
  product.template store<kLdC>(sc, tid);
  __syncthreads();

  // Epilogue: consecutive threads take consecutive columns (channels, contiguous in
  // channels_last: 16-byte vectors of them where the host allows) or, where the output's
  // rows are contiguous (NCHW), consecutive rows.
  if (p.c.vec_cols) {
    constexpr int VC = 16 / static_cast<int>(sizeof(T));
    constexpr int kGroups = BN / VC;
    for (int e = tid; e < BM * kGroups; e += kGemmThreads) {
      const int r = e / kGroups, cidx = (e % kGroups) * VC;
      const int64_t base = c_rows[r];
      int64_t off;
      if (base < 0 || !p.c.col(g, n0 + cidx, off)) continue;  // VC columns valid or none
      Acc v[VC];
#pragma unroll
      for (int q = 0; q < VC; ++q) v[q] = sc[r * kLdC + cidx + q];
      p.c.template store_vec<VC>(base + off, g, n0 + cidx, v);
    }
  } else {
    const bool rows_first = p.c.rows_first;
    for (int e = tid; e < BM * BN; e += kGemmThreads) {
      const int r = rows_first ? e % BM : e / BN;
      const int cidx = rows_first ? e / BM : e % BN;
      const int64_t base = c_rows[r];
      int64_t off;
      if (base < 0 || !p.c.col(g, n0 + cidx, off)) continue;
      p.c.store(base + off, g, n0 + cidx, sc[r * kLdC + cidx]);
    }
  }
}

// ---- launch helpers ------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Every in-image coordinate, tap offset and per-group count fits comfortably in int (the
// kernels add two of them, and a sentinel of -2^30, without overflow).
bool geometry_fits(const Conv2dShape& s) {
  constexpr int64_t kLimit = int64_t{1} << 28;
  const int64_t values[] = {s.h + s.pad_h, s.w + s.pad_w, s.oh * s.stride_h, s.ow * s.stride_w,
                            (s.kh - 1) * s.dil_h + 1, (s.kw - 1) * s.dil_w + 1,
                            s.c_per_group() * s.kh * s.kw, s.o_per_group() * s.kh * s.kw,
                            s.oh * s.ow, s.h * s.w, s.pad_h + 1, s.pad_w + 1};
  for (int64_t v : values) {
    if (v < 0 || v >= kLimit) return false;
  }
  return s.groups > 0 && s.groups <= 65535;
}

}  // namespace

const char* conv2d_unsupported(const Conv2dShape& s) {
  if (s.groups > 65535) return "more than 65535 groups (one grid dimension per group)";
  if (!geometry_fits(s)) return "an image, kernel, padding or GEMM dimension of 2^28 or more";
  // A GEMM's N tiles run along gridDim.y (at most 65535): N is O/groups (forward), C/groups
  // (dgrad) or C/groups * KH * KW (wgrad), and every tile config has kN = 64.
  constexpr int64_t kMaxN = int64_t{65535} * 64;
  if (s.o_per_group() > kMaxN || s.c_per_group() * s.kh * s.kw > kMaxN) {
    return "more than 4194240 output channels, or input channels x kernel taps, per group "
           "(one grid row per 64)";
  }
  return nullptr;
}

namespace {

bool stride_ok(int64_t size, int64_t stride, int v) { return size <= 1 || stride % v == 0; }

// V-element vectors along the channels of a tensor (dims n, c, h, w) whose channels are
// taken `chunk` at a time (a group's): dense channels, chunk % V == 0, aligned otherwise.
template <typename T>
bool channel_vectors(const void* ptr, Strides4 st, int64_t n, int64_t h, int64_t w,
                     int64_t chunk, int v) {
  return st.c == 1 && chunk % v == 0 && aligned(ptr, v * sizeof(T)) && stride_ok(n, st.n, v) &&
         stride_ok(h, st.h, v) && stride_ok(w, st.w, v);
}

template <class Cfg, class P>
cudaError_t launch_gemm(const P& p, bool vectors, int64_t m, int64_t n, int64_t z,
                        cudaStream_t stream) {
  using T = typename Cfg::T;
  const int64_t gx = ceil_div(m, Cfg::kM), gy = ceil_div(n, Cfg::kN);
  if (gx == 0 || gy == 0 || z == 0) return cudaSuccess;
  if (gx > std::numeric_limits<int32_t>::max() || gy > 65535 || z > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(z));
  const auto launch = [&](auto v) -> cudaError_t {
    const auto kernel = implicit_gemm<Cfg, P, decltype(v)::value>;
    constexpr size_t kBytes = GemmSmem<Cfg, P, decltype(v)::value>::kBytes;
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kBytes));
    if (err != cudaSuccess) return err;
    launch_kernel(kernel, grid, kGemmThreads, kBytes, stream, p);
    return cudaGetLastError();
  };
  if (vectors) return launch(std::integral_constant<int, 16 / static_cast<int>(sizeof(T))>{});
  return launch(std::integral_constant<int, 1>{});
}

// ---- forward / dgrad -----------------------------------------------------------------------

// The forward problem, and whether its operands take 16-byte vectors along the channels.
template <typename T>
Problem<FwdX<T>, FwdW<T>, FwdY<T>, false, false> forward_problem(
    const void* x, Strides4 xs, const void* w, Strides4 ws, const void* bias, void* y,
    Strides4 ys, const Conv2dShape& s, bool relu) {
  const Geometry geo(s);
  const int64_t m = s.n * s.oh * s.ow;
  const TapDiv tap(geo.cpg, geo.kw);
  const PixelDiv pix(geo.oh, geo.ow);
  Problem<FwdX<T>, FwdW<T>, FwdY<T>, false, false> p{};
  p.a = FwdX<T>{static_cast<const T*>(x), xs, geo, m, pix, tap};
  p.b = FwdW<T>{static_cast<const T*>(w), ws, geo.opg, tap};
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  p.c = FwdY<T>{static_cast<T*>(y), ys, static_cast<const T*>(bias), m, geo.opg, relu,
                ys.w == 1 && ys.c != 1,
                channel_vectors<T>(y, ys, s.n, s.oh, s.ow, geo.opg, V), pix};
  p.groups = static_cast<int>(s.groups);
  p.k_total = s.c_per_group() * s.kh * s.kw;
  p.k_per_split = p.k_total;
  return p;
}

template <typename T>
bool forward_vectors(const void* x, Strides4 xs, const void* w, Strides4 ws,
                     const Conv2dShape& s) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  return channel_vectors<T>(x, xs, s.n, s.h, s.w, s.c_per_group(), V) &&
         channel_vectors<T>(w, ws, s.o, s.kh, s.kw, s.c_per_group(), V);
}

template <typename T>
cudaError_t forward_typed(const void* x, Strides4 xs, const void* w, Strides4 ws,
                          const void* bias, void* y, Strides4 ys, const Conv2dShape& s,
                          bool relu, bool tf32, cudaStream_t stream) {
  if (!geometry_fits(s)) return cudaErrorInvalidValue;
  const auto p = forward_problem<T>(x, xs, w, ws, bias, y, ys, s, relu);
  const bool vectors = forward_vectors<T>(x, xs, w, ws, s);
  return with_tiles<T>(tf32, [&](auto tiles) {
    return launch_gemm<decltype(tiles)>(p, vectors, s.n * s.oh * s.ow, s.o_per_group(),
                                        s.groups, stream);
  });
}

template <typename T>
Problem<DgradGy<T>, DgradW<T>, DgradGx<T>, false, true> backward_input_problem(
    const void* gy, Strides4 gys, const void* w, Strides4 ws, void* gx, Strides4 gxs,
    const Conv2dShape& s) {
  const Geometry geo(s);
  const int64_t m = s.n * s.h * s.w;
  const TapDiv tap(geo.opg, geo.kw);
  const PixelDiv pix(geo.h, geo.w);
  Problem<DgradGy<T>, DgradW<T>, DgradGx<T>, false, true> p{};
  p.a = DgradGy<T>{static_cast<const T*>(gy), gys, geo, m, pix, tap, FastDiv(geo.sh),
                   FastDiv(geo.sw)};
  p.b = DgradW<T>{static_cast<const T*>(w), ws, geo.cpg, geo.opg, tap};
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  p.c = DgradGx<T>{static_cast<T*>(gx), gxs, m, geo.cpg, gxs.w == 1 && gxs.c != 1,
                   channel_vectors<T>(gx, gxs, s.n, s.h, s.w, geo.cpg, V), pix};
  p.groups = static_cast<int>(s.groups);
  p.k_total = s.o_per_group() * s.kh * s.kw;
  p.k_per_split = p.k_total;
  return p;
}

template <typename T>
bool backward_input_vectors(const void* gy, Strides4 gys, const void* w, Strides4 ws,
                            const Conv2dShape& s) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  return channel_vectors<T>(gy, gys, s.n, s.oh, s.ow, s.o_per_group(), V) &&
         channel_vectors<T>(w, ws, s.o, s.kh, s.kw, s.c_per_group(), V);
}

template <typename T>
cudaError_t backward_input_typed(const void* gy, Strides4 gys, const void* w, Strides4 ws,
                                 void* gx, Strides4 gxs, const Conv2dShape& s, bool tf32,
                                 cudaStream_t stream) {
  if (!geometry_fits(s)) return cudaErrorInvalidValue;
  const auto p = backward_input_problem<T>(gy, gys, w, ws, gx, gxs, s);
  const bool vectors = backward_input_vectors<T>(gy, gys, w, ws, s);
  return with_tiles<T>(tf32, [&](auto tiles) {
    return launch_gemm<decltype(tiles)>(p, vectors, s.n * s.h * s.w, s.c_per_group(),
                                        s.groups, stream);
  });
}

// ---- wgrad ---------------------------------------------------------------------------------

// Split-K for wgrad, from the shape alone (the workspace size must not depend on the dtype):
// enough splits to give about kSliceTargetBlocks (common.cuh) blocks of the 128 x 64 tile,
// each split at least kMinChunks chunks of 32 along K so that its partial tile is small next
// to its products.
constexpr int64_t kChunk = 32;
constexpr int64_t kMinChunks = 16;
constexpr int64_t kMaxSplits = 64;

struct SplitK {
  int64_t splits, per;  // per: K elements per split, a multiple of kChunk
};

SplitK wgrad_split(const Conv2dShape& s) {
  const int64_t m = s.o_per_group(), n = s.c_per_group() * s.kh * s.kw, k = s.n * s.oh * s.ow;
  const int64_t blocks = ceil_div(m, 128) * ceil_div(n, 64) * s.groups;
  const int64_t chunks = ceil_div(k, kChunk);
  int64_t splits = blocks > 0 ? ceil_div(kSliceTargetBlocks, blocks) : 1;
  const int64_t most = chunks / kMinChunks;
  if (splits > most) splits = most;
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (s.groups > 0 && splits > 65535 / s.groups) splits = 65535 / s.groups;
  if (splits < 1) splits = 1;
  const int64_t per = ceil_div(chunks, splits) * kChunk;
  if (per == 0) return {1, kChunk};
  return {ceil_div(k, per), per};  // no split left empty
}

// gw[g*opg + o, c, r, s] = sum over splits, in split order, of ws[split][g][o][(r, s, c)].
template <typename T>
__device__ __forceinline__ void wgrad_reduce_one(const float* ws, T* gw, Strides4 st,
                                                 int64_t total, int splits, int taps,
                                                 const TapDiv& tap, int64_t i) {
  float sum = 0.0f;
  for (int sp = 0; sp < splits; ++sp) sum += ws[sp * total + i];
  const int64_t o = i / taps;  // g * opg + o: the workspace keeps groups in channel order
  int r, s, c;
  tap.split(static_cast<int>(i - o * taps), r, s, c);
  gw[o * st.n + c * st.c + r * st.h + s * st.w] = from_acc<T>(sum);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    wgrad_reduce(const float* __restrict__ ws, T* __restrict__ gw, Strides4 st, int64_t total,
                 int splits, int taps, TapDiv tap) {
  for (int64_t i = first_item<int64_t>(); i < total; i += grid_step<int64_t>()) {
    wgrad_reduce_one(ws, gw, st, total, splits, taps, tap, i);
  }
}

template <typename T, bool kPartial>
Problem<WgradGy<T>, WgradX<T>, WgradOut<T, kPartial>, true, true> backward_weight_problem(
    const void* gy, Strides4 gys, const void* x, Strides4 xs, void* gw, Strides4 gws,
    float* workspace, const Conv2dShape& s, const SplitK& sk) {
  using Out = WgradOut<T, kPartial>;
  const Geometry geo(s);
  const int taps = static_cast<int>(s.c_per_group() * s.kh * s.kw);
  const TapDiv tap(geo.cpg, geo.kw);
  const PixelDiv pix(geo.oh, geo.ow);
  Problem<WgradGy<T>, WgradX<T>, Out, true, true> p{};
  p.a = WgradGy<T>{static_cast<const T*>(gy), gys, geo.opg, pix};
  p.b = WgradX<T>{static_cast<const T*>(x), xs, geo, taps, pix, tap};
  if constexpr (kPartial) {
    p.c = Out{workspace, gws, geo.opg, taps, static_cast<int>(s.groups), false, false, tap};
  } else {
    p.c = Out{static_cast<T*>(gw), gws, geo.opg, taps, static_cast<int>(s.groups), false, false,
              tap};
  }
  p.groups = static_cast<int>(s.groups);
  p.k_total = s.n * s.oh * s.ow;
  p.k_per_split = sk.per;
  return p;
}

template <typename T>
bool backward_weight_vectors(const void* gy, Strides4 gys, const void* x, Strides4 xs,
                             const Conv2dShape& s) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  return channel_vectors<T>(gy, gys, s.n, s.oh, s.ow, s.o_per_group(), V) &&
         channel_vectors<T>(x, xs, s.n, s.h, s.w, s.c_per_group(), V);
}

// The split-K plan of a dtype: float64 never splits (its partial sums would be float32).
template <typename T>
SplitK split_for(const Conv2dShape& s) {
  if constexpr (std::is_same_v<T, double>) {
    const int64_t k = s.n * s.oh * s.ow;
    return SplitK{1, k > 0 ? k : 1};
  } else {
    return wgrad_split(s);
  }
}

template <typename T>
cudaError_t backward_weight_typed(const void* gy, Strides4 gys, const void* x, Strides4 xs,
                                  void* gw, Strides4 gws, float* workspace,
                                  const Conv2dShape& s, bool tf32, cudaStream_t stream) {
  if (!geometry_fits(s)) return cudaErrorInvalidValue;
  const SplitK sk = split_for<T>(s);
  const bool vectors = backward_weight_vectors<T>(gy, gys, x, xs, s);
  const int64_t taps = s.c_per_group() * s.kh * s.kw;
  const auto run = [&](auto partial) -> cudaError_t {
    const auto p = backward_weight_problem<T, decltype(partial)::value>(gy, gys, x, xs, gw, gws,
                                                                        workspace, s, sk);
    return with_tiles<T>(tf32, [&](auto tiles) {
      return launch_gemm<decltype(tiles)>(p, vectors, s.o_per_group(), taps,
                                          sk.splits * s.groups, stream);
    });
  };
  if constexpr (std::is_same_v<T, double>) {
    return run(std::false_type{});
  } else {
    if (sk.splits == 1) return run(std::false_type{});
    const cudaError_t err = run(std::true_type{});
    if (err != cudaSuccess) return err;
    const int64_t total = s.o * taps;
    if (total == 0) return cudaSuccess;
    launch_kernel(wgrad_reduce<T>, blocks_for(total), kThreads, 0, stream, workspace,
                  static_cast<T*>(gw), gws, total, static_cast<int>(sk.splits),
                  static_cast<int>(taps), TapDiv(s.c_per_group(), s.kw));
    return cudaGetLastError();
  }
}

// ---- bias / ReLU backward ------------------------------------------------------------------

constexpr int kBiasThreads = 512;

// g = gy * (y > 0) (or gy) at flat pixel q of channel o, written to g_out if given. y <= 0
// blocks the gradient (a NaN y passes it, as PyTorch's threshold_backward does).
template <typename T>
__device__ __forceinline__ acc_t<T> bias_grad_at(const T* __restrict__ gy, Strides4 gys,
                                                 const T* __restrict__ y, Strides4 ys,
                                                 T* __restrict__ g_out, int64_t o, int64_t q,
                                                 const PixelDiv& pix) {
  using A = acc_t<T>;
  int64_t n;
  int i, j;
  pix.split(q, n, i, j);
  const int64_t off = n * gys.n + o * gys.c + i * gys.h + j * gys.w;
  A v = to_acc(gy[off]);
  if (y != nullptr && to_acc(y[n * ys.n + o * ys.c + i * ys.h + j * ys.w]) <= A(0)) v = A(0);
  if (g_out != nullptr) g_out[off] = from_acc<T>(v);
  return v;
}

// One block per output channel: g over every (n, i, j) of the channel, written to g_out if
// given, summed in a fixed order into grad_bias[o] if given.
template <typename T>
__global__ void __launch_bounds__(kBiasThreads)
    bias_relu_backward(const T* __restrict__ gy, Strides4 gys, const T* __restrict__ y,
                       Strides4 ys, T* __restrict__ g_out, T* __restrict__ grad_bias,
                       int64_t count, PixelDiv pix) {
  using A = acc_t<T>;
  const int64_t o = blockIdx.x;
  A sum = A(0);
  for (int64_t q = threadIdx.x; q < count; q += kBiasThreads) {
    sum += bias_grad_at(gy, gys, y, ys, g_out, o, q, pix);
  }
  if (grad_bias == nullptr) return;
  // Shuffle tree within each warp, then warp 0 adds the warps' sums in order.
#pragma unroll
  for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, d);
  __shared__ A partial[kBiasThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    A total = A(0);
    for (int w = 0; w < kBiasThreads / 32; ++w) total += partial[w];
    grad_bias[o] = from_acc<T>(total);
  }
}

// Channels innermost (channels_last): the block above would read one element per 64- or
// 128-byte line. Here a warp's lanes take 32 adjacent channels of a pixel (coalesced), the
// block's 8 warps every 8th pixel of a slice, and slices of the pixels go to blockIdx.y so
// that a few channel blocks still fill the GPU. Each block writes its channels' sums to
// partial[slice][o]; sum_bias_slices adds the slices in order (deterministic).
constexpr int kRowLanes = 32, kRowWarps = 8;

template <typename T>
__global__ void __launch_bounds__(kRowLanes * kRowWarps)
    bias_relu_backward_rows(const T* __restrict__ gy, Strides4 gys, const T* __restrict__ y,
                            Strides4 ys, T* __restrict__ g_out, acc_t<T>* __restrict__ partial,
                            int64_t channels, int64_t count, int64_t per, PixelDiv pix) {
  using A = acc_t<T>;
  const int lane = threadIdx.x % kRowLanes, warp = threadIdx.x / kRowLanes;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kRowLanes + lane;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * per;
  const int64_t q1 = q0 + per < count ? q0 + per : count;
  A sum = A(0);
  if (o < channels) {
    for (int64_t q = q0 + warp; q < q1; q += kRowWarps) {
      sum += bias_grad_at(gy, gys, y, ys, g_out, o, q, pix);
    }
  }
  if (partial == nullptr) return;  // block-uniform
  __shared__ A part[kRowWarps][kRowLanes];
  part[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && o < channels) {
    A total = A(0);
    for (int w = 0; w < kRowWarps; ++w) total += part[w][lane];
    partial[blockIdx.y * channels + o] = total;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sum_bias_slices(const acc_t<T>* __restrict__ partial, int64_t slices, int64_t channels,
                    T* __restrict__ grad_bias) {
  using A = acc_t<T>;
  for (int64_t o = first_item<int64_t>(); o < channels; o += grid_step<int64_t>()) {
    grad_bias[o] = from_acc<T>(sum_slices<A>(partial, slices, channels, o));
  }
}

bool channels_innermost(Strides4 gys, const Conv2dShape& s) { return gys.c == 1 && s.o > 1; }

// Pixel slices for bias_relu_backward_rows: at least 256 pixels (32 per warp) in a slice.
Slices bias_slices(const Conv2dShape& s) {
  return slices_for(s.n * s.oh * s.ow, ceil_div(s.o, kRowLanes), 256);
}

template <typename T>
cudaError_t bias_relu_backward_typed(const void* gy, Strides4 gys, const void* y, Strides4 ys,
                                     void* g_out, void* grad_bias, void* workspace,
                                     const Conv2dShape& s, cudaStream_t stream) {
  using A = acc_t<T>;
  if (s.o == 0 || (g_out == nullptr && grad_bias == nullptr)) return cudaSuccess;
  if (conv2d_bias_relu_unsupported(s) != nullptr) return cudaErrorInvalidValue;
  const int64_t count = s.n * s.oh * s.ow;
  if (!channels_innermost(gys, s)) {
    launch_kernel(bias_relu_backward<T>, static_cast<unsigned>(s.o), kBiasThreads, 0, stream,
                  static_cast<const T*>(gy), gys, static_cast<const T*>(y), ys,
                  static_cast<T*>(g_out), static_cast<T*>(grad_bias), count, PixelDiv(s.oh, s.ow));
    return cudaGetLastError();
  }
  if (grad_bias != nullptr && workspace == nullptr) return cudaErrorInvalidValue;
  const Slices sl = bias_slices(s);
  A* partial = grad_bias != nullptr ? static_cast<A*>(workspace) : nullptr;
  const dim3 grid(static_cast<unsigned>(ceil_div(s.o, kRowLanes)),
                  static_cast<unsigned>(sl.count));
  launch_kernel(bias_relu_backward_rows<T>, grid, kRowLanes * kRowWarps, 0, stream,
                static_cast<const T*>(gy), gys, static_cast<const T*>(y), ys,
                static_cast<T*>(g_out), partial, s.o, count, sl.per, PixelDiv(s.oh, s.ow));
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || partial == nullptr) return err;
  launch_kernel(sum_bias_slices<T>, blocks_for(s.o), kThreads, 0, stream, partial, sl.count, s.o,
                static_cast<T*>(grad_bias));
  return cudaGetLastError();
}

}  // namespace

int64_t conv2d_bias_relu_backward_workspace(DType dtype, Strides4 gys, const Conv2dShape& s) {
  if (s.o == 0 || !channels_innermost(gys, s) || conv2d_bias_relu_unsupported(s) != nullptr) {
    return 0;
  }
  const int64_t acc_bytes = dtype == DType::Float64 ? 8 : 4;
  return bias_slices(s).count * s.o * acc_bytes;
}

const char* conv2d_bias_relu_unsupported(const Conv2dShape& s) {
  if (s.o > std::numeric_limits<int32_t>::max()) return "more than 2^31 - 1 output channels";
  if (s.oh * s.ow >= (int64_t{1} << 30)) return "an output of 2^30 or more pixels per channel";
  return nullptr;
}

cudaError_t conv2d_forward(DType dtype, const void* x, Strides4 xs, const void* w, Strides4 ws,
                           const void* bias, void* y, Strides4 ys, const Conv2dShape& shape,
                           bool relu, bool tf32, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return forward_typed<float>(x, xs, w, ws, bias, y, ys, shape, relu, tf32, stream);
    case DType::Float64: return forward_typed<double>(x, xs, w, ws, bias, y, ys, shape, relu, tf32, stream);
    case DType::Float16: return forward_typed<__half>(x, xs, w, ws, bias, y, ys, shape, relu, tf32, stream);
    case DType::BFloat16: return forward_typed<__nv_bfloat16>(x, xs, w, ws, bias, y, ys, shape, relu, tf32, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t conv2d_backward_input(DType dtype, const void* gy, Strides4 gys, const void* w,
                                  Strides4 ws, void* gx, Strides4 gxs, const Conv2dShape& shape,
                                  bool tf32, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return backward_input_typed<float>(gy, gys, w, ws, gx, gxs, shape, tf32, stream);
    case DType::Float64: return backward_input_typed<double>(gy, gys, w, ws, gx, gxs, shape, tf32, stream);
    case DType::Float16: return backward_input_typed<__half>(gy, gys, w, ws, gx, gxs, shape, tf32, stream);
    case DType::BFloat16: return backward_input_typed<__nv_bfloat16>(gy, gys, w, ws, gx, gxs, shape, tf32, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

int64_t conv2d_backward_weight_workspace(const Conv2dShape& shape) {
  if (!geometry_fits(shape)) return 0;
  const SplitK sk = wgrad_split(shape);
  if (sk.splits <= 1) return 0;
  return sk.splits * shape.o * shape.c_per_group() * shape.kh * shape.kw;
}

cudaError_t conv2d_backward_weight(DType dtype, const void* gy, Strides4 gys, const void* x,
                                   Strides4 xs, void* gw, Strides4 gws, float* workspace,
                                   const Conv2dShape& shape, bool tf32, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return backward_weight_typed<float>(gy, gys, x, xs, gw, gws, workspace, shape, tf32, stream);
    case DType::Float64: return backward_weight_typed<double>(gy, gys, x, xs, gw, gws, workspace, shape, tf32, stream);
    case DType::Float16: return backward_weight_typed<__half>(gy, gys, x, xs, gw, gws, workspace, shape, tf32, stream);
    case DType::BFloat16: return backward_weight_typed<__nv_bfloat16>(gy, gys, x, xs, gw, gws, workspace, shape, tf32, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t conv2d_bias_relu_backward(DType dtype, const void* gy, Strides4 gys, const void* y,
                                      Strides4 ys, void* g_out, void* grad_bias, void* workspace,
                                      const Conv2dShape& shape, cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32: return bias_relu_backward_typed<float>(gy, gys, y, ys, g_out, grad_bias, workspace, shape, stream);
    case DType::Float64: return bias_relu_backward_typed<double>(gy, gys, y, ys, g_out, grad_bias, workspace, shape, stream);
    case DType::Float16: return bias_relu_backward_typed<__half>(gy, gys, y, ys, g_out, grad_bias, workspace, shape, stream);
    case DType::BFloat16: return bias_relu_backward_typed<__nv_bfloat16>(gy, gys, y, ys, g_out, grad_bias, workspace, shape, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace dlcv_fast::cuda
