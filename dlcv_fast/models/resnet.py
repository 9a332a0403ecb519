"""ResNet (He et al., 2015): 18 and 34 layers of basic blocks, 50, 101 and 152 of
bottlenecks, laid out as torchvision lays them out (the stride of a bottleneck on its 3x3
convolution, "ResNet v1.5"), with torchvision's arguments and state_dict keys."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import dlcv_fast.nn as dnn
from dlcv_fast.models._weights import load_torchvision_weights, verified_weights


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1, dilation: int = 1):
    return dnn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, groups=groups, bias=False,
                      dilation=dilation)


def _conv1x1(cin: int, cout: int, stride: int = 1):
    return dnn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def _norm_then_relu(norm_layer, channels: int) -> nn.Module:
    """norm_layer(channels), which a ReLU follows (_relu_after): dlcv_fast's BatchNorm2d
    applies it in its own pass, one pass over memory each way instead of two."""
    if norm_layer is dnn.BatchNorm2d:
        return dnn.BatchNorm2d(channels, activation="relu")
    return norm_layer(channels)


def _relu_after(norm: nn.Module, relu: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """relu(x), unless the norm layer that made x applied it (a layer swapped in later, a
    torch BatchNorm2d say, does not)."""
    return x if getattr(norm, "activation", None) == "relu" else relu(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("dilation > 1 is not supported in BasicBlock")
        norm_layer = norm_layer or dnn.BatchNorm2d
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = _norm_then_relu(norm_layer, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = _relu_after(self.bn1, self.relu, self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer=None) -> None:
        super().__init__()
        norm_layer = norm_layer or dnn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = _norm_then_relu(norm_layer, width)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = _norm_then_relu(norm_layer, width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = _relu_after(self.bn1, self.relu, self.bn1(self.conv1(x)))
        out = _relu_after(self.bn2, self.relu, self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """Same arguments, initialisation and state_dict keys as ``torchvision.models.ResNet``;
    convolutions, batch norms and the max-pool are dlcv_fast's."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int],
                 num_classes: int = 1000, zero_init_residual: bool = False, groups: int = 1,
                 width_per_group: int = 64,
                 replace_stride_with_dilation: list[bool] | None = None,
                 norm_layer=None) -> None:
        super().__init__()
        self._norm_layer = norm_layer or dnn.BatchNorm2d
        self.inplanes, self.dilation = 64, 1
        replace_stride_with_dilation = replace_stride_with_dilation or [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element "
                             f"tuple, got {replace_stride_with_dilation}")
        self.groups, self.base_width = groups, width_per_group
        self.conv1 = dnn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = _norm_then_relu(self._norm_layer, self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = dnn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:  # each residual branch starts as zero: blocks as identities
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        norm_layer, downsample = self._norm_layer, None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(_relu_after(self.bn1, self.relu, self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_LAYERS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def _resnet(name: str, weights, progress: bool, **kwargs: Any) -> ResNet:
    block, layers = _LAYERS[name]
    weights = verified_weights(name, weights, kwargs)
    return load_torchvision_weights(ResNet(block, layers, **kwargs), name, weights, progress)


def resnet18(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-18 with ``torchvision.models.resnet18``'s arguments."""
    return _resnet("resnet18", weights, progress, **kwargs)


def resnet34(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-34 with ``torchvision.models.resnet34``'s arguments."""
    return _resnet("resnet34", weights, progress, **kwargs)


def resnet50(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-50 with ``torchvision.models.resnet50``'s arguments."""
    return _resnet("resnet50", weights, progress, **kwargs)


def resnet101(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-101 with ``torchvision.models.resnet101``'s arguments."""
    return _resnet("resnet101", weights, progress, **kwargs)


def resnet152(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
    """ResNet-152 with ``torchvision.models.resnet152``'s arguments."""
    return _resnet("resnet152", weights, progress, **kwargs)
