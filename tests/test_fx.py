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
