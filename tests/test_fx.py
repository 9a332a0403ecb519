"""torch.fx symbolic tracing sees dlcv_fast's layers as one call_module node each, as it
sees torch.nn's, so torchvision's feature extraction works on dlcv_fast's models and on
converted ones."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import assert_close
from torchvision.models.feature_extraction import create_feature_extractor

import dlcv_fast
from dlcv_fast import models
from dlcv_fast.convert import _BY_DLCV

CASES = [
    ("lenet5", lambda: models.lenet5(), (2, 1, 32, 32)),
    ("alexnet", lambda: models.alexnet(num_classes=10), (1, 3, 64, 64)),
    ("vgg11_bn", lambda: models.vgg11_bn(num_classes=10), (1, 3, 32, 32)),
    ("resnet18", lambda: models.resnet18(num_classes=10), (2, 3, 32, 32)),
    ("googlenet", lambda: models.googlenet(num_classes=10, aux_logits=False,
                                           init_weights=True), (2, 3, 64, 64)),
    ("vit_tiny", lambda: models.vit_tiny(image_size=32, num_classes=10), (2, 3, 32, 32)),
    # odd sizes: the decoder pads its upsampled maps to the skips' (a zero pad in the graph)
    ("unet", lambda: models.unet(3, 2, base_channels=8, depth=3), (2, 3, 30, 27)),
]


@pytest.mark.parametrize(("name", "build", "shape"), CASES, ids=[c[0] for c in CASES])
def test_symbolic_trace(name, build, shape):
    torch.manual_seed(0)
    model = build()
    traced = torch.fx.symbolic_trace(model)
    leaves = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    ours = {k for k, m in model.named_modules() if type(m) in _BY_DLCV}
    assert ours and ours <= leaves  # every dlcv_fast layer a node, none traced into
    x = torch.randn(shape)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(traced, mode)()
        torch.manual_seed(1)
        want = model(x)
        torch.manual_seed(1)  # the same dropout masks
        assert torch.equal(traced(x), want), mode


def test_feature_extraction_on_a_converted_model():
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(weights=None, num_classes=10).double().eval()
    ours = copy.deepcopy(theirs)
    dlcv_fast.convert(ours)
    nodes = {"layer1": "low", "layer4": "high", "fc": "logits"}
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        got = create_feature_extractor(ours, nodes)(x)
        want = create_feature_extractor(theirs, nodes)(x)
    assert got.keys() == want.keys()
    for k in want:
        assert_close(got[k], want[k])


def test_batch_norm_statistics_update_through_the_graph():
    model = torch.nn.Sequential(dlcv_fast.nn.Conv2d(3, 4, 3), dlcv_fast.nn.BatchNorm2d(4),
                                dlcv_fast.nn.MaxPool2d(2)).train()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 8, 8)
    traced(x)
    bn = model[1]
    assert int(bn.num_batches_tracked) == 1
    y = model[0](x)
    mean = y.mean((0, 2, 3)).detach()
    assert_close(bn.running_mean, 0.1 * mean)


def test_a_layer_alone_says_how_to_trace_it():
    with pytest.raises(TypeError, match="trace such a model"):
        torch.fx.symbolic_trace(dlcv_fast.nn.Conv2d(3, 4, 3))
    traced = torch.fx.symbolic_trace(torch.nn.Sequential(dlcv_fast.nn.Conv2d(3, 4, 3)))
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(traced(x), traced.get_submodule("0")(x))


def test_diffusion_unet_traces_with_its_timesteps():
    torch.manual_seed(0)
    model = models.diffusion_unet(in_channels=1, image_size=16).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 1, 16, 16)
    for t in (torch.tensor([3, 500]), torch.tensor(7)):
        with torch.no_grad():
            assert torch.equal(traced(x, t), model(x, t))
