"""AlexNet (Krizhevsky et al., 2012), in torchvision's single-tower form."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import dlcv_fast.nn as dnn
from dlcv_fast.models._weights import load_torchvision_weights, verified_weights


class AlexNet(nn.Module):
    """Same layers, arguments and state_dict keys as ``torchvision.models.AlexNet``."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            dnn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            dnn.MaxPool2d(kernel_size=3, stride=2),
            dnn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            dnn.MaxPool2d(kernel_size=3, stride=2),
            dnn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            dnn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            dnn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            dnn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def alexnet(*, weights=None, progress: bool = True, **kwargs: Any) -> AlexNet:
    """AlexNet with ``torchvision.models.alexnet``'s arguments (``num_classes``,
    ``dropout``; ``weights`` loads torchvision's pretrained weights, downloading them)."""
    weights = verified_weights("alexnet", weights, kwargs)
    return load_torchvision_weights(AlexNet(**kwargs), "alexnet", weights, progress)
