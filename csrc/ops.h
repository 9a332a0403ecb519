// Host entry points of every op: what torch.library and the pybind11 module both expose.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace dlcv_fast {

// Returns (output, indices). indices[n, c, oh, ow] = h * W + w of the window's max.
std::tuple<at::Tensor, at::Tensor> max_pool2d(const at::Tensor& self, at::IntArrayRef kernel_size,
                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                              at::IntArrayRef dilation, bool ceil_mode);

at::Tensor max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& self,
                               const at::Tensor& indices, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool ceil_mode);

// Fused noise scheduling: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e and
// v_t = sqrt(a_t) e - sqrt(1 - a_t) x, a_t = alphas_cumprod[timesteps[b]] per sample b.
at::Tensor add_noise(const at::Tensor& original_samples, const at::Tensor& noise,
                     const at::Tensor& timesteps, const at::Tensor& alphas_cumprod);

at::Tensor get_velocity(const at::Tensor& sample, const at::Tensor& noise,
                        const at::Tensor& timesteps, const at::Tensor& alphas_cumprod);

// Gradients (of the clean sample, of the noise) of add_noise, or of get_velocity.
std::tuple<at::Tensor, at::Tensor> noise_backward(const at::Tensor& grad,
                                                  const at::Tensor& timesteps,
                                                  const at::Tensor& alphas_cumprod, bool velocity);

// One DDPM or DDIM sampler step in one pass (step_params.h): (prev_sample, pred_original).
std::tuple<at::Tensor, at::Tensor> scheduler_step(
    const at::Tensor& model_output, const at::Tensor& sample, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& variance, const std::optional<at::Tensor>& thresholds,
    at::ArrayRef<double> coefficients, int64_t clip, int64_t variance_mode, bool recompute_eps);

// conv2d (conv2d_shape.h): padding is [top, left, bottom, right]; bias and ReLU fused when
// given. Outputs take the input's memory format.
at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool relu);

// The gradient of the input (dgrad) and of the weight (wgrad) from grad_output (the
// gradient that reaches the convolution itself, after bias and ReLU).
at::Tensor conv2d_backward_input(const at::Tensor& grad_output, const at::Tensor& input,
                                 const at::Tensor& weight, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups);

at::Tensor conv2d_backward_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                  const at::Tensor& weight, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups);

// (g, grad_bias): g = grad_output * (output > 0) when output is given (the fused ReLU), else
// an empty tensor; grad_bias = g (or grad_output) summed per channel when bias, else empty.
std::tuple<at::Tensor, at::Tensor> conv2d_bias_relu_backward(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& output, bool bias);
// Batch normalisation (batch_norm_shape.h), torch.nn.functional.batch_norm's semantics with an
// optional fused ReLU. Returns (output, save_mean, save_invstd), the statistics in float32
// (float64 for float64 input): the batch's in training, where the running statistics (if
// given) are updated in place, else the running ones.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    bool relu);

// (grad_input, grad_weight, grad_bias); an output not asked for in output_mask is an empty
// (0,) tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, bool relu, std::array<bool, 3> output_mask);

// The parts of a batch norm whose statistics are reduced across processes (SyncBatchNorm):
// per-channel (mean, biased variance); the output from given statistics; the sums
// (sum_dy, sum_dy_xmu); and grad_input from sums over `count` values per channel.
std::tuple<at::Tensor, at::Tensor> batch_norm_stats(const at::Tensor& input);

at::Tensor batch_norm_elemt(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& mean,
                            const at::Tensor& invstd, bool relu);

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& invstd,
    bool relu);

at::Tensor batch_norm_backward_elemt(const at::Tensor& grad_output, const at::Tensor& input,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const at::Tensor& mean, const at::Tensor& invstd,
                                     const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                     int64_t count, bool relu);
// Fused scaled-dot-product attention (attention_params.h) on 4-D (batch, heads, L, E)
// query and (batch, kv_heads, S, E) key / value: (out, lse). attn_mask (bool or query's
// dtype) broadcasts to (batch, heads, L, S); seed keys the dropout hash.
std::tuple<at::Tensor, at::Tensor> sdpa(const at::Tensor& query, const at::Tensor& key,
                                        const at::Tensor& value,
                                        const std::optional<at::Tensor>& attn_mask,
                                        double dropout_p, bool is_causal, double scale,
                                        int64_t seed);

// (grad_query, grad_key, grad_value), recomputing the probabilities from lse.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sdpa_backward(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal, double scale,
    int64_t seed);

// Whether this build holds the CUDA kernels.
bool cuda_built();

// Whether float32 convolutions may use TF32, as PyTorch's own convolution reads it:
// torch.backends.cudnn.conv.fp32_precision, inheriting from the broader settings.
bool conv_allows_tf32();

}  // namespace dlcv_fast
