"""torch.autocast: convolution and attention run in the autocast dtype, as PyTorch's do
(floating arguments other than float64 cast to it), through the functional API, the
layers, a converted model and the registered ops themselves; batch norm and max pooling
take the 16-bit activations as they come."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKEND_DEVICES, TOLERANCES, assert_close
from torch import nn

import dlcv_fast
from dlcv_fast.backend import triton_interpreted


def _autocast_dtype(backend: str, device: str) -> torch.dtype:
    # Triton's interpreter computes bfloat16 wrongly (conftest): float16 there.
    return torch.float16 if backend == "triton" and triton_interpreted() else torch.bfloat16


@pytest.fixture(params=BACKEND_DEVICES, ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    backend, device = request.param
    with dlcv_fast.use_backend(backend):
        yield backend, device, _autocast_dtype(backend, device)


def test_functional_ops_cast_as_torch(case):
    """Under autocast the result equals the op on explicitly cast inputs, in that dtype."""
    _, device, dtype = case
    x, w, b = (torch.randn(s, device=device) for s in ((2, 3, 9, 9), (4, 3, 3, 3), (4,)))
    q, k, v = (torch.randn(2, 2, 5, 8, device=device) for _ in range(3))
    mask = torch.randn(5, 5, device=device)
    # The C++ op itself, through its Autocast kernel (it runs CUDA tensors when built so).
    raw_op = device == "cpu" or dlcv_fast.cuda_built()
    with torch.autocast(device, dtype=dtype):
        y = dlcv_fast.conv2d(x, w, b, padding=1, activation="relu")
        o = dlcv_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if raw_op:
            raw = torch.ops.dlcv_fast.conv2d(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, True)
    want_y = dlcv_fast.conv2d(x.to(dtype), w.to(dtype), b.to(dtype), padding=1,
                              activation="relu")
    want_o = dlcv_fast.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype),
                                                    attn_mask=mask.to(dtype))
    assert y.dtype == o.dtype == dtype
    assert torch.equal(y, want_y) and torch.equal(o, want_o)
    if raw_op:
        assert raw.dtype == dtype and torch.equal(raw, want_y)


def test_float64_is_not_cast(case):
    _, device, dtype = case
    x, w = torch.randn(1, 2, 5, 5, device=device, dtype=torch.float64), torch.randn(
        3, 2, 3, 3, device=device, dtype=torch.float64)
    with torch.autocast(device, dtype=dtype):
        y = dlcv_fast.conv2d(x, w)
    assert y.dtype == torch.float64 and torch.equal(y, dlcv_fast.conv2d(x, w))


def test_converted_model_under_autocast(case):
    """A torch op before a converted layer emits a 16-bit activation: the model runs, in the
    dtypes torch's runs in, and its output and gradients are as close to the float64 model's
    as torch's (the reductions rule: within twice torch's error, plus the table's
    absolute term)."""
    _, device, dtype = case
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 2, 2), nn.Conv2d(4, 6, 3, padding=1),
                          nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 2, 1)).to(device)
    ours = copy.deepcopy(model)
    dlcv_fast.convert(ours)
    exact = copy.deepcopy(model).double()
    x = torch.randn(2, 3, 6, 6, device=device)
    y64 = exact(x.double())
    y64.square().sum().backward()
    results = []
    for m in (model, ours):
        with torch.autocast(device, dtype=dtype):
            y = m(x)
        y.float().square().sum().backward()
        results.append((y, [p.grad for p in m.parameters()]))
    (want, want_grads), (got, got_grads) = results
    assert got.dtype == want.dtype == dtype
    atol = TOLERANCES[dtype][1]

    def within_twice_torchs_error(a, b, ref, what):
        err, torch_err = (a.double() - ref).abs().max(), (b.double() - ref).abs().max()
        assert err <= 2 * torch_err + atol, (what, err.item(), torch_err.item())

    within_twice_torchs_error(got, want, y64, "output")
    for i, (g, w, p) in enumerate(zip(got_grads, want_grads, exact.parameters())):
        assert g.dtype == w.dtype == torch.float32
        within_twice_torchs_error(g, w, p.grad, f"gradient {i}")


def test_multihead_attention_under_autocast(case):
    _, device, dtype = case
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(8, 2, batch_first=True).to(device)
    ours = dlcv_fast.nn.MultiheadAttention(8, 2, batch_first=True).to(device)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 8, device=device)
    pad = torch.zeros(2, 5, dtype=torch.bool, device=device)
    pad[1, 3:] = True
    with torch.autocast(device, dtype=dtype):
        got = ours(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        want = theirs(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    assert got.dtype == want.dtype == dtype
    assert_close(got, want, dtype)


def test_torch_reference_dtypes():
    """The policy copied: PyTorch's own conv and SDPA cast to the autocast dtype, float64
    stays."""
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.conv2d(x, w).dtype == torch.bfloat16
        assert F.conv2d(x.double(), w.double()).dtype == torch.float64
        q = torch.randn(1, 1, 3, 4)
        assert F.scaled_dot_product_attention(q, q, q).dtype == torch.bfloat16
