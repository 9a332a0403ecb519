// conv2d on the CPU as im2col + GEMM (conv2d_shape.h for the notation).
//
// NCHW, one image and one group at a time: cols[(c, r, s), (i, j)] holds the input tap that
// weight element (c, r, s) meets at output (i, j), so y_g (O/G x OH*OW) = W_g (O/G x K) cols.
// NHWC, a chunk of images at a time: cols[(n, i, j), (r, s, c)] (channels innermost, as in
// memory), y_g (rows x O/G) = cols W_g'^T with the weight reordered to (O, KH, KW, C/G).
// The forward pass builds and multiplies the columns of a few output rows per task instead,
// one GEMM per thread, so that the columns never leave the cache.
// The backward passes are the transposed products: dgrad forms the column gradient and
// scatters it back (col2im), wgrad multiplies the output gradient by the columns (in the
// forward's tiles, into one accumulator per thread, where those cost less than whole images).
// A 1x1 convolution with stride 1 and no padding needs no columns: the input is one.

#include "conv2d.h"

#include "common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cstring>

namespace dlcv_fast::cpu {
namespace {

// Bytes of columns built at once (NHWC chunks of images): large enough for long GEMMs,
// small enough to stay cheap in memory at any batch.
constexpr int64_t kColumnBytes = int64_t{64} << 20;

bool is_channels_last(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// Outputs o in [lo, hi) whose tap o * stride + offset lies in [0, size).
void valid_range(int64_t offset, int64_t stride, int64_t size, int64_t out, int64_t& lo,
                 int64_t& hi) {
  lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  hi = size - 1 - offset < 0 ? 0 : std::min(out, (size - 1 - offset) / stride + 1);
  lo = std::min(lo, hi);
}

bool is_pointwise(const Conv2dShape& s) {
  return s.kh == 1 && s.kw == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_h == 0 &&
         s.pad_w == 0 && s.oh == s.h && s.ow == s.w;
}

// at::parallel_for for bodies that call ATen ops: each worker takes the caller's thread-local
// state. Worker threads start from the defaults, and under torch.inference_mode an ATen op
// there writing into a view of the (inference) output raises.
template <class F>
void parallel_for_aten(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    const at::ThreadLocalStateGuard guard(state);
    f(b, e);
  });
}

// --- NCHW -------------------------------------------------------------------------------

// cols (K x (i1 - i0)*OW) of output rows [i0, i1) of one image's group starting at channel
// c0; x is the image (C, H, W). Row k starts at cols + k * ld (default: packed).
template <typename T>
void im2col_nchw_rows(const T* x, T* cols, const Conv2dShape& s, int64_t c0, int64_t i0,
                      int64_t i1, int64_t ld = -1) {
  const int64_t k_rows = s.c_per_group() * s.kh * s.kw, p = (i1 - i0) * s.ow;
  at::parallel_for(0, k_rows, grain(p), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t c = k / (s.kh * s.kw), r = k / s.kw % s.kh, q = k % s.kw;
      const T* plane = x + (c0 + c) * s.h * s.w;
      T* dst = cols + k * (ld < 0 ? p : ld);
      const int64_t off_w = q * s.dil_w - s.pad_w;
      int64_t j0, j1;
      valid_range(off_w, s.stride_w, s.w, s.ow, j0, j1);
      for (int64_t i = i0; i < i1; ++i, dst += s.ow) {
        const int64_t ih = i * s.stride_h - s.pad_h + r * s.dil_h;
        if (ih < 0 || ih >= s.h) {
          std::fill(dst, dst + s.ow, T(0));
          continue;
        }
        const T* src = plane + ih * s.w + off_w;
        std::fill(dst, dst + j0, T(0));
        if (s.stride_w == 1) {  // a run the compiler copies in vector loads
          std::copy(src + j0, src + j1, dst + j0);
        } else {
          for (int64_t j = j0; j < j1; ++j) dst[j] = src[j * s.stride_w];
        }
        std::fill(dst + j1, dst + s.ow, T(0));
      }
    }
  });
}

// Adds channel c's rows of one image's cols (K x OH*OW) back into its plane (H, W), which
// it zeroes first.
template <typename T>
void col2im_plane(const T* cols, T* plane, const Conv2dShape& s, int64_t c) {
  const int64_t p = s.oh * s.ow;
  std::fill(plane, plane + s.h * s.w, T(0));
  for (int64_t r = 0; r < s.kh; ++r) {
    for (int64_t q = 0; q < s.kw; ++q) {
      const T* src = cols + ((c * s.kh + r) * s.kw + q) * p;
      const int64_t off_w = q * s.dil_w - s.pad_w;
      int64_t j0, j1;
      valid_range(off_w, s.stride_w, s.w, s.ow, j0, j1);
      for (int64_t i = 0; i < s.oh; ++i) {
        const int64_t ih = i * s.stride_h - s.pad_h + r * s.dil_h;
        if (ih < 0 || ih >= s.h) continue;
        T* dst = plane + ih * s.w + off_w;
        const T* row = src + i * s.ow;
        for (int64_t j = j0; j < j1; ++j) dst[j * s.stride_w] += row[j];
      }
    }
  }
}

// Adds cols (K x OH*OW) back into one image's group planes gx (C, H, W) from channel c0;
// each channel's rows land in its own plane only, so channels run in parallel.
template <typename T>
void col2im_nchw(const T* cols, T* gx, const Conv2dShape& s, int64_t c0) {
  const int64_t p = s.oh * s.ow;
  at::parallel_for(0, s.c_per_group(), grain(s.kh * s.kw * p), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) col2im_plane(cols, gx + (c0 + c) * s.h * s.w, s, c);
  });
}

// The same for b whole images (one group): cols (b, K, OH*OW) into gx (b, C, H, W), the
// (image, channel) planes in parallel.
template <typename T>
void col2im_nchw_images(const T* cols, T* gx, const Conv2dShape& s, int64_t b) {
  const int64_t p = s.oh * s.ow, k = s.c * s.kh * s.kw;
  at::parallel_for(0, b * s.c, grain(s.kh * s.kw * p), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / s.c, c = t % s.c;
      col2im_plane(cols + n * k * p, gx + t * s.h * s.w, s, c);
    }
  });
}

// --- NHWC -------------------------------------------------------------------------------

// cols ((row1 - row0)*OW x KH*KW*Cg) of the output rows [row0, row1) (row = n * OH + i).
template <typename T>
void im2col_nhwc_rows(const T* x, T* cols, const Conv2dShape& s, int64_t row0, int64_t row1,
                      int64_t c0) {
  const int64_t cg = s.c_per_group(), k_cols = s.kh * s.kw * cg;
  at::parallel_for(row0, row1, grain(s.ow * k_cols), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / s.oh, i = row % s.oh;
      T* dst = cols + (row - row0) * s.ow * k_cols;
      for (int64_t j = 0; j < s.ow; ++j) {
        for (int64_t r = 0; r < s.kh; ++r) {
          const int64_t ih = i * s.stride_h - s.pad_h + r * s.dil_h;
          const int64_t iw0 = j * s.stride_w - s.pad_w;
          if (s.dil_w == 1 && cg == s.c && ih >= 0 && ih < s.h && iw0 >= 0 &&
              iw0 + s.kw <= s.w) {
            // The row's taps are adjacent in memory: one run of KW*C values (a 3-channel
            // 7x7 stem copied 3 values per tap spent 15% of its wgrad here).
            const T* src = x + ((n * s.h + ih) * s.w + iw0) * s.c;
            for (int64_t e = 0; e < s.kw * cg; ++e) dst[e] = src[e];
            dst += s.kw * cg;
            continue;
          }
          for (int64_t q = 0; q < s.kw; ++q, dst += cg) {
            const int64_t iw = j * s.stride_w - s.pad_w + q * s.dil_w;
            if (ih < 0 || ih >= s.h || iw < 0 || iw >= s.w) {
              std::fill(dst, dst + cg, T(0));
            } else {
              // A loop, not memcpy: with few channels (a 3-channel stem) a call per tap
              // would cost more than the copy.
              const T* src = x + ((n * s.h + ih) * s.w + iw) * s.c + c0;
              for (int64_t c = 0; c < cg; ++c) dst[c] = src[c];
            }
          }
        }
      }
    }
  });
}

// The same for the images [n0, n0 + b).
template <typename T>
void im2col_nhwc(const T* x, T* cols, const Conv2dShape& s, int64_t n0, int64_t b, int64_t c0) {
  im2col_nhwc_rows(x, cols, s, n0 * s.oh, (n0 + b) * s.oh, c0);
}

// Adds cols back into gx (N, H, W, C) for images [n0, n0 + b) and the group at c0, which it
// zeroes first. Tasks own (image, block of channels): two rows of cols that meet the same
// input position then never run at once.
template <typename T>
void col2im_nhwc(const T* cols, T* gx, const Conv2dShape& s, int64_t n0, int64_t b, int64_t c0) {
  const int64_t cg = s.c_per_group(), k_cols = s.kh * s.kw * cg;
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (cg + kBlock - 1) / kBlock;
  at::parallel_for(0, b * blocks, grain(s.oh * s.ow * s.kh * s.kw * kBlock),
                   [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = n0 + task / blocks, cb = task % blocks * kBlock;
      const int64_t width = std::min(kBlock, cg - cb);
      T* image = gx + n * s.h * s.w * s.c + c0 + cb;
      for (int64_t hw = 0; hw < s.h * s.w; ++hw) {
        std::fill(image + hw * s.c, image + hw * s.c + width, T(0));
      }
      const T* src = cols + (n - n0) * s.oh * s.ow * k_cols + cb;
      for (int64_t i = 0; i < s.oh; ++i) {
        for (int64_t j = 0; j < s.ow; ++j) {
          for (int64_t r = 0; r < s.kh; ++r) {
            const int64_t ih = i * s.stride_h - s.pad_h + r * s.dil_h;
            for (int64_t q = 0; q < s.kw; ++q) {
              const int64_t iw = j * s.stride_w - s.pad_w + q * s.dil_w;
              const T* v = src + ((i * s.ow + j) * s.kh * s.kw + r * s.kw + q) * cg;
              if (ih < 0 || ih >= s.h || iw < 0 || iw >= s.w) continue;
              T* dst = image + (ih * s.w + iw) * s.c;
              for (int64_t c = 0; c < width; ++c) dst[c] += v[c];
            }
          }
        }
      }
    }
  });
}

// Images per NHWC chunk: columns of at most kColumnBytes (at least one image).
int64_t images_per_chunk(const Conv2dShape& s, int64_t element_size) {
  const int64_t per_image = s.oh * s.ow * s.kh * s.kw * s.c_per_group() * element_size;
  return std::clamp<int64_t>(kColumnBytes / std::max<int64_t>(per_image, 1), 1, s.n);
}

// The tensors of one call in a type the GEMMs take: float32 or float64.
at::Tensor computable(const at::Tensor& t, at::MemoryFormat fmt) {
  const auto type = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return t.to(type).contiguous(fmt);
}

// Runs f(out') on an output in the compute type and layout `fmt`, then copies it into out
// unless out' is out itself.
template <typename F>
void into(at::Tensor& out, at::MemoryFormat fmt, F&& f) {
  const auto type = out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (out.scalar_type() == type && out.is_contiguous(fmt)) {
    f(out);
    return;
  }
  at::Tensor tmp = at::empty(out.sizes(), out.options().dtype(type).memory_format(fmt));
  f(tmp);
  out.copy_(tmp);
}

// (O, K) rows of the weight for the GEMMs: K in (c, r, s) order for NCHW, (r, s, c) for NHWC.
at::Tensor weight_matrix(const at::Tensor& w, bool nhwc) {
  const int64_t o = w.size(0);
  return nhwc ? w.permute({0, 2, 3, 1}).contiguous().view({o, -1}) : w.contiguous().view({o, -1});
}

// The (b*OH*OW x K) columns of images [n0, n0 + b) for group g (x NHWC): built in cols, or
// for a pointwise convolution the images' channels themselves.
at::Tensor columns_nhwc(const at::Tensor& x, at::Tensor& cols, const Conv2dShape& s,
                        int64_t n0, int64_t b, int64_t g) {
  const int64_t cg = s.c_per_group(), rows = b * s.oh * s.ow;
  if (is_pointwise(s)) {
    return x.permute({0, 2, 3, 1}).narrow(0, n0, b).reshape({rows, s.c}).narrow(1, g * cg, cg);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_im2col", [&] {
    im2col_nhwc(x.const_data_ptr<scalar_t>(), cols.mutable_data_ptr<scalar_t>(), s, n0, b,
                g * cg);
  });
  return cols.narrow(0, 0, rows);
}

// --- groups in batched GEMMs (NCHW) ---------------------------------------------------------
//
// With many small groups a GEMM per group costs more in calls than in arithmetic: the columns
// of `count` consecutive groups are built at once (as one group of their channels: group
// g0 + j's are rows j*K to (j+1)*K) and multiplied in one batched GEMM over the groups. On 2
// cores, a GEMM per group took 11x PyTorch's time for the weight gradient of 64 groups of
// 6 -> 16 channels 5x5 at 14x14 (LeNet-5's second layer under vmap: per-sample gradients)
// and 4x for its forward; the groups of a span are capped so that their columns still fit
// the cache-sized tile (columns of all 64 groups at once made the dgrad of 64 groups of 6
// channels 5x5 at 28x28 1.5x slower than a GEMM per group).

// The shape of groups [g0, g0 + count) of s as one group, for im2col/col2im from channel
// g0 * Cg.
inline Conv2dShape group_span(Conv2dShape s, int64_t count) {
  s.c = s.c_per_group() * count;
  s.o = s.o_per_group() * count;
  s.groups = 1;
  return s;
}

// out (count, M, N) = a (count, M, K) @ b (count, K, N) [+ bias (count or 1, M, 1)
// broadcast]: one GEMM when count is 1, else a batched one.
inline void group_gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b,
                       const std::optional<at::Tensor>& bias = std::nullopt) {
  if (out.size(0) == 1) {
    at::Tensor o = out[0];
    if (bias.has_value()) {
      at::addmm_out(o, (*bias)[0].expand(o.sizes()), a[0], b[0]);
    } else {
      at::mm_out(o, a[0], b[0]);
    }
  } else if (bias.has_value()) {
    at::baddbmm_out(out, bias->expand(out.sizes()), a, b);
  } else {
    at::bmm_out(out, a, b);
  }
}

// acc (count, M, N) += a @ b, likewise.
inline void group_gemm_add(at::Tensor acc, const at::Tensor& a, const at::Tensor& b) {
  if (acc.size(0) == 1) {
    acc[0].addmm_(a[0], b[0]);
  } else {
    acc.baddbmm_(a, b);
  }
}

// The (pixels x K) columns of one NHWC tile, output rows [r0, r1) (row n * OH + i, across
// images) of group g, built in cols.
at::Tensor tile_columns_nhwc(const at::Tensor& x, at::Tensor& cols, const Conv2dShape& s,
                             int64_t r0, int64_t r1, int64_t g) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_im2col", [&] {
    im2col_nhwc_rows(x.const_data_ptr<scalar_t>(), cols.mutable_data_ptr<scalar_t>(), s, r0, r1,
                     g * s.c_per_group());
  });
  return cols.narrow(0, 0, (r1 - r0) * s.ow);
}

// The NCHW columns of groups [g0, g0 + count) for output rows [r0, r1) of image n, (count,
// K, pixels): built in cols, or for a pointwise convolution the image's channels themselves.
at::Tensor span_columns(const at::Tensor& x, at::Tensor& cols, const Conv2dShape& s, int64_t n,
                        int64_t r0, int64_t r1, int64_t g0, int64_t count) {
  const int64_t cg = s.c_per_group(), k = cg * s.kh * s.kw, pixels = (r1 - r0) * s.ow;
  if (is_pointwise(s)) {
    return x[n].view({s.c, s.oh * s.ow}).narrow(0, g0 * cg, count * cg)
        .narrow(1, r0 * s.ow, pixels).view({count, k, pixels});
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_im2col", [&] {
    im2col_nchw_rows(x[n].const_data_ptr<scalar_t>(), cols.mutable_data_ptr<scalar_t>(),
                     group_span(s, count), g0 * cg, r0, r1);
  });
  return cols.view(-1).narrow(0, 0, count * k * pixels).view({count, k, pixels});
}

// Output rows per forward task: columns of about kTileBytes, so that they are still in
// the core's L2 cache when the GEMM reads them back, but at least kTilePixels pixels: a
// GEMM of fewer rows re-reads the weight (2.4 MB at 256 channels 3x3) for too little work.
constexpr int64_t kTileBytes = int64_t{512} << 10;
constexpr int64_t kTilePixels = 256;

// Whole images per task where an image's columns (`bytes_per_image`) take less than a
// tile: as many as fill one, but no more than a thread's share of the batch. A GEMM per
// image of LeNet-5 (1 -> 6 and 6 -> 16 channels, 5x5, at 32x32 and 14x14, batch 64) spent
// more time in calls than in arithmetic: its second layer's forward took 3x PyTorch's time,
// the wgrads 2x.
inline int64_t images_per_task(const Conv2dShape& s, int64_t bytes_per_image) {
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t share = (s.n + threads - 1) / threads;
  return std::clamp<int64_t>(kTileBytes / std::max<int64_t>(bytes_per_image, 1), 1, share);
}

// Groups per span: as many as keep `bytes_per_group` of columns each within kTileBytes.
inline int64_t groups_per_span(const Conv2dShape& s, int64_t bytes_per_group) {
  return std::clamp<int64_t>(kTileBytes / std::max<int64_t>(bytes_per_group, 1), 1, s.groups);
}

inline int64_t tile_rows(const Conv2dShape& s, int64_t k, int64_t element_size, int64_t rows) {
  if (is_pointwise(s)) return std::max<int64_t>(rows, 1);  // no columns: the longest GEMM
  const int64_t by_bytes = kTileBytes / std::max<int64_t>(s.ow * k * element_size, 1);
  const int64_t by_pixels = (kTilePixels + s.ow - 1) / std::max<int64_t>(s.ow, 1);
  const int64_t per = std::clamp<int64_t>(std::max(by_bytes, by_pixels), 1,
                                          std::max<int64_t>(rows, 1));
  const int64_t tiles = (rows + per - 1) / per;
  return std::max<int64_t>((rows + tiles - 1) / std::max<int64_t>(tiles, 1), 1);  // even tiles
}

// A pointwise convolution has no columns to keep in cache: one tile (NCHW: one per image)
// whose tasks run in turn on the calling thread, each GEMM on every thread.
inline int64_t task_grain(const Conv2dShape& s, int64_t tasks) {
  return is_pointwise(s) ? std::max<int64_t>(tasks, 1) : 1;
}

// Tasks own (image, block of output rows) and build the block's columns and multiply them on
// their own thread, as forward_nhwc does (below).
void forward_nchw(const at::Tensor& x, const at::Tensor& wm, const std::optional<at::Tensor>& bias,
                  at::Tensor& y, const Conv2dShape& s, bool relu) {
  const int64_t og = s.o_per_group(), cg = s.c_per_group(), k = wm.size(1), p = s.oh * s.ow;
  const bool pointwise = is_pointwise(s);
  const at::Tensor w = wm.detach(), xd = x.detach();  // plain tensors, as in forward_nhwc
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->detach()) : std::nullopt;
  // The bias as (1, O, 1), for the GEMMs batched over images.
  const std::optional<at::Tensor> bias3 =
      b.has_value() ? std::optional<at::Tensor>(b->view({1, s.o, 1})) : std::nullopt;
  if (pointwise && s.groups == 1) {
    // Y[n] = W X[n] for every image in one batched GEMM: 1.2x-1.75x faster than a GEMM per
    // image at batch 2 (ResNet-50's 1x1 layers, two threads).
    at::Tensor out = y.view({s.n, s.o, p});
    group_gemm(out, w.unsqueeze(0).expand({s.n, s.o, s.c}), xd.view({s.n, s.c, p}), bias3);
    if (relu) out.clamp_min_(0);
    return;
  }
  const int64_t per = tile_rows(s, k, x.element_size(), s.oh);
  const int64_t ipt =
      s.groups == 1 && !pointwise && per >= s.oh ? images_per_task(s, k * p * x.element_size())
                                                 : 1;
  if (ipt > 1) {
    // Small images: a task takes several, their columns (b, K, P), one batched GEMM.
    parallel_for_aten(0, (s.n + ipt - 1) / ipt, 1, [&](int64_t tb, int64_t te) {
      at::Tensor cols = at::empty({ipt, k, p}, xd.options());
      for (int64_t t = tb; t < te; ++t) {
        const int64_t n0 = t * ipt, nb = std::min(ipt, s.n - n0);
        AT_DISPATCH_FLOATING_TYPES(xd.scalar_type(), "conv2d_im2col", [&] {
          for (int64_t i = 0; i < nb; ++i) {
            im2col_nchw_rows(xd[n0 + i].const_data_ptr<scalar_t>(),
                             cols[i].mutable_data_ptr<scalar_t>(), s, 0, 0, s.oh);
          }
        });
        at::Tensor out = y.narrow(0, n0, nb).view({nb, s.o, p});
        group_gemm(out, w.unsqueeze(0).expand({nb, s.o, k}), cols.narrow(0, 0, nb), bias3);
        if (relu) out.clamp_min_(0);
      }
    });
    return;
  }
  const int64_t blocks = (s.oh + per - 1) / per;
  const int64_t span =
      pointwise ? s.groups : groups_per_span(s, k * per * s.ow * x.element_size());
  parallel_for_aten(0, s.n * blocks, task_grain(s, s.n * blocks), [&](int64_t tb, int64_t te) {
    at::Tensor cols = pointwise ? at::Tensor() : at::empty({span * k, per * s.ow}, xd.options());
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n = t / blocks, i0 = t % blocks * per, i1 = std::min(s.oh, i0 + per);
      const int64_t p0 = i0 * s.ow, pb = (i1 - i0) * s.ow;
      for (int64_t g0 = 0; g0 < s.groups; g0 += span) {
        const int64_t count = std::min(span, s.groups - g0), rows = count * og;
        at::Tensor out = y[n].view({s.o, p}).narrow(0, g0 * og, rows).narrow(1, p0, pb)
                             .view({count, og, pb});
        const at::Tensor in = span_columns(xd, cols, s, n, i0, i1, g0, count);
        const at::Tensor wg = w.narrow(0, g0 * og, rows).view({count, og, k});
        group_gemm(out, wg, in,
                   b.has_value() ? std::optional<at::Tensor>(
                                       b->narrow(0, g0 * og, rows).view({count, og, 1}))
                                 : std::nullopt);
        if (relu) out.clamp_min_(0);
      }
    }
  });
}

// Each task builds the columns of a few output rows and multiplies them by the weight on its
// own thread (a GEMM called inside a parallel region runs on one): the columns stay
// cache-resident between the two, where columns of whole images go to memory and back.
void forward_nhwc(const at::Tensor& x, const at::Tensor& wm, const std::optional<at::Tensor>& bias,
                  at::Tensor& y, const Conv2dShape& s, bool relu) {
  const int64_t og = s.o_per_group(), k = wm.size(1), out_rows = s.n * s.oh;
  const bool pointwise = is_pointwise(s);
  const int64_t per = tile_rows(s, k, x.element_size(), out_rows);
  const int64_t tasks = (out_rows + per - 1) / per;
  // Plain tensors: the workers' ATen ops record no autograd history.
  const at::Tensor w = wm.detach(), xd = x.detach();
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->detach()) : std::nullopt;
  at::Tensor y_all = y.permute({0, 2, 3, 1}).view({out_rows * s.ow, s.o});
  const at::Tensor x_all = pointwise ? xd.permute({0, 2, 3, 1}).reshape({out_rows * s.ow, s.c})
                                     : at::Tensor();
  parallel_for_aten(0, tasks, task_grain(s, tasks), [&](int64_t tb, int64_t te) {
    at::Tensor cols = pointwise ? at::Tensor() : at::empty({per * s.ow, k}, xd.options());
    for (int64_t t = tb; t < te; ++t) {
      const int64_t r0 = t * per, r1 = std::min(out_rows, r0 + per), rows = (r1 - r0) * s.ow;
      at::Tensor y_rows = y_all.narrow(0, r0 * s.ow, rows);
      for (int64_t g = 0; g < s.groups; ++g) {
        at::Tensor out = y_rows.narrow(1, g * og, og);
        at::Tensor in;
        if (pointwise) {
          in = x_all.narrow(0, r0 * s.ow, rows).narrow(1, g * s.c_per_group(), s.c_per_group());
        } else {
          in = tile_columns_nhwc(xd, cols, s, r0, r1, g);
        }
        const at::Tensor wt = w.narrow(0, g * og, og).t();
        if (b.has_value()) {
          at::addmm_out(out, b->narrow(0, g * og, og).view({1, og}).expand({rows, og}), in, wt);
        } else {
          at::mm_out(out, in, wt);
        }
      }
      if (relu) y_rows.clamp_min_(0);  // while the rows are still in cache
    }
  });
}

void backward_input_nchw(const at::Tensor& gy, const at::Tensor& wm, at::Tensor& gx,
                         const Conv2dShape& s) {
  const int64_t og = s.o_per_group(), cg = s.c_per_group(), k = wm.size(1), p = s.oh * s.ow;
  const bool pointwise = is_pointwise(s);
  if (pointwise && s.groups == 1) {  // one batched GEMM, as in forward_nchw
    at::Tensor out = gx.view({s.n, s.c, p});
    at::bmm_out(out, wm.t().unsqueeze(0).expand({s.n, s.c, s.o}), gy.view({s.n, s.o, p}));
    return;
  }
  if (!pointwise && s.groups == 1) {
    // Chunks of images: one batched GEMM into their columns, then col2im over every (image,
    // channel) plane in parallel. A GEMM and a col2im per image took 3.4x PyTorch's time
    // for LeNet-5's second layer (6 -> 16 channels 5x5 at 14x14) at batch 64.
    const int64_t chunk = images_per_chunk(s, gy.element_size());
    at::Tensor cols = at::empty({chunk, k, p}, gy.options());
    const at::Tensor wt = wm.t().unsqueeze(0);
    for (int64_t n0 = 0; n0 < s.n; n0 += chunk) {
      const int64_t b = std::min(chunk, s.n - n0);
      at::Tensor c = cols.narrow(0, 0, b);
      at::bmm_out(c, wt.expand({b, k, s.o}), gy.narrow(0, n0, b).view({b, s.o, p}));
      AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "conv2d_col2im", [&] {
        col2im_nchw_images(c.const_data_ptr<scalar_t>(), gx[n0].mutable_data_ptr<scalar_t>(), s,
                           b);
      });
    }
    return;
  }
  const int64_t span = pointwise ? s.groups : groups_per_span(s, k * p * gy.element_size());
  at::Tensor cols = pointwise ? at::Tensor() : at::empty({span, k, p}, gy.options());
  for (int64_t n = 0; n < s.n; ++n) {
    for (int64_t g0 = 0; g0 < s.groups; g0 += span) {
      const int64_t count = std::min(span, s.groups - g0), rows = count * og;
      const at::Tensor gyg = gy[n].view({s.o, p}).narrow(0, g0 * og, rows).view({count, og, p});
      const at::Tensor wgt = wm.narrow(0, g0 * og, rows).view({count, og, k}).transpose(1, 2);
      if (pointwise) {
        group_gemm(gx[n].view({s.c, p}).narrow(0, g0 * cg, count * cg).view({count, cg, p}),
                   wgt, gyg);
        continue;
      }
      group_gemm(cols.narrow(0, 0, count), wgt, gyg);
      AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "conv2d_col2im", [&] {
        col2im_nchw(cols.const_data_ptr<scalar_t>(), gx[n].mutable_data_ptr<scalar_t>(),
                    group_span(s, count), g0 * cg);
      });
    }
  }
}

void backward_input_nhwc(const at::Tensor& gy, const at::Tensor& wm, at::Tensor& gx,
                         const Conv2dShape& s) {
  const int64_t og = s.o_per_group(), cg = s.c_per_group();
  const bool pointwise = is_pointwise(s);
  const int64_t chunk = images_per_chunk(s, gy.element_size());
  const at::Tensor gyr = gy.permute({0, 2, 3, 1});
  at::Tensor gxr = gx.permute({0, 2, 3, 1});
  at::Tensor cols = pointwise ? at::Tensor()
                              : at::empty({chunk * s.oh * s.ow, wm.size(1)}, gy.options());
  for (int64_t n0 = 0; n0 < s.n; n0 += chunk) {
    const int64_t b = std::min(chunk, s.n - n0), rows = b * s.oh * s.ow;
    const at::Tensor gy_rows = gyr.narrow(0, n0, b).view({rows, s.o});
    for (int64_t g = 0; g < s.groups; ++g) {
      const at::Tensor gyg = gy_rows.narrow(1, g * og, og);
      const at::Tensor wg = wm.narrow(0, g * og, og);
      if (pointwise) {
        at::Tensor out = gxr.narrow(0, n0, b).view({rows, s.c}).narrow(1, g * cg, cg);
        at::mm_out(out, gyg, wg);
        continue;
      }
      at::Tensor c = cols.narrow(0, 0, rows);
      at::mm_out(c, gyg, wg);
      AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "conv2d_col2im", [&] {
        col2im_nhwc(cols.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), s, n0, b,
                    g * cg);
      });
    }
  }
}

// acc (O, K) += the weight gradient, K in weight_matrix's order, tile by tile: each thread
// builds the columns of the forward's tiles (a few output rows, cache-sized) and multiplies
// them into its own (O, K) matrix, and the matrices are added in thread order after. Columns
// of whole images went to memory and back: ResNet-50's 64-channel 3x3 layer at 56x56 and
// batch 2 took 1.6x-2.2x PyTorch's time that way.
void backward_weight_tiled(const at::Tensor& gy, const at::Tensor& x, at::Tensor& acc,
                           const Conv2dShape& s, bool nhwc) {
  const int64_t og = s.o_per_group(), k = acc.size(1), p = s.oh * s.ow;
  // NHWC tiles run across images (row = n * OH + i); NCHW tiles stay within one image.
  const int64_t rows = nhwc ? s.n * s.oh : s.oh;
  const int64_t per = tile_rows(s, k, x.element_size(), rows);
  // NCHW small images: tasks of several whole images, their columns side by side (K, b*P)
  // and the gradient's rows likewise (O, b*P), one GEMM (see images_per_task).
  const int64_t ipt = !nhwc && s.groups == 1 && per >= s.oh
                          ? images_per_task(s, k * p * x.element_size()) : 1;
  const bool images = ipt > 1;
  const int64_t blocks = (rows + per - 1) / per;
  const int64_t tasks = nhwc ? blocks : images ? (s.n + ipt - 1) / ipt : s.n * blocks;
  const int64_t threads = std::clamp<int64_t>(at::get_num_threads(), 1, tasks);
  const int64_t span = nhwc ? 1 : groups_per_span(s, k * per * s.ow * x.element_size());
  // Plain tensors: the workers' ATen ops record no autograd history.
  const at::Tensor xd = x.detach(), gyd = gy.detach(), accd = acc.detach();
  const at::Tensor gy_rows = nhwc ? gyd.permute({0, 2, 3, 1}).view({s.n * p, s.o}) : at::Tensor();
  std::vector<at::Tensor> parts(threads);
  parallel_for_aten(0, threads, 1, [&](int64_t hb, int64_t he) {
    for (int64_t h = hb; h < he; ++h) {
      at::Tensor part = at::zeros_like(accd);
      at::Tensor cols = nhwc     ? at::empty({per * s.ow, k}, xd.options())
                        : images ? at::empty({k, ipt * p}, xd.options())
                                 : at::empty({span * k, per * s.ow}, xd.options());
      for (int64_t t = tasks * h / threads; t < tasks * (h + 1) / threads; ++t) {
        if (images) {
          const int64_t n0 = t * ipt, nb = std::min(ipt, s.n - n0);
          AT_DISPATCH_FLOATING_TYPES(xd.scalar_type(), "conv2d_im2col", [&] {
            for (int64_t i = 0; i < nb; ++i) {
              im2col_nchw_rows(xd[n0 + i].const_data_ptr<scalar_t>(),
                               cols.mutable_data_ptr<scalar_t>() + i * p, s, 0, 0, s.oh, nb * p);
            }
          });
          const at::Tensor in = cols.view(-1).narrow(0, 0, k * nb * p).view({k, nb * p});
          part.addmm_(gyd.narrow(0, n0, nb).view({nb, s.o, p}).transpose(0, 1)
                          .reshape({s.o, nb * p}), in.t());
          continue;
        }
        const int64_t n = nhwc ? 0 : t / blocks, r0 = t % blocks * per;
        const int64_t r1 = std::min(rows, r0 + per), pixels = (r1 - r0) * s.ow;
        if (!nhwc) {
          for (int64_t g0 = 0; g0 < s.groups; g0 += span) {
            const int64_t count = std::min(span, s.groups - g0), o_rows = count * og;
            const at::Tensor in = span_columns(xd, cols, s, n, r0, r1, g0, count);
            const at::Tensor gyt = gyd[n].view({s.o, p}).narrow(0, g0 * og, o_rows)
                                       .narrow(1, r0 * s.ow, pixels).view({count, og, pixels});
            group_gemm_add(part.narrow(0, g0 * og, o_rows).view({count, og, k}), gyt,
                           in.transpose(1, 2));
          }
          continue;
        }
        for (int64_t g = 0; g < s.groups; ++g) {
          const at::Tensor in = tile_columns_nhwc(xd, cols, s, r0, r1, g);
          const at::Tensor gyt = gy_rows.narrow(0, r0 * s.ow, pixels).narrow(1, g * og, og);
          part.narrow(0, g * og, og).addmm_(gyt.t(), in);
        }
      }
      parts[h] = std::move(part);
    }
  });
  for (const at::Tensor& part : parts) acc.add_(part);
}

// acc (O, K) += the weight gradient, K in weight_matrix's order.
void backward_weight_nchw(const at::Tensor& gy, const at::Tensor& x, at::Tensor& acc,
                          const Conv2dShape& s) {
  const int64_t og = s.o_per_group(), k = acc.size(1), p = s.oh * s.ow;
  const bool pointwise = is_pointwise(s);
  const int64_t span = pointwise ? s.groups : groups_per_span(s, k * p * x.element_size());
  at::Tensor cols = pointwise ? at::Tensor() : at::empty({span * k, p}, x.options());
  for (int64_t n = 0; n < s.n; ++n) {
    for (int64_t g0 = 0; g0 < s.groups; g0 += span) {
      const int64_t count = std::min(span, s.groups - g0), rows = count * og;
      const at::Tensor in = span_columns(x, cols, s, n, 0, s.oh, g0, count);
      group_gemm_add(acc.narrow(0, g0 * og, rows).view({count, og, k}),
                     gy[n].view({s.o, p}).narrow(0, g0 * og, rows).view({count, og, p}),
                     in.transpose(1, 2));
    }
  }
}

void backward_weight_nhwc(const at::Tensor& gy, const at::Tensor& x, at::Tensor& acc,
                          const Conv2dShape& s) {
  const int64_t og = s.o_per_group();
  const bool pointwise = is_pointwise(s);
  const int64_t chunk = images_per_chunk(s, x.element_size());
  const at::Tensor gyr = gy.permute({0, 2, 3, 1});
  at::Tensor cols = pointwise ? at::Tensor()
                              : at::empty({chunk * s.oh * s.ow, acc.size(1)}, x.options());
  for (int64_t n0 = 0; n0 < s.n; n0 += chunk) {
    const int64_t b = std::min(chunk, s.n - n0), rows = b * s.oh * s.ow;
    const at::Tensor gy_rows = gyr.narrow(0, n0, b).view({rows, s.o});
    for (int64_t g = 0; g < s.groups; ++g) {
      const at::Tensor in = columns_nhwc(x, cols, s, n0, b, g);
      acc.narrow(0, g * og, og).addmm_(gy_rows.narrow(1, g * og, og).t(), in);
    }
  }
}

// g = gy where not y <= 0, else 0 (as torch.relu's backward: NaN passes the gradient), if
// y; and grad_bias = sum of g per channel; over contiguous tensors. The work is cut into
// fixed chunks (of planes' runs in NCHW, of rows in NHWC), each summed in lanes of its own
// and kept in float64, the chunks added in order after: the result does not depend on the
// thread count. A loop of float64 additions, one per element (each waiting for the last),
// and in NHWC one task per 64 channels (one thread for 64), took 3x-9x the time of PyTorch's
// threshold_backward and sum.
constexpr int64_t kChunk = 16384;  // values per chunk
constexpr int kLanes = 16;         // independent partial sums per NCHW run: they vectorise

// gy, or 0 where y[i] <= 0 when Mask. Both loaded unconditionally: a load under the
// condition kept GCC from vectorising the loops (a branch per element).
template <bool Mask, typename T>
inline T masked(T gy, const T* __restrict__ y, int64_t i) {
  if constexpr (Mask) return y[i] <= T(0) ? T(0) : gy;
  return gy;
}

// g and the sum of g over one run of n values.
template <typename T, bool Mask, bool Out>
double masked_run(const T* __restrict__ gy, const T* __restrict__ y, T* __restrict__ g,
                  int64_t n) {
  T part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const T v = masked<Mask>(gy[i + j], y, i + j);
      if constexpr (Out) g[i + j] = v;
      part[j] += v;
    }
  }
  double sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += part[j];
  for (; i < n; ++i) {
    const T v = masked<Mask>(gy[i], y, i);
    if constexpr (Out) g[i] = v;
    sum += v;
  }
  return sum;
}

// sums[c] (float64) += the sums of g over rows [r0, r1) of C values, with g written.
template <typename T, bool Mask, bool Out>
void masked_rows(const T* __restrict__ gy, const T* __restrict__ y, T* __restrict__ g,
                 int64_t r0, int64_t r1, int64_t C, T* __restrict__ acc, double* sums) {
  std::fill(acc, acc + C, T(0));
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict__ gr = gy + r * C;
    const T* __restrict__ yr = Mask ? y + r * C : nullptr;
    T* __restrict__ out = Out ? g + r * C : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const T v = masked<Mask>(gr[c], yr, c);
      if constexpr (Out) out[c] = v;
      acc[c] += v;
    }
  }
  for (int64_t c = 0; c < C; ++c) sums[c] += acc[c];
}

template <typename T, bool Mask, bool Out>
void bias_relu_backward_impl(const T* gy, const T* y, T* g, T* grad_bias, bool nhwc,
                             const Conv2dShape& s) {
  const int64_t plane = s.oh * s.ow, C = s.o;
  if (!nhwc) {
    // Chunks: runs of at most kChunk values of one (image, channel) plane.
    const int64_t per_plane = std::max<int64_t>(1, (plane + kChunk - 1) / kChunk);
    const int64_t planes = s.n * C, chunks = planes * per_plane;
    std::vector<double> part(chunks);
    at::parallel_for(0, chunks, grain(std::min(plane, kChunk)), [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const int64_t i0 = k / per_plane * plane + k % per_plane * kChunk;
        const int64_t n = std::min(kChunk, plane - k % per_plane * kChunk);
        part[k] = masked_run<T, Mask, Out>(gy + i0, Mask ? y + i0 : nullptr,
                                           Out ? g + i0 : nullptr, n);
      }
    });
    if (grad_bias == nullptr) return;
    for (int64_t o = 0; o < C; ++o) {
      double sum = 0;
      for (int64_t n = 0; n < s.n; ++n) {
        for (int64_t k = 0; k < per_plane; ++k) sum += part[(n * C + o) * per_plane + k];
      }
      grad_bias[o] = static_cast<T>(sum);
    }
    return;
  }
  // Chunks: blocks of rows of C values.
  const int64_t rows = s.n * plane, per = std::max<int64_t>(1, kChunk / std::max<int64_t>(C, 1));
  const int64_t chunks = (rows + per - 1) / per;
  std::vector<double> part(chunks * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    std::vector<T> acc(C);
    for (int64_t k = b; k < e; ++k) {
      masked_rows<T, Mask, Out>(gy, y, g, k * per, std::min(rows, (k + 1) * per), C, acc.data(),
                                part.data() + k * C);
    }
  });
  if (grad_bias == nullptr) return;
  for (int64_t o = 0; o < C; ++o) {
    double sum = 0;
    for (int64_t k = 0; k < chunks; ++k) sum += part[k * C + o];
    grad_bias[o] = static_cast<T>(sum);
  }
}

}  // namespace

void conv2d_forward(const at::Tensor& x, const at::Tensor& w,
                    const std::optional<at::Tensor>& bias, at::Tensor& y, const Conv2dShape& s,
                    bool relu) {
  const bool nhwc = is_channels_last(x);
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor xc = computable(x, fmt);
  const at::Tensor wm = weight_matrix(w.to(xc.scalar_type()), nhwc);
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(xc.scalar_type())) : std::nullopt;
  into(y, fmt, [&](at::Tensor& out) {
    nhwc ? forward_nhwc(xc, wm, b, out, s, relu) : forward_nchw(xc, wm, b, out, s, relu);
  });
}

void conv2d_backward_input(const at::Tensor& gy, const at::Tensor& w, at::Tensor& gx,
                           const Conv2dShape& s) {
  // With stride 1, dgrad is a forward convolution: gx = conv(gy, w'), w' the weight with its
  // taps reversed and, per group, its input and output channels swapped, padded by
  // d * (k - 1) - p. The forward pass's cache-sized tiles then replace a GEMM into columns
  // of whole images and their col2im: on ResNet-50's 3x3 layers of 64 and 128 channels at
  // batch 2, 1.4x-1.5x faster in channels_last, up to 1.15x in NCHW. Rearranging the weight
  // is a strided copy (3 ms for 512 x 512 x 3 x 3): only where the weight is no larger than
  // the gradient (at 512 channels and 7 x 7, batch 2, dgrad took 3.6x longer this way). And
  // only where the input is not much larger than the output: the convolution runs over the
  // input's positions, the GEMM over the output's (without padding, at batch 64-128, 3x3
  // and 5x5 layers of 14x14 to 32x32 inputs took 1.15x-2.5x longer this way).
  const int64_t top = s.dil_h * (s.kh - 1) - s.pad_h, left = s.dil_w * (s.kw - 1) - s.pad_w;
  if (s.stride_h == 1 && s.stride_w == 1 && !is_pointwise(s) && top >= 0 && left >= 0 &&
      w.numel() <= gy.numel() && 10 * s.h * s.w <= 11 * s.oh * s.ow) {
    const int64_t g = s.groups, og = s.o_per_group(), cg = s.c_per_group();
    const at::Tensor flipped = w.view({g, og, cg, s.kh, s.kw})
                                   .transpose(1, 2)
                                   .flip({3, 4})
                                   .reshape({s.c, og, s.kh, s.kw});
    const Conv2dShape t{s.n, s.o, s.oh, s.ow, s.c, s.kh, s.kw, s.h, s.w, g,
                        1, 1, top, left, s.dil_h, s.dil_w};
    conv2d_forward(gy, flipped, std::nullopt, gx, t, false);
    return;
  }
  const bool nhwc = is_channels_last(gx);
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor gyc = computable(gy, fmt);
  const at::Tensor wm = weight_matrix(w.to(gyc.scalar_type()), nhwc);
  into(gx, fmt, [&](at::Tensor& out) {
    nhwc ? backward_input_nhwc(gyc, wm, out, s) : backward_input_nchw(gyc, wm, out, s);
  });
}

void conv2d_backward_weight(const at::Tensor& gy, const at::Tensor& x, at::Tensor& gw,
                            const Conv2dShape& s) {
  const bool nhwc = is_channels_last(x);
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor xc = computable(x, fmt);
  const at::Tensor gyc = computable(gy, fmt);
  at::Tensor acc = at::zeros({s.o, s.c_per_group() * s.kh * s.kw}, xc.options());
  // Tiles where the threads' (O, K) matrices cost less than columns of whole images.
  const bool tiled = !is_pointwise(s) && at::get_num_threads() * s.o < s.n * s.oh * s.ow;
  if (tiled) {
    backward_weight_tiled(gyc, xc, acc, s, nhwc);
  } else if (nhwc) {
    backward_weight_nhwc(gyc, xc, acc, s);
  } else {
    backward_weight_nchw(gyc, xc, acc, s);
  }
  if (nhwc) {
    gw.copy_(acc.view({s.o, s.kh, s.kw, s.c_per_group()}).permute({0, 3, 1, 2}));
  } else {
    gw.copy_(acc.view({s.o, s.c_per_group(), s.kh, s.kw}));
  }
}

void conv2d_bias_relu_backward(const at::Tensor& gy, const at::Tensor& y, const at::Tensor& g,
                               const at::Tensor& grad_bias, const Conv2dShape& s) {
  const bool nhwc = is_channels_last(gy);
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor gyc = computable(gy, fmt);
  const at::Tensor yc = y.defined() ? computable(y, fmt) : at::Tensor();
  // Written in place where the outputs already have the compute type and layout.
  const auto direct = [&](const at::Tensor& t, at::MemoryFormat f) {
    return t.scalar_type() == gyc.scalar_type() && t.is_contiguous(f);
  };
  at::Tensor gc = !g.defined() ? at::Tensor() : direct(g, fmt) ? g : at::empty_like(gyc);
  at::Tensor bc;
  if (grad_bias.defined()) {
    bc = direct(grad_bias, at::MemoryFormat::Contiguous) ? grad_bias
                                                         : at::empty({s.o}, gyc.options());
  }
  AT_DISPATCH_FLOATING_TYPES(gyc.scalar_type(), "conv2d_bias_relu_backward", [&] {
    const scalar_t* yp = yc.defined() ? yc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gp = gc.defined() ? gc.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* bp = bc.defined() ? bc.mutable_data_ptr<scalar_t>() : nullptr;
    const auto run = [&](auto mask, auto out) {
      bias_relu_backward_impl<scalar_t, decltype(mask)::value, decltype(out)::value>(
          gyc.const_data_ptr<scalar_t>(), yp, gp, bp, nhwc, s);
    };
    const auto with_out = [&](auto mask) {
      gp ? run(mask, std::true_type{}) : run(mask, std::false_type{});
    };
    yp ? with_out(std::true_type{}) : with_out(std::false_type{});
  });
  if (g.defined() && !gc.is_same(g)) g.copy_(gc);
  if (grad_bias.defined() && !bc.is_same(grad_bias)) grad_bias.copy_(bc);
}

}  // namespace dlcv_fast::cpu
