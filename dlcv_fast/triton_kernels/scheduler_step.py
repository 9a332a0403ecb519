"""One DDPM or DDIM sampler step in Triton: the elementwise pass of csrc/step_params.h.

The 13 coefficients arrive as a float64 tensor (Triton would pass Python floats as
float32), read once per program and cast to the arithmetic type."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlcv_fast.ops._common import device_constants, empty_output, on_device_of

BLOCK = 1024  # not tuned on a GPU yet


@triton.jit
def _step_kernel(m_ptr, s_ptr, z_ptr, v_ptr, th_ptr, coef_ptr, prev_ptr, x0_ptr, total, inner,
                 CLIP: tl.constexpr, VARIANCE: tl.constexpr, RECOMPUTE: tl.constexpr,
                 HAS_NOISE: tl.constexpr, ACC: tl.constexpr, WIDE_INDEX: tl.constexpr,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if WIDE_INDEX:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    s = tl.load(s_ptr + offs, mask=live, other=0.0).to(ACC)
    m = tl.load(m_ptr + offs, mask=live, other=0.0).to(ACC)
    x0 = tl.load(coef_ptr + 0).to(ACC) * s + tl.load(coef_ptr + 1).to(ACC) * m
    eps = tl.load(coef_ptr + 2).to(ACC) * s + tl.load(coef_ptr + 3).to(ACC) * m
    # Clamps by comparison, so that a NaN passes as in torch.clamp (tl.minimum and
    # tl.maximum would turn it into a bound); thresholding then scales by 1 / th, or makes
    # the sample NaN for a threshold that is not positive (as csrc/step_params.h).
    if CLIP == 1:
        r = tl.load(coef_ptr + 12).to(ACC)
        x0 = tl.where(x0 < -r, -r, tl.where(x0 > r, r, x0))
    if CLIP == 2:
        th = tl.load(th_ptr + offs // inner, mask=live, other=1.0).to(ACC)
        x0 = (tl.where(x0 < -th, -th, tl.where(x0 > th, th, x0))
              * (1.0 / tl.where(th > 0, th, float("nan"))))
    if RECOMPUTE:
        eps = tl.load(coef_ptr + 4).to(ACC) * s + tl.load(coef_ptr + 5).to(ACC) * x0
    out = (tl.load(coef_ptr + 6).to(ACC) * x0 + tl.load(coef_ptr + 7).to(ACC) * s
           + tl.load(coef_ptr + 8).to(ACC) * eps)
    if HAS_NOISE:
        z = tl.load(z_ptr + offs, mask=live, other=0.0).to(ACC)
        if VARIANCE == 0:
            sigma = tl.load(coef_ptr + 9).to(ACC)
        elif VARIANCE == 1:
            sigma = tl.sqrt(tl.load(v_ptr + offs, mask=live, other=1.0).to(ACC))
        else:
            frac = (tl.load(v_ptr + offs, mask=live, other=0.0).to(ACC) + 1.0) / 2.0
            log_var = (frac * tl.load(coef_ptr + 11).to(ACC)
                       + (1.0 - frac) * tl.load(coef_ptr + 10).to(ACC))
            sigma = tl.exp(log_var / 2.0)
        out += sigma * z
    tl.store(prev_ptr + offs, out.to(prev_ptr.dtype.element_ty), mask=live)
    tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=live)


def step(m, s, z, v, thresholds, coefficients, clip: int, variance_mode: int,
         recompute_eps: bool):
    """(prev, x0); tensors dense in one memory format, arguments checked
    (dlcv_fast.ops.scheduler_step)."""
    from torch._prims_common import suggest_memory_format

    fmt = suggest_memory_format(s)
    prev = empty_output(s.shape, s, memory_format=fmt)
    x0 = empty_output(s.shape, s, memory_format=fmt)
    total = s.numel()
    if total:
        coef = device_constants(coefficients, torch.float64, s.device)
        with on_device_of(s):
            _step_kernel[(triton.cdiv(total, BLOCK),)](
                m, s, z if z is not None else s, v if v is not None else s,
                thresholds if thresholds is not None else coef, coef, prev, x0, total,
                total // s.shape[0], CLIP=clip, VARIANCE=variance_mode, RECOMPUTE=recompute_eps,
                HAS_NOISE=z is not None,
                ACC=tl.float64 if s.dtype == torch.float64 else tl.float32,
                WIDE_INDEX=total >= 2**31 - 2**20, BLOCK=BLOCK)
    return prev, x0
