"""Pooling layers."""

import torch

from dlcv_fast.nn._fx import traced_as_leaf
from dlcv_fast.ops.max_pool2d import max_pool2d


class MaxPool2d(torch.nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` on dlcv_fast's kernels.

    A subclass, so it takes the same arguments (kernel_size, stride=None, padding=0,
    dilation=1, return_indices=False, ceil_mode=False), has the same repr, and passes
    ``isinstance(m, torch.nn.MaxPool2d)``.
    """

    def forward(self, input: torch.Tensor):
        traced = traced_as_leaf(self, input)
        if traced is not None:
            return traced
        return max_pool2d(
            input, self.kernel_size, self.stride, self.padding, self.dilation,
            ceil_mode=self.ceil_mode, return_indices=self.return_indices,
        )
