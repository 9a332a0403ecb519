"""conv2d: argument checks, the registered ops of every backend, their fake
implementations and autograd formulas, and the functional entry point.

Ops (namespace ``dlcv_fast``), C++ (CPU, CUDA; csrc/conv2d.cpp) and ``*_triton`` twins on
the Triton kernels (dlcv_fast/triton_kernels/conv2d.py):

- ``conv2d(input, weight, bias?, int[2] stride, int[4] padding, int[2] dilation, int groups,
  bool relu) -> Tensor``: the forward pass with bias and ReLU in its epilogue. ``padding``
  is [top, left, bottom, right], so ``padding='same'`` with an even kernel needs no copy.
- ``conv2d_backward_input`` (dgrad) and ``conv2d_backward_weight`` (wgrad), each its own
  kernel, from the gradient that reaches the convolution itself.
- ``conv2d_bias_relu_backward(grad_output, output?, bool bias) -> (g, grad_bias)``: one
  pass that masks the gradient by ``output > 0`` (the fused ReLU) and sums it per channel.

The forward ops carry autograd formulas (first order) built from the backward ops of the
same backend.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence

import torch
from torch import Tensor
from torch._prims_common import is_non_overlapping_and_dense_or_false

from dlcv_fast import backend
from dlcv_fast._ext import _C
from dlcv_fast.ops import _func
from dlcv_fast.ops._autocast import cast_for_autocast, register_lower_precision
from dlcv_fast.ops._common import (empty_output, memory_format_of, on_device_of,
                                   refuse_forward_ad, relu_flag)

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _int(value):
    """``value`` as an int where torch takes it as one (an int, a NumPy integer, an integer
    tensor of one element, a SymInt), else None: bools and floats are refused, as by torch."""
    if isinstance(value, torch.SymInt):
        return value  # operator.index would specialise it
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _ints(op: str, name: str, value, n: int = 2) -> list[int]:
    """An int, or a list or tuple of 1 or ``n`` ints, as a list of ``n`` ints."""
    one = _int(value)
    if one is not None:
        return [one] * n
    if isinstance(value, (list, tuple)) and len(value) in (1, n):
        values = [_int(v) for v in value]
        if None not in values:
            return values * n if len(values) == 1 else values
    raise TypeError(f"{op}: {name} must be an int or a tuple of {n} ints, but got {value!r}")


def resolve_padding(op: str, padding, weight_hw, stride: list[int],
                    dilation: list[int]) -> list[int]:
    """``padding`` of F.conv2d (int, pair, 'valid' or 'same') as [top, left, bottom, right].
    'same' puts the odd unit of an even total at the bottom/right, as PyTorch does."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"{op}: padding='same' is not supported for strided "
                                 f"convolutions (stride {stride})")
            total = [d * (k - 1) for d, k in zip(dilation, weight_hw)]
            return [total[0] // 2, total[1] // 2, total[0] - total[0] // 2,
                    total[1] - total[1] // 2]
        raise ValueError(f"{op}: padding must be an int, a tuple of 2 ints, 'same' or "
                         f"'valid', but got {padding!r}")
    p = _ints(op, "padding", padding)
    return [p[0], p[1], p[0], p[1]]


def output_size(size, pad_total, kernel, stride, dilation):
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def check_args(op: str, input: Tensor, weight: Tensor, bias: Tensor | None, stride, padding,
               dilation, groups) -> list[int]:
    """The checks of csrc/conv2d.cpp (same messages), for the Triton and fake paths.
    Returns the output's shape."""
    if input.dtype not in _FLOATS:
        raise TypeError(f"{op}: input must be float32, float64, float16 or bfloat16, but got "
                        f"{input.dtype}")
    if weight.dtype != input.dtype:
        raise TypeError(f"{op}: weight has dtype {weight.dtype} but input has {input.dtype}; "
                        "expected the same dtype")
    if weight.device != input.device:
        raise RuntimeError(f"{op}: weight is on {weight.device} but input is on "
                           f"{input.device}; expected both on the same device")
    if input.dim() != 4:
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W), but got shape "
                         f"{list(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{op}: weight must be 4-D (out_channels, in_channels / groups, kH, "
                         f"kW), but got shape {list(weight.shape)}")
    if len(stride) != 2 or len(dilation) != 2:
        raise ValueError(f"{op}: stride and dilation must hold 2 ints")
    if len(padding) != 4:
        raise ValueError(f"{op}: padding must hold 4 ints (top, left, bottom, right), but got "
                         f"{len(padding)}")
    if min(padding) < 0:
        raise ValueError(f"{op}: padding must be non-negative, but got {list(padding)}")
    if min(stride) <= 0:
        raise ValueError(f"{op}: stride must be positive, but got {list(stride)}")
    if min(dilation) <= 0:
        raise ValueError(f"{op}: dilation must be positive, but got {list(dilation)}")
    if groups <= 0:
        raise ValueError(f"{op}: groups must be positive, but got {groups}")
    n, c, h, w = input.shape
    o, cg, kh, kw = weight.shape
    if min(o, cg, kh, kw) <= 0:
        raise ValueError(f"{op}: weight must have non-zero sizes, but got shape "
                         f"{list(weight.shape)}")
    if o % groups != 0:
        raise ValueError(f"{op}: out_channels ({o}) must be divisible by groups ({groups})")
    if c != cg * groups:
        raise ValueError(f"{op}: input has {c} channels but weight of shape "
                         f"{list(weight.shape)} with groups={groups} expects {cg * groups} "
                         f"(in_channels / groups = {cg})")
    if h <= 0 or w <= 0:
        raise ValueError(f"{op}: input must have non-zero height and width, but got shape "
                         f"{list(input.shape)}")
    oh = output_size(h, padding[0] + padding[2], kh, stride[0], dilation[0])
    ow = output_size(w, padding[1] + padding[3], kw, stride[1], dilation[1])
    if oh <= 0 or ow <= 0:
        raise ValueError(f"{op}: the kernel ({kh}, {kw}) with dilation {list(dilation)} is "
                         f"larger than the padded input ({h + padding[0] + padding[2]}, "
                         f"{w + padding[1] + padding[3]})")
    if bias is not None:
        if bias.dtype != input.dtype:
            raise TypeError(f"{op}: bias has dtype {bias.dtype} but input has {input.dtype}")
        if bias.device != input.device:
            raise RuntimeError(f"{op}: bias is on {bias.device} but input is on "
                               f"{input.device}; expected both on the same device")
        if bias.dim() != 1 or bias.shape[0] != o:
            raise ValueError(f"{op}: bias must be 1-D with out_channels ({o}) elements, but "
                             f"got shape {list(bias.shape)}")
    return [n, o, oh, ow]


def _check_grad(op, grad_output, like, shape):
    if grad_output.dtype != like.dtype:
        raise TypeError(f"{op}: grad_output has dtype {grad_output.dtype} but expected "
                        f"{like.dtype}")
    if grad_output.device != like.device:
        raise RuntimeError(f"{op}: grad_output is on {grad_output.device} but input is on "
                           f"{like.device}; expected both on the same device")
    if list(grad_output.shape) != list(shape):
        raise ValueError(f"{op}: grad_output must have the output's shape {list(shape)}, but "
                         f"got {list(grad_output.shape)}")


def _empty_like(t: Tensor) -> Tensor:
    """A new output with t's strides (t dense), poisoned like empty_output's."""
    out = torch.empty_like(t)
    return out.fill_(float("nan")) if os.environ.get("DLCV_FAST_POISON") == "1" else out


def _dense(t: Tensor, fmt) -> Tensor:
    return t if is_non_overlapping_and_dense_or_false(t) else t.contiguous(memory_format=fmt)


# --- fake implementations -------------------------------------------------------------------

def _forward_fake(input, weight, bias, stride, padding, dilation, groups, relu):
    shape = check_args("conv2d", input, weight, bias, stride, padding, dilation, groups)
    return input.new_empty(shape).contiguous(memory_format=memory_format_of(input))


def _backward_input_fake(grad_output, input, weight, stride, padding, dilation, groups):
    return torch.empty_like(input, memory_format=memory_format_of(input))


def _backward_weight_fake(grad_output, input, weight, stride, padding, dilation, groups):
    return torch.empty_like(weight, memory_format=memory_format_of(weight))


def _bias_relu_backward_fake(grad_output, output, bias):
    g = torch.empty_like(grad_output) if output is not None else grad_output.new_empty(0)
    gb = grad_output.new_empty(grad_output.shape[1] if bias else 0)
    return g, gb


torch.library.register_fake("dlcv_fast::conv2d")(_forward_fake)
torch.library.register_fake("dlcv_fast::conv2d_backward_input")(_backward_input_fake)
torch.library.register_fake("dlcv_fast::conv2d_backward_weight")(_backward_weight_fake)
torch.library.register_fake("dlcv_fast::conv2d_bias_relu_backward")(_bias_relu_backward_fake)


# --- the Triton backend ---------------------------------------------------------------------

def _allow_tf32() -> bool:
    # PyTorch's own reading; torch.backends.cudnn.allow_tf32 raises once conv and RNN differ.
    return _C.conv_allows_tf32()


@torch.library.custom_op("dlcv_fast::conv2d_triton", mutates_args=())
def _conv2d_triton(input: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int], groups: int,
                   relu: bool) -> Tensor:
    from dlcv_fast.triton_kernels import conv2d as kernels

    shape = check_args("conv2d", input, weight, bias, stride, padding, dilation, groups)
    y = empty_output(shape, input, memory_format=memory_format_of(input))
    if shape[0] > 0:
        with on_device_of(input):
            kernels.forward(input, weight, None if bias is None else bias.contiguous(), y,
                            stride, padding[:2], dilation, groups, relu, _allow_tf32())
    return y


@torch.library.custom_op("dlcv_fast::conv2d_backward_input_triton", mutates_args=())
def _conv2d_backward_input_triton(grad_output: Tensor, input: Tensor, weight: Tensor,
                                  stride: Sequence[int], padding: Sequence[int],
                                  dilation: Sequence[int], groups: int) -> Tensor:
    from dlcv_fast.triton_kernels import conv2d as kernels

    op = "conv2d_backward_input"
    shape = check_args(op, input, weight, None, stride, padding, dilation, groups)
    _check_grad(op, grad_output, input, shape)
    fmt = memory_format_of(input)
    gx = empty_output(input.shape, input, memory_format=fmt)
    if shape[0] > 0:
        with on_device_of(input):
            kernels.backward_input(_dense(grad_output, fmt), weight, gx, stride, padding[:2],
                                   dilation, groups, _allow_tf32())
    return gx


@torch.library.custom_op("dlcv_fast::conv2d_backward_weight_triton", mutates_args=())
def _conv2d_backward_weight_triton(grad_output: Tensor, input: Tensor, weight: Tensor,
                                   stride: Sequence[int], padding: Sequence[int],
                                   dilation: Sequence[int], groups: int) -> Tensor:
    from dlcv_fast.triton_kernels import conv2d as kernels

    op = "conv2d_backward_weight"
    shape = check_args(op, input, weight, None, stride, padding, dilation, groups)
    _check_grad(op, grad_output, input, shape)
    gw = empty_output(weight.shape, weight, memory_format=memory_format_of(weight))
    if shape[0] == 0:
        return gw.zero_()
    with on_device_of(input):
        kernels.backward_weight(_dense(grad_output, memory_format_of(input)), input, gw, stride,
                                padding[:2], dilation, groups, _allow_tf32())
    return gw


@torch.library.custom_op("dlcv_fast::conv2d_bias_relu_backward_triton", mutates_args=())
def _conv2d_bias_relu_backward_triton(grad_output: Tensor, output: Tensor | None,
                                      bias: bool) -> tuple[Tensor, Tensor]:
    from dlcv_fast.triton_kernels import conv2d as kernels

    op = "conv2d_bias_relu_backward"
    if grad_output.dtype not in _FLOATS:
        raise TypeError(f"{op}: grad_output must be float32, float64, float16 or bfloat16, "
                        f"but got {grad_output.dtype}")
    if grad_output.dim() != 4:
        raise ValueError(f"{op}: grad_output must be 4-D, but got shape "
                         f"{list(grad_output.shape)}")
    if output is not None:
        _check_grad(op, grad_output, output, output.shape)
    gy = _dense(grad_output, memory_format_of(grad_output))
    g = _empty_like(gy) if output is not None else gy.new_empty(0)
    gb = empty_output([gy.shape[1]], gy) if bias else gy.new_empty(0)
    if gy.numel() == 0:
        return g, gb.zero_()
    with on_device_of(gy):
        kernels.bias_relu_backward(gy, output, g if output is not None else None,
                                   gb if bias else None)
    return g, gb


_conv2d_triton.register_fake(_forward_fake)
_conv2d_backward_input_triton.register_fake(_backward_input_fake)
_conv2d_backward_weight_triton.register_fake(_backward_weight_fake)
_conv2d_bias_relu_backward_triton.register_fake(_bias_relu_backward_fake)


# --- autograd: one formula for both sets of ops ----------------------------------------------

class _Ops:
    def __init__(self, suffix: str):
        ops = torch.ops.dlcv_fast
        self.forward = _func.Op(getattr(ops, "conv2d" + suffix))
        self.backward_input = _func.Op(getattr(ops, "conv2d_backward_input" + suffix))
        self.backward_weight = _func.Op(getattr(ops, "conv2d_backward_weight" + suffix))
        self.bias_relu_backward = _func.Op(getattr(ops, "conv2d_bias_relu_backward" + suffix))


_CPP = _Ops("")
_TRITON = _Ops("_triton")


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, relu = inputs
    ctx.save_for_backward(input, weight, output if relu else None)
    ctx.params = (stride, padding, dilation, groups)
    ctx.relu, ctx.has_bias = relu, bias is not None


def _backward_with(ops: _Ops):
    def backward(ctx, grad_output):
        input, weight, output = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        g, grad_bias = grad_output, None
        if ctx.relu or need_bias:
            masked, summed = ops.bias_relu_backward(grad_output, output, bool(need_bias))
            g = masked if ctx.relu else grad_output
            grad_bias = summed if need_bias else None
        grad_input = ops.backward_input(g, input, weight, *ctx.params) if need_input else None
        grad_weight = ops.backward_weight(g, input, weight, *ctx.params) if need_weight else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None

    return backward


# Double backward. The three backward ops are linear in each of their differentiable inputs,
# so their derivatives are the other conv ops: dgrad(gy, w) is the adjoint of x -> conv(x, w),
# so d/dgy of <ggx, dgrad(gy, w)> is conv(ggx, w) and d/dw is wgrad(gy, ggx); likewise
# wgrad(gy, x) gives conv(x, ggw) for gy and dgrad(gy, ggw) for x. The `input`/`weight`
# arguments that only carry a shape get no gradient. The ReLU mask is piecewise constant.

def _setup_backward_context(ctx, inputs, output):
    grad_output, input, weight, *params = inputs
    ctx.save_for_backward(grad_output, input, weight)
    ctx.params = params


def _backward_input_backward_with(ops: _Ops):
    def backward(ctx, ggx):
        gy, _, w = ctx.saved_tensors
        need_gy, _, need_w = ctx.needs_input_grad[:3]
        g_gy = ops.forward(ggx, w, None, *ctx.params, False) if need_gy else None
        g_w = ops.backward_weight(gy, ggx, w, *ctx.params) if need_w else None
        return g_gy, None, g_w, None, None, None, None

    return backward


def _backward_weight_backward_with(ops: _Ops):
    def backward(ctx, ggw):
        gy, x, _ = ctx.saved_tensors
        need_gy, need_x = ctx.needs_input_grad[:2]
        g_gy = ops.forward(x, ggw, None, *ctx.params, False) if need_gy else None
        g_x = ops.backward_input(gy, x, ggw, *ctx.params) if need_x else None
        return g_gy, g_x, None, None, None, None, None

    return backward


def _setup_bias_relu_context(ctx, inputs, output):
    grad_output, relu_output, _ = inputs
    ctx.save_for_backward(relu_output)
    ctx.shape = grad_output.shape


def _bias_relu_backward_backward_with(ops: _Ops):
    # With m = (output > 0), or 1 without an output: g = m * grad_output and grad_bias =
    # the sum of m * grad_output over N, H and W; both linear in grad_output.
    def backward(ctx, gg, ggb):
        (output,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        total = gg if output is not None else None
        if ggb is not None and ggb.numel():
            g_b = ggb.view(1, -1, 1, 1).expand(ctx.shape)
            total = g_b if total is None else total + g_b
        if total is not None and output is not None:
            total = ops.bias_relu_backward(total, output, False)[0]
        return total, None, None

    return backward


# Batching rules (torch.vmap). Samples of one weight fold into the batch dim N; B weights
# (per-sample gradients, model ensembles) run side by side as B times the groups, the
# samples' channels stacked: (B, N, C, H, W) -> (N, B*C, H, W), weights (B*O, C/g, kH, kW).

def _forward_vmap_with(ops: _Ops):
    def rule(info, in_dims, input, weight, bias, stride, padding, dilation, groups, relu):
        n = info.batch_size
        x = _func.batched(input, in_dims[0], n)
        if in_dims[1] is None and in_dims[2] is None:
            y = ops.forward(x.flatten(0, 1), weight, bias, stride, padding, dilation, groups,
                            relu)
            return y.unflatten(0, (n, -1)), 0
        y = ops.forward(_func.stacked(x, 0, n), _func.folded(weight, in_dims[1], n),
                        _func.folded(bias, in_dims[2], n), stride, padding, dilation, groups * n,
                        relu)
        return y.unflatten(1, (n, -1)), 1

    return rule


def _backward_input_vmap_with(ops: _Ops):
    def rule(info, in_dims, grad_output, input, weight, stride, padding, dilation, groups):
        n = info.batch_size
        gy = _func.batched(grad_output, in_dims[0], n)
        x = _func.batched(input, in_dims[1], n)
        if in_dims[2] is None:
            gx = ops.backward_input(gy.flatten(0, 1), x.flatten(0, 1), weight, stride, padding,
                                    dilation, groups)
            return gx.unflatten(0, (n, -1)), 0
        gx = ops.backward_input(_func.stacked(gy, 0, n), _func.stacked(x, 0, n),
                                _func.folded(weight, in_dims[2], n), stride, padding, dilation,
                                groups * n)
        return gx.unflatten(1, (n, -1)), 1

    return rule


def _backward_weight_vmap_with(ops: _Ops):
    def rule(info, in_dims, grad_output, input, weight, stride, padding, dilation, groups):
        n = info.batch_size
        gw = ops.backward_weight(_func.stacked(grad_output, in_dims[0], n),
                                 _func.stacked(input, in_dims[1], n),
                                 _func.folded(weight, in_dims[2], n), stride, padding, dilation,
                                 groups * n)
        return gw.unflatten(0, (n, -1)), 0

    return rule


def _bias_relu_backward_vmap_with(ops: _Ops):
    # Channels stacked, so that the bias's sum over N, H and W stays per sample.
    def rule(info, in_dims, grad_output, output, bias):
        n = info.batch_size
        y = _func.stacked(output, in_dims[1], n)
        g, gb = ops.bias_relu_backward(_func.stacked(grad_output, in_dims[0], n), y, bias)
        return ((g if y is None else g.unflatten(1, (n, -1)),
                 gb.unflatten(0, (n, -1)) if bias else gb),
                (None if y is None else 1, 0 if bias else None))

    return rule


# dlcv_fast::conv2d has its autograd in C++ (csrc/dlcv_fast.cpp, the same formula as
# _backward_with): registered from Python, it cost about 50 us more per call. Its Python
# formula serves torch.func only.
for _ops in (_CPP, _TRITON):
    for _op, _backward, _setup, _rule in (
            (_ops.forward, _backward_with, _setup_context, _forward_vmap_with),
            (_ops.backward_input, _backward_input_backward_with, _setup_backward_context,
             _backward_input_vmap_with),
            (_ops.backward_weight, _backward_weight_backward_with, _setup_backward_context,
             _backward_weight_vmap_with),
            (_ops.bias_relu_backward, _bias_relu_backward_backward_with,
             _setup_bias_relu_context, _bias_relu_backward_vmap_with)):
        _func.register_autograd(_op, _backward(_ops), _setup, library=_op is not _CPP.forward)
        _func.register_vmap(_op, _rule(_ops))

for _name in ("conv2d", "conv2d_triton"):  # autocast: in its dtype, as torch's convolution
    register_lower_precision(_name)


# --- the functional entry point -------------------------------------------------------------

def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | str = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    activation: str | None = None,
) -> Tensor:
    """2-D convolution with :func:`torch.nn.functional.conv2d`'s arguments and result.

    Args:
        input: (N, C, H, W) or unbatched (C, H, W); NCHW, channels_last or any strides
            (the output is channels_last when the input or the weight is, as in PyTorch,
            else NCHW). float32, float16 or bfloat16 on
            a GPU (float32 accumulation; float32 uses TF32 tensor cores where PyTorch's
            convolution does: ``torch.backends.cudnn.conv.fp32_precision``, or the legacy
            ``torch.backends.cudnn.allow_tf32``);
            float32 or float64 on the CPU (16-bit inputs computed in float32).
        weight: (out_channels, in_channels / groups, kH, kW), same dtype and device.
        bias: optional (out_channels,).
        stride, dilation: an int or a pair. Here and in padding and groups, an int is what
            torch takes as one: also a NumPy integer or an integer tensor of one element
            (never a bool or a float).
        padding: an int, a pair, ``'valid'`` (none) or ``'same'`` (stride 1 only; an odd
            total goes to the bottom/right, as in PyTorch).
        groups: input and output channels split into this many groups; ``groups ==
            in_channels`` is a depthwise convolution (any channel multiplier).
        activation: ``None`` or ``'relu'``: bias and ReLU applied in the convolution's
            epilogue (and the ReLU's mask in the backward pass), with no extra pass.

    Differentiable in input, weight and bias, twice (the backward ops have their own
    derivatives, so gradient penalties and double backward work).
    """
    op = "conv2d"
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, but got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"{op}: bias must be a Tensor or None, but got {type(bias).__name__}")
    input, weight, bias = cast_for_autocast(input.device, input, weight, bias)
    relu = relu_flag(op, activation)
    g = _int(groups)
    if g is None:
        raise TypeError(f"{op}: groups must be an int, but got {groups!r}")
    if input.dim() not in (3, 4):
        raise ValueError(f"{op}: input must be 3-D (C, H, W) or 4-D (N, C, H, W), but got "
                         f"shape {list(input.shape)}")
    if weight.dim() != 4:  # before 'same' padding reads the kernel size
        raise ValueError(f"{op}: weight must be 4-D (out_channels, in_channels / groups, kH, "
                         f"kW), but got shape {list(weight.shape)}")
    s = _ints(op, "stride", stride)
    d = _ints(op, "dilation", dilation)
    p = resolve_padding(op, padding, weight.shape[-2:], s, d)
    batched = input.dim() == 4
    x = input if batched else input.unsqueeze(0)
    if (memory_format_of(weight) == torch.channels_last
            and memory_format_of(x) != torch.channels_last
            and not torch._C._are_functorch_transforms_active()):  # (vmap cannot relayout)
        # PyTorch's rule: a channels_last weight makes the convolution channels_last (the
        # recipe model.to(memory_format=torch.channels_last) with NCHW images).
        x = x.contiguous(memory_format=torch.channels_last)
    ops = _CPP
    if backend.resolve(op, x) == "triton":
        refuse_forward_ad(op, x, weight, bias)
        ops = _TRITON
    y = ops.forward(x, weight, bias, s, p, d, g, relu)
    return y if batched else y.squeeze(0)


__all__ = ["conv2d", "check_args", "resolve_padding"]
