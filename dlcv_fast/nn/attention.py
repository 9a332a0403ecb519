"""Attention layers."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from dlcv_fast.nn._fx import traced_as_leaf
from dlcv_fast.ops.attention import MAX_HEAD_DIM, scaled_dot_product_attention

_NEG_INF = float("-inf")


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """nn.MultiheadAttention's masks (bool True: masked out, or additive) as additive."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, _NEG_INF)
    return mask.to(dtype)


def _shape_str(shape: tuple) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _check_inputs(module: torch.nn.MultiheadAttention, query: Tensor, key: Tensor,
                  value: Tensor, key_padding_mask: Tensor | None,
                  attn_mask: Tensor | None) -> None:
    """torch's checks, as ValueError / TypeError naming the argument and the expected shape,
    before either path runs: a wrong-shaped mask must not broadcast into a wrong answer."""
    op = "MultiheadAttention"
    if query.dim() not in (2, 3):
        raise ValueError(f"{op}: query must be 2-D (L, E) or 3-D (L, N, E) / (N, L, E) with "
                         f"batch_first, but got shape {list(query.shape)}")
    unbatched = query.dim() == 2
    for name, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            raise ValueError(f"{op}: key and value must be {query.dim()}-D like query, but got "
                             f"{name} shape {list(t.shape)}")
    for name, t, want, what in (("query", query, module.embed_dim, "embed_dim"),
                                ("key", key, module.kdim, "kdim"),
                                ("value", value, module.vdim, "vdim")):
        if t.shape[-1] != want:
            raise ValueError(f"{op}: {name}'s last dimension must be {what} = {want}, but got "
                             f"{t.shape[-1]}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"{op}: key and value must have the same batch size and length, but "
                         f"got key shape {list(key.shape)} and value shape {list(value.shape)}")
    if unbatched:
        L, S, N = query.shape[0], key.shape[0], 1
    else:
        b, t = (0, 1) if module.batch_first else (1, 0)
        L, S, N = query.shape[t], key.shape[t], query.shape[b]
        if key.shape[b] != N:
            raise ValueError(f"{op}: key and value must have query's batch size N = {N}, but "
                             f"got key shape {list(key.shape)}")
    for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if m is not None and m.dtype != torch.bool and not m.is_floating_point():
            # An integer mask would be added as 0 / 1 instead of masking.
            raise TypeError(f"{op}: only bool and floating types of {name} are supported, but "
                            f"got {m.dtype}")
        if m is not None and m.is_floating_point() and m.dtype not in (torch.float32,
                                                                       query.dtype):
            # torch's rule for the mask it hands to SDPA (which refuses others).
            raise TypeError(f"{op}: a floating {name} must be float32 or query's dtype "
                            f"{query.dtype}, but got {m.dtype}")
    if key_padding_mask is not None:
        want, dims = ((S,), "(S,)") if unbatched else ((N, S), "(N, S)")
        if tuple(key_padding_mask.shape) != want:
            raise ValueError(f"{op}: key_padding_mask must have shape {dims} = "
                             f"{_shape_str(want)}, but got {list(key_padding_mask.shape)}")
    if attn_mask is not None:
        heads = (module.num_heads,) if unbatched else (N * module.num_heads,)
        dims = "(num_heads, L, S)" if unbatched else "(N * num_heads, L, S)"
        if tuple(attn_mask.shape) not in ((L, S), (*heads, L, S)):
            raise ValueError(f"{op}: attn_mask must have shape (L, S) = {_shape_str((L, S))} or "
                             f"{dims} = {_shape_str((*heads, L, S))}, but got "
                             f"{list(attn_mask.shape)}")


class MultiheadAttention(torch.nn.MultiheadAttention):
    """:class:`torch.nn.MultiheadAttention` whose ``need_weights=False`` path runs
    :func:`dlcv_fast.scaled_dot_product_attention`.

    A subclass: same constructor (embed_dim, num_heads, dropout, bias, add_bias_kv,
    add_zero_attn, kdim, vdim, batch_first, device, dtype), parameters, ``state_dict`` keys
    (``in_proj_weight``, ``in_proj_bias`` or ``q/k/v_proj_weight``, ``out_proj.*``,
    ``bias_k``, ``bias_v``) and repr.

    ``forward`` takes torch's arguments. With ``need_weights=False`` the projections are
    torch's and attention is the fused kernel; ``key_padding_mask`` (N, S) and ``attn_mask``
    (L, S) or (N * num_heads, L, S) (unbatched: (S,) and (L, S) or (num_heads, L, S); bool:
    True is masked out, or floating: additive) are merged into one mask that broadcasts over
    what it does not depend on. On both paths, a mask of another shape or an integer mask
    (which would be added as 0 / 1) raises, as in torch, with a ValueError / TypeError that
    names the argument and the expected shape. With ``need_weights=True``
    (torch's default) it is torch's own forward, the slower explicit path that materialises
    the (L, S) weights it returns. ``is_causal`` is a hint, as in torch: ``attn_mask`` must
    hold the causal mask, and that mask is what is applied (with add_bias_kv or add_zero_attn
    every query sees the extra key, as on torch's need_weights=True path; torch's fused path
    masks it by its own causal rule over the S + 1 keys). A head dim (embed_dim //
    num_heads) above 256, the fused kernels' limit, runs torch's forward on both paths,
    with a warning on the need_weights=False path.

    A query that may attend to no key gives zeros (then ``out_proj``'s bias) on the fused
    path, as torch's ``need_weights=False`` path does in training or with grad; torch's
    inference fast path (eval mode, no grad) gives NaN there. With ``need_weights=True``
    (torch's own forward) it gives NaN, in torch and here.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        traced = traced_as_leaf(self, query, key, value, key_padding_mask=key_padding_mask,
                                need_weights=need_weights, attn_mask=attn_mask,
                                average_attn_weights=average_attn_weights, is_causal=is_causal)
        if traced is not None:
            return traced
        _check_inputs(self, query, key, value, key_padding_mask, attn_mask)
        if self.head_dim > MAX_HEAD_DIM and not need_weights:
            warnings.warn(f"MultiheadAttention: head dim {self.head_dim} is above the fused "
                          f"kernels' {MAX_HEAD_DIM}; torch's forward runs", stacklevel=2)
        if need_weights or self.head_dim > MAX_HEAD_DIM:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: is_causal is a hint that attn_mask is the "
                               "causal mask; pass attn_mask as well")
        unbatched = query.dim() == 2
        if unbatched:  # (L, E): a batch of one
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # the projections below work on (L, N, E)
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        L, N, E = query.shape
        H, hd = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        # (length, N, E) -> (N, H, length, hd)
        q, k, v = (x.reshape(x.shape[0], N, H, hd).permute(1, 2, 0, 3) for x in (q, k, v))

        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 3:  # (N * H, L, S)
                attn_mask = attn_mask.view(N, H, *attn_mask.shape[1:])
            mask = _as_additive(attn_mask, q.dtype)
        if key_padding_mask is not None:
            kpm = _as_additive(key_padding_mask, q.dtype).view(N, 1, 1, -1)
            mask = kpm if mask is None else mask + kpm
        extra = []
        if self.bias_k is not None:
            extra.append((self.bias_k.view(1, H, 1, hd), self.bias_v.view(1, H, 1, hd)))
        if self.add_zero_attn:
            zeros = q.new_zeros(1, H, 1, hd)
            extra.append((zeros, zeros))
        for k_new, v_new in extra:  # one more key, that every query may attend to
            k = torch.cat([k, k_new.expand(N, H, 1, hd)], dim=2)
            v = torch.cat([v, v_new.expand(N, H, 1, hd)], dim=2)
            if mask is not None:
                mask = F.pad(mask, (0, 1))
        if mask is not None and mask.dim() < 4:
            mask = mask.view(*([1] * (4 - mask.dim())), *mask.shape)
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        out = out.permute(2, 0, 1, 3).reshape(L, N, E)  # (L, N, E)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, None
