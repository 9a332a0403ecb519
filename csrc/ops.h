// Host entry points of every op: what torch.library and the pybind11 module both expose.
#pragma once

#include <ATen/core/Tensor.h>

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

}  // namespace dlcv_fast
