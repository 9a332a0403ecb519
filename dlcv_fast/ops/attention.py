"""Fused scaled-dot-product attention: argument checks, the registered ops of every backend,
their fake implementations and autograd formulas, and the functional entry points.

Ops (namespace ``dlcv_fast``), on 4-D tensors:

- ``sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, seed) -> (out, lse)``
  and ``sdpa_backward(grad_out, query, key, value, out, lse, attn_mask, dropout_p,
  is_causal, scale, seed) -> (grad_query, grad_key, grad_value)``: the C++ kernels, CPU and
  CUDA (csrc/attention.cpp).
- ``sdpa_triton`` and ``sdpa_backward_triton``: the same schemas on the Triton kernels.

query is (B, H, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev) with H a multiple of Hkv
(grouped-query attention without copying K / V); attn_mask, bool (True: attend) or float32
or query's dtype (added to the scores; PyTorch's rule), broadcasts to (B, H, L, S) and is
read through its strides. lse (B, H, L) is the natural-log log-sum-exp of each row's scores
(float32, or float64 for float64 inputs). Dropout is a hash of (seed, b * H + h, i, j)
(:func:`dropout_keep_mask`), the same in every backend, so the backward pass regenerates the
forward pass's mask.

A row that attends to nothing (its mask all False or -inf, or no key at all) gives zeros,
lse = -inf and zero gradients, as PyTorch 2.14's SDPA gives on the CPU (zeros and zero
gradients, every dtype and CPU backend; tests/test_attention.py checks it). A NaN among a
row's visible scores, or a +inf score, makes the row's output and lse NaN, and the gradients
it reaches, as the plain formula does. A masked score passes no gradient of its own;
whether a masked key's dK or dV still turns NaN through 0 x NaN in a product with a NaN row
depends on the tiles a backend skips.

The backward pass is deterministic in every backend: each gradient element is computed by
one program (dK / dV per key block, dQ per query block), never accumulated with atomics. (On
the CPU the schedule, hence the last bits, depends on the thread count; in Triton on the
tiles the autotuner picked, so two processes that pick different tiles may differ in the
last bits.)
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

from dlcv_fast import backend
from dlcv_fast.ops import _func
from dlcv_fast.ops._autocast import cast_for_autocast, register_lower_precision
from dlcv_fast.ops._common import refuse_forward_ad

_OP = "scaled_dot_product_attention"
MAX_HEAD_DIM = 256
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _shape(t: Tensor) -> list:
    return list(t.shape)


def check_args(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
               dropout_p: float, scale: float, op: str = _OP) -> None:
    """The checks of the C++ entry points (csrc/attention.cpp), with the same messages, on
    the 4-D tensors of the registered ops."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, but got {type(t).__name__}")
    if query.dtype not in _FLOATS:
        raise TypeError(f"{op}: query must be float32, float64, float16 or bfloat16, but got "
                        f"{query.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.device != query.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but query is on {query.device}; "
                               "expected both on the same device")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but query has {query.dtype}")
    for name, t, dims in (("query", query, "(batch, heads, L, E)"),
                          ("key", key, "(batch, kv_heads, S, E)"),
                          ("value", value, "(batch, kv_heads, S, Ev)")):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D {dims}, but got shape {_shape(t)}")
    B, H, L, D = query.shape
    Hkv, S, Dv = key.shape[1], key.shape[2], value.shape[3]
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(f"{op}: query, key and value must have the same batch size, but got "
                         f"{B}, {key.shape[0]} and {value.shape[0]}")
    if value.shape[1] != Hkv:
        raise ValueError(f"{op}: key and value must have the same number of heads, but got "
                         f"{Hkv} and {value.shape[1]}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{op}: query's heads ({H}) must be a multiple of key's and value's "
                         f"heads ({Hkv})")
    if value.shape[2] != S:
        raise ValueError(f"{op}: key and value must have the same length S, but got {S} and "
                         f"{value.shape[2]}")
    if key.shape[3] != D:
        raise ValueError(f"{op}: key's head dim ({key.shape[3]}) must equal query's ({D})")
    if not (1 <= D <= MAX_HEAD_DIM and 1 <= Dv <= MAX_HEAD_DIM):
        raise ValueError(f"{op}: head dims must lie in [1, {MAX_HEAD_DIM}], but got E={D} and "
                         f"Ev={Dv}")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"{op}: dropout_p must lie in [0, 1), but got {dropout_p}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, but got {scale}")
    if attn_mask is not None:
        if attn_mask.device != query.device:
            raise RuntimeError(f"{op}: attn_mask is on {attn_mask.device} but query is on "
                               f"{query.device}; expected both on the same device")
        # PyTorch's rule: a float32 mask goes with any query dtype.
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise TypeError(f"{op}: attn_mask must be bool, float32 or query's dtype "
                            f"{query.dtype}, but got {attn_mask.dtype}")
        target = (B, H, L, S)
        ok = attn_mask.dim() <= 4 and all(
            s == 1 or s == t for s, t in zip(reversed(attn_mask.shape), reversed(target)))
        if not ok:
            raise ValueError(f"{op}: attn_mask of shape {_shape(attn_mask)} cannot be broadcast "
                             f"to (batch, heads, L, S) = ({B}, {H}, {L}, {S})")


def _stats_dtype(query: Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _check_backward_args(grad_out, query, key, value, out, lse, attn_mask, dropout_p, scale):
    op = "scaled_dot_product_attention_backward"
    check_args(query, key, value, attn_mask, dropout_p, scale)
    B, H, L, _ = query.shape
    out_shape = [B, H, L, value.shape[3]]
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.device != query.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but query is on {query.device}; "
                               "expected both on the same device")
        if t.dtype != query.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but query has {query.dtype}")
        if _shape(t) != out_shape:
            raise ValueError(f"{op}: {name} must have shape {out_shape}, but got {_shape(t)}")
    if lse.device != query.device:
        raise RuntimeError(f"{op}: lse is on {lse.device} but query is on {query.device}; "
                           "expected both on the same device")
    if lse.dtype != _stats_dtype(query):
        raise TypeError(f"{op}: lse must be {_stats_dtype(query)}, but got {lse.dtype}")
    if _shape(lse) != [B, H, L]:
        raise ValueError(f"{op}: lse must have shape {[B, H, L]}, but got {_shape(lse)}")


# --- fake (meta) implementations ------------------------------------------------------------

def _forward_fake(query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
    check_args(query, key, value, attn_mask, dropout_p, scale)
    B, H, L, _ = query.shape
    out = query.new_empty((B, H, L, value.shape[3]))
    lse = query.new_empty((B, H, L), dtype=_stats_dtype(query))
    return out, lse


def _backward_fake(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale,
                   seed):
    return (query.new_empty(query.shape), key.new_empty(key.shape),
            value.new_empty(value.shape))


torch.library.register_fake("dlcv_fast::sdpa")(_forward_fake)
torch.library.register_fake("dlcv_fast::sdpa_backward")(_backward_fake)


# --- the Triton backend ---------------------------------------------------------------------

def _expanded_mask(attn_mask, query, key):
    if attn_mask is None:
        return None
    B, H, L, _ = query.shape
    return attn_mask.expand(B, H, L, key.shape[2])  # a view: stride 0 where broadcast


@torch.library.custom_op("dlcv_fast::sdpa_triton", mutates_args=())
def _sdpa_triton(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None,
                 dropout_p: float, is_causal: bool, scale: float,
                 seed: int) -> tuple[Tensor, Tensor]:
    from dlcv_fast.triton_kernels import attention as kernels

    check_args(query, key, value, attn_mask, dropout_p, scale)
    return kernels.forward(query, key, value, _expanded_mask(attn_mask, query, key), dropout_p,
                           is_causal, scale, seed)


@torch.library.custom_op("dlcv_fast::sdpa_backward_triton", mutates_args=())
def _sdpa_backward_triton(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                          out: Tensor, lse: Tensor, attn_mask: Tensor | None, dropout_p: float,
                          is_causal: bool, scale: float,
                          seed: int) -> tuple[Tensor, Tensor, Tensor]:
    from dlcv_fast.triton_kernels import attention as kernels

    _check_backward_args(grad_out, query, key, value, out, lse, attn_mask, dropout_p, scale)
    return kernels.backward(grad_out, query, key, value, out, lse,
                            _expanded_mask(attn_mask, query, key), dropout_p, is_causal, scale,
                            seed)


_sdpa_triton.register_fake(_forward_fake)
_sdpa_backward_triton.register_fake(_backward_fake)


# --- autograd (both backends) ---------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, attn_mask)
    ctx.params = (dropout_p, is_causal, scale, seed)
    ctx.mark_non_differentiable(lse)


def _weights_and_ds(grad_out, query, key, value, attn_mask, dropout_p, is_causal, scale, seed,
                    out=None, lse=None):
    """The attention weights P = exp(S - lse) (with dropout's mask and 1 / (1 - p) applied),
    and the scores' gradient dS = P * (dP - rowsum(dO * O)), dP = dO V^T (likewise dropped),
    as (B, H, L, S) tensors (H the query's heads) in differentiable PyTorch ops, float32
    (float64 for float64 inputs), and the key with its heads repeated for the query's. From
    the forward's out and lse where given; else from lse and O recomputed, so that the
    results are functions of the arguments alone, which autograd differentiates again."""
    B, H, L, _ = query.shape
    S, group = key.shape[2], H // key.shape[1]
    f = torch.float64 if query.dtype == torch.float64 else torch.float32
    k = key.to(f).repeat_interleave(group, dim=1)
    v = value.to(f).repeat_interleave(group, dim=1)
    scores = query.to(f) @ k.transpose(-1, -2) * scale
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool
                  else scores + attn_mask.to(f))
    if is_causal:
        above = torch.ones(L, S, dtype=torch.bool, device=query.device).triu(1)
        scores = scores.masked_fill(above, -math.inf)
    # A row attending to nothing has lse = -inf and no weights; where() before logsumexp()
    # and exp() keeps its NaN out of the gradients.
    if lse is None:
        dead = (scores == -math.inf).all(-1, keepdim=True)
        lse = torch.where(dead, -math.inf,
                          torch.logsumexp(torch.where(dead, 0.0, scores), -1, keepdim=True))
    else:
        lse = lse.to(f).unsqueeze(-1)
    p = torch.exp(torch.where(lse == -math.inf, -math.inf, scores - lse))
    dp = grad_out.to(f) @ v.transpose(-1, -2)
    p_dropped = p
    if dropout_p > 0:
        keep = dropout_keep_mask(seed, B, H, L, S, dropout_p, query.device)
        dp = torch.where(keep, dp / (1.0 - dropout_p), 0.0)
        p_dropped = torch.where(keep, p / (1.0 - dropout_p), 0.0)
    out = p_dropped @ v if out is None else out.to(f)
    delta = (grad_out.to(f) * out).sum(-1, keepdim=True)
    ds = torch.where(p == 0, 0.0, p * (dp - delta))  # masked scores: 0, also against an inf dP
    return p_dropped, ds, k


def _mask_grad(grad_out, query, key, value, out, lse, attn_mask, *params):
    """The gradient of a floating attn_mask, dS summed over the dimensions the mask
    broadcasts along. The (B, H, L, S) scores are materialised: a mask that learns (a
    relative-position bias) is that size anyway, up to its broadcast dimensions. Where a
    graph is recorded (backward with create_graph), lse and O are recomputed, so that the
    second derivative takes the paths through them; else the forward's are read (the
    recomputation cost 18% of a backward pass, 4x8x512x512 float32 on 2 cores)."""
    if torch.is_grad_enabled():
        out = lse = None
    ds = _weights_and_ds(grad_out, query, key, value, attn_mask, *params, out=out, lse=lse)[1]
    return ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype)


def _backward_math(grad_out, query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
    """The backward kernels' (dQ, dK, dV) in differentiable PyTorch ops: what the second
    derivative goes through."""
    p, ds, k = _weights_and_ds(grad_out, query, key, value, attn_mask, dropout_p, is_causal,
                               scale, seed)
    B, Hkv, S, E = key.shape
    group = query.shape[1] // Hkv
    f = ds.dtype
    dq = ds @ k * scale
    dk = (ds.transpose(-1, -2) @ query.to(f) * scale).view(B, Hkv, group, S, E).sum(2)
    dv = (p.transpose(-1, -2) @ grad_out.to(f)).view(B, Hkv, group, S, value.shape[3]).sum(2)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


def _backward_with(backward_op):
    def backward(ctx, grad_out, _grad_lse):
        query, key, value, out, lse, attn_mask = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out, query, key, value, out, lse, attn_mask, *ctx.params)
        dmask = None
        if ctx.needs_input_grad[3]:
            dmask = _mask_grad(grad_out, query, key, value, out, lse, attn_mask, *ctx.params)
        return dq, dk, dv, dmask, None, None, None, None

    return backward




def _setup_backward_context(ctx, inputs, output):
    grad_out, query, key, value, _out, _lse, attn_mask = inputs[:7]
    ctx.save_for_backward(grad_out, query, key, value, attn_mask)
    ctx.params = inputs[7:]


def _double_backward(ctx, *grads):
    """The second derivative: the backward pass's (dQ, dK, dV) differentiated through
    _backward_math in PyTorch ops (the scores materialised, as for the mask's gradient);
    itself differentiable, so every higher order follows. out and lse get no gradient:
    _backward_math recomputes them, so its derivatives in query, key and value already take
    the paths through them."""
    tensors = ctx.saved_tensors  # grad_out, query, key, value, attn_mask
    wrt = [i for i, n in enumerate((0, 1, 2, 3, 6)) if ctx.needs_input_grad[n]]
    pairs = [(d, g) for d, g in enumerate(grads) if g is not None]
    result = [None] * 5
    if wrt and pairs:
        def backward_of(*inputs):
            args = list(tensors)
            for i, t in zip(wrt, inputs):
                args[i] = t
            outputs = _backward_math(*args, *ctx.params)
            return tuple(outputs[d] for d, _ in pairs)

        # torch.func.vjp differentiates on a level of its own: autograd.grad here would also
        # walk the graph behind grad_out, which this backward pass is part of.
        _, vjp = torch.func.vjp(backward_of, *(tensors[i] for i in wrt))
        for i, grad in zip(wrt, vjp(tuple(g for _, g in pairs))):
            result[i] = grad
    grad_out, query, key, value, attn_mask = result
    return grad_out, query, key, value, None, None, attn_mask, None, None, None, None


# Batching rules (torch.vmap): the vmapped samples fold into the batch dim. A mask that
# has a batch dim is expanded over it first (a copy). Dropout's mask depends on the seed and
# the batch index: one call per sample with the call's seed gives every sample the same
# masks (vmap's randomness='same'), which the mask's gradient and the double backward, in
# PyTorch ops on the vmapped tensors, regenerate. Folded, each sample would get masks of its
# own ('different'), but those two would not see them: refused.

def _folded_mask(attn_mask, dim, n: int, batch: int):
    if attn_mask is None or (dim is None and (attn_mask.dim() < 4 or attn_mask.shape[0] == 1)):
        return attn_mask
    m = _func.batched(attn_mask, dim, n)
    m = m.reshape(n, *[1] * (5 - m.dim()), *m.shape[1:])  # (n, 4 dims)
    return m.expand(n, batch, *m.shape[2:]).flatten(0, 1)


def _forward_vmap_with(op):
    def rule(info, in_dims, query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
        args = (query, key, value, attn_mask, dropout_p, is_causal, scale, seed)
        if dropout_p > 0:
            if info.randomness != "same":
                raise RuntimeError(
                    f"{_OP}: dropout under torch.vmap needs randomness='same' (one dropout mask "
                    f"for every sample), but got randomness='{info.randomness}'")
            return _func.looped(op, info, in_dims, *args)
        n = info.batch_size
        q, k, v = (_func.batched(t, d, n) for t, d in zip(args[:3], in_dims))
        out, lse = op(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                      _folded_mask(attn_mask, in_dims[3], n, q.shape[1]), *args[4:])
        return (out.unflatten(0, q.shape[:2]), lse.unflatten(0, q.shape[:2])), (0, 0)

    return rule


def _backward_vmap_with(op):
    def rule(info, in_dims, *args):
        if args[7] > 0:  # dropout_p: every sample has the forward's masks
            return _func.looped(op, info, in_dims, *args)
        n = info.batch_size
        tensors = [_func.batched(t, d, n) for t, d in zip(args[:6], in_dims)]
        batch = tensors[0].shape[:2]
        grads = op(*(t.flatten(0, 1) for t in tensors),
                   _folded_mask(args[6], in_dims[6], n, batch[1]), *args[7:])
        return tuple(g.unflatten(0, batch) for g in grads), (0, 0, 0)

    return rule


_OPS = {"cpp": (_func.Op(torch.ops.dlcv_fast.sdpa), _func.Op(torch.ops.dlcv_fast.sdpa_backward)),
        "triton": (_func.Op(_sdpa_triton), _func.Op(_sdpa_backward_triton))}
for _forward, _backward in _OPS.values():
    _func.register_autograd(_forward, _backward_with(_backward), _setup_context)
    _func.register_autograd(_backward, _double_backward, _setup_backward_context)
    _func.register_vmap(_forward, _forward_vmap_with(_forward))
    _func.register_vmap(_backward, _backward_vmap_with(_backward))
for _name in ("sdpa", "sdpa_triton"):  # autocast: in its dtype, as torch's SDPA
    register_lower_precision(_name)

_FORWARD = {"cpu": _OPS["cpp"][0], "cuda": _OPS["cpp"][0], "triton": _OPS["triton"][0]}


# --- dropout --------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF


def _fmix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def dropout_keep_mask(seed: int, batch: int, heads: int, q_len: int, kv_len: int,
                      dropout_p: float, device=None) -> Tensor:
    """The (batch, heads, L, S) bool mask of the elements that dropout keeps for ``seed``:
    the hash of csrc/attention_params.h in int64 torch arithmetic (every backend's kernels
    compute the same bits). For tests and for anyone who needs to reproduce a dropout."""
    bh = torch.arange(batch * heads, dtype=torch.int64, device=device).view(batch, heads, 1, 1)
    i = torch.arange(q_len, dtype=torch.int64, device=device).view(1, 1, -1, 1)
    j = torch.arange(kv_len, dtype=torch.int64, device=device).view(1, 1, 1, -1)
    head_key = _fmix32((int(seed) + 0x9E3779B9 * (bh + 1)) & _M32)
    row_key = _fmix32(head_key ^ i)
    bits = _fmix32((row_key + 0x27D4EB2F * (j + 1)) & _M32) >> 8
    return bits >= int(round(dropout_p * 2**24))


def _draw_seed(device: torch.device) -> int:
    """A seed from torch's default generator of ``device`` (torch.manual_seed reproduces it)."""
    if device.type == "meta":  # shapes only: no values to draw
        return 0
    # Under torch.func's transforms, drawn outside them: one seed for the call, whatever
    # vmap's randomness (the batching rule applies that).
    with (temporarily_clear_interpreter_stack() if torch._C._are_functorch_transforms_active()
          else contextlib.nullcontext()):
        return int(torch.randint(0, 2**31 - 1, (), device=device).item())


# --- the functional entry points ------------------------------------------------------------

def _to_4d(query, key, value, attn_mask, enable_gqa):
    """(query, key, value, attn_mask) as the ops take them, (B, H, L, E) with every leading
    dim folded into B, and the function that gives an output (B, H, L, X) its leading dims
    back."""
    if not isinstance(query, Tensor):
        raise TypeError(f"{_OP}: query must be a Tensor, but got {type(query).__name__}")
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_OP}: {name} must be a Tensor, but got {type(t).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError(f"{_OP}: attn_mask must be a Tensor or None, but got "
                        f"{type(attn_mask).__name__}")
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise ValueError(f"{_OP}: query, key and value must have at least 2 dims: (L, E), "
                         f"(N, L, E), (N, heads, L, E) or more batch dims (..., heads, L, E), "
                         f"but got shapes {_shape(query)}, {_shape(key)} and {_shape(value)}")
    # Fewer dims than the others: leading dims of size 1, as a matrix product broadcasts.
    nd = max(query.dim(), key.dim(), value.dim())
    query, key, value = (t[(None,) * (nd - t.dim())] for t in (query, key, value))
    if attn_mask is not None and attn_mask.dim() > nd:
        # Leading dims of 1 beyond the weights' are dropped (PyTorch takes a (1, 1, L, S) mask
        # with 3-D inputs); any other extra dim is refused, as PyTorch refuses it.
        extra = attn_mask.shape[:attn_mask.dim() - nd]
        if any(n != 1 for n in extra):
            raise ValueError(f"{_OP}: attn_mask of shape {_shape(attn_mask)} has more dims than "
                             f"the attention weights, {nd}, and they are not of size 1")
        attn_mask = attn_mask.reshape(attn_mask.shape[len(extra):])
    if nd == 2:  # (L, E): one head of a batch of one
        query, key, value = query[None, None], key[None, None], value[None, None]

        def restore(t):
            return t[0, 0]
    elif nd == 3:  # (N, L, E): one head
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)

        def restore(t):
            return t.squeeze(1)
    elif nd == 4:
        def restore(t):
            return t
    else:
        query, key, value, attn_mask, batch = _fold_batch(query, key, value, attn_mask)

        def restore(t):
            return t.reshape(*batch, *t.shape[1:])
    query, key, value = _broadcast(query, key, value, 0)
    if not enable_gqa:
        query, key, value = _broadcast(query, key, value, 1)
        if key.shape[1] not in (1, query.shape[1]):
            raise ValueError(f"{_OP}: query has {query.shape[1]} heads but key has "
                             f"{key.shape[1]}; pass enable_gqa=True for grouped-query attention")
    return query, key, value, attn_mask, restore


def _fold_batch(query, key, value, attn_mask):
    """5-D and more: the leading dims (before heads, L, E), broadcast among query, key and
    value (and the mask's, where it has them), folded into one. A broadcast dim is copied
    where the fold needs it."""
    shapes = [t.shape[:-3] for t in (query, key, value)]
    try:
        batch = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise ValueError(f"{_OP}: the batch dims of query, key and value, "
                         f"{[list(s) for s in shapes]}, do not broadcast") from None

    def fold(t):  # (an explicit size: -1 is ambiguous for an empty tensor)
        return t.expand(*batch, *t.shape[-3:]).reshape(math.prod(batch), *t.shape[-3:])

    query, key, value = fold(query), fold(key), fold(value)
    if attn_mask is not None and attn_mask.dim() > 3:
        mask_batch = attn_mask.shape[:-3]
        if any(m not in (1, b) for m, b in zip(reversed(mask_batch), reversed(batch))):
            raise ValueError(f"{_OP}: attn_mask's batch dims {list(mask_batch)} do not "
                             f"broadcast to {list(batch)}")
        attn_mask = fold(attn_mask)
    return query, key, value, attn_mask, tuple(batch)


def _broadcast(query, key, value, dim):
    """torch's SDPA broadcasts a batch (dim 0) or, without enable_gqa, head (dim 1) size of 1
    as a matrix product does: as expanded views here, read through stride 0. Key and value
    with one head where the query has H stay as they are: the grouped-query path reads them
    for every head."""
    sizes = {t.shape[dim] for t in (query, key, value)} - {1}
    if len(sizes) != 1:
        return query, key, value  # all 1, all equal, or a mismatch check_args reports
    n = sizes.pop()

    def grown(t):
        return t.expand(*t.shape[:dim], n, *t.shape[dim + 1:])

    if dim == 1 and key.shape[1] == value.shape[1]:
        return grown(query), key, value
    return grown(query), grown(key), grown(value)


def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False, return_lse: bool = False):
    """:func:`scaled_dot_product_attention`, and with ``return_lse=True`` also the
    log-sum-exp of each row's scores (natural log, float32, or float64 for float64 inputs;
    the output's shape without its last dim: (N, H, L), (N, L) for 3-D inputs):
    ``(out, lse)``."""
    if isinstance(query, Tensor):
        query, key, value, attn_mask = cast_for_autocast(query.device, query, key, value,
                                                         attn_mask)
    q, k, v, mask, restore = _to_4d(query, key, value, attn_mask, enable_gqa)
    E, Ev = q.shape[-1], v.shape[-1]
    if max(E, Ev) > MAX_HEAD_DIM:  # (here, before a zero head dim is padded to 1)
        raise ValueError(f"{_OP}: head dims must lie in [0, {MAX_HEAD_DIM}], but got E={E} and "
                         f"Ev={Ev}")
    dropout_p = float(dropout_p)
    if not 0 <= dropout_p <= 1:
        raise ValueError(f"{_OP}: dropout_p must lie in [0, 1], but got {dropout_p}")
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
    # Empty head dims, as PyTorch: E = 0 makes every score 0 (the weights uniform over the
    # keys the mask leaves), Ev = 0 an empty output; the kernels take one zero column.
    if E == 0:
        q, k = F.pad(q, (0, 1)), F.pad(k, (0, 1))
    if Ev == 0:
        v = F.pad(v, (0, 1))
    # dropout_p = 1 drops every weight: PyTorch's dropout multiplies them by 0.
    drop_all = dropout_p == 1
    if drop_all:
        dropout_p = 0.0
    refuse_forward_ad(_OP, q, k, v, mask)
    seed = _draw_seed(q.device) if dropout_p > 0 else 0
    op = _FORWARD[backend.resolve("scaled_dot_product_attention", q)]
    out, lse = op(q, k, v, mask, dropout_p, bool(is_causal), float(scale), seed)
    if Ev == 0:
        out = out[..., :0]
    if drop_all:
        out = out * 0
    out, lse = restore(out), restore(lse.unsqueeze(-1)).squeeze(-1)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    """softmax(Q K^T * scale + mask) V in one fused pass, with
    :func:`torch.nn.functional.scaled_dot_product_attention`'s arguments and shapes.

    Args:
        query: (N, H, L, E), (N, L, E), (L, E) or (..., H, L, E) with more batch dims;
            float32/float16/bfloat16 on a GPU,
            float32/float64 on the CPU (float16/bfloat16 there are computed in float32).
        key: (N, Hkv, S, E), or with query's other leading dims.
        value: (N, Hkv, S, Ev), likewise; Ev may differ from E. Head dims 0 to 256.
            Batch sizes of 1 (and without enable_gqa a head count of 1) broadcast, as in
            PyTorch, without a copy (with more than one batch dim, the fold into one may
            copy); an input with fewer dims than the others has leading dims of 1.
        attn_mask: bool (True: take part in attention), or float32 or query's dtype (added
            to the scores, float32 for 16-bit queries without rounding on the CPU; PyTorch's
            rule), broadcastable to (N, H, L, S), e.g. a key-padding mask (N, 1, 1, S).
            Read through its strides, never expanded in memory (except, with more than one
            batch dim, a mask that has batch dims: folded with them). A floating mask that
            requires grad gets its gradient (a learned bias), computed in PyTorch ops with
            the (N, H, L, S) scores materialised.
        dropout_p: in [0, 1], dropout on the attention weights, from a counter-based hash seeded by
            torch's generator for the device (``torch.manual_seed`` reproduces it; the
            backward pass applies the same mask). Under ``torch.compile`` the seed's
            ``.item()`` is traced with ``fullgraph=True``; without it, it is a graph break.
            Inductor draws the seed with its own generator (reproducible under
            ``torch.manual_seed``, but not eager's numbers unless
            ``torch._inductor.config.fallback_random`` is set), as for torch's dropout.
        is_causal: query i attends to keys j <= i (PyTorch's top-left alignment, also for
            L != S). May be combined with attn_mask (PyTorch refuses both at once).
        scale: defaults to 1 / sqrt(E).
        enable_gqa: allow Hkv < H with H a multiple of Hkv; query head h reads key/value
            head h // (H / Hkv), without copying K and V.

    Returns (N, H, L, Ev) (or the input's leading dims, then L, Ev) in query's dtype. A
    query row that can attend to no key (its mask all False or -inf) gives zeros and zero
    gradients, as PyTorch's does (on the CPU; its fused CUDA backends are not checked here).
    Differentiable in query, key, value and a floating attn_mask; the backward pass
    recomputes the attention weights from the saved log-sum-exp and is deterministic. Second
    and higher derivatives differentiate the backward pass written in PyTorch ops, with the
    (N, H, L, S) weights materialised.
    """
    return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


__all__ = ["scaled_dot_product_attention", "attention", "dropout_keep_mask", "check_args"]
