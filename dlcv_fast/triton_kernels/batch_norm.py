"""Batch normalisation in Triton (see csrc/batch_norm_shape.h): the input dense in NCHW or
channels_last, seen as (count, C) with count = N * inner values per channel.

Reductions run on (rows x channels) tiles: program (channel block, split) walks its split's
values in BLOCK_R x BLOCK_C tiles with one Welford (or sum) accumulator per tile lane, then
combines its lanes exactly (count-weighted means and the spread of the lane means) and
writes one partial per channel and split; the launchers merge the splits with the same
count-weighted formula (a few per-channel torch ops). Elementwise kernels compute the
channel of each element and gather its per-channel constants.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlcv_fast.ops._common import empty_output, on_device_of

BLOCK = 1024          # elements per program of the elementwise kernels; not tuned on a GPU yet
TARGET_PROGRAMS = 1024  # reduction programs to aim for: enough to fill any GPU
MAX_SPLITS = 256


@triton.jit
def _tile(offs_r, offs_c, count, C, inner, CHANNELS_LAST: tl.constexpr):
    """Element offsets of the (value j, channel c) tile and its mask."""
    j = offs_r[:, None]
    c = offs_c[None, :]
    if CHANNELS_LAST:
        off = j * C + c
    else:
        n = j // inner
        off = (n * C + c) * inner + (j - n * inner)
    return off, (j < count) & (c < C)


@triton.jit
def _stats_kernel(x_ptr, n_ptr, mean_ptr, m2_ptr, count, C, inner, per_split,
                  CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    if WIDE:
        split = split.to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    begin = split * per_split
    end = tl.minimum(begin + per_split, count)
    n = tl.zeros((BLOCK_R, BLOCK_C), ACC)
    mean = tl.zeros((BLOCK_R, BLOCK_C), ACC)
    m2 = tl.zeros((BLOCK_R, BLOCK_C), ACC)
    for start in range(begin, end, BLOCK_R):
        offs_r = start + tl.arange(0, BLOCK_R)
        off, live = _tile(offs_r, offs_c, end, C, inner, CHANNELS_LAST)
        x = tl.load(x_ptr + off, mask=live, other=0.0).to(ACC)
        n_new = n + live.to(ACC)
        delta = x - mean
        mean = tl.where(live, mean + delta / tl.maximum(n_new, 1.0), mean)
        m2 = tl.where(live, m2 + delta * (x - mean), m2)
        n = n_new
    # Lanes combined exactly: the count-weighted mean, and m2 plus the lane means' spread.
    # The mean is taken relative to the lanes' plain average: a count-weighted sum of means
    # near 1e4 would cost float32 its last digits.
    total = tl.sum(n, 0)
    used = n > 0
    shift = tl.sum(tl.where(used, mean, 0.0), 0) / tl.maximum(tl.sum(used.to(ACC), 0), 1.0)
    mu = shift + tl.sum(n * (mean - shift[None, :]), 0) / tl.maximum(total, 1.0)
    dev = mean - mu[None, :]
    spread = tl.sum(m2 + n * dev * dev, 0)
    out = split * C + offs_c
    keep = offs_c < C
    tl.store(n_ptr + out, total, mask=keep)
    tl.store(mean_ptr + out, mu, mask=keep)
    tl.store(m2_ptr + out, spread, mask=keep)


@triton.jit
def _channel_consts(offs_c, keep, mean_ptr, invstd_ptr, w_ptr, b_ptr,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """mean, scale = w * invstd and bias of z = (x - mean) * scale + bias, per channel."""
    mean = tl.load(mean_ptr + offs_c, mask=keep, other=0.0)
    scale = tl.load(invstd_ptr + offs_c, mask=keep, other=0.0)
    if HAS_W:
        scale = scale * tl.load(w_ptr + offs_c, mask=keep, other=0.0)
    if HAS_B:
        bias = tl.load(b_ptr + offs_c, mask=keep, other=0.0)
    else:
        bias = tl.zeros_like(mean)
    return mean, scale, bias


@triton.jit
def _grad_sums_kernel(dy_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, a_ptr, b_out_ptr,
                      count, C, inner, per_split, CHANNELS_LAST: tl.constexpr,
                      RELU: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      ACC: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    if WIDE:
        split = split.to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = offs_c < C
    mean, scale, bias = _channel_consts(offs_c, keep, mean_ptr, invstd_ptr, w_ptr, b_ptr,
                                        HAS_W, HAS_B)
    begin = split * per_split
    end = tl.minimum(begin + per_split, count)
    sa = tl.zeros((BLOCK_R, BLOCK_C), ACC)
    sb = tl.zeros((BLOCK_R, BLOCK_C), ACC)
    for start in range(begin, end, BLOCK_R):
        offs_r = start + tl.arange(0, BLOCK_R)
        off, live = _tile(offs_r, offs_c, end, C, inner, CHANNELS_LAST)
        xm = tl.load(x_ptr + off, mask=live, other=0.0).to(ACC) - mean[None, :]
        g = tl.load(dy_ptr + off, mask=live, other=0.0).to(ACC)
        if RELU:
            g = tl.where(xm * scale[None, :] + bias[None, :] > 0, g, 0.0)
        g = tl.where(live, g, 0.0)
        sa += g
        sb += g * xm
    out = split * C + offs_c
    tl.store(a_ptr + out, tl.sum(sa, 0), mask=keep)
    tl.store(b_out_ptr + out, tl.sum(sb, 0), mask=keep)


@triton.jit
def _channels(offs, C, inner, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return offs % C
    return (offs // inner) % C


@triton.jit
def _normalize_kernel(x_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, total, C, inner,
                      CHANNELS_LAST: tl.constexpr, RELU: tl.constexpr, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr,
                      BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    c = _channels(offs, C, inner, CHANNELS_LAST)
    mean, scale, bias = _channel_consts(c, live, mean_ptr, invstd_ptr, w_ptr, b_ptr, HAS_W, HAS_B)
    x = tl.load(x_ptr + offs, mask=live, other=0.0).to(ACC)
    z = (x - mean) * scale + bias
    if RELU:
        z = tl.where(z < 0, 0.0, z)  # NaN passes, as in torch.relu
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=live)


@triton.jit
def _grad_input_kernel(dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, sum_dy_ptr,
                       sum_dy_xmu_ptr, count, total, C, inner,
                       CHANNELS_LAST: tl.constexpr, RELU: tl.constexpr, TRAIN: tl.constexpr,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
                       WIDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    c = _channels(offs, C, inner, CHANNELS_LAST)
    mean, scale, bias = _channel_consts(c, live, mean_ptr, invstd_ptr, w_ptr, b_ptr, HAS_W, HAS_B)
    xm = tl.load(x_ptr + offs, mask=live, other=0.0).to(ACC) - mean
    g = tl.load(dy_ptr + offs, mask=live, other=0.0).to(ACC)
    if RELU:
        g = tl.where(xm * scale + bias > 0, g, 0.0)
    r = scale * g
    if TRAIN:
        invstd = tl.load(invstd_ptr + c, mask=live, other=0.0)
        sd = tl.load(sum_dy_ptr + c, mask=live, other=0.0)
        sdx = tl.load(sum_dy_xmu_ptr + c, mask=live, other=0.0)
        # 1 / count in ACC here: a Python float argument reaches a compiled kernel as float32.
        inv_count = 1.0 / tl.cast(count, ACC)
        r -= scale * (sd * inv_count + xm * invstd * invstd * sdx * inv_count)
    tl.store(dx_ptr + offs, r.to(dx_ptr.dtype.element_ty), mask=live)


# --- launchers (arguments checked by dlcv_fast.ops.batch_norm) ----------------------------

def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _geometry(count: int, C: int, channels_last: bool):
    """(BLOCK_R, BLOCK_C, channel blocks, splits, values per split) of a reduction."""
    if channels_last:
        block_c = min(triton.next_power_of_2(C), 64)
        block_r = max(1, 2048 // block_c)
    else:
        block_c, block_r = 1, 1024
    c_blocks = triton.cdiv(C, block_c)
    splits = max(1, min(TARGET_PROGRAMS // c_blocks, triton.cdiv(count, block_r), MAX_SPLITS))
    per_split = triton.cdiv(triton.cdiv(count, splits), block_r) * block_r
    splits = triton.cdiv(count, per_split)
    return block_r, block_c, c_blocks, splits, per_split


def _wide(x: torch.Tensor) -> bool:
    return x.numel() >= 2**31 - 2**20


def stats(x: torch.Tensor, channels_last: bool):
    """Per-channel (mean, biased variance) in the accumulation type; x dense, count > 0."""
    C = x.shape[1]
    count = x.numel() // C
    inner = count // x.shape[0]
    acc = acc_dtype(x.dtype)
    block_r, block_c, c_blocks, splits, per_split = _geometry(count, C, channels_last)
    n, mean, m2 = (torch.empty(splits, C, dtype=acc, device=x.device) for _ in range(3))
    with on_device_of(x):
        _stats_kernel[(c_blocks, splits)](
            x, n, mean, m2, count, C, inner, per_split, CHANNELS_LAST=channels_last,
            ACC=_acc(x.dtype), WIDE=_wide(x), BLOCK_R=block_r, BLOCK_C=block_c)
    # Chan's merge of the splits: count-weighted mean, m2 plus the spread of the split means.
    mu = mean[0] + (n * (mean - mean[0])).sum(0) / count  # relative to a split's mean, as above
    var = (m2.sum(0) + (n * (mean - mu).square()).sum(0)) / count
    return mu, var


def grad_sums(dy, x, mean, invstd, weight, bias, relu: bool, channels_last: bool):
    """(sum_dy, sum_dy_xmu) per channel."""
    C = x.shape[1]
    count = x.numel() // C
    inner = count // x.shape[0]
    acc = acc_dtype(x.dtype)
    block_r, block_c, c_blocks, splits, per_split = _geometry(count, C, channels_last)
    a, b = (torch.empty(splits, C, dtype=acc, device=x.device) for _ in range(2))
    with on_device_of(x):
        _grad_sums_kernel[(c_blocks, splits)](
            dy, x, mean, invstd, _or(weight, mean), _or(bias, mean), a, b, count, C, inner,
            per_split, CHANNELS_LAST=channels_last, RELU=relu, HAS_W=weight is not None,
            HAS_B=bias is not None, ACC=_acc(x.dtype), WIDE=_wide(x), BLOCK_R=block_r,
            BLOCK_C=block_c)
    return a.sum(0), b.sum(0)


def _or(t, fallback):
    return fallback if t is None else t


def normalize(x, mean, invstd, weight, bias, relu: bool, channels_last: bool, memory_format):
    y = empty_output(x.shape, x, memory_format=memory_format)
    total = x.numel()
    if total:
        C = x.shape[1]
        inner = total // (x.shape[0] * C)
        with on_device_of(x):
            _normalize_kernel[(triton.cdiv(total, BLOCK),)](
                x, y, mean, invstd, _or(weight, mean), _or(bias, mean), total, C, inner,
                CHANNELS_LAST=channels_last, RELU=relu, HAS_W=weight is not None,
                HAS_B=bias is not None, ACC=_acc(x.dtype), WIDE=_wide(x), BLOCK=BLOCK)
    return y


def grad_input(dy, x, mean, invstd, weight, bias, sum_dy, sum_dy_xmu, count: int, relu: bool,
               channels_last: bool, memory_format):
    """dx from the sums over `count` values per channel (sum_dy None: evaluation mode)."""
    dx = empty_output(x.shape, x, memory_format=memory_format)
    total = x.numel()
    if total:
        C = x.shape[1]
        inner = total // (x.shape[0] * C)
        train = sum_dy is not None
        with on_device_of(x):
            _grad_input_kernel[(triton.cdiv(total, BLOCK),)](
                dy, x, dx, mean, invstd, _or(weight, mean), _or(bias, mean),
                sum_dy if train else mean, sum_dy_xmu if train else mean, count, total, C,
                inner, CHANNELS_LAST=channels_last, RELU=relu, TRAIN=train,
                HAS_W=weight is not None, HAS_B=bias is not None, ACC=_acc(x.dtype),
                WIDE=_wide(x), BLOCK=BLOCK)
    return dx
