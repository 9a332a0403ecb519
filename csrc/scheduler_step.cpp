// Host entry point of the fused sampler step (step_params.h): check the arguments, lay the
// tensors out densely with the batch outermost, then run the CPU or CUDA kernel.

#include <ATen/ops/empty_like.h>

#include <limits>
#include <optional>

#include "checks.h"
#include "cpu/kernels.h"
#include "ops.h"
#include "step_params.h"

#ifdef DLCV_FAST_WITH_CUDA
#include "cuda/launchers.h"
#endif

namespace dlcv_fast {
namespace {

constexpr const char* kOp = "scheduler_step";

void check_like(const char* name, const at::Tensor& t, const at::Tensor& sample) {
  check_same_device(kOp, name, t, "sample", sample);
  TORCH_CHECK_TYPE(t.scalar_type() == sample.scalar_type(), kOp, ": ", name, " has dtype ",
                   t.scalar_type(), " but sample has ", sample.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == sample.sizes(), kOp, ": ", name, " must have the shape of sample ",
                    sample.sizes(), ", but got ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> scheduler_step(
    const at::Tensor& model_output, const at::Tensor& sample, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& variance, const std::optional<at::Tensor>& thresholds,
    at::ArrayRef<double> coefficients, int64_t clip, int64_t variance_mode, bool recompute_eps) {
  check_floating(kOp, "sample", sample);
  TORCH_CHECK_VALUE(sample.dim() >= 1, kOp, ": sample must have a batch dimension, but is 0-d");
  check_like("model_output", model_output, sample);
  TORCH_CHECK_VALUE(coefficients.size() == kStepCoefficients, kOp, ": expected ",
                    kStepCoefficients, " coefficients, but got ", coefficients.size());
  TORCH_CHECK_VALUE(clip >= 0 && clip <= 2, kOp, ": clip must be 0, 1 or 2, but got ", clip);
  TORCH_CHECK_VALUE(variance_mode >= 0 && variance_mode <= 2, kOp,
                    ": variance_mode must be 0, 1 or 2, but got ", variance_mode);
  if (noise) check_like("noise", *noise, sample);
  TORCH_CHECK_VALUE(variance_mode == 0 || variance.has_value(), kOp,
                    ": a learned variance mode needs the predicted variance");
  if (variance) check_like("variance", *variance, sample);
  const int64_t batch = sample.size(0);
  at::Tensor th;
  if (clip == 2) {
    TORCH_CHECK_VALUE(thresholds.has_value(), kOp, ": clip=2 (thresholding) needs thresholds");
    check_same_device(kOp, "thresholds", *thresholds, "sample", sample);
    TORCH_CHECK_VALUE(thresholds->dim() == 1 && thresholds->size(0) == batch, kOp,
                      ": thresholds must have shape (", batch, ",), but got ", thresholds->sizes());
    th = thresholds->to(at::kDouble).contiguous();
  }

  StepParams p{};
  const double* c = coefficients.data();
  p.a = c[0], p.b = c[1], p.c = c[2], p.d = c[3], p.e = c[4], p.f = c[5], p.p = c[6];
  p.q = c[7], p.r = c[8], p.sigma = c[9], p.min_log = c[10], p.max_log = c[11];
  p.clip_range = c[12];
  p.clip = static_cast<StepClip>(clip);
  p.variance = static_cast<StepVariance>(variance_mode);
  p.recompute_eps = recompute_eps;
  p.has_noise = noise.has_value();
  p.batch = batch;
  p.inner = batch > 0 ? sample.numel() / batch : 0;

  // Dense in the sample's memory format (the batch outermost); the CPU kernel computes
  // 16-bit tensors in float32.
  const auto format = sample.suggest_memory_format();
  const bool cpu_16bit = cpu_kernels(sample) && (sample.scalar_type() == at::kHalf ||
                                             sample.scalar_type() == at::kBFloat16);
  const auto dense = [&](const at::Tensor& t) {
    const at::Tensor d = t.contiguous(format);
    return cpu_16bit ? d.to(at::kFloat) : d;
  };
  const at::Tensor m = dense(model_output), s = dense(sample);
  const at::Tensor z = noise ? dense(*noise) : at::Tensor();
  const at::Tensor v = variance_mode != 0 ? dense(*variance) : at::Tensor();
  at::Tensor prev = at::empty_like(s), x0 = at::empty_like(s);
  if (poison_outputs()) {
    prev.fill_(std::numeric_limits<double>::quiet_NaN());
    x0.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; };
  const double* th_ptr = th.defined() ? th.const_data_ptr<double>() : nullptr;

  if (s.numel() > 0) {
    const DType dtype = kernel_dtype(s.scalar_type());
    if (cpu_kernels(s)) {
      cpu::scheduler_step(dtype, m.const_data_ptr(), s.const_data_ptr(), ptr(z), ptr(v), th_ptr,
                          prev.mutable_data_ptr(), x0.mutable_data_ptr(), p);
    } else {
#ifdef DLCV_FAST_WITH_CUDA
      launch_cuda(kOp, s, [&](cudaStream_t stream) {
        return cuda::scheduler_step(dtype, m.const_data_ptr(), s.const_data_ptr(), ptr(z), ptr(v),
                                    th_ptr, prev.mutable_data_ptr(), x0.mutable_data_ptr(), p,
                                    stream);
      });
#else
      no_cuda_kernels(kOp, s);
#endif
    }
  }
  if (cpu_16bit) return {prev.to(sample.scalar_type()), x0.to(sample.scalar_type())};
  return {prev, x0};
}

}  // namespace dlcv_fast
