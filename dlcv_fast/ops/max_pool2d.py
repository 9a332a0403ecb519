"""max_pool2d: argument checks, the registered ops of every backend, their fake
implementations and autograd formulas, and the functional entry point.

Ops (namespace ``dlcv_fast``):

- ``max_pool2d(Tensor self, int[2] kernel_size, int[2] stride, int[2] padding,
  int[2] dilation, bool ceil_mode) -> (Tensor output, Tensor indices)`` and
  ``max_pool2d_backward(grad_output, self, indices, ...) -> Tensor``: the C++ kernels,
  CPU and CUDA (csrc/).
- ``max_pool2d_triton`` and ``max_pool2d_backward_triton``: the same schemas on the Triton
  kernels (dlcv_fast/triton_kernels/max_pool2d.py).

Each forward op carries its own autograd formula (so ``torch.ops.dlcv_fast.max_pool2d`` is
differentiable by itself), and each backward op too (a gather through the indices), so
double backward works: in C++ for the C++ ops (a call then costs about what PyTorch's
own costs), in Python for the Triton ops.
"""

from __future__ import annotations

import operator

from collections.abc import Sequence

import torch
from torch import Tensor

from dlcv_fast import backend
from dlcv_fast.ops import _func
from dlcv_fast.ops._common import memory_format_of, pool_output_size, refuse_forward_ad

_IntPair = int | Sequence[int]


def _pair(op: str, name: str, value, default=None) -> list[int]:
    """An int or a sequence of one or two ints as [h, w]; ``default`` for None or []."""
    if type(value) is int:  # the common case, first: this runs on every call
        return [value, value]
    if value is None or (isinstance(value, Sequence) and len(value) == 0 and default is not None):
        if default is None:
            raise TypeError(f"{op}: {name} must be an int or a pair of ints, but got {value!r}")
        return default
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
    else:
        values = [value]
    if len(values) not in (1, 2) or any(isinstance(v, bool) for v in values):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, but got {value!r}")
    try:  # ints, and what PyTorch takes as one: numpy integers, 0-d integer tensors
        values = [v if isinstance(v, torch.SymInt) else operator.index(v) for v in values]
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, but got "
                        f"{value!r}") from None
    return values * 2 if len(values) == 1 else values


# PyTorch's CPU max_pool2d takes these too (bool it refuses); integers have no gradient.
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16,
          torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_args(
    input: Tensor, kernel_size: _IntPair, stride: _IntPair | None, padding: _IntPair,
    dilation: _IntPair, ceil_mode: bool, op: str = "max_pool2d",
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Validates max_pool2d's arguments as PyTorch does and returns (kernel_size, stride,
    padding, dilation) as [h, w] lists. Raises TypeError or ValueError naming the argument."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: input must be a Tensor, but got {type(input).__name__}")
    if input.dtype not in DTYPES:
        raise TypeError(
            f"{op}: input must be float32, float64, float16, bfloat16, uint8, int8, int16, "
            f"int32 or int64, but got {input.dtype}"
        )
    if input.dim() not in (3, 4) or any(s == 0 for s in input.shape[-3:]):
        raise ValueError(
            f"{op}: input must be 3-D (C, H, W) or 4-D (N, C, H, W) with non-zero C, H and W, "
            f"but got shape {tuple(input.shape)}"
        )
    k = _pair(op, "kernel_size", kernel_size)
    s = _pair(op, "stride", stride, default=k)
    p = _pair(op, "padding", padding)
    d = _pair(op, "dilation", dilation)
    if min(k) <= 0:
        raise ValueError(f"{op}: kernel_size must be positive, but got {k}")
    if min(s) <= 0:
        raise ValueError(f"{op}: stride must be positive, but got {s}")
    if min(d) <= 0:
        raise ValueError(f"{op}: dilation must be positive, but got {d}")
    if min(p) < 0:
        raise ValueError(f"{op}: padding must be non-negative, but got {p}")
    for name, v in (("kernel_size", k), ("stride", s), ("padding", p), ("dilation", d)):
        if max(v) >= 2**31:
            raise ValueError(f"{op}: {name} must be below 2^31, but got {v}")
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(
            f"{op}: padding must be at most half of kernel_size, but got padding {p} with "
            f"kernel_size {k}"
        )
    h, w = input.shape[-2:]
    out_h = pool_output_size(h, k[0], s[0], p[0], d[0], ceil_mode)
    out_w = pool_output_size(w, k[1], s[1], p[1], d[1], ceil_mode)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"{op}: input of spatial size ({h}, {w}) gives an output of size ({out_h}, {out_w}), "
            f"which is too small; the kernel_size {k} with dilation {d} must fit in the padded "
            "input"
        )
    return k, s, p, d


def _output_shape(input: Tensor, k, s, p, d, ceil_mode) -> list:
    h, w = input.shape[-2:]
    return [
        *input.shape[:-2],
        pool_output_size(h, k[0], s[0], p[0], d[0], ceil_mode),
        pool_output_size(w, k[1], s[1], p[1], d[1], ceil_mode),
    ]


# --- fake (meta) implementations: shapes, dtypes and memory formats of the real ones -----

def _forward_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    check_args(input, kernel_size, stride, padding, dilation, ceil_mode)
    shape = _output_shape(input, kernel_size, stride, padding, dilation, ceil_mode)
    fmt = memory_format_of(input)
    out = torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)
    idx = torch.empty(shape, dtype=torch.int64, device=input.device, memory_format=fmt)
    return out, idx


def _backward_fake(grad_output, input, indices, kernel_size, stride, padding, dilation,
                   ceil_mode):
    return torch.empty_like(input, memory_format=memory_format_of(input))


torch.library.register_fake("dlcv_fast::max_pool2d")(_forward_fake)
torch.library.register_fake("dlcv_fast::max_pool2d_backward")(_backward_fake)


# --- the Triton backend as ops of its own ---------------------------------------------------

@torch.library.custom_op("dlcv_fast::max_pool2d_triton", mutates_args=())
def _max_pool2d_triton(
    input: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], ceil_mode: bool,
) -> tuple[Tensor, Tensor]:
    from dlcv_fast.triton_kernels import max_pool2d as kernels

    check_args(input, kernel_size, stride, padding, dilation, ceil_mode)
    return kernels.forward(input, kernel_size, stride, padding, dilation, ceil_mode)


@torch.library.custom_op("dlcv_fast::max_pool2d_backward_triton", mutates_args=())
def _max_pool2d_backward_triton(
    grad_output: Tensor, input: Tensor, indices: Tensor, kernel_size: Sequence[int],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], ceil_mode: bool,
) -> Tensor:
    from dlcv_fast.triton_kernels import max_pool2d as kernels

    _check_backward_args(grad_output, input, indices, kernel_size, stride, padding, dilation,
                         ceil_mode)
    return kernels.backward(grad_output, input, indices, kernel_size, stride, padding, dilation,
                            ceil_mode)


_max_pool2d_triton.register_fake(_forward_fake)
_max_pool2d_backward_triton.register_fake(_backward_fake)


def _check_backward_args(grad_output, input, indices, kernel_size, stride, padding, dilation,
                         ceil_mode):
    op = "max_pool2d_backward"
    check_args(input, kernel_size, stride, padding, dilation, ceil_mode, op=op)
    for name, t in (("grad_output", grad_output), ("indices", indices)):
        if t.device != input.device:
            raise RuntimeError(
                f"{op}: {name} is on {t.device} but input is on {input.device}; expected both "
                "on the same device"
            )
    if not grad_output.dtype.is_floating_point:
        raise TypeError(f"{op}: grad_output must be float32, float64, float16 or bfloat16, "
                        f"but got {grad_output.dtype}")
    if grad_output.dtype != input.dtype:
        raise TypeError(f"{op}: grad_output has dtype {grad_output.dtype} but input has "
                        f"{input.dtype}")
    if indices.dtype != torch.int64:
        raise TypeError(f"{op}: indices must be int64, but got {indices.dtype}")
    shape = _output_shape(input, kernel_size, stride, padding, dilation, ceil_mode)
    for name, t in (("grad_output", grad_output), ("indices", indices)):
        if list(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have the output's shape {shape}, but got "
                             f"{list(t.shape)}")


# --- autograd of the Triton ops (the C++ ops have theirs in csrc/dlcv_fast.cpp; the same
# formulas in Python serve torch.func) --------------------------------------------------------

def _forward_setup_context(ctx, inputs, output):
    input, *params = inputs
    ctx.save_for_backward(input, output[1])
    ctx.params = params


def _backward_with(backward_op):
    def backward(ctx, grad_output, _grad_indices):
        input, indices = ctx.saved_tensors
        grad_input = backward_op(grad_output, input, indices, *ctx.params)
        return grad_input, None, None, None, None, None

    return backward


def _double_backward_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])
    ctx.params = inputs[3:7]  # kernel_size, stride, padding, dilation


def live_windows(indices: Tensor, in_h: int, in_w: int, kernel_size, stride, padding,
                 dilation) -> Tensor:
    """(out_h, out_w) bool: whether each output's window holds an input element. A window
    wholly in the padding passes no gradient (its index may lie outside the plane)."""
    def live(out, size, k, s, p, d):
        taps = (torch.arange(out, device=indices.device).view(-1, 1) * s - p
                + torch.arange(k, device=indices.device) * d)
        return ((taps >= 0) & (taps < size)).any(-1)

    kh, kw = kernel_size
    live_h = live(indices.shape[-2], in_h, kh, stride[0], padding[0], dilation[0])
    live_w = live(indices.shape[-1], in_w, kw, stride[1], padding[1], dilation[1])
    return live_h.view(-1, 1) & live_w.view(1, -1)


def _double_backward(ctx, grad_grad_input):
    # max_pool2d_backward is linear in grad_output: its adjoint gathers through the indices,
    # at the outputs whose window holds an input element (the others passed nothing).
    indices, = ctx.saved_tensors
    live = live_windows(indices, grad_grad_input.shape[-2], grad_grad_input.shape[-1],
                        *ctx.params[:4])
    safe = indices.masked_fill(~live, 0)
    grad_grad_output = (grad_grad_input.flatten(-2).gather(-1, safe.flatten(-2))
                        .view(indices.shape).masked_fill(~live, 0))
    return (grad_grad_output,) + (None,) * 7


# Batching rules (torch.vmap): the vmapped samples fold into the batch dim (or make one).

def _fold(t: Tensor) -> Tensor:
    return t if t.dim() == 4 else t.flatten(0, 1)  # (B, C, H, W) or (B, N, C, H, W)


def _unfold(t: Tensor, like: Tensor) -> Tensor:
    return t.unflatten(0, like.shape[:2]) if like.dim() == 5 else t


def _forward_vmap_with(forward_op):
    def rule(info, in_dims, input, *params):
        x = _func.batched(input, in_dims[0], info.batch_size)
        output, indices = forward_op(_fold(x), *params)
        return (_unfold(output, x), _unfold(indices, x)), (0, 0)

    return rule


def _backward_vmap_with(backward_op):
    def rule(info, in_dims, grad_output, input, indices, *params):
        n = info.batch_size
        x = _func.batched(input, in_dims[1], n)
        grad_input = backward_op(_fold(_func.batched(grad_output, in_dims[0], n)), _fold(x),
                                 _fold(_func.batched(indices, in_dims[2], n)), *params)
        return _unfold(grad_input, x), 0

    return rule


_CPP = (_func.Op(torch.ops.dlcv_fast.max_pool2d),
        _func.Op(torch.ops.dlcv_fast.max_pool2d_backward))
_TRITON = (_func.Op(_max_pool2d_triton), _func.Op(_max_pool2d_backward_triton))
for _forward, _backward in (_CPP, _TRITON):
    _cpp = _forward is _CPP[0]
    _func.register_autograd(_forward, _backward_with(_backward), _forward_setup_context,
                            library=not _cpp)
    _func.register_autograd(_backward, _double_backward, _double_backward_setup_context,
                            library=not _cpp)
    _func.register_vmap(_forward, _forward_vmap_with(_forward))
    _func.register_vmap(_backward, _backward_vmap_with(_backward))


# --- the functional entry point -------------------------------------------------------------

_FORWARD = {"cpu": _CPP[0], "cuda": _CPP[0], "triton": _TRITON[0]}


def max_pool2d(
    input: Tensor,
    kernel_size: _IntPair,
    stride: _IntPair | None = None,
    padding: _IntPair = 0,
    dilation: _IntPair = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """2-D max pooling over an input of shape (N, C, H, W) or (C, H, W), with
    :func:`torch.nn.functional.max_pool2d`'s arguments and results.

    Args:
        input: float32, float64, float16, bfloat16, or an integer type (uint8, int8,
            int16, int32, int64; forward only); NCHW or channels_last (the output takes the
            input's memory format).
        kernel_size: window size, an int or (kH, kW).
        stride: window step, an int or (sH, sW); defaults to ``kernel_size``.
        padding: implicit padding of -inf (an integer type's lowest value) on both sides,
            at most half the kernel size.
        dilation: step between the elements of a window.
        ceil_mode: round the output size up instead of down.
        return_indices: also return the flat index ``h * W + w`` of each maximum in its
            input plane (int64), as PyTorch's ``return_indices``.

    Ties go to the first maximum in row-major window order and NaN propagates, exactly as
    in PyTorch. The backward pass is deterministic.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"max_pool2d: input must be a Tensor, but got {type(input).__name__}")
    # The registered op checks everything else (in C++, or in Python for Triton), with the
    # messages of check_args.
    k = _pair("max_pool2d", "kernel_size", kernel_size)
    s = _pair("max_pool2d", "stride", stride, default=k)
    p = _pair("max_pool2d", "padding", padding)
    d = _pair("max_pool2d", "dilation", dilation)
    if not isinstance(ceil_mode, bool):  # as PyTorch: not 0, 1 or None
        raise TypeError(f"max_pool2d: ceil_mode must be a bool, but got {ceil_mode!r}")
    name = backend.resolve("max_pool2d", input)
    if name == "triton":
        refuse_forward_ad("max_pool2d", input)
    op = _FORWARD[name]
    output, indices = op(input, k, s, p, d, ceil_mode)
    return (output, indices) if return_indices else output


__all__ = ["max_pool2d", "check_args"]
