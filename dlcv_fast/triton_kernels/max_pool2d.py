"""max_pool2d in Triton: forward and a deterministic gather backward.

Both kernels read their inputs through strides, so NCHW, channels_last and non-contiguous
inputs need no copy; the output is dense in the input's memory format, and each program
covers BLOCK consecutive output elements in that order (for channels_last, channels
fastest, so neighbouring lanes read neighbouring channels). Scan order and comparison
(`v > best or v is NaN`) are PyTorch's, so values and indices match it exactly.
Integer inputs (forward only) are compared in their own type.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlcv_fast.backend import triton_interpreted
from dlcv_fast.ops._common import empty_output, memory_format_of, on_device_of, pool_output_size

# On a GPU 256: 4 warps x 32 lanes x 2 elements, not tuned yet. The interpreter's cost is per
# program and operation, not per element: there, blocks of 4096 (the backward of the
# tests' 1x7x123x97 problem: 11 s -> 2 s).
BLOCK = 4096 if triton_interpreted() else 256


@triton.jit
def _decompose(offs, C, H, W, CHANNELS_LAST: tl.constexpr):
    """(n, c, h, w) of flat offsets in a dense (N, C, H, W) tensor in NCHW or NHWC order."""
    if CHANNELS_LAST:
        c = offs % C
        t = offs // C
        w = t % W
        t = t // W
        h = t % H
        n = t // H
    else:
        w = offs % W
        t = offs // W
        h = t % H
        t = t // H
        c = t % C
        n = t // C
    return n, c, h, w


@triton.jit
def _forward_kernel(
    x_ptr, out_ptr, idx_ptr, total,
    C, H, W, OH, OW,
    sxn, sxc, sxh, sxw,
    KH, KW, SH, SW, PH, PW, DH, DW,
    CHANNELS_LAST: tl.constexpr, WIDE_INDEX: tl.constexpr, ACC: tl.constexpr,
    LOWEST: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    n, c, oh, ow = _decompose(offs, C, OH, OW, CHANNELS_LAST)
    h_begin = oh * SH - PH
    w_begin = ow * SW - PW
    # PyTorch's initial argmax: the first in-bounds tap of the window.
    h_first = tl.where(h_begin < 0, h_begin + ((DH - 1 - h_begin) // DH) * DH, h_begin)
    w_first = tl.where(w_begin < 0, w_begin + ((DW - 1 - w_begin) // DW) * DW, w_begin)
    best = tl.full([BLOCK], LOWEST, ACC)
    best_at = (h_first * W + w_first).to(tl.int64)
    base = x_ptr + n * sxn + c * sxc
    for kh in range(KH):
        h = h_begin + kh * DH
        row_ok = live & (h >= 0) & (h < H)
        for kw in range(KW):
            w = w_begin + kw * DW
            ok = row_ok & (w >= 0) & (w < W)
            v = tl.load(base + h * sxh + w * sxw, mask=ok, other=LOWEST).to(best.dtype)
            take = ok & ((v > best) | (v != v))  # v != v: NaN (never for integers)
            best = tl.where(take, v, best)
            best_at = tl.where(take, (h * W + w).to(tl.int64), best_at)
    tl.store(out_ptr + offs, best.to(out_ptr.dtype.element_ty), mask=live)
    tl.store(idx_ptr + offs, best_at, mask=live)


@triton.jit
def _backward_kernel(
    gout_ptr, idx_ptr, gin_ptr, total,
    C, H, W, OH, OW,
    sgn, sgc, sgh, sgw,
    sin, sic, sih, siw,
    KH, KW, SH, SW, PH, PW, DH, DW,
    CHANNELS_LAST: tl.constexpr, WIDE_INDEX: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    n, c, h, w = _decompose(offs, C, H, W, CHANNELS_LAST)
    here = (h * W + w).to(tl.int64)
    acc = tl.zeros([BLOCK], ACC)
    # Tap (kh, kw) of output (oh, ow) lands on (h, w) iff oh * SH - PH + kh * DH == h.
    for kh in range(KH):
        oh_num = h + PH - kh * DH
        oh = oh_num // SH
        row_ok = live & (oh_num >= 0) & (oh_num % SH == 0) & (oh < OH)
        for kw in range(KW):
            ow_num = w + PW - kw * DW
            ow = ow_num // SW
            ok = row_ok & (ow_num >= 0) & (ow_num % SW == 0) & (ow < OW)
            at = tl.load(idx_ptr + n * sin + c * sic + oh * sih + ow * siw, mask=ok, other=-1)
            hit = ok & (at == here)
            g = tl.load(gout_ptr + n * sgn + c * sgc + oh * sgh + ow * sgw, mask=hit, other=0.0)
            acc += g.to(acc.dtype)
    tl.store(gin_ptr + offs, acc.to(gin_ptr.dtype.element_ty), mask=live)


def _acc_type(dtype: torch.dtype):
    """Compare and accumulate in float32, or float64 for float64 inputs; integers as they are."""
    if not dtype.is_floating_point:
        return getattr(tl, str(dtype).removeprefix("torch."))
    return tl.float64 if dtype == torch.float64 else tl.float32


def _lowest(dtype: torch.dtype):
    """The max's starting value: -inf, or an integer type's lowest value (what PyTorch gives
    a window that lies wholly in the padding)."""
    return float("-inf") if dtype.is_floating_point else torch.iinfo(dtype).min


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 4 else t.unsqueeze(0)


def _wide(*tensors: torch.Tensor) -> bool:
    """Whether some element offset may not fit in 32 bits. Each stride term is added to the
    pointer on its own, so the largest term bounds it."""
    return any(t.numel() >= 2**31 - 2**20 for t in tensors) or any(
        max((abs(s) * (d - 1) for s, d in zip(t.stride(), t.shape)), default=0) >= 2**31 - 2**20
        for t in tensors
    )


def forward(input, kernel_size, stride, padding, dilation, ceil_mode):
    """(output, indices) of max_pool2d; arguments already checked (dlcv_fast.ops)."""
    x = _as_4d(input)
    n, c, h, w = x.shape
    oh = pool_output_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = pool_output_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    fmt = memory_format_of(input)
    # Integer maxima start at their type's maximum (the default poison of int64 is its
    # minimum, which a window wholly in the padding yields).
    out = empty_output((n, c, oh, ow), x, memory_format=fmt,
                       poison=None if x.dtype.is_floating_point else torch.iinfo(x.dtype).max)
    idx = empty_output((n, c, oh, ow), x, dtype=torch.int64, memory_format=fmt)
    total = out.numel()
    if total > 0:
        with on_device_of(x):
            _forward_kernel[(triton.cdiv(total, BLOCK),)](
                x, out, idx, total, c, h, w, oh, ow, *x.stride(),
                *kernel_size, *stride, *padding, *dilation,
                CHANNELS_LAST=fmt == torch.channels_last, WIDE_INDEX=_wide(x, idx),
                ACC=_acc_type(x.dtype), LOWEST=_lowest(x.dtype), BLOCK=BLOCK,
            )
    if input.dim() == 3:
        return out.squeeze(0), idx.squeeze(0)
    return out, idx


def backward(grad_output, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    """grad_input of max_pool2d; arguments already checked (dlcv_fast.ops)."""
    g, i = _as_4d(grad_output), _as_4d(indices)
    n, c, h, w = _as_4d(input).shape
    oh, ow = g.shape[-2:]
    fmt = memory_format_of(input)
    grad_input = empty_output((n, c, h, w), g, memory_format=fmt)
    total = grad_input.numel()
    if total > 0:
        with on_device_of(g):
            _backward_kernel[(triton.cdiv(total, BLOCK),)](
                g, i, grad_input, total, c, h, w, oh, ow, *g.stride(), *i.stride(),
                *kernel_size, *stride, *padding, *dilation,
                CHANNELS_LAST=fmt == torch.channels_last, WIDE_INDEX=_wide(g, i, grad_input),
                ACC=_acc_type(g.dtype), BLOCK=BLOCK,
            )
    return grad_input if input.dim() == 4 else grad_input.squeeze(0)
