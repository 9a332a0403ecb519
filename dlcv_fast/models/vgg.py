"""VGG (Simonyan and Zisserman, 2014), configurations A, B, D and E (11, 13, 16 and 19
weight layers), as torchvision lays them out."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import dlcv_fast.nn as dnn
from dlcv_fast.models._weights import load_torchvision_weights, verified_weights

# Output channels of each 3x3 convolution, "M" for a 2x2 max-pool.
CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


def make_features(config: list[int | str], batch_norm: bool = False,
                  in_channels: int = 3) -> nn.Sequential:
    """The convolutional part. Each convolution is followed by a ReLU, with a BatchNorm2d
    between them in the batch-norm variants, as torchvision lays them out."""
    layers: list[nn.Module] = []
    for v in config:
        if v == "M":
            layers.append(dnn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(dnn.Conv2d(in_channels, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(dnn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            in_channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """Same arguments, initialisation and state_dict keys as ``torchvision.models.VGG``."""

    def __init__(self, features: nn.Module, num_classes: int = 1000, init_weights: bool = True,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        if init_weights:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _vgg(name: str, weights, progress: bool, **kwargs: Any) -> VGG:
    weights = verified_weights(name, weights, kwargs)
    if weights is not None:
        kwargs["init_weights"] = False
    batch_norm = name.endswith("_bn")
    model = VGG(make_features(CONFIGS[name.removesuffix("_bn")], batch_norm), **kwargs)
    return load_torchvision_weights(model, name, weights, progress)


def vgg11(*, weights=None, progress: bool = True, **kwargs: Any) -> VGG:
    """VGG-11 (configuration A) with ``torchvision.models.vgg11``'s arguments."""
    return _vgg("vgg11", weights, progress, **kwargs)


def vgg13(*, weights=None, progress: bool = True, **kwargs: Any) -> VGG:
    """VGG-13 (configuration B) with ``torchvision.models.vgg13``'s arguments."""
    return _vgg("vgg13", weights, progress, **kwargs)


def vgg16(*, weights=None, progress: bool = True, **kwargs: Any) -> VGG:
    """VGG-16 (configuration D) with ``torchvision.models.vgg16``'s arguments."""
    return _vgg("vgg16", weights, progress, **kwargs)


def vgg19(*, weights=None, progress: bool = True, **kwargs: Any) -> VGG:
    """VGG-19 (configuration E) with ``torchvision.models.vgg19``'s arguments."""
    return _vgg("vgg19", weights, progress, **kwargs)


def vgg11_bn(*, weights=None, progress: bool = True, **kwargs: Any) -> VGG:
    """VGG-11 with batch norm, with ``torchvision.models.vgg11_bn``'s arguments."""
    return _vgg("vgg11_bn", weights, progress, **kwargs)


def vgg13_bn(*, weights=None, progress: bool = True, **kwargs: Any) -> VGG:
    """VGG-13 with batch norm, with ``torchvision.models.vgg13_bn``'s arguments."""
    return _vgg("vgg13_bn", weights, progress, **kwargs)


def vgg16_bn(*, weights=None, progress: bool = True, **kwargs: Any) -> VGG:
    """VGG-16 with batch norm, with ``torchvision.models.vgg16_bn``'s arguments."""
    return _vgg("vgg16_bn", weights, progress, **kwargs)


def vgg19_bn(*, weights=None, progress: bool = True, **kwargs: Any) -> VGG:
    """VGG-19 with batch norm, with ``torchvision.models.vgg19_bn``'s arguments."""
    return _vgg("vgg19_bn", weights, progress, **kwargs)
