"""conv2d in Triton: forward, dgrad and wgrad as implicit GEMMs on ``tl.dot``, and the
bias/ReLU backward as a per-channel reduction (geometry: csrc/conv2d_shape.h).

No im2col buffer is built: each program decodes its GEMM rows and the current K slice back
into tensor coordinates and loads its tiles through the tensors' strides, with masks that
stand for the zero padding. One GEMM per group (the third grid axis).

  forward  y[m, o]  = sum_k A[m, k] B[k, o]   m = (n, i, j)  o in the group  k = (c, r, s)
  dgrad    gx[m, c] = sum_k A[m, k] B[k, c]   m = (n, h, w)  c in the group  k = (o, r, s)
  wgrad    gw[o, q] = sum_k A[o, k] B[k, q]   q = (c, r, s)                  k = (n, i, j)

Order of (c, r, s) along K (and along wgrad's columns), chosen from the activation's layout:
- channels_last with at least 16 channels per group ("tap-major"): one kernel tap per K
  step and a block of channels within it, so a tile row is one contiguous run of channels
  whose offsets are a plain range: the compiler vectorises the loads and pipelines them
  through shared memory, and the padding masks are computed once per row, not per element;
- otherwise one flat index: channels fastest, k = (r * KW + s) * Cg + c, for channels_last
  (few channels: no K padding per tap), or the kernel column fastest,
  k = (c * KH + r) * KW + s, for NCHW, which walks along an image row.

dgrad with a stride splits the input into stride phases (h mod SH, w mod SW): every pixel
of a phase is reached by the same taps, so each phase's GEMM runs over those taps only
instead of masking the others out (a stride-2 layer would waste 3/4 of its K work).

Depthwise layers (groups == C, one input channel per group) skip the GEMMs, whose tiles
would be one column wide: direct kernels (the _dw_* functions below) take them inside
forward, backward_input and backward_weight.

Accumulation is float32 (float64 for float64 tensors; the compiler lowers a float64
``tl.dot`` to FMAs); float32 operands use TF32 tensor cores only when allowed. Every
reduction runs in a fixed order: wgrad and the bias gradient split their long reduction
into float32 partials that a second kernel sums in split order, so results are
deterministic (no atomics).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from dlcv_fast.ops._common import autotune_bucket as _bucket
from dlcv_fast.ops._common import on_device_of

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# wgrad and bias splits cut K into chunks of a multiple of this; it is a multiple of every
# BLOCK_K below, so a split never shares a K tile with its neighbour.
_K_CHUNK = 64
# bias/relu backward tile: positions x channels. Not tuned on a GPU yet.
_BIAS_BLOCK_P = 64
_BIAS_BLOCK_O = 32
# wgrad partial-sum reduction: elements per program.
_REDUCE_BLOCK = 256


def _config(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                         num_warps=warps, num_stages=stages)


if _INTERPRETED:
    # One tile: the interpreter's cost is per operation, so few programs and K steps
    # (64x64x32 runs the tests about 3x faster than 32x32x16).
    _CONFIGS = [_config(64, 64, 32, 4, 1)]
else:
    # Starting points, not yet tuned on a GPU. BLOCK_N 16/32 serve the narrow GEMMs of
    # grouped and depthwise layers.
    _CONFIGS = [
        _config(128, 128, 32, 8, 3),
        _config(128, 128, 64, 8, 3),
        _config(128, 64, 32, 4, 4),
        _config(64, 128, 32, 4, 4),
        _config(64, 64, 32, 4, 4),
        _config(128, 32, 32, 4, 4),
        _config(128, 16, 32, 4, 4),
    ]


def _prune(configs, named_args, **kwargs):
    """float64 runs on FMAs, not tensor cores: large tiles only spill registers."""
    if kwargs.get("ACC", named_args.get("ACC")) == tl.float64:
        small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
        return small or configs[-1:]
    return configs


_PRUNE = {"early_config_prune": _prune}


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, ACC: tl.constexpr):
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _decode_k(k, CG, KH, KW, CHANNELS_FAST: tl.constexpr):
    """(c, r, s) of a K index over (channel, kernel row, kernel column)."""
    if CHANNELS_FAST:
        c = k % CG
        t = k // CG
        r = t // KW
        s = t % KW
    else:
        s = k % KW
        t = k // KW
        r = t % KH
        c = t // KH
    return c, r, s


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "NG", "K", "CHANNELS_FAST", "TAP_MAJOR"],
                 prune_configs_by=_PRUNE)
@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, NG, K, CG, H, W, OW, OHW, KH, KW,
    sxn, sxc, sxh, sxw, swo, swc, swh, sww, syn, syc, syh, syw,
    SH, SW, PH, PW, DH, DW, M_BUCKET,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, CHANNELS_FAST: tl.constexpr,
    TAP_MAJOR: tl.constexpr, WIDE_INDEX: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(2)
    if WIDE_INDEX:
        pid_m = pid_m.to(tl.int64)
        g = g.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < NG
    n = offs_m // OHW
    t = offs_m % OHW
    i = t // OW
    j = t % OW
    h0 = i * SH - PH
    w0 = j * SW - PW
    o = g * NG + offs_n
    # Each stride term is added to the pointer on its own, so 32-bit terms cannot overflow
    # by summing.
    x_rows = x_ptr + g * CG * sxc + n * sxn
    w_cols = w_ptr + o * swo
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    if TAP_MAJOR:
        # One kernel tap per K step, a block of channels along K: the tile's channel
        # offsets stay a plain range, so the compiler can vectorise and pipeline the loads.
        c_blocks = tl.cdiv(CG, BLOCK_K)
        for t in range(0, KH * KW * c_blocks):
            rs = t // c_blocks
            c = (t % c_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            r = rs // KW
            s = rs % KW
            h = h0 + r * DH
            w = w0 + s * DW
            row_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            k_ok = c < CG
            a_rows = x_rows + h * sxh + w * sxw
            a = tl.load(a_rows[:, None] + (c * sxc)[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols[None, :] + r * swh + s * sww + (c * swc)[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, PRECISION, ACC)
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if WIDE_INDEX:  # c * sxc can pass 2^31 within one large image
                offs_k = offs_k.to(tl.int64)
            k_ok = offs_k < K
            c, r, s = _decode_k(offs_k, CG, KH, KW, CHANNELS_FAST)
            h = h0[:, None] + (r * DH)[None, :]
            w = w0[:, None] + (s * DW)[None, :]
            a_ok = m_ok[:, None] & k_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a = tl.load(x_rows[:, None] + (c * sxc)[None, :] + h * sxh + w * sxw, mask=a_ok,
                        other=0.0)
            b = tl.load(w_cols[None, :] + (c * swc + r * swh + s * sww)[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, PRECISION, ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + o, mask=n_ok, other=0.0).to(ACC)[None, :]
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # keeps NaN, as torch.relu does
    y_ptrs = (y_ptr + (n * syn)[:, None] + (i * syh)[:, None] + (j * syw)[:, None]
              + (o * syc)[None, :])
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _phase_taps(phase, PAD, DIL, STRIDE, STEP, KSIZE):
    """(first, count) of the kernel taps r that reach the input rows h = phase (mod STRIDE):
    those with h + PAD - r * DIL a multiple of STRIDE, which repeat every STEP =
    STRIDE / gcd(STRIDE, DIL) taps. count is 0 when no tap reaches the phase."""
    first = phase * 0 + KSIZE  # a tensor from the start: KSIZE may arrive as a constant
    for rr in range(KSIZE):
        r = KSIZE - 1 - rr
        first = tl.where((phase + PAD - r * DIL) % STRIDE == 0, r, first)
    return first, (KSIZE - first + STEP - 1) // STEP


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "NG", "K", "CHANNELS_FAST", "TAP_MAJOR"],
                 prune_configs_by=_PRUNE)
@triton.jit
def _dgrad_kernel(
    gy_ptr, w_ptr, gx_ptr,
    M, NG, K, OG, OH, OW, H, W, HQ, WQ, KH, KW,
    sgn, sgc, sgh, sgw, swo, swc, swh, sww, sxn, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW, STEP_H, STEP_W, M_BUCKET,
    CHANNELS_FAST: tl.constexpr, TAP_MAJOR: tl.constexpr, WIDE_INDEX: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # With a stride, only some taps reach a given input pixel: tap (r, s) of output (i, j)
    # reads (h, w) iff i * SH - PH + r * DH == h. Which taps those are depends only on
    # (h mod SH, w mod SW), so the input is cut into SH * SW phases (the first grid axis
    # enumerates phase x row tile) and each phase's GEMM runs over its own taps, with no
    # K work wasted on taps that miss. M counts the rows of one phase: N * HQ * WQ with
    # HQ = ceil(H / SH), WQ = ceil(W / SW); rows past the image are masked.
    m_tiles = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    phase = pid // m_tiles
    pid_m = pid % m_tiles
    g = tl.program_id(2)
    if WIDE_INDEX:
        pid_m = pid_m.to(tl.int64)
        g = g.to(tl.int64)
    ph = phase // SW
    pw = phase % SW
    r0, nr = _phase_taps(ph, PH, DH, SH, STEP_H, KH)
    s0, ns = _phase_taps(pw, PW, DW, SW, STEP_W, KW)
    k_phase = OG * nr * ns
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = offs_m // (HQ * WQ)
    t = offs_m % (HQ * WQ)
    hh = ph + (t // WQ) * SH
    ww = pw + (t % WQ) * SW
    m_ok = (offs_m < M) & (hh < H) & (ww < W)
    n_ok = offs_n < NG
    cin = g * NG + offs_n
    gy_rows = gy_ptr + g * OG * sgc + n * sgn
    w_cols = w_ptr + g * OG * swo + offs_n * swc
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    # Exact divisions below: the phase makes the numerators multiples of the strides.
    if TAP_MAJOR:
        # One tap per K step, a block of output channels along K (see the forward).
        o_blocks = tl.cdiv(OG, BLOCK_K)
        for t in range(0, nr * ns * o_blocks):
            tap = t // o_blocks
            o = (t % o_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
            r = r0 + (tap // ns) * STEP_H
            s = s0 + (tap % ns) * STEP_W
            i = (hh + PH - r * DH) // SH
            j = (ww + PW - s * DW) // SW
            row_ok = m_ok & (i >= 0) & (j >= 0) & (i < OH) & (j < OW)
            k_ok = o < OG
            a_rows = gy_rows + i * sgh + j * sgw
            a = tl.load(a_rows[:, None] + (o * sgc)[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols[None, :] + r * swh + s * sww + (o * swo)[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, PRECISION, ACC)
    else:
        for k0 in range(0, k_phase, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            if WIDE_INDEX:  # o * sgc can pass 2^31 within one large image
                offs_k = offs_k.to(tl.int64)
            k_ok = offs_k < k_phase
            o, tr, ts = _decode_k(offs_k, OG, nr, ns, CHANNELS_FAST)
            r = r0 + tr * STEP_H
            s = s0 + ts * STEP_W
            i = ((hh + PH)[:, None] - (r * DH)[None, :]) // SH
            j = ((ww + PW)[:, None] - (s * DW)[None, :]) // SW
            a_ok = m_ok[:, None] & k_ok[None, :] & (i >= 0) & (j >= 0) & (i < OH) & (j < OW)
            a = tl.load(gy_rows[:, None] + (o * sgc)[None, :] + i * sgh + j * sgw, mask=a_ok,
                        other=0.0)
            b = tl.load(w_cols[None, :] + (o * swo + r * swh + s * sww)[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, PRECISION, ACC)
    gx_ptrs = (gx_ptr + (n * sxn)[:, None] + (hh * sxh)[:, None] + (ww * sxw)[:, None]
               + (cin * sxc)[None, :])
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=_CONFIGS, key=["M", "NG", "K_BUCKET", "CHANNELS_FAST", "TAP_MAJOR"],
                 prune_configs_by=_PRUNE)
@triton.jit
def _wgrad_kernel(
    gy_ptr, x_ptr, out_ptr,
    M, NG, K, K_SPLIT, SPLITS, CG, H, W, OW, OHW, KH, KW,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, so_split, soo, soc, sor, sos,
    SH, SW, PH, PW, DH, DW, K_BUCKET,
    CHANNELS_FAST: tl.constexpr, TAP_MAJOR: tl.constexpr, WIDE_INDEX: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    gs = tl.program_id(2)
    g = gs // SPLITS
    split = gs % SPLITS
    if WIDE_INDEX:
        g = g.to(tl.int64)
        split = split.to(tl.int64)
    k_lo = split * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    o = g * M + offs_m
    if TAP_MAJOR:
        # Each column tile lies in one kernel tap, a plain range of channels (see the
        # forward); the second grid axis enumerates tap x channel block.
        c_blocks = tl.cdiv(CG, BLOCK_N)
        pid_n = tl.program_id(1)
        rs = pid_n // c_blocks
        c = (pid_n % c_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = rs // KW
        s = rs % KW
        n_ok = c < CG
    else:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NG
        c, r, s = _decode_k(offs_n, CG, KH, KW, CHANNELS_FAST)
    gy_rows = gy_ptr + o * sgc
    if not TAP_MAJOR:
        x_cols = x_ptr + (g * CG + c) * sxc
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        n = offs_k // OHW
        t = offs_k % OHW
        i = t // OW
        j = t % OW
        a = tl.load(gy_rows[:, None] + (n * sgn)[None, :] + (i * sgh)[None, :]
                    + (j * sgw)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if TAP_MAJOR:
            h = i * SH - PH + r * DH
            w = j * SW - PW + s * DW
            row_ok = k_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            b_rows = x_ptr + n * sxn + h * sxh + w * sxw
            b = tl.load(b_rows[:, None] + ((g * CG + c) * sxc)[None, :],
                        mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        else:
            h = (i * SH - PH)[:, None] + (r * DH)[None, :]
            w = (j * SW - PW)[:, None] + (s * DW)[None, :]
            b_ok = k_ok[:, None] & n_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            b = tl.load(x_cols[None, :] + (n * sxn)[:, None] + h * sxh + w * sxw, mask=b_ok,
                        other=0.0)
        acc = _mma(a, b, acc, PRECISION, ACC)
    out_ptrs = (out_ptr + split * so_split + (o * soo)[:, None]
                + (c * soc + r * sor + s * sos)[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _wgrad_reduce_kernel(part_ptr, gw_ptr, total, SPLITS, CKK, KK, KW,
                         sgo, sgc, sgr, sgs,
                         WIDE_INDEX: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    acc = tl.zeros([BLOCK], ACC)
    for sp in range(SPLITS):  # fixed order: deterministic
        acc += tl.load(part_ptr + sp * total + offs, mask=live, other=0.0).to(ACC)
    o = offs // CKK
    t = offs % CKK
    c = t // KK
    t = t % KK
    r = t // KW
    s = t % KW
    tl.store(gw_ptr + o * sgo + c * sgc + r * sgr + s * sgs, acc.to(gw_ptr.dtype.element_ty),
             mask=live)


@triton.jit
def _bias_relu_backward_kernel(
    gy_ptr, y_ptr, g_ptr, part_ptr,
    O, P, P_SPLIT, OW, OHW,
    sgn, sgc, sgh, sgw, syn, syc, syh, syw, son, soc, soh, sow,
    HAS_Y: tl.constexpr, HAS_OUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    WIDE_INDEX: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr,
):
    split = tl.program_id(1)
    if WIDE_INDEX:
        split = split.to(tl.int64)
    p_lo = split * P_SPLIT
    p_hi = tl.minimum(P, p_lo + P_SPLIT)
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    if WIDE_INDEX:  # offs_o times an NCHW channel stride passes 2^31 in a huge image
        offs_o = offs_o.to(tl.int64)
    o_ok = offs_o < O
    acc = tl.zeros([BLOCK_P, BLOCK_O], ACC)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        ok = (offs_p < p_hi)[:, None] & o_ok[None, :]
        n = offs_p // OHW
        t = offs_p % OHW
        i = t // OW
        j = t % OW
        g = tl.load(gy_ptr + (n * sgn)[:, None] + (i * sgh)[:, None] + (j * sgw)[:, None]
                    + (offs_o * sgc)[None, :], mask=ok, other=0.0)
        if HAS_Y:
            y = tl.load(y_ptr + (n * syn)[:, None] + (i * syh)[:, None] + (j * syw)[:, None]
                        + (offs_o * syc)[None, :], mask=ok, other=0.0)
            # torch's relu backward: zero where y <= 0 (a NaN y passes the gradient).
            g = tl.where(y <= 0, 0.0, g)
        if HAS_OUT:
            tl.store(g_ptr + (n * son)[:, None] + (i * soh)[:, None] + (j * sow)[:, None]
                     + (offs_o * soc)[None, :], g.to(g_ptr.dtype.element_ty), mask=ok)
        if HAS_BIAS:
            acc += g.to(ACC)
    if HAS_BIAS:
        total = tl.sum(acc, axis=0)
        tl.store(part_ptr + split * O + offs_o, total.to(part_ptr.dtype.element_ty), mask=o_ok)


@triton.jit
def _bias_reduce_kernel(part_ptr, gb_ptr, O, SPLITS, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < O
    acc = tl.zeros([BLOCK], ACC)
    for sp in range(SPLITS):  # fixed order: deterministic
        acc += tl.load(part_ptr + sp * O + offs, mask=live, other=0.0).to(ACC)
    tl.store(gb_ptr + offs, acc.to(gb_ptr.dtype.element_ty), mask=live)


# ---- depthwise (groups == C, one input channel per group) ---------------------------------
# Output channel o reads input channel o // MULT only, so each output is a KH x KW dot
# product: direct kernels with FMAs on [positions x channels x taps] tiles, BLOCK_T taps at
# a time (one on a GPU: a loop over the taps; many under the interpreter, whose cost is per
# operation). dgrad gathers, for each pixel, the outputs of its channel's MULT outputs that
# read it through each tap (no atomics). wgrad reduces over (n, i, j) for a block of
# (tap, channel) columns in a fixed order, split into partials as the GEMM's wgrad does.


@triton.jit
def _dw_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    P, O, C_BLOCKS, MULT, H, W, OW, OHW, KH, KW,
    sxn, sxc, sxh, sxw, swo, swh, sww, syn, syc, syh, syw,
    SH, SW, PH, PW, DH, DW,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, WIDE_INDEX: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    pid_p = pid // C_BLOCKS
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o = (pid - pid_p * C_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = offs_p < P
    o_ok = o < O
    n = offs_p // OHW
    t = offs_p % OHW
    i = t // OW
    j = t % OW
    h0 = (i * SH - PH)[:, None, None]
    w0 = (j * SW - PW)[:, None, None]
    x_base = x_ptr + (n * sxn)[:, None, None] + ((o // MULT) * sxc)[None, :, None]
    w_base = w_ptr + (o * swo)[:, None]
    live = p_ok[:, None, None] & o_ok[None, :, None]
    acc = tl.zeros([BLOCK_P, BLOCK_C, BLOCK_T], ACC)
    for t0 in range(0, KH * KW, BLOCK_T):
        tap = t0 + tl.arange(0, BLOCK_T)
        r = tap // KW
        s = tap % KW
        h = h0 + (r * DH)[None, None, :]
        w = w0 + (s * DW)[None, None, :]
        ok = live & (tap < KH * KW)[None, None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        xv = tl.load(x_base + h * sxh + w * sxw, mask=ok, other=0.0)
        wv = tl.load(w_base + (r * swh + s * sww)[None, :],
                     mask=o_ok[:, None] & (tap < KH * KW)[None, :], other=0.0)
        acc += xv.to(ACC) * wv.to(ACC)[None, :, :]
    out = tl.sum(acc, axis=2)
    if HAS_BIAS:
        out += tl.load(b_ptr + o, mask=o_ok, other=0.0).to(ACC)[None, :]
    if RELU:
        out = tl.where(out < 0, 0.0, out)  # keeps NaN, as torch.relu does
    y_ptrs = (y_ptr + (n * syn)[:, None] + (i * syh)[:, None] + (j * syw)[:, None]
              + (o * syc)[None, :])
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & o_ok[None, :])


@triton.jit
def _dw_dgrad_kernel(
    gy_ptr, w_ptr, gx_ptr,
    P, C, C_BLOCKS, MULT, OH, OW, W, HW, KH, KW,
    sgn, sgc, sgh, sgw, swo, swh, sww, sxn, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW,
    WIDE_INDEX: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    pid_p = pid // C_BLOCKS
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = (pid - pid_p * C_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = offs_p < P
    c_ok = c < C
    n = offs_p // HW
    t = offs_p % HW
    h = t // W
    w = t % W
    hp = (h + PH)[:, None, None]
    wp = (w + PW)[:, None, None]
    gy_base = gy_ptr + (n * sgn)[:, None, None] + (c * MULT * sgc)[None, :, None]
    w_base = w_ptr + (c * MULT * swo)[:, None]
    live = p_ok[:, None, None] & c_ok[None, :, None]
    acc = tl.zeros([BLOCK_P, BLOCK_C, BLOCK_T], ACC)
    # u = (m, r, s): output channel c * MULT + m read this pixel through tap (r, s) at
    # output (i, j) when i * SH == h + PH - r * DH and j * SW == w + PW - s * DW.
    for u0 in range(0, MULT * KH * KW, BLOCK_T):
        u = u0 + tl.arange(0, BLOCK_T)
        u_ok = u < MULT * KH * KW
        m = u // (KH * KW)
        rs = u % (KH * KW)
        r = rs // KW
        s = rs % KW
        th = hp - (r * DH)[None, None, :]
        tw = wp - (s * DW)[None, None, :]
        i = th // SH
        j = tw // SW
        ok = (live & u_ok[None, None, :] & (th >= 0) & (i * SH == th) & (i < OH)
              & (tw >= 0) & (j * SW == tw) & (j < OW))
        g = tl.load(gy_base + (m * sgc)[None, None, :] + i * sgh + j * sgw, mask=ok, other=0.0)
        wv = tl.load(w_base + (m * swo + r * swh + s * sww)[None, :],
                     mask=c_ok[:, None] & u_ok[None, :], other=0.0)
        acc += g.to(ACC) * wv.to(ACC)[None, :, :]
    out = tl.sum(acc, axis=2)
    gx_ptrs = (gx_ptr + (n * sxn)[:, None] + (h * sxh)[:, None] + (w * sxw)[:, None]
               + (c * sxc)[None, :])
    tl.store(gx_ptrs, out.to(gx_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def _dw_wgrad_kernel(
    gy_ptr, x_ptr, out_ptr,
    P, P_SPLIT, O, Q, MULT, H, W, OW, OHW, KW,
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, so_split, soo, sor, sos,
    SH, SW, PH, PW, DH, DW,
    WIDE_INDEX: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
        split = split.to(tl.int64)
    # Columns q = tap * O + o: adjacent columns are adjacent channels of one tap.
    q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    o = q % O
    tap = q // O
    r = tap // KW
    s = tap % KW
    dh = (r * DH - PH)[None, :]
    dw = (s * DW - PW)[None, :]
    gy_cols = gy_ptr + (o * sgc)[None, :]
    x_cols = x_ptr + ((o // MULT) * sxc)[None, :]
    p_lo = split * P_SPLIT
    p_hi = tl.minimum(P, p_lo + P_SPLIT)
    acc = tl.zeros([BLOCK_P, BLOCK_Q], ACC)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        n = offs_p // OHW
        t = offs_p % OHW
        i = t // OW
        j = t % OW
        h = (i * SH)[:, None] + dh
        w = (j * SW)[:, None] + dw
        ok = (offs_p < p_hi)[:, None] & q_ok[None, :]
        x_ok = ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        g = tl.load(gy_cols + (n * sgn + i * sgh + j * sgw)[:, None], mask=ok, other=0.0)
        xv = tl.load(x_cols + (n * sxn)[:, None] + h * sxh + w * sxw, mask=x_ok, other=0.0)
        acc += g.to(ACC) * xv.to(ACC)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + split * so_split + o * soo + r * sor + s * sos,
             total.to(out_ptr.dtype.element_ty), mask=q_ok)


def _depthwise(x: torch.Tensor, w: torch.Tensor, groups: int) -> bool:
    """groups == C with one input channel per group: the direct kernels below."""
    return groups == x.shape[1] and w.shape[1] == 1


def _dw_blocks(t: torch.Tensor, taps: int) -> tuple[int, int, int]:
    """(positions, channels, taps) per tile: channels across the tile for channels_last,
    where they are contiguous, positions along a row for NCHW. Not tuned on a GPU yet."""
    if _INTERPRETED:
        return 128, 16, min(64, triton.next_power_of_2(taps))
    return (32, 32, 1) if _channels_fast(t) else (128, 4, 1)


def _dw_forward(x, w, bias, y, stride, padding, dilation, relu: bool) -> None:
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = y.shape[2], y.shape[3]
    p = n * oh * ow
    bp, bc, bt = _dw_blocks(x, kh * kw)
    c_blocks = triton.cdiv(o, bc)
    with on_device_of(x):
        _dw_forward_kernel[(triton.cdiv(p, bp) * c_blocks,)](
            x, w, bias if bias is not None else y, y,
            p, o, c_blocks, o // c, h, wd, ow, oh * ow, kh, kw,
            *x.stride(), w.stride(0), w.stride(2), w.stride(3), *y.stride(),
            *stride, *padding, *dilation,
            HAS_BIAS=bias is not None, RELU=bool(relu), WIDE_INDEX=_wide(x, w, y),
            ACC=_acc_type(x.dtype), BLOCK_P=bp, BLOCK_C=bc, BLOCK_T=bt,
        )


def _dw_backward_input(gy, w, gx, stride, padding, dilation) -> None:
    n, c, h, wd = gx.shape
    o, _, kh, kw = w.shape
    oh, ow = gy.shape[2], gy.shape[3]
    p = n * h * wd
    bp, bc, bt = _dw_blocks(gx, (o // c) * kh * kw)
    c_blocks = triton.cdiv(c, bc)
    with on_device_of(gy):
        _dw_dgrad_kernel[(triton.cdiv(p, bp) * c_blocks,)](
            gy, w, gx,
            p, c, c_blocks, o // c, oh, ow, wd, h * wd, kh, kw,
            *gy.stride(), w.stride(0), w.stride(2), w.stride(3), *gx.stride(),
            *stride, *padding, *dilation,
            WIDE_INDEX=_wide(gy, w, gx), ACC=_acc_type(gy.dtype),
            BLOCK_P=bp, BLOCK_C=bc, BLOCK_T=bt,
        )


def _dw_backward_weight(gy, x, gw, stride, padding, dilation) -> None:
    n, c, h, wd = x.shape
    o, _, kh, kw = gw.shape
    oh, ow = gy.shape[2], gy.shape[3]
    p = n * oh * ow
    if p == 0:
        gw.zero_()
        return
    q = kh * kw * o
    if _INTERPRETED:
        bp, bq = 64, min(1024, triton.next_power_of_2(q))
    else:
        bp, bq = (32, 32) if _channels_fast(x) else (128, 4)
    programs = triton.cdiv(q, bq)
    acc = _acc_type(x.dtype)
    splits, p_split = _split(p, programs, _target_programs(x), 65535)
    if splits == 1:
        out, out_strides = gw, (0, gw.stride(0), gw.stride(2), gw.stride(3))
    else:
        out = torch.empty((splits, o, 1, kh, kw), device=gw.device,
                          dtype=torch.float64 if acc == tl.float64 else torch.float32)
        out_strides = (out.stride(0), out.stride(1), out.stride(3), out.stride(4))
    wide = _wide(gy, x, gw, out)
    with on_device_of(x):
        _dw_wgrad_kernel[(programs, splits)](
            gy, x, out,
            p, p_split, o, q, o // c, h, wd, ow, oh * ow, kw,
            *gy.stride(), *x.stride(), *out_strides,
            *stride, *padding, *dilation,
            WIDE_INDEX=wide, ACC=acc, BLOCK_P=bp, BLOCK_Q=bq,
        )
        if splits > 1:
            total = gw.numel()
            _wgrad_reduce_kernel[(triton.cdiv(total, _REDUCE_BLOCK),)](
                out, gw, total, splits, kh * kw, kh * kw, kw, *gw.stride(),
                WIDE_INDEX=wide, ACC=acc, BLOCK=_REDUCE_BLOCK,
            )


def _acc_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    if dtype == torch.float32 and allow_tf32:
        return "tf32"
    return "ieee"


def _wide(*tensors: torch.Tensor) -> bool:
    """Whether an element offset (or count) may not fit in 32 bits: the largest offset of
    each tensor bounds any sum of its stride terms."""
    limit = 2**31 - 2**20
    for t in tensors:
        span = sum(abs(s) * (d - 1) for s, d in zip(t.stride(), t.shape) if d > 0)
        if t.numel() >= limit or span >= limit:
            return True
    return False


def _channels_fast(t: torch.Tensor) -> bool:
    """Whether dim 1 (channels) is the densest dimension of a 4-D tensor (channels_last)."""
    return t.shape[1] > 1 and t.stride(1) == 1 and t.stride(3) != 1


def _tap_major(t: torch.Tensor, per_group: int) -> bool:
    """K (or wgrad's columns) as kernel tap x channel block, rather than one flat index:
    for channels_last, where a channel block is contiguous, and enough channels per group
    that a block is not mostly padding."""
    return _channels_fast(t) and per_group >= 16


def _target_programs(t: torch.Tensor) -> int:
    """About how many programs keep the device busy: a few waves of its SMs."""
    if _INTERPRETED or not t.is_cuda:
        return 4  # small, but enough that the tests cover the split paths
    return 4 * torch.cuda.get_device_properties(t.device).multi_processor_count


def _split(total: int, tiles: int, target: int, max_splits: int) -> tuple[int, int]:
    """(splits, chunk): cut a reduction of `total` into chunks of a multiple of _K_CHUNK so
    that tiles * splits approaches `target`, each split keeping at least 4 chunks on a GPU."""
    chunks = max(1, triton.cdiv(total, _K_CHUNK))
    min_chunks = 1 if _INTERPRETED else 4
    splits = max(1, min(target // max(tiles, 1), chunks // min_chunks, max_splits))
    chunk = triton.cdiv(chunks, splits) * _K_CHUNK
    return max(1, triton.cdiv(total, chunk)), chunk


# The GEMM kernels put the group on a grid's third axis, which holds at most 65535 programs
# (CUDA's limit): more groups run in launches of at most that many, on views of their
# channels (the kernels take any strides).
_MAX_GRID_Z = 65535
MAX_GROUPS_PER_LAUNCH = _MAX_GRID_Z


def _group_runs(groups: int) -> list[tuple[int, int]]:
    """[(first, end)) runs of at most MAX_GROUPS_PER_LAUNCH groups."""
    step = MAX_GROUPS_PER_LAUNCH
    return [(g, min(groups, g + step)) for g in range(0, groups, step)]


def _channel_runs(groups: int, c: int, o: int) -> list[tuple[int, slice, slice]]:
    """(groups, input channels, output channels) of each run of _group_runs, for c input
    and o output channels."""
    cg, og = c // groups, o // groups
    return [(g1 - g0, slice(g0 * cg, g1 * cg), slice(g0 * og, g1 * og))
            for g0, g1 in _group_runs(groups)]


def forward(x, w, bias, y, stride, padding, dilation, groups, relu: bool,
            allow_tf32: bool) -> None:
    """y = conv2d(x, w) (+ bias) (then relu), written into y."""
    if y.numel() == 0:
        return
    if _depthwise(x, w, groups):
        _dw_forward(x, w, bias, y, stride, padding, dilation, relu)
        return
    if groups > MAX_GROUPS_PER_LAUNCH:
        for g, ci, co in _channel_runs(groups, x.shape[1], w.shape[0]):
            forward(x[:, ci], w[co], None if bias is None else bias[co], y[:, co], stride,
                    padding, dilation, g, relu, allow_tf32)
        return
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh, ow = y.shape[2], y.shape[3]
    og = o // groups
    m, k = n * oh * ow, cg * kh * kw

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(og, meta["BLOCK_N"]), groups

    with on_device_of(x):
        _forward_kernel[grid](
            x, w, bias if bias is not None else y, y,
            m, og, k, cg, h, wd, ow, oh * ow, kh, kw,
            *x.stride(), *w.stride(), *y.stride(),
            *stride, *padding, *dilation, _bucket(m),
            HAS_BIAS=bias is not None, RELU=bool(relu), CHANNELS_FAST=_channels_fast(x),
            TAP_MAJOR=_tap_major(x, cg),
            WIDE_INDEX=_wide(x, w, y), ACC=_acc_type(x.dtype),
            PRECISION=_precision(x.dtype, allow_tf32),
        )


def backward_input(gy, w, gx, stride, padding, dilation, groups, allow_tf32: bool) -> None:
    """gx = the gradient of conv2d with respect to its input, written into gx."""
    if gx.numel() == 0:
        return
    if _depthwise(gx, w, groups):
        _dw_backward_input(gy, w, gx, stride, padding, dilation)
        return
    if groups > MAX_GROUPS_PER_LAUNCH:
        for g, ci, co in _channel_runs(groups, gx.shape[1], w.shape[0]):
            backward_input(gy[:, co], w[co], gx[:, ci], stride, padding, dilation, g,
                           allow_tf32)
        return
    n, c, h, wd = gx.shape
    o, cg, kh, kw = w.shape
    oh, ow = gy.shape[2], gy.shape[3]
    og = o // groups
    sh, sw = stride
    hq, wq = triton.cdiv(h, sh), triton.cdiv(wd, sw)
    m = n * hq * wq  # rows of one stride phase

    def grid(meta):
        return sh * sw * triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cg, meta["BLOCK_N"]), groups

    with on_device_of(gy):
        _dgrad_kernel[grid](
            gy, w, gx,
            m, cg, og * kh * kw, og, oh, ow, h, wd, hq, wq, kh, kw,
            *gy.stride(), *w.stride(), *gx.stride(),
            *stride, *padding, *dilation,
            sh // math.gcd(sh, dilation[0]), sw // math.gcd(sw, dilation[1]), _bucket(m),
            CHANNELS_FAST=_channels_fast(gy), TAP_MAJOR=_tap_major(gy, og),
            WIDE_INDEX=_wide(gy, w, gx),
            ACC=_acc_type(gy.dtype), PRECISION=_precision(gy.dtype, allow_tf32),
        )


def backward_weight(gy, x, gw, stride, padding, dilation, groups, allow_tf32: bool) -> None:
    """gw = the gradient of conv2d with respect to its weight, written into gw."""
    if gw.numel() == 0:
        return
    if _depthwise(x, gw, groups):
        _dw_backward_weight(gy, x, gw, stride, padding, dilation)
        return
    if groups > MAX_GROUPS_PER_LAUNCH:
        for g, ci, co in _channel_runs(groups, x.shape[1], gw.shape[0]):
            backward_weight(gy[:, co], x[:, ci], gw[co], stride, padding, dilation, g,
                            allow_tf32)
        return
    n, c, h, wd = x.shape
    o, cg, kh, kw = gw.shape
    oh, ow = gy.shape[2], gy.shape[3]
    og = o // groups
    m, ng, k = og, cg * kh * kw, n * oh * ow
    tiles = triton.cdiv(m, 64) * triton.cdiv(ng, 64) * groups
    splits, k_split = _split(k, tiles, _target_programs(x),
                             max(1, _MAX_GRID_Z // groups))
    acc = _acc_type(x.dtype)
    if splits == 1:
        out, out_strides = gw, (0, *gw.stride())
    else:
        out = torch.empty((splits, o, cg, kh, kw), device=gw.device,
                          dtype=torch.float64 if acc == tl.float64 else torch.float32)
        out_strides = out.stride()
    wide = _wide(gy, x, gw, out)
    tap_major = _tap_major(x, cg)

    def grid(meta):
        # Tap-major column tiles: kernel tap x channel block.
        cols = kh * kw * triton.cdiv(cg, meta["BLOCK_N"]) if tap_major else triton.cdiv(
            ng, meta["BLOCK_N"])
        return triton.cdiv(m, meta["BLOCK_M"]), cols, groups * splits

    with on_device_of(x):
        _wgrad_kernel[grid](
            gy, x, out,
            m, ng, k, k_split, splits, cg, h, wd, ow, oh * ow, kh, kw,
            *gy.stride(), *x.stride(), *out_strides,
            *stride, *padding, *dilation, _bucket(k_split),
            CHANNELS_FAST=_channels_fast(x), TAP_MAJOR=tap_major, WIDE_INDEX=wide, ACC=acc,
            PRECISION=_precision(x.dtype, allow_tf32),
        )
        if splits > 1:
            total = gw.numel()
            _wgrad_reduce_kernel[(triton.cdiv(total, _REDUCE_BLOCK),)](
                out, gw, total, splits, cg * kh * kw, kh * kw, kw, *gw.stride(),
                WIDE_INDEX=wide, ACC=acc, BLOCK=_REDUCE_BLOCK,
            )


def bias_relu_backward(gy, y, g_out, grad_bias) -> None:
    """g = gy where y > 0, else 0 (when y, the ReLU's output, is given; a NaN y passes gy,
    as torch's relu backward does), written into g_out (when given);
    grad_bias[o] = sum of g over (n, i, j) (when given)."""
    if g_out is None and grad_bias is None:
        return
    n, o, oh, ow = gy.shape
    p = n * oh * ow
    if grad_bias is not None and (p == 0 or o == 0):
        grad_bias.zero_()
        return
    if p == 0 or o == 0:
        return
    acc = _acc_type(gy.dtype)
    o_blocks = triton.cdiv(o, _BIAS_BLOCK_O)
    splits, p_split = _split(p, o_blocks, _target_programs(gy), 65535)
    if grad_bias is None:
        part = gy  # never written
    elif splits == 1:
        part = grad_bias
    else:
        part = torch.empty((splits, o), device=gy.device,
                           dtype=torch.float64 if acc == tl.float64 else torch.float32)
    ys = y.stride() if y is not None else (0, 0, 0, 0)
    gs = g_out.stride() if g_out is not None else (0, 0, 0, 0)
    wide = _wide(gy, *(t for t in (y, g_out) if t is not None))
    with on_device_of(gy):
        _bias_relu_backward_kernel[(o_blocks, splits)](
            gy, y if y is not None else gy, g_out if g_out is not None else gy, part,
            o, p, p_split, ow, oh * ow,
            *gy.stride(), *ys, *gs,
            HAS_Y=y is not None, HAS_OUT=g_out is not None, HAS_BIAS=grad_bias is not None,
            WIDE_INDEX=wide, ACC=acc, BLOCK_P=_BIAS_BLOCK_P, BLOCK_O=_BIAS_BLOCK_O,
        )
        if grad_bias is not None and splits > 1:
            _bias_reduce_kernel[(triton.cdiv(o, _REDUCE_BLOCK),)](
                part, grad_bias, o, splits, ACC=acc, BLOCK=_REDUCE_BLOCK,
            )
