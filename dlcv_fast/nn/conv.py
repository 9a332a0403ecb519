"""Convolution layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlcv_fast.nn._activation import checked_activation, repr_with_activation
from dlcv_fast.nn._fx import traced_as_leaf
from dlcv_fast.ops.conv2d import conv2d


class Conv2d(torch.nn.Conv2d):
    """:class:`torch.nn.Conv2d` on dlcv_fast's kernels.

    A subclass: the same constructor (in_channels, out_channels, kernel_size, stride=1,
    padding=0, dilation=1, groups=1, bias=True, padding_mode='zeros', device=None,
    dtype=None), initialisation, parameters, ``state_dict`` keys and repr, and
    ``isinstance(m, torch.nn.Conv2d)`` holds. One keyword more: ``activation='relu'``
    applies bias and ReLU in the convolution's epilogue (shown in the repr).
    Padding modes other than 'zeros' pad the input first, as torch does.
    """

    def __init__(self, *args, activation: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = checked_activation("Conv2d", activation)

    def extra_repr(self) -> str:
        return repr_with_activation(super().extra_repr(), self.activation)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        traced = traced_as_leaf(self, input)
        return super().forward(input) if traced is None else traced

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        return conv2d(input, weight, bias, self.stride, padding, self.dilation, self.groups,
                      activation=self.activation)
