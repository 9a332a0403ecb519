"""GoogLeNet (Szegedy et al., 2014), Inception v1 with batch norm, as torchvision lays it
out: the same modules, arguments, initialisation, state_dict keys and outputs (also the
3x3 convolution in place of the paper's 5x5 in each inception block's third branch)."""

from __future__ import annotations

import warnings
from collections import namedtuple
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dlcv_fast.nn as dnn
from dlcv_fast.models._weights import (
    load_torchvision_weights,
    override_param,
    verified_weights,
)

_OUTPUTS: type | None = None


def _outputs_type() -> type:
    """torchvision's GoogLeNetOutputs namedtuple, so that code testing for it works; an
    equal one when torchvision is not installed. Imported on first use: importing
    torchvision with dlcv_fast would cost every user a second."""
    global _OUTPUTS
    if _OUTPUTS is None:
        try:
            from torchvision.models.googlenet import GoogLeNetOutputs as outputs
        except ImportError:  # torchvision is optional
            outputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])
        _OUTPUTS = outputs
    return _OUTPUTS


def __getattr__(name: str):
    if name == "GoogLeNetOutputs":
        return _outputs_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class BasicConv2d(nn.Module):
    """Convolution without bias, then batch norm (eps 0.001) with the ReLU in its pass."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs: Any) -> None:
        super().__init__()
        self.conv = dnn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = dnn.BatchNorm2d(out_channels, eps=0.001, activation="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class Inception(nn.Module):
    """Four branches concatenated on channels: 1x1; 1x1 then 3x3; 1x1 then 3x3 (torchvision
    keeps the 3x3 of the ported weights); 3x3 max-pool then 1x1."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int,
                 ch5x5: int, pool_proj: int,
                 conv_block: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        conv_block = conv_block or BasicConv2d
        self.branch1 = conv_block(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(conv_block(in_channels, ch3x3red, kernel_size=1),
                                     conv_block(ch3x3red, ch3x3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(conv_block(in_channels, ch5x5red, kernel_size=1),
                                     conv_block(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(
            dnn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            conv_block(in_channels, pool_proj, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """An auxiliary classifier: 4x4 average pool, 1x1 convolution to 128 channels, two linear
    layers with dropout between them."""

    def __init__(self, in_channels: int, num_classes: int,
                 conv_block: Callable[..., nn.Module] | None = None,
                 dropout: float = 0.7) -> None:
        super().__init__()
        conv_block = conv_block or BasicConv2d
        self.conv = conv_block(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(F.adaptive_avg_pool2d(x, (4, 4))), 1)
        x = self.dropout(F.relu(self.fc1(x), inplace=True))
        return self.fc2(x)


class GoogLeNet(nn.Module):
    """Same arguments, initialisation, state_dict keys and outputs as
    ``torchvision.models.GoogLeNet``; convolutions, batch norms (with the ReLU fused) and
    max-pools are dlcv_fast's.

    Args:
        num_classes: outputs of the classifier (and of the auxiliary ones).
        aux_logits: build the two auxiliary classifiers (after inception4a and 4d). In
            training mode the forward pass then returns ``GoogLeNetOutputs(logits,
            aux_logits2, aux_logits1)``; otherwise it returns the logits.
        transform_input: map inputs normalised with ImageNet's mean and std to the
            (x - 0.5) / 0.5 normalisation the ported weights expect.
        init_weights: truncated normal (std 0.01, cut at +-2) for convolutions and linear
            layers, ones and zeros for batch norms. None means True, as in torchvision.
        blocks: ``[conv_block, inception_block, inception_aux_block]`` classes; default
            ``[BasicConv2d, Inception, InceptionAux]`` of this module.
        dropout: before the classifier. dropout_aux: in the auxiliary classifiers.
    """

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True,
                 transform_input: bool = False, init_weights: bool | None = None,
                 blocks: list[Callable[..., nn.Module]] | None = None, dropout: float = 0.2,
                 dropout_aux: float = 0.7) -> None:
        super().__init__()
        if blocks is None:
            blocks = [BasicConv2d, Inception, InceptionAux]
        if len(blocks) != 3:
            raise ValueError(f"GoogLeNet: blocks must hold 3 classes (conv, inception, "
                             f"auxiliary classifier), but got {len(blocks)}")
        if init_weights is None:
            init_weights = True
        conv_block, inception_block, aux_block = blocks
        self.aux_logits = aux_logits
        self.transform_input = transform_input

        self.conv1 = conv_block(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = dnn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = conv_block(64, 64, kernel_size=1)
        self.conv3 = conv_block(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = dnn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception3a = inception_block(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = inception_block(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = dnn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception4a = inception_block(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = inception_block(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = inception_block(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = inception_block(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = inception_block(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = dnn.MaxPool2d(2, stride=2, ceil_mode=True)

        self.inception5a = inception_block(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = inception_block(832, 384, 192, 384, 48, 128, 128)

        if aux_logits:
            self.aux1 = aux_block(512, num_classes, dropout=dropout_aux)
            self.aux2 = aux_block(528, num_classes, dropout=dropout_aux)
        else:
            self.aux1 = None
            self.aux2 = None

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)

        if init_weights:  # in module order, so that a seed gives torchvision's weights
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

    def _transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transform_input:
            return x
        # per channel: undo ImageNet's (mean, std), apply (0.5, 0.5); same arithmetic as
        # torchvision, so the results are bit-identical
        x0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
        x1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
        x2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
        return torch.cat((x0, x1, x2), 1)

    def forward(self, x: torch.Tensor):
        x = self._transform_input(x)
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        # the auxiliary heads run in training only (their outputs feed the loss)
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if self.training and self.aux_logits:
            return _outputs_type()(x, aux2, aux1)
        return x


def googlenet(*, weights=None, progress: bool = True, **kwargs: Any) -> GoogLeNet:
    """GoogLeNet (Inception v1) with ``torchvision.models.googlenet``'s arguments.

    ``weights`` (``torchvision.models.GoogLeNet_Weights`` or its name) loads torchvision's
    ImageNet weights and, as torchvision does, sets ``transform_input=True`` unless given,
    ``init_weights=False`` and ``num_classes=1000`` (another value given is an error); the
    auxiliary classifiers, which those weights do not train, are dropped unless
    ``aux_logits=True`` is passed. Other keywords go to :class:`GoogLeNet`.
    """
    original_aux_logits = kwargs.get("aux_logits", False)
    weights = verified_weights("googlenet", weights, kwargs)
    if weights is not None:
        kwargs.setdefault("transform_input", True)
        override_param(kwargs, "aux_logits", True)
        override_param(kwargs, "init_weights", False)
    model = load_torchvision_weights(GoogLeNet(**kwargs), "googlenet", weights, progress)
    if weights is not None:
        if not original_aux_logits:
            model.aux_logits = False
            model.aux1 = None
            model.aux2 = None
        else:
            warnings.warn("googlenet: the auxiliary classifiers are not part of the "
                          "pretrained weights (randomly initialised): train them",
                          stacklevel=2)
    return model
