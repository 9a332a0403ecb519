"""dlcv_fast.models' GoogLeNet and Vision Transformers against torchvision's: state_dict
keys, shapes and order, initialisation, outputs in eval mode (float32 and float64) and in
train mode (same dropout masks by seeding, running statistics, gradients), the pretrained
weights' handling (with a stand-in for the download), errors, and the profile."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.googlenet import GoogLeNetOutputs

import dlcv_fast.nn as dnn
from dlcv_fast import models, profile
from dlcv_fast.models.googlenet import BasicConv2d
from tests.conftest import TOLERANCES, assert_close


def _keys_and_shapes(model: nn.Module) -> list[tuple[str, torch.Size]]:
    return [(k, v.shape) for k, v in model.state_dict().items()]


def _tv_vit_tiny(**kwargs) -> nn.Module:
    """torchvision's VisionTransformer with vit_tiny's hyper-parameters."""
    config = dict(image_size=32, patch_size=4, num_layers=12, num_heads=3, hidden_dim=192,
                  mlp_dim=768, num_classes=10)
    config.update(kwargs)
    return torchvision.models.VisionTransformer(**config)


@pytest.mark.parametrize("name,kwargs", [
    ("googlenet", dict(num_classes=17, dropout=0.3, dropout_aux=0.4)),
    ("googlenet", dict(num_classes=17, aux_logits=False, transform_input=True)),
    ("vit_b_16", dict(num_classes=17, image_size=64, dropout=0.1, attention_dropout=0.2)),
    ("vit_b_32", dict(num_classes=17, representation_size=33)),
    ("vit_l_16", dict(num_classes=17, image_size=48)),
])
def test_state_dict_keys_shapes_and_order_match_torchvision(name, kwargs):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        ours = models.MODELS[name](**kwargs)
        theirs = torchvision.models.get_model(name, weights=None, init_weights=False,
                                              **kwargs) if name == "googlenet" else \
            torchvision.models.get_model(name, weights=None, **kwargs)
    assert _keys_and_shapes(ours) == _keys_and_shapes(theirs)
    kinds = {type(m) for m in ours.modules()}
    assert dnn.Conv2d in kinds and nn.Conv2d not in kinds
    if name == "googlenet":
        assert {dnn.BatchNorm2d, dnn.MaxPool2d} <= kinds
        assert not kinds & {nn.BatchNorm2d, nn.MaxPool2d}
        bns = [m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(m.eps == 0.001 and m.activation == "relu" for m in bns)
        assert all(m.ceil_mode for m in ours.modules() if isinstance(m, nn.MaxPool2d))
        assert ours.dropout.p == theirs.dropout.p
        assert (ours.aux1 is None) == (theirs.aux1 is None)
        assert ours.transform_input == theirs.transform_input
        if ours.aux1 is not None:
            assert ours.aux1.dropout.p == theirs.aux1.dropout.p == 0.4
    else:
        assert dnn.MultiheadAttention in kinds and nn.MultiheadAttention not in kinds
        attn = [m for m in ours.modules() if isinstance(m, nn.MultiheadAttention)]
        assert all(m.batch_first for m in attn)
        assert {m.dropout for m in attn} == {kwargs.get("attention_dropout", 0.0)}
        assert ours.image_size == theirs.image_size and ours.seq_length == theirs.seq_length
        assert ours.patch_size == theirs.patch_size


def test_vit_tiny_is_the_vision_transformer_with_deit_tiny_widths():
    with torch.device("meta"):
        ours = models.vit_tiny()
        theirs = _tv_vit_tiny()
    assert _keys_and_shapes(ours) == _keys_and_shapes(theirs)
    assert (ours.image_size, ours.patch_size, ours.hidden_dim, ours.mlp_dim) == (32, 4, 192, 768)
    assert len(ours.encoder.layers) == 12
    assert ours.encoder.layers[0].self_attention.num_heads == 3
    assert ours.heads.head.out_features == 10
    with torch.device("meta"):
        other = models.vit_tiny(64, 5, patch_size=8, num_layers=2, dropout=0.1)
    assert (other.image_size, other.patch_size, other.seq_length) == (64, 8, 65)
    assert len(other.encoder.layers) == 2 and other.heads.head.out_features == 5


def test_initialisation_follows_torchvision():
    torch.manual_seed(0)
    ours = models.googlenet(num_classes=10)
    torch.manual_seed(0)
    theirs = torchvision.models.googlenet(num_classes=10, init_weights=True)
    for (k, p), q in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(p, q), k
    conv_stem = [torchvision.models.vision_transformer.ConvStemConfig(16, 3, 2),
                 models.vit.ConvStemConfig(24, 3, 2)]
    for kwargs in (dict(patch_size=8, representation_size=20),
                   dict(patch_size=4, conv_stem_configs=conv_stem)):
        torch.manual_seed(0)
        ours = models.VisionTransformer(32, num_layers=2, num_heads=3, hidden_dim=48,
                                        mlp_dim=96, num_classes=7, **kwargs)
        torch.manual_seed(0)
        theirs = torchvision.models.VisionTransformer(32, num_layers=2, num_heads=3,
                                                      hidden_dim=48, mlp_dim=96,
                                                      num_classes=7, **kwargs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        for (k, p), q in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(p, q), k


def _randomise_(model: nn.Module, seed: int) -> None:
    """Weights that keep activations of order one through the network (a random init of
    std 0.01, or torchvision's zero head, would leave only the biases to compare), and
    batch-norm running statistics that are not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            elif isinstance(m, nn.MultiheadAttention):
                w = m.in_proj_weight
                w.copy_(torch.randn(w.shape, generator=gen) / m.embed_dim ** 0.5)
                m.in_proj_bias.copy_(torch.randn(m.in_proj_bias.shape, generator=gen) * 0.1)
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        for name, p in model.named_parameters(recurse=True):
            if name in ("class_token", "encoder.pos_embedding"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def assert_matches(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ours(x) against theirs(x), both in eval mode and x's dtype: in float64 by the table;
    in float32 by the reductions rule, since a deep network is a chain of them:
    the error against torchvision's model in float64 at most twice torchvision's own, plus
    the table's absolute term. The errors are root-mean-squares over the output: the
    largest of a few values would be too noisy a measure to take a ratio of. Returns
    torchvision's output."""
    with torch.no_grad():
        y_ours, y_theirs = ours(x), theirs(x)
        if x.dtype == torch.float64:
            assert_close(y_ours, y_theirs)
            return y_theirs
        reference = copy.deepcopy(theirs).double()(x.double())
    rms = lambda t: t.double().square().mean().sqrt().item()  # noqa: E731
    err, own = rms(y_ours - reference), rms(y_theirs - reference)
    assert err <= 2 * own + TOLERANCES[x.dtype][1], (err, own)
    return y_theirs


def _pair(ours: nn.Module, theirs: nn.Module, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    _randomise_(theirs, seed)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _googlenet_pair(**kwargs):
    kwargs.setdefault("num_classes", 10)
    torch.manual_seed(0)
    ours = models.googlenet(init_weights=False, **kwargs)
    theirs = torchvision.models.googlenet(init_weights=False, **kwargs)
    return _pair(ours, theirs)


def _vit_pair(image_size=32, patch_size=8, **kwargs):
    config = dict(num_layers=2, num_heads=3, hidden_dim=48, mlp_dim=96, num_classes=7)
    config.update(kwargs)
    torch.manual_seed(0)
    ours = models.VisionTransformer(image_size, patch_size, **config)
    theirs = torchvision.models.VisionTransformer(image_size, patch_size, **config)
    return _pair(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", [dict(), dict(aux_logits=False, transform_input=True)])
def test_googlenet_eval_matches_torchvision(kwargs, dtype):
    ours, theirs = _googlenet_pair(**kwargs)
    ours.to(dtype).eval()
    theirs.to(dtype).eval()
    x = torch.randn(2, 3, 35, 35, dtype=dtype)  # odd: the ceil_mode pools round up
    y_theirs = assert_matches(ours, theirs, x)
    with torch.no_grad():
        y = ours(x)
    assert type(y) is torch.Tensor and y.shape == (2, 10)  # no aux outputs in eval
    assert y_theirs.std() > 0.1  # a signal through the whole network, not just the biases


def _loss(y) -> torch.Tensor:
    if isinstance(y, tuple):
        return sum(t.square().sum() for t in y)
    return y.square().sum()


@pytest.mark.parametrize("aux_logits", [True, False])
def test_googlenet_train_matches_torchvision(aux_logits):
    """Train mode, float64: outputs (the aux heads' too) with the same dropout masks by
    seeding, running statistics, and gradients within the reductions rule (twice
    PyTorch's own spread, measured on the batch reversed, plus the table's absolute term):
    tens of train-mode batch norms over small batch statistics. Gradients without dropout,
    whose masks would not follow the reversed batch."""
    ours, theirs = _googlenet_pair(aux_logits=aux_logits, dropout=0.3, dropout_aux=0.5)
    ours.double().train()
    theirs.double().train()
    x = torch.randn(4, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(1)
        y_ours = ours(x)
        torch.manual_seed(1)
        y_theirs = theirs(x)
        torch.manual_seed(2)
        y_other = ours(x)
        torch.manual_seed(2)
        theirs(x)  # the same number of steps for the running statistics
    assert not torch.allclose(y_ours[0], y_other[0])  # dropout is live
    if aux_logits:
        assert type(y_ours) is GoogLeNetOutputs and type(y_theirs) is GoogLeNetOutputs
        for a, b, field in zip(y_ours, y_theirs, GoogLeNetOutputs._fields):
            assert_close(a, b, msg=field)
    else:
        assert type(y_ours) is torch.Tensor
        assert_close(y_ours, y_theirs)
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        if a.is_floating_point():  # running statistics updated alike
            assert_close(a, b, msg=k)
        else:
            assert torch.equal(a, b), k
    for m in (*ours.modules(), *theirs.modules()):
        if isinstance(m, nn.Dropout):
            m.eval()
    _loss(ours(x)).backward()
    _loss(theirs(x)).backward()
    grads_theirs = [p.grad.clone() for p in theirs.parameters()]
    theirs.zero_grad()
    _loss(theirs(x.flip(0))).backward()
    names = [k for k, _ in ours.named_parameters()]
    assert any(".aux1." in f".{k}" for k in names) == aux_logits
    for k, p, b, q in zip(names, ours.parameters(), grads_theirs, theirs.parameters()):
        assert p.grad is not None and b.abs().max() > 0, k  # every parameter is trained
        spread = (q.grad - b).abs().max().item()
        err = (p.grad - b).abs().max().item()
        assert err <= 2 * spread + 1e-12 * max(1.0, b.abs().max().item()), (k, err, spread)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", [
    dict(patch_size=16, representation_size=20),  # 4 patches + the class token
    dict(image_size=36, patch_size=12, num_heads=4),  # 9 patches, head width 12
])
def test_vit_eval_matches_torchvision(kwargs, dtype):
    ours, theirs = _vit_pair(**kwargs)
    ours.to(dtype).eval()
    theirs.to(dtype).eval()
    size = ours.image_size
    x = torch.randn(3, 3, size, size, dtype=dtype)
    assert assert_matches(ours, theirs, x).std() > 0.1


@pytest.mark.parametrize("name,size", [("vit_b_16", 32), ("vit_b_32", 64)])
def test_vit_builders_match_torchvision(name, size):
    """The full-width builders (12 layers, width 768) on small images: 4 patches."""
    torch.manual_seed(0)
    ours = models.MODELS[name](image_size=size, num_classes=5)
    theirs = torchvision.models.get_model(name, image_size=size, num_classes=5)
    ours, theirs = _pair(ours, theirs)
    assert ours.seq_length == 5
    assert assert_matches(ours.eval(), theirs.eval(), torch.randn(2, 3, size, size)).std() > 0.1


def test_vit_train_matches_torchvision():
    """dropout > 0 (torch.nn.Dropout layers, same masks by seeding): outputs and every
    gradient in float64."""
    ours, theirs = _vit_pair(dropout=0.2, representation_size=20)
    ours.double().train()
    theirs.double().train()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(1)
    y_ours = ours(x)
    torch.manual_seed(1)
    y_theirs = theirs(x)
    torch.manual_seed(2)
    with torch.no_grad():
        y_other = theirs(x)
    assert not torch.allclose(y_theirs, y_other)  # dropout is live
    assert_close(y_ours, y_theirs)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    for (k, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, msg=k)


def test_vit_tiny_matches_torchvision_train_and_eval():
    torch.manual_seed(0)
    ours, theirs = _pair(models.vit_tiny(num_layers=3), _tv_vit_tiny(num_layers=3))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours.eval()(x), theirs.eval()(x))
    ours.double().train()
    theirs.double().train()
    x = x.double()
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    for name in ("class_token", "encoder.pos_embedding", "conv_proj.weight",
                 "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
                 "encoder.layers.encoder_layer_2.mlp.0.weight", "heads.head.weight"):
        assert_close(ours.get_parameter(name).grad, theirs.get_parameter(name).grad, msg=name)


def test_vit_attention_dropout_is_live_in_training_only():
    """Attention dropout runs in the fused kernel, whose masks are not torch's: the same
    seed gives the same result, another seed another one; eval mode is torchvision's."""
    ours, theirs = _vit_pair(attention_dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    ours.train()
    with torch.no_grad():
        torch.manual_seed(3)
        a = ours(x)
        torch.manual_seed(3)
        b = ours(x)
        torch.manual_seed(4)
        c = ours(x)
        assert torch.equal(a, b) and not torch.allclose(a, c)
        assert_close(ours.eval()(x), theirs.eval()(x))


def _fake_download(monkeypatch, state_dict_of):
    """torchvision's weights loader, returning ``state_dict_of(url)`` instead of
    downloading."""
    import torchvision.models._api as api

    monkeypatch.setattr(api, "load_state_dict_from_url",
                        lambda url, *args, **kwargs: state_dict_of(url))


def test_googlenet_pretrained_weights_handling(monkeypatch):
    """As torchvision: transform_input on, aux heads dropped unless asked for (then a
    warning), 1000 classes; with a stand-in for the download."""
    torch.manual_seed(0)
    source = torchvision.models.googlenet(init_weights=False)
    _randomise_(source, 5)
    _fake_download(monkeypatch, lambda url: source.state_dict())
    ours = models.googlenet(weights="IMAGENET1K_V1")
    theirs = torchvision.models.googlenet(weights="DEFAULT")
    assert ours.transform_input and not ours.aux_logits and ours.aux1 is None
    assert _keys_and_shapes(ours) == _keys_and_shapes(theirs)
    assert_matches(ours.eval(), theirs.eval(), torch.randn(1, 3, 40, 40))
    assert type(ours.train()(torch.randn(2, 3, 40, 40))) is torch.Tensor  # no aux heads
    with pytest.warns(UserWarning, match="auxiliary classifiers"):
        with_aux = models.googlenet(weights="IMAGENET1K_V1", aux_logits=True,
                                    transform_input=False)
    assert with_aux.aux1 is not None and not with_aux.transform_input
    with pytest.raises(ValueError, match="num_classes must be 1000 with pretrained weights"):
        models.googlenet(weights="IMAGENET1K_V1", num_classes=10)
    with pytest.raises(ValueError, match="init_weights must be False"):
        models.googlenet(weights="IMAGENET1K_V1", init_weights=True)


def test_vit_loads_weights_with_the_old_mlp_key_names(monkeypatch):
    """torchvision's published ViT weights name the MLP layers linear_1 and linear_2."""
    _, theirs = _vit_pair()
    old = {}
    for k, v in theirs.state_dict().items():
        old[k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2.")] = v
    assert any("linear_1" in k for k in old)  # no _metadata: a version-1 file
    ours = models.VisionTransformer(32, 8, 2, 3, 48, 96, num_classes=7)
    ours.load_state_dict(old)
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), k
    # the builder's path: image_size and num_classes from the weights' metadata
    _fake_download(monkeypatch, lambda url: pytest.fail("no download expected"))
    with pytest.raises(ValueError, match="image_size must be 224 with pretrained weights"):
        models.vit_b_16(weights="IMAGENET1K_V1", image_size=32)
    with pytest.raises(ValueError, match="num_classes must be 1000"):
        models.vit_b_32(weights="DEFAULT", num_classes=10)


def test_errors():
    with pytest.raises(ValueError, match=r"indivisible by patch size: image_size \(30\) must "
                                         r"be a multiple of patch_size \(16\)"):
        models.vit_b_16(image_size=30)
    with pytest.raises(ValueError, match=r"hidden_dim \(50\) must be a multiple of num_heads"):
        models.VisionTransformer(32, 8, 1, 3, 50, 64)
    vit = models.vit_tiny(num_layers=1)
    with pytest.raises(ValueError, match="wrong image height: expected 32 .* but got 28"):
        vit(torch.randn(1, 3, 28, 32))
    with pytest.raises(ValueError, match="wrong image width: expected 32 .* but got 36"):
        vit(torch.randn(1, 3, 32, 36))
    with pytest.raises(ValueError, match=r"input must be \(N, 3, H, W\)"):
        vit(torch.randn(3, 32, 32))
    stem = [models.vit.ConvStemConfig(8, 3, 2)]  # stride 2, patch_size 4
    with pytest.raises(ValueError, match="strides of conv_stem_configs must multiply to"):
        models.VisionTransformer(32, 4, 1, 2, 8, 16, conv_stem_configs=stem)(
            torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="blocks must hold 3 classes"):
        models.GoogLeNet(blocks=[BasicConv2d])
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        dnn.BatchNorm2d(4, activation="gelu")
    with pytest.raises(TypeError):
        models.googlenet(not_an_argument=1)


def test_registered_and_profiled():
    assert {"googlenet", "vit_b_16", "vit_b_32", "vit_l_16", "vit_tiny"} <= set(models.MODELS)
    model, channels, size, _ = profile.build_model("vit_b_32", image_size=64, num_classes=3)
    assert (channels, size, model.image_size, model.heads.head.out_features) == (3, 64, 64, 3)
    torch.manual_seed(0)
    model = models.vit_tiny(num_layers=1)
    _randomise_(model, 0)
    x = torch.randn(1, 3, 32, 32)
    rows, ms, torch_ms = profile.profile(model, x, progress=False, budget_s=0.005)
    assert [(r.layer, r.op) for r in rows] == [
        ("conv_proj", "conv2d"), ("encoder.layers.encoder_layer_0.self_attention", "attention")]
    # projections (4 of 65 tokens x 192 x 192) and the two products (65 x 65 x 192)
    assert rows[1].flops == 2 * 4 * 65 * 192 * 192 + 4 * 65 * 65 * 192
    assert rows[1].shape == (1, 65, 192) and ms > 0 and torch_ms > 0
    # the torch side of the whole model: torch layers only, fused ReLUs unfolded
    net = models.googlenet(num_classes=3, aux_logits=False, init_weights=False)
    ref = profile.torch_model(net)
    assert not any(type(m).__module__.startswith("dlcv_fast.nn") for m in ref.modules())
    _randomise_(net, 1)
    net.double()
    ref = profile.torch_model(net)
    x = torch.randn(2, 3, 33, 33, dtype=torch.float64)
    with torch.no_grad():
        assert_close(ref.eval()(x), net.eval()(x))
