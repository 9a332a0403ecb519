// Host entry points of batch normalisation (batch_norm_shape.h): check the arguments, lay the
// input out densely (NCHW, or channels_last when it is so), bring the per-channel arrays to
// the accumulation type, then run the CPU or CUDA kernels. The CPU kernels compute 16-bit
// inputs in float32.

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <utility>

#include "batch_norm_shape.h"
#include "checks.h"
#include "cpu/kernels.h"
#include "ops.h"

#ifdef DLCV_FAST_WITH_CUDA
#include "cuda/launchers.h"
#endif

namespace dlcv_fast {
namespace {

bool is_16bit(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// A dtype as Python prints it, so that these messages read as the Triton path's.
const char* py_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    default: return c10::toString(t);
  }
}

// The input as the kernels see it.
struct Dense {
  at::Tensor x;               // dense in its layout (float32 for a 16-bit input on the CPU)
  at::MemoryFormat format;    // the layout of x
  BatchNormShape shape;
  at::ScalarType acc;         // the type of the per-channel arrays
  bool cpu_16bit;

  // t (the input's shape) in x's layout and type.
  at::Tensor like(const at::Tensor& t) const {
    at::Tensor d = t.contiguous(format);
    return cpu_16bit ? d.to(at::kFloat) : d;
  }
  DType dtype() const { return kernel_dtype(x.scalar_type()); }
  int64_t channels() const { return shape.channels; }
};

Dense dense_input(const char* op, const at::Tensor& input) {
  check_floating(op, "input", input);
  TORCH_CHECK_VALUE(input.dim() >= 2, op,
                    ": input must have at least 2 dimensions (N, C, ...), but got shape ",
                    input.sizes());
  Dense d;
  d.shape = BatchNormShape{input.size(0), input.size(1), 1, false};
  for (int64_t i = 2; i < input.dim(); ++i) d.shape.inner *= input.size(i);
  d.format = at::MemoryFormat::Contiguous;
  if (d.shape.inner == 1) {
    d.shape.channels_last = true;  // rows of C either way
  } else if (input.dim() >= 4) {
    d.format = input.suggest_memory_format();
    d.shape.channels_last = d.format != at::MemoryFormat::Contiguous;
  }
  d.acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  d.cpu_16bit = cpu_kernels(input) && is_16bit(input.scalar_type());
  d.x = d.like(input);
  return d;
}

// A per-channel parameter (weight, bias, running statistics): the input's dtype, or float32
// for a 16-bit input; shape (C,).
void check_param(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input,
                 int64_t channels) {
  check_same_device(op, name, t, "input", input);
  const bool ok = t.scalar_type() == input.scalar_type() ||
                  (is_16bit(input.scalar_type()) && t.scalar_type() == at::kFloat);
  TORCH_CHECK_TYPE(ok, op, ": ", name, " must have the input's dtype ",
                   py_name(input.scalar_type()), is_16bit(input.scalar_type()) ? " or float32" : "",
                   ", but got ", py_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == channels, op, ": ", name, " must have shape (",
                    channels, ",), one value per channel of the input, but got shape ",
                    t.sizes());
}

// t in dtype, t itself when it already is: a call through the dispatcher, even one that
// changes nothing, costs microseconds, and tens of them when the caches are cold.
at::Tensor as_type(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

at::Tensor param(const char* op, const char* name, const std::optional<at::Tensor>& t,
                 const at::Tensor& input, const Dense& d) {
  if (!t.has_value() || !t->defined()) return {};
  check_param(op, name, *t, input, d.channels());
  return as_type(*t, d.acc).contiguous();
}

// Statistics handed in (mean, invstd, sums): the accumulation type, shape (C,).
at::Tensor stat(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input,
                const Dense& d) {
  check_same_device(op, name, t, "input", input);
  TORCH_CHECK_TYPE(t.scalar_type() == d.acc, op, ": ", name, " must be ", py_name(d.acc),
                   " (the statistics' type for ", py_name(input.scalar_type()),
                   " input), but got ", py_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == d.channels(), op, ": ", name,
                    " must have shape (", d.channels(), ",), but got shape ", t.sizes());
  return t.contiguous();
}

at::Tensor grad_like(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                     const Dense& d) {
  check_same_device(op, "grad_output", grad_output, "input", input);
  TORCH_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(), op,
                   ": grad_output has dtype ", py_name(grad_output.scalar_type()),
                   " but input has ", py_name(input.scalar_type()));
  TORCH_CHECK_VALUE(grad_output.sizes() == input.sizes(), op,
                    ": grad_output must have the input's shape ", input.sizes(), ", but got ",
                    grad_output.sizes());
  return d.like(grad_output);
}

const void* ptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
void* mut(const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }

at::Tensor new_output(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like);  // like is dense: its strides are kept
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

at::Tensor per_channel(const Dense& d) {
  return at::empty({d.channels()}, d.x.options().dtype(d.acc));
}

// f(T{}) with T the C++ type of the accumulation type (float32 or float64). Per-channel
// arithmetic of CPU tensors runs in plain loops: for C values they cost less than the
// machinery of the ATen ops.
template <typename F>
void with_acc(at::ScalarType acc, F&& f) {
  acc == at::kDouble ? f(double{}) : f(float{});
}

at::Tensor back_to(const at::Tensor& t, const at::Tensor& input) {
  return as_type(t, input.scalar_type());
}

#ifdef DLCV_FAST_WITH_CUDA
at::Tensor workspace(const Dense& d) {
  const size_t bytes = cuda::batch_norm_workspace_bytes(d.dtype(), d.shape);
  return at::empty({static_cast<int64_t>(bytes)}, d.x.options().dtype(at::kByte));
}
#endif

// Runs cpu_fn() on the CPU or cuda_fn(workspace pointer, stream) on the GPU.
template <typename Cpu, typename Gpu>
void run(const char* op, const Dense& d, Cpu&& cpu_fn, Gpu&& cuda_fn) {
  if (cpu_kernels(d.x)) {
    cpu_fn();
    return;
  }
#ifdef DLCV_FAST_WITH_CUDA
  const at::Tensor ws = workspace(d);
  launch_cuda(op, d.x, [&](cudaStream_t stream) { return cuda_fn(ws.mutable_data_ptr(), stream); });
#else
  (void)cuda_fn;
  no_cuda_kernels(op, d.x);
#endif
}

void check_count(const Dense& d, const at::Tensor& input) {
  TORCH_CHECK_VALUE(d.shape.count() != 1, "Expected more than 1 value per channel when training, "
                    "got input size ", input.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    bool relu) {
  const char* op = "batch_norm";
  const Dense d = dense_input(op, input);
  const at::Tensor w = param(op, "weight", weight, input, d);
  const at::Tensor b = param(op, "bias", bias, input, d);
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK_VALUE(has_rm == has_rv, op,
                    ": running_mean and running_var must both be given or both be None");
  TORCH_CHECK_VALUE(training || has_rm, op,
                    ": running_mean and running_var are needed in evaluation mode "
                    "(training=False)");
  if (has_rm) {
    check_param(op, "running_mean", *running_mean, input, d.channels());
    check_param(op, "running_var", *running_var, input, d.channels());
    // Updated in place in training: an expanded view would get one channel's value in all.
    for (const auto& [name, t] : {std::pair{"running_mean", &*running_mean},
                                  std::pair{"running_var", &*running_var}}) {
      TORCH_CHECK(!training || at::has_internal_overlap(*t) != at::MemOverlap::Yes, op, ": ",
                  name, " is updated in place in training, but its elements share memory (an "
                  "expanded view?); pass a tensor of its own, e.g. ", name, ".clone()");
    }
  }
  TORCH_CHECK_VALUE(!training || eps > 0, op, ": eps must be positive during training, but got ",
                    eps);
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be non-negative, but got ", eps);
  if (training) check_count(d, input);

  const BatchNormParams p{ptr(w), ptr(b), relu};
  const BatchNormShape& s = d.shape;
  at::Tensor y = new_output(d.x);
  at::Tensor mean = per_channel(d), invstd = per_channel(d);
  if (!training) {
    const at::Tensor rm = as_type(*running_mean, d.acc).contiguous();
    const at::Tensor rv = as_type(*running_var, d.acc).contiguous();
    if (cpu_kernels(input)) {
      with_acc(d.acc, [&](auto tag) {
        using T = decltype(tag);
        const T* m = rm.const_data_ptr<T>();
        const T* v = rv.const_data_ptr<T>();
        T* mo = mean.mutable_data_ptr<T>();
        T* io = invstd.mutable_data_ptr<T>();
        for (int64_t c = 0; c < d.channels(); ++c) {
          mo[c] = m[c];
          io[c] = T(1) / std::sqrt(v[c] + T(eps));
        }
      });
    } else {
      mean.copy_(rm);
      invstd.copy_(at::rsqrt(rv + eps));
    }
    if (s.numel() > 0) {
      run(op, d, [&] { cpu::batch_norm_elemt(d.dtype(), ptr(d.x), p, ptr(mean), ptr(invstd), mut(y), s); },
          [&](void*, auto stream) {
#ifdef DLCV_FAST_WITH_CUDA
            return cuda::batch_norm_elemt(d.dtype(), ptr(d.x), p, ptr(mean), ptr(invstd), mut(y),
                                          s, stream);
#endif
          });
    }
  } else if (s.numel() == 0) {
    mean.zero_();
    invstd.zero_();
  } else {
    // Working copies of the running statistics in the accumulation type, written back after.
    at::Tensor rm, rv;
    if (has_rm) {
      rm = as_type(*running_mean, d.acc).contiguous();
      rv = as_type(*running_var, d.acc).contiguous();
    }
    run(op, d,
        [&] {
          cpu::batch_norm_forward_train(d.dtype(), ptr(d.x), p, mut(rm), mut(rv), mut(mean),
                                        mut(invstd), mut(y), s, momentum, eps);
        },
        [&](void* ws, auto stream) {
#ifdef DLCV_FAST_WITH_CUDA
          return cuda::batch_norm_forward_train(d.dtype(), ptr(d.x), p, mut(rm), mut(rv),
                                                mut(mean), mut(invstd), mut(y), s, momentum, eps,
                                                ws, stream);
#endif
        });
    if (has_rm) {
      if (!rm.is_same(*running_mean)) running_mean->copy_(rm);
      if (!rv.is_same(*running_var)) running_var->copy_(rv);
    }
  }
  return {d.cpu_16bit ? back_to(y, input) : y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, bool relu, std::array<bool, 3> output_mask) {
  const char* op = "batch_norm_backward";
  const Dense d = dense_input(op, input);
  const at::Tensor dy = grad_like(op, grad_output, input, d);
  const at::Tensor w = param(op, "weight", weight, input, d);
  const at::Tensor b = param(op, "bias", bias, input, d);
  const at::Tensor mean = stat(op, "save_mean", save_mean, input, d);
  const at::Tensor invstd = stat(op, "save_invstd", save_invstd, input, d);
  if (training) check_count(d, input);

  const BatchNormParams p{ptr(w), ptr(b), relu};
  const BatchNormShape& s = d.shape;
  const bool want_dx = output_mask[0];
  const bool want_sums = output_mask[1] || output_mask[2];
  at::Tensor dx = want_dx ? new_output(d.x) : at::Tensor();
  at::Tensor sum_dy = per_channel(d), sum_dy_xmu = per_channel(d);
  if (s.numel() == 0) {
    sum_dy.zero_();
    sum_dy_xmu.zero_();
  } else if (training && (want_dx || want_sums)) {
    run(op, d,
        [&] {
          cpu::batch_norm_backward_train(d.dtype(), ptr(dy), ptr(d.x), p, ptr(mean), ptr(invstd),
                                         mut(sum_dy), mut(sum_dy_xmu), mut(dx), s);
        },
        [&](void* ws, auto stream) {
#ifdef DLCV_FAST_WITH_CUDA
          return cuda::batch_norm_backward_train(d.dtype(), ptr(dy), ptr(d.x), p, ptr(mean),
                                                 ptr(invstd), mut(sum_dy), mut(sum_dy_xmu),
                                                 mut(dx), s, ws, stream);
#endif
        });
  } else if (!training) {
    if (want_sums) {
      run(op, d,
          [&] {
            cpu::batch_norm_backward_reduce(d.dtype(), ptr(dy), ptr(d.x), p, ptr(mean),
                                            ptr(invstd), mut(sum_dy), mut(sum_dy_xmu), s);
          },
          [&](void* ws, auto stream) {
#ifdef DLCV_FAST_WITH_CUDA
            return cuda::batch_norm_backward_reduce(d.dtype(), ptr(dy), ptr(d.x), p, ptr(mean),
                                                    ptr(invstd), mut(sum_dy), mut(sum_dy_xmu), s,
                                                    ws, stream);
#endif
          });
    }
    if (want_dx) {
      run(op, d,
          [&] {
            cpu::batch_norm_backward_elemt(d.dtype(), ptr(dy), ptr(d.x), p, ptr(mean),
                                           ptr(invstd), nullptr, nullptr, s.count(), mut(dx), s);
          },
          [&](void*, auto stream) {
#ifdef DLCV_FAST_WITH_CUDA
            return cuda::batch_norm_backward_elemt(d.dtype(), ptr(dy), ptr(d.x), p, ptr(mean),
                                                   ptr(invstd), nullptr, nullptr, s.count(),
                                                   mut(dx), s, stream);
#endif
          });
    }
  }
  // Gradients of absent or unwanted outputs are empty (0,) tensors.
  const auto none = [&] { return at::empty({0}, input.options()); };
  at::Tensor gx = want_dx ? (d.cpu_16bit ? back_to(dx, input) : dx) : none();
  at::Tensor gw = output_mask[1] ? at::Tensor() : none();
  if (output_mask[1]) {
    // grad_weight = sum(dy * (x - mean)) * invstd, per channel.
    if (cpu_kernels(input)) {
      gw = at::empty_like(sum_dy_xmu);
      with_acc(d.acc, [&](auto tag) {
        using T = decltype(tag);
        const T* a = sum_dy_xmu.const_data_ptr<T>();
        const T* k = invstd.const_data_ptr<T>();
        T* out = gw.mutable_data_ptr<T>();
        for (int64_t c = 0; c < d.channels(); ++c) out[c] = a[c] * k[c];
      });
    } else {
      gw = sum_dy_xmu * invstd;
    }
    gw = as_type(gw, w.defined() ? weight->scalar_type() : input.scalar_type());
  }
  at::Tensor gb = output_mask[2]
                      ? as_type(sum_dy, b.defined() ? bias->scalar_type() : input.scalar_type())
                      : none();
  return {gx, gw, gb};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input) {
  const char* op = "batch_norm_stats";
  const Dense d = dense_input(op, input);
  at::Tensor mean = per_channel(d), var = per_channel(d);
  if (d.shape.count() == 0) {  // no values: zero statistics of weight zero
    mean.zero_();
    var.zero_();
  } else if (d.shape.numel() > 0) {
    run(op, d, [&] { cpu::batch_norm_stats(d.dtype(), ptr(d.x), mut(mean), mut(var), d.shape); },
        [&](void* ws, auto stream) {
#ifdef DLCV_FAST_WITH_CUDA
          return cuda::batch_norm_stats(d.dtype(), ptr(d.x), mut(mean), mut(var), d.shape, ws,
                                        stream);
#endif
        });
  }
  return {mean, var};
}

at::Tensor batch_norm_elemt(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                            const at::Tensor& invstd, bool relu) {
  const char* op = "batch_norm_elemt";
  const Dense d = dense_input(op, input);
  const at::Tensor w = param(op, "weight", weight, input, d);
  const at::Tensor b = param(op, "bias", bias, input, d);
  const at::Tensor m = stat(op, "mean", mean, input, d);
  const at::Tensor is = stat(op, "invstd", invstd, input, d);
  const BatchNormParams p{ptr(w), ptr(b), relu};
  at::Tensor y = new_output(d.x);
  if (d.shape.numel() > 0) {
    run(op, d, [&] { cpu::batch_norm_elemt(d.dtype(), ptr(d.x), p, ptr(m), ptr(is), mut(y), d.shape); },
        [&](void*, auto stream) {
#ifdef DLCV_FAST_WITH_CUDA
          return cuda::batch_norm_elemt(d.dtype(), ptr(d.x), p, ptr(m), ptr(is), mut(y), d.shape,
                                        stream);
#endif
        });
  }
  return d.cpu_16bit ? back_to(y, input) : y;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
    bool relu) {
  const char* op = "batch_norm_backward_reduce";
  const Dense d = dense_input(op, input);
  const at::Tensor dy = grad_like(op, grad_output, input, d);
  const at::Tensor w = param(op, "weight", weight, input, d);
  const at::Tensor b = param(op, "bias", bias, input, d);
  const at::Tensor m = stat(op, "mean", mean, input, d);
  const at::Tensor is = stat(op, "invstd", invstd, input, d);
  const BatchNormParams p{ptr(w), ptr(b), relu};
  at::Tensor sum_dy = per_channel(d), sum_dy_xmu = per_channel(d);
  if (d.shape.numel() == 0) {
    sum_dy.zero_();
    sum_dy_xmu.zero_();
  } else {
    run(op, d,
        [&] {
          cpu::batch_norm_backward_reduce(d.dtype(), ptr(dy), ptr(d.x), p, ptr(m), ptr(is),
                                          mut(sum_dy), mut(sum_dy_xmu), d.shape);
        },
        [&](void* ws, auto stream) {
#ifdef DLCV_FAST_WITH_CUDA
          return cuda::batch_norm_backward_reduce(d.dtype(), ptr(dy), ptr(d.x), p, ptr(m),
                                                  ptr(is), mut(sum_dy), mut(sum_dy_xmu), d.shape,
                                                  ws, stream);
#endif
        });
  }
  return {sum_dy, sum_dy_xmu};
}

at::Tensor batch_norm_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const at::Tensor& mean, const at::Tensor& invstd,
                                     const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                     int64_t count, bool relu) {
  const char* op = "batch_norm_backward_elemt";
  const Dense d = dense_input(op, input);
  const at::Tensor dy = grad_like(op, grad_output, input, d);
  const at::Tensor w = param(op, "weight", weight, input, d);
  const at::Tensor b = param(op, "bias", bias, input, d);
  const at::Tensor m = stat(op, "mean", mean, input, d);
  const at::Tensor is = stat(op, "invstd", invstd, input, d);
  const at::Tensor sd = stat(op, "sum_dy", sum_dy, input, d);
  const at::Tensor sdx = stat(op, "sum_dy_xmu", sum_dy_xmu, input, d);
  TORCH_CHECK_VALUE(count > 0, op, ": count must be positive, but got ", count);
  const BatchNormParams p{ptr(w), ptr(b), relu};
  at::Tensor dx = new_output(d.x);
  if (d.shape.numel() > 0) {
    run(op, d,
        [&] {
          cpu::batch_norm_backward_elemt(d.dtype(), ptr(dy), ptr(d.x), p, ptr(m), ptr(is),
                                         ptr(sd), ptr(sdx), count, mut(dx), d.shape);
        },
        [&](void*, auto stream) {
#ifdef DLCV_FAST_WITH_CUDA
          return cuda::batch_norm_backward_elemt(d.dtype(), ptr(dy), ptr(d.x), p, ptr(m), ptr(is),
                                                 ptr(sd), ptr(sdx), count, mut(dx), d.shape,
                                                 stream);
#endif
        });
  }
  return d.cpu_16bit ? back_to(dx, input) : dx;
}

}  // namespace dlcv_fast
