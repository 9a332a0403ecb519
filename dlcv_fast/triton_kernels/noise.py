"""The fused noise-scheduling combination in Triton (see csrc/noise_shape.h):
out = cx * x + ce * e with (cx, ce) = (sqrt(a), sqrt(1 - a)) for add_noise and
(-sqrt(1 - a), sqrt(a)) for get_velocity, a = alphas_cumprod[timesteps[b]] per sample b.

Samples arrive dense with the batch outermost, so element i belongs to sample i // inner.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

from dlcv_fast.ops._common import empty_output, on_device_of

# 4 warps x 32 lanes x 8 elements (16-byte fp16 vectors). Not tuned on a GPU yet.
BLOCK = 1024


@triton.jit
def _coefficients(t_ptr, table_ptr, offs, inner, live, VELOCITY: tl.constexpr, ACC: tl.constexpr,
                  COEF: tl.constexpr):
    # In COEF: float64 for a float64 table, which keeps 1 - a accurate near t = 0.
    a = tl.load(table_ptr + tl.load(t_ptr + offs // inner, mask=live, other=0), mask=live,
                other=0.0).to(COEF)
    signal = tl.sqrt(a).to(ACC)
    noise = tl.sqrt(1.0 - a).to(ACC)
    if VELOCITY:
        return -noise, signal
    return signal, noise


@triton.jit
def _combine_kernel(x_ptr, e_ptr, t_ptr, table_ptr, out_ptr, total, inner,
                    VELOCITY: tl.constexpr, ACC: tl.constexpr, COEF: tl.constexpr,
                    WIDE_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    cx, ce = _coefficients(t_ptr, table_ptr, offs, inner, live, VELOCITY, ACC, COEF)
    x = tl.load(x_ptr + offs, mask=live, other=0.0).to(ACC)
    e = tl.load(e_ptr + offs, mask=live, other=0.0).to(ACC)
    tl.store(out_ptr + offs, (cx * x + ce * e).to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _backward_kernel(g_ptr, t_ptr, table_ptr, gx_ptr, ge_ptr, total, inner,
                     VELOCITY: tl.constexpr, ACC: tl.constexpr, COEF: tl.constexpr,
                     WIDE_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    cx, ce = _coefficients(t_ptr, table_ptr, offs, inner, live, VELOCITY, ACC, COEF)
    g = tl.load(g_ptr + offs, mask=live, other=0.0).to(ACC)
    tl.store(gx_ptr + offs, (cx * g).to(gx_ptr.dtype.element_ty), mask=live)
    tl.store(ge_ptr + offs, (ce * g).to(ge_ptr.dtype.element_ty), mask=live)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _coef(x: torch.Tensor, table: torch.Tensor):
    return tl.float64 if torch.float64 in (x.dtype, table.dtype) else tl.float32


def _launch_args(t: torch.Tensor):
    total = t.numel()
    inner = total // t.shape[0] if t.shape[0] else 0
    return total, inner, total >= 2**31 - 2**20


def combine(x, e, timesteps, table, velocity: bool):
    """out = cx * x + ce * e; x and e dense in one memory format, timesteps int64 of one per
    sample, table float32 or float64 (arguments already checked: dlcv_fast.ops.noise)."""
    out = empty_output(x.shape, x, memory_format=suggest_memory_format(x))
    total, inner, wide = _launch_args(x)
    if total:
        with on_device_of(x):
            _combine_kernel[(triton.cdiv(total, BLOCK),)](
                x, e, timesteps, table, out, total, inner, VELOCITY=velocity,
                ACC=_acc(x.dtype), COEF=_coef(x, table), WIDE_INDEX=wide, BLOCK=BLOCK)
    return out


def backward(grad, timesteps, table, velocity: bool):
    """(cx * grad, ce * grad), grad dense."""
    fmt = suggest_memory_format(grad)
    gx = empty_output(grad.shape, grad, memory_format=fmt)
    ge = empty_output(grad.shape, grad, memory_format=fmt)
    total, inner, wide = _launch_args(grad)
    if total:
        with on_device_of(grad):
            _backward_kernel[(triton.cdiv(total, BLOCK),)](
                grad, timesteps, table, gx, ge, total, inner, VELOCITY=velocity,
                ACC=_acc(grad.dtype), COEF=_coef(grad, table), WIDE_INDEX=wide, BLOCK=BLOCK)
    return gx, ge
