"""batch_norm: argument checks, the registered ops of every backend, their fake
implementations and autograd formulas, and the functional entry point.

Ops (namespace ``dlcv_fast``), in C++ (CPU, CUDA; csrc/batch_norm.cpp) and as ``*_triton``
twins on the Triton kernels (dlcv_fast/triton_kernels/batch_norm.py):

- ``batch_norm(input, weight, bias, running_mean!, running_var!, training, momentum, eps,
  relu) -> (output, save_mean, save_invstd)``: in training the batch statistics, and the
  running statistics (when given) updated in place; else the running statistics. ``relu``
  fuses max(y, 0) into the same pass.
- ``batch_norm_backward(grad_output, input, weight, bias, save_mean, save_invstd, training,
  relu, output_mask) -> (grad_input, grad_weight, grad_bias)``; an output not asked for is
  an empty (0,) tensor. Under relu the gradient is masked by the pre-activation
  (x - mean) * w * invstd + b > 0, recomputed from the input the backward pass reads anyway:
  saving the output instead would keep one more activation-sized tensor alive and make the
  training backward read three tensors instead of two.
- the parts SyncBatchNorm reduces across processes: ``batch_norm_stats`` (per-channel mean
  and biased variance), ``batch_norm_elemt`` (the output from given statistics),
  ``batch_norm_backward_reduce`` (sum_dy, sum_dy_xmu) and ``batch_norm_backward_elemt``
  (grad_input from sums over ``count`` values per channel). Their gradients are
  SyncBatchNorm's autograd function; they have none of their own.

Statistics are float32 (float64 for float64 input) and exact for any offset (Welford and
Chan merges, or two passes), so inputs near 1e4 with unit variance normalise right.
``torch.ops.dlcv_fast.batch_norm`` is differentiable by itself (autograd in C++); the
Triton op through the functional entry point. Both are differentiable twice
(``batch_norm_double_backward``, below); SyncBatchNorm once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from dlcv_fast import backend
from dlcv_fast.ops import _func
from dlcv_fast.ops._common import relu_flag

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type of the statistics: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layout(input: Tensor) -> tuple[bool, torch.memory_format]:
    """(channels_last, memory format) of the dense input the kernels see and of the output:
    rows of C for 2-D input and any input with one value per (sample, channel), else the
    suggested format of a 4-D or 5-D input, else NCHW."""
    inner = math.prod(input.shape[2:])
    if inner == 1:
        return True, torch.contiguous_format
    if input.dim() >= 4:
        fmt = suggest_memory_format(input)
        return fmt != torch.contiguous_format, fmt
    return False, torch.contiguous_format


# --- checks: the messages of csrc/batch_norm.cpp, for the Triton and fake paths -----------

def _check_input(op: str, input) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: input must be a Tensor, but got {type(input).__name__}")
    if input.dtype not in _FLOATS:
        raise TypeError(f"{op}: input must be float32, float64, float16 or bfloat16, but got "
                        f"{input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"{op}: input must have at least 2 dimensions (N, C, ...), but got "
                         f"shape {list(input.shape)}")


def _check_device(op: str, name: str, t: Tensor, input: Tensor) -> None:
    if t.device != input.device:
        raise RuntimeError(f"{op}: {name} is on {t.device} but input is on {input.device}; "
                           "expected both on the same device")


def _check_param(op: str, name: str, t, input: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor or None, but got {type(t).__name__}")
    _check_device(op, name, t, input)
    half = input.dtype in _HALF
    if not (t.dtype == input.dtype or (half and t.dtype == torch.float32)):
        raise TypeError(f"{op}: {name} must have the input's dtype {input.dtype}"
                        f"{' or float32' if half else ''}, but got {t.dtype}")
    C = input.shape[1]
    if t.dim() != 1 or t.shape[0] != C:
        raise ValueError(f"{op}: {name} must have shape ({C},), one value per channel of the "
                         f"input, but got shape {list(t.shape)}")


def _check_stat(op: str, name: str, t: Tensor, input: Tensor) -> None:
    _check_device(op, name, t, input)
    acc = acc_dtype(input.dtype)
    if t.dtype != acc:
        raise TypeError(f"{op}: {name} must be {acc} (the statistics' type for {input.dtype} "
                        f"input), but got {t.dtype}")
    C = input.shape[1]
    if t.dim() != 1 or t.shape[0] != C:
        raise ValueError(f"{op}: {name} must have shape ({C},), but got shape {list(t.shape)}")


def _check_grad(op: str, grad_output: Tensor, input: Tensor) -> None:
    _check_device(op, "grad_output", grad_output, input)
    if grad_output.dtype != input.dtype:
        raise TypeError(f"{op}: grad_output has dtype {grad_output.dtype} but input has "
                        f"{input.dtype}")
    if grad_output.shape != input.shape:
        raise ValueError(f"{op}: grad_output must have the input's shape {list(input.shape)}, "
                         f"but got {list(grad_output.shape)}")


def _check_count(input: Tensor) -> None:
    if input.shape[0] * math.prod(input.shape[2:]) == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{input.size()}")


def check_eps(op: str, eps, training: bool) -> None:
    """torch's rule (F.batch_norm): eps > 0 in training, where a constant channel has
    variance 0; eps >= 0 in evaluation."""
    if training and eps <= 0:
        raise ValueError(f"{op}: eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"{op}: eps must be non-negative, but got {eps}")


def _check_running_grad(op: str, running_mean, running_var) -> None:
    """The running statistics are not differentiable: with grad enabled, torch refuses them
    requiring grad."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{op}: {name} must not require grad: the running statistics "
                               "are buffers, not differentiable inputs")


def check_running(op: str, running_mean, running_var, training: bool) -> None:
    """_check_running_grad, and in training, where they are written in place, no two
    elements of the running statistics may share memory (an expanded view: torch writes one
    channel's value over all of them)."""
    _check_running_grad(op, running_mean, running_var)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if training and isinstance(t, Tensor) and t.dim() == 1 and t.stride(0) == 0 \
                and t.shape[0] > 1:
            raise RuntimeError(f"{op}: {name} is updated in place in training, but its "
                               f"{t.shape[0]} elements share one memory location (an expanded "
                               f"view?); pass a tensor of its own, e.g. {name}.clone()")


def check_forward(input, weight, bias, running_mean, running_var, training, eps,
                  op: str = "batch_norm", *, local_count: bool = True) -> None:
    """The checks of the forward op. ``local_count=False`` leaves out the one-value-per-channel
    check (SyncBatchNorm checks the count of the whole group instead)."""
    _check_input(op, input)
    for name, t in (("weight", weight), ("bias", bias)):
        _check_param(op, name, t, input)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError(f"{op}: running_mean and running_var are needed in evaluation mode "
                         "(training=False)")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        _check_param(op, name, t, input)
    check_running(op, running_mean, running_var, training)
    check_eps(op, eps, training)
    if training and local_count:
        _check_count(input)


def _check_backward(grad_output, input, weight, bias, mean, invstd, op: str,
                    mean_name: str = "save_mean", invstd_name: str = "save_invstd") -> None:
    _check_input(op, input)
    _check_grad(op, grad_output, input)
    for name, t in (("weight", weight), ("bias", bias)):
        _check_param(op, name, t, input)
    _check_stat(op, mean_name, mean, input)
    _check_stat(op, invstd_name, invstd, input)


# --- fake (meta) implementations ----------------------------------------------------------

def _like_input(input: Tensor) -> Tensor:
    return torch.empty_like(input, memory_format=layout(input)[1])


def _per_channel(input: Tensor) -> Tensor:
    return input.new_empty((input.shape[1],), dtype=acc_dtype(input.dtype))


def _forward_fake(input, weight, bias, running_mean, running_var, training, momentum, eps, relu):
    check_forward(input, weight, bias, running_mean, running_var, training, eps)
    return _like_input(input), _per_channel(input), _per_channel(input)


def _grad_dtype(param, input):
    return input.dtype if param is None else param.dtype


def _backward_fake(grad_output, input, weight, bias, save_mean, save_invstd, training, relu,
                   output_mask):
    _check_backward(grad_output, input, weight, bias, save_mean, save_invstd,
                    "batch_norm_backward")
    C = input.shape[1]
    gx = _like_input(input) if output_mask[0] else input.new_empty((0,))
    gw = (input.new_empty((C,), dtype=_grad_dtype(weight, input)) if output_mask[1]
          else input.new_empty((0,)))
    gb = (input.new_empty((C,), dtype=_grad_dtype(bias, input)) if output_mask[2]
          else input.new_empty((0,)))
    return gx, gw, gb


def _stats_fake(input):
    _check_input("batch_norm_stats", input)
    return _per_channel(input), _per_channel(input)


def _elemt_fake(input, weight, bias, mean, invstd, relu):
    _check_backward(input, input, weight, bias, mean, invstd, "batch_norm_elemt", "mean", "invstd")
    return _like_input(input)


def _backward_reduce_fake(grad_output, input, weight, bias, mean, invstd, relu):
    _check_backward(grad_output, input, weight, bias, mean, invstd, "batch_norm_backward_reduce",
                    "mean", "invstd")
    return _per_channel(input), _per_channel(input)


def _backward_elemt_fake(grad_output, input, weight, bias, mean, invstd, sum_dy, sum_dy_xmu,
                         count, relu):
    _check_backward(grad_output, input, weight, bias, mean, invstd, "batch_norm_backward_elemt",
                    "mean", "invstd")
    return _like_input(input)


torch.library.register_fake("dlcv_fast::batch_norm")(_forward_fake)
torch.library.register_fake("dlcv_fast::batch_norm_backward")(_backward_fake)
torch.library.register_fake("dlcv_fast::batch_norm_stats")(_stats_fake)
torch.library.register_fake("dlcv_fast::batch_norm_elemt")(_elemt_fake)
torch.library.register_fake("dlcv_fast::batch_norm_backward_reduce")(_backward_reduce_fake)
torch.library.register_fake("dlcv_fast::batch_norm_backward_elemt")(_backward_elemt_fake)


# --- the Triton backend as ops of its own --------------------------------------------------

def _dense(input: Tensor):
    channels_last, fmt = layout(input)
    return input.contiguous(memory_format=fmt), channels_last, fmt


def _acc_param(t, acc):
    return None if t is None else t.to(acc).contiguous()


@torch.library.custom_op("dlcv_fast::batch_norm_triton",
                         mutates_args=("running_mean", "running_var"))
def _batch_norm_triton(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                       running_mean: Tensor | None, running_var: Tensor | None, training: bool,
                       momentum: float, eps: float, relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    from dlcv_fast.triton_kernels import batch_norm as kernels

    check_forward(input, weight, bias, running_mean, running_var, training, eps)
    x, channels_last, fmt = _dense(input)
    acc = acc_dtype(input.dtype)
    C = input.shape[1]
    if not training:
        mean = running_mean.to(acc, copy=True)
        invstd = torch.rsqrt(running_var.to(acc) + eps)
    elif x.numel() == 0:
        mean = input.new_zeros((C,), dtype=acc)
        invstd = input.new_zeros((C,), dtype=acc)
    else:
        mean, var = kernels.stats(x, channels_last)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            count = x.numel() // C
            unbiased = var * (count / (count - 1))
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(acc))
            running_var.copy_(momentum * unbiased + (1 - momentum) * running_var.to(acc))
    y = kernels.normalize(x, mean, invstd, _acc_param(weight, acc), _acc_param(bias, acc), relu,
                          channels_last, fmt)
    return y, mean, invstd


@torch.library.custom_op("dlcv_fast::batch_norm_backward_triton", mutates_args=())
def _batch_norm_backward_triton(grad_output: Tensor, input: Tensor, weight: Tensor | None,
                                bias: Tensor | None, save_mean: Tensor, save_invstd: Tensor,
                                training: bool, relu: bool,
                                output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    from dlcv_fast.triton_kernels import batch_norm as kernels

    _check_backward(grad_output, input, weight, bias, save_mean, save_invstd,
                    "batch_norm_backward")
    if training:
        _check_count(input)
    x, channels_last, fmt = _dense(input)
    dy = grad_output.contiguous(memory_format=fmt)
    acc = acc_dtype(input.dtype)
    w, b = _acc_param(weight, acc), _acc_param(bias, acc)
    mean, invstd = save_mean.contiguous(), save_invstd.contiguous()
    C = input.shape[1]
    count = x.numel() // C if C else 0
    want_sums = output_mask[1] or output_mask[2] or (training and output_mask[0])
    if want_sums and x.numel() > 0:
        sum_dy, sum_dy_xmu = kernels.grad_sums(dy, x, mean, invstd, w, b, relu, channels_last)
    else:
        sum_dy, sum_dy_xmu = (input.new_zeros((C,), dtype=acc) for _ in range(2))
    gx = input.new_empty((0,))
    if output_mask[0]:
        gx = kernels.grad_input(dy, x, mean, invstd, w, b, sum_dy if training else None,
                                sum_dy_xmu if training else None, max(count, 1), relu,
                                channels_last, fmt)
    gw = ((sum_dy_xmu * invstd).to(_grad_dtype(weight, input)) if output_mask[1]
          else input.new_empty((0,)))
    gb = sum_dy.to(_grad_dtype(bias, input)) if output_mask[2] else input.new_empty((0,))
    return gx, gw, gb


@torch.library.custom_op("dlcv_fast::batch_norm_stats_triton", mutates_args=())
def _batch_norm_stats_triton(input: Tensor) -> tuple[Tensor, Tensor]:
    from dlcv_fast.triton_kernels import batch_norm as kernels

    _check_input("batch_norm_stats", input)
    x, channels_last, _ = _dense(input)
    if x.numel() // max(x.shape[1], 1) == 0 or x.numel() == 0:
        return _zeros(input), _zeros(input)
    return kernels.stats(x, channels_last)


def _zeros(input):
    return input.new_zeros((input.shape[1],), dtype=acc_dtype(input.dtype))


@torch.library.custom_op("dlcv_fast::batch_norm_elemt_triton", mutates_args=())
def _batch_norm_elemt_triton(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                             mean: Tensor, invstd: Tensor, relu: bool) -> Tensor:
    from dlcv_fast.triton_kernels import batch_norm as kernels

    _check_backward(input, input, weight, bias, mean, invstd, "batch_norm_elemt", "mean",
                    "invstd")
    x, channels_last, fmt = _dense(input)
    acc = acc_dtype(input.dtype)
    return kernels.normalize(x, mean.contiguous(), invstd.contiguous(), _acc_param(weight, acc),
                             _acc_param(bias, acc), relu, channels_last, fmt)


@torch.library.custom_op("dlcv_fast::batch_norm_backward_reduce_triton", mutates_args=())
def _batch_norm_backward_reduce_triton(grad_output: Tensor, input: Tensor, weight: Tensor | None,
                                       bias: Tensor | None, mean: Tensor, invstd: Tensor,
                                       relu: bool) -> tuple[Tensor, Tensor]:
    from dlcv_fast.triton_kernels import batch_norm as kernels

    _check_backward(grad_output, input, weight, bias, mean, invstd, "batch_norm_backward_reduce",
                    "mean", "invstd")
    if input.numel() == 0:
        return _zeros(input), _zeros(input)
    x, channels_last, fmt = _dense(input)
    acc = acc_dtype(input.dtype)
    return kernels.grad_sums(grad_output.contiguous(memory_format=fmt), x, mean.contiguous(),
                             invstd.contiguous(), _acc_param(weight, acc), _acc_param(bias, acc),
                             relu, channels_last)


@torch.library.custom_op("dlcv_fast::batch_norm_backward_elemt_triton", mutates_args=())
def _batch_norm_backward_elemt_triton(grad_output: Tensor, input: Tensor, weight: Tensor | None,
                                      bias: Tensor | None, mean: Tensor, invstd: Tensor,
                                      sum_dy: Tensor, sum_dy_xmu: Tensor, count: int,
                                      relu: bool) -> Tensor:
    from dlcv_fast.triton_kernels import batch_norm as kernels

    op = "batch_norm_backward_elemt"
    _check_backward(grad_output, input, weight, bias, mean, invstd, op, "mean", "invstd")
    _check_stat(op, "sum_dy", sum_dy, input)
    _check_stat(op, "sum_dy_xmu", sum_dy_xmu, input)
    if count <= 0:
        raise ValueError(f"{op}: count must be positive, but got {count}")
    x, channels_last, fmt = _dense(input)
    acc = acc_dtype(input.dtype)
    return kernels.grad_input(grad_output.contiguous(memory_format=fmt), x, mean.contiguous(),
                              invstd.contiguous(), _acc_param(weight, acc), _acc_param(bias, acc),
                              sum_dy.contiguous(), sum_dy_xmu.contiguous(), count, relu,
                              channels_last, fmt)


_batch_norm_triton.register_fake(_forward_fake)
_batch_norm_backward_triton.register_fake(_backward_fake)
_batch_norm_stats_triton.register_fake(_stats_fake)
_batch_norm_elemt_triton.register_fake(_elemt_fake)
_batch_norm_backward_reduce_triton.register_fake(_backward_reduce_fake)
_batch_norm_backward_elemt_triton.register_fake(_backward_elemt_fake)


def _setup_context(ctx, inputs, output):
    input, weight, bias, _, _, training, _, _, relu = inputs
    _, mean, invstd = output
    ctx.save_for_backward(input, weight, bias, mean, invstd)
    ctx.training, ctx.relu = training, relu
    ctx.mark_non_differentiable(mean, invstd)


def _backward_with(backward_op):
    def backward(ctx, grad, _grad_mean, _grad_invstd):
        input, weight, bias, mean, invstd = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        gx, gw, gb = backward_op(grad, input, weight, bias, mean, invstd, ctx.training,
                                 ctx.relu, mask)
        return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None,
                None, None, None, None, None, None)

    return backward


# --- double backward ------------------------------------------------------------------------
#
# The derivatives of batch_norm_backward's (grad_input, grad_weight, grad_bias), in PyTorch ops
# (so differentiable again), for both backends; the C++ autograd of batch_norm_backward calls
# it too. Per channel, with xhat = (x - mean) r, r = invstd, g = grad_output masked by the
# ReLU (a constant mask), means over the N values of the channel:
#   eval:  gx = w r g,  gw = sum g xhat,  gb = sum g  (mean, r constants)
#   train: gx = w r P(g), P(v) = v - mean(v) - xhat mean(xhat v), and mean, r are functions
#          of x with d(xhat) = r P(dx) (exactly, eps included); P is self-adjoint.
# Given upstream ggx, ggw, ggb, the gradients are
#   grad_g = w r P(ggx) + ggw xhat + ggb                        (train; eval: w r ggx + ...)
#   grad_w = r sum(ggx P(g))                                    (eval: r sum(ggx g))
#   grad_x = r P(g) ggw - w r^2 (mean(ggx xhat) P(g) + mean(g xhat) P(ggx) + A xhat)
#            with A = mean(ggx P(g))                            (eval: r g ggw)

torch.library.define(
    "dlcv_fast::batch_norm_double_backward",
    "(Tensor? grad_grad_input, Tensor? grad_grad_weight, Tensor? grad_grad_bias, "
    "Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, Tensor save_mean, "
    "Tensor save_invstd, bool training, bool relu, bool[3] output_mask) "
    "-> (Tensor, Tensor, Tensor)")


@torch.library.impl("dlcv_fast::batch_norm_double_backward", "CompositeImplicitAutograd")
def _double_backward(ggx, ggw, ggb, grad_output, input, weight, bias, save_mean, save_invstd,
                     training, relu, output_mask):
    """(grad of grad_output, grad of input, grad of weight); an empty tensor where
    output_mask is False or the gradient is zero."""
    acc = acc_dtype(input.dtype)
    shape = [1, -1] + [1] * (input.dim() - 2)
    dims = [0] + list(range(2, input.dim()))

    def channel(t):
        return None if t is None else t.to(acc).view(shape)

    def mean(t):
        return t.mean(dims, keepdim=True)

    r, w, ggw, ggb = channel(save_invstd), channel(weight), channel(ggw), channel(ggb)
    ggx = None if ggx is None else ggx.to(acc)
    xhat = (input.to(acc) - channel(save_mean)) * r
    g = grad_output.to(acc)
    mask = None
    if relu:
        z = xhat if w is None else xhat * w
        mask = (z if bias is None else z + channel(bias)) > 0
        g = torch.where(mask, g, 0)
    wr = r if w is None else w * r

    def P(v):
        return v - mean(v) - xhat * mean(xhat * v) if training else v

    Pg = P(g)
    Pggx = None if ggx is None else P(ggx)
    grad_g = grad_x = grad_w = None
    if output_mask[0]:
        terms = [t for t in (None if ggx is None else wr * Pggx,
                             None if ggw is None else ggw * xhat, ggb) if t is not None]
        if terms:
            grad_g = sum(terms, torch.zeros_like(g))  # a new tensor of g's shape
            if mask is not None:
                grad_g = torch.where(mask, grad_g, 0)
    if output_mask[1] and (ggw is not None or (training and ggx is not None)):
        grad_x = 0
        if ggw is not None:
            grad_x = r * Pg * ggw
        if training and ggx is not None:
            a = mean(ggx * Pg)
            grad_x = grad_x - wr * r * (mean(ggx * xhat) * Pg + mean(g * xhat) * Pggx + a * xhat)
    if output_mask[2] and weight is not None and ggx is not None:
        grad_w = (r * ggx * Pg).sum(dims)

    def out(t, like):
        return like.new_empty(0) if t is None else t.to(like.dtype)

    return (out(grad_g, grad_output), out(grad_x, input),
            out(grad_w, weight if weight is not None else input))


def _backward_setup(ctx, inputs, output):
    grad_output, input, weight, bias, mean, invstd, training, relu, _ = inputs
    ctx.save_for_backward(grad_output, input, weight, bias, mean, invstd)
    ctx.training, ctx.relu = training, relu


def _backward_backward(ctx, ggx, ggw, ggb):
    grad_output, input, weight, bias, mean, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], weight is not None and need[2]]
    g_dy, g_x, g_w = torch.ops.dlcv_fast.batch_norm_double_backward(
        _defined(ggx), _defined(ggw), _defined(ggb), grad_output, input, weight, bias, mean,
        invstd, ctx.training, ctx.relu, mask)
    return (_defined(g_dy) if mask[0] else None, _defined(g_x) if mask[1] else None,
            _defined(g_w) if mask[2] else None, None, None, None, None, None, None)


def _defined(t):
    """None for a gradient that is absent or an empty placeholder."""
    return None if t is None or t.numel() == 0 else t


# Batching rules (torch.vmap): the vmapped samples' channels stacked, (B, N, C, ...) ->
# (N, B*C, ...), so that statistics stay per sample. Running statistics updated in training
# must be vmapped too (one per sample, updated through a view), as in PyTorch.

def _forward_vmap_with(op):
    def rule(info, in_dims, input, weight, bias, running_mean, running_var, training, momentum,
             eps, relu):
        n = info.batch_size
        stats = []
        for name, t, dim in (("running_mean", running_mean, in_dims[3]),
                             ("running_var", running_var, in_dims[4])):
            if t is not None and training:
                if dim is None:
                    raise RuntimeError(
                        f"batch_norm: under torch.vmap in training, {name} must be vmapped too "
                        f"(one per sample, updated in place) or None")
                t, dim = t.movedim(dim, 0), 0
                if not t.is_contiguous():
                    raise RuntimeError(f"batch_norm: under torch.vmap in training, {name} must "
                                       f"be contiguous with its vmapped dim first (updated "
                                       f"in place through a view)")
            stats.append(_func.folded(t, dim, n))
        out, mean, invstd = op(_func.stacked(input, in_dims[0], n),
                               _func.folded(weight, in_dims[1], n),
                               _func.folded(bias, in_dims[2], n), *stats, training, momentum,
                               eps, relu)
        return ((out.unflatten(1, (n, -1)), mean.unflatten(0, (n, -1)),
                 invstd.unflatten(0, (n, -1))), (1, 0, 0))

    return rule


def _backward_vmap_with(op):
    def rule(info, in_dims, grad_output, input, weight, bias, save_mean, save_invstd, training,
             relu, output_mask):
        n = info.batch_size
        gx, gw, gb = op(_func.stacked(grad_output, in_dims[0], n),
                        _func.stacked(input, in_dims[1], n),
                        *(_func.folded(t, d, n) for t, d in zip(
                            (weight, bias, save_mean, save_invstd), in_dims[2:6])),
                        training, relu, output_mask)
        return ((gx.unflatten(1, (n, -1)) if output_mask[0] else gx,
                 *(g.unflatten(0, (n, -1)) if g.numel() else g for g in (gw, gb))),
                (1 if output_mask[0] else None,
                 *(0 if g.numel() else None for g in (gw, gb))))

    return rule


# The C++ batch_norm and batch_norm_backward have their autograd in C++ (csrc/dlcv_fast.cpp);
# the same formulas in Python serve torch.func. The Triton forward writes to its arguments,
# which torch.library takes no autograd formula for: its Function serves plain autograd too.
_OPS = {"cpp": (_func.Op(torch.ops.dlcv_fast.batch_norm),
                _func.Op(torch.ops.dlcv_fast.batch_norm_backward)),
        "triton": (_func.Op(_batch_norm_triton), _func.Op(_batch_norm_backward_triton))}
for _key, (_forward, _backward) in _OPS.items():
    _func.register_autograd(_forward, _backward_with(_backward), _setup_context, library=False)
    _func.register_autograd(_backward, _backward_backward, _backward_setup,
                            library=_key == "triton")
    _func.register_vmap(_forward, _forward_vmap_with(_forward))
    _func.register_vmap(_backward, _backward_vmap_with(_backward))
_TRITON_BATCH_NORM = _func.function(_OPS["triton"][0])


# The four parts of SyncBatchNorm per backend: stats, elemt, backward_reduce, backward_elemt.
def parts(name: str):
    ops = torch.ops.dlcv_fast
    if name == "triton":
        return (ops.batch_norm_stats_triton, ops.batch_norm_elemt_triton,
                ops.batch_norm_backward_reduce_triton, ops.batch_norm_backward_elemt_triton)
    return (ops.batch_norm_stats, ops.batch_norm_elemt, ops.batch_norm_backward_reduce,
            ops.batch_norm_backward_elemt)


# --- the functional entry point -------------------------------------------------------------

def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
) -> Tensor:
    """Batch normalisation with :func:`torch.nn.functional.batch_norm`'s arguments and
    results, optionally fused with a ReLU.

    Args:
        input: (N, C, ...) with any number of trailing dimensions (2-D to 5-D and beyond);
            float32, float64, float16 or bfloat16; NCHW, channels_last or any strides (the
            output takes the input's memory format).
        running_mean, running_var: (C,) buffers or None. In training they are updated in
            place: ``(1 - momentum) * running + momentum * batch`` with the unbiased batch
            variance (so not an expanded view). Needed in evaluation mode. Never requiring
            grad.
        weight, bias: (C,) affine parameters or None. Per-channel tensors have the input's
            dtype, or float32 for a 16-bit input.
        training: a bool: normalise with the batch's statistics (biased variance) instead
            of the running ones.
        momentum: the running statistics' update factor.
        eps: added to the variance; positive in training, non-negative in evaluation (torch's
            rule).
        activation: None or ``"relu"``: ``relu(batch_norm(...))`` in the same pass over
            memory, forward and backward.

    Differentiable in input, weight and bias, in training and evaluation mode, twice
    (double backward). Statistics are float32 (float64 for float64 input) and stay exact
    for inputs with a large mean.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm: input must be a Tensor, but got {type(input).__name__}")
    relu = relu_flag("batch_norm", activation)
    if training is not True and training is not False:
        raise TypeError(f"batch_norm: training must be a bool, but got {training!r}")
    if running_mean is not None or running_var is not None:
        # What the ops cannot see: a buffer that requires grad would get none, silently.
        # (Both ops refuse an expanded buffer in training themselves.)
        _check_running_grad("batch_norm", running_mean, running_var)
    # The ops check the rest. This wrapper stays short: on small layers its Python time is a
    # visible part of the step.
    if backend.resolve("batch_norm", input) == "triton":
        return _TRITON_BATCH_NORM.apply(input, weight, bias, running_mean, running_var, training,
                                        float(momentum), float(eps), relu)[0]
    return _BATCH_NORM(input, weight, bias, running_mean, running_var, training,
                       float(momentum), float(eps), relu)[0]


_BATCH_NORM = _OPS["cpp"][0]


__all__ = ["batch_norm", "check_eps", "check_forward", "check_running"]
