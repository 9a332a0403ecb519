"""The fused sampler step: one elementwise pass that turns (model_output, sample[, noise,
predicted variance]) into (prev_sample, pred_original_sample), given the scalar
coefficients a scheduler derives from its timestep (csrc/step_params.h has the formula).
dlcv_fast.diffusion.ddpm_step and ddim_step compute the coefficients; this module holds
the registered ops (``dlcv_fast::scheduler_step`` in C++, ``scheduler_step_triton``),
their fake implementations, their autograd formula and the backend dispatch.

Differentiable in model_output, sample, noise, the predicted variance and the thresholds
(guidance methods backpropagate through pred_original_sample): the gradients are written
out below in PyTorch ops, so they are differentiable again."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from dlcv_fast import backend
from dlcv_fast.ops import _func
from dlcv_fast.ops._common import refuse_forward_ad

N_COEFFICIENTS = 13  # a, b, c, d, e, f, p, q, r, sigma, min_log, max_log, clip_range
CLIP_NONE, CLIP_RANGE, CLIP_THRESHOLD = 0, 1, 2
VARIANCE_SCALAR, VARIANCE_LEARNED, VARIANCE_LEARNED_RANGE = 0, 1, 2


def check_args(model_output, sample, noise, variance, thresholds, coefficients, clip,
               variance_mode) -> None:
    """The checks of csrc/scheduler_step.cpp, for the Triton and fake paths."""
    op = "scheduler_step"
    if sample.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: sample must be float32, float64, float16 or bfloat16, but got "
                        f"{sample.dtype}")
    if sample.dim() < 1:
        raise ValueError(f"{op}: sample must have a batch dimension, but is 0-d")
    for name, t in (("model_output", model_output), ("noise", noise), ("variance", variance)):
        if t is None:
            continue
        if t.device != sample.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but sample is on "
                               f"{sample.device}; expected both on the same device")
        if t.dtype != sample.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but sample has {sample.dtype}")
        if t.shape != sample.shape:
            raise ValueError(f"{op}: {name} must have the shape of sample "
                             f"{list(sample.shape)}, but got {list(t.shape)}")
    if len(coefficients) != N_COEFFICIENTS:
        raise ValueError(f"{op}: expected {N_COEFFICIENTS} coefficients, but got "
                         f"{len(coefficients)}")
    if clip not in (0, 1, 2):
        raise ValueError(f"{op}: clip must be 0, 1 or 2, but got {clip}")
    if variance_mode not in (0, 1, 2):
        raise ValueError(f"{op}: variance_mode must be 0, 1 or 2, but got {variance_mode}")
    if variance_mode != 0 and variance is None:
        raise ValueError(f"{op}: a learned variance mode needs the predicted variance")
    if clip == CLIP_THRESHOLD:
        if thresholds is None:
            raise ValueError(f"{op}: clip=2 (thresholding) needs thresholds")
        if thresholds.device != sample.device:
            raise RuntimeError(f"{op}: thresholds is on {thresholds.device} but sample is on "
                               f"{sample.device}; expected both on the same device")
        if thresholds.shape != (sample.shape[0],):
            raise ValueError(f"{op}: thresholds must have shape ({sample.shape[0]},), but got "
                             f"{list(thresholds.shape)}")


@torch.library.register_fake("dlcv_fast::scheduler_step")
def _step_fake(model_output, sample, noise, variance, thresholds, coefficients, clip,
               variance_mode, recompute_eps):
    fmt = suggest_memory_format(sample)
    return (torch.empty_like(sample, memory_format=fmt),
            torch.empty_like(sample, memory_format=fmt))


@torch.library.custom_op("dlcv_fast::scheduler_step_triton", mutates_args=())
def _scheduler_step_triton(
    model_output: Tensor, sample: Tensor, noise: Tensor | None, variance: Tensor | None,
    thresholds: Tensor | None, coefficients: list[float], clip: int, variance_mode: int,
    recompute_eps: bool,
) -> tuple[Tensor, Tensor]:
    from dlcv_fast.triton_kernels import scheduler_step as kernels

    check_args(model_output, sample, noise, variance, thresholds, coefficients, clip,
               variance_mode)
    fmt = suggest_memory_format(sample)

    def dense(t):
        return None if t is None else t.contiguous(memory_format=fmt)

    th = thresholds.to(torch.float64).contiguous() if clip == CLIP_THRESHOLD else None
    return kernels.step(dense(model_output), dense(sample), dense(noise),
                        dense(variance) if variance_mode else None, th, coefficients, clip,
                        variance_mode, recompute_eps)


_scheduler_step_triton.register_fake(_step_fake)


# --- autograd ------------------------------------------------------------------------------
# The forward, per element (csrc/step_params.h), with u = A s + B m the unclipped x0:
#   x0 = u | clamp(u, -r, r) | clamp(u, -th, th) / th,  eps = C s + D m | E s + F x0,
#   prev = P x0 + Q s + R eps + std z,  std = sigma | sqrt(v) | exp((f lmax + (1 - f) lmin) / 2)
# with f = (v + 1) / 2. Clamps pass the gradient where lo <= u <= hi, as torch.clamp does.

def _setup_step(ctx, inputs, output):
    model_output, sample, noise, variance, thresholds = inputs[:5]
    ctx.save_for_backward(model_output, sample, noise, variance, thresholds)
    ctx.args = inputs[5:]


def _step_backward(ctx, grad_prev, grad_x0):
    m, s, z, v, th = ctx.saved_tensors
    (a, b, c, d, e, f, p, q, r, sigma, min_log, max_log, clip_range), clip, mode, recompute = \
        ctx.args
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    sa, ma = s.to(acc), m.to(acc)
    gp = torch.zeros_like(sa) if grad_prev is None else grad_prev.to(acc)
    gx = torch.zeros_like(sa) if grad_x0 is None else grad_x0.to(acc)
    # Every path to x0's value: its own output, prev directly, and prev through eps.
    g_x0 = gx + gp * (p + (r * f if recompute else 0.0))
    u = a * sa + b * ma
    g_th = None
    if clip == CLIP_RANGE:
        g_u = g_x0 * ((u >= -clip_range) & (u <= clip_range))
    elif clip == CLIP_THRESHOLD:
        t = th.to(acc).reshape(-1, *([1] * (s.dim() - 1)))
        inside = (u >= -t) & (u <= t)
        # A threshold that is not positive made the sample NaN: its gradients are NaN too.
        g_u = torch.where(t > 0, g_x0 * inside / t, math.nan)
        # d(clamp(u, -t, t) / t) / dt: -u / t^2 inside, 0 where the clamp holds it at +-1.
        g_th = (g_x0 * torch.where(inside, -u / (t * t), 0.0)).reshape(
            s.shape[0], math.prod(s.shape[1:])).sum(1)  # (no -1: a batch of 0 under vmap)
        g_th = torch.where(th.to(acc) > 0, g_th, math.nan).to(th.dtype)
    else:
        g_u = g_x0
    g_s = a * g_u + gp * (q + r * (e if recompute else c))
    g_m = b * g_u + (0.0 if recompute else gp * (r * d))
    g_z = g_v = None
    if z is not None:
        std = sigma
        if mode == VARIANCE_LEARNED:
            std = v.to(acc).sqrt()
            g_v = gp * z.to(acc) / (2 * std)
        elif mode == VARIANCE_LEARNED_RANGE:
            frac = (v.to(acc) + 1) / 2
            std = torch.exp((frac * max_log + (1 - frac) * min_log) / 2)
            g_v = gp * z.to(acc) * std * ((max_log - min_log) / 4)
        g_z = (gp * std).to(z.dtype)
        g_v = None if g_v is None else g_v.to(v.dtype)
    return (g_m.to(m.dtype), g_s.to(s.dtype), g_z, g_v, g_th, None, None, None, None)


def _step_vmap_with(op):
    # (torch.vmap) The vmapped samples fold into the batch dim, thresholds (one per sample)
    # with them.
    def rule(info, in_dims, *args):
        n = info.batch_size
        tensors = [_func.folded(t, d, n) for t, d in zip(args[:5], in_dims)]
        prev, x0 = op(*tensors, *args[5:])
        return (prev.unflatten(0, (n, -1)), x0.unflatten(0, (n, -1))), (0, 0)

    return rule


_OPS = {"cpp": _func.Op(torch.ops.dlcv_fast.scheduler_step),
        "triton": _func.Op(_scheduler_step_triton)}
for _op in _OPS.values():
    _func.register_autograd(_op, _step_backward, _setup_step)
    _func.register_vmap(_op, _step_vmap_with(_op))


def scheduler_step(model_output: Tensor, sample: Tensor, noise: Tensor | None,
                   variance: Tensor | None, thresholds: Tensor | None,
                   coefficients: list[float], clip: int, variance_mode: int,
                   recompute_eps: bool) -> tuple[Tensor, Tensor]:
    """(prev_sample, pred_original_sample) of one step on the backend in force."""
    name = backend.resolve("scheduler_step", sample)
    refuse_forward_ad("scheduler_step", model_output, sample, noise, variance, thresholds)
    op = _OPS["triton" if name == "triton" else "cpp"]
    return op(model_output, sample, noise, variance, thresholds, [float(c) for c in coefficients],
              int(clip), int(variance_mode), bool(recompute_eps))
