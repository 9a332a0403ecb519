// max_pool2d host entry points: check the arguments, allocate outputs in the input's memory
// format, then run the CPU or CUDA kernel.

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/fill.h>

#include <limits>
#include <utility>

#include "checks.h"
#include "cpu/kernels.h"
#include "ops.h"

#ifdef DLCV_FAST_WITH_CUDA
#include "cuda/launchers.h"
#endif

namespace dlcv_fast {
namespace {

// Window parameters fit in 32 bits, as in PyTorch (the kernels narrow them).
constexpr int64_t kMaxParam = std::numeric_limits<int32_t>::max();

struct Pooling {
  Pool2dShape shape;
  at::Tensor input;  // 4-D, dense in `format`
  at::MemoryFormat format;
  bool batched;
};

// Validates the arguments as torch.nn.functional.max_pool2d does and returns the shape of
// the problem and the input as a dense 4-D tensor.
Pooling prepare(const char* op, const at::Tensor& self, at::IntArrayRef kernel_size,
                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                bool ceil_mode) {
  const at::ScalarType t = self.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16 ||
                       t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt ||
                       t == at::kLong,
                   op, ": input must be float32, float64, float16, bfloat16, uint8, int8, int16, "
                   "int32 or int64, but got ", t);
  const int64_t dim = self.dim();
  TORCH_CHECK_VALUE((dim == 3 || dim == 4) && self.size(dim - 1) > 0 && self.size(dim - 2) > 0 &&
                        self.size(dim - 3) > 0,
                    op, ": input must be 3-D (C, H, W) or 4-D (N, C, H, W) with non-zero C, H "
                    "and W, but got shape ", self.sizes());
  check_pair(op, "kernel_size", kernel_size);
  check_pair(op, "stride", stride);
  check_pair(op, "padding", padding);
  check_pair(op, "dilation", dilation);
  TORCH_CHECK_VALUE(kernel_size[0] > 0 && kernel_size[1] > 0, op,
                    ": kernel_size must be positive, but got ", kernel_size);
  TORCH_CHECK_VALUE(stride[0] > 0 && stride[1] > 0, op, ": stride must be positive, but got ", stride);
  TORCH_CHECK_VALUE(dilation[0] > 0 && dilation[1] > 0, op,
                    ": dilation must be positive, but got ", dilation);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, op,
                    ": padding must be non-negative, but got ", padding);
  const std::pair<const char*, at::IntArrayRef> params[] = {
      {"kernel_size", kernel_size}, {"stride", stride}, {"padding", padding}, {"dilation", dilation}};
  for (const auto& [name, v] : params) {
    TORCH_CHECK_VALUE(v[0] <= kMaxParam && v[1] <= kMaxParam, op, ": ", name,
                      " must be below 2^31, but got ", v);
  }
  TORCH_CHECK_VALUE(padding[0] <= kernel_size[0] / 2 && padding[1] <= kernel_size[1] / 2, op,
                    ": padding must be at most half of kernel_size, but got padding ", padding,
                    " with kernel_size ", kernel_size);

  Pooling p;
  p.batched = dim == 4;
  const at::Tensor x = p.batched ? self : self.unsqueeze(0);
  // A 3-D input gives a contiguous output, as in PyTorch.
  p.format = p.batched ? x.suggest_memory_format() : at::MemoryFormat::Contiguous;
  p.input = x.contiguous(p.format);

  Pool2dShape& s = p.shape;
  s.batch = x.size(0);
  s.channels = x.size(1);
  s.in_h = x.size(2);
  s.in_w = x.size(3);
  s.kernel_h = kernel_size[0];
  s.kernel_w = kernel_size[1];
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dilation_h = dilation[0];
  s.dilation_w = dilation[1];
  s.out_h = pool_output_size(s.in_h, s.kernel_h, s.stride_h, s.pad_h, s.dilation_h, ceil_mode);
  s.out_w = pool_output_size(s.in_w, s.kernel_w, s.stride_w, s.pad_w, s.dilation_w, ceil_mode);
  TORCH_CHECK_VALUE(s.out_h > 0 && s.out_w > 0, op, ": input of spatial size (", s.in_h, ", ",
                    s.in_w, ") gives an output of size (", s.out_h, ", ", s.out_w,
                    "), which is too small; the kernel_size ", kernel_size, " with dilation ",
                    dilation, " must fit in the padded input");
  return p;
}

// With poisoning on, values start as NaN (integers, which have none, at their maximum) and
// indices at int64's minimum, so that an element a kernel fails to write shows.
at::Tensor new_output(const Pooling& p, int64_t h, int64_t w, at::ScalarType dtype,
                      bool indices = false) {
  const auto options = p.input.options().dtype(dtype).memory_format(p.format);
  const std::vector<int64_t> sizes{p.shape.batch, p.shape.channels, h, w};
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs()) {
    if (indices) {
      out.fill_(std::numeric_limits<int64_t>::min());
    } else if (at::isFloatingType(dtype)) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      AT_DISPATCH_INTEGRAL_TYPES(dtype, "poison", [&] { out.fill_(std::numeric_limits<scalar_t>::max()); });
    }
  }
  return out;
}

bool is_16bit(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// What the CPU kernels compute a dtype in: 16-bit floats in float32 and 8- and 16-bit
// integers in int32 (both exact for a max), everything else as it is.
at::ScalarType cpu_compute_type(at::ScalarType t) {
  if (is_16bit(t)) return at::kFloat;
  if (t == at::kByte || t == at::kChar || t == at::kShort) return at::kInt;
  return t;
}

// An integer type's lowest value.
int64_t lowest_value(at::ScalarType t) {
  int64_t v = 0;
  AT_DISPATCH_INTEGRAL_TYPES(t, "lowest_value", [&] { v = std::numeric_limits<scalar_t>::lowest(); });
  return v;
}

}  // namespace

bool cuda_built() {
#ifdef DLCV_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::tuple<at::Tensor, at::Tensor> max_pool2d(const at::Tensor& self, at::IntArrayRef kernel_size,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, bool ceil_mode) {
  const Pooling p = prepare("max_pool2d", self, kernel_size, stride, padding, dilation, ceil_mode);
  const Pool2dShape& s = p.shape;
  const bool channels_last = p.format == at::MemoryFormat::ChannelsLast;
  const at::ScalarType dtype = self.scalar_type();
  const bool widened = cpu_kernels(self) && cpu_compute_type(dtype) != dtype;
  const at::Tensor input = widened ? p.input.to(cpu_compute_type(dtype)) : p.input;
  at::Tensor output = new_output(p, s.out_h, s.out_w, input.scalar_type());
  at::Tensor indices = new_output(p, s.out_h, s.out_w, at::kLong, /*indices=*/true);

  if (output.numel() > 0) {
    if (cpu_kernels(self)) {
      cpu::max_pool2d_forward(kernel_dtype(input.scalar_type()), channels_last, input.const_data_ptr(),
                              output.mutable_data_ptr(), indices.mutable_data_ptr<int64_t>(), s);
    } else {
#ifdef DLCV_FAST_WITH_CUDA
      launch_cuda("max_pool2d", self, [&](cudaStream_t stream) {
        return cuda::max_pool2d_forward(kernel_dtype(input.scalar_type()), channels_last,
                                        input.const_data_ptr(), output.mutable_data_ptr(),
                                        indices.mutable_data_ptr<int64_t>(), s, stream);
      });
#else
      no_cuda_kernels("max_pool2d", self);
#endif
    }
  }
  if (widened) {
    // A window wholly in the padding (possible with dilation) gives int32's lowest value:
    // PyTorch gives the input type's.
    if (!at::isFloatingType(dtype)) output.clamp_min_(lowest_value(dtype));
    output = output.to(dtype);
  }
  if (!p.batched) return {output.squeeze(0), indices.squeeze(0)};
  return {output, indices};
}

at::Tensor max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& self,
                               const at::Tensor& indices, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "max_pool2d_backward";
  const Pooling p = prepare(op, self, kernel_size, stride, padding, dilation, ceil_mode);
  const Pool2dShape& s = p.shape;
  check_same_device(op, "grad_output", grad_output, "input", self);
  check_same_device(op, "indices", indices, "input", self);
  check_floating(op, "grad_output", grad_output);
  TORCH_CHECK_TYPE(grad_output.scalar_type() == self.scalar_type(), op, ": grad_output has dtype ",
                   grad_output.scalar_type(), " but input has ", self.scalar_type());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, op, ": indices must be int64, but got ",
                   indices.scalar_type());
  std::vector<int64_t> out_sizes{s.batch, s.channels, s.out_h, s.out_w};
  if (!p.batched) out_sizes.erase(out_sizes.begin());
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(out_sizes), op,
                    ": grad_output must have the output's shape ", out_sizes, ", but got ",
                    grad_output.sizes());
  TORCH_CHECK_VALUE(indices.sizes() == at::IntArrayRef(out_sizes), op,
                    ": indices must have the output's shape ", out_sizes, ", but got ",
                    indices.sizes());

  const auto as_4d = [&](const at::Tensor& t) {
    return (p.batched ? t : t.unsqueeze(0)).contiguous(p.format);
  };
  const bool channels_last = p.format == at::MemoryFormat::ChannelsLast;
  const bool cpu_16bit = cpu_kernels(self) && is_16bit(self.scalar_type());
  const at::Tensor gout = cpu_16bit ? as_4d(grad_output).to(at::kFloat) : as_4d(grad_output);
  const at::Tensor idx = as_4d(indices);
  at::Tensor grad_input = new_output(p, s.in_h, s.in_w, gout.scalar_type());

  if (grad_input.numel() > 0) {
    if (cpu_kernels(self)) {
      cpu::max_pool2d_backward(kernel_dtype(gout.scalar_type()), channels_last, gout.const_data_ptr(),
                               idx.const_data_ptr<int64_t>(), grad_input.mutable_data_ptr(), s);
    } else {
#ifdef DLCV_FAST_WITH_CUDA
      launch_cuda(op, self, [&](cudaStream_t stream) {
        return cuda::max_pool2d_backward(kernel_dtype(gout.scalar_type()), channels_last,
                                         gout.const_data_ptr(), idx.const_data_ptr<int64_t>(),
                                         grad_input.mutable_data_ptr(), s, stream);
      });
#else
      no_cuda_kernels(op, self);
#endif
    }
  }
  if (cpu_16bit) grad_input = grad_input.to(self.scalar_type());
  return p.batched ? grad_input : grad_input.squeeze(0);
}

}  // namespace dlcv_fast
