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

// max_pool2d_backward is linear in grad_output; its adjoint gathers through the indices.
class MaxPool2dBackwardFunction : public torch::autograd::Function<MaxPool2dBackwardFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_output,
                            const at::Tensor& self, const at::Tensor& indices, at::IntArrayRef k,
                            at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d,
                            bool ceil_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({indices});
    return max_pool2d_backward_op(grad_output, self, indices, k, s, p, d, ceil_mode);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor indices = ctx->get_saved_variables()[0];
    const at::Tensor grad_grad_output =
        grads[0].flatten(-2).gather(-1, indices.flatten(-2)).view(indices.sizes());
    return {grad_grad_output, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> max_pool2d_autograd(const at::Tensor& self, at::IntArrayRef k,
                                                       at::IntArrayRef s, at::IntArrayRef p,
                                                       at::IntArrayRef d, bool ceil_mode) {
  auto out = MaxPool2dFunction::apply(self, k, s, p, d, ceil_mode);
  return {out[0], out[1]};
}

at::Tensor max_pool2d_backward_autograd(const at::Tensor& grad_output, const at::Tensor& self,
                                        const at::Tensor& indices, at::IntArrayRef k,
                                        at::IntArrayRef s, at::IntArrayRef p, at::IntArrayRef d,
                                        bool ceil_mode) {
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

at::Tensor add_noise_autograd(const at::Tensor& x, const at::Tensor& e, const at::Tensor& t,
                              const at::Tensor& table) {
  return NoiseFunction<false>::apply(x, e, t, table);
}

at::Tensor get_velocity_autograd(const at::Tensor& x, const at::Tensor& e, const at::Tensor& t,
                                 const at::Tensor& table) {
  return NoiseFunction<true>::apply(x, e, t, table);
}

std::tuple<at::Tensor, at::Tensor> noise_backward_autograd(const at::Tensor& grad,
                                                           const at::Tensor& t,
                                                           const at::Tensor& table,
                                                           bool velocity) {
  auto out = NoiseBackwardFunction::apply(grad, t, table, velocity);
  return {out[0], out[1]};
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
      "sdpa(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, "
      "bool is_causal, float scale, int seed) -> (Tensor, Tensor)");
  m.def(
      "sdpa_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor lse, Tensor? attn_mask, float dropout_p, bool is_causal, float scale, int seed) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dlcv_fast, CPU, m) {
  m.impl("max_pool2d", &dlcv_fast::max_pool2d);
  m.impl("max_pool2d_backward", &dlcv_fast::max_pool2d_backward);
  m.impl("add_noise", &dlcv_fast::add_noise);
  m.impl("get_velocity", &dlcv_fast::get_velocity);
  m.impl("noise_backward", &dlcv_fast::noise_backward);
  m.impl("scheduler_step", &dlcv_fast::scheduler_step);
  m.impl("sdpa", &dlcv_fast::sdpa);
  m.impl("sdpa_backward", &dlcv_fast::sdpa_backward);
}

TORCH_LIBRARY_IMPL(dlcv_fast, Autograd, m) {
  m.impl("max_pool2d", &max_pool2d_autograd);
  m.impl("max_pool2d_backward", &max_pool2d_backward_autograd);
  m.impl("add_noise", &add_noise_autograd);
  m.impl("get_velocity", &get_velocity_autograd);
  m.impl("noise_backward", &noise_backward_autograd);
}

#ifdef DLCV_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(dlcv_fast, CUDA, m) {
  m.impl("max_pool2d", &dlcv_fast::max_pool2d);
  m.impl("max_pool2d_backward", &dlcv_fast::max_pool2d_backward);
  m.impl("add_noise", &dlcv_fast::add_noise);
  m.impl("get_velocity", &dlcv_fast::get_velocity);
  m.impl("noise_backward", &dlcv_fast::noise_backward);
  m.impl("scheduler_step", &dlcv_fast::scheduler_step);
  m.impl("sdpa", &dlcv_fast::sdpa);
  m.impl("sdpa_backward", &dlcv_fast::sdpa_backward);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dlcv_fast's CPU and CUDA kernels (the ops are also under torch.ops.dlcv_fast)";
  m.def("cuda_built", &dlcv_fast::cuda_built, "whether this build holds the CUDA kernels");
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
  m.def("sdpa", &dlcv_fast::sdpa, "fused attention forward: (out, lse)", py::arg("query"),
        py::arg("key"), py::arg("value"), py::arg("attn_mask"), py::arg("dropout_p"),
        py::arg("is_causal"), py::arg("scale"), py::arg("seed"));
  m.def("sdpa_backward", &dlcv_fast::sdpa_backward,
        "fused attention backward: (grad_query, grad_key, grad_value)", py::arg("grad_out"),
        py::arg("query"), py::arg("key"), py::arg("value"), py::arg("out"), py::arg("lse"),
        py::arg("attn_mask"), py::arg("dropout_p"), py::arg("is_causal"), py::arg("scale"),
        py::arg("seed"));
}
