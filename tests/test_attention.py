"""scaled_dot_product_attention against PyTorch and a float64 reference: shapes (L, S not
multiples of any tile, head dims 8..256, Ev != E, GQA), every mask kind, causal with
L != S, fully masked rows, lse, dropout, gradients, gradcheck, opcheck, torch.compile,
bad arguments, and nn.MultiheadAttention, on every backend that runs here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKEND_DEVICES, assert_close, backend_dtype_cases, check_error

import dlcv_fast
from dlcv_fast.ops.attention import attention, dropout_keep_mask

# (B, H, Hkv, L, S, E, Ev)
CPU_SHAPES = [
    (2, 3, 3, 1, 1, 8, 8),
    (1, 2, 2, 37, 53, 16, 16),
    (2, 4, 2, 97, 45, 64, 32),
    (1, 2, 1, 130, 257, 32, 48),
    (1, 1, 1, 65, 300, 256, 256),
    (1, 2, 2, 200, 70, 128, 128),
    # Equal head dims of 32, 64 and 96 as well: the CUDA forward's register-tile kernels.
    (1, 2, 2, 70, 66, 32, 32),
    (2, 2, 1, 77, 131, 64, 64),
    (1, 1, 1, 40, 100, 96, 96),
]
# Triton's interpreter is slow: there, small shapes that still cross tiles of 16 (on a GPU,
# these and the others).
TRITON_SHAPES = [(1, 2, 1, 19, 23, 16, 8), (2, 1, 1, 33, 17, 24, 40)]
MASKS = ["none", "bool_padding", "bool_full", "additive_heads", "additive_strided", "causal",
         "causal_padding"]


def shapes_for(backend, device):
    if backend != "triton":
        return CPU_SHAPES
    return TRITON_SHAPES if device == "cpu" else TRITON_SHAPES + CPU_SHAPES


def make_mask(kind, B, H, L, S, dtype, device, g):
    """(mask, is_causal). Random bool masks keep key 0 so that no row is fully masked."""
    if kind in ("none", "causal"):
        return None, kind == "causal"
    if kind in ("bool_padding", "causal_padding"):  # a key-padding mask (B, 1, 1, S)
        lengths = torch.randint(1, S + 1, (B,), generator=g)
        m = torch.arange(S).view(1, 1, 1, S) < lengths.view(B, 1, 1, 1)
        return m.to(device), kind == "causal_padding"
    if kind == "bool_full":
        m = torch.rand(L, S, generator=g) > 0.4
        m[:, 0] = True
        return m.to(device), False
    if kind == "additive_heads":  # (1, H, 1, S): broadcast over batch and rows
        return torch.randn(1, H, 1, S, generator=g).to(device, dtype), False
    # (B, H, L, S) additive, non-contiguous (every other column of a wider tensor)
    m = torch.randn(B, H, L, 2 * S, generator=g)[..., ::2]
    return m.to(device, dtype), False


def reference(q, k, v, mask, causal, scale=None, keep=None, dropout_p=0.0):
    """softmax(q k^T scale + mask) v in float64, GQA by repeating heads, with fully masked
    rows giving zeros and masked weights exactly 0 (dlcv_fast's choices); (out, lse)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(group, dim=-3)
    v = v.repeat_interleave(group, dim=-3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool, device=s.device).triu(1), -math.inf)
    dead = (s == -math.inf).all(-1, keepdim=True)
    hidden = s == -math.inf
    s = torch.where(dead, 0.0, s)
    # A masked weight is 0 even in a row that a NaN makes NaN (softmax alone gives NaN
    # there): a masked key takes no part in the row, in the forward or the backward.
    w = torch.where(dead | hidden, 0.0, torch.softmax(s, -1))
    lse = torch.where(dead.squeeze(-1), -math.inf, torch.logsumexp(s, -1))
    if keep is not None:
        w = w * keep / (1 - dropout_p)
    return w @ v, lse


def make_qkv(shape, dtype, device, g, requires_grad=True):
    B, H, Hkv, L, S, E, Ev = shape
    q = torch.randn(B, H, L, E, generator=g)
    k = torch.randn(B, Hkv, S, E, generator=g)
    v = torch.randn(B, Hkv, S, Ev, generator=g)
    return [t.to(device, dtype).requires_grad_(requires_grad) for t in (q, k, v)]


def compare(ours, ref, theirs, inputs, g, dtype, what, names=("q", "k", "v", "mask")):
    """ours(*inputs) against ref on float64 copies of the inputs and theirs (PyTorch in the
    same dtype) on copies: the output and every input's gradient, for a random output
    gradient drawn from g, by check_error. Returns ours' output and gradients."""
    out = ours(*inputs)
    grad = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, inputs, grad)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    want = ref(*inputs64)
    want_grads = torch.autograd.grad(want, inputs64, grad.double())
    copies = [t.detach().clone().requires_grad_() for t in inputs]
    their_out = theirs(*copies)
    their_grads = torch.autograd.grad(their_out, copies, grad)
    assert out.shape == want.shape and out.dtype == dtype
    if want.numel():  # (Ev = 0: an empty output)
        check_error(out, want, their_out, dtype, f"out {what}")
    for name, a, w, t in zip(names, grads, want_grads, their_grads):
        assert a.shape == w.shape
        if w.numel():  # (no keys: empty dK and dV; E = 0: empty dQ and dK)
            check_error(a, w, t, dtype, f"grad_{name} {what}")
    return out, grads


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_forward_and_gradients(backend, device, dtype, mask_kind):
    g = torch.Generator().manual_seed(0)
    for shape in shapes_for(backend, device):
        B, H, Hkv, L, S, E, Ev = shape
        q, k, v = make_qkv(shape, dtype, device, g)
        mask, causal = make_mask(mask_kind, B, H, L, S, dtype, device, g)
        # PyTorch in the same dtype (its math backend, when a mask and causal are combined).
        tmask = mask
        if causal and mask is not None:
            tmask = mask & torch.ones(L, S, dtype=torch.bool, device=device).tril()

        def ours(q, k, v):
            with dlcv_fast.use_backend(backend):
                return dlcv_fast.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=H != Hkv)

        out, _ = compare(
            ours, lambda q, k, v: reference(q, k, v, mask, causal)[0],
            lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, attn_mask=tmask, is_causal=causal and mask is None,
                enable_gqa=H != Hkv),
            (q, k, v), g, dtype, f"{backend} {dtype} {shape} {mask_kind}")
        assert out.shape == (B, H, L, Ev)


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_fully_masked_rows_give_zeros(backend, device, dtype):
    g = torch.Generator().manual_seed(1)
    B, H, L, S, E = 2, 2, 21, 19, 16
    q, k, v = make_qkv((B, H, H, L, S, E, E), dtype, device, g)
    mask = torch.rand(B, 1, L, S, generator=g) > 0.5
    mask[:, :, 3] = False  # rows 3 attend to nothing (bool)
    additive = torch.zeros(B, 1, L, S).masked_fill(~mask, -math.inf)
    for m in (mask.to(device), additive.to(device, dtype)):
        with dlcv_fast.use_backend(backend):
            out, lse = attention(q, k, v, attn_mask=m, return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
        assert (lse[:, :, 3] == -math.inf).all()
        assert torch.equal(grads[0][:, :, 3], torch.zeros_like(grads[0][:, :, 3]))
        assert all(torch.isfinite(t).all() for t in (out, *grads))
        ref, ref_lse = reference(q, k, v, mask.to(device), False)
        assert_close(out, ref, dtype)
        live = torch.isfinite(ref_lse)
        assert_close(lse[live], ref_lse[live], torch.float32 if dtype != torch.float64 else dtype)


def _poison(case, q, k, mask):
    """Puts a NaN (or +inf) where `case` says; returns the mask to use."""
    if case == "nan_query":
        q.data[0, 1, 4, 2] = math.nan  # row 4 of head 1
    elif case == "nan_key":
        k.data[1, 0, 7, 0] = math.nan  # key 7 of batch 1: every row that sees it
    elif case == "nan_key_masked_out":
        k.data[1, 0, 7, 0] = math.nan
        mask = mask.clone()
        mask[..., 7] = False  # no row sees key 7: nothing is NaN
    elif case == "nan_additive_mask":
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        mask[0, 0, 5, 3] = math.nan
    elif case == "inf_additive_mask":
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        mask[1, 0, 9, 2] = math.inf  # visible with causal too
    return mask


@pytest.mark.parametrize(("causal", "dropout_p"), [(False, 0.0), (True, 0.0), (False, 0.3)])
@pytest.mark.parametrize("case", ["nan_query", "nan_key", "nan_key_masked_out",
                                  "nan_additive_mask", "inf_additive_mask"])
def test_nan_and_inf_propagate_as_in_the_math(backend_device, case, causal, dropout_p):
    """A NaN among a row's visible scores (or a +inf score) makes that row's output, lse and
    the gradients it feeds NaN, as softmax(q k^T + mask) v computed plainly gives; it must
    not pass for a fully masked row and give zeros. A NaN where the mask hides it changes
    nothing. The sequences fit in one tile of every backend, so that which masked entries
    meet a NaN row in a product (tile-dependent) is the same as in the formula."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(4)
    B, H, L, S, E = 2, 2, 11, 13, 16
    q, k, v = make_qkv((B, H, H, L, S, E, E), torch.float32, device, g)
    mask = _poison(case, q, k, torch.ones(B, 1, L, S, dtype=torch.bool, device=device))
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (), device=device).item())
    keep = dropout_keep_mask(seed, B, H, L, S, dropout_p, device=device) if dropout_p else None
    torch.manual_seed(7)
    with dlcv_fast.use_backend(backend):
        out, lse = attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                             return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    m64 = mask if mask.dtype == torch.bool else mask.double()
    ref, ref_lse = reference(q64, k64, v64, m64, causal, keep=keep, dropout_p=dropout_p)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))
    assert ref.isnan().any() == (case not in ("nan_key_masked_out",)), "the case tests nothing"
    # lse of a row with a +inf score: +inf in the plain math, NaN here (either is not
    # finite; NaN makes the backward's recomputed probabilities NaN, as the math's are).
    assert torch.equal(lse.isfinite(), ref_lse.isfinite()), "lse"
    for ours, want, what in [(out, ref, "out"), (lse, ref_lse, "lse"),
                             *zip(grads, ref_grads, ("dq", "dk", "dv"))]:
        if what != "lse":
            assert torch.equal(ours.isnan(), want.isnan()), (
                f"{what}: NaN where the math has none, or none where it has")
        live = want.isfinite()
        torch.testing.assert_close(ours[live].double(), want[live].detach(), rtol=1e-4, atol=1e-5,
                                   msg=what)


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_lse_and_3d_inputs(backend, device, dtype):
    g = torch.Generator().manual_seed(2)
    N, L, S, E, Ev = 3, 17, 29, 16, 24
    q = torch.randn(N, L, E, generator=g).to(device, dtype)
    k = torch.randn(N, S, E, generator=g).to(device, dtype)
    v = torch.randn(N, S, Ev, generator=g).to(device, dtype)
    mask = (torch.rand(N, L, S, generator=g) > 0.3)
    mask[..., 0] = True
    mask = mask.to(device)
    with dlcv_fast.use_backend(backend):
        out, lse = attention(q, k, v, attn_mask=mask, scale=0.3, return_lse=True)
    ref, ref_lse = reference(q, k, v, mask, False, scale=0.3)
    torch_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    assert out.shape == (N, L, Ev) and lse.shape == (N, L)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_error(out, ref, torch_out, dtype, "3-D out")
    assert_close(lse, ref_lse, torch.float32 if dtype != torch.float64 else dtype)


# Not Triton's interpreter: too slow there at these lengths.
LONG_BACKENDS = [(b, d) for b, d in BACKEND_DEVICES if (b, d) != ("triton", "cpu")]


@pytest.mark.parametrize(("backend", "device"), LONG_BACKENDS, ids=[b for b, _ in LONG_BACKENDS])
def test_long_sequences(backend, device):
    """L and S past a thousand, not multiples of any tile, causal with L < S: fp32, and on a
    GPU bf16 and head dim 128 as well."""
    g = torch.Generator().manual_seed(14)
    cases = [((1, 2, 1, 1100, 1537, 32, 32), torch.float32)]
    if device == "cuda":
        cases += [((1, 2, 1, 1100, 1537, 32, 32), torch.bfloat16),
                  ((1, 2, 2, 1031, 2053, 128, 128), torch.bfloat16)]
    def ours(q, k, v):
        with dlcv_fast.use_backend(backend):
            return dlcv_fast.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                          enable_gqa=True)

    for shape, dtype in cases:
        compare(ours, lambda q, k, v: reference(q, k, v, None, True)[0],
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               enable_gqa=True),
                make_qkv(shape, dtype, device, g), g, dtype, f"{backend} {dtype} {shape}")


def test_huge_logits_do_not_overflow(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(3)
    q, k, v = make_qkv((1, 2, 2, 40, 50, 32, 32), torch.float32, device, g, requires_grad=False)
    q = q * 1e4  # scores ~1e4: exp would overflow without the running max
    out, lse = attention(q, k, v, return_lse=True)
    ref, ref_lse = reference(q, k, v, None, False)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # A softmax this sharp is a near-argmax: compare where the weight is not split.
    assert_close(lse, ref_lse, torch.float32)
    assert (out.double() - ref).abs().max() < 1e-3


def test_non_contiguous_inputs_and_custom_scale(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(4)
    B, L, S, H, E = 2, 23, 31, 3, 16
    # (B, L, H, E) transposed to (B, H, L, E), as attention layers produce them
    q = torch.randn(B, L, H, E, generator=g).to(device).transpose(1, 2)
    k = torch.randn(B, S, H, 2 * E, generator=g).to(device).transpose(1, 2)[..., ::2]
    v = torch.randn(B, S, H, E, generator=g).to(device).transpose(1, 2)
    out = dlcv_fast.scaled_dot_product_attention(q, k, v, scale=0.77, is_causal=True)
    ref, _ = reference(q, k, v, None, True, scale=0.77)
    theirs = F.scaled_dot_product_attention(q, k, v, scale=0.77, is_causal=True)
    check_error(out, ref, theirs, torch.float32, "output")


# Shapes of a learned additive mask: per head and query (broadcast over the batch), a
# key-padding bias, one (L, S) for all, and the full (N, H, L, S).
MASK_GRAD_SHAPES = [(1, 4, 7, 9), (2, 1, 1, 9), (7, 9), (2, 4, 7, 9)]


@pytest.mark.parametrize(("backend", "device", "dtype"), backend_dtype_cases())
def test_mask_gradient(backend, device, dtype):
    """A floating mask that requires grad gets dL/dmask, summed over its broadcast dims,
    with and without causal, with grouped-query heads."""
    g = torch.Generator().manual_seed(21)
    shape = (2, 4, 2, 7, 9, 16, 8)
    L, S = shape[3], shape[4]
    above = torch.ones(L, S, dtype=torch.bool, device=device).triu(1)
    for mask_shape in MASK_GRAD_SHAPES:
        for causal in (False, True):
            q, k, v = make_qkv(shape, dtype, device, g)
            mask = torch.randn(mask_shape, generator=g).to(device, dtype).requires_grad_()

            def ours(q, k, v, m):
                with dlcv_fast.use_backend(backend):
                    return dlcv_fast.scaled_dot_product_attention(
                        q, k, v, attn_mask=m, is_causal=causal, enable_gqa=True)

            def theirs(q, k, v, m):  # PyTorch takes no mask with is_causal
                m = m.masked_fill(above, -math.inf) if causal else m
                return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)

            _, grads = compare(ours, lambda q, k, v, m: reference(q, k, v, m, causal)[0],
                               theirs, (q, k, v, mask), g, dtype,
                               f"{backend} {dtype} mask {mask_shape} causal={causal}")
            assert grads[3].dtype == dtype


def test_mask_gradient_with_dropout(backend_device):
    """dL/dmask through the dropout that the forward pass applied (the same keep mask)."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(22)
    shape = (2, 2, 1, 13, 11, 16, 16)
    B, H, _, L, S, _, _ = shape
    q, k, v = make_qkv(shape, torch.float64, device, g)
    mask = torch.randn(1, H, L, S, generator=g, dtype=torch.float64).to(device)
    mask.requires_grad_()
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**31 - 1, (), device=device).item())
    keep = dropout_keep_mask(seed, B, H, L, S, 0.3, device=device)
    torch.manual_seed(7)
    with dlcv_fast.use_backend(backend):
        out = dlcv_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3,
                                                     enable_gqa=True)
    ref, _ = reference(q, k, v, mask, False, keep=keep, dropout_p=0.3)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device)
    ours = torch.autograd.grad(out, mask, grad)[0]
    want = torch.autograd.grad(ref, mask, grad)[0]
    assert ours.abs().max() > 0.1
    assert_close(ours, want)


def test_mask_gradcheck():
    g = torch.Generator().manual_seed(23)
    q, k, v = make_qkv((2, 4, 2, 5, 6, 8, 4), torch.float64, "cpu", g)
    mask = torch.randn(4, 5, 1, generator=g, dtype=torch.float64).requires_grad_()
    torch.autograd.gradcheck(
        lambda q, k, v, m: dlcv_fast.scaled_dot_product_attention(
            q, k, v, attn_mask=m, is_causal=True, enable_gqa=True), (q, k, v, mask))


# (description, shape (B, H, Hkv, L, S, E, Ev), mask, causal, dropout_p)
SECOND_ORDER = [
    ("causal, float mask", (1, 2, 2, 4, 5, 3, 2), "float", True, 0.0),
    ("gqa, bool mask, a row masked whole", (2, 4, 2, 3, 4, 3, 3), "bool", False, 0.0),
    ("dropout", (1, 2, 2, 3, 4, 2, 3), None, False, 0.4),
]


@pytest.mark.parametrize(("what", "shape", "mask_kind", "causal", "dropout_p"), SECOND_ORDER,
                         ids=[c[0] for c in SECOND_ORDER])
def test_second_order_gradients(backend_device, what, shape, mask_kind, causal, dropout_p):
    """Double backward (a gradient penalty, Hessian-vector products) by gradgradcheck, in
    query, key, value and a floating mask; the backward kernels' own derivative runs in
    PyTorch ops."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(26)
    B, H, Hkv, L, S, _, _ = shape
    inputs = make_qkv(shape, torch.float64, device, g)
    mask = None
    if mask_kind == "float":
        mask = torch.randn(1, H, L, S, generator=g, dtype=torch.float64).to(device)
        inputs.append(mask.requires_grad_())
    elif mask_kind == "bool":
        mask = (torch.rand(B, 1, L, S, generator=g) < 0.7).to(device)
        mask[0, 0, 1] = False

    def fn(q, k, v, m=mask):
        torch.manual_seed(3)  # (one dropout mask for every call)
        return dlcv_fast.scaled_dot_product_attention(
            q, k, v, attn_mask=m, dropout_p=dropout_p, is_causal=causal, enable_gqa=H != Hkv)

    # (fast mode, one random direction, off the CPU kernels: the full Jacobians take a
    # minute in Triton's interpreter)
    assert torch.autograd.gradgradcheck(fn, tuple(inputs), fast_mode=backend != "cpu")


def test_third_order_gradient_matches_the_math(backend_device):
    """The second derivative is itself differentiable: a third-order derivative against
    softmax(QK^T scale + mask) V written in PyTorch ops."""
    _, device = backend_device
    g = torch.Generator().manual_seed(27)
    q, k, v = make_qkv((2, 4, 2, 4, 5, 3, 3), torch.float64, device, g)  # query heads 2h, 2h+1
    mask = torch.randn(4, 5, generator=g, dtype=torch.float64).to(device)  # read kv head h
    w = torch.randn(k.shape, generator=g, dtype=torch.float64).to(device)

    def third(attend):
        out = attend(q, k, v)
        dq, = torch.autograd.grad((out ** 3).sum(), q, create_graph=True)
        dk, = torch.autograd.grad((dq ** 2).sum(), k, create_graph=True)
        return torch.autograd.grad((dk * w).sum(), (q, k, v))  # (dk sums to 0 over keys)

    def plain(q, k, v):
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        return F.softmax(q @ k.transpose(-1, -2) / math.sqrt(3) + mask, -1) @ v

    ours = third(lambda q, k, v: dlcv_fast.scaled_dot_product_attention(q, k, v, mask,
                                                                        enable_gqa=True))
    for a, b in zip(ours, third(plain)):
        assert b.abs().max() > 0.1
        assert_close(a, b)


@pytest.mark.parametrize("shape", [(1, 1, 1, 2, 0, 3, 3), (0, 2, 1, 2, 4, 3, 3)],
                         ids=["no keys", "no batch"])
def test_second_order_gradients_of_empty_inputs(backend_device, shape):
    _, device = backend_device
    q, k, v = make_qkv(shape, torch.float64, device, torch.Generator().manual_seed(28))
    out = dlcv_fast.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    dq, = torch.autograd.grad(out.sum(), q, create_graph=True)
    for grad, t in zip(torch.autograd.grad(dq.sum(), (q, k, v), allow_unused=True), (q, k, v)):
        assert grad is None or torch.equal(grad, torch.zeros_like(t))


@pytest.mark.parametrize("dropout_p", [0.2, 0.7])
def test_dropout(backend_device, dropout_p):
    backend, device = backend_device
    g = torch.Generator().manual_seed(5)
    shape = (2, 2, 1, 37, 45, 16, 16)
    B, H, _, L, S, E, _ = shape
    q, k, v = make_qkv(shape, torch.float64, device, g)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**31 - 1, (), device=device).item())
    keep = dropout_keep_mask(seed, B, H, L, S, dropout_p, device=device)
    assert abs(keep.double().mean().item() - (1 - dropout_p)) < 0.02  # keep rate (n = 6660)
    torch.manual_seed(123)
    out = dlcv_fast.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=True)
    ref, _ = reference(q, k, v, None, False, keep=keep, dropout_p=dropout_p)
    assert_close(out, ref)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    for ours, want in zip(grads, ref_grads):
        assert_close(ours, want)
    # torch.manual_seed reproduces a dropout; another seed gives another.
    torch.manual_seed(123)
    again = dlcv_fast.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                                   enable_gqa=True)
    assert torch.equal(again, out)
    torch.manual_seed(124)
    other = dlcv_fast.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                                   enable_gqa=True)
    assert not torch.equal(other, out)


def test_dropout_of_one_drops_every_weight(backend_device):
    """dropout_p = 1, as PyTorch's: a zero output and zero gradients; the lse is the scores'."""
    _, device = backend_device
    g = torch.Generator().manual_seed(6)
    q, k, v = make_qkv((2, 2, 2, 7, 9, 8, 8), torch.float32, device, g)
    out, lse = attention(q, k, v, dropout_p=1.0, return_lse=True)
    theirs = F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(theirs, out)
    assert_close(lse, reference(q, k, v, None, False)[1].float(), torch.float32)
    for grad in torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=g)):
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize(("E", "Ev"), [(0, 4), (8, 0), (0, 0)])
def test_empty_head_dims(backend_device, E, Ev):
    """As PyTorch: E = 0 gives every key the score 0, so the weights are uniform over the
    keys the mask leaves; Ev = 0 gives an empty output."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(7)
    q, k, v = make_qkv((2, 3, 3, 5, 6, E, Ev), torch.float32, device, g)
    mask = torch.rand(2, 1, 5, 6, generator=g).to(device) < 0.6
    mask[..., 0] = True  # (no fully masked row: PyTorch's CPU math backend gives NaN there)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def ours(q, k, v):
        return dlcv_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    out, _ = compare(ours, sdpa, sdpa, [q, k, v], g, torch.float32, f"E={E} Ev={Ev}")
    assert out.shape == (2, 3, 5, Ev)
    if E == 0 and Ev > 0:
        uniform = mask.float() / mask.sum(-1, keepdim=True)
        assert_close(out, uniform @ v.detach(), torch.float32)


@pytest.mark.parametrize(("backend", "device", "dtype"),
                         [c for c in backend_dtype_cases()
                          if c.values[2] in (torch.float16, torch.bfloat16)])
def test_dropout_in_half_precision(backend, device, dtype):
    """Dropout where the CUDA kernels run on tensor cores (equal head dims of 64 and 128:
    mma.sync, with grouped-query heads; 48: WMMA). The yardstick is PyTorch's math in the same dtype with the same
    mask."""
    g = torch.Generator().manual_seed(7)
    p = 0.25
    for shape in [(1, 2, 1, 70, 90, 64, 64), (1, 2, 2, 50, 70, 48, 48),
                  (1, 2, 1, 40, 70, 128, 128)]:
        B, H, Hkv, L, S, E, _ = shape
        q, k, v = make_qkv(shape, dtype, device, g)
        torch.manual_seed(11)
        seed = int(torch.randint(0, 2**31 - 1, (), device=device).item())
        keep = dropout_keep_mask(seed, B, H, L, S, p, device=device)
        torch.manual_seed(11)
        with dlcv_fast.use_backend(backend):
            out = dlcv_fast.scaled_dot_product_attention(q, k, v, dropout_p=p,
                                                         enable_gqa=H != Hkv)
        grad = torch.randn(out.shape, generator=g).to(device, dtype)
        grads = torch.autograd.grad(out, (q, k, v), grad)

        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, _ = reference(q64, k64, v64, None, False, keep=keep, dropout_p=p)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
        qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
        kr, vr = (t.repeat_interleave(H // Hkv, dim=-3) for t in (kt, vt))
        w = torch.softmax(qt @ kr.transpose(-1, -2) / math.sqrt(E), -1)
        theirs = (w * keep / (1 - p)) @ vr
        their_grads = torch.autograd.grad(theirs, (qt, kt, vt), grad)
        what = f"{backend} {dtype} {shape} dropout"
        check_error(out, ref, theirs, dtype, f"out {what}")
        for name, ours, want, other in zip("qkv", grads, ref_grads, their_grads):
            check_error(ours, want, other, dtype, f"grad_{name} {what}")


def test_dropout_mask_is_the_same_in_every_backend():
    g = torch.Generator().manual_seed(6)
    shape = (1, 2, 2, 20, 30, 16, 16)
    q, k, v = make_qkv(shape, torch.float32, "cpu", g, requires_grad=False)
    outs = []
    for backend, device in BACKEND_DEVICES:
        op = torch.ops.dlcv_fast.sdpa_triton if backend == "triton" else torch.ops.dlcv_fast.sdpa
        args = (q.to(device), k.to(device), v.to(device), None, 0.5, False, 0.25, 987654321)
        outs.append(op(*args)[0].cpu())
    keep = dropout_keep_mask(987654321, 1, 2, 20, 30, 0.5)
    ref, _ = reference(q, k, v, None, False, scale=0.25, keep=keep, dropout_p=0.5)
    for out in outs:
        assert_close(out, ref, torch.float32)


def test_backward_is_deterministic(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(7)
    q, k, v = make_qkv((2, 4, 1, 45, 70, 32, 32), torch.float32, device, g)
    out = dlcv_fast.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True)
    grad = torch.randn(out.shape, generator=g).to(device)
    first = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_cpu_backward_paths():
    """The CPU backward has two schedules (a separate dQ pass, or dQ fused into the dK/dV
    pass when (batch, kv head) pairs outnumber the threads 4 to 1): both against the
    reference, with GQA, a mask and causality."""
    g = torch.Generator().manual_seed(13)
    q, k, v = make_qkv((2, 4, 2, 70, 90, 24, 40), torch.float64, "cpu", g)
    mask = torch.randn(2, 1, 70, 90, generator=g, dtype=torch.float64)
    ref, _ = reference(q, k, v, mask, True)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 8):  # 4 pairs: fused with 1 thread, separate with 2 and 8
            torch.set_num_threads(n)
            with dlcv_fast.use_backend("cpu"):
                out = dlcv_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                             is_causal=True, enable_gqa=True)
            for ours, w in zip(torch.autograd.grad(out, (q, k, v), grad), want):
                assert_close(ours, w)
    finally:
        torch.set_num_threads(threads)


def test_gradcheck():
    g = torch.Generator().manual_seed(8)
    q, k, v = make_qkv((1, 2, 1, 5, 7, 4, 3), torch.float64, "cpu", g)
    mask = torch.randn(1, 2, 5, 7, generator=g, dtype=torch.float64)
    bool_mask = torch.rand(5, 7, generator=g) > 0.3
    bool_mask[:, 0] = True
    with dlcv_fast.use_backend("cpu"):
        for m, causal in ((None, False), (mask, False), (bool_mask, True)):
            fn = lambda a, b, c: dlcv_fast.scaled_dot_product_attention(  # noqa: E731
                a, b, c, attn_mask=m, is_causal=causal, enable_gqa=True)
            assert torch.autograd.gradcheck(fn, (q, k, v))
        # dropout with a fixed seed: a fixed linear map of the weights
        fn = lambda a, b, c: torch.ops.dlcv_fast.sdpa(a, b, c, None, 0.3, False, 0.5,  # noqa: E731
                                                       42)[0]
        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_opcheck(backend_device):
    backend, device = backend_device
    suffix = "_triton" if backend == "triton" else ""
    fwd = getattr(torch.ops.dlcv_fast, "sdpa" + suffix).default
    bwd = getattr(torch.ops.dlcv_fast, "sdpa_backward" + suffix).default
    g = torch.Generator().manual_seed(9)
    q, k, v = make_qkv((2, 2, 1, 9, 17, 16, 8), torch.float32, device, g)
    mask = (torch.rand(2, 1, 1, 17, generator=g) > 0.2).to(device)
    bias = torch.randn(2, 9, 17, generator=g).to(device).requires_grad_()  # a learned bias
    for m in (None, mask, bias):
        torch.library.opcheck(fwd, (q, k, v, m, 0.0, True, 0.25, 0))
        with torch.no_grad():
            out, lse = fwd(q.detach(), k.detach(), v.detach(), m, 0.0, True, 0.25, 0)
        torch.library.opcheck(bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                    out, lse, None if m is None else m.detach(), 0.0, True,
                                    0.25, 0))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(10)
    q, k, v = make_qkv((2, 4, 2, 19, 23, 16, 16), torch.float32, "cpu", g)
    mask = torch.rand(2, 1, 1, 23, generator=g) > 0.2
    mask[..., 0] = True

    def block(q, k, v):
        out = dlcv_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return out.square().mean()

    with dlcv_fast.use_backend("cpu"):
        want = block(q, k, v)
        got = torch.compile(block, fullgraph=True)(q, k, v)
    assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v)), torch.autograd.grad(want, (q, k, v))):
        assert_close(a, b)



@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b, _ in BACKEND_DEVICES])
def test_torch_compile_fullgraph_with_dropout(backend):
    """The seed drawn with .item() is traced (an unbacked SymInt the ops' schemas accept).
    aot_eager draws it as eager does, so the same torch.manual_seed gives the same result."""
    device = dict(BACKEND_DEVICES)[backend]
    g = torch.Generator().manual_seed(15)
    q, k, v = make_qkv((1, 2, 1, 13, 17, 16, 16), torch.float32, device, g)

    def block(q, k, v):
        out = dlcv_fast.scaled_dot_product_attention(q, k, v, dropout_p=0.3, enable_gqa=True)
        return out.square().mean()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with dlcv_fast.use_backend(backend):
        for seed in (1, 2):
            torch.manual_seed(seed)
            want = block(q, k, v)
            torch.manual_seed(seed)
            got = compiled(q, k, v)
            assert_close(got, want)
            for a, b in zip(torch.autograd.grad(got, (q, k, v)),
                            torch.autograd.grad(want, (q, k, v))):
                assert_close(a, b)
        assert not torch.equal(got, compiled(q, k, v)), "a new seed on every call"


@pytest.mark.parametrize(("backend", "device", "dtype"),
                         [c for c in backend_dtype_cases() if c.values[2] != torch.float32])
def test_float32_additive_mask_with_other_query_dtypes(backend, device, dtype):
    """PyTorch takes a float32 additive mask whatever query's dtype (the rule: bool,
    float32 or query's dtype); a float32 mask is not rounded to 16 bits first."""
    g = torch.Generator().manual_seed(16)
    shape = (2, 2, 2, 19, 23, 16, 16)
    q, k, v = make_qkv(shape, dtype, device, g)
    mask = (torch.randn(2, 1, 19, 23, generator=g) * 3).to(device)
    mask[..., 5] = -math.inf
    with dlcv_fast.use_backend(backend):
        out = dlcv_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    grad = torch.randn(out.shape, generator=g).to(device, dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = reference(q64, k64, v64, mask.double(), False)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    qt, kt, vt = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch_out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    torch_grads = torch.autograd.grad(torch_out, (qt, kt, vt), grad)
    assert out.dtype == dtype
    check_error(out, ref, torch_out, dtype, f"out {backend} {dtype}")
    for name, ours, want, theirs in zip("qkv", grads, ref_grads, torch_grads):
        check_error(ours, want, theirs, dtype, f"grad_{name} {backend} {dtype}")


@pytest.mark.parametrize(("qdtype", "mdtype"), [
    (torch.float32, torch.float64), (torch.float32, torch.float16),
    (torch.float16, torch.bfloat16), (torch.float64, torch.float16),
    (torch.float32, torch.uint8), (torch.float32, torch.int32)])
def test_mask_dtypes_torch_refuses(backend_device, qdtype, mdtype):
    _, device = backend_device
    q = torch.randn(1, 2, 5, 8, device=device, dtype=qdtype)
    mask = torch.zeros(5, 5, device=device, dtype=mdtype)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    with pytest.raises(TypeError, match="attn_mask must be bool, float32 or query's dtype"):
        dlcv_fast.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def test_fully_masked_rows_give_zeros_as_in_torch():
    """PyTorch (2.14, CPU) also gives zeros and zero gradients for a row that attends to
    nothing, through SDPA and MultiheadAttention(need_weights=False); its need_weights=True
    path gives NaN (torch's own forward, which ours calls)."""
    g = torch.Generator().manual_seed(17)
    q, k, v = make_qkv((2, 2, 2, 6, 7, 8, 8), torch.float32, "cpu", g)
    mask = torch.ones(6, 7, dtype=torch.bool)
    mask[2] = False
    for m in (mask, torch.zeros(6, 7).masked_fill(~mask, -math.inf)):
        out = dlcv_fast.scaled_dot_product_attention(q, k, v, attn_mask=m)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        assert torch.equal(want[:, :, 2], torch.zeros_like(want[:, :, 2]))
        assert_close(out, want)
        ours_g = torch.autograd.grad(out.sum(), q)[0]
        torch_g = torch.autograd.grad(want.sum(), q)[0]
        assert torch.equal(torch_g[:, :, 2], torch.zeros_like(torch_g[:, :, 2]))
        assert_close(ours_g, torch_g)
    ref, ours = _mha_pair(dict(embed_dim=16, num_heads=2), "cpu")
    x, kv = torch.randn(5, 3, 16, generator=g), torch.randn(4, 3, 16, generator=g)
    kpm = torch.zeros(3, 4, dtype=torch.bool)
    kpm[1] = True  # batch 1 attends to nothing
    out, _ = ours(x, kv, kv, key_padding_mask=kpm, need_weights=False)
    want, _ = ref(x, kv, kv, key_padding_mask=kpm, need_weights=False)
    assert want[:, 1].isfinite().all()
    assert_close(out, want, torch.float32)
    out, _ = ours(x, kv, kv, key_padding_mask=kpm)
    assert out[:, 1].isnan().all() and out[:, 0].isfinite().all()


# (q, k, v shapes): sizes of 1 that torch's SDPA broadcasts as a matrix product does.
BROADCAST = [
    ((2, 3, 5, 8), (1, 3, 6, 8), (1, 3, 6, 8)),  # key/value shared by the batch
    ((1, 3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8)),  # one query batch for two of key/value
    ((2, 3, 5, 8), (2, 1, 6, 8), (2, 1, 6, 8)),  # one key/value head (no enable_gqa)
    ((2, 1, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8)),  # one query head
    ((2, 3, 5, 8), (2, 1, 6, 8), (1, 3, 6, 4)),  # each its own
    ((1, 5, 8), (3, 6, 8), (1, 6, 8)),           # 3-D
]


# (q, k, v, mask shapes): 2-D, and more than one batch dim (broadcast among them).
ANY_DIMS = [
    ((5, 8), (6, 8), (6, 4), (5, 6)),
    ((2, 3, 2, 5, 8), (2, 3, 2, 6, 8), (2, 3, 2, 6, 8), None),
    ((2, 1, 2, 5, 8), (1, 3, 2, 6, 8), (1, 3, 2, 6, 8), (3, 1, 5, 6)),
    ((2, 3, 2, 5, 8), (2, 3, 1, 6, 8), (2, 3, 1, 6, 8), (2, 1, 1, 1, 6)),
    ((2, 2, 1, 2, 5, 8), (2, 1, 1, 2, 6, 8), (1, 2, 1, 2, 6, 8), (5, 6)),
    ((2, 3, 2, 5, 8), (2, 3, 2, 0, 8), (2, 3, 2, 0, 8), None),  # no keys
    # fewer dims than the others: leading dims of size 1
    ((2, 5, 8), (3, 2, 6, 8), (3, 2, 6, 4), None),
    ((5, 8), (2, 3, 6, 8), (3, 6, 8), (3, 5, 6)),
    ((2, 2, 5, 8), (2, 6, 8), (2, 6, 8), (2, 1, 6)),
    ((2, 5, 8), (2, 6, 8), (2, 6, 8), (1, 1, 5, 6)),  # a mask's extra leading 1s
]


@pytest.mark.parametrize("shapes", ANY_DIMS, ids=[str(i) for i in range(len(ANY_DIMS))])
def test_any_number_of_batch_dims(backend_device, shapes):
    """As PyTorch's SDPA: (L, E) inputs, and every dim before (heads, L, E) a batch dim,
    broadcast among query, key, value and the mask; the lse has the output's leading dims."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(25)
    qkv = [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes[:3]]
    mask = None if shapes[3] is None else torch.randn(shapes[3], generator=g).to(device)
    causal = torch.ones(shapes[0][-2], shapes[1][-2], dtype=torch.bool, device=device).tril()
    m64 = torch.zeros(causal.shape, dtype=torch.float64, device=device).masked_fill(
        ~causal, -math.inf) + (0 if mask is None else mask.double())

    def ours(q, k, v):
        with dlcv_fast.use_backend(backend):
            return attention(q, k, v, attn_mask=mask, is_causal=True)

    def plain(q, k, v):  # PyTorch, the causal mask written out
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m64.to(q.dtype))

    compare(ours, plain, plain, qkv, g, torch.float32, str(shapes))
    q, k, _ = qkv
    with dlcv_fast.use_backend(backend):
        out, lse = attention(*qkv, attn_mask=mask, is_causal=True, return_lse=True)
    ref_lse = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
                              + m64, -1)
    assert lse.shape == out.shape[:-1]
    ref_lse = ref_lse.reshape(lse.shape)  # (less a mask's extra leading 1s)
    assert_close(lse, ref_lse.float(), torch.float32)


@pytest.mark.parametrize("shapes", BROADCAST, ids=[str(i) for i in range(len(BROADCAST))])
def test_broadcast_sizes_of_one(backend_device, shapes):
    backend, device = backend_device
    g = torch.Generator().manual_seed(24)
    qkv = [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]

    def ours(q, k, v):
        with dlcv_fast.use_backend(backend):
            return dlcv_fast.scaled_dot_product_attention(q, k, v)

    compare(ours, F.scaled_dot_product_attention, F.scaled_dot_product_attention, qkv, g,
            torch.float32, str(shapes))


BAD = [
    # (description, q shape, k shape, v shape, mask shape, kwargs, exception, message)
    ("batch", (2, 2, 5, 8), (3, 2, 6, 8), (3, 2, 6, 8), None, {}, ValueError,
     "same batch size"),
    ("heads without gqa", (2, 4, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), None, {}, ValueError,
     "enable_gqa=True"),
    ("heads not a multiple", (2, 3, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), None,
     {"enable_gqa": True}, ValueError, r"multiple of key's and value's heads"),
    ("k/v heads", (2, 2, 5, 8), (2, 2, 6, 8), (2, 1, 6, 8), None, {"enable_gqa": True},
     ValueError, "same number of heads"),
    ("head dim", (2, 2, 5, 8), (2, 2, 6, 4), (2, 2, 6, 8), None, {}, ValueError,
     r"key's head dim \(4\) must equal query's \(8\)"),
    ("head dim too large", (1, 1, 5, 300), (1, 1, 6, 300), (1, 1, 6, 8), None, {}, ValueError,
     r"head dims must lie in \[0, 256\], but got E=300 and Ev=8"),
    ("value head dim too large", (1, 1, 5, 0), (1, 1, 6, 0), (1, 1, 6, 300), None, {},
     ValueError, r"head dims must lie in \[0, 256\], but got E=0 and Ev=300"),
    ("kv length", (2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 7, 8), None, {}, ValueError,
     "same length S"),
    ("mask shape", (2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), (2, 1, 5, 7), {}, ValueError,
     "cannot be broadcast"),
    ("1-D", (8,), (8, 8), (8, 8), None, {}, ValueError,
     r"at least 2 dims: \(L, E\), \(N, L, E\)"),
    ("mask dims", (2, 5, 8), (2, 6, 8), (2, 6, 8), (2, 1, 5, 6), {}, ValueError,
     r"attn_mask of shape \[2, 1, 5, 6\] has more dims than the attention weights, 3, and "
     "they are not of size 1"),
    ("batch dims", (2, 3, 2, 5, 8), (3, 3, 2, 6, 8), (3, 3, 2, 6, 8), None, {}, ValueError,
     r"the batch dims of query, key and value, \[\[2, 3\], \[3, 3\], \[3, 3\]\], do not "
     "broadcast"),
    ("mask batch dims", (2, 3, 2, 5, 8), (2, 3, 2, 6, 8), (2, 3, 2, 6, 8), (4, 3, 1, 1, 6), {},
     ValueError, r"attn_mask's batch dims \[4, 3\] do not broadcast to \[2, 3\]"),
    ("dropout", (2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), None, {"dropout_p": 1.5}, ValueError,
     r"dropout_p must lie in \[0, 1\], but got 1.5"),
]


@pytest.mark.parametrize(("what", "qs", "ks", "vs", "ms", "kwargs", "exc", "match"), BAD,
                         ids=[b[0] for b in BAD])
def test_bad_arguments(backend_device, what, qs, ks, vs, ms, kwargs, exc, match):
    _, device = backend_device
    q, k, v = (torch.randn(s, device=device) for s in (qs, ks, vs))
    mask = None if ms is None else torch.ones(ms, dtype=torch.bool, device=device)
    with pytest.raises(exc, match=match):
        dlcv_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)


def test_bad_types(backend_device):
    _, device = backend_device
    q = torch.randn(2, 2, 5, 8, device=device)
    with pytest.raises(TypeError, match="key has dtype torch.float64 but query has"):
        dlcv_fast.scaled_dot_product_attention(q, q.double(), q)
    with pytest.raises(TypeError, match="must be float32, float64, float16 or bfloat16"):
        dlcv_fast.scaled_dot_product_attention(q.int(), q.int(), q.int())
    with pytest.raises(TypeError, match="attn_mask must be bool, float32 or query's dtype"):
        dlcv_fast.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(
            5, 5, dtype=torch.float64, device=device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices():
    q = torch.randn(2, 2, 5, 8, device="cuda")
    with pytest.raises(RuntimeError, match="key is on cpu"):
        dlcv_fast.scaled_dot_product_attention(q, q.cpu(), q)
    with pytest.raises(RuntimeError, match="attn_mask is on cpu"):
        dlcv_fast.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=bool))


# --- nn.MultiheadAttention -------------------------------------------------------------------

MHA_CASES = [
    # (constructor kwargs, masks)
    (dict(embed_dim=32, num_heads=4), "none"),
    (dict(embed_dim=32, num_heads=4, batch_first=True), "both_bool"),
    (dict(embed_dim=24, num_heads=3, kdim=10, vdim=14), "padding_float"),
    (dict(embed_dim=32, num_heads=2, add_bias_kv=True, add_zero_attn=True, batch_first=True),
     "both_bool"),
    (dict(embed_dim=16, num_heads=2, bias=False), "per_head_attn_mask"),
]


@pytest.mark.parametrize(("kwargs", "masks"), MHA_CASES, ids=[str(i) for i in range(5)])
def test_multihead_attention_matches_torch(backend_device, kwargs, masks):
    backend, device = backend_device
    torch.manual_seed(11)
    ref = torch.nn.MultiheadAttention(**kwargs).to(device).eval()
    ours = dlcv_fast.nn.MultiheadAttention(**kwargs).to(device).eval()
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours) == repr(ref)
    N, L, S, E = 3, 7, 9, kwargs["embed_dim"]
    kdim, vdim = kwargs.get("kdim", E), kwargs.get("vdim", E)
    bf = kwargs.get("batch_first", False)
    shape = lambda n, d: (N, n, d) if bf else (n, N, d)  # noqa: E731
    query = torch.randn(shape(L, E), device=device)
    key = torch.randn(shape(S, kdim), device=device)
    value = torch.randn(shape(S, vdim), device=device)
    kpm = am = None
    if masks in ("both_bool", "padding_float"):
        kpm = torch.arange(S, device=device).expand(N, S) >= torch.tensor([9, 5, 3],
                                                                          device=device)[:, None]
        if masks == "padding_float":
            kpm = torch.zeros(N, S, device=device).masked_fill(kpm, -1e4)
    if masks == "both_bool":
        am = torch.ones(L, S, dtype=torch.bool, device=device).triu(1)  # True: masked out
    if masks == "per_head_attn_mask":
        am = torch.randn(N * kwargs["num_heads"], L, S, device=device)
    out, weights = ours(query, key, value, key_padding_mask=kpm, attn_mask=am,
                        need_weights=False)
    want, _ = ref(query, key, value, key_padding_mask=kpm, attn_mask=am, need_weights=False)
    assert weights is None
    assert_close(out, want, torch.float32)
    # need_weights=True: torch's own path, weights included
    out_w, weights = ours(query, key, value, key_padding_mask=kpm, attn_mask=am)
    want_w, want_weights = ref(query, key, value, key_padding_mask=kpm, attn_mask=am)
    assert_close(out_w, want_w, torch.float32)
    assert_close(weights, want_weights, torch.float32)


def test_multihead_attention_gradients_and_unbatched():
    torch.manual_seed(12)
    ref = torch.nn.MultiheadAttention(16, 2)
    ours = dlcv_fast.nn.MultiheadAttention(16, 2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 16)  # unbatched (L, E)
    out, _ = ours(x, x, x, need_weights=False)
    want, _ = ref(x, x, x, need_weights=False)
    assert_close(out, want, torch.float32)
    x = torch.randn(6, 2, 16)
    out, _ = ours(x, x, x, need_weights=False)
    want, _ = ref(x, x, x, need_weights=False)
    g_ours = torch.autograd.grad(out.sum(), list(ours.parameters()))
    g_ref = torch.autograd.grad(want.sum(), list(ref.parameters()))
    for a, b in zip(g_ours, g_ref):
        assert_close(a, b, torch.float32)


def test_multihead_attention_with_heads_above_256_runs_torch():
    """A head dim above the kernels' 256 takes torch's forward, on both paths."""
    torch.manual_seed(13)
    ref, ours = torch.nn.MultiheadAttention(288, 1), dlcv_fast.nn.MultiheadAttention(288, 1)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 288)
    for need_weights in (False, True):
        if need_weights:
            out, w = ours(x, x, x, need_weights=True)
        else:
            with pytest.warns(UserWarning, match="head dim 288 is above the fused kernels' 256"):
                out, w = ours(x, x, x, need_weights=False)
        want, want_w = ref(x, x, x, need_weights=need_weights)
        assert torch.equal(out, want)
        assert (w is None) == (not need_weights) and (w is None or torch.equal(w, want_w))


def _mha_pair(kwargs, device):
    """(torch's module, ours) with the same parameters."""
    torch.manual_seed(18)
    ref = torch.nn.MultiheadAttention(**kwargs).to(device)
    ours = dlcv_fast.nn.MultiheadAttention(**kwargs).to(device)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


# (description, unbatched, batch_first, argument overrides, exception, message). Batched:
# L=5, N=3, S=6, embed 16, 2 heads; torch refuses every one of these (mostly with an
# AssertionError, or deep in a reshape); ours names the argument and the expected shape.
MHA_BAD = [
    ("kpm transposed", False, False, dict(key_padding_mask=(6, 3)), ValueError,
     r"key_padding_mask must have shape \(N, S\) = \(3, 6\), but got \[6, 3\]"),
    ("kpm transposed batch_first", False, True, dict(key_padding_mask=(6, 3)), ValueError,
     r"key_padding_mask must have shape \(N, S\) = \(3, 6\), but got \[6, 3\]"),
    ("kpm 1-D batched", False, False, dict(key_padding_mask=(6,)), ValueError,
     r"key_padding_mask must have shape \(N, S\) = \(3, 6\)"),
    ("kpm 2-D unbatched", True, False, dict(key_padding_mask=(1, 6)), ValueError,
     r"key_padding_mask must have shape \(S,\) = \(6,\), but got \[1, 6\]"),
    ("kpm length unbatched", True, False, dict(key_padding_mask=(7,)), ValueError,
     r"key_padding_mask must have shape \(S,\) = \(6,\), but got \[7\]"),
    ("kpm uint8", False, False, dict(key_padding_mask=(3, 6), kpm_dtype=torch.uint8),
     TypeError, "only bool and floating types of key_padding_mask are supported, but got "
     "torch.uint8"),
    ("kpm int64", False, False, dict(key_padding_mask=(3, 6), kpm_dtype=torch.int64),
     TypeError, "only bool and floating types of key_padding_mask"),
    ("attn_mask int32", False, False, dict(attn_mask=(5, 6), am_dtype=torch.int32), TypeError,
     "only bool and floating types of attn_mask are supported, but got torch.int32"),
    ("attn_mask uint8 unbatched", True, False, dict(attn_mask=(5, 6), am_dtype=torch.uint8),
     TypeError, "only bool and floating types of attn_mask"),
    ("attn_mask float64", False, False, dict(attn_mask=(5, 6), am_dtype=torch.float64),
     TypeError, "a floating attn_mask must be float32 or query's dtype torch.float32, but got "
     "torch.float64"),
    ("kpm float16", False, True, dict(key_padding_mask=(3, 6), kpm_dtype=torch.float16),
     TypeError, "a floating key_padding_mask must be float32 or query's dtype"),
    ("attn_mask (1, L, S)", False, False, dict(attn_mask=(1, 5, 6)), ValueError,
     r"attn_mask must have shape \(L, S\) = \(5, 6\) or \(N \* num_heads, L, S\) = "
     r"\(6, 5, 6\), but got \[1, 5, 6\]"),
    ("attn_mask (H, L, S) batched", False, True, dict(attn_mask=(2, 5, 6)), ValueError,
     r"\(N \* num_heads, L, S\) = \(6, 5, 6\), but got \[2, 5, 6\]"),
    ("attn_mask (1, L, S) unbatched", True, False, dict(attn_mask=(1, 5, 6)), ValueError,
     r"attn_mask must have shape \(L, S\) = \(5, 6\) or \(num_heads, L, S\) = \(2, 5, 6\), "
     r"but got \[1, 5, 6\]"),
    ("attn_mask (L, S + 1)", False, False, dict(attn_mask=(5, 7)), ValueError,
     r"attn_mask must have shape \(L, S\) = \(5, 6\)"),
    ("attn_mask (1, S)", False, False, dict(attn_mask=(1, 6)), ValueError,
     r"attn_mask must have shape \(L, S\) = \(5, 6\)"),
    ("attn_mask 4-D", False, False, dict(attn_mask=(3, 2, 5, 6)), ValueError,
     r"attn_mask must have shape .* but got \[3, 2, 5, 6\]"),
    ("key batch", False, False, dict(key=(6, 2, 16), value=(6, 2, 16)), ValueError,
     r"key and value must have query's batch size N = 3, but got key shape \[6, 2, 16\]"),
    ("key batch batch_first", False, True, dict(key=(2, 6, 16), value=(2, 6, 16)), ValueError,
     r"key and value must have query's batch size N = 3"),
    ("value batch", False, False, dict(value=(6, 2, 16)), ValueError,
     r"key and value must have the same batch size and length, but got key shape "
     r"\[6, 3, 16\] and value shape \[6, 2, 16\]"),
    ("value length", False, False, dict(value=(7, 3, 16)), ValueError,
     r"key and value must have the same batch size and length"),
    ("key dims", False, False, dict(key=(6, 16), value=(6, 16)), ValueError,
     r"key and value must be 3-D like query"),
    ("query dims", False, False, dict(query=(1, 5, 3, 16)), ValueError,
     r"query must be 2-D \(L, E\) or 3-D"),
    ("query embed", False, False, dict(query=(5, 3, 8)), ValueError,
     r"query's last dimension must be embed_dim = 16, but got 8"),
    ("key embed", False, False, dict(key=(6, 3, 8)), ValueError,
     r"key's last dimension must be kdim = 16, but got 8"),
]


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize(("what", "unbatched", "batch_first", "args", "exc", "match"), MHA_BAD,
                         ids=[b[0] for b in MHA_BAD])
def test_multihead_attention_bad_arguments(what, unbatched, batch_first, args, exc, match,
                                           need_weights):
    """The same error on both paths (ours checks before torch's forward runs), where torch
    refuses too; and, where torch runs (kpm transposed, L = N = S would not tell), never a
    silently wrong answer."""
    args = dict(args)
    kpm_dtype = args.pop("kpm_dtype", torch.bool)
    am_dtype = args.pop("am_dtype", torch.bool)
    ref, ours = _mha_pair(dict(embed_dim=16, num_heads=2, batch_first=batch_first), "cpu")
    L, N, S, E = 5, 3, 6, 16
    if unbatched:
        shapes = dict(query=(L, E), key=(S, E), value=(S, E))
    else:
        bf = (lambda n: (N, n, E)) if batch_first else (lambda n: (n, N, E))
        shapes = dict(query=bf(L), key=bf(S), value=bf(S))
    shapes.update({name: s for name, s in args.items() if name in shapes})
    inputs = {name: torch.randn(s) for name, s in shapes.items()}
    for name, dtype in (("key_padding_mask", kpm_dtype), ("attn_mask", am_dtype)):
        if name in args:
            inputs[name] = torch.zeros(args[name], dtype=dtype)
    with pytest.raises(Exception):  # torch refuses it too
        ref(**inputs, need_weights=need_weights)
    with pytest.raises(exc, match=match):
        ours(**inputs, need_weights=need_weights)


def test_multihead_attention_transposed_padding_mask_repro():
    """The audit's repro: a (S, N) key_padding_mask ran on the fused path and masked the
    wrong keys."""
    _, ours = _mha_pair(dict(embed_dim=16, num_heads=2), "cpu")
    x, k = torch.randn(5, 3, 16), torch.randn(6, 3, 16)
    kpm = torch.zeros(6, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"key_padding_mask .*\(N, S\) = \(3, 6\)"):
        ours(x, k, k, key_padding_mask=kpm, need_weights=False)


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_masks_of_every_accepted_shape(batch_first):
    """What is accepted still matches torch: masks (N, S) and (L, S) / (N * H, L, S),
    unbatched (S,) and (H, L, S), bool and float, with add_bias_kv and add_zero_attn."""
    kwargs = dict(embed_dim=16, num_heads=2, batch_first=batch_first, add_bias_kv=True,
                  add_zero_attn=True)
    ref, ours = _mha_pair(kwargs, "cpu")
    ref.eval(), ours.eval()
    g = torch.Generator().manual_seed(19)
    L, N, S, H, E = 5, 3, 6, 2, 16
    bf = (lambda n: (N, n, E)) if batch_first else (lambda n: (n, N, E))
    x, kv = torch.randn(bf(L), generator=g), torch.randn(bf(S), generator=g)
    kpm = torch.rand(N, S, generator=g) > 0.7
    am = torch.randn(N * H, L, S, generator=g)
    kpm_float = torch.zeros(N, S).masked_fill(kpm, -1e4)
    cases = [(x, kv, kpm_float, am), (x, kv, kpm, None), (x, kv, None, am[0] > 1),
             (x[0] if batch_first else x[:, 0], kv[0] if batch_first else kv[:, 0], kpm[0],
              am[:H] > 1)]
    for q, k, m_kpm, m_am in cases:
        for need_weights in (False, True):
            out, _ = ours(q, k, k, key_padding_mask=m_kpm, attn_mask=m_am,
                          need_weights=need_weights)
            want, _ = ref(q, k, k, key_padding_mask=m_kpm, attn_mask=m_am,
                          need_weights=need_weights)
            assert_close(out, want, torch.float32)
