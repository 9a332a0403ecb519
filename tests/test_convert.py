"""dlcv_fast.convert / revert: in-place swaps that share parameters, keep state_dict keys,
report what stays on torch, and undo exactly."""

from __future__ import annotations

import collections

import pytest
import torch
import torchvision
from torch import nn

import dlcv_fast
import dlcv_fast.nn as dnn
from dlcv_fast.convert import REGISTRY, register, torch_equivalent
from tests.conftest import assert_close


def _small():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(inplace=True),
        nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _types(model):
    return [type(m) for m in model.modules()]


def _state(model):
    return {k: (v.data_ptr(), v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fuse_relu", [False, True])
def test_convert_shares_parameters_and_reverts_exactly(fuse_relu):
    torch.manual_seed(0)
    model = _small()
    x = torch.randn(2, 3, 9, 11)
    expected = model(x)
    before_types, before_state, before_repr = _types(model), _state(model), repr(model)
    conv0 = model[0]
    summary = dlcv_fast.convert(model, fuse_relu=fuse_relu)
    assert summary.converted == collections.Counter({"Conv2d": 3, "MaxPool2d": 1})
    assert summary.fused == (2 if fuse_relu else 0)
    assert model[0] is conv0 and type(model[0]) is dnn.Conv2d  # same object, new class
    assert type(model[2]) is dnn.MaxPool2d
    assert _state(model) == before_state  # same keys, same tensors (no copies)
    assert (model[0].activation == "relu") == fuse_relu
    assert [(n, t) for n, t, _ in summary.left] == [("6", "AdaptiveAvgPool2d"), ("8", "Linear")]
    assert "no layer for torch.nn.modules.linear.Linear" in summary.left[1][2]
    assert "left on torch" in str(summary) and "Conv2d" in str(summary)
    assert_close(model(x), expected)
    counts = dlcv_fast.revert(model)
    assert counts == collections.Counter({"Conv2d": 3, "MaxPool2d": 1})
    assert _types(model) == before_types and repr(model) == before_repr
    assert _state(model) == before_state
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # torch's own kernels


def test_gradients_flow_to_the_shared_parameters():
    torch.manual_seed(0)
    ref, model = _small(), _small()
    model.load_state_dict(ref.state_dict())
    dlcv_fast.convert(model, fuse_relu=True)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ref.double(), model.double()
    ref(x).sum().backward()
    model(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, msg=name)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a, b = _small(), _small()
    dlcv_fast.convert(a)
    b.load_state_dict(a.state_dict())  # converted -> plain
    for k, v in b.state_dict().items():
        assert torch.equal(v, a.state_dict()[k]), k
    c = _small()
    dlcv_fast.convert(c)
    c.load_state_dict(b.state_dict())  # plain -> converted
    for k, v in c.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.filterwarnings("ignore:Complex modules")
def test_left_on_torch_with_reasons():
    model = nn.Sequential(nn.Conv2d(2, 2, 3).to(torch.complex64),
                          nn.LazyConv2d(4, 3),
                          type("MyConv", (nn.Conv2d,), {})(2, 2, 1),
                          nn.MaxPool2d(2))
    summary = dlcv_fast.convert(model)
    assert summary.converted == collections.Counter({"MaxPool2d": 1})
    reasons = {name: reason for name, _, reason in summary.left}
    assert "complex64" in reasons["0"]
    assert "subclass of torch.nn.Conv2d" in reasons["1"]  # LazyConv2d, not materialised
    assert "subclass of torch.nn.Conv2d" in reasons["2"]
    assert type(model[0]) is nn.Conv2d and type(model[2]).__name__ == "MyConv"


def test_attention_with_heads_wider_than_the_kernels_stays_on_torch():
    model = nn.Sequential(nn.MultiheadAttention(512, 1), nn.MultiheadAttention(512, 2))
    summary = dlcv_fast.convert(model)
    assert summary.converted == collections.Counter({"MultiheadAttention": 1})
    assert dict((name, reason) for name, _, reason in summary.left) == {
        "0": "head dim 512 (embed_dim // num_heads) is above the fused kernels' 256"}
    assert type(model[0]) is nn.MultiheadAttention


def test_fusion_skips_hooked_layers_and_non_sequential():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU())
    model[2].register_forward_hook(lambda m, i, o: None)
    assert dlcv_fast.convert(model, fuse_relu=True).fused == 1
    assert model[0].activation == "relu" and model[2].activation is None
    relu = nn.ReLU()  # one ReLU object in two places: fusing it would drop the second
    shared = nn.Sequential(nn.Conv2d(1, 2, 3), relu, nn.Conv2d(2, 2, 3), relu)
    assert dlcv_fast.convert(shared, fuse_relu=True).fused == 0


def test_batch_norm_relu_fusion_and_revert():
    """A ReLU after a BatchNorm2d folds into it as after a Conv2d; revert restores both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 7, 7)
    before_types, before_repr = _types(model), repr(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected_train = model(x)  # updates the running statistics
    model.eval()
    expected_eval = model(x)
    model.load_state_dict(state)
    assert dlcv_fast.convert(model, fuse_relu=True).fused == 1
    assert model[0].activation is None and model[1].activation == "relu"
    assert "fused into the preceding layer" in repr(model[2])
    model.train()
    assert_close(model(x), expected_train)
    model.eval()
    assert_close(model(x), expected_eval)
    model.train()
    assert dlcv_fast.revert(model) == collections.Counter({"Conv2d": 2, "BatchNorm2d": 1})
    assert _types(model) == before_types and repr(model) == before_repr


def test_torch_equivalent_shares_parameters():
    conv = nn.Conv2d(3, 4, 3)
    dlcv_fast.convert(nn.Sequential(conv))
    conv.activation = "relu"
    twin = torch_equivalent(conv)
    assert type(twin[0]) is nn.Conv2d and twin[0].weight is conv.weight
    assert type(conv) is dnn.Conv2d  # the layer itself is untouched
    x = torch.randn(1, 3, 6, 6)
    assert_close(conv(x), twin(x))


def test_registry_holds_conv_and_pool():
    assert REGISTRY[nn.Conv2d].dlcv_cls is dnn.Conv2d
    assert REGISTRY[nn.MaxPool2d].dlcv_cls is dnn.MaxPool2d
    with pytest.raises(TypeError, match="must subclass"):
        register(nn.Conv2d, dnn.MaxPool2d)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        dlcv_fast.convert("not a model")


@pytest.mark.parametrize("name,size,left", [
    ("resnet50", 64, {"Linear", "AdaptiveAvgPool2d"}),
    ("googlenet", 64, {"Linear", "AdaptiveAvgPool2d"}),
    ("vit_b_16", 32, {"LayerNorm", "Linear"}),
])
def test_torchvision_models(name, size, left):
    """Conv2d, MaxPool2d, BatchNorm2d and MultiheadAttention run on dlcv_fast, the rest is
    reported as left on torch, the outputs match, and revert restores the model."""
    torch.manual_seed(0)
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    if name == "googlenet":
        kwargs.update(aux_logits=False, init_weights=True)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs).eval()
    n_conv = sum(type(m) is nn.Conv2d for m in model.modules())
    n_pool = sum(type(m) is nn.MaxPool2d for m in model.modules())
    n_bn = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    n_mha = sum(type(m) is nn.MultiheadAttention for m in model.modules())
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    model.double()
    before = _state(model)
    with torch.no_grad():
        expected = model(x)
        summary = dlcv_fast.convert(model)
        actual = model(x)
    assert summary.converted["Conv2d"] == n_conv > 0
    assert summary.converted["MaxPool2d"] == n_pool
    assert summary.converted["BatchNorm2d"] == n_bn
    assert summary.converted["MultiheadAttention"] == n_mha
    assert {t for _, t, _ in summary.left} == left
    assert _state(model) == before  # same keys, same tensors
    assert_close(actual, expected)
    dlcv_fast.revert(model)
    assert not any(type(m).__module__.startswith("dlcv_fast") for m in model.modules())


def test_sync_batch_norm_model():
    """SyncBatchNorm and BatchNorm2d convert like the others and run the same."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    summary = dlcv_fast.convert(model)
    assert summary.converted == collections.Counter(
        {"Conv2d": 2, "SyncBatchNorm": 1, "BatchNorm2d": 1})
    assert summary.left == []
    assert type(model[1]) is dnn.SyncBatchNorm and type(model[3][1]) is dnn.BatchNorm2d
    model.eval()  # SyncBatchNorm runs on one process only in eval mode
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        y = model(x)
        dlcv_fast.revert(model)
        assert type(model[1]) is nn.SyncBatchNorm
        assert_close(y, model(x))


def test_convert_twice_is_a_no_op_and_shared_layers_convert_once():
    conv = nn.Conv2d(2, 2, 3)
    model = nn.Sequential(conv, nn.ReLU(), conv)  # the same layer used twice
    assert dlcv_fast.convert(model).converted == collections.Counter({"Conv2d": 1})
    assert type(model[2]) is dnn.Conv2d
    assert dlcv_fast.convert(model).converted == collections.Counter()


class _FastLinear(nn.Module):
    """A stand-in for a dlcv_fast layer that does not subclass its torch.nn layer."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight.t())


def _to_linear(m):
    lin = nn.Linear(m.weight.shape[1], m.weight.shape[0], device="meta")
    lin.weight, lin.bias = m.weight, m.bias
    return lin


def test_registering_a_layer_that_is_not_a_subclass():
    """The make/undo path (for layers such as a future MultiheadAttention): new modules
    take the old ones' places, sharing parameters; a shared layer maps to one module."""
    from dlcv_fast.convert import _BY_DLCV

    register(nn.Linear, _FastLinear, make=lambda m: _FastLinear(m.weight, m.bias),
             undo=_to_linear)
    try:
        shared = nn.Linear(4, 4)
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), shared, shared)
        weights = [p for p in model.parameters()]
        x = torch.randn(2, 3)
        expected = model(x)
        keys = list(model.state_dict())
        summary = dlcv_fast.convert(model)
        assert summary.converted == collections.Counter({"Linear": 2})
        assert type(model[0]) is _FastLinear and model[2] is model[3]
        assert list(model.state_dict()) == keys
        assert [p for p in model.parameters()] == weights  # the same Parameter objects
        assert_close(model(x), expected)
        assert type(torch_equivalent(model[0])) is nn.Linear and type(model[0]) is _FastLinear
        assert dlcv_fast.revert(model) == collections.Counter({"Linear": 2})
        assert type(model[0]) is nn.Linear and model[2] is model[3]
        assert [p for p in model.parameters()] == weights
        assert_close(model(x), expected)
        with pytest.raises(TypeError, match="make and undo go together"):
            register(nn.Linear, _FastLinear, make=lambda m: m)
    finally:
        del REGISTRY[nn.Linear], _BY_DLCV[_FastLinear]


def test_transformer_layers_are_walked_into(monkeypatch):
    """torch.nn's composite modules hold MultiheadAttention layers: those are converted,
    the composite's other layers reported, and the outputs match."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True),
        2, enable_nested_tensor=False).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    expected = model(x)  # grad enabled: the composite's Python path, which calls self_attn
    summary = dlcv_fast.convert(model)
    assert summary.converted == collections.Counter({"MultiheadAttention": 2})
    assert {t for _, t, _ in summary.left} == {"Linear", "LayerNorm"}
    assert all(type(layer.self_attn) is dnn.MultiheadAttention for layer in model.layers)
    assert_close(model(x), expected)
    # What the summary's note says: in eval mode without grad torch's fused path bypasses
    # the converted layers, unless that path is turned off.
    assert "2 x TransformerEncoderLayer: in eval mode without grad" in str(summary)
    calls = []
    forward = dnn.MultiheadAttention.forward
    monkeypatch.setattr(dnn.MultiheadAttention, "forward",  # (a hook would stop that path)
                        lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs))
    model.eval().float()  # the fused path takes float32
    with torch.no_grad():
        fused = model(x.float())
        assert calls == []
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            assert_close(model(x.float()), fused)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        assert len(calls) == 2
    dlcv_fast.revert(model)
    assert type(model.layers[0].self_attn) is nn.MultiheadAttention
    # Without batch_first torch never takes that path: no note.
    seq_first = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32)
    assert dlcv_fast.convert(seq_first).notes == []


def test_revert_takes_a_module():
    with pytest.raises(TypeError, match="revert: model must be a torch.nn.Module"):
        dlcv_fast.revert("not a model")


def test_revert_warns_of_the_subclasses_it_leaves():
    """A layer parametrized after the conversion is a subclass of the dlcv_fast layer: revert
    cannot turn it back alone, and says so."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    dlcv_fast.convert(model)
    nn.utils.parametrizations.weight_norm(model[0])
    with pytest.warns(UserWarning, match=r"left 1 layer\(s\) that subclass dlcv_fast layers as "
                                         r"they are \(ParametrizedConv2d\)"):
        counts = dlcv_fast.revert(model)
    assert counts == collections.Counter({"BatchNorm2d": 1})
    assert type(model[1]) is nn.BatchNorm2d and isinstance(model[0], dlcv_fast.nn.Conv2d)
