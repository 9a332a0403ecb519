"""Meta tensors (shapes without data: ``torch.device("meta")`` model construction, shape
inference, FLOP counting) go through every op on every backend's fake kernels, with the
shapes, dtypes and strides the op gives on real tensors, and the shapes and dtypes of
PyTorch's op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dlcv_fast

BACKENDS = ["auto", "cpu", "cuda", "triton"]


def _meta(t: torch.Tensor) -> torch.Tensor:
    """An empty meta tensor with t's shape, dtype, strides and requires_grad."""
    m = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return m.requires_grad_(t.requires_grad)


def _layout(outputs):
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return [(tuple(o.shape), o.dtype, o.stride()) for o in outputs]


def _case_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 9, generator=g)
    cl = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    q = torch.randn(2, 4, 5, 8, generator=g)
    return x, cl, w, b, q


def _cases():
    """name -> (ours, theirs): functions of the inputs returning the op's outputs."""
    return {
        "conv2d": (lambda x, cl, w, b, q: dlcv_fast.conv2d(x, w, b, stride=2, padding=1),
                   lambda x, cl, w, b, q: F.conv2d(x, w, b, stride=2, padding=1)),
        "conv2d-channels-last-same": (
            lambda x, cl, w, b, q: dlcv_fast.conv2d(cl, w, b, padding="same"),
            lambda x, cl, w, b, q: F.conv2d(cl, w, b, padding="same")),
        "max_pool2d": (
            lambda x, cl, w, b, q: dlcv_fast.max_pool2d(cl, 3, 2, 1, return_indices=True),
            lambda x, cl, w, b, q: F.max_pool2d(cl, 3, 2, 1, return_indices=True)),
        "batch_norm-train": (
            lambda x, cl, w, b, q: dlcv_fast.batch_norm(x, None, None, b[:3], None, True),
            lambda x, cl, w, b, q: F.batch_norm(x, None, None, b[:3], None, True)),
        "batch_norm-eval-channels-last": (
            lambda x, cl, w, b, q: dlcv_fast.batch_norm(cl, b[:3].detach(), b[:3].detach().exp(),
                                                        None, None),
            lambda x, cl, w, b, q: F.batch_norm(cl, b[:3].detach(), b[:3].detach().exp(), None,
                                                None)),
        "attention-causal": (
            lambda x, cl, w, b, q: dlcv_fast.scaled_dot_product_attention(q, q, q,
                                                                          is_causal=True),
            lambda x, cl, w, b, q: F.scaled_dot_product_attention(q, q, q, is_causal=True)),
        "attention-dropout": (
            lambda x, cl, w, b, q: dlcv_fast.scaled_dot_product_attention(q, q, q,
                                                                          dropout_p=0.5),
            lambda x, cl, w, b, q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)),
    }


def _forward_and_grads(fn, inputs):
    out = fn(*inputs)
    first = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(first.sum(), inputs, allow_unused=True)
    return out, [g for g in grads if g is not None]


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_forward_and_backward(backend, case):
    ours, theirs = _cases()[case]
    real = [t.requires_grad_() for t in _case_inputs()]
    meta = [_meta(t) for t in real]
    with dlcv_fast.use_backend(backend):
        got, got_grads = _forward_and_grads(ours, meta)
    with dlcv_fast.use_backend("cpu"):
        want, want_grads = _forward_and_grads(ours, real)
    torch_out, torch_grads = _forward_and_grads(theirs, real)
    for t in [*(got if isinstance(got, tuple) else (got,)), *got_grads]:
        assert t.device.type == "meta"
    assert _layout(got) == _layout(want)
    assert _layout(got_grads) == _layout(want_grads)
    assert [s[:2] for s in _layout(got)] == [s[:2] for s in _layout(torch_out)]
    assert [s[:2] for s in _layout(got_grads)] == [s[:2] for s in _layout(torch_grads)]


def test_noise_and_scheduler_step():
    x = torch.empty(2, 3, 4, 4, device="meta")
    t = torch.zeros(2, dtype=torch.int64, device="meta")
    table = torch.empty(10, device="meta")
    for fn in (dlcv_fast.add_noise, dlcv_fast.get_velocity):
        out = fn(x, x, t, table)
        assert out.device.type == "meta" and out.shape == x.shape and out.dtype == x.dtype
    from dlcv_fast.ops.scheduler_step import scheduler_step

    prev, x0 = scheduler_step(x, x, x, None, None, [0.0] * 13, 0, 0, False)
    assert prev.device.type == x0.device.type == "meta" and prev.shape == x0.shape == x.shape


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny", "unet", "diffusion_unet"])
def test_models_built_and_run_on_meta(name):
    """A model constructed under torch.device("meta") runs on meta inputs and gives the
    output shape of the same model on real ones."""
    build = {
        "resnet18": (lambda: dlcv_fast.models.resnet18(num_classes=7), (2, 3, 64, 64)),
        "vit_tiny": (lambda: dlcv_fast.models.vit_tiny(image_size=32, num_classes=5),
                     (2, 3, 32, 32)),
        "unet": (lambda: dlcv_fast.models.unet(in_channels=1, num_classes=3), (2, 1, 20, 28)),
        "diffusion_unet": (lambda: dlcv_fast.models.diffusion_unet(in_channels=1, image_size=16),
                           (2, 1, 16, 16)),
    }
    ctor, shape = build[name]
    args = (torch.tensor([1, 7]),) if name == "diffusion_unet" else ()
    torch.manual_seed(0)
    want = ctor()(torch.randn(shape), *args)
    with torch.device("meta"):
        model = ctor()
    got = model(torch.empty(shape, device="meta"), *(a.to("meta") for a in args))
    assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype


def test_converted_model_on_meta():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                                torch.nn.Linear(36, 2)).to("meta")
    dlcv_fast.convert(model)
    assert isinstance(model[0], dlcv_fast.nn.Conv2d)
    out = model(torch.empty(5, 3, 8, 8, device="meta"))
    assert out.device.type == "meta" and out.shape == (5, 2)
