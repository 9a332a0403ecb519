// Host entry points of conv2d: check the arguments, allocate the outputs in the input's
// memory format, then run the CPU or CUDA kernels (conv2d_shape.h gives the geometry).

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "checks.h"
#include "conv2d_shape.h"
#include "cpu/conv2d.h"
#include "ops.h"

#ifdef DLCV_FAST_WITH_CUDA
#include "cuda/launchers.h"
#endif

namespace dlcv_fast {
namespace {

// padding as [top, left, bottom, right].
void check_padding4(const char* op, at::IntArrayRef padding) {
  TORCH_CHECK_VALUE(padding.size() == 4, op, ": padding must hold 4 ints (top, left, bottom, "
                    "right), but got ", padding.size());
  for (int64_t p : padding) {
    TORCH_CHECK_VALUE(p >= 0, op, ": padding must be non-negative, but got ", padding);
  }
}

int64_t conv_output_size(int64_t size, int64_t pad_total, int64_t kernel, int64_t stride,
                         int64_t dilation) {
  return (size + pad_total - dilation * (kernel - 1) - 1) / stride + 1;
}

// Validates input and weight as F.conv2d does and returns the geometry.
Conv2dShape make_shape(const char* op, const at::Tensor& input, const at::Tensor& weight,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                       int64_t groups) {
  check_floating(op, "input", input);
  TORCH_CHECK_TYPE(weight.scalar_type() == input.scalar_type(), op, ": weight has dtype ",
                   weight.scalar_type(), " but input has ", input.scalar_type(),
                   "; expected the same dtype");
  check_same_device(op, "weight", weight, "input", input);
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), but got shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4, op, ": weight must be 4-D (out_channels, "
                    "in_channels / groups, kH, kW), but got shape ", weight.sizes());
  check_pair(op, "stride", stride);
  check_pair(op, "dilation", dilation);
  check_padding4(op, padding);
  TORCH_CHECK_VALUE(stride[0] > 0 && stride[1] > 0, op, ": stride must be positive, but got ",
                    stride);
  TORCH_CHECK_VALUE(dilation[0] > 0 && dilation[1] > 0, op,
                    ": dilation must be positive, but got ", dilation);
  TORCH_CHECK_VALUE(groups > 0, op, ": groups must be positive, but got ", groups);
  Conv2dShape s{};
  s.n = input.size(0), s.c = input.size(1), s.h = input.size(2), s.w = input.size(3);
  s.o = weight.size(0), s.kh = weight.size(2), s.kw = weight.size(3);
  s.groups = groups;
  TORCH_CHECK_VALUE(s.o > 0 && weight.size(1) > 0 && s.kh > 0 && s.kw > 0, op,
                    ": weight must have non-zero sizes, but got shape ", weight.sizes());
  TORCH_CHECK_VALUE(s.o % groups == 0, op, ": out_channels (", s.o,
                    ") must be divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(s.c == weight.size(1) * groups, op, ": input has ", s.c,
                    " channels but weight of shape ", weight.sizes(), " with groups=", groups,
                    " expects ", weight.size(1) * groups, " (in_channels / groups = ",
                    weight.size(1), ")");
  TORCH_CHECK_VALUE(s.h > 0 && s.w > 0, op, ": input must have non-zero height and width, "
                    "but got shape ", input.sizes());
  s.stride_h = stride[0], s.stride_w = stride[1];
  s.dil_h = dilation[0], s.dil_w = dilation[1];
  s.pad_h = padding[0], s.pad_w = padding[1];
  s.oh = conv_output_size(s.h, padding[0] + padding[2], s.kh, s.stride_h, s.dil_h);
  s.ow = conv_output_size(s.w, padding[1] + padding[3], s.kw, s.stride_w, s.dil_w);
  TORCH_CHECK_VALUE(s.oh > 0 && s.ow > 0, op, ": the kernel (", s.kh, ", ", s.kw,
                    ") with dilation ", dilation, " is larger than the padded input (",
                    s.h + padding[0] + padding[2], ", ", s.w + padding[1] + padding[3], ")");
  return s;
}

at::MemoryFormat format_of(const at::Tensor& t) { return t.suggest_memory_format(); }

#ifdef DLCV_FAST_WITH_CUDA
Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

bool is_depthwise(const Conv2dShape& s) { return s.groups == s.c && s.c_per_group() == 1; }

// Raises a ValueError naming the limit a convolution exceeds, before any launch.
void check_cuda_limits(const char* op, const Conv2dShape& s) {
  const char* why =
      is_depthwise(s) ? cuda::conv2d_depthwise_unsupported(s) : cuda::conv2d_unsupported(s);
  TORCH_CHECK_VALUE(why == nullptr, op, " (cuda): this convolution is beyond the kernels' "
                    "limits: ", why);
}

// The weight in the input's memory format: the kernels' vector loads need both operands
// channels-innermost (a copy only when a channels_last input meets an NCHW weight).
at::Tensor kernel_weight(const at::Tensor& weight, const at::Tensor& input) {
  return weight.contiguous(format_of(input));
}
#endif

at::Tensor new_output(at::IntArrayRef sizes, const at::Tensor& like, at::MemoryFormat fmt) {
  at::Tensor out = at::empty(sizes, like.options().memory_format(fmt));
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

// A gradient as autograd hands it may be expanded (stride 0) or strided: kernels and the
// outputs allocated like it need a dense tensor.
at::Tensor dense(const at::Tensor& t, at::MemoryFormat fmt) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous(fmt);
}

void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& like,
                at::IntArrayRef sizes) {
  TORCH_CHECK_TYPE(grad.scalar_type() == like.scalar_type(), op, ": grad_output has dtype ",
                   grad.scalar_type(), " but expected ", like.scalar_type());
  check_same_device(op, "grad_output", grad, "input", like);
  TORCH_CHECK_VALUE(grad.sizes() == sizes, op, ": grad_output must have the output's shape ",
                    sizes, ", but got ", grad.sizes());
}

}  // namespace

// With the operator named: the unnamed query raises once conv and RNN settings differ
// (e.g. after torch.backends.cudnn.conv.fp32_precision = "ieee").
bool conv_allows_tf32() { return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV); }

at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu) {
  const char* op = "conv2d";
  const Conv2dShape s = make_shape(op, input, weight, stride, padding, dilation, groups);
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == input.scalar_type(), op, ": bias has dtype ",
                     bias->scalar_type(), " but input has ", input.scalar_type());
    check_same_device(op, "bias", *bias, "input", input);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.o, op,
                      ": bias must be 1-D with out_channels (", s.o, ") elements, but got shape ",
                      bias->sizes());
  }
  at::Tensor y = new_output({s.n, s.o, s.oh, s.ow}, input, format_of(input));
  if (s.n == 0) return y;
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  if (cpu_kernels(input)) {
    cpu::conv2d_forward(input, weight, b, y, s, relu);
    return y;
  }
#ifdef DLCV_FAST_WITH_CUDA
  check_cuda_limits(op, s);
  const at::Tensor wk = kernel_weight(weight, input);
  const void* bp = b.has_value() ? b->data_ptr() : nullptr;
  launch_cuda(op, input, [&](cudaStream_t stream) {
    const DType t = kernel_dtype(input.scalar_type());
    if (is_depthwise(s)) {
      return cuda::conv2d_depthwise_forward(t, input.data_ptr(), strides_of(input),
                                            wk.data_ptr(), strides_of(wk), bp, y.data_ptr(),
                                            strides_of(y), s, relu, stream);
    }
    return cuda::conv2d_forward(t, input.data_ptr(), strides_of(input), wk.data_ptr(),
                                strides_of(wk), bp, y.data_ptr(), strides_of(y), s, relu,
                                conv_allows_tf32(), stream);
  });
  return y;
#else
  no_cuda_kernels(op, input);
#endif
}

at::Tensor conv2d_backward_input(const at::Tensor& grad_output, const at::Tensor& input,
                                 const at::Tensor& weight, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  const char* op = "conv2d_backward_input";
  const Conv2dShape s = make_shape(op, input, weight, stride, padding, dilation, groups);
  check_grad(op, grad_output, input, {s.n, s.o, s.oh, s.ow});
  const at::Tensor gy = dense(grad_output, format_of(input));
  at::Tensor gx = new_output(input.sizes(), input, format_of(input));
  if (s.n == 0) return gx;
  if (cpu_kernels(input)) {
    cpu::conv2d_backward_input(gy, weight, gx, s);
    return gx;
  }
#ifdef DLCV_FAST_WITH_CUDA
  check_cuda_limits(op, s);
  const at::Tensor wk = kernel_weight(weight, input);
  launch_cuda(op, input, [&](cudaStream_t stream) {
    const DType t = kernel_dtype(input.scalar_type());
    if (is_depthwise(s)) {
      return cuda::conv2d_depthwise_backward_input(t, gy.data_ptr(), strides_of(gy),
                                                   wk.data_ptr(), strides_of(wk), gx.data_ptr(),
                                                   strides_of(gx), s, stream);
    }
    return cuda::conv2d_backward_input(t, gy.data_ptr(), strides_of(gy), wk.data_ptr(),
                                       strides_of(wk), gx.data_ptr(), strides_of(gx), s,
                                       conv_allows_tf32(), stream);
  });
  return gx;
#else
  no_cuda_kernels(op, input);
#endif
}

at::Tensor conv2d_backward_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                  const at::Tensor& weight, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  const char* op = "conv2d_backward_weight";
  const Conv2dShape s = make_shape(op, input, weight, stride, padding, dilation, groups);
  check_grad(op, grad_output, input, {s.n, s.o, s.oh, s.ow});
  const at::Tensor gy = dense(grad_output, format_of(input));
  at::Tensor gw = new_output(weight.sizes(), weight, format_of(weight));
  if (s.n == 0) return gw.zero_();
  if (cpu_kernels(input)) {
    cpu::conv2d_backward_weight(gy, input, gw, s);
    return gw;
  }
#ifdef DLCV_FAST_WITH_CUDA
  check_cuda_limits(op, s);
  const DType t = kernel_dtype(input.scalar_type());
  if (is_depthwise(s)) {
    const at::Tensor workspace = at::empty(
        {cuda::conv2d_depthwise_backward_weight_workspace(t, strides_of(input), s)},
        input.options().dtype(at::kByte));
    launch_cuda(op, input, [&](cudaStream_t stream) {
      return cuda::conv2d_depthwise_backward_weight(
          t, gy.data_ptr(), strides_of(gy), input.data_ptr(), strides_of(input), gw.data_ptr(),
          strides_of(gw), workspace.numel() > 0 ? workspace.data_ptr() : nullptr, s, stream);
    });
    return gw;
  }
  // float64 never splits its reduction: no scratch memory.
  const int64_t scratch =
      input.scalar_type() == at::kDouble ? 0 : cuda::conv2d_backward_weight_workspace(s);
  at::Tensor workspace = at::empty({scratch}, input.options().dtype(at::kFloat));
  launch_cuda(op, input, [&](cudaStream_t stream) {
    return cuda::conv2d_backward_weight(t, gy.data_ptr(), strides_of(gy), input.data_ptr(),
                                        strides_of(input), gw.data_ptr(), strides_of(gw),
                                        workspace.data_ptr<float>(), s, conv_allows_tf32(), stream);
  });
  return gw;
#else
  no_cuda_kernels(op, input);
#endif
}

std::tuple<at::Tensor, at::Tensor> conv2d_bias_relu_backward(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& output, bool bias) {
  const char* op = "conv2d_bias_relu_backward";
  check_floating(op, "grad_output", grad_output);
  TORCH_CHECK_VALUE(grad_output.dim() == 4, op, ": grad_output must be 4-D, but got shape ",
                    grad_output.sizes());
  if (output.has_value()) {
    check_grad(op, grad_output, *output, output->sizes());
  }
  Conv2dShape s{};
  s.n = grad_output.size(0), s.o = grad_output.size(1);
  s.oh = grad_output.size(2), s.ow = grad_output.size(3);
  const at::Tensor gy = dense(grad_output, format_of(grad_output));
  // g takes gy's strides (empty_like keeps those of a dense tensor).
  at::Tensor g = output.has_value() ? at::empty_like(gy) : gy.new_empty({0});
  if (output.has_value() && poison_outputs()) g.fill_(std::numeric_limits<double>::quiet_NaN());
  at::Tensor grad_bias = bias ? new_output({s.o}, gy, at::MemoryFormat::Contiguous)
                              : gy.new_empty({0});
  if (gy.numel() == 0) {
    grad_bias.zero_();
    return {g, grad_bias};
  }
  const at::Tensor y = output.has_value() ? *output : at::Tensor();
  if (cpu_kernels(gy)) {
    cpu::conv2d_bias_relu_backward(gy, y, output.has_value() ? g : at::Tensor(),
                                   bias ? grad_bias : at::Tensor(), s);
    return {g, grad_bias};
  }
#ifdef DLCV_FAST_WITH_CUDA
  const char* why = cuda::conv2d_bias_relu_unsupported(s);
  TORCH_CHECK_VALUE(why == nullptr, op, " (cuda): this output is beyond the kernel's limits: ",
                    why);
  const DType dtype = kernel_dtype(gy.scalar_type());
  const at::Tensor workspace = at::empty(
      {bias ? cuda::conv2d_bias_relu_backward_workspace(dtype, strides_of(gy), s) : 0},
      gy.options().dtype(at::kByte));
  launch_cuda(op, gy, [&](cudaStream_t stream) {
    return cuda::conv2d_bias_relu_backward(
        dtype, gy.data_ptr(), strides_of(gy), y.defined() ? y.data_ptr() : nullptr,
        y.defined() ? strides_of(y) : Strides4{}, output.has_value() ? g.data_ptr() : nullptr,
        bias ? grad_bias.data_ptr() : nullptr,
        workspace.numel() > 0 ? workspace.data_ptr() : nullptr, s, stream);
  });
  return {g, grad_bias};
#else
  no_cuda_kernels(op, gy);
#endif
}

}  // namespace dlcv_fast
