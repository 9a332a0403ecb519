"""LeNet-5 (LeCun et al., 1998) with ReLU and max-pooling, for 32x32 images."""

from __future__ import annotations

import torch
from torch import nn

import dlcv_fast.nn as dnn


class LeNet5(nn.Module):
    """conv 5x5 (6) - pool - conv 5x5 (16) - pool - fc 120 - fc 84 - fc num_classes.

    Input (N, in_channels, 32, 32); the feature map before the classifier is 16 x 5 x 5.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            dnn.Conv2d(in_channels, 6, kernel_size=5),
            nn.ReLU(inplace=True),
            dnn.MaxPool2d(kernel_size=2, stride=2),
            dnn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            dnn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


def lenet5(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0) -> LeNet5:
    """LeNet-5 for (N, in_channels, 32, 32) inputs. torchvision has no LeNet, so there are
    no pretrained weights."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
