"""dlcv_fast.models.unet and diffusion_unet: output shapes (odd sizes too), the same outputs,
running statistics and gradients as their torch-layer twins (``dlcv_fast.revert``), every
parameter trained, timesteps in every accepted form, and clear errors for bad arguments."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import dlcv_fast
import dlcv_fast.nn as dnn
from dlcv_fast import models
from dlcv_fast.models.diffusion_unet import AttentionBlock
from tests.conftest import assert_close


def _twin(model: nn.Module) -> nn.Module:
    """The same model on torch's layers, same weights."""
    twin = copy.deepcopy(model)
    dlcv_fast.revert(twin)
    dl = (dnn.Conv2d, dnn.BatchNorm2d, dnn.MaxPool2d, dnn.MultiheadAttention)
    assert not any(type(m) in dl for m in twin.modules())
    return twin


def _check_grads(model: nn.Module, twin: nn.Module) -> None:
    for (k, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.grad is not None and q.grad is not None, k
        assert p.grad.abs().sum() > 0, f"{k} gets no gradient"
        assert_close(p.grad, q.grad, msg=k)


# --- unet ---------------------------------------------------------------------------------

def test_unet_registered_and_built_from_dlcv_fast_layers():
    assert models.MODELS["unet"] is models.unet
    model = models.unet(3, 5, base_channels=4, depth=2)
    kinds = {type(m) for m in model.modules()}
    assert {dnn.Conv2d, dnn.BatchNorm2d, dnn.MaxPool2d, nn.ConvTranspose2d} <= kinds
    assert not kinds & {nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d}
    # channels double at each level: 4, 8, 16 at the bottom
    assert model.down[-1][1][0].out_channels == 16 and model.outc.out_channels == 5
    bilinear = models.unet(3, 5, base_channels=4, depth=2, upsampling="bilinear")
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in bilinear.modules())


@pytest.mark.parametrize("size,depth,upsampling", [
    ((37, 45), 4, "transpose"), ((37, 45), 3, "bilinear"), ((32, 16), 4, "transpose"),
    ((16, 17), 4, "bilinear"),
])
def test_unet_output_has_the_input_size(size, depth, upsampling):
    model = models.unet(2, 3, base_channels=2, depth=depth, upsampling=upsampling).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 2, *size))
    assert y.shape == (1, 3, *size) and torch.isfinite(y).all()


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_unet_matches_its_torch_twin_in_train_and_eval(upsampling):
    torch.manual_seed(0)
    model = models.unet(3, 4, base_channels=4, depth=3, upsampling=upsampling).double()
    twin = _twin(model)
    x = torch.randn(3, 3, 37, 45, dtype=torch.float64)
    model.train()
    twin.train()
    y, y_twin = model(x), twin(x)
    assert_close(y, y_twin)
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        if a.is_floating_point():  # running statistics updated alike
            assert_close(a, b, msg=k)
        else:
            assert torch.equal(a, b), k
    y.square().sum().backward()
    y_twin.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    grads_twin = [p.grad.clone() for p in twin.parameters()]
    assert all(g.abs().sum() > 0 for g in grads)  # every parameter is trained
    # Through train-mode batch norms the float64 gradients differ from PyTorch's by ~1e-12
    # relative, which is also how far PyTorch moves when the batch is merely reversed (the
    # loss does not change): the reductions rule, within twice that spread plus
    # the table's absolute term.
    twin.zero_grad()
    twin(x.flip(0)).square().sum().backward()
    for (k, _), a, b, p in zip(model.named_parameters(), grads, grads_twin, twin.parameters()):
        spread = (p.grad - b).abs().max().item()
        err = (a - b).abs().max().item()
        assert err <= 2 * spread + 1e-12 * max(1.0, b.abs().max().item()), (k, err, spread)
    twin.load_state_dict(model.state_dict())  # the running statistics of one step
    model.eval()
    twin.eval()
    with torch.no_grad():
        assert_close(model(x), twin(x))


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_channels=0), "in_channels"),
    (dict(num_classes=0), "num_classes"),
    (dict(base_channels=2.5), "base_channels"),
    (dict(depth=0), "depth"),
    (dict(depth=True), "depth"),
    (dict(upsampling="nearest"), "upsampling"),
])
def test_unet_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.unet(**{"base_channels": 2, "depth": 2, **kwargs})


def test_unet_bad_input():
    model = models.unet(3, 2, base_channels=2, depth=3)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="at least 2 \\*\\* depth = 8"):
        model(torch.randn(1, 3, 7, 16))


# --- diffusion_unet -------------------------------------------------------------------------

SMALL = dict(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
             attention_resolutions=(4,), num_heads=2, norm_groups=4)


def test_diffusion_unet_registered_and_built_from_dlcv_fast_layers():
    assert models.MODELS["diffusion_unet"] is models.diffusion_unet
    model = models.diffusion_unet()  # the demo's defaults: 16x16, attention at 4x4
    kinds = {type(m) for m in model.modules()}
    assert {dnn.Conv2d, dnn.MultiheadAttention} <= kinds
    assert not kinds & {nn.Conv2d, nn.MultiheadAttention}
    n_attn = sum(isinstance(m, AttentionBlock) for m in model.modules())
    assert n_attn == 1 + 1 + 2  # down at 4x4, middle, up at 4x4 (num_res_blocks + 1)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6


@pytest.mark.parametrize("image_size", [8, 24, 32, 64])
def test_diffusion_unet_default_attention_at_the_lowest_resolution(image_size):
    """Without attention_resolutions, every image_size builds: attention where the side is
    image_size / 4 (three levels), as at 4x4 for the 16x16 default."""
    model = models.diffusion_unet(3, image_size, base_channels=8, norm_groups=4, num_heads=2)
    sides = []
    for m in model.modules():
        if isinstance(m, AttentionBlock):
            m.register_forward_hook(lambda _m, args, _out: sides.append(args[0].shape[-1]))
    x = torch.randn(1, 3, image_size, image_size)
    with torch.no_grad():
        assert model.eval()(x, torch.tensor([10])).shape == x.shape
    assert sides == [image_size // 4] * (1 + 1 + 2)  # down, middle, up (num_res_blocks + 1)


@pytest.mark.parametrize("shape,out_channels", [((2, 1, 16, 16), None), ((3, 1, 16, 24), 2),
                                                ((1, 1, 4, 8), None)])
def test_diffusion_unet_shapes(shape, out_channels):
    model = models.diffusion_unet(out_channels=out_channels).eval()
    with torch.no_grad():
        y = model(torch.randn(shape), torch.randint(0, 1000, (shape[0],)))
    assert y.shape == (shape[0], out_channels or 1, *shape[2:]) and torch.isfinite(y).all()


def test_diffusion_unet_attention_runs_the_fused_kernel(monkeypatch):
    calls = []
    fused = dnn.attention.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return fused(*args, **kwargs)

    monkeypatch.setattr(dnn.attention, "scaled_dot_product_attention", counting)
    model = models.diffusion_unet(2, **SMALL).eval()
    with torch.no_grad():
        model(torch.randn(2, 2, 8, 8), 3)
    # (N, heads, 4x4 positions, head dim): down, middle, and two up blocks
    assert calls == [(2, 2, 16, 8), (2, 2, 16, 8), (2, 2, 16, 8), (2, 2, 16, 8)]


def test_diffusion_unet_timesteps_forms():
    torch.manual_seed(0)
    model = models.diffusion_unet(1, **SMALL).double().eval()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = model(x, torch.tensor([7, 7, 7]))
        assert_close(model(x, 7), y)
        assert_close(model(x, torch.tensor(7)), y)
        assert_close(model(x, torch.tensor([7.0, 7.0, 7.0])), y)
        assert_close(model(x, np.int64(7)), y)
        assert_close(model(x, np.float32(7)), y)
        per_sample = model(x, torch.tensor([7, 500, 999]))
        assert_close(per_sample[0], y[0])
        assert not torch.allclose(per_sample[1:], y[1:])  # the timestep matters
        # each sample sees its own timestep only
        assert_close(model(x[1:2], 500), per_sample[1:2])
    for bad, err in [(torch.tensor([1, 2]), ValueError), (torch.zeros(3, 1), ValueError),
                     (torch.tensor([True, False, True]), TypeError), ("7", TypeError),
                     (np.bool_(True), TypeError)]:
        with pytest.raises(err, match="timesteps"):
            model(x, bad)


def test_diffusion_unet_matches_its_torch_twin_in_train_and_eval():
    torch.manual_seed(0)
    model = models.diffusion_unet(2, **SMALL, dropout=0.2).double()
    twin = _twin(model)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 250, 999])
    model.train()
    twin.train()
    torch.manual_seed(1)
    y = model(x, t)
    torch.manual_seed(1)
    y_twin = twin(x, t)
    assert_close(y, y_twin)  # the same dropout masks: the same draws in the same order
    y.square().sum().backward()
    y_twin.square().sum().backward()
    _check_grads(model, twin)
    model.eval()
    twin.eval()
    with torch.no_grad():
        y = model(x, t)
        assert_close(y, twin(x, t))
        torch.manual_seed(2)
        assert torch.equal(model(x, t), y)  # no dropout in eval mode


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_channels=0), "in_channels"),
    (dict(image_size=10), "image_size must be a multiple of .* = 4"),
    (dict(base_channels=0), "base_channels"),
    (dict(channel_mults=()), "channel_mults"),
    (dict(channel_mults=(1, 0)), "channel_mults"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(attention_resolutions=(3,)), r"attention_resolutions .* \[16, 8, 4\]"),
    (dict(num_heads=3), "num_heads"),
    (dict(dropout=1.0), "dropout"),
    (dict(out_channels=0), "out_channels"),
    (dict(base_channels=12), "norm_groups"),
])
def test_diffusion_unet_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.diffusion_unet(**kwargs)


def test_diffusion_unet_bad_input():
    model = models.diffusion_unet()
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.randn(1, 3, 16, 16), 0)
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.randn(1, 1, 16, 18), 0)
