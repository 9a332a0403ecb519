"""Drop-in replacements for torch.nn layers: same constructor, parameters, buffers,
state_dict keys and repr; the forward pass runs dlcv_fast's kernels."""

from dlcv_fast.nn.attention import MultiheadAttention
from dlcv_fast.nn.batchnorm import BatchNorm1d, BatchNorm2d, SyncBatchNorm
from dlcv_fast.nn.conv import Conv2d
from dlcv_fast.nn.pooling import MaxPool2d

__all__ = ["BatchNorm1d", "BatchNorm2d", "Conv2d", "MaxPool2d", "MultiheadAttention",
           "SyncBatchNorm"]
