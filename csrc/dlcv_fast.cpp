// The whole C++ surface of dlcv_fast: the torch.library schema of every op (namespace
// dlcv_fast) with its CPU, CUDA and autograd implementations, and the same functions as a
// plain pybind11 module. Fake (meta) implementations are registered from Python, next to
// each op (dlcv_fast/ops/), where they work on symbolic shapes.

#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "ops.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// An op as the dispatcher sees it: a call through the handle reaches the CPU, CUDA or fake
// implementation below autograd, and records autograd where it is enabled.
template <typename Fn>
auto op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// Whether a call must go through its autograd::Function: grad mode on and a tensor that
// requires grad, or a forward-mode tangent (which Function::apply rejects with its message).
// Otherwise the op is called below autograd directly: Function::apply builds its graph node
// and wraps the outputs even when nothing is recorded (about 20 us of a tiny add_noise's
// 185 us on a cold CPU cache).
bool needs_autograd(const at::Tensor& t, bool grad_mode) {
  return t.defined() && ((grad_mode && t.requires_grad()) || t._fw_grad(0).defined());
}
bool needs_autograd(const std::optional<at::Tensor>& t, bool grad_mode) {
  return t.has_value() && needs_autograd(*t, grad_mode);
}
template <typename... Ts>
bool needs_autograd(const Ts&... ts) {
  const bool grad_mode = at::GradMode::is_enabled();
  return (needs_autograd(ts, grad_mode) || ...);
}

std::optional<at::Tensor> optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_op(const at::Tensor& self, at::IntArrayRef k,
                                                 at::IntArrayRef s, at::IntArrayRef p,
                                                 at::IntArrayRef d, bool ceil_mode) {
  static const auto op = op_handle<decltype(dlcv_fast::max_pool2d)>("dlcv_fast::max_pool2d");
  return op.call(self, k, s, p, d, ceil_mode);
}

at::Tensor max_pool2d_backward_op(const at::Tensor& grad_output, const at::Tensor& self,
                                  const at::Tensor& indices, at::IntArrayRef k, at::IntArrayRef s,
                                  at::IntArrayRef p, at::IntArrayRef d, bool ceil_mode) {
  static const auto op =
      op_handle<decltype(dlcv_fast::max_pool2d_backward)>("dlcv_fast::max_pool2d_backward");
  return op.call(grad_output, self, indices, k, s, p, d, ceil_mode);
}

void save_params(AutogradContext* ctx, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                 at::IntArrayRef d, bool ceil_mode) {
  ctx->saved_data["kernel_size"] = k.vec();
  ctx->saved_data["stride"] = s.vec();
  ctx->saved_data["padding"] = p.vec();
  ctx->saved_data["dilation"] = d.vec();
  ctx->saved_data["ceil_mode"] = ceil_mode;
}

// Autograd in C++ rather than Python: it keeps a call's overhead near PyTorch's own.
class MaxPool2dFunction : public torch::autograd::Function<MaxPool2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& self, at::IntArrayRef k,
                               at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d,
                               bool ceil_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, indices] = max_pool2d_op(self, k, s, p, d, ceil_mode);
    ctx->save_for_backward({self, indices});
    save_params(ctx, k, s, p, d, ceil_mode);
    ctx->mark_non_differentiable({indices});
    return {output, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& m = ctx->saved_data;
    // Through the dispatcher, so that a double backward is recorded.
    at::Tensor grad_input = max_pool2d_backward_op(
        grads[0], saved[0], saved[1], m.at("kernel_size").toIntVector(),
        m.at("stride").toIntVector(), m.at("padding").toIntVector(),
        m.at("dilation").toIntVector(), m.at("ceil_mode").toBool());
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// (out,) bool: whether each output's window along one dimension holds an input element.
at::Tensor live_along(int64_t out, int64_t size, int64_t k, int64_t s, int64_t p, int64_t d,
                      const at::TensorOptions& options) {
  const at::Tensor taps = at::arange(out, options).view({-1, 1}) * s - p +
                          at::arange(k, options) * d;
  return at::logical_and(taps >= 0, taps < size).any(-1);
}

// max_pool2d_backward is linear in grad_output; its adjoint gathers through the indices, at
// the outputs whose window holds an input element (a window wholly in the padding passed no
// gradient, and its index may lie outside the plane).
class MaxPool2dBackwardFunction : public torch::autograd::Function<MaxPool2dBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_output,
                            const at::Tensor& self, const at::Tensor& indices, at::IntArrayRef k,
                            at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d,
                            bool ceil_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({indices});
    ctx->saved_data["geometry"] = std::vector<int64_t>{
        self.size(-2), self.size(-1), k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1]};
    return max_pool2d_backward_op(grad_output, self, indices, k, s, p, d, ceil_mode);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor indices = ctx->get_saved_variables()[0];
    const std::vector<int64_t> g = ctx->saved_data["geometry"].toIntVector();
    const auto options = indices.options().dtype(at::kLong);
    const at::Tensor live =
        at::logical_and(live_along(indices.size(-2), g[0], g[2], g[4], g[6], g[8], options)
                            .view({-1, 1}),
                        live_along(indices.size(-1), g[1], g[3], g[5], g[7], g[9], options)
                            .view({1, -1}));
    const at::Tensor safe = indices.masked_fill(live.logical_not(), 0);
    const at::Tensor grad_grad_output = grads[0].flatten(-2).gather(-1, safe.flatten(-2))
                                            .view(indices.sizes())
                                            .masked_fill(live.logical_not(), 0);
    return {grad_grad_output, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> max_pool2d_autograd(const at::Tensor& self, at::IntArrayRef k,
                                                       at::IntArrayRef s, at::IntArrayRef p,
                                                       at::IntArrayRef d, bool ceil_mode) {
  if (!needs_autograd(self)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return max_pool2d_op(self, k, s, p, d, ceil_mode);
  }
  auto out = MaxPool2dFunction::apply(self, k, s, p, d, ceil_mode);
  return {out[0], out[1]};
}

at::Tensor max_pool2d_backward_autograd(const at::Tensor& grad_output, const at::Tensor& self,
                                        const at::Tensor& indices, at::IntArrayRef k,
                                        at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d,
                                        bool ceil_mode) {
  if (!needs_autograd(grad_output, self, indices)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return max_pool2d_backward_op(grad_output, self, indices, k, s, p, d, ceil_mode);
  }
  return MaxPool2dBackwardFunction::apply(grad_output, self, indices, k, s, p, d, ceil_mode);
}

// --- noise scheduling -------------------------------------------------------------------

at::Tensor noise_op(bool velocity, const at::Tensor& x, const at::Tensor& e, const at::Tensor& t,
                    const at::Tensor& table) {
  static const auto add = op_handle<decltype(dlcv_fast::add_noise)>("dlcv_fast::add_noise");
  static const auto vel = op_handle<decltype(dlcv_fast::get_velocity)>("dlcv_fast::get_velocity");
  return velocity ? vel.call(x, e, t, table) : add.call(x, e, t, table);
}

std::tuple<at::Tensor, at::Tensor> noise_backward_op(const at::Tensor& grad, const at::Tensor& t,
                                                     const at::Tensor& table, bool velocity) {
  static const auto op =
      op_handle<decltype(dlcv_fast::noise_backward)>("dlcv_fast::noise_backward");
  return op.call(grad, t, table, velocity);
}

// add_noise and get_velocity are out = cx * x + ce * e: linear in (x, e).
template <bool Velocity>
class NoiseFunction : public torch::autograd::Function<NoiseFunction<Velocity>> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& e,
                            const at::Tensor& t, const at::Tensor& table) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({t, table});
    return noise_op(Velocity, x, e, t, table);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [grad_x, grad_e] = noise_backward_op(grads[0], saved[0], saved[1], Velocity);
    return {grad_x, grad_e, at::Tensor(), at::Tensor()};
  }
};

// noise_backward is (cx * g, ce * g); its adjoint maps (gx, ge) to cx * gx + ce * ge, the
// forward op again.
class NoiseBackwardFunction : public torch::autograd::Function<NoiseBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& t,
                               const at::Tensor& table, bool velocity) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({t, table});
    ctx->saved_data["velocity"] = velocity;
    auto [grad_x, grad_e] = noise_backward_op(grad, t, table, velocity);
    return {grad_x, grad_e};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool velocity = ctx->saved_data["velocity"].toBool();
    const at::Tensor gx = grads[0].defined() ? grads[0] : at::zeros_like(grads[1]);
    const at::Tensor ge = grads[1].defined() ? grads[1] : at::zeros_like(grads[0]);
    return {noise_op(velocity, gx, ge, saved[0], saved[1]), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// The table gets no gradient: one that requires it is refused rather than left without.
void refuse_table_grad(const char* op, const at::Tensor& table) {
  TORCH_CHECK_VALUE(!needs_autograd(table), op, ": alphas_cumprod requires grad, but its "
                    "gradient is not computed; pass alphas_cumprod.detach()");
}

at::Tensor add_noise_autograd(const at::Tensor& x, const at::Tensor& e, const at::Tensor& t,
                              const at::Tensor& table) {
  refuse_table_grad("add_noise", table);
  if (!needs_autograd(x, e, t, table)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return noise_op(false, x, e, t, table);
  }
  return NoiseFunction<false>::apply(x, e, t, table);
}

at::Tensor get_velocity_autograd(const at::Tensor& x, const at::Tensor& e, const at::Tensor& t,
                                 const at::Tensor& table) {
  refuse_table_grad("get_velocity", table);
  if (!needs_autograd(x, e, t, table)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return noise_op(true, x, e, t, table);
  }
  return NoiseFunction<true>::apply(x, e, t, table);
}

std::tuple<at::Tensor, at::Tensor> noise_backward_autograd(const at::Tensor& grad,
                                                           const at::Tensor& t,
                                                           const at::Tensor& table,
                                                           bool velocity) {
  if (!needs_autograd(grad, t, table)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return noise_backward_op(grad, t, table, velocity);
  }
  auto out = NoiseBackwardFunction::apply(grad, t, table, velocity);
  return {out[0], out[1]};
}

// --- conv2d ------------------------------------------------------------------------------

at::Tensor conv2d_op(const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                     bool relu) {
  static const auto op = op_handle<decltype(dlcv_fast::conv2d)>("dlcv_fast::conv2d");
  return op.call(input, weight, bias, stride, padding, dilation, groups, relu);
}

at::Tensor conv2d_backward_input_op(const at::Tensor& grad_output, const at::Tensor& input,
                                    const at::Tensor& weight, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                    int64_t groups) {
  static const auto op = op_handle<decltype(dlcv_fast::conv2d_backward_input)>(
      "dlcv_fast::conv2d_backward_input");
  return op.call(grad_output, input, weight, stride, padding, dilation, groups);
}

at::Tensor conv2d_backward_weight_op(const at::Tensor& grad_output, const at::Tensor& input,
                                     const at::Tensor& weight, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                     int64_t groups) {
  static const auto op = op_handle<decltype(dlcv_fast::conv2d_backward_weight)>(
      "dlcv_fast::conv2d_backward_weight");
  return op.call(grad_output, input, weight, stride, padding, dilation, groups);
}

std::tuple<at::Tensor, at::Tensor> conv2d_bias_relu_backward_op(
    const at::Tensor& grad_output, const std::optional<at::Tensor>& output, bool bias) {
  static const auto op = op_handle<decltype(dlcv_fast::conv2d_bias_relu_backward)>(
      "dlcv_fast::conv2d_bias_relu_backward");
  return op.call(grad_output, output, bias);
}

// Differentiable in input, weight and bias (given as a list of 0 or 1 tensors, as
// autograd::Function takes no undefined tensor). The backward is the dgrad, wgrad and
// bias/ReLU ops, whose own derivatives (double backward) are registered from Python
// (dlcv_fast/ops/conv2d.py). Without create_graph they are called below autograd, which
// skips that Python layer: autograd in C++ keeps a call's overhead near PyTorch's own.
class Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& weight, at::TensorList bias,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, bool relu) {
    const bool has_bias = !bias.empty();
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = conv2d_op(input, weight, has_bias ? std::optional<at::Tensor>(bias[0]) : std::nullopt,
                      stride, padding, dilation, groups, relu);
    }
    ctx->save_for_backward({input, weight, relu ? out : at::Tensor()});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["has_bias"] = has_bias;
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool relu = ctx->saved_data["relu"].toBool();
    // Gradient slots: input, weight, the bias if given, then the 5 other arguments.
    variable_list result(2 + static_cast<size_t>(has_bias) + 5);
    const bool need_input = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1);
    const bool need_bias = has_bias && ctx->needs_input_grad(2);
    if (!grads[0].defined()) return result;
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::vector<int64_t> dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
    if (!at::GradMode::is_enabled()) below_autograd.emplace();
    at::Tensor g = grads[0];
    if (relu || need_bias) {
      auto [masked, summed] = conv2d_bias_relu_backward_op(
          grads[0], relu ? optional(saved[2]) : std::nullopt, need_bias);
      if (relu) g = masked;
      if (need_bias) result[2] = summed;
    }
    if (need_input) {
      result[0] = conv2d_backward_input_op(g, saved[0], saved[1], stride, padding, dilation,
                                           groups);
    }
    if (need_weight) {
      result[1] = conv2d_backward_weight_op(g, saved[0], saved[1], stride, padding, dilation,
                                            groups);
    }
    return result;
  }
};

at::Tensor conv2d_autograd(const at::Tensor& input, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           bool relu) {
  if (!needs_autograd(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return conv2d_op(input, weight, bias, stride, padding, dilation, groups, relu);
  }
  std::vector<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b.push_back(*bias);
  return Conv2dFunction::apply(input, weight, at::TensorList(b), stride, padding, dilation,
                               groups, relu)[0];
}

// --- batch norm --------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_op(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    bool relu) {
  static const auto op = op_handle<decltype(dlcv_fast::batch_norm)>("dlcv_fast::batch_norm");
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_op(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, bool relu, std::array<bool, 3> mask) {
  static const auto op =
      op_handle<decltype(dlcv_fast::batch_norm_backward)>("dlcv_fast::batch_norm_backward");
  return op.call(grad_output, input, weight, bias, save_mean, save_invstd, training, relu, mask);
}

// The running statistics are updated in place: their version counters are bumped, as an
// in-place op's would be.
void bump_running_stats(const std::optional<at::Tensor>& running_mean,
                        const std::optional<at::Tensor>& running_var) {
  for (const auto& t : {running_mean, running_var}) {
    if (t.has_value() && t->defined()) torch::autograd::impl::bump_version(*t);
  }
}

// Differentiable in input, weight and bias. autograd::Function takes no undefined tensor, so
// the affine parameters given come as a list of 0, 1 or 2 tensors.
class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               at::TensorList affine, bool has_weight, bool has_bias,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var, bool training,
                               double momentum, double eps, bool relu) {
    const at::Tensor weight = has_weight ? affine[0] : at::Tensor();
    const at::Tensor bias = has_bias ? affine[has_weight ? 1 : 0] : at::Tensor();
    at::Tensor out, mean, invstd;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, mean, invstd) =
          batch_norm_op(input, optional(weight), optional(bias), running_mean, running_var,
                        training, momentum, eps, relu);
    }
    if (training) bump_running_stats(running_mean, running_var);
    ctx->save_for_backward({input, weight, bias, mean, invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    ctx->mark_non_differentiable({mean, invstd});
    return {out, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_weight = saved[1].defined(), has_bias = saved[2].defined();
    const size_t n_affine = static_cast<size_t>(has_weight) + static_cast<size_t>(has_bias);
    // Gradient slots: input, the affine tensors, then the 8 other arguments.
    variable_list result(1 + n_affine + 8);
    const size_t w_at = 1, b_at = has_weight ? 2 : 1;
    const std::array<bool, 3> mask{ctx->needs_input_grad(0),
                                   has_weight && ctx->needs_input_grad(w_at),
                                   has_bias && ctx->needs_input_grad(b_at)};
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2])) return result;
    auto [gx, gw, gb] = batch_norm_backward_op(
        grads[0], saved[0], optional(saved[1]), optional(saved[2]), saved[3], saved[4],
        ctx->saved_data["training"].toBool(), ctx->saved_data["relu"].toBool(), mask);
    if (mask[0]) result[0] = gx;
    if (mask[1]) result[w_at] = gw;
    if (mask[2]) result[b_at] = gb;
    return result;
  }
};

// Double backward: the formula is dlcv_fast::batch_norm_double_backward, written in PyTorch
// ops in dlcv_fast/ops/batch_norm.py (shared with the Triton backend, differentiable again).
class BatchNormBackwardFunction : public torch::autograd::Function<BatchNormBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_output,
                               const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& save_mean,
                               const at::Tensor& save_invstd, bool training, bool relu,
                               std::array<bool, 3> mask) {
    at::Tensor gx, gw, gb;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(gx, gw, gb) = batch_norm_backward_op(grad_output, input, weight, bias, save_mean,
                                                    save_invstd, training, relu, mask);
    }
    ctx->save_for_backward({grad_output, input, weight.value_or(at::Tensor()),
                            bias.value_or(at::Tensor()), save_mean, save_invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    return {gx, gw, gb};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
        .findSchemaOrThrow("dlcv_fast::batch_norm_double_backward", "")
        .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
            const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
            const at::Tensor&, const at::Tensor&, bool, bool, std::array<bool, 3>)>();
    const auto saved = ctx->get_saved_variables();
    const bool has_weight = saved[2].defined();
    // needs_input_grad counts the tensors given: grad_output, input, then weight if any.
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_weight && ctx->needs_input_grad(2)};
    variable_list result(9);  // one per forward argument
    const auto given = [](const at::Tensor& t) {
      return t.defined() && t.numel() > 0 ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    auto [g_dy, g_x, g_w] = op.call(given(grads[0]), given(grads[1]), given(grads[2]), saved[0],
                                    saved[1], optional(saved[2]), optional(saved[3]), saved[4],
                                    saved[5], ctx->saved_data["training"].toBool(),
                                    ctx->saved_data["relu"].toBool(), mask);
    if (mask[0] && g_dy.numel() > 0) result[0] = g_dy;
    if (mask[1] && g_x.numel() > 0) result[1] = g_x;
    if (mask[2] && g_w.numel() > 0) result[2] = g_w;
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_autograd(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    bool relu) {
  if (!needs_autograd(input, weight, bias, running_mean, running_var)) {
    at::Tensor out, mean, invstd;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, mean, invstd) = batch_norm_op(input, weight, bias, running_mean, running_var,
                                                  training, momentum, eps, relu);
    }
    if (training) bump_running_stats(running_mean, running_var);
    return {out, mean, invstd};
  }
  const bool has_weight = weight.has_value() && weight->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  std::vector<at::Tensor> affine;
  if (has_weight) affine.push_back(*weight);
  if (has_bias) affine.push_back(*bias);
  auto out = BatchNormFunction::apply(input, at::TensorList(affine), has_weight, has_bias,
                                      running_mean, running_var, training, momentum, eps, relu);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, bool relu, std::array<bool, 3> mask) {
  if (!needs_autograd(grad_output, input, weight, bias, save_mean, save_invstd)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return batch_norm_backward_op(grad_output, input, weight, bias, save_mean, save_invstd,
                                  training, relu, mask);
  }
  auto out = BatchNormBackwardFunction::apply(grad_output, input, weight, bias, save_mean,
                                              save_invstd, training, relu, mask);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY(dlcv_fast, m) {
  m.def(
      "max_pool2d(Tensor self, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> (Tensor, Tensor)");
  m.def(
      "max_pool2d_backward(Tensor grad_output, Tensor self, Tensor indices, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor");
  m.def(
      "add_noise(Tensor original_samples, Tensor noise, Tensor timesteps, "
      "Tensor alphas_cumprod) -> Tensor");
  m.def("get_velocity(Tensor sample, Tensor noise, Tensor timesteps, Tensor alphas_cumprod) -> Tensor");
  m.def(
      "noise_backward(Tensor grad, Tensor timesteps, Tensor alphas_cumprod, bool velocity) "
      "-> (Tensor, Tensor)");
  m.def(
      "scheduler_step(Tensor model_output, Tensor sample, Tensor? noise, Tensor? variance, "
      "Tensor? thresholds, float[] coefficients, int clip, int variance_mode, "
      "bool recompute_eps) -> (Tensor, Tensor)");
  m.def(
      "conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, "
      "int[2] dilation, int groups, bool relu) -> Tensor");
  m.def(
      "conv2d_backward_input(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "conv2d_backward_weight(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups) -> Tensor");
  m.def(
      "conv2d_bias_relu_backward(Tensor grad_output, Tensor? output, bool bias) "
      "-> (Tensor, Tensor)");
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, bool relu) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, "
      "Tensor save_mean, Tensor save_invstd, bool training, bool relu, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_stats(Tensor input) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_elemt(Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, "
      "bool relu) -> Tensor");
  m.def(
      "batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor? weight, "
      "Tensor? bias, Tensor mean, Tensor invstd, bool relu) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor? weight, "
      "Tensor? bias, Tensor mean, Tensor invstd, Tensor sum_dy, Tensor sum_dy_xmu, int count, "
      "bool relu) -> Tensor");
  // seed is a SymInt: under torch.compile it is the .item() of a traced randint.
  m.def(
      "sdpa(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, "
      "bool is_causal, float scale, SymInt seed) -> (Tensor, Tensor)");
  m.def(
      "sdpa_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor lse, Tensor? attn_mask, float dropout_p, bool is_causal, float scale, SymInt seed) "
      "-> (Tensor, Tensor, Tensor)");
}

// The entry points dispatch on the device themselves (csrc/*.cpp): one table serves CPU and
// CUDA.
static void impl_kernels(torch::Library& m) {
  m.impl("max_pool2d", &dlcv_fast::max_pool2d);
  m.impl("max_pool2d_backward", &dlcv_fast::max_pool2d_backward);
  m.impl("add_noise", &dlcv_fast::add_noise);
  m.impl("get_velocity", &dlcv_fast::get_velocity);
  m.impl("noise_backward", &dlcv_fast::noise_backward);
  m.impl("scheduler_step", &dlcv_fast::scheduler_step);
  m.impl("conv2d", &dlcv_fast::conv2d);
  m.impl("conv2d_backward_input", &dlcv_fast::conv2d_backward_input);
  m.impl("conv2d_backward_weight", &dlcv_fast::conv2d_backward_weight);
  m.impl("conv2d_bias_relu_backward", &dlcv_fast::conv2d_bias_relu_backward);
  m.impl("batch_norm", &dlcv_fast::batch_norm);
  m.impl("batch_norm_backward", &dlcv_fast::batch_norm_backward);
  m.impl("batch_norm_stats", &dlcv_fast::batch_norm_stats);
  m.impl("batch_norm_elemt", &dlcv_fast::batch_norm_elemt);
  m.impl("batch_norm_backward_reduce", &dlcv_fast::batch_norm_backward_reduce);
  m.impl("batch_norm_backward_elemt", &dlcv_fast::batch_norm_backward_elemt);
  m.impl("sdpa", &dlcv_fast::sdpa);
  m.impl("sdpa_backward", &dlcv_fast::sdpa_backward);
}

TORCH_LIBRARY_IMPL(dlcv_fast, CPU, m) { impl_kernels(m); }

TORCH_LIBRARY_IMPL(dlcv_fast, Autograd, m) {
  m.impl("max_pool2d", &max_pool2d_autograd);
  m.impl("max_pool2d_backward", &max_pool2d_backward_autograd);
  m.impl("add_noise", &add_noise_autograd);
  m.impl("get_velocity", &get_velocity_autograd);
  m.impl("noise_backward", &noise_backward_autograd);
  m.impl("conv2d", &conv2d_autograd);
  m.impl("batch_norm", &batch_norm_autograd);
  m.impl("batch_norm_backward", &batch_norm_backward_autograd);
}

#ifdef DLCV_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(dlcv_fast, CUDA, m) { impl_kernels(m); }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dlcv_fast's CPU and CUDA kernels (the ops are also under torch.ops.dlcv_fast)";
  m.def("cuda_built", &dlcv_fast::cuda_built, "whether this build holds the CUDA kernels");
  m.def("cuda_emulated", [] {
#ifdef DLCV_FAST_CUDA_EMU
    return true;
#else
    return false;
#endif
  }, "whether this build runs the CUDA kernels on the CPU, for every tensor (tests/cuda_emu.py)");
  m.def("conv_allows_tf32", &dlcv_fast::conv_allows_tf32,
        "whether float32 convolutions may use TF32 (torch.backends.cudnn.conv.fp32_precision)");
  m.def("cpu_isa", [] { return dlcv_fast::cpu::isa_name(dlcv_fast::cpu::active_isa()); },
        "the instruction set the CPU kernels run with: base, avx2 or avx512");
  m.def("set_cpu_isa", &dlcv_fast::cpu::set_isa, py::arg("name"),
        "run the CPU kernels with 'base', 'avx2' or 'avx512' (if supported), or 'auto'");
  m.def("max_pool2d", &dlcv_fast::max_pool2d, "max_pool2d forward: (output, indices)",
        py::arg("input"), py::arg("kernel_size"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("ceil_mode"));
  m.def("max_pool2d_backward", &dlcv_fast::max_pool2d_backward, "max_pool2d backward: grad_input",
        py::arg("grad_output"), py::arg("input"), py::arg("indices"), py::arg("kernel_size"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("ceil_mode"));
  m.def("add_noise", &dlcv_fast::add_noise, "sqrt(a_t) x0 + sqrt(1 - a_t) noise",
        py::arg("original_samples"), py::arg("noise"), py::arg("timesteps"),
        py::arg("alphas_cumprod"));
  m.def("get_velocity", &dlcv_fast::get_velocity, "sqrt(a_t) noise - sqrt(1 - a_t) sample",
        py::arg("sample"), py::arg("noise"), py::arg("timesteps"), py::arg("alphas_cumprod"));
  m.def("noise_backward", &dlcv_fast::noise_backward,
        "gradients (sample, noise) of add_noise or (velocity=True) get_velocity", py::arg("grad"),
        py::arg("timesteps"), py::arg("alphas_cumprod"), py::arg("velocity"));
  m.def("conv2d", &dlcv_fast::conv2d,
        "conv2d forward (padding [top, left, bottom, right]), bias and ReLU fused",
        py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("relu"));
  m.def("conv2d_backward_input", &dlcv_fast::conv2d_backward_input, "conv2d dgrad",
        py::arg("grad_output"), py::arg("input"), py::arg("weight"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"));
  m.def("conv2d_backward_weight", &dlcv_fast::conv2d_backward_weight, "conv2d wgrad",
        py::arg("grad_output"), py::arg("input"), py::arg("weight"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"));
  m.def("conv2d_bias_relu_backward", &dlcv_fast::conv2d_bias_relu_backward,
        "(grad masked by output > 0, grad_bias)", py::arg("grad_output"), py::arg("output"),
        py::arg("bias"));
  m.def("batch_norm", &dlcv_fast::batch_norm,
        "batch norm forward (optionally + ReLU): (output, save_mean, save_invstd)",
        py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"),
        py::arg("running_var"), py::arg("training"), py::arg("momentum"), py::arg("eps"),
        py::arg("relu"));
  m.def("batch_norm_backward", &dlcv_fast::batch_norm_backward,
        "batch norm backward: (grad_input, grad_weight, grad_bias)", py::arg("grad_output"),
        py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("save_mean"),
        py::arg("save_invstd"), py::arg("training"), py::arg("relu"), py::arg("output_mask"));
  m.def("sdpa", &dlcv_fast::sdpa, "fused attention forward: (out, lse)", py::arg("query"),
        py::arg("key"), py::arg("value"), py::arg("attn_mask"), py::arg("dropout_p"),
        py::arg("is_causal"), py::arg("scale"), py::arg("seed"));
  m.def("sdpa_backward", &dlcv_fast::sdpa_backward,
        "fused attention backward: (grad_query, grad_key, grad_value)", py::arg("grad_out"),
        py::arg("query"), py::arg("key"), py::arg("value"), py::arg("out"), py::arg("lse"),
        py::arg("attn_mask"), py::arg("dropout_p"), py::arg("is_causal"), py::arg("scale"),
        py::arg("seed"));
}
