"""Fused scaled-dot-product attention in Triton (see csrc/attention_params.h for the math).

- forward: one program per (batch * head, block of BLOCK_M query rows); K / V tiles of
  BLOCK_N keys streamed through an online softmax in base 2 (log2(e) folded into the
  scale), float32 accumulation (float64 for float64), output and row log-sum-exp stored.
- backward: delta = rowsum(dO * out); dK / dV per (batch * kv head, key block), looping
  over the group's query heads and the query blocks; dQ per (batch * head, query block),
  looping over key blocks. Probabilities are recomputed from the saved lse. Each output
  element has one writer: deterministic.

Head dims are padded to a power of two (at least 16, the smallest tl.dot) with masked
loads. Masks are read through their 4 strides (0 along broadcast dimensions). Dropout uses
the integer hash of attention_params.h, so every backend drops the same elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlcv_fast.backend import triton_interpreted
from dlcv_fast.ops._common import autotune_bucket, device_constants, empty_output, on_device_of

LOG2E = 1.4426950408889634


def _configs(tiles):
    if triton_interpreted():  # no tuning through the interpreter: one small tile
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in tiles]


# (BLOCK_M, BLOCK_N, warps, stages): the usual FlashAttention-2 tiles, down to small ones
# that still fit head dim 256 in float32 / float64 (the autotuner drops configs that run out
# of registers or shared memory). Not tuned on a GPU yet.
_FWD_TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2),
              (32, 32, 4, 1), (16, 16, 4, 1)]
_BWD_TILES = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 1),
              (16, 16, 4, 1)]


# L and S as powers of two (autotune_bucket): a new length in a bucket reuses its tiles.
_TUNE_KEY = ["L_BUCKET", "S_BUCKET", "BLOCK_D", "BLOCK_DV", "CAUSAL"]


@triton.jit
def _fmix32(x):
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B).to(tl.uint32)
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35).to(tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _keep(seed, bh, rows, cols, threshold):
    """Whether (bh, row, col) survives dropout: the hash of attention_params.h."""
    # seed on the right: an argument equal to 1 reaches the kernel as a constexpr.
    head_key = _fmix32((((bh + 1).to(tl.uint32) * 0x9E3779B9).to(tl.uint32) + seed)
                       .to(tl.uint32))
    row_key = _fmix32(head_key ^ rows.to(tl.uint32))
    bits = _fmix32((row_key + (cols + 1).to(tl.uint32) * 0x27D4EB2F).to(tl.uint32)) >> 8
    return bits >= threshold


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # float32 / float64: no TF32 rounding
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _max_nan(a, b):
    """max for tl.reduce that keeps a NaN (tl.max drops it on a GPU): a NaN score must
    reach its row's softmax."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _program_tile(ROWS, BLOCK: tl.constexpr):
    """(batch * head, first row) of this program in a 1-D grid of batch * heads *
    cdiv(ROWS, BLOCK) programs, one head's row blocks adjacent (they share its keys in L2).
    A second grid axis would hold at most 65535 blocks: about a million rows of 16."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(ROWS, BLOCK)
    return pid // blocks, (pid % blocks) * BLOCK


@triton.jit
def _scores(q, kt, M_ptr, mask_off, s_mi, s_mj, offs_m, offs_n, L, S, scale_log2,
            MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr):
    """Scores in base 2, (rows, keys), -inf where masked, out of range or not causal."""
    s = _dot(q, kt, IEEE).to(ACC) * scale_log2
    live = (offs_m[:, None] < L) & (offs_n[None, :] < S)
    visible = offs_n[None, :] < S
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    ptrs = (M_ptr + mask_off + offs_m[:, None].to(tl.int64) * s_mi
            + offs_n[None, :].to(tl.int64) * s_mj)
    if MASK == 1:
        visible = visible & (tl.load(ptrs, mask=live, other=0) != 0)
    if MASK == 2:
        s = s + tl.load(ptrs, mask=live, other=0.0).to(ACC) * 1.4426950408889634
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _constants(C, scale_in, scale_log2_in, keep_in, F64: tl.constexpr):
    """(scale, scale * log2(e), 1 / (1 - dropout_p)). Python floats reach a kernel as float32:
    float64 reads them from the float64 tensor C; the other types take the arguments, so that
    no call copies from the host (which would wait for the GPU, and which a captured CUDA
    graph would repeat from a host buffer)."""
    if F64:
        scale = tl.load(C)
        scale_log2 = tl.load(C + 1)
        keep_scale = tl.load(C + 2)
    else:
        scale = scale_in
        scale_log2 = scale_log2_in
        keep_scale = keep_in
    return scale, scale_log2, keep_scale


@triton.autotune(configs=_configs(_FWD_TILES), key=_TUNE_KEY)
@triton.jit
def _forward_kernel(Q, K, V, M_ptr, O, LSE,
                    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_ob, s_oh, s_ol,
                    s_mb, s_mh, s_mi, s_mj,
                    H, GROUP, L, S, D, DV, C, scale_in, scale_log2_in, keep_in, seed, threshold,
                    L_BUCKET, S_BUCKET,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                    F64: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, start_m = _program_tile(L, BLOCK_M)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    _, scale_log2, keep_scale = _constants(C, scale_in, scale_log2_in, keep_in, F64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    k_base = K + b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + hk.to(tl.int64) * s_vh
    mask_off = b.to(tl.int64) * s_mb + h.to(tl.int64) * s_mh
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * s_ql + offs_d[None, :],
                mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    end = S
    if CAUSAL:
        end = tl.minimum(S, start_m + BLOCK_M)
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * s_kl + offs_d[:, None],
                     mask=(offs_n[None, :] < S) & (offs_d[:, None] < D), other=0.0)
        s = _scores(q, kt, M_ptr, mask_off, s_mi, s_mj, offs_m, offs_n, L, S, scale_log2,
                    MASK, CAUSAL, IEEE, ACC)
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_nan), propagate_nan=tl.PropagateNan.ALL)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf = NaN
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, bh, offs_m[:, None], offs_n[None, :], threshold),
                         p * keep_scale, 0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * s_vl + offs_dv[None, :],
                    mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE).to(ACC)
        m_i = m_new
    # A fully masked row (l = 0) gives zeros and lse = -inf; a NaN l (a NaN or +inf score)
    # NaN for both.
    dead = l_i == 0
    out = tl.where(dead[:, None], 0.0, acc / tl.where(dead, 1.0, l_i)[:, None])
    lse = tl.where(dead, float("-inf"),
                   (m_i + tl.log2(tl.where(dead, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = (O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh
              + offs_m[:, None].to(tl.int64) * s_ol + offs_dv[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < L) & (offs_dv[None, :] < DV))
    tl.store(LSE + bh.to(tl.int64) * L + offs_m, lse.to(LSE.dtype.element_ty), mask=offs_m < L)


@triton.jit
def _delta_kernel(DO, O, DELTA, L, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                  ACC: tl.constexpr):
    """delta = rowsum(dO * out); dO and out dense (batch * heads, L, DV)."""
    bh, start_m = _program_tile(L, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    live = (offs_m[:, None] < L) & (offs_dv[None, :] < DV)
    off = bh.to(tl.int64) * L * DV + offs_m[:, None].to(tl.int64) * DV + offs_dv[None, :]
    # In float64: ds = p (dp - delta) cancels, and a float32 sum's rounding error would go
    # straight into every ds of the row.
    g = tl.load(DO + off, mask=live, other=0.0).to(tl.float64)
    o = tl.load(O + off, mask=live, other=0.0).to(tl.float64)
    tl.store(DELTA + bh.to(tl.int64) * L + offs_m, tl.sum(g * o, 1).to(ACC), mask=offs_m < L)


@triton.jit
def _probabilities(s, lse_log2):
    """exp2(s - lse) with the row's lse in base 2; 0 in fully masked rows (lse = -inf) and
    for masked scores, also in a row whose lse is NaN."""
    safe = tl.where(lse_log2 == float("-inf"), 0.0, lse_log2)
    return tl.where(s == float("-inf"), 0.0, tl.exp2(s - safe))


@triton.jit
def _score_grads(p, dp, delta):
    """ds = p (dp - delta); 0 where p is (a masked score passes no gradient, even when the
    row's delta is NaN)."""
    return tl.where(p == 0, 0.0, p * (dp - delta[:, None]))


@triton.autotune(configs=_configs(_BWD_TILES), key=_TUNE_KEY)
@triton.jit
def _dkdv_kernel(Q, K, V, M_ptr, DO, LSE, DELTA, DK, DV_ptr,
                 s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
                 s_mb, s_mh, s_mi, s_mj,
                 H, HKV, GROUP, L, S, D, DV, C, scale_in, scale_log2_in, keep_in, seed,
                 threshold, L_BUCKET, S_BUCKET,
                 MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                 F64: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bhk, start_n = _program_tile(S, BLOCK_N)
    b = bhk // HKV
    hk = bhk % HKV
    scale, scale_log2, keep_scale = _constants(C, scale_in, scale_log2_in, keep_in, F64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(K + b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh
                + offs_n[:, None].to(tl.int64) * s_kl + offs_d[None, :],
                mask=(offs_n[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b.to(tl.int64) * s_vb + hk.to(tl.int64) * s_vh
                + offs_n[:, None].to(tl.int64) * s_vl + offs_dv[None, :],
                mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
    first = 0
    if CAUSAL:  # query rows before start_n see none of these keys
        first = (tl.minimum(start_n, L) // BLOCK_M) * BLOCK_M
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
        do_base = DO + bh.to(tl.int64) * L * DV
        mask_off = b.to(tl.int64) * s_mb + h.to(tl.int64) * s_mh
        for start_m in range(first, L, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = tl.load(q_base + offs_m[:, None].to(tl.int64) * s_ql + offs_d[None, :],
                        mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), other=0.0)
            do = tl.load(do_base + offs_m[:, None].to(tl.int64) * DV + offs_dv[None, :],
                         mask=(offs_m[:, None] < L) & (offs_dv[None, :] < DV), other=0.0)
            lse = tl.load(LSE + bh.to(tl.int64) * L + offs_m, mask=offs_m < L,
                          other=float("-inf")).to(ACC) * 1.4426950408889634
            delta = tl.load(DELTA + bh.to(tl.int64) * L + offs_m, mask=offs_m < L,
                            other=0.0).to(ACC)
            s = _scores(q, tl.trans(k), M_ptr, mask_off, s_mi, s_mj, offs_m, offs_n, L, S,
                        scale_log2, MASK, CAUSAL, IEEE, ACC)
            p = _probabilities(s, lse[:, None])  # (BLOCK_M, BLOCK_N)
            dp = _dot(do, tl.trans(v), IEEE).to(ACC)
            pz = p
            if DROPOUT:
                z = tl.where(_keep(seed, bh, offs_m[:, None], offs_n[None, :], threshold),
                             keep_scale, 0.0)
                pz = p * z
                dp = dp * z
            ds = _score_grads(p, dp, delta)
            dv += _dot(tl.trans(pz.to(do.dtype)), do, IEEE).to(ACC)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE).to(ACC)
    base = bhk.to(tl.int64) * S
    tl.store(DK + (base + offs_n[:, None]) * D + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty),
             mask=(offs_n[:, None] < S) & (offs_d[None, :] < D))
    tl.store(DV_ptr + (base + offs_n[:, None]) * DV + offs_dv[None, :],
             dv.to(DV_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV))


@triton.autotune(configs=_configs(_BWD_TILES), key=_TUNE_KEY)
@triton.jit
def _dq_kernel(Q, K, V, M_ptr, DO, LSE, DELTA, DQ,
               s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl,
               s_mb, s_mh, s_mi, s_mj,
               H, GROUP, L, S, D, DV, C, scale_in, scale_log2_in, keep_in, seed, threshold,
               L_BUCKET, S_BUCKET,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
               F64: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh, start_m = _program_tile(L, BLOCK_M)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    scale, scale_log2, keep_scale = _constants(C, scale_in, scale_log2_in, keep_in, F64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
                + offs_m[:, None].to(tl.int64) * s_ql + offs_d[None, :],
                mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + bh.to(tl.int64) * L * DV + offs_m[:, None].to(tl.int64) * DV
                 + offs_dv[None, :],
                 mask=(offs_m[:, None] < L) & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * L + offs_m, mask=offs_m < L,
                  other=float("-inf")).to(ACC) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * L + offs_m, mask=offs_m < L, other=0.0).to(ACC)
    k_base = K + b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + hk.to(tl.int64) * s_vh
    mask_off = b.to(tl.int64) * s_mb + h.to(tl.int64) * s_mh
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    end = S
    if CAUSAL:
        end = tl.minimum(S, start_m + BLOCK_M)
    for start_n in range(0, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * s_kl + offs_d[None, :],
                    mask=(offs_n[:, None] < S) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * s_vl + offs_dv[None, :],
                    mask=(offs_n[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
        s = _scores(q, tl.trans(k), M_ptr, mask_off, s_mi, s_mj, offs_m, offs_n, L, S,
                    scale_log2, MASK, CAUSAL, IEEE, ACC)
        p = _probabilities(s, lse[:, None])
        dp = _dot(do, tl.trans(v), IEEE).to(ACC)
        if DROPOUT:
            dp = tl.where(_keep(seed, bh, offs_m[:, None], offs_n[None, :], threshold),
                          dp * keep_scale, 0.0)
        ds = _score_grads(p, dp, delta)
        dq += _dot(ds.to(k.dtype), k, IEEE).to(ACC)
    tl.store(DQ + (bh.to(tl.int64) * L + offs_m[:, None]) * D + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < L) & (offs_d[None, :] < D))


# --- launchers ------------------------------------------------------------------------------

def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _common(q, k, v, mask, dropout_p, scale, seed):
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    if mask is None:
        mask_kind, m, m_strides = 0, q, (0, 0, 0, 0)
    else:
        mask_kind = 1 if mask.dtype == torch.bool else 2
        m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        m_strides = tuple(mask.stride())
    threshold = int(round(dropout_p * 2**24))
    values = [scale, scale * LOG2E, 1.0 / (1.0 - dropout_p)]
    f64 = q.dtype == torch.float64  # float64 takes them from a tensor (_constants)
    consts = (device_constants(values, torch.float64, q.device) if f64 else q, *values)
    buckets = (autotune_bucket(q.shape[2]), autotune_bucket(k.shape[2]))
    return dict(acc=acc, mask_kind=mask_kind, m=m, m_strides=m_strides, buckets=buckets,
                dropout=dropout_p > 0, threshold=threshold, consts=consts, f64=f64,
                seed=int(seed) & 0xFFFFFFFF, ieee=q.dtype in (torch.float32, torch.float64))


def _dense_last(t):
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def forward(q, k, v, mask, dropout_p: float, is_causal: bool, scale: float, seed: int):
    """(out, lse) of 4-D q (B, H, L, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv); mask None or
    already expanded (a view) to (B, H, L, S)."""
    q, k, v = _dense_last(q), _dense_last(k), _dense_last(v)
    B, H, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    out = empty_output((B, H, L, Dv), q)
    lse = empty_output((B, H, L), q, dtype=torch.float64 if q.dtype == torch.float64
                       else torch.float32)
    if out.numel() == 0:
        return out, lse
    c = _common(q, k, v, mask, dropout_p, scale, seed)
    grid = lambda meta: (B * H * triton.cdiv(L, meta["BLOCK_M"]),)  # noqa: E731
    with on_device_of(q):
        _forward_kernel[grid](
            q, k, v, c["m"], out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *out.stride()[:3], *c["m_strides"], H, H // Hkv, L, S, D, Dv, *c["consts"],
            c["seed"], c["threshold"], *c["buckets"], MASK=c["mask_kind"], CAUSAL=is_causal,
            DROPOUT=c["dropout"], F64=c["f64"], IEEE=c["ieee"], ACC=c["acc"],
            BLOCK_D=_block(D), BLOCK_DV=_block(Dv))
    return out, lse


def backward(grad_out, q, k, v, out, lse, mask, dropout_p: float, is_causal: bool,
             scale: float, seed: int):
    """(dq, dk, dv), dense, in the shapes of q, k, v."""
    q, k, v = _dense_last(q), _dense_last(k), _dense_last(v)
    B, H, L, D = q.shape
    Hkv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    dq = empty_output((B, H, L, D), q)
    dk = empty_output((B, Hkv, S, D), q)
    dv = empty_output((B, Hkv, S, Dv), q)
    delta = torch.empty_like(lse)
    c = _common(q, k, v, mask, dropout_p, scale, seed)
    common = dict(MASK=c["mask_kind"], CAUSAL=is_causal, DROPOUT=c["dropout"], F64=c["f64"],
                  IEEE=c["ieee"], ACC=c["acc"], BLOCK_D=_block(D), BLOCK_DV=_block(Dv))
    with on_device_of(q):
        if B * H * L > 0:
            _delta_kernel[(B * H * triton.cdiv(L, 16),)](grad_out, out, delta, L, Dv, BLOCK_M=16,
                                                        BLOCK_DV=_block(Dv), ACC=c["acc"])
        if B * Hkv * S > 0:
            _dkdv_kernel[lambda meta: (B * Hkv * triton.cdiv(S, meta["BLOCK_N"]),)](
                q, k, v, c["m"], grad_out, lse, delta, dk, dv, *q.stride()[:3],
                *k.stride()[:3], *v.stride()[:3], *c["m_strides"], H, Hkv, H // Hkv, L, S, D,
                Dv, *c["consts"], c["seed"], c["threshold"], *c["buckets"], **common)
        if B * H * L > 0:
            _dq_kernel[lambda meta: (B * H * triton.cdiv(L, meta["BLOCK_M"]),)](
                q, k, v, c["m"], grad_out, lse, delta, dq, *q.stride()[:3], *k.stride()[:3],
                *v.stride()[:3], *c["m_strides"], H, H // Hkv, L, S, D, Dv, *c["consts"],
                c["seed"], c["threshold"], *c["buckets"], **common)
    return dq, dk, dv


__all__ = ["forward", "backward"]
