// Host entry points of the fused noise-scheduling ops (add_noise, get_velocity and their
// backward): check the arguments, lay the samples out densely with the batch outermost,
// then run the CPU or CUDA kernel.

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/stack.h>

#include <algorithm>
#include <limits>

#include "checks.h"
#include "cpu/kernels.h"
#include "noise_shape.h"
#include "ops.h"

#ifdef DLCV_FAST_WITH_CUDA
#include "cuda/launchers.h"
#endif

namespace dlcv_fast {
namespace {

// Timesteps as dense int64 of one per sample (a 0-d tensor applies to every sample), after
// checking that each indexes alphas_cumprod.
at::Tensor checked_timesteps(const char* op, const at::Tensor& timesteps, int64_t batch,
                             const at::Tensor& alphas_cumprod, const at::Tensor& like) {
  check_same_device(op, "timesteps", timesteps, "the samples", like);
  TORCH_CHECK_TYPE(!at::isFloatingType(timesteps.scalar_type()) &&
                       !at::isComplexType(timesteps.scalar_type()) &&
                       timesteps.scalar_type() != at::kBool,
                   op, ": timesteps must be an integer tensor, but got ", timesteps.scalar_type());
  TORCH_CHECK_VALUE(timesteps.dim() == 0 || (timesteps.dim() == 1 && timesteps.size(0) == batch),
                    op, ": timesteps must hold one timestep per sample (shape (", batch,
                    ",)) or be 0-d, but got shape ", timesteps.sizes());
  const int64_t steps = alphas_cumprod.size(0);
  // In int64: compared in a narrow type, the table length would wrap (1000 as int8 is -24).
  const at::Tensor t = timesteps.to(at::kLong).expand({batch}).contiguous();
  if (t.numel() == 0) return t;
  int64_t lo = 0, hi = 0;
  if (t.is_cpu()) {
    // A loop over the (few) timesteps: the ATen reductions it replaces (five ops) cost over
    // 100 us per call on a cold CPU cache, a fifth of the kernel's time on a 4 MB sample.
    const int64_t* v = t.const_data_ptr<int64_t>();
    lo = hi = v[0];
    for (int64_t i = 1; i < t.numel(); ++i) lo = std::min(lo, v[i]), hi = std::max(hi, v[i]);
  } else {
    // One host synchronisation on a GPU: an index past the table must not reach a kernel.
    const at::Tensor bounds = at::stack({t.min(), t.max()}).cpu();
    lo = bounds[0].item<int64_t>(), hi = bounds[1].item<int64_t>();
  }
  TORCH_CHECK_INDEX(lo >= 0 && hi < steps, op, ": timesteps must lie in [0, ", steps,
                    ") (the length of alphas_cumprod), but got ", lo, " .. ", hi);
  return t;
}

at::Tensor checked_table(const char* op, const at::Tensor& alphas_cumprod,
                         const at::Tensor& like) {
  check_same_device(op, "alphas_cumprod", alphas_cumprod, "the samples", like);
  TORCH_CHECK_VALUE(alphas_cumprod.dim() == 1 && alphas_cumprod.numel() > 0, op,
                    ": alphas_cumprod must be a non-empty 1-D tensor, but got shape ",
                    alphas_cumprod.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(alphas_cumprod.scalar_type()), op,
                   ": alphas_cumprod must be floating point, but got ",
                   alphas_cumprod.scalar_type());
  // A float64 table stays float64 (the coefficients are then computed in float64); any
  // other goes to float32.
  const auto type = alphas_cumprod.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return alphas_cumprod.to(type).contiguous();
}

bool is_16bit(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

at::Tensor new_output(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like);  // dense input: empty_like keeps its strides
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

at::Tensor combine(const char* op, NoiseKind kind, const at::Tensor& x, const at::Tensor& e,
                   const at::Tensor& timesteps, const at::Tensor& alphas_cumprod) {
  const char* x_name = kind == NoiseKind::AddNoise ? "original_samples" : "sample";
  check_floating(op, x_name, x);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": ", x_name, " must have a batch dimension, but is 0-d");
  check_same_device(op, "noise", e, x_name, x);
  TORCH_CHECK_TYPE(e.scalar_type() == x.scalar_type(), op, ": noise has dtype ", e.scalar_type(),
                   " but ", x_name, " has ", x.scalar_type());
  TORCH_CHECK_VALUE(e.sizes() == x.sizes(), op, ": noise must have the shape of ", x_name, " ",
                    x.sizes(), ", but got ", e.sizes());
  const at::Tensor table = checked_table(op, alphas_cumprod, x);
  const at::Tensor t = checked_timesteps(op, timesteps, x.size(0), alphas_cumprod, x);

  // The batch stays outermost in both formats, so sample b is one run of `inner` elements.
  const auto format = x.suggest_memory_format();
  const bool cpu_16bit = cpu_kernels(x) && is_16bit(x.scalar_type());
  at::Tensor xc = x.contiguous(format), ec = e.contiguous(format);
  if (cpu_16bit) {  // the CPU kernels compute 16-bit samples in float32
    xc = xc.to(at::kFloat);
    ec = ec.to(at::kFloat);
  }
  at::Tensor out = new_output(xc);
  const NoiseShape s{x.size(0), x.size(0) > 0 ? x.numel() / x.size(0) : 0};
  const bool table_double = table.scalar_type() == at::kDouble;
  if (out.numel() > 0) {
    const DType dtype = kernel_dtype(xc.scalar_type());
    if (cpu_kernels(x)) {
      cpu::noise_combine(dtype, table_double, kind, xc.const_data_ptr(), ec.const_data_ptr(),
                         t.const_data_ptr<int64_t>(), table.const_data_ptr(),
                         out.mutable_data_ptr(), s);
    } else {
#ifdef DLCV_FAST_WITH_CUDA
      launch_cuda(op, x, [&](cudaStream_t stream) {
        return cuda::noise_combine(dtype, table_double, kind, xc.const_data_ptr(),
                                   ec.const_data_ptr(), t.const_data_ptr<int64_t>(),
                                   table.const_data_ptr(), out.mutable_data_ptr(), s, stream);
      });
#else
      no_cuda_kernels(op, x);
#endif
    }
  }
  return cpu_16bit ? out.to(x.scalar_type()) : out;
}

}  // namespace

at::Tensor add_noise(const at::Tensor& original_samples, const at::Tensor& noise,
                     const at::Tensor& timesteps, const at::Tensor& alphas_cumprod) {
  return combine("add_noise", NoiseKind::AddNoise, original_samples, noise, timesteps,
                 alphas_cumprod);
}

at::Tensor get_velocity(const at::Tensor& sample, const at::Tensor& noise,
                        const at::Tensor& timesteps, const at::Tensor& alphas_cumprod) {
  return combine("get_velocity", NoiseKind::Velocity, sample, noise, timesteps, alphas_cumprod);
}

std::tuple<at::Tensor, at::Tensor> noise_backward(const at::Tensor& grad,
                                                  const at::Tensor& timesteps,
                                                  const at::Tensor& alphas_cumprod, bool velocity) {
  const char* op = "noise_backward";
  check_floating(op, "grad", grad);
  TORCH_CHECK_VALUE(grad.dim() >= 1, op, ": grad must have a batch dimension, but is 0-d");
  const at::Tensor table = checked_table(op, alphas_cumprod, grad);
  const at::Tensor t = checked_timesteps(op, timesteps, grad.size(0), alphas_cumprod, grad);
  const NoiseKind kind = velocity ? NoiseKind::Velocity : NoiseKind::AddNoise;
  const bool cpu_16bit = cpu_kernels(grad) && is_16bit(grad.scalar_type());
  at::Tensor g = grad.contiguous(grad.suggest_memory_format());
  if (cpu_16bit) g = g.to(at::kFloat);
  at::Tensor grad_x = new_output(g), grad_e = new_output(g);
  const NoiseShape s{g.size(0), g.size(0) > 0 ? g.numel() / g.size(0) : 0};
  const bool table_double = table.scalar_type() == at::kDouble;
  if (g.numel() > 0) {
    const DType dtype = kernel_dtype(g.scalar_type());
    if (cpu_kernels(g)) {
      cpu::noise_combine_backward(dtype, table_double, kind, g.const_data_ptr(), t.const_data_ptr<int64_t>(),
                                  table.const_data_ptr(), grad_x.mutable_data_ptr(),
                                  grad_e.mutable_data_ptr(), s);
    } else {
#ifdef DLCV_FAST_WITH_CUDA
      launch_cuda(op, g, [&](cudaStream_t stream) {
        return cuda::noise_combine_backward(dtype, table_double, kind, g.const_data_ptr(),
                                            t.const_data_ptr<int64_t>(), table.const_data_ptr(),
                                            grad_x.mutable_data_ptr(), grad_e.mutable_data_ptr(),
                                            s, stream);
      });
#else
      no_cuda_kernels(op, g);
#endif
    }
  }
  if (cpu_16bit) return {grad_x.to(grad.scalar_type()), grad_e.to(grad.scalar_type())};
  return {grad_x, grad_e};
}

}  // namespace dlcv_fast
