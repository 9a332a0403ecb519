"""dlcv_fast.models: torchvision's state_dict keys and shapes, and the same outputs as
torchvision's models (random weights, no downloads) in eval and train mode."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import dlcv_fast
import dlcv_fast.nn as dnn
from dlcv_fast import models
from tests.conftest import assert_close

TORCHVISION = ["alexnet", "vgg11", "vgg13", "vgg16", "vgg19"]


@pytest.mark.parametrize("name", TORCHVISION)
def test_state_dict_keys_and_shapes_match_torchvision(name):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        ours = models.MODELS[name](num_classes=17, dropout=0.3)
        theirs = torchvision.models.get_model(name, weights=None, num_classes=17, dropout=0.3)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}
    assert list(ours.state_dict()) == list(theirs.state_dict())  # same order too
    kinds = {type(m) for m in ours.modules()}
    assert dnn.Conv2d in kinds and dnn.MaxPool2d in kinds and nn.Conv2d not in kinds
    assert ours.classifier[-1].out_features == 17
    assert all(m.p == 0.3 for m in ours.modules() if isinstance(m, nn.Dropout))
    # same layer sequence as torchvision, with dlcv_fast's classes where it has them
    ours_seq = [type(m).__mro__[1] if type(m).__module__.startswith("dlcv_fast.nn") else
                type(m) for m in ours.modules() if not list(m.children())]
    theirs_seq = [type(m) for m in theirs.modules() if not list(m.children())]
    assert ours_seq == theirs_seq


_PAIRS: dict[str, tuple[nn.Module, nn.Module]] = {}


def _pair(name):
    """(ours, torchvision's) with the same random weights, 10 classes; built once per name
    (the tests cast them to the dtype they need: float32 <-> float64 is exact)."""
    if name not in _PAIRS:
        torch.manual_seed(0)
        theirs = torchvision.models.get_model(name, weights=None, num_classes=10)
        ours = models.MODELS[name](num_classes=10)
        ours.load_state_dict(theirs.state_dict())
        _PAIRS[name] = ours, theirs
    return _PAIRS[name]


# alexnet needs at least 63x63 inputs; vgg 32x32 (five 2x2 pools).
@pytest.mark.parametrize("name,size,dtype", [
    ("alexnet", 67, torch.float32), ("alexnet", 67, torch.float64),
    ("vgg11", 32, torch.float32), ("vgg11", 32, torch.float64), ("vgg19", 35, torch.float32),
])
def test_outputs_match_torchvision_eval(name, size, dtype):
    ours, theirs = _pair(name)
    ours.to(dtype).eval()
    theirs.to(dtype).eval()
    x = torch.randn(2, 3, size, size, dtype=dtype)
    with torch.no_grad():
        assert_close(ours(x), theirs(x))


def test_train_mode_same_dropout_masks_and_gradients():
    ours, theirs = _pair("alexnet")
    ours.double().train()
    theirs.double().train()
    x = torch.randn(2, 3, 63, 63, dtype=torch.float64)
    torch.manual_seed(1)
    y_ours = ours(x)
    torch.manual_seed(1)
    y_theirs = theirs(x)
    assert_close(y_ours, y_theirs)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    for (k, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, msg=k)
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)


def test_train_mode_vgg_forward():
    ours, theirs = _pair("vgg11")
    ours.float().train()
    theirs.float().train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(2)
        y_ours = ours(x)
        torch.manual_seed(2)
        y_theirs = theirs(x)
        torch.manual_seed(3)  # other dropout masks: a different result (dropout is live)
        y_other = ours(x)
    assert_close(y_ours, y_theirs)
    assert not torch.allclose(y_ours, y_other)


def test_lenet5_shapes_and_gradients():
    model = models.lenet5(num_classes=7, in_channels=3).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = model(x)
    assert y.shape == (4, 7)
    # the same computation on torch's layers: convert back and compare
    import copy

    ref = copy.deepcopy(model)
    dlcv_fast.revert(ref)
    assert not any(type(m) in (dnn.Conv2d, dnn.MaxPool2d) for m in ref.modules())
    assert_close(y, ref(x))
    y.sum().backward()
    ref(x).sum().backward()
    for (k, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, msg=k)


def test_vgg_initialisation_follows_torchvision():
    torch.manual_seed(0)
    ours = models.vgg11(num_classes=10)
    torch.manual_seed(0)
    theirs = torchvision.models.vgg11(num_classes=10)
    for (k, p), q in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(p, q), k


def test_model_list():
    assert set(models.MODELS) == {"lenet5", "alexnet", "vgg11", "vgg13", "vgg16", "vgg19",
                                  *BN_MODELS, "googlenet", "vit_b_16", "vit_b_32", "vit_l_16",
                                  "vit_tiny", "unet", "diffusion_unet"}
    with pytest.raises(TypeError):
        models.alexnet(not_an_argument=1)


@pytest.fixture(autouse=True, scope="module")
def _free_models():
    yield
    _PAIRS.clear()  # about 2 GB of weights


BN_MODELS = ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "resnet18", "resnet34", "resnet50",
             "resnet101", "resnet152"]


@pytest.mark.parametrize("name", BN_MODELS)
def test_batch_norm_models_have_torchvision_state_dict(name):
    kwargs = {"dropout": 0.3} if name.startswith("vgg") else {"zero_init_residual": True}
    with torch.device("meta"):
        ours = models.MODELS[name](num_classes=17, **kwargs)
        theirs = torchvision.models.get_model(name, weights=None, num_classes=17, **kwargs)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in theirs.state_dict().items()]
    kinds = {type(m) for m in ours.modules()}
    assert {dnn.Conv2d, dnn.BatchNorm2d, dnn.MaxPool2d} <= kinds
    assert not kinds & {nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d}


def test_wide_resnet_arguments():
    kwargs = dict(num_classes=5, width_per_group=128, replace_stride_with_dilation=[False, True,
                                                                                     True])
    with torch.device("meta"):
        ours = models.resnet50(**kwargs)
        theirs = torchvision.models.resnet50(weights=None, **kwargs)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in theirs.state_dict().items()]
    assert ours.layer4[0].conv2.dilation == theirs.layer4[0].conv2.dilation == (2, 2)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg11_bn"])
def test_batch_norm_models_match_torchvision_in_train_and_eval(name):
    """Same outputs in eval mode; in train mode the same outputs, running statistics and
    gradients (float64). 4 images of 64x64: with 2 of 32x32 the last stage's batch
    statistics see 2 values each, and PyTorch's own output moves by ~1e-12 when the batch
    is merely reversed; here both it and ours agree to ~1e-14."""
    ours, theirs = _pair(name)
    ours.double()
    theirs.double()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    ours.train()
    theirs.train()
    for m in (*ours.modules(), *theirs.modules()):
        if isinstance(m, nn.Dropout):
            m.eval()  # batch norm in train mode, without dropout's randomness
    y_ours, y_theirs = ours(x), theirs(x)
    assert_close(y_ours, y_theirs)
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        if a.is_floating_point():  # running statistics updated alike
            assert_close(a, b, msg=k)
        else:
            assert torch.equal(a, b), k
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    grads_ours = [p.grad.clone() for p in ours.parameters()]
    grads_theirs = [p.grad.clone() for p in theirs.parameters()]
    # PyTorch's own spread: the same loss with the batch reversed (another summation order;
    # its running statistics restored after). Through tens of train-mode batch norms it
    # reaches ~1e-12 relative in float64, past the table's elementwise 1e-12, so gradients
    # follow the reductions rule: within twice PyTorch's own error, plus the
    # table's absolute term.
    theirs.zero_grad()
    theirs(x.flip(0)).square().sum().backward()
    theirs.load_state_dict(ours.state_dict())  # the running statistics of one step
    for (k, _), a, b, p in zip(ours.named_parameters(), grads_ours, grads_theirs,
                               theirs.parameters()):
        spread = (p.grad - b).abs().max().item()
        err = (a - b).abs().max().item()
        assert err <= 2 * spread + 1e-12 * max(1.0, b.abs().max().item()), (k, err, spread)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        assert_close(ours(x), theirs(x))


def test_resnet_relu_in_batch_norm_or_after_it():
    """ResNet's ReLUs after bn1 and bn2 run in dlcv_fast's batch norm (activation='relu');
    with another norm_layer, or a batch norm swapped in later, they run as the ReLU module,
    and the outputs are torchvision's either way."""
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    want = theirs(x)
    fused = models.resnet18(num_classes=5).eval()
    fused.load_state_dict(theirs.state_dict())
    assert fused.bn1.activation == fused.layer1[0].bn1.activation == "relu"
    assert fused.layer1[0].bn2.activation is None  # the ReLU after the residual sum stays
    assert_close(fused(x), want)
    plain = models.resnet18(num_classes=5, norm_layer=nn.BatchNorm2d).eval()
    plain.load_state_dict(theirs.state_dict())
    assert type(plain.layer1[0].bn1) is nn.BatchNorm2d
    assert_close(plain(x), want)
    swapped = nn.BatchNorm2d(64).eval()
    swapped.load_state_dict(fused.layer1[0].bn1.state_dict())
    fused.layer1[0].bn1 = swapped
    assert_close(fused(x), want)


@pytest.mark.parametrize("name", ["alexnet", "vgg11", "vgg13_bn", "resnet18", "resnet50"])
def test_pretrained_weights_fix_num_classes_before_downloading(monkeypatch, name):
    """As torchvision: another num_classes with pretrained weights is an error raised before
    the model is built or the weights downloaded."""
    import torchvision.models._api as api
    monkeypatch.setattr(api, "load_state_dict_from_url",
                        lambda *args, **kwargs: pytest.fail("no download expected"))
    with pytest.raises(ValueError, match="num_classes must be 1000 with pretrained weights"):
        getattr(models, name)(weights="DEFAULT", num_classes=10)
